"""End-to-end calibration of the converted norms (normswap.e2e) and the elementwise variants
(normswap.modules.ElementwiseNorm, normswap.calibration.fit_elementwise / calibrate_variant)."""
from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from normswap.calibration import calibrate_variant, elementwise_sites, fit_elementwise
from normswap.conversion import convert_model
from normswap.e2e import fit_end_to_end, norm_parameters
from normswap.modules import VARIANTS, DyT, ElementwiseNorm, FixedNorm, new_norm, new_variant
from normswap.samples import model_inputs
from tiny_models import tiny_model

torch.set_num_threads(1)


def peaked_gpt2() -> nn.Module:
    """A tiny GPT-2 whose untied head is scaled up, so its next-token distributions are far from
    uniform and a DyT conversion has a KL worth fitting."""
    model = tiny_model("gpt2", tie_word_embeddings=False)
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    return model


def converted(original: nn.Module, to: str = "dyt", **kwargs) -> nn.Module:
    model, _ = convert_model(copy.deepcopy(original), to, fold=False, calib_tokens=512, **kwargs)
    return model


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


NORM_SUFFIXES = (".alpha", ".weight", ".bias", ".scale", ".shift")


def norm_keys(model: nn.Module) -> set[str]:
    return {f"{path}.{name}" for path, m in model.named_modules() if isinstance(m, (DyT, FixedNorm, ElementwiseNorm))
            for name, _ in m.named_parameters(recurse=False)}


@pytest.mark.parametrize("name,to", [("gpt2", "dyt"), ("bert", "dyt"), ("whisper", "dyt"), ("gpt2", "none")])
def test_only_norm_parameters_move_and_everything_is_restored(name, to):
    original = peaked_gpt2() if name == "gpt2" else tiny_model(name)
    model = converted(original, to, tied_head="untie") if to == "none" else converted(original, to)
    batches = model_inputs(model, n_tokens=256)
    model.train()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before, orig_before = snapshot(model), snapshot(original)
    result = fit_end_to_end(model, original, batches, steps=8, lr=1e-2, progress=False, revert_if_worse=False)
    after = snapshot(model)
    keys = norm_keys(model)
    assert keys and result["parameters"] == sum(after[k].numel() for k in keys)
    for k, v in before.items():
        if k not in keys:
            assert torch.equal(v, after[k]), k  # bit-identical
    assert any(not torch.equal(before[k], after[k]) for k in keys)
    if to == "none":
        assert any(k.endswith(".scale") and not torch.equal(before[k], after[k]) for k in keys)
    assert all(torch.equal(v, snapshot(original)[k]) for k, v in orig_before.items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert model.training and not original.training
    assert result["objective"] == "kl"  # every one has logits (tiny BERT its MLM head, Whisper its decoder's)
    assert result["steps"] == 8 and result["stopped"] == "steps"


def test_kl_decreases():
    original = peaked_gpt2()
    model = converted(original, alpha_init=0.5)  # the DyT paper's constant alpha: far from the original
    batches = model_inputs(model, n_tokens=512, block=64)
    result = fit_end_to_end(model, original, batches, steps=60, lr=2e-2, progress=False)
    assert result["objective"] == "kl"
    assert result["loss_before"] > 1e-3
    assert result["loss_after"] < 0.5 * result["loss_before"]
    assert not result["reverted"]


def test_encoder_hidden_objective_decreases():
    original = tiny_model("bert").bert  # a bare encoder: last_hidden_state, no logits
    model = converted(original, alpha_init=0.5)
    batches = model_inputs(model, n_tokens=512, block=32)
    result = fit_end_to_end(model, original, batches, steps=40, lr=2e-2, progress=False)
    assert result["objective"] == "hidden+pooled"
    assert result["loss_after"] < 0.8 * result["loss_before"]
    for objective in ("hidden", "pooled"):
        r = fit_end_to_end(model, original, batches, steps=3, objective=objective, progress=False, revert_if_worse=False)
        assert r["objective"] == objective and math.isfinite(r["loss_after"])


def test_kl_plus_ce_and_time_budget_and_revert():
    original = peaked_gpt2()
    model = converted(original)
    batches = model_inputs(model, n_tokens=256)
    r = fit_end_to_end(model, original, batches, steps=5, objective="kl+ce", progress=False)
    assert r["objective"] == "kl+ce" and math.isfinite(r["loss_after"])
    r = fit_end_to_end(model, original, batches, steps=50, time_budget_s=0.0, progress=False)
    assert r["steps"] == 0 and r["stopped"] == "time" and r["loss_after"] == r["loss_before"]
    # a step so large that the fit gets worse is undone
    before = snapshot(model)
    r = fit_end_to_end(model, original, batches, steps=5, lr=20.0, warmup=0, progress=False)
    assert r["reverted"] and r["loss_after"] == r["loss_before"] and r["loss_after_fit"] > r["loss_before"]
    assert all(torch.equal(v, snapshot(model)[k]) for k, v in before.items())


def test_nothing_to_fit_is_an_error():
    original = tiny_model("gpt2")
    with pytest.raises(ValueError, match="no converted norm"):
        fit_end_to_end(copy.deepcopy(original), original, model_inputs(original, n_tokens=64), steps=1, progress=False)
    with pytest.raises(ValueError, match="objective"):
        fit_end_to_end(converted(original), original, model_inputs(original, n_tokens=64), objective="mse", progress=False)


# ------------------------------------------------------------------ exact recovery on synthetic models


class Toy(nn.Module):
    """Linear -> norm -> Linear, returning logits or a last hidden state like a transformers model."""

    def __init__(self, norm: nn.Module, head: str = "logits"):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.norm, self.out, self.head = nn.Linear(8, 16), norm, nn.Linear(16, 24), head  # injective head
        with torch.no_grad():
            self.out.weight.mul_(6.0)

    def forward(self, x):
        h = self.out(self.norm(self.inp(x)))
        return SimpleNamespace(logits=h) if self.head == "logits" else SimpleNamespace(last_hidden_state=h)


def toy_pair(norm: nn.Module, head: str) -> tuple[nn.Module, nn.Module]:
    teacher = Toy(norm, head).eval()
    student = copy.deepcopy(teacher)
    with torch.no_grad():  # a perturbed start: alpha off by 40%, affine noisy
        student.norm.alpha.mul_(1.4)
        student.norm.weight.add_(0.2 * torch.randn(16))
        student.norm.bias.add_(0.2 * torch.randn(16))
    return teacher, student


@pytest.mark.parametrize("variant,head", [("dyt", "logits"), ("dyt-channel", "logits"), ("dyisru", "logits"), ("derf-channel", "logits"),
                                          ("dyt", "hidden"), ("dyisru-channel", "hidden"), ("derf", "hidden")])
def test_e2e_recovers_a_representable_target(variant, head):
    torch.manual_seed(1)
    norm = DyT(16, alpha=0.7) if variant == "dyt" else new_variant(variant, 16)
    with torch.no_grad():
        if variant != "dyt":
            norm.alpha.copy_(0.7 * torch.exp(0.3 * torch.randn_like(norm.alpha)))
        norm.weight.copy_(1 + 0.5 * torch.randn(16))
        norm.bias.copy_(0.3 * torch.randn(16))
    teacher, student = toy_pair(norm, head)
    batches = [{"x": torch.randn(4, 32, 8, generator=torch.Generator().manual_seed(i)) * 2} for i in range(4)]
    r = fit_end_to_end(student, teacher, batches, steps=800, lr=5e-2, progress=False,
                       objective="kl" if head == "logits" else "hidden")
    assert r["loss_after"] < 1e-3 * r["loss_before"], r
    # the norm's own function is recovered (the head is injective, so its output is identifiable)
    x = torch.cat([student.inp(b["x"]) for b in batches]).detach()
    with torch.no_grad():
        want, got = teacher.norm(x), student.norm(x)
    assert float((got - want).pow(2).mean() / want.pow(2).mean()) < 1e-3
    if student.norm.alpha.dim() == 0:
        assert torch.allclose(student.norm.alpha, teacher.norm.alpha, rtol=0.05)


# -------------------------------------------------------------------------------- the variants' maths


def reference(fn: str, x: torch.Tensor, alpha: torch.Tensor, shift: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The variants' formulas written independently, elementwise in float64 Python maths."""
    xs, a, s, ws, bs = (t.double() for t in (x, alpha.expand(x.shape[-1]), shift.expand(x.shape[-1]), w, b))
    out = torch.empty_like(xs)
    for idx in range(xs.numel()):
        j = idx % xs.shape[-1]
        v = float(xs.view(-1)[idx])
        if fn == "tanh":
            u = math.tanh(float(a[j]) * v)
        elif fn == "isru":  # DyISRU: x / sqrt(beta + x^2) with beta = 1 / alpha^2
            u = v / math.sqrt(1 / float(a[j]) ** 2 + v * v)
        else:  # Derf
            u = math.erf(float(a[j]) * v + float(s[j]))
        out.view(-1)[idx] = float(ws[j]) * u + float(bs[j])
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_forward_matches_its_formula_and_rebuilds_from_its_spec(variant):
    fn, per_channel = VARIANTS[variant]
    torch.manual_seed(2)
    m = new_variant(variant, 6)
    assert m.variant == variant and m.alpha.shape == ((6,) if per_channel else ())
    with torch.no_grad():
        m.alpha.copy_(torch.rand_like(m.alpha) + 0.2)
        m.weight.copy_(torch.randn(6))
        m.bias.copy_(torch.randn(6))
        if m.shift is not None:
            m.shift.copy_(0.3 * torch.randn_like(m.shift))
    x = torch.randn(3, 5, 6) * 3
    shift = m.shift.detach() if m.shift is not None else torch.zeros(())
    want = reference(fn, x, m.alpha.detach(), shift, m.weight.detach(), m.bias.detach())
    with torch.no_grad():
        got = m.double()(x.double())
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    # the same module from its spec (the keys a conversion record gives), loaded strictly
    rebuilt = new_norm({"type": variant, "dim": 6, "weight": True, "bias": True, "recenter": False}).double()
    rebuilt.load_state_dict(m.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(rebuilt(x.double()), got)
    # recentring and a missing affine
    r = new_norm({"type": variant, "dim": 6, "weight": False, "bias": False, "recenter": True})
    assert r.weight is None and r.bias is None
    with torch.no_grad():
        assert torch.allclose(r(x).mean(-1), torch.zeros(3, 5), atol=1e-6)


def test_unknown_variant_is_an_error():
    with pytest.raises(ValueError, match="unknown elementwise variant"):
        new_variant("dyt-token", 4)
    with pytest.raises(ValueError, match="unknown elementwise function"):
        ElementwiseNorm(4, fn="sigmoid")


@pytest.mark.parametrize("fn", ["tanh", "isru", "erf"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_least_squares_fit_is_exact_where_the_variant_can_represent_the_target(fn, per_channel):
    from normswap.calibration import SQUASH

    torch.manual_seed(3)
    d = 12
    spread = torch.logspace(-1, 1, d)  # channels of very different scales
    x = torch.randn(3000, d) * spread
    alpha = (0.4 / spread) if per_channel else torch.tensor(0.3)
    g, b = torch.randn(d), torch.randn(d)
    y = g * SQUASH[fn](alpha * x) + b
    fit = fit_elementwise(x, y, fn=fn, per_channel=per_channel)
    assert fit.rel_error < 1e-3
    assert torch.allclose(fit.alpha.float(), alpha.float(), rtol=2e-2)
    assert torch.allclose(fit.weight, g, rtol=2e-2, atol=2e-2) and torch.allclose(fit.bias, b, atol=2e-2)


def test_per_channel_fit_beats_scalar_on_channels_of_different_scales():
    torch.manual_seed(4)
    x = torch.randn(3000, 8) * torch.logspace(-1, 1, 8)
    y = torch.nn.functional.layer_norm(x, (8,))
    scalar = fit_elementwise(x, y, fn="tanh")
    channel = fit_elementwise(x, y, fn="tanh", per_channel=True)
    assert channel.rel_error <= scalar.rel_error + 1e-9


@pytest.mark.parametrize("variant", ["dyt", "dyt-channel", "derf"])
def test_calibrate_variant_swaps_every_site(variant):
    original = tiny_model("gpt2")
    model = converted(original)
    paths = elementwise_sites(model)
    report = calibrate_variant(model, original, model_inputs(model, n_tokens=256), variant)
    assert set(report) == set(paths) and all(math.isfinite(v["rel_error"]) for v in report.values())
    for p in paths:
        m = model.get_submodule(p)
        assert isinstance(m, DyT) if variant == "dyt" else (isinstance(m, ElementwiseNorm) and m.variant == variant)
    # and they are what end-to-end calibration then fits
    assert {n.rsplit(".", 1)[0] for n, *_ in norm_parameters(model)} == set(paths)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("with_ce", [False, True])
def test_fused_kl_matches_autograd(temperature, with_ce):
    """The chunked KL (+ next-token excess) and its hand-written gradient against autograd."""
    from normswap.e2e import _FusedKL

    torch.manual_seed(5)
    n, v = 600, 40  # more rows than one chunk
    z = torch.randn(n, v, dtype=torch.float64, requires_grad=True)
    teacher = 2 * torch.randn(n, v, dtype=torch.float64)
    lp = torch.log_softmax(teacher / temperature, -1)
    m = (torch.rand(n) > 0.2).double()
    w = m / m.sum()
    y = torch.randint(0, v, (n,))
    y[::7] = -100
    keep = (y >= 0).double() * m
    c = keep / keep.sum()
    lpy = torch.log_softmax(teacher, -1).gather(-1, y.clamp_min(0)[:, None])[:, 0]
    got = _FusedKL.apply(z, lp, w, temperature, *((y, c, lpy) if with_ce else (None, None, None)))
    (g_got,) = torch.autograd.grad(got, z)
    want = (w * (lp.exp() * (lp - torch.log_softmax(z / temperature, -1))).sum(-1)).sum() * temperature ** 2
    if with_ce:
        want = want + (c * (lpy - torch.log_softmax(z, -1).gather(-1, y.clamp_min(0)[:, None])[:, 0])).sum()
    (g_want,) = torch.autograd.grad(want, z)
    assert abs(float(got.detach()) - float(want.detach())) < 1e-5 * max(1.0, abs(float(want.detach())))
    assert torch.allclose(g_got, g_want, atol=1e-8)
