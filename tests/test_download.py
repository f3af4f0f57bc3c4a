"""The checkpoint registry (conf/checkpoints.yaml) and guidebench-download: consistency with the configs, fetching
from a local HTTP server (progress, resume, verification), failing fast without a network, and the hints that
missing files print."""

from __future__ import annotations

import hashlib
import http.server
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import hydra
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from guidebench import download as dl
from guidebench.checkpoints import CheckpointError, require_file
from guidebench.config import CONF_DIR, REPO_ROOT
from guidebench.download import DownloadError, Entry, FileSpec, NetworkError, Roots

REGISTRY = dl.load_registry()
GROUP_DIRS = ("backbone", "classifier", "guidance", "metrics")
ENV = {**os.environ, "OMP_NUM_THREADS": "2", "HYDRA_FULL_ERROR": "1"}


def compose_run(overrides=()):
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("run", overrides=list(overrides))
    GlobalHydra.instance().clear()
    return cfg


def choices(group):
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------------------
# A local server that honours (or, on request, ignores) Range headers and records every request.


class Server:
    def __init__(self, root: Path):
        self.root, self.requests, self.ignore_range = root, [], False
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                rng = self.headers.get("Range")
                path = server.root / urllib.parse.unquote(self.path.lstrip("/"))
                if not path.is_file():
                    server.requests.append((self.path, rng, 404, 0))
                    self.send_error(404)
                    return
                data = path.read_bytes()
                start = 0
                m = re.fullmatch(r"bytes=(\d+)-", rng or "")
                if m and not server.ignore_range:
                    start = int(m.group(1))
                    if start >= len(data):
                        server.requests.append((self.path, rng, 416, 0))
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                server.requests.append((self.path, rng, 206 if start else 200, len(body)))  # before the client can finish
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def put(self, rel: str, data: bytes) -> str:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return f"{self.url}/{rel}"

    def mirror(self, url: str, data: bytes) -> None:
        """Serve `data` where $GUIDEBENCH_MIRROR=self.url looks for `url`."""
        parts = urllib.parse.urlsplit(url)
        self.put(f"{parts.netloc}{parts.path}", data)


@pytest.fixture
def server(tmp_path):
    s = Server(tmp_path / "served")
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PAYLOAD = os.urandom(3 * (1 << 20) + 12345)  # more than one 1 MiB chunk


def entry(url, *, size=None, sha256=None, file="adm/model.pt", sha256_prefix=None) -> Entry:
    return Entry("test-model", "checkpoints", (FileSpec(file, url, size, sha256, sha256_prefix),), licence="test")


# ---------------------------------------------------------------------------------------------------------
# (1) The registry against the configs


def test_registry_entries_are_well_formed():
    targets = {}
    for name, e in REGISTRY.items():
        assert re.fullmatch(r"[a-z0-9][a-z0-9.+-]*", name), name
        assert e.licence, f"{name}: no licence"
        assert (e.root in dl.ROOT_KINDS) != (e.pip is not None), f"{name}: needs a root or a pip package"
        for f in e.files:
            assert f.url is None or f.url.startswith("https://"), f"{name}: {f.url}"
            assert f.url is not None or e.manual or e.pip, f"{name}: no URL and no manual instructions"
            assert f.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", f.sha256), name
            assert f.size is None or f.size > 0
        for used in e.used_by:
            assert (CONF_DIR / f"{used}.yaml").is_file(), f"{name}: used_by {used} is no config"
        if e.root:
            for rel in e.rel_paths():
                assert (e.root, rel) not in targets, f"{name} and {targets[(e.root, rel)]} share {rel}"
                targets[(e.root, rel)] = name
    # The reference sets the issue names, by URL.
    urls = {f.url for e in REGISTRY.values() for f in e.files}
    for res in (64, 128, 256):
        assert (f"https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/{res}/"
                f"VIRTUAL_imagenet{res}_labeled.npz") in urls
    assert "https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/imagenet-64x64.npz" in urls
    assert {"https://nvlabs-fi-cdn.nvidia.com/edm2/dataset-refs/img64.pkl",
            "https://nvlabs-fi-cdn.nvidia.com/edm2/dataset-refs/img512.pkl"} <= urls


def test_every_checkpoint_path_written_in_a_config_is_registered():
    registered = {rel for e in REGISTRY.values() if e.root == "checkpoints"
                  for rel in [*e.rel_paths(), *([e.folder] if e.folder else [])]}
    seen = set()
    for yaml_file in sorted(CONF_DIR.rglob("*.yaml")):
        for rel in re.findall(r"\$\{paths\.checkpoints\}/([^\s'\"#,\]}]+)", yaml_file.read_text()):
            if rel.startswith("digits/"):  # shipped with the repository
                continue
            seen.add(rel)
            assert rel in registered, f"{yaml_file.relative_to(CONF_DIR)}: {rel} has no conf/checkpoints.yaml entry"
    assert len(seen) >= 20  # the scan found the ImageNet configs' paths


@pytest.mark.parametrize("suite", [s for s in choices("metrics")
                                   if "references" in OmegaConf.load(CONF_DIR / "metrics" / f"{s}.yaml")])
def test_every_suite_reference_is_registered_with_the_same_url(suite):
    refs = OmegaConf.load(CONF_DIR / "metrics" / f"{suite}.yaml").references
    by_file = {e.files[0].rel: e for e in REGISTRY.values() if e.root == "references"}
    for res, spec in refs.items():
        assert spec.file in by_file, f"metrics/{suite}: {spec.file} is not registered"
        assert by_file[spec.file].files[0].url == spec.url, f"metrics/{suite} {res}: URLs differ"
        assert f"metrics/{suite}" in by_file[spec.file].used_by


def test_used_by_is_exactly_the_configs_that_point_at_the_file():
    derived: dict[str, set[str]] = {name: set() for name in REGISTRY}
    for group in GROUP_DIRS:
        for choice in choices(group):
            overrides = [f"{group}={choice}"] + (["guidance=classifier"] if group == "classifier" else [])
            cfg = compose_run(overrides)
            for name in dl.targets_for_config(cfg, all_references=True):
                derived[name].add(f"{group}/{choice}")
    # A file no group config points at is listed with the experiments that do.
    for experiment in choices("experiment"):
        for name in dl.targets_for_config(compose_run([f"experiment={experiment}"]), all_references=True):
            if not any(u.split("/")[0] in GROUP_DIRS for u in derived[name]):
                derived[name].add(f"experiment/{experiment}")
    for name, e in REGISTRY.items():
        if e.config_key:  # opt-in: no config points at it until the key is set
            for used in e.used_by:
                cfg = compose_run([f"metrics={used.split('/')[1]}"])
                assert OmegaConf.select(cfg, e.config_key, default="absent") is None, f"{name}: {used}"
            continue
        assert derived[name] == set(e.used_by), f"{name}: configs point at it from {sorted(derived[name])}"


@pytest.mark.parametrize("experiment", choices("experiment"))
def test_every_file_an_experiment_points_at_is_registered(experiment):
    cfg = compose_run([f"experiment={experiment}"])
    roots = dl.roots_from_config(cfg)
    registered = {os.path.normpath(p) for e in REGISTRY.values() if e.root
                  for p in [*map(str, e.targets(roots)), str(e.path(roots))]}
    for key, path in dl.config_paths(cfg, all_references=True).items():
        path = os.path.normpath(os.path.abspath(path))
        under = [r for r in (roots.checkpoints, roots.references) if path.startswith(str(r) + os.sep)]
        if under and not path.startswith(str(roots.checkpoints / "digits")):
            assert path in registered, f"experiment={experiment}: {key} = {path} is not registered"


@pytest.mark.parametrize("experiment, names", [
    ("adm_g_256", {"adm-256-diffusion", "adm-256-classifier", "ref-adm-imagenet256", "fid-helper-inception"}),
    ("ppap_adm256_resnet50", {"adm-256-diffusion-uncond", "ppap-resnet50-experts", "torchvision-resnet50-v2",
                              "ref-adm-imagenet256", "fid-helper-inception"}),
    ("dit_xl_2_256_cfg", {"dit-xl-2-256", "sd-vae-ft-ema", "ref-adm-imagenet256", "fid-helper-inception"}),
    ("elucd_edm64_10", {"edm-imagenet64-cond", "torchvision-resnet101-v2", "ref-edm-imagenet64",
                        "fid-helper-inception"}),  # pytorch-fid against EDM's statistics, as EluCD scored it
    ("eddpm_uadm25_g_eds_ect", {"adm-256-diffusion-uncond", "eddpm-256-classifier-ect", "ref-adm-imagenet256",
                                "fid-helper-inception"}),
    ("edm_imagenet64", {"edm-imagenet64-cond", "ref-adm-imagenet64", "fid-helper-inception"}),  # no classifier
    ("edm2_s_512_autoguidance_fid", {"edm2-img512-s-2147483-0.070", "edm2-img512-xs-0134217-0.125", "sd-vae-ft-mse",
                                     "ref-edm2-img512", "fid-helper-inception", "dinov2-vitl14"}),  # main net + guide
    ("demo", set()),
])
def test_targets_for_experiment(experiment, names):
    assert set(dl.targets_for_config(compose_run([f"experiment={experiment}"]))) == names


def test_targets_follow_overridden_roots_and_an_explicit_reference(tmp_path):
    cfg = compose_run(["experiment=adm_g_256", f"paths.checkpoints={tmp_path}",
                       f"metrics.reference={tmp_path / 'mine.npz'}"])
    assert set(dl.targets_for_config(cfg)) == {"adm-256-diffusion", "adm-256-classifier", "fid-helper-inception"}
    cfg = compose_run(["experiment=adm_g_256", "backbone.denoiser.checkpoint=/elsewhere/256x256_diffusion.pt"])
    assert "adm-256-diffusion" not in dl.targets_for_config(cfg)


def test_registry_urls_agree_with_the_loaders():
    from guidebench.backbones import adm, dit, edm, edm2
    from guidebench.classifiers import torchvision_resnet
    from guidebench.evaluation import dinov2, inception

    url = {name: e.files[0].url for name, e in REGISTRY.items()}
    for name, e in REGISTRY.items():
        rel = e.rel_paths()[0]
        if rel.startswith("adm/"):
            assert Path(rel).name in adm.RELEASED_FILES and url[name] == adm.RELEASE_URL + Path(rel).name
        if rel.startswith("dit/"):
            assert Path(rel).name in dit.RELEASED_FILES and url[name] == dit.RELEASE_URL + Path(rel).name
        if rel.startswith("edm/"):
            assert url[name] == edm.RELEASED_FILES[Path(rel).name]
        if rel.startswith("edm2/"):
            assert url[name] == edm2.RELEASE_URL + Path(rel).name
        if any(f.sha256_prefix for f in e.files):  # torchvision-named files
            assert all(f.sha256_prefix in f.url for f in e.files)
    assert url["torchvision-resnet50-v2"] == torchvision_resnet.WEIGHTS["resnet50"][1]
    assert url["torchvision-resnet101-v2"] == torchvision_resnet.WEIGHTS["resnet101"][1]
    assert url["dinov2-vitl14"] == dinov2.URL
    assert (url["inception-torch-fidelity"], REGISTRY["inception-torch-fidelity"].files[0].sha256) == (
        inception.FIDELITY_URL, inception.FIDELITY_SHA256)
    assert REGISTRY["fid-helper-inception"].files[0].sha256 == inception.FID_HELPER_SHA256
    assert all(f.url.startswith("https://huggingface.co/stabilityai/sd-vae-ft-ema/resolve/main/")
               for f in REGISTRY["sd-vae-ft-ema"].files)


# ---------------------------------------------------------------------------------------------------------
# (2) Downloading from a local server


def test_download_places_the_verified_file_with_a_progress_bar(tmp_path, server, capsys):
    url = server.put("m.pt", PAYLOAD)
    roots = Roots(tmp_path / "ck", tmp_path / "refs")
    paths = dl.download(entry(url, size=len(PAYLOAD), sha256=sha(PAYLOAD)), roots=roots, log=sys.stdout)
    assert paths == [tmp_path / "ck" / "adm" / "model.pt"]
    assert paths[0].read_bytes() == PAYLOAD
    assert not (tmp_path / "ck" / "adm" / "model.pt.part").exists()
    out = capsys.readouterr()
    assert "100%" in out.err and "test-model" in out.err  # tqdm's bar on stderr
    assert f"test-model: downloaded {paths[0]}" in out.out
    # A second call finds it in place, verifies it and does not ask the server again.
    n = len(server.requests)
    dl.download(entry(url, size=len(PAYLOAD), sha256=sha(PAYLOAD)), roots=roots, log=sys.stdout)
    assert len(server.requests) == n and "test-model: present" in capsys.readouterr().out


def test_download_resumes_a_partial_file_with_a_range_request(tmp_path, server):
    url = server.put("m.pt", PAYLOAD)
    target = tmp_path / "adm" / "model.pt"
    target.parent.mkdir(parents=True)
    k = 1_500_000
    (target.parent / "model.pt.part").write_bytes(PAYLOAD[:k])
    dl.download(entry(url, sha256=sha(PAYLOAD)), roots=Roots(tmp_path, tmp_path), progress=False)
    assert server.requests == [("/m.pt", f"bytes={k}-", 206, len(PAYLOAD) - k)]
    assert target.read_bytes() == PAYLOAD


def test_download_restarts_when_the_server_ignores_range(tmp_path, server):
    url = server.put("m.pt", PAYLOAD)
    server.ignore_range = True
    target = tmp_path / "adm" / "model.pt"
    target.parent.mkdir(parents=True)
    (target.parent / "model.pt.part").write_bytes(b"x" * 1000)  # not even a prefix: it must be discarded
    dl.download(entry(url, size=len(PAYLOAD), sha256=sha(PAYLOAD)), roots=Roots(tmp_path, tmp_path), progress=False)
    assert server.requests == [("/m.pt", "bytes=1000-", 200, len(PAYLOAD))]
    assert target.read_bytes() == PAYLOAD


def test_complete_part_file_is_verified_without_a_transfer(tmp_path, server):
    url = server.put("m.pt", PAYLOAD)
    target = tmp_path / "adm" / "model.pt"
    target.parent.mkdir(parents=True)
    (target.parent / "model.pt.part").write_bytes(PAYLOAD)
    dl.download(entry(url, size=len(PAYLOAD), sha256=sha(PAYLOAD)), roots=Roots(tmp_path, tmp_path), progress=False)
    assert server.requests == [] and target.read_bytes() == PAYLOAD


def test_hash_mismatch_places_nothing_and_deletes_nothing_else(tmp_path, server):
    url = server.put("m.pt", PAYLOAD)
    folder = tmp_path / "adm"
    folder.mkdir()
    (folder / "other.pt").write_bytes(b"keep me")
    wrong = sha(b"something else")
    with pytest.raises(DownloadError, match=f"does not verify .*expected {wrong}.*nothing was placed at "
                                            f"{re.escape(str(folder / 'model.pt'))}"):
        dl.download(entry(url, sha256=wrong), roots=Roots(tmp_path, tmp_path), progress=False)
    assert sorted(p.name for p in folder.iterdir()) == ["other.pt"]  # no target, no .part left to resume
    assert (folder / "other.pt").read_bytes() == b"keep me"


def test_wrong_size_and_wrong_release_prefix_are_refused(tmp_path, server):
    url = server.put("m.pt", PAYLOAD)
    with pytest.raises(DownloadError, match=f"{len(PAYLOAD)} bytes, expected {len(PAYLOAD) + 1}"):
        dl.download(entry(url, size=len(PAYLOAD) + 1), roots=Roots(tmp_path, tmp_path), progress=False)
    with pytest.raises(DownloadError, match="does not start with the release's 00000000"):
        dl.download(entry(url, sha256_prefix="00000000"), roots=Roots(tmp_path, tmp_path), progress=False)
    assert not (tmp_path / "adm" / "model.pt").exists()
    dl.download(entry(url, sha256_prefix=sha(PAYLOAD)[:8]), roots=Roots(tmp_path, tmp_path), progress=False)
    assert (tmp_path / "adm" / "model.pt").read_bytes() == PAYLOAD


def test_unpinned_download_prints_its_sha256(tmp_path, server, capsys):
    url = server.put("m.pt", PAYLOAD)
    dl.download(entry(url), roots=Roots(tmp_path, tmp_path), progress=False, log=sys.stdout)
    assert f"test-model: sha256 {sha(PAYLOAD)} ({len(PAYLOAD)} bytes" in capsys.readouterr().out


def test_an_existing_file_that_does_not_verify_is_kept_and_reported(tmp_path, server):
    url = server.put("m.pt", PAYLOAD)
    target = tmp_path / "adm" / "model.pt"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"old")
    with pytest.raises(DownloadError, match="exists but does not verify"):
        dl.download(entry(url, sha256=sha(PAYLOAD)), roots=Roots(tmp_path, tmp_path), progress=False)
    assert target.read_bytes() == b"old" and server.requests == []


def test_http_error_names_url_and_target(tmp_path, server):
    with pytest.raises(DownloadError, match=f"{server.url}/nope.pt: HTTP 404.*yourself to "
                                            f"{re.escape(str(tmp_path / 'adm' / 'model.pt'))}"):
        dl.download(entry(f"{server.url}/nope.pt"), roots=Roots(tmp_path, tmp_path), progress=False)


def test_a_folder_entry_from_the_registry_through_a_mirror(tmp_path, server, monkeypatch):
    e = REGISTRY["sd-vae-ft-ema"]
    data = {f.rel: os.urandom(1000 + i) for i, f in enumerate(e.files)}
    for f in e.files:
        server.mirror(f.url, data[f.rel])
    monkeypatch.setenv(dl.MIRROR_ENV, server.url)
    paths = dl.download("sd-vae-ft-ema", roots=Roots(tmp_path, tmp_path / "refs"), progress=False)
    assert paths == [tmp_path / "vae" / "sd-vae-ft-ema" / f.rel for f in e.files]
    assert all(p.read_bytes() == data[p.name] for p in paths)
    assert [r[0] for r in server.requests] == [f"/huggingface.co{urllib.parse.urlsplit(f.url).path}" for f in e.files]


def test_an_entry_without_a_url_says_how_to_get_it(tmp_path):
    with pytest.raises(DownloadError, match="no direct download: download 256x256_classifier\\+0.1ECT.pt from the "
                                            "Google Drive.*place it at " + re.escape(
                                                str(tmp_path / "eddpm" / "256x256_classifier+0.1ECT.pt"))):
        dl.download("eddpm-256-classifier-ect", roots=Roots(tmp_path, tmp_path))


# ---------------------------------------------------------------------------------------------------------
# (3) No network: fail at once with the URL and the target path


def test_a_closed_port_fails_at_once_naming_url_and_target(tmp_path):
    url = f"http://127.0.0.1:{closed_port()}/adm/256x256_diffusion.pt"
    start = time.monotonic()
    with pytest.raises(NetworkError) as err:
        dl.download(entry(url), roots=Roots(tmp_path, tmp_path), progress=False)
    assert time.monotonic() - start < 5
    target = tmp_path / "adm" / "model.pt"
    assert f"cannot reach {url}" in str(err.value) and f"download {url} yourself to {target}" in str(err.value)
    assert not target.exists()


def test_a_silent_server_times_out_quickly(tmp_path):
    with socket.socket() as listener:  # accepts connections (backlog) but never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/x.pt"
        start = time.monotonic()
        with pytest.raises(NetworkError, match=f"cannot reach {re.escape(url)} .*timed out"):
            dl.download(entry(url), roots=Roots(tmp_path, tmp_path), progress=False, timeout=1.0)
        assert time.monotonic() - start < 5


# ---------------------------------------------------------------------------------------------------------
# (4) Missing files name their guidebench-download line


def test_require_file_on_a_registered_path_names_the_download(tmp_path):
    with pytest.raises(CheckpointError) as err:
        require_file(tmp_path / "adm" / "256x256_diffusion.pt", source="somewhere")
    assert str(err.value).endswith(f"Or run: guidebench-download adm-256-diffusion --dir {tmp_path}")
    default = REPO_ROOT / "checkpoints" / "ppap" / "ResNet50" / "ppap_5" / "3_max5.ckpt"
    if not default.exists():
        with pytest.raises(CheckpointError) as err:
            require_file(default, source="somewhere")
        assert str(err.value).endswith("Or run: guidebench-download ppap-resnet50-experts")
    with pytest.raises(CheckpointError) as err:
        require_file(tmp_path / "mine" / "unregistered.pt", source="somewhere")
    assert "guidebench-download" not in str(err.value)


def test_wrong_hash_of_a_registered_file_names_the_download(tmp_path):
    path = tmp_path / "torchvision" / "resnet50_weight_V2.pth"
    path.parent.mkdir()
    path.write_bytes(b"not it")
    with pytest.raises(CheckpointError, match=f"wrong file .*Or run: guidebench-download torchvision-resnet50-v2 "
                                              f"--dir {re.escape(str(tmp_path))}$"):
        require_file(path, source="somewhere", sha256="0" * 64)


def test_a_missing_checkpoint_at_sampling_time_names_the_download(tmp_path):
    cfg = compose_run(["backbone=adm_256", f"paths.checkpoints={tmp_path}"])
    with pytest.raises(Exception) as err:
        hydra.utils.instantiate(cfg.backbone.denoiser)
    assert f"guidebench-download adm-256-diffusion --dir {tmp_path}" in str(err.value)


def test_a_missing_adm_reference_batch_names_the_download(tmp_path):
    from guidebench.evaluation.adm_suite import reference_for_resolution
    from guidebench.evaluation.reference import ReferenceError

    refs = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "metrics" / "adm.yaml").references)
    with pytest.raises(ReferenceError) as err:
        reference_for_resolution(256, refs, tmp_path)
    assert str(err.value).endswith(f"Or run: guidebench-download ref-adm-imagenet256 --dir {tmp_path}")


# ---------------------------------------------------------------------------------------------------------
# (5) The command line


def cli(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "guidebench.cli.download", *args], capture_output=True, text=True,
                          env={**ENV, **(env or {})}, timeout=timeout, cwd=REPO_ROOT)


def test_console_script_is_declared():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["guidebench-download"] == "guidebench.cli.download:main"


def test_cli_list_and_unknown_names():
    proc = cli("--list")
    assert proc.returncode == 0, proc.stderr
    listed = [line.split()[0] for line in proc.stdout.splitlines()]
    assert listed == list(REGISTRY)
    proc = cli("adm-256-difusion")
    assert proc.returncode == 2 and "did you mean adm-256-diffusion" in proc.stderr


def test_cli_experiment_downloads_what_it_needs_into_the_overridden_roots(tmp_path, server):
    names = ["adm-256-diffusion", "adm-256-classifier", "ref-adm-imagenet256"]
    data = {n: os.urandom(2000 + i) for i, n in enumerate(names)}
    for n in names:
        server.mirror(REGISTRY[n].files[0].url, data[n])
    args = ["experiment=adm_g_256", f"paths.checkpoints={tmp_path / 'ck'}",
            f"metrics.reference_dir={tmp_path / 'refs'}"]
    dry = cli(*args, "--dry-run", env={dl.MIRROR_ENV: server.url})
    assert dry.returncode == 0, dry.stderr
    assert [line[:-1] for line in dry.stdout.splitlines() if line.endswith(":")] == [*names, "fid-helper-inception"]
    assert server.requests == []
    proc = cli(*args, "--no-progress", env={dl.MIRROR_ENV: server.url})
    assert proc.returncode == 0, proc.stderr
    targets = {"adm-256-diffusion": tmp_path / "ck/adm/256x256_diffusion.pt",
               "adm-256-classifier": tmp_path / "ck/adm/256x256_classifier.pt",
               "ref-adm-imagenet256": tmp_path / "refs/VIRTUAL_imagenet256_labeled.npz"}
    for n, path in targets.items():
        assert path.read_bytes() == data[n]
        assert f"{n}: downloaded {path}" in proc.stdout and f"{n}: sha256 {sha(data[n])}" in proc.stdout
    assert "fid-helper-inception: present" in proc.stdout


def test_cli_without_network_stops_at_once_and_lists_urls_and_targets(tmp_path):
    args = ["experiment=adm_g_256", f"paths.checkpoints={tmp_path / 'ck'}",
            f"metrics.reference_dir={tmp_path / 'refs'}"]
    mirror = f"http://127.0.0.1:{closed_port()}"
    start = time.monotonic()
    proc = cli(*args, env={dl.MIRROR_ENV: mirror})
    assert proc.returncode == 1 and time.monotonic() - start < 60
    assert "cannot reach" in proc.stderr
    for n, path in {"adm-256-diffusion": tmp_path / "ck/adm/256x256_diffusion.pt",
                    "adm-256-classifier": tmp_path / "ck/adm/256x256_classifier.pt",
                    "ref-adm-imagenet256": tmp_path / "refs/VIRTUAL_imagenet256_labeled.npz"}.items():
        assert f"{dl.mirrored(REGISTRY[n].files[0].url, mirror)} -> {path}" in proc.stderr
        assert not path.exists()
