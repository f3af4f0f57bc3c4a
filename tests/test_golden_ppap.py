"""PPAP against numbers made by riiid/PPAP itself on tiny random models (ppap.pt, README-ppap.md).

Rebuilt from the fixture's state dicts through guidebench's own code: LoRA layers and their placement
(`add_lora_adapters`), the distillation step and loop (`guidebench.training.ppap`), the routed experts
(`PPAPExperts`, with the original's switches boundary='lower', routing='first_in_batch') and the guided DDIM
run (`PPAPGuidance` + `sample_ddim` on the tiny ADM). Fixture keys are PPAP's (`resnet.*`, `deit.classifier.*`);
guidebench's are those of its wrappers (`net.*`, `model.*`). Tolerances: README-ppap.md.
"""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torchvision.models.resnet import Bottleneck, ResNet

from guidebench.backbones.adm import load_denoiser
from guidebench.classifiers.lora import LoRAConv2d, LoRALinear, add_lora_adapters
from guidebench.classifiers.torchvision_resnet import TorchvisionClassifier
from guidebench.denoisers.discrete_vp import betas_for_schedule
from guidebench.guidance.classifier import classifier_log_prob_grad
from guidebench.guidance.ppap import PPAPExperts, PPAPGuidance, expert_bounds, expert_index
from guidebench.samplers import sample_ddim
from guidebench.schedules import sigmas_respaced
from guidebench.training.ppap import distil, distillation_loss, q_sample, teacher_input
from tests.golden import load_golden

pytestmark = pytest.mark.golden

LORA = dict(atol=1e-6, rtol=0)
LOGITS = dict(atol=1e-5, rtol=0)
GRADS = dict(atol=1e-6, rtol=1e-4)
COND = dict(atol=1e-5, rtol=1e-4)


class TinyResNet(ResNet):
    """The fixture's stand-in ResNet-50 (README-ppap.md, tiny_models.resnet): torchvision Bottlenecks put together
    by torchvision's own ResNet._make_layer, with the module names of torchvision's ResNet-50."""

    def __init__(self, stem: int, planes: list[int], layers: list[int], strides: list[int], num_classes: int):
        nn.Module.__init__(self)
        self._norm_layer, self.inplanes, self.dilation, self.groups, self.base_width = nn.BatchNorm2d, stem, 1, 1, 64
        self.conv1 = nn.Conv2d(3, stem, 7, stride=2, padding=3, bias=False)
        self.bn1, self.relu, self.maxpool = nn.BatchNorm2d(stem), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)
        for i, (p, n, s) in enumerate(zip(planes, layers, strides)):
            setattr(self, f"layer{i + 1}", self._make_layer(Bottleneck, p, n, stride=s))
        self.avgpool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(self.inplanes, num_classes)


class DeiTStudent(nn.Module):
    """PPAP's AdapterWrapperDEIT around ModelWithResize: Normalize((1 + x) / 2), bilinear resize to 224, the ViT."""

    def __init__(self, vit: nn.Module, mean, std):
        super().__init__()
        self.model = vit
        self.register_buffer("mean", torch.tensor(mean).reshape(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).reshape(1, -1, 1, 1))

    def forward(self, x: torch.Tensor, normalized: bool = False) -> torch.Tensor:
        x = x if normalized else ((1 + x) / 2 - self.mean) / self.std
        return self.model(F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False))


def ours(key: str) -> str:
    return "net." + key.removeprefix("resnet.") if key.startswith("resnet.") else "model." + key.removeprefix(
        "deit.classifier.")


def theirs(prefix: str):
    return lambda key: prefix + key.split(".", 1)[1]


@pytest.fixture(scope="module")
def g() -> dict:
    return load_golden("ppap.pt")


@pytest.fixture(scope="module")
def abar() -> torch.Tensor:
    return torch.cumprod(1 - betas_for_schedule("linear", 1000), 0)


def resnet_teacher(g) -> TorchvisionClassifier:
    net = TinyResNet(**g["tiny_models"]["resnet"])
    net.load_state_dict(g["kd_resnet"]["teacher_state_dict"])
    return TorchvisionClassifier(net)


def resnet_student(g) -> TorchvisionClassifier:
    """The student at step 0: the teacher with LoRA (gamma, alpha of the config), A as the original drew it."""
    cfg = g["config"]
    student = add_lora_adapters(copy.deepcopy(resnet_teacher(g)), cfg["gamma"], cfg["lora_alpha"])
    state = student.state_dict()
    with torch.no_grad():
        for key, value in g["kd_resnet"]["student_init_lora_A"].items():
            state[ours(key)].copy_(value)
    return student


def test_routing_tables_for_every_stored_expert_count(g):
    """Training ranges [b_k, b_{k+1}) and the original's sampling rule (inclusive ends, first match, batch's t[0])."""
    t = torch.arange(1001)
    for row in g["experts"]["table"]:
        n = row["n_experts"]
        bounds = expert_bounds(n, 1000)
        assert bounds == row["step_range"]
        assert [[lo, hi] for lo, hi in zip(bounds, bounds[1:])] == row["train_ranges"]
        assert torch.equal(expert_index(t, bounds, boundary="lower"), row["sample_index"])
        upper = expert_index(t[:1000], bounds, boundary="upper")  # each step to the expert that trained on it
        assert all(lo <= s < hi for s, k in enumerate(upper.tolist()) for lo, hi in [row["train_ranges"][k]])
        first = expert_index(torch.stack([t[bounds[-2] + 1], t[0]]), bounds, routing="first_in_batch")
        assert first.tolist() == [n - 1, n - 1]


def test_expert_count_must_fit_the_steps():
    with pytest.raises(ValueError, match="n_experts=0 does not fit 1000"):
        expert_bounds(0, 1000)
    with pytest.raises(ValueError, match="n_experts=1001"):
        expert_bounds(1001, 1000)


def test_lora_conv_unmerged_merged_unmerged(g):
    c = g["lora"]["conv"]
    conv = nn.Conv2d(c["in_channels"], c["out_channels"], c["kernel_size"], padding=c["padding"])
    layer = LoRAConv2d(conv, c["r"], c["lora_alpha"])
    bound = 1 / math.sqrt(c["lora_A_init"].shape[1])  # kaiming_uniform(a = sqrt 5): U(-1/sqrt(fan_in), +)
    assert layer.lora_A.shape == c["lora_A"].shape and layer.lora_B.shape == c["lora_B"].shape
    assert layer.scaling == c["scaling"] and float(c["lora_A_init"].abs().max()) <= bound
    assert float(layer.lora_A.detach().abs().max()) <= bound and not layer.lora_B.detach().any()
    with torch.no_grad():
        for name in ("weight", "bias"):
            getattr(conv, name).copy_(c[name])
        layer.lora_A.copy_(c["lora_A"]), layer.lora_B.copy_(c["lora_B"])
        torch.testing.assert_close(layer(c["x"]), c["out_unmerged"], **LORA)
        layer.merge()
        torch.testing.assert_close(conv.weight, c["weight_merged"], **LORA)
        torch.testing.assert_close(layer(c["x"]), c["out_merged"], **LORA)
        layer.unmerge()
        torch.testing.assert_close(conv.weight, c["weight_after_unmerge"], **LORA)


@pytest.mark.parametrize("forward", ["unscaled", "scaled"])
def test_lora_linear_and_the_originals_unscaled_forward(g, forward):
    """'unscaled' (PPAP) reproduces its unmerged forward, which differs from its merged one by the stored amount;
    'scaled' (default) is the merged layer also unmerged."""
    c = g["lora"]["linear"]
    linear = nn.Linear(c["in_features"], c["out_features"])
    layer = LoRALinear(linear, c["r"], c["lora_alpha"], forward)
    assert layer.lora_A.shape == c["lora_A"].shape and layer.lora_B.shape == c["lora_B"].shape
    with torch.no_grad():
        for name in ("weight", "bias"):
            getattr(linear, name).copy_(c[name])
        layer.lora_A.copy_(c["lora_A"]), layer.lora_B.copy_(c["lora_B"])
        unmerged = layer(c["x"])
        layer.merge()
        torch.testing.assert_close(linear.weight, c["weight_merged"], **LORA)
        torch.testing.assert_close(layer(c["x"]), c["out_merged"], **LORA)
        layer.unmerge()
        torch.testing.assert_close(linear.weight, c["weight_after_unmerge"], **LORA)
    if forward == "unscaled":
        torch.testing.assert_close(unmerged, c["out_unmerged"], **LORA)
        assert abs(float((unmerged - c["out_merged"]).abs().max()) - c["merged_vs_unmerged_max_abs"]) < 1e-5
    else:
        torch.testing.assert_close(unmerged, c["out_merged"], **LORA)


def test_resnet_adapter_placement_and_trainable_set(g):
    k = g["kd_resnet"]
    student = resnet_student(g)
    assert [theirs("resnet.")(key) for key in student.state_dict()] == k["student_state_dict_keys"]
    assert [theirs("resnet.")(n) for n, p in student.named_parameters() if p.requires_grad] == k["trainable"]
    assert all(not p.requires_grad for n, p in student.named_parameters() if theirs("resnet.")(n) in
               k["expert_unchanged_keys"])


def test_resnet_distillation_step0_loss_and_gradients(g, abar):
    k, s = g["kd_resnet"], g["kd_resnet"]["steps"][0]
    teacher, student = resnet_teacher(g), resnet_student(g).train()
    x0 = k["data"][s["batch_index"]]
    x_in = teacher_input(x0, k["normalize"])
    torch.testing.assert_close(x_in, s["teacher_input"], atol=1e-6, rtol=0)
    x_t = q_sample(x0, s["t"], s["noise"], abar)
    torch.testing.assert_close(x_t, s["forward_img"], atol=1e-6, rtol=0)
    with torch.no_grad():
        teacher_logits = teacher(x_in)
    torch.testing.assert_close(teacher_logits, s["teacher_logits"], **LOGITS)
    student_logits = student(x_t)
    torch.testing.assert_close(student_logits.detach(), s["student_logits"], **LOGITS)
    kd = distillation_loss(student_logits, teacher_logits, 0.25)
    torch.testing.assert_close(kd.detach(), s["kd_loss"], atol=1e-6, rtol=0)
    torch.testing.assert_close(kd.mean(-1).detach(), s["loss"], atol=1e-6, rtol=0)
    kd.mean(-1).mean().backward()
    grads = {theirs("resnet.")(n): p.grad for n, p in student.named_parameters() if p.requires_grad}
    assert sorted(grads) == sorted(k["grads_step0"])
    for name, expected in k["grads_step0"].items():
        torch.testing.assert_close(grads[name], expected, **GRADS, msg=name)


def replay(steps):
    """draw(x0, lo, hi) returning the fixture's t and noise in order (asserting each t lies in [lo, hi))."""
    it = iter(steps)

    def draw(x0, lo, hi):
        s = next(it)
        assert bool(((s["t"] >= lo) & (s["t"] < hi)).all()) and s["sampler_weights_nonzero"] == [lo, hi - 1]
        return s["t"], s["noise"]
    return draw


def train_resnet_experts(g, abar, grad_noise: float = 0.0, seed: int = 0):
    """distil() replaying the fixture's t and noise; grad_noise adds N(0, grad_noise^2) to every gradient."""
    k, cfg = g["kd_resnet"], g["config"]
    teacher, student = resnet_teacher(g), resnet_student(g)
    if grad_noise:
        gen = torch.Generator().manual_seed(seed)
        for p in student.parameters():
            if p.requires_grad:
                p.register_hook(lambda grad: grad + grad_noise * torch.randn(grad.shape, generator=gen))
    seen = []
    states, _ = distil(teacher, student, itertools.cycle(k["data"]), expert_bounds(cfg["n_experts"]),
                       k["iterations_per_expert"], replay(k["steps"]), abar, lr=cfg["lr"],
                       weight_decay=cfg["weight_decay"], temperature=0.25, normalize=k["normalize"],
                       record=seen.append)
    return seen, states


def test_resnet_distillation_loop_sequential_experts(g, abar):
    """All 5 experts trained in order with one AdamW state. After step 0 the trajectory is chaotic (README-ppap,
    reproducibility 3: AdamW turns ~1e-9 gradient noise of structurally zero gradients into lr-sized steps), so
    later steps are held, normwise, to twice the distance of our own runs under 1e-9 gradient noise."""
    k = g["kd_resnet"]
    seen, states = train_resnet_experts(g, abar)
    perturbed = [train_resnet_experts(g, abar, grad_noise=1e-9, seed=seed) for seed in (0, 1)]
    assert [(r["expert"], r["step"], r["lr"]) for r in seen] == [(s["interval"], s["step"], s["lr"])
                                                                 for s in k["steps"]]

    def within_noise(ours_, theirs_, noisy, what):
        distance = (ours_ - theirs_).norm().item()
        allowed = max(1e-4, 2 * max((ours_ - x).norm().item() for x in noisy))
        assert distance <= allowed, f"{what}: |ours - reference| = {distance:.3g} > {allowed:.3g} (2x noise spread)"

    for i, (r, s) in enumerate(zip(seen, k["steps"])):
        torch.testing.assert_close(r["teacher_logits"], s["teacher_logits"], **LOGITS)
        if i == 0:
            torch.testing.assert_close(r["student_logits"], s["student_logits"], **LOGITS)
        else:
            within_noise(r["student_logits"], s["student_logits"], [p[0][i]["student_logits"] for p in perturbed],
                         f"student logits, step {i}")
    initial = resnet_student(g).state_dict()
    for e, (state, changed) in enumerate(zip(states, k["expert_changed_entries"])):
        assert all(not torch.equal(state[ours(key)], initial[ours(key)]) for key in changed)

        def flat(sd):
            return torch.cat([sd[ours(key)].double().flatten() for key in changed])
        within_noise(flat(state), torch.cat([v.double().flatten() for v in changed.values()]),
                     [flat(p[1][e]) for p in perturbed], f"expert {e + 1} weights")
        for key in k["expert_unchanged_keys"]:
            torch.testing.assert_close(state[ours(key)], initial[ours(key)], atol=0, rtol=0)


def test_gradient_noise_alone_moves_the_trajectory(g, abar):
    """The premise of the loose check above: 1e-9 gradient noise, nothing else, changes the student's logits
    by far more than float32 rounding by the last step (> 1e-4), while step 0 is untouched."""
    seen, _ = train_resnet_experts(g, abar)
    noisy, _ = train_resnet_experts(g, abar, grad_noise=1e-9)
    assert torch.equal(seen[0]["student_logits"], noisy[0]["student_logits"])
    assert (seen[-1]["student_logits"] - noisy[-1]["student_logits"]).abs().max() > 1e-4


def deit_pair(g):
    import timm

    d, tiny = g["kd_deit"], g["tiny_models"]["deit"]
    vit = timm.create_model(tiny["timm_name"], pretrained=False, embed_dim=tiny["embed_dim"], depth=tiny["depth"],
                            num_heads=tiny["num_heads"], mlp_ratio=tiny["mlp_ratio"], num_classes=tiny["num_classes"])
    vit.load_state_dict({k.removeprefix("classifier."): v for k, v in d["teacher_state_dict"].items()})
    teacher = DeiTStudent(vit, d["normalize"]["mean"], d["normalize"]["std"]).eval()
    student = add_lora_adapters(copy.deepcopy(teacher), g["config"]["gamma"], g["config"]["lora_alpha"], "unscaled")
    state = student.state_dict()
    with torch.no_grad():
        for key, value in d["student_init_lora_A"].items():
            state[ours(key)].copy_(value)
    return teacher, student


def test_deit_adapters_and_two_distillation_steps(g, abar):
    """DeiT: LoRALinear on qkv/proj, all biases trainable; step 0 tight, step 1 (after one AdamW step) loose."""
    d = g["kd_deit"]
    teacher, student = deit_pair(g)
    keys = [theirs("deit.classifier.")(key) for key in student.state_dict() if key.startswith("model.")]
    assert keys == d["student_state_dict_keys"]
    trainable = [theirs("deit.classifier.")(n) for n, p in student.named_parameters() if p.requires_grad]
    assert trainable == d["trainable"]
    grads, after_step0 = {}, {}

    def record(r):
        if r["step"] == 0:
            grads.update({theirs("deit.classifier.")(n): p.grad.clone() for n, p in student.named_parameters()
                          if p.requires_grad})
        else:
            after_step0.update({n: p.detach().clone() for n, p in student.named_parameters()})
        s = d["steps"][r["step"]]
        torch.testing.assert_close(r["teacher_logits"], s["teacher_logits"], **LOGITS)
        torch.testing.assert_close(r["student_logits"], s["student_logits"], **(LOGITS if r["step"] == 0 else
                                                                               dict(atol=1e-4, rtol=0)))
        torch.testing.assert_close(r["kd_loss"], s["kd_loss"], atol=1e-5, rtol=0)  # timm's fused attention

    class Teacher(nn.Module):  # PPAP's DeiT teacher is ModelWithResize on the already normalised x0
        def forward(self, x):
            return teacher(x, normalized=True)

    distil(Teacher(), student, itertools.cycle(d["data"]), expert_bounds(1), d["args"]["iterations"],
           replay(d["steps"]), abar, lr=d["args"]["lr"], weight_decay=d["args"]["weight_decay"], temperature=0.25,
           normalize=d["normalize"], record=record)
    for name, expected in d["grads_step0"].items():
        torch.testing.assert_close(grads[name], expected, **GRADS, msg=name)
    # after one AdamW step; the key third of a qkv bias has a structurally zero gradient (softmax ignores a
    # constant per query), whose float noise AdamW turns into a step of up to lr: there only |diff| <= lr
    dim = g["tiny_models"]["deit"]["embed_dim"]
    for name, expected in d["student_trainable_step1"].items():
        actual = after_step0[ours(name)]
        if name.endswith("attn.qkv.linear.bias"):
            key = slice(dim, 2 * dim)
            assert float((actual[key] - expected[key]).abs().max()) <= d["args"]["lr"]
            rest = torch.ones(3 * dim, dtype=torch.bool)
            rest[key] = False
            actual, expected = actual[rest], expected[rest]
        torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0, msg=name)


@pytest.fixture(scope="module")
def experts(g):
    """The 5 final experts of the ResNet run, routed as the original routes them."""
    k = g["kd_resnet"]
    nets = []
    for changed in k["expert_changed_entries"]:
        expert = resnet_student(g)
        expert.load_state_dict({**expert.state_dict(), **{ours(key): v for key, v in changed.items()}})
        nets.append(expert)
    return PPAPExperts(nets, betas_for_schedule("linear", 1000), image_size=g["config"]["img"],
                       num_classes=g["tiny_models"]["resnet"]["num_classes"], boundary="lower",
                       routing="first_in_batch").eval()


@pytest.fixture(scope="module")
def adm(g, tmp_path_factory):
    path = tmp_path_factory.mktemp("ppap") / "adm.pt"
    torch.save(g["guidance"]["adm_state_dict"], path)
    flags = {k: v for k, v in g["guidance"]["adm_flags"].items() if k != "timestep_respacing"}
    return load_denoiser(path, **flags)


def cond_grad(experts, x_t, t, y, scale, adm):
    """classifier_sample.py's cond_fn: s grad_{x_t} log p(y | x_t), from guidebench's sigma-space gradient."""
    sigma = adm.sigmas[torch.full((len(x_t),), t)]
    factor = (1 + sigma**2).sqrt().float().reshape(-1, 1, 1, 1)
    return scale * classifier_log_prob_grad(experts, x_t * factor, sigma, y) * factor


def test_boundary_gradients_of_the_sampling_script(g, experts, adm):
    gd = g["guidance"]
    assert experts.bounds == gd["wrapper_step_range"]
    for check in gd["cond_checks"]:
        sigma = adm.sigmas[torch.full((2,), check["t"])]
        assert int(experts.route(sigma)[0]) == check["expert"]
        grad = cond_grad(experts, gd["cond_x"], check["t"], gd["cond_y"], gd["args"]["classifier_scale"], adm)
        torch.testing.assert_close(grad, check["grad"], **COND)
    single = gd["cond_single"]  # one classifier path: the original ignores t
    one = PPAPExperts([experts.experts[single["checkpoint"]]], betas_for_schedule("linear", 1000), image_size=32,
                      num_classes=10)
    grad = cond_grad(one, gd["cond_x"], single["t"], gd["cond_y"], gd["args"]["classifier_scale"], adm)
    torch.testing.assert_close(grad, single["grad"], **COND)
    default = PPAPExperts(experts.experts, betas_for_schedule("linear", 1000), image_size=32, num_classes=10)
    boundary = [c for c in gd["cond_checks"] if c["t"] in experts.bounds[1:-1]]
    assert boundary and all(int(default.route(adm.sigmas[[c["t"]]])[0]) == c["expert"] + 1 for c in boundary)


def test_guided_ddim_run_expert_per_step_and_final_sample(g, experts, adm):
    gd = g["guidance"]
    sigmas = sigmas_respaced(adm, gd["adm_flags"]["timestep_respacing"])
    assert torch.equal(adm.sigma_to_t(sigmas[:-1]).flip(0), torch.tensor(gd["schedule"]["timestep_map"]))
    called = []
    hooks = [e.register_forward_hook(lambda m, i, o, k=k: called.append(k)) for k, e in enumerate(experts.experts)]
    try:
        guidance = PPAPGuidance(experts, gd["args"]["classifier_scale"])
        x = gd["x_T"].double() * (1 + sigmas[0] ** 2).sqrt()
        sample = sample_ddim(adm, x, sigmas, gd["y"], guidance=guidance)
    finally:
        for h in hooks:
            h.remove()
    assert called == [s["expert"] for s in gd["steps"]]
    torch.testing.assert_close(sample.float(), gd["sample"], atol=1e-4, rtol=0)
    uint8 = ((sample.float() + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    assert (uint8.int() - gd["sample_uint8"].int()).abs().max() <= 1
