"""The norms' forward kernels (normswap.kernels): each inference form against a float64 reference,
the dispatch between them, and the fallback when compilation fails."""
from __future__ import annotations

import warnings

import pytest
import torch

from normswap import kernels
from normswap.modules import DyT, RMSNorm


@pytest.fixture(autouse=True)
def _fresh_kernel_state(monkeypatch):
    """Every test starts from the default choice and an unbuilt compiled kernel, and leaves it so."""
    monkeypatch.setitem(kernels._state, "kernel", "auto")
    monkeypatch.setitem(kernels._state, "compiled", None)
    monkeypatch.setitem(kernels._state, "failed", False)


def _params(d: int, weight: bool, bias: bool, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(d, generator=g) * 0.8 + 0.5).to(dtype) if weight else None
    b = (torch.randn(d, generator=g) * 0.5).to(dtype) if bias else None
    return torch.tensor(0.37, dtype=dtype), w, b


def _reference64(x, alpha, w, b):
    y = torch.tanh(alpha.double() * x.double())
    return y * (w.double() if w is not None else 1) + (b.double() if b is not None else 0)


def _scale(w, b):
    """The output's scale |w| + |b|, against which rounding is judged."""
    return (w.abs().max().item() if w is not None else 1.0) + (b.abs().max().item() if b is not None else 0.0)


AFFINES = [(True, True), (False, False), (True, False), (False, True)]


@pytest.mark.parametrize("weight,bias", AFFINES)
def test_dyt_forms_equal_the_definition_to_rounding(weight, bias):
    alpha, w, b = _params(64, weight, bias)
    x = torch.randn(4, 33, 64) * 6  # well into both saturated tails, and through zero
    want = _reference64(x, alpha, w, b)
    tol = 8 * torch.finfo(torch.float32).eps * _scale(w, b)  # a few float32 ulps of the output's scale
    for form in (kernels.dyt_reference, kernels.dyt_sigmoid_form, kernels.dyt_eager):
        err = (form(x, alpha, w, b).double() - want).abs().max().item()
        assert err <= tol, (form.__name__, err, tol)
    # the eager buffer path computes the same sequence of operations as the out-of-place form
    torch.testing.assert_close(kernels.dyt_eager(x, alpha, w, b), kernels.dyt_sigmoid_form(x, alpha, w, b), rtol=0, atol=tol)


def test_dyt_forms_in_bfloat16_stay_within_bfloat16_rounding():
    alpha, w, b = _params(64, True, True, torch.bfloat16)
    x = (torch.randn(8, 64) * 4).to(torch.bfloat16)
    want = _reference64(x, alpha, w, b)
    for form in (kernels.dyt_reference, kernels.dyt_eager):
        y = form(x, alpha, w, b)
        assert y.dtype == torch.bfloat16
        assert (y.double() - want).abs().max().item() <= 4 * 2**-8 * _scale(w, b)


def test_dyt_layer_uses_the_definition_under_autograd_and_the_fast_form_otherwise():
    m = DyT(64, alpha=0.37)
    with torch.no_grad():
        m.weight.normal_(0.5, 0.2)
        m.bias.normal_(0.0, 0.2)
    x = torch.randn(3, 7, 64)
    y = m(x)  # parameters require grad: the tanh formula, so its backward is tanh's
    assert torch.equal(y, kernels.dyt_reference(x, m.alpha, m.weight, m.bias))
    y.sum().backward()
    assert m.alpha.grad is not None and m.weight.grad is not None
    with torch.no_grad():
        assert torch.equal(m(x), kernels.dyt_eager(x, m.alpha, m.weight, m.bias))  # small: eager form
    with torch.inference_mode():
        assert torch.equal(m(x), kernels.dyt_eager(x, m.alpha, m.weight, m.bias))
        centred = DyT(64, alpha=0.37, recenter=True)(x)
        torch.testing.assert_close(centred.mean(-1), torch.zeros(3, 7), rtol=0, atol=1e-6)


def test_auto_compiles_only_above_the_size_threshold(monkeypatch):
    calls = []

    def fake_compiled(x, alpha, w, b):
        calls.append(x.numel())
        return kernels.dyt_sigmoid_form(x, alpha, w, b)

    monkeypatch.setitem(kernels._state, "compiled", fake_compiled)
    alpha, w, b = _params(64, True, True)
    small = torch.randn(kernels.COMPILE_MIN_NUMEL // 64 - 1, 64)
    large = torch.randn(kernels.COMPILE_MIN_NUMEL // 64, 64)
    kernels.dyt_inference(small, alpha, w, b)
    kernels.dyt_inference(large, alpha, w, b)
    assert calls == [large.numel()]
    kernels.set_dyt_kernel("compiled")
    kernels.dyt_inference(small, alpha, w, b)
    kernels.set_dyt_kernel("eager")
    kernels.dyt_inference(large, alpha, w, b)
    assert calls == [large.numel(), small.numel()]


def test_a_failing_compiler_falls_back_to_the_eager_form_with_one_warning(monkeypatch):
    def broken(*args):
        raise RuntimeError("no C++ compiler found\nlong inductor log")

    monkeypatch.setitem(kernels._state, "compiled", broken)
    kernels.set_dyt_kernel("compiled")
    alpha, w, b = _params(64, True, True)
    x = torch.randn(5, 64)
    with pytest.warns(RuntimeWarning, match=r"compiled DyT kernel is unavailable \(RuntimeError: no C\+\+ compiler found\)"):
        y = kernels.dyt_inference(x, alpha, w, b)
    assert torch.equal(y, kernels.dyt_eager(x, alpha, w, b))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: later calls go straight to eager
        assert torch.equal(kernels.dyt_inference(x, alpha, w, b), y)


def test_kernel_choice_rejects_unknown_names(monkeypatch):
    with pytest.raises(ValueError, match="unknown DyT kernel 'fast'"):
        kernels.set_dyt_kernel("fast")
    monkeypatch.setitem(kernels._state, "kernel", "turbo")  # as if from NORMSWAP_DYT_KERNEL
    with pytest.raises(ValueError, match="NORMSWAP_DYT_KERNEL='turbo'"):
        kernels.dyt_inference(torch.randn(2, 4), torch.tensor(0.5), None, None)


def test_compiled_kernel_matches_the_eager_form():
    """The real torch.compile'd kernel (a few seconds of compilation), float32, with and without affine."""
    kernels.set_dyt_kernel("compiled")
    x = torch.randn(6, 40, 96) * 5
    for weight, bias in ((True, True), (False, False)):
        alpha, w, b = _params(96, weight, bias)
        got = kernels.dyt_inference(x, alpha, w, b)
        assert not kernels._state["failed"]
        tol = 8 * torch.finfo(torch.float32).eps * _scale(w, b)
        assert (got.double() - _reference64(x, alpha, w, b)).abs().max().item() <= tol
        torch.testing.assert_close(got, kernels.dyt_eager(x, alpha, w, b), rtol=0, atol=tol)


def test_rmsnorm_statistic_matches_a_float64_reference_and_layernorm_on_centred_input():
    x = torch.randn(4, 9, 48) * 3 + 1
    want = x.double() / torch.sqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(kernels.rms_normalize(x, 1e-5).double(), want, rtol=2e-6, atol=1e-6)
    xc = x - x.mean(-1, keepdim=True)
    ln = torch.nn.functional.layer_norm(xc, (48,), eps=1e-5)
    torch.testing.assert_close(RMSNorm(48, 1e-5, weight=False)(xc), ln, rtol=1e-5, atol=1e-5)
    xb = x.to(torch.bfloat16)  # statistic in float32, result in the input's dtype
    yb = kernels.rms_normalize(xb, 1e-5)
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb, kernels.rms_normalize(xb.float(), 1e-5).to(torch.bfloat16), rtol=0, atol=0)


def test_dyt_inside_an_outer_torch_compile_traces_the_fusable_form():
    m = DyT(32, alpha=0.6, recenter=True).eval()
    with torch.no_grad():
        m.weight.normal_(0.5, 0.2)
        m.bias.normal_(0.0, 0.2)
    x = torch.randn(2, 5, 32) * 4
    with torch.inference_mode():
        got = torch.compile(m, dynamic=False)(x)
        want = _reference64(x, m.alpha, m.weight, m.bias)
        want = want - want.mean(-1, keepdim=True)
    assert (got.double() - want).abs().max().item() <= 16 * torch.finfo(torch.float32).eps * _scale(m.weight, m.bias)


def test_rmsnorm_compiled_equals_eager_to_rounding():
    m = RMSNorm(48, 1e-5, weight=True, bias=True).eval()
    with torch.no_grad():
        m.weight.normal_(1.0, 0.2)
        m.bias.normal_(0.0, 0.2)
    x = torch.randn(3, 11, 48) * 2 + 0.3
    with torch.inference_mode():
        torch.testing.assert_close(torch.compile(m, dynamic=False)(x), m(x), rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("weight,bias,recenter", [(True, True, False), (True, False, True), (False, True, False), (False, False, True)])
def test_rmsnorm_inference_in_place_affine_matches_autograd_path_and_leaves_input_alone(weight, bias, recenter):
    m = RMSNorm(24, 1e-6, weight=weight, bias=bias, recenter=recenter)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.5, 0.3)
    x = torch.randn(5, 24) * 2
    x_before = x.clone()
    with torch.no_grad():
        fast = m(x)
    assert torch.equal(x, x_before)
    assert torch.equal(fast, m(x).detach())  # parameters require grad: the out-of-place path
    with torch.no_grad():  # float32 parameters on bfloat16 input: promoted like the out-of-place path
        assert m(x.to(torch.bfloat16)).dtype == (torch.float32 if (weight or bias) else torch.bfloat16)
