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


class _Objective:
    """Least-squares error of the best per-channel affine fit on tanh(alpha x), as a function of alpha.

    With yc = y - mean(y): cov_j = mean(u_j yc_j), var_j = mean(u_j^2) - mean(u_j)^2, and the
    residual variance is var(y_j) - cov_j^2 / var_j; three reductions per evaluation.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x = x
        self.y_mean = y.mean(0)
        self.yc = y - self.y_mean
        self.y_var = self.yc.pow(2).mean(0)

    def fit(self, alpha: float) -> tuple[torch.Tensor, torch.Tensor, float]:
        u = torch.tanh(alpha * self.x)
        u_mean = u.mean(0)
        var_u = u.pow(2).mean(0) - u_mean.pow(2)
        cov = (u * self.yc).mean(0)
        safe = var_u > 1e-12 * self.y_var.clamp_min(1e-30)
        g = torch.where(safe, cov / var_u.clamp_min(1e-30), torch.zeros_like(cov))
        b = self.y_mean - g * u_mean
        resid = torch.where(safe, self.y_var - cov.pow(2) / var_u.clamp_min(1e-30), self.y_var)
        return g, b, float(resid.clamp_min(0).mean())

    def __call__(self, alpha: float) -> float:
        return self.fit(alpha)[2]


def fit_dyt(x: torch.Tensor, y: torch.Tensor, *, grid_size: int = 17, refine_steps: int = 18,
            search_rows: int = 2048, seed: int = 0) -> DytFit:
    """Best DyT (alpha, weight, bias) mapping inputs `x` [N, d] to target outputs `y` [N, d].

    alpha is searched in float32 on at most `search_rows` sampled tokens (the error curve is smooth
    and a few thousand tokens pin it down); weight and bias are then fitted in float64 on all tokens.
    """
    x = x.reshape(-1, x.shape[-1])
    y = y.reshape(-1, y.shape[-1])
    rows = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:search_rows]
    search = _Objective(x[rows].float(), y[rows].float())
    scale = float(x.float().std().clamp_min(1e-12))
    # Candidates from a nearly linear regime (alpha*x << 1) to a nearly saturated one.
    grid = [10 ** e / scale for e in torch.linspace(-2.5, 1.5, grid_size).tolist()]
    errors = [search(a) for a in grid]
    k = min(range(len(grid)), key=errors.__getitem__)
    lo, hi = math.log(grid[max(k - 1, 0)]), math.log(grid[min(k + 1, len(grid) - 1)])
    phi = (math.sqrt(5) - 1) / 2
    c, d = hi - phi * (hi - lo), lo + phi * (hi - lo)
    fc, fd = search(math.exp(c)), search(math.exp(d))
    for _ in range(refine_steps):  # golden-section search on log(alpha)
        if fc < fd:
            hi, d, fd = d, c, fc
            c = hi - phi * (hi - lo)
            fc = search(math.exp(c))
        else:
            lo, c, fc = c, d, fd
            d = lo + phi * (hi - lo)
            fd = search(math.exp(d))
    alpha = min([(errors[k], grid[k]), (fc, math.exp(c)), (fd, math.exp(d))])[1]
    x64, y64 = x.double(), y.double()
    g, b, _ = _Objective(x64, y64).fit(alpha)
    mse = float(((torch.tanh(alpha * x64) * g + b - y64) ** 2).mean())
    return DytFit(alpha, g.float(), b.float(), mse, math.sqrt(mse / max(float(y64.pow(2).mean()), 1e-30)))


def dyt_error(alpha: float, weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
    """Relative RMS error of a given DyT on (x, y), for comparing against a constant-alpha init."""
    x = x.reshape(-1, x.shape[-1]).double()
    y = y.reshape(-1, y.shape[-1]).double()
    pred = torch.tanh(alpha * x) * weight.double() + bias.double()
    return math.sqrt(float(((pred - y) ** 2).mean()) / max(float(y.pow(2).mean()), 1e-30))
