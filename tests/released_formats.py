"""Random-weight checkpoints of the released architectures, written in the released file formats.

For smoke tests of the real experiments without the real weights. Each `write_*` builds the network its
guidebench loader builds (from the composed config's own flags where the config has them, so a config change
is followed), gives it random weights and saves it laid out as the released file is:

    ADM diffusion / classifier  plain state dict (guided-diffusion's 256x256_diffusion.pt, ..._classifier.pt;
                                also ED-DPM's ECT classifier), float32 as released
    DiT                         plain state dict (DiT-XL-2-256x256.pt)
    sd-vae-ft-ema               diffusers AutoencoderKL folder (config.json + safetensors)
    EDM                         NVlabs/edm network snapshot pickle ({'ema': EDMPrecond, 'loss_fn', ...}, every
                                network class pickled through torch_utils.persistence as EDM does)
    EDM2                        NVlabs/edm2 posthoc-reconstruction pickle (EasyDict {'ema': Precond in float16,
                                'encoder', 'loss_fn', 'dataset_kwargs'}, persistence as EDM2 does); its
                                architecture follows from the released file name
    torchvision ResNet          torchvision state dict (resnet50_weight_V2.pth)
    timm ResNet                 the state dict timm downloads for the name
    PPAP experts                riiid/PPAP's {k}_max{n}.ckpt: full LoRA-ResNet state dicts, keys resnet.*
    DINOv2 ViT-L/14             dinov2_vitl14_pretrain.pth (518-px position grid, mask_token)

Layers that the architectures zero-initialise (ADM's zero_module, DiT's adaLN-Zero, EDM's init_zero convs,
EDM2's gains, LoRA's B) get small random values, so no branch of a smoke run is trivially dead.

`ReleasedCheckpoints` walks a composed config, writes one file for every `${paths.checkpoints}` path (once
per cache folder, keyed by loader, architecture and file name: several experiments share a file) and points
the config at them.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import pickle
import re
import shutil
import sys
import types
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

CHECKPOINTS = "${paths.checkpoints}"
EDM_PERSISTENCE_VERSION = 6  # NVlabs/edm torch_utils.persistence._version

# sd-vae-ft-ema's config.json (stabilityai/sd-vae-ft-ema): Stable Diffusion's KL-f8 autoencoder.
SD_VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                     layers_per_block=2, norm_num_groups=32, act_fn="silu", sample_size=256,
                     down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)

# EDM2's model sizes (train_edm2.py config_presets: channels).
EDM2_CHANNELS = {"xs": 128, "s": 192, "m": 256, "l": 320, "xl": 384, "xxl": 448}

# The constructor arguments that NVlabs/edm's released network pickles record (train.py --arch=adm --cond=1
# --dropout=0.10 --augment=0 --fp16=1 for ImageNet-64, Karras et al. 2022 Table 7): file name -> (class, kwargs).
EDM_RELEASED = {
    "edm-imagenet-64x64-cond-adm.pkl": ("EDMPrecond", dict(
        model_type="DhariwalUNet", model_channels=192, channel_mult=[1, 2, 3, 4], dropout=0.1, use_fp16=True,
        img_resolution=64, img_channels=3, label_dim=1000)),
}


# ----------------------------------------------------------------------------------------------
# Random weights


def randomize_zero_parameters(module: nn.Module, seed: int = 0, gain: float = 0.5,
                              keep: tuple[str, ...] = ("pos_embed",)) -> nn.Module:
    """Give every all-zero parameter N(0, (gain / sqrt(fan_in))^2) values (N(0, 0.1^2) if 1-D), in place."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.numel() == 0 or any(k in name for k in keep) or p.count_nonzero():
                continue
            std = gain / math.sqrt(p[0].numel()) if p.ndim >= 2 else 0.1
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def _seed(*parts: Any) -> int:
    return int(hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:8], 16)


# ----------------------------------------------------------------------------------------------
# Writers, one per released format


ADM_NON_FLAGS = ("_target_", "checkpoint", "sha256", "dtype", "clip_x0")


def adm_flags(node: Mapping[str, Any]) -> dict[str, Any]:
    """ADM's command-line flags of a backbone.denoiser / classifier node (its loader's **flags)."""
    return {k: v for k, v in node.items() if k not in ADM_NON_FLAGS}


def write_adm_diffusion(path: Path, flags: Mapping[str, Any], seed: int = 0) -> Path:
    """guided-diffusion's diffusion checkpoint: UNetModel(flags).state_dict(), float32."""
    from guidebench.backbones.adm import create_unet

    torch.manual_seed(seed)
    torch.save(randomize_zero_parameters(create_unet(flags), seed).state_dict(), path)
    return path


def write_adm_classifier(path: Path, flags: Mapping[str, Any], seed: int = 0) -> Path:
    """guided-diffusion's noisy classifier (and ED-DPM's ECT one): EncoderUNetModel(flags).state_dict()."""
    from guidebench.backbones.adm import create_classifier

    torch.manual_seed(seed)
    torch.save(randomize_zero_parameters(create_classifier(flags), seed, gain=1.5).state_dict(), path)
    return path


def write_dit(path: Path, model: str | Mapping[str, Any] = "DiT-XL/2", image_size: int = 256,
              num_classes: int = 1000, learn_sigma: bool = True, in_channels: int = 4,
              class_dropout_prob: float = 0.1, seed: int = 0) -> Path:
    """facebookresearch/DiT's released plain state dict (DiT-XL-2-256x256.pt)."""
    from guidebench.backbones.dit import DiT, architecture

    torch.manual_seed(seed)
    net = DiT(**architecture(model, image_size, num_classes=num_classes, learn_sigma=learn_sigma,
                             in_channels=in_channels, class_dropout_prob=class_dropout_prob))
    torch.save(randomize_zero_parameters(net, seed, gain=1.0).state_dict(), path)
    return path


def write_sd_vae(path: Path, seed: int = 0, **config: Any) -> Path:
    """A diffusers AutoencoderKL folder with sd-vae-ft-ema's architecture (config.json + safetensors)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    AutoencoderKL(**{**SD_VAE_CONFIG, **config}).save_pretrained(path)
    return path


def write_torchvision_resnet(path: Path, arch: str = "resnet50", seed: int = 0) -> Path:
    """torchvision's IMAGENET1K_V2 file layout: torchvision.models.<arch>().state_dict()."""
    import torchvision

    torch.manual_seed(seed)
    torch.save(randomize_zero_parameters(getattr(torchvision.models, arch)(), seed).state_dict(), path)
    return path


def write_timm(path: Path, model_name: str = "resnet50.tv2_in1k", seed: int = 0) -> Path:
    """The state dict timm loads for `model_name` (for the tv2_in1k ResNets: torchvision's file)."""
    import timm

    torch.manual_seed(seed)
    torch.save(randomize_zero_parameters(timm.create_model(model_name, pretrained=False), seed).state_dict(), path)
    return path


def write_ppap_expert(path: Path, arch: str = "resnet50", r: int = 16, lora_alpha: float = 8.0, seed: int = 0) -> Path:
    """One of riiid/PPAP's released experts ({k}_max{n}.ckpt): the LoRA ResNet's full state dict, keys resnet.*."""
    import torchvision

    from guidebench.classifiers.lora import add_lora_adapters
    from guidebench.classifiers.torchvision_resnet import TorchvisionClassifier

    torch.manual_seed(seed)
    expert = add_lora_adapters(TorchvisionClassifier(getattr(torchvision.models, arch)()), r, lora_alpha)
    state = randomize_zero_parameters(expert, seed).state_dict()
    torch.save({"resnet." + k.removeprefix("net."): v for k, v in state.items()}, path)
    return path


def write_dinov2(path: Path, seed: int = 0) -> Path:
    """dinov2_vitl14_pretrain.pth: the ViT-L/14 state dict with its 37 x 37 (518 px) position grid and mask_token."""
    from guidebench.evaluation import dinov2

    torch.manual_seed(seed)
    state = dinov2.build_vit(**dinov2.VIT_L14).state_dict()
    dim = dinov2.VIT_L14["embed_dim"]
    state["pos_embed"] = torch.randn(1, 1 + 37 * 37, dim) * 0.02
    state["cls_token"] = torch.randn(1, 1, dim) * 0.02  # build_vit skips weight init: torch.empty otherwise
    state["mask_token"] = torch.zeros(1, dim)
    torch.save(state, path)
    return path


class _Persistent:
    """A non-module persistent object (EDM's EDMLoss, EDM2's EDM2Loss and encoders) to pickle as class_name with
    `state`."""

    def __init__(self, class_name: str, state: dict):
        self.class_name, self.state = class_name, state


class _EasyDict(dict):
    """Stand-in dnnlib.util.EasyDict (EDM2's snapshot dict), importable while the pickle is written."""


@contextlib.contextmanager
def _persistence_modules():
    """Stand-ins for `torch_utils.persistence._reconstruct_persistent_obj` and `dnnlib.util.EasyDict`, importable
    while a pickle is written."""
    names = ("torch_utils", "torch_utils.persistence", "dnnlib", "dnnlib.util")
    saved = {name: sys.modules.get(name) for name in names}
    pkg, mod, dnnlib, util = (types.ModuleType(name) for name in names)

    def _reconstruct_persistent_obj(meta):  # EDM's exec()s meta['module_src']; never called here
        raise RuntimeError("stand-in for writing only")

    _reconstruct_persistent_obj.__module__ = mod.__name__
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    mod._reconstruct_persistent_obj = _reconstruct_persistent_obj
    pkg.persistence = mod
    easy_dict = type("EasyDict", (_EasyDict,), {"__module__": util.__name__})
    util.EasyDict = easy_dict
    dnnlib.util = util
    sys.modules.update(zip(names, (pkg, mod, dnnlib, util)))
    try:
        yield _reconstruct_persistent_obj, easy_dict
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old


@contextlib.contextmanager
def _recording_init_args(classes: list[type]):
    """Every object of `classes` built inside records its constructor arguments as `_init_args` / `_init_kwargs`,
    as EDM2's torch_utils.persistence decorator does for every persistent class."""
    saved = {cls: cls.__dict__["__init__"] for cls in classes}

    def recording(init):
        def __init__(self, *args, **kwargs):
            init(self, *args, **kwargs)
            self._init_args, self._init_kwargs = copy.deepcopy(args), copy.deepcopy(kwargs)
        return __init__

    for cls, init in saved.items():
        cls.__init__ = recording(init)
    try:
        yield
    finally:
        for cls, init in saved.items():
            cls.__init__ = init


def _dump_persistent(path: Path, snapshot: Callable[[type], dict], net: nn.Module, init_kwargs: Mapping[str, Any],
                     module: types.ModuleType, classes: frozenset, repo: str) -> Path:
    """Pickle `snapshot(EasyDict)` as torch_utils.persistence does: every network class of `module` named in
    `classes` (and every `_Persistent`) as REDUCE(_reconstruct_persistent_obj, meta) with meta = {type, version,
    module_src, class_name, state = the object's __dict__}; `net`'s state records _init_args / _init_kwargs (its
    constructor arguments). module_src is a placeholder (guidebench never runs it); tensors are plainly pickled
    (storages via torch.storage._load_from_bytes), nn.ModuleDict by class; protocol 4, as the releases."""
    persistent = {cls for cls in vars(module).values() if isinstance(cls, type) and issubclass(cls, nn.Module)
                  and cls.__name__ in classes}
    plain = (bool, int, float, str, type(None))

    def state_of(obj: nn.Module) -> dict:
        state = {k: v for k, v in vars(obj).items()
                 if k.startswith("_") or k == "training" or isinstance(v, plain)
                 or (isinstance(v, (list, tuple)) and all(isinstance(x, plain) for x in v))}
        if obj is net:
            state.update(_init_args=(), _init_kwargs=dict(init_kwargs))
        return state

    with _persistence_modules() as (reconstruct, easy_dict):
        def meta(name: str, state: dict) -> tuple:
            return reconstruct, (dict(type="class", version=EDM_PERSISTENCE_VERSION, class_name=name, state=state,
                                      module_src=f"# {name}: {repo} (not stored)\n"),)

        class Pickler(pickle.Pickler):
            def reducer_override(self, obj):
                if type(obj) in persistent:
                    return meta(type(obj).__name__, state_of(obj))
                if isinstance(obj, _Persistent):
                    return meta(obj.class_name, obj.state)
                return NotImplemented

        with open(path, "wb") as f:
            Pickler(f, protocol=4).dump(snapshot(easy_dict))
    return path


def write_edm_pickle(path: Path, class_name: str = "EDMPrecond", init_kwargs: Mapping[str, Any] | None = None,
                     seed: int = 0) -> Path:
    """An NVlabs/edm training snapshot pickle, as training_loop.py writes it:
    {'ema': net, 'loss_fn': EDMLoss, 'augment_pipe': None, 'dataset_kwargs': {...}}, see `_dump_persistent`."""
    from guidebench.backbones import edm
    from guidebench.backbones.edm_pickle import EDM_CLASSES

    init_kwargs = dict(init_kwargs if init_kwargs is not None else EDM_RELEASED[path.name][1])
    torch.manual_seed(seed)
    net = randomize_zero_parameters(edm.NETWORKS[class_name](**init_kwargs), seed).eval().requires_grad_(False)
    snapshot = {
        "ema": net,
        "loss_fn": _Persistent("EDMLoss", dict(P_mean=-1.2, P_std=1.2, sigma_data=0.5, _init_args=(),
                                               _init_kwargs={})),
        "augment_pipe": None,
        "dataset_kwargs": dict(class_name="training.dataset.ImageFolderDataset", path="imagenet-64x64.zip",
                               use_labels=bool(init_kwargs.get("label_dim")), xflip=False, cache=True,
                               resolution=init_kwargs.get("img_resolution"), max_size=1281167),
    }
    return _dump_persistent(path, lambda easy_dict: snapshot, net, init_kwargs, edm, EDM_CLASSES,
                            "NVlabs/edm training/networks.py")


def edm2_release(name: str) -> dict:
    """The Precond arguments a released EDM2 pickle records, from its name edm2-img{512,64}-SIZE[-uncond]-KIMG-EMA.pkl
    (train_edm2.py presets: channels per size, dropout 0.1 from M up, fp16; ImageNet-512: 4 x 64 x 64 latents)."""
    m = re.fullmatch(r"edm2-img(512|64)-(xs|s|m|l|xl|xxl)(-uncond)?-\d{7}-\d\.\d{3}\.pkl", name)
    if m is None:
        raise LookupError(f"{name} is not an EDM2 release name (edm2-img{{512,64}}-SIZE[-uncond]-KIMG-EMA.pkl)")
    res, size, uncond = m.groups()
    return dict(img_resolution=64, img_channels=4 if res == "512" else 3, label_dim=0 if uncond else 1000,
                model_channels=EDM2_CHANNELS[size], dropout=0.0 if size in ("xs", "s") else 0.1, use_fp16=True)


def write_edm2_pickle(path: Path, init_kwargs: Mapping[str, Any] | None = None, seed: int = 0) -> Path:
    """An NVlabs/edm2 released pickle, as training_loop.py / reconstruct_phema.py write it: an EasyDict
    {'encoder', 'dataset_kwargs', 'loss_fn': EDM2Loss, 'ema': Precond in float16}, the encoder a
    StabilityVAEEncoder (4-channel latents: scale / bias as float32 numpy arrays) or StandardRGBEncoder;
    every persistent object records its constructor arguments; see `_dump_persistent`."""
    from guidebench.backbones import edm2
    from guidebench.backbones.edm_pickle import EDM2_CLASSES

    init_kwargs = dict(init_kwargs if init_kwargs is not None else edm2_release(path.name))
    torch.manual_seed(seed)
    with _recording_init_args([edm2.MPFourier, edm2.MPConv, edm2.Block, edm2.UNet, edm2.Precond]):
        net = edm2.Precond(**init_kwargs)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # the gains start at zero (EDM2's init), which would make F = 0
        for name, p in net.named_parameters():
            if p.ndim == 0:
                p.copy_(0.3 + torch.rand([], generator=g))
    net = net.eval().requires_grad_(False).to(torch.float16)
    if init_kwargs["img_channels"] == 4:
        scale = np.float32(0.5) / np.float32(edm2.VAE_RAW_STD)
        bias = np.float32(0) - np.float32(edm2.VAE_RAW_MEAN) * scale
        encoder = _Persistent("StabilityVAEEncoder", dict(_init_args=(), _init_kwargs={},
                                                          vae_name="stabilityai/sd-vae-ft-mse", scale=scale,
                                                          bias=bias, batch_size=8, _vae=None))
    else:
        encoder = _Persistent("StandardRGBEncoder", dict(_init_args=(), _init_kwargs={}))

    def snapshot(easy_dict: type) -> dict:
        data = easy_dict(encoder=encoder, dataset_kwargs=easy_dict(
            class_name="training.dataset.ImageFolderDataset", path=f"img{init_kwargs['img_resolution']}.zip",
            use_labels=init_kwargs["label_dim"] > 0))
        data.update(loss_fn=_Persistent("EDM2Loss", dict(_init_args=(), _init_kwargs=dict(P_mean=-0.4, P_std=1.0),
                                                         P_mean=-0.4, P_std=1.0, sigma_data=0.5)), ema=net)
        return data

    return _dump_persistent(path, snapshot, net, init_kwargs, edm2, EDM2_CLASSES,
                            "NVlabs/edm2 training/networks_edm2.py")


def reference_npz(path: Path, size: int, n: int = 16, seed: int = 0) -> Path:
    """An ADM reference batch (arr_0: uint8 [n, size, size, 3]) of random images."""
    images = np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    np.savez(path, arr_0=images)
    return path


# ----------------------------------------------------------------------------------------------
# Config nodes -> files


def _dict(node) -> dict:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else dict(node)


# loader (_target_) -> (kind, keys of the node that hold files, arch(node) -> what the file depends on, writer)
Builder = tuple[str, tuple[str, ...], Callable[[dict], dict], Callable[..., Path]]
BUILDERS: dict[str, Builder] = {
    "guidebench.backbones.adm.load_denoiser": (
        "adm-diffusion", ("checkpoint",), lambda n: {"flags": adm_flags(n)},
        lambda path, arch, seed: write_adm_diffusion(path, arch["flags"], seed)),
    "guidebench.classifiers.adm.load_classifier": (
        "adm-classifier", ("checkpoint",), lambda n: {"flags": adm_flags(n)},
        lambda path, arch, seed: write_adm_classifier(path, arch["flags"], seed)),
    "guidebench.backbones.dit.load_denoiser": (
        "dit", ("checkpoint",),
        lambda n: {k: n[k] for k in ("model", "image_size", "num_classes", "learn_sigma", "in_channels",
                                     "class_dropout_prob") if k in n},
        lambda path, arch, seed: write_dit(path, **arch, seed=seed)),
    "guidebench.backbones.vae.load_decoder": (
        "sd-vae", ("path",), lambda n: {}, lambda path, arch, seed: write_sd_vae(path, seed)),
    "guidebench.backbones.edm2.load_decoder": (
        "sd-vae", ("path",), lambda n: {}, lambda path, arch, seed: write_sd_vae(path, seed)),
    "guidebench.backbones.edm.load_denoiser": (
        "edm", ("checkpoint",), lambda n: {},
        lambda path, arch, seed: write_edm_pickle(path, *_edm_release(path), seed=seed)),
    "guidebench.backbones.edm2.load_denoiser": (
        "edm2", ("checkpoint",), lambda n: {}, lambda path, arch, seed: write_edm2_pickle(path, seed=seed)),
    "guidebench.classifiers.torchvision_resnet.load_classifier": (
        "torchvision", ("checkpoint",), lambda n: {"arch": n.get("arch", "resnet101")},
        lambda path, arch, seed: write_torchvision_resnet(path, arch["arch"], seed)),
    "guidebench.classifiers.timm_classifier.load_classifier": (
        "timm", ("checkpoint",), lambda n: {"model_name": n.get("model_name", "resnet50.tv2_in1k")},
        lambda path, arch, seed: write_timm(path, arch["model_name"], seed)),
    "guidebench.guidance.ppap.load_original_experts": (
        "ppap-expert", ("checkpoints",),
        lambda n: {"arch": n["base"]["arch"], "r": n.get("r", 16), "lora_alpha": n.get("lora_alpha", 8.0)},
        lambda path, arch, seed: write_ppap_expert(path, arch["arch"], arch["r"], arch["lora_alpha"], seed)),
    "dinov2-vitl14": (  # metrics.extractors.<label> with name dinov2-vitl14 (no _target_)
        "dinov2", ("checkpoint",), lambda n: {}, lambda path, arch, seed: write_dinov2(path, seed)),
}


def _edm_release(path: Path) -> tuple[str, dict]:
    if path.name not in EDM_RELEASED:
        raise LookupError(f"no recorded architecture for the EDM pickle {path.name}; add it to EDM_RELEASED "
                          f"(known: {sorted(EDM_RELEASED)})")
    return EDM_RELEASED[path.name]


def _checkpoint_keys(node, prefix: str = "") -> list[str]:
    """Dotted keys of the string leaves (list items: key.N) whose unresolved value uses ${paths.checkpoints}."""
    keys = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        key = f"{prefix}{k}"
        if isinstance(v, str) and CHECKPOINTS in v:
            keys.append(key)
        elif isinstance(v, (dict, list)):
            keys.extend(_checkpoint_keys(v, key + "."))
    return keys


class ReleasedCheckpoints:
    """Random-weight files in the released formats under `root`, each written once (keyed by loader,
    architecture and file name), and the config overrides that point a composed config at them."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.written: list[Path] = []

    def file(self, kind: str, arch: Mapping[str, Any], name: str, writer: Callable[..., Path]) -> Path:
        key = hashlib.sha256(json.dumps([kind, arch, name], sort_keys=True, default=str).encode()).hexdigest()[:12]
        path = self.root / f"{kind}-{key}" / name
        if path.exists():
            return path
        tmp = self.root / f".{kind}-{key}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        writer(tmp / name, dict(arch), _seed(kind, arch, name))
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp / name, path)  # complete files only: a killed run leaves a dot folder, never `path`
        shutil.rmtree(tmp, ignore_errors=True)
        self.written.append(path)
        return path

    def plan(self, cfg: DictConfig) -> dict[str, tuple[str, str, dict]]:
        """{node key: (builder name, node key, resolved node)} for every config node holding a checkpoint path.

        Raises LookupError naming any ${paths.checkpoints} path that no builder covers and that does not exist
        (files shipped in the repository, e.g. checkpoints/digits/*, are left as they are)."""
        raw = OmegaConf.to_container(cfg, resolve=False)
        raw.pop("hydra", None)
        nodes: dict[str, tuple[str, str, dict]] = {}
        uncovered = []
        for key in _checkpoint_keys(raw):
            parts = key.split(".")
            for cut in range(len(parts) - 1, -1, -1):  # the nearest enclosing node with a builder
                node_key = ".".join(parts[:cut])
                node = OmegaConf.select(cfg, node_key) if node_key else cfg
                if not isinstance(node, DictConfig):
                    continue
                builder = node.get("_target_") or node.get("name")
                if builder in BUILDERS and parts[cut] in BUILDERS[builder][1]:
                    nodes[node_key] = (builder, node_key, _dict(node))
                    break
            else:
                value = OmegaConf.select(cfg, key)
                if not Path(value).exists():
                    uncovered.append(f"{key} = {value}")
        if uncovered:
            raise LookupError("no random-weight builder in tests/released_formats.py for: " + "; ".join(uncovered))
        return nodes

    def point(self, cfg: DictConfig) -> dict[str, Any]:
        """Write (or reuse) a random file for every checkpoint of `cfg` and set cfg's keys to them; returns
        {key: new value}."""
        changed = {}
        for builder, node_key, node in self.plan(cfg).values():
            kind, file_keys, arch_of, writer = BUILDERS[builder]
            arch = arch_of(node)
            for file_key in file_keys:
                value = node.get(file_key)
                if value is None:
                    continue
                if isinstance(value, list):
                    new = [str(self.file(kind, arch, Path(v).name, writer)) for v in value]
                else:
                    new = str(self.file(kind, arch, Path(value).name, writer))
                key = f"{node_key}.{file_key}"
                OmegaConf.update(cfg, key, new, merge=False)
                changed[key] = new
        return changed
