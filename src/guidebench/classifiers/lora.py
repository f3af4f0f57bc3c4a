"""LoRA adapters (Hu et al. 2022, "LoRA", eq. 3: h = W0 x + (alpha / r) B A x) on off-the-shelf classifiers,
placed, initialised and frozen as PPAP does it (Go et al., CVPR 2023; riiid/PPAP peft/lora.py, resnet_adapter.py,
deit_adapter.py).

A is kaiming_uniform(a = sqrt 5) from the global torch RNG, B is zero, so an adapted classifier starts as the
classifier itself. A layer is either unmerged (the forward adds the low-rank term; what PPAP trains and guides
with) or merged (`merge()` adds it into the frozen weight); `unmerge()` takes it out again.
"""

from __future__ import annotations

import math

import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from guidebench.classifiers.digits import CleanDigitsClassifier

LINEAR_FORWARDS = ("scaled", "unscaled")


class LoRAConv2d(nn.Module):
    """A k x k convolution with W = W0 + (alpha / r) reshape(B A): A [r k, C_in k], B [C_out k, r k].

    The product B A [C_out k, C_in k] is read row-major as [C_out, C_in, k, k] (loralib's ConvLoRA, PPAP's
    LoraConv2d). The wrapped conv stays a child (`conv`), so state-dict keys are `<name>.conv.weight`,
    `<name>.lora_A`, `<name>.lora_B`, as in PPAP's checkpoints.
    """

    def __init__(self, conv: nn.Conv2d, r: int, lora_alpha: float):
        super().__init__()
        k = conv.kernel_size[0]
        if conv.groups != 1 or conv.kernel_size[0] != conv.kernel_size[1]:
            raise ValueError(f"LoRA needs an ungrouped square-kernel conv, got {conv}")
        self.conv, self.r, self.lora_alpha, self.scaling = conv, r, lora_alpha, lora_alpha / r
        self.lora_A = nn.Parameter(conv.weight.new_zeros(r * k, conv.in_channels * k))
        self.lora_B = nn.Parameter(conv.weight.new_zeros(conv.out_channels * k, r * k))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.merged = False

    def delta(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A).view(self.conv.weight.shape) * self.scaling

    def merge(self) -> None:
        if not self.merged:
            self.conv.weight.data += self.delta().detach()
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            self.conv.weight.data -= self.delta().detach()
            self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        weight = c.weight if self.merged else c.weight + self.delta()
        return F.conv2d(x, weight, c.bias, c.stride, c.padding, c.dilation, c.groups)


class LoRALinear(nn.Module):
    """A linear layer with W = W0 + (alpha / r) B A: A [r, in], B [out, r].

    forward: 'scaled' (default) applies alpha / r in the unmerged forward too, so merged and unmerged layers
    agree; 'unscaled' is PPAP's LoRALinear, whose unmerged forward adds x A^T B^T without alpha / r while its
    merge adds (alpha / r) B A -- PPAP trains and guides DeiT unmerged, i.e. with W0 + B A.
    """

    def __init__(self, linear: nn.Linear, r: int, lora_alpha: float, forward: str = "scaled"):
        super().__init__()
        if forward not in LINEAR_FORWARDS:
            raise ValueError(f"LoRALinear forward must be one of {LINEAR_FORWARDS}, got {forward!r}")
        self.linear, self.r, self.lora_alpha, self.scaling = linear, r, lora_alpha, lora_alpha / r
        self.unmerged_scaling = self.scaling if forward == "scaled" else 1.0
        self.lora_A = nn.Parameter(linear.weight.new_zeros(r, linear.in_features))
        self.lora_B = nn.Parameter(linear.weight.new_zeros(linear.out_features, r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.merged = False

    def merge(self) -> None:
        if not self.merged:
            self.linear.weight.data += (self.lora_B @ self.lora_A).detach() * self.scaling
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            self.linear.weight.data -= (self.lora_B @ self.lora_A).detach() * self.scaling
            self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.linear.weight, self.linear.bias)
        if self.merged:
            return out
        return out + (x @ self.lora_A.T @ self.lora_B.T) * self.unmerged_scaling


def network_of(classifier: nn.Module) -> nn.Module:
    """The network inside guidebench's classifier wrappers (TorchvisionClassifier.net, TimmClassifier.model)."""
    for key in ("net", "model"):
        inner = getattr(classifier, key, None)
        if isinstance(inner, nn.Module):
            return inner
    return classifier


def add_lora_adapters(classifier: nn.Module, r: int = 16, lora_alpha: float = 8.0,
                      linear_forward: str = "scaled") -> nn.Module:
    """Put LoRA layers into `classifier` (in place) and set its trainable set as PPAP's adapter wrappers do.

    torchvision ResNet (AdapterWrapperResNet): LoRAConv2d on the stem conv1 and on conv1, conv2 of every
        block (conv3, downsample and fc get none); trainable: lora_*, every bias except fc's (BatchNorm
        biases, downsample's included), every parameter of a module named bn* (not downsample.1.weight).
    timm ViT / DeiT (AdapterWrapperDEIT): LoRALinear on attn.qkv and attn.proj of every block (MLP untouched);
        trainable: lora_* and every bias (head, norms, patch embedding and MLP included).
    guidebench's CleanDigitsClassifier (the ResNet rule on a plain CNN): LoRAConv2d on every conv; trainable:
        lora_* and the BatchNorm weights and biases; the head is frozen.
    r: PPAP's gamma (16), lora_alpha: 8; linear_forward: `LoRALinear`'s forward ('unscaled' = PPAP's).
    Returns `classifier`; every other parameter is frozen.
    """
    net = network_of(classifier)
    if isinstance(net, torchvision.models.ResNet):
        net.conv1 = LoRAConv2d(net.conv1, r, lora_alpha)
        for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
            for block in layer:
                block.conv1 = LoRAConv2d(block.conv1, r, lora_alpha)
                block.conv2 = LoRAConv2d(block.conv2, r, lora_alpha)

        def trainable(name: str, module: nn.Module) -> bool:
            return "lora_" in name or ("bias" in name and "fc" not in name) or ("bias" not in name and "bn" in name)
    elif hasattr(net, "blocks") and all(hasattr(b, "attn") for b in net.blocks):
        for block in net.blocks:
            block.attn.qkv = LoRALinear(block.attn.qkv, r, lora_alpha, linear_forward)
            block.attn.proj = LoRALinear(block.attn.proj, r, lora_alpha, linear_forward)

        def trainable(name: str, module: nn.Module) -> bool:
            return "lora_" in name or "bias" in name
    elif isinstance(net, CleanDigitsClassifier):
        for i, module in enumerate(net.features):
            if isinstance(module, nn.Conv2d):
                net.features[i] = LoRAConv2d(module, r, lora_alpha)

        def trainable(name: str, module: nn.Module) -> bool:
            return "lora_" in name or isinstance(module, nn.BatchNorm2d)
    else:
        raise ValueError(f"no LoRA placement for {type(net).__name__}: PPAP adapts torchvision ResNets, timm "
                         "DeiT/ViT and guidebench's CleanDigitsClassifier")
    classifier.requires_grad_(False)
    for module_name, module in net.named_modules():
        for name, p in module.named_parameters(prefix=module_name, recurse=False):
            p.requires_grad_(trainable(name, module))
    return classifier


def lora_layers(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, (LoRAConv2d, LoRALinear))]


def merge_lora(module: nn.Module) -> nn.Module:
    """Merge every LoRA layer of `module` into its frozen weight (in place)."""
    for layer in lora_layers(module):
        layer.merge()
    return module
