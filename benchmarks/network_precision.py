"""Denoiser throughput under the GPU options `sampling.dtype`, `sampling.tf32` and `sampling.compile`, as ratios
to full float32 measured in one interleaved run.

    python benchmarks/network_precision.py --device cuda --backbone dit_xl_2_256 --batch 64 [--repeats 5]
    python benchmarks/network_precision.py --device cuda --backbone adm_256 --batch 32
    python benchmarks/network_precision.py                       # digits on CPU (bf16/fp16 autocast there too)

The released architecture with random weights (a state dict written to a temporary file and read by the backbone
config's own loader, zero-initialised layers drawn too; DiT without its VAE decoder, which runs once per sample), one denoiser call
D(x; sigma, y) on `--batch` rows at a mid-schedule sigma, per variant: fp32, tf32, bf16, fp16 (torch.autocast of
the network, guidebench.precision) and compile (+ bf16). Prints images/s per call and each variant's speed-up over
fp32, and the largest |D_variant - D_fp32| (the price in accuracy).
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from guidebench.backbones.adm import create_unet
from guidebench.backbones.dit import DiT, architecture
from guidebench.config import CONF_DIR
from guidebench.precision import configure_networks, set_tf32
from guidebench.sampling import build_backbone
from timing import interleaved

VARIANTS = {"fp32": ("fp32", False, False), "tf32": ("fp32", True, False), "bf16": ("bf16", False, False),
            "fp16": ("fp16", False, False), "compile": ("fp32", False, True), "compile+bf16": ("bf16", False, True)}


def randomised(net: torch.nn.Module) -> dict:
    """The state dict with the zero-initialised layers (ADM's and DiT's output and modulation layers) drawn too,
    so the network's output depends on its input and the precision error shows."""
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    return net.state_dict()


def backbone_config(name: str, folder: Path):
    """The backbone config `name`, its checkpoint replaced by random weights of the released architecture."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("sample", overrides=[f"backbone={name}"]).backbone
    den = cfg.denoiser
    if name.startswith("adm"):
        flags = {k: v for k, v in OmegaConf.to_container(den).items()
                 if k not in ("_target_", "checkpoint", "dtype", "clip_x0", "sha256")}
        torch.save(randomised(create_unet(flags)), folder / "adm.pt")
        den.checkpoint, den.dtype = str(folder / "adm.pt"), "float32"
    elif name.startswith("dit"):
        torch.save(randomised(DiT(**architecture(den.model, den.image_size))), folder / "dit.pt")
        den.checkpoint, cfg.decoder = str(folder / "dit.pt"), None
    return cfg


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backbone", default="digits")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    dev = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="guidebench-precision-") as tmp:
        base = build_backbone(backbone_config(args.backbone, Path(tmp)), dev).denoiser
    g = torch.Generator(dev).manual_seed(0)
    x = torch.randn([args.batch, base.img_channels, base.img_resolution, base.img_resolution], generator=g, device=dev)
    sigma = torch.full([args.batch], 1.0, device=dev)
    labels = torch.randint(max(base.num_classes, 1), [args.batch], generator=g, device=dev) if base.num_classes else None
    calls, outputs = {}, {}
    for name in args.variants.split(","):
        dtype, tf32, compiled = VARIANTS[name]
        den = copy.deepcopy(base)
        configure_networks([den], dtype, compiled)

        def call(den=den, tf32=tf32, name=name):
            set_tf32(tf32)
            with torch.no_grad():
                outputs[name] = den(x, sigma, labels).x0
        calls[name] = call
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    t = interleaved(calls, repeats=args.repeats, sync=sync)
    set_tf32(False)
    device = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"{args.backbone}, batch {args.batch}, {device} (min of {args.repeats} interleaved rounds)")
    for name, seconds in t.items():
        err = (outputs[name] - outputs["fp32"]).abs().max().item() if "fp32" in outputs else float("nan")
        print(f"  {name:13s} {args.batch / seconds:9.1f} images/s per call  speed-up {t.get('fp32', seconds) / seconds:5.2f}x"
              f"  max |D - D_fp32| {err:.2e}")


if __name__ == "__main__":
    main()
