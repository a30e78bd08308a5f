"""Fitting DyT to a pretrained norm's behaviour on calibration data (design notes 2.3).

For a candidate alpha, u = tanh(alpha x); the best per-channel weight and bias are the least-squares
fit of y_j on u_j (closed form). The remaining squared error is a 1-D function of alpha, searched on
a log-spaced grid and refined by golden-section search on log(alpha).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class DytFit:
    alpha: float
    weight: torch.Tensor  # [d]
    bias: torch.Tensor  # [d]
    mse: float  # mean squared error of the fit
    rel_error: float  # sqrt(mse / mean(y^2)): error relative to the target's scale


def _fit_at(alpha: float, x: torch.Tensor, y: torch.Tensor, y_mean: torch.Tensor, y_var: torch.Tensor):
    u = torch.tanh(alpha * x)
    u_mean = u.mean(0)
    uc = u - u_mean
    var_u = uc.pow(2).mean(0)
    cov = (uc * (y - y_mean)).mean(0)
    safe = var_u > 1e-30
    g = torch.where(safe, cov / var_u.clamp_min(1e-30), torch.zeros_like(cov))
    b = y_mean - g * u_mean
    # Residual variance per channel after the best affine fit: var(y) - cov^2 / var(u).
    resid = torch.where(safe, y_var - cov.pow(2) / var_u.clamp_min(1e-30), y_var)
    return g, b, float(resid.clamp_min(0).mean())


def fit_dyt(x: torch.Tensor, y: torch.Tensor, *, grid_size: int = 41, refine_steps: int = 30) -> DytFit:
    """Best DyT (alpha, weight, bias) mapping inputs `x` [N, d] to target outputs `y` [N, d]."""
    x = x.reshape(-1, x.shape[-1]).double()
    y = y.reshape(-1, y.shape[-1]).double()
    y_mean = y.mean(0)
    y_var = (y - y_mean).pow(2).mean(0)
    scale = float(x.std().clamp_min(1e-12))
    # Candidates from a nearly linear regime (alpha*x << 1) to a nearly saturated one.
    grid = [10 ** e / scale for e in torch.linspace(-2.5, 1.5, grid_size).tolist()]
    errors = [_fit_at(a, x, y, y_mean, y_var)[2] for a in grid]
    k = min(range(len(grid)), key=errors.__getitem__)
    lo, hi = math.log(grid[max(k - 1, 0)]), math.log(grid[min(k + 1, len(grid) - 1)])
    phi = (math.sqrt(5) - 1) / 2
    err = lambda t: _fit_at(math.exp(t), x, y, y_mean, y_var)[2]  # noqa: E731
    c, d = hi - phi * (hi - lo), lo + phi * (hi - lo)
    fc, fd = err(c), err(d)
    for _ in range(refine_steps):
        if fc < fd:
            hi, d, fd = d, c, fc
            c = hi - phi * (hi - lo)
            fc = err(c)
        else:
            lo, c, fc = c, d, fd
            d = lo + phi * (hi - lo)
            fd = err(d)
    best = min([(errors[k], grid[k]), (fc, math.exp(c)), (fd, math.exp(d))])
    alpha = best[1]
    g, b, mse = _fit_at(alpha, x, y, y_mean, y_var)
    mse_total = float(((torch.tanh(alpha * x) * g + b - y) ** 2).mean())
    return DytFit(alpha, g.float(), b.float(), mse_total, math.sqrt(mse_total / max(float(y.pow(2).mean()), 1e-30)))


def dyt_error(alpha: float, weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
    """Relative RMS error of a given DyT on (x, y), for comparing against a constant-alpha init."""
    x = x.reshape(-1, x.shape[-1]).double()
    y = y.reshape(-1, y.shape[-1]).double()
    pred = torch.tanh(alpha * x) * weight.double() + bias.double()
    return math.sqrt(float(((pred - y) ** 2).mean()) / max(float(y.pow(2).mean()), 1e-30))
