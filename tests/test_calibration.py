"""DyT calibration: the closed-form fit and the alpha search recover known parameters."""
from __future__ import annotations

import torch

from normswap.calibration import dyt_error, fit_dyt


def test_fit_recovers_known_dyt():
    torch.manual_seed(0)
    x = torch.randn(4000, 16) * 3.0
    alpha, g, b = 0.37, torch.randn(16), torch.randn(16)
    y = g * torch.tanh(alpha * x) + b
    fit = fit_dyt(x, y)
    assert abs(fit.alpha - alpha) / alpha < 1e-3
    assert torch.allclose(fit.weight, g, atol=1e-3) and torch.allclose(fit.bias, b, atol=1e-3)
    assert fit.rel_error < 1e-4


def test_fit_is_least_squares_optimal_for_its_alpha():
    """No perturbation of the fitted weight/bias lowers the error (closed form is optimal)."""
    torch.manual_seed(1)
    x = torch.randn(3000, 8)
    y = torch.nn.functional.layer_norm(x + 0.5, (8,))
    fit = fit_dyt(x, y)
    base = dyt_error(fit.alpha, fit.weight, fit.bias, x, y)
    for _ in range(5):
        assert dyt_error(fit.alpha, fit.weight + 0.01 * torch.randn(8), fit.bias + 0.01 * torch.randn(8), x, y) >= base
    # And the searched alpha beats the constant 0.5 of the DyT paper with the same closed-form affine.
    assert base <= dyt_error(0.5, torch.ones(8), torch.zeros(8), x, y)
