"""Block-local calibration (`--calibrate block`, issue 16): each block's norms fitted to the block's output.

Per-site least squares (`normswap.calibration`) fits each norm to its own output; end-to-end
calibration (`normswap.e2e`) fits every norm at once against the model's output, through the whole
model and its head at every step. Between the two, this fits the norms of one unit at a time, in
the order a forward pass reaches them, so that the converted unit reproduces the original unit's
output. A unit is a block (`normswap.blockwise.block_paths`) or a converted norm outside any block
(an embedding norm, a final norm). A step runs one unit, not the model, so a fit gets many steps
for the cost of one end-to-end step, and what it matches includes the attention and feed-forward
that read the norms, which a per-site fit ignores.

- The unit's inputs are what the converted model, its earlier units already fitted, passes it
  (the stream and every keyword: rotary tables, masks, a decoder's encoder states), captured by
  a forward pass that stops at the unit. Where the previous unit hands its output straight on
  (consecutive decoder layers), the pass runs on the first batch only, to show that, and the
  other batches' inputs are the previous unit's outputs and keywords (`_carry`): the prefix is
  not run again for them.
- Its target is the original model's output of the same module on the same batch: the original
  trajectory, so a unit may correct part of the drift its prefix left.
- The loss is each token's squared error relative to its target's squared norm, averaged over
  the tokens (padding excluded). Every token counts alike: a Llama's attention-sink token, whose
  residual norm is 35-175x the median's, would otherwise be the whole objective.
- The optimiser is end-to-end calibration's (`normswap.e2e.RelativeAdam`); a unit whose loss did
  not fall gets its starting values back.
"""
from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import nn

from normswap.calibration import hooked_forward, input_device, no_cache
from normswap.e2e import RelativeAdam, norm_parameters, norm_types, restore_modes

# Adam steps per unit by default: measured on SmolLM2-135M-Instruct (docs/results/calibration-ablation).
BLOCK_STEPS = 20


class _Reached(Exception):
    """Raised by the capture hook once the pass has reached its unit: nothing after it is needed."""


def fit_units(model: nn.Module, sites: list[str]) -> list[str]:
    """The units of block-local calibration, in module order: every block holding one of `sites`,
    and each of `sites` that lies in no block."""
    from normswap.blockwise import block_paths

    blocks = block_paths(model, sites)
    loose = [s for s in sites if not any(s.startswith(b + ".") for b in blocks)]
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return sorted(blocks + loose, key=order.__getitem__)


def _main(out: Any) -> torch.Tensor:
    """A unit's output stream: a block returns it alone or first in a tuple."""
    return out[0] if isinstance(out, (tuple, list)) else out


def _unit_inputs(model: nn.Module, unit: str, batch: dict[str, torch.Tensor]) -> tuple[tuple, dict[str, Any]]:
    """The (args, kwargs) the model passes the module at `unit` on `batch`, as it is now."""
    from normswap.surgery.paths import get_module

    seen: list[tuple[tuple, dict[str, Any]]] = []

    def grab(mod: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        seen.append((args, kwargs))
        raise _Reached

    handle = get_module(model, unit).register_forward_pre_hook(grab, with_kwargs=True)
    device = input_device(model)
    try:
        with torch.no_grad():
            model(**{k: v.to(device) for k, v in batch.items()}, **no_cache(model))
    except _Reached:
        pass
    finally:
        handle.remove()
    if not seen:
        raise RuntimeError(f"block calibration: {unit} never ran in the forward pass")
    return seen[0]


def _same(a: Any, b: Any) -> bool:
    """Whether two captured inputs are the same value: the same object, equal tensors (shape, dtype
    and every element), or tuples / lists / plain constants of such."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype
                and a.device == b.device and torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return isinstance(a, (bool, int, float, str, type(None))) and type(a) is type(b) and a == b


def _carry(probe: tuple[tuple, dict[str, Any]], prev: tuple[tuple, dict[str, Any]], prev_out: torch.Tensor):
    """How to build a unit's inputs from the previous unit's, or None where they are not carried.

    `probe` is the unit's (args, kwargs) captured on the first batch; `prev` and `prev_out` are the
    previous unit's inputs and output on that batch. The inputs are carried when exactly one of
    the unit's inputs is the previous unit's output and each other one is the previous unit's input
    under the same position or keyword, or a plain constant. Returns a function of the previous
    unit's (inputs, output) on any batch, giving this unit's inputs there."""
    pargs, pkw = prev
    slots: list[tuple[str, Any]] = []  # per input: ("out", None) / ("arg", j) / ("kw", key) / ("const", value)
    items = [(("a", j), v) for j, v in enumerate(probe[0])] + [(("k", k), v) for k, v in probe[1].items()]
    for (kind, key), v in items:
        if isinstance(v, torch.Tensor) and _same(v, prev_out):
            slots.append(("out", None))
        elif kind == "a" and key < len(pargs) and _same(v, pargs[key]):
            slots.append(("arg", key))
        elif kind == "k" and key in pkw and _same(v, pkw[key]):
            slots.append(("kw", key))
        elif isinstance(v, (bool, int, float, str, type(None))):  # a plain constant (None, a flag)
            slots.append(("const", v))
        else:
            return None
    if sum(s[0] == "out" for s in slots) != 1:
        return None
    n_args = len(probe[0])
    keys = list(probe[1])

    def build(inputs: tuple[tuple, dict[str, Any]], out: torch.Tensor) -> tuple[tuple, dict[str, Any]]:
        a, kw = inputs
        vals = [out if s == "out" else a[x] if s == "arg" else kw[x] if s == "kw" else x for s, x in slots]
        return tuple(vals[:n_args]), dict(zip(keys, vals[n_args:]))

    return build


def _token_mask(batch: dict[str, torch.Tensor], like: torch.Tensor) -> torch.Tensor | None:
    """[B, T] weights of the real positions of a unit's [B, T, d] output (padding excluded), or
    None where the batch's mask does not describe them."""
    key = "decoder_attention_mask" if "decoder_input_ids" in batch else "attention_mask"
    m = batch.get(key)
    if m is None or like.dim() != 3 or tuple(m.shape) != tuple(like.shape[:2]):
        return None
    return m.to(device=like.device, dtype=torch.float32)


def token_relative_error(out: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """mean over tokens of |out_t - target_t|^2 / |target_t|^2 (the module docstring's loss)."""
    se = (out.float() - target).pow(2).sum(-1)
    rel = se / target.pow(2).sum(-1).clamp_min(1e-30)
    if mask is None:
        return rel.mean()
    return (rel * mask).sum() / mask.sum().clamp_min(1)


def fit_blocks(model: nn.Module, original: nn.Module, batches: list[dict[str, torch.Tensor]], *, steps: int = BLOCK_STEPS,
               lr: float = 1e-2, time_budget_s: float | None = None, paths: list[str] | None = None, seed: int = 0,
               progress: bool | None = True) -> dict[str, Any]:
    """Fit the converted norms of `model` (DyT, FixedNorm, ElementwiseNorm; or those at `paths`) one
    unit at a time (the module docstring) so that each unit reproduces `original`'s output there on
    `batches`. Returns a summary: units, steps per unit, the mean unit loss before and after, the
    units reverted, wall and CPU seconds, and each unit's (path, loss before, loss after).

    `model` and `original` are as for `normswap.e2e.fit_end_to_end` (the converted model with its
    norm affines unfolded, and the model it came from, with the same module paths). Each unit
    takes `steps` Adam steps, one batch a step in a seeded order; `time_budget_s` (wall seconds for
    the whole fit) shares what is left evenly among the units still to fit. Every parameter other
    than the norms' keeps its value bit for bit; requires_grad flags and train/eval modes are
    restored on return."""
    from normswap.surgery.paths import get_module

    if not batches:
        raise ValueError("no calibration batches")
    wall0, cpu0 = time.perf_counter(), time.process_time()
    types = norm_types()
    sites = [p for p, m in model.named_modules() if isinstance(m, types) and (paths is None or p in set(paths))]
    if not sites:
        raise ValueError(f"{type(model).__name__} has no converted norm (DyT, FixedNorm, ElementwiseNorm) to calibrate")
    units = fit_units(model, sites)
    device = input_device(model)
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    was_training = (model.training, original.training)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    original.eval()
    bar = None
    report: list[tuple[str, float, float]] = []
    reverted: list[str] = []
    unit_sites: dict[str, list[str]] = {}
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        # the original trajectory: every unit's output on every batch, in one pass a batch
        targets: list[dict[str, torch.Tensor]] = []
        for b in batches:
            got: dict[str, torch.Tensor] = {}

            def keep(path: str, m: nn.Module, args: tuple, out: Any, got=got) -> None:
                got.setdefault(path, _main(out).detach().float())

            hooked_forward(original, units, b, keep, "block calibration")
            targets.append(got)
        if progress:
            from normswap.evaluation.progress import Progress

            bar = Progress(len(units) * steps, "block calibration", None, unit="steps")
            bar.restart()
        gen = torch.Generator().manual_seed(seed)
        # the previous unit's inputs and (fitted) outputs, per batch: what `_carry` builds on
        prev: list[tuple[tuple, dict[str, Any]]] | None = None
        prev_outs: list[torch.Tensor] | None = None
        carried = 0
        for u, unit in enumerate(units):
            mod = get_module(model, unit)
            unit_sites[unit] = [s for s in sites if s == unit or s.startswith(unit + ".")]
            params = norm_parameters(model, unit_sites[unit])
            probe = _unit_inputs(model, unit, batches[0])
            build = None if prev is None else _carry(probe, prev[0], prev_outs[0])
            if build is not None:
                inputs = [probe] + [build(prev[i], prev_outs[i]) for i in range(1, len(batches))]
                carried += 1
            else:
                inputs = [probe] + [_unit_inputs(model, unit, b) for b in batches[1:]]
            del prev, prev_outs
            masks = [_token_mask(b, targets[i][unit]) for i, b in enumerate(batches)]

            def outputs() -> list[torch.Tensor]:
                with torch.no_grad():
                    return [_main(mod(*a, **kw)).detach() for a, kw in inputs]

            def mean_loss(outs: list[torch.Tensor]) -> float:
                return sum(float(token_relative_error(o, targets[i][unit], masks[i])) for i, o in enumerate(outs)) / len(outs)

            def loss_on(i: int) -> torch.Tensor:
                args, kwargs = inputs[i]
                return token_relative_error(_main(mod(*args, **kwargs)), targets[i][unit], masks[i])

            before = mean_loss(outputs())
            start = [p.detach().clone() for _, p, _, _ in params]
            budget = None
            if time_budget_s is not None:
                budget = max(time_budget_s - (time.perf_counter() - wall0), 0.0) / (len(units) - u)
            t_unit = time.perf_counter()
            adam = RelativeAdam(params, lr=lr, warmup=min(3, steps // 5))
            for p in adam.parameters:
                p.requires_grad_(True)
            order: list[int] = []
            finite = True
            for step in range(steps):
                if budget is not None and time.perf_counter() - t_unit >= budget:
                    break
                if not order:
                    order = torch.randperm(len(batches), generator=gen).tolist()
                with torch.enable_grad():
                    loss = loss_on(order.pop())
                    grads = torch.autograd.grad(loss, adam.parameters, allow_unused=True)
                lv = float(loss.detach())
                if not math.isfinite(lv):
                    finite = False
                    break
                adam.step(grads, (step + 1) / steps)
                if bar is not None:
                    bar.set_postfix(unit=unit, loss=f"{lv:.4g}")
                    bar.update(1)
            for p in adam.parameters:
                p.requires_grad_(False)
            outs = outputs()
            after = mean_loss(outs) if finite else math.inf
            if not after <= before:  # worse, or not finite: the unit keeps its start
                with torch.no_grad():
                    for (_, p, _, _), p0 in zip(params, start):
                        p.copy_(p0)
                reverted.append(unit)
                after = before
                outs = outputs()
            report.append((unit, before, after))
            prev, prev_outs = inputs, outs  # what the next unit may be handed
            del inputs, outs
        if bar is not None:
            bar.close()
        return {
            "mode": "block",
            "units": len(units),
            "carried_units": carried,  # units whose inputs came from the previous unit, not a forward pass a batch
            "steps_per_unit": steps,
            "loss_before": sum(r[1] for r in report) / len(report),
            "loss_after": sum(r[2] for r in report) / len(report),
            "reverted": reverted,
            "fitted_sites": [s for u in units if u not in reverted for s in unit_sites[u]],  # the values it changed
            "seconds": time.perf_counter() - wall0,
            "cpu_seconds": time.process_time() - cpu0,
            "parameters": sum(p.numel() for _, p, _, _ in norm_parameters(model, sites)),
            "lr": lr,
            "per_unit": [{"unit": p, "loss_before": b, "loss_after": a} for p, b, a in report],
        }
    finally:
        if bar is not None:
            bar.close()
        restore_modes(flags, (model, original), was_training)
