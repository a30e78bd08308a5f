"""End-to-end calibration of the replacement norms' parameters (issue 16; design notes 3).

Per-site least squares (`normswap.calibration`) fits each norm to the original's output at that
site; the errors left then compound through the model. This fits the few thousand parameters of
every converted norm at once against what the user sees: the original model's output on the
calibration batches. Everything else stays frozen, bit for bit.

Objectives:
- "kl": KL(original || converted) of the next-token (or decoder) distributions, mean nats per
  token, for any model whose output has `logits` (causal LMs, masked LMs, Whisper's decoder);
- "hidden": MSE of the final hidden states relative to the original's mean square, for encoders
  without a head (sentence-transformers models such as all-MiniLM-L6-v2);
- "pooled": 1 - cosine of the mean-pooled final hidden states, per sequence: what zero-shot STS
  compares. Few rows give few terms, so "hidden+pooled" (their sum) is offered too;
- "auto": "kl" where the output has logits, "hidden+pooled" otherwise.

The optimiser is Adam with relative steps: a positive scale (DyT's alpha, FixedNorm's scale) moves
in log space, and a weight or bias by lr times its own size, because these span orders of magnitude
between sites (alpha is about 1/std of its input: 1e-3 in a Llama layer with massive activations,
0.5 elsewhere) and one absolute learning rate cannot suit all of them.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from normswap.calibration import no_cache

OBJECTIVES = ("auto", "kl", "kl+ce", "hidden", "pooled", "hidden+pooled")
# Above this many bytes of float32 teacher log-probabilities the cache is kept in float16 (ample
# for KL targets: about 1e-3 relative in each probability); above FLOAT16_CACHE_MAX the teacher is
# run again at every step instead of cached.
FLOAT32_CACHE_MAX = 1 << 30
FLOAT16_CACHE_MAX = 4 << 30


def norm_types() -> tuple[type, ...]:
    """The module classes whose parameters end-to-end calibration optimises."""
    from normswap.modules import DyT, ElementwiseNorm, FixedNorm

    return (DyT, FixedNorm, ElementwiseNorm)


@dataclass
class _Param:
    name: str
    param: nn.Parameter
    log: bool  # moves in log space (a positive scale)
    scale: torch.Tensor | None  # per-element step size in units of lr (linear parameters)
    master: torch.Tensor  # float32 copy the optimiser updates
    m: torch.Tensor
    v: torch.Tensor


def norm_parameters(model: nn.Module, paths: list[str] | None = None) -> list[tuple[str, nn.Parameter, bool, torch.Tensor | None]]:
    """(name, parameter, log-space?, linear step scale) of every converted norm's parameters.

    Steps are relative: `alpha` and `scale` (positive) move in log space; a weight by lr times
    max(|w_j|, 0.1 rms(w)), a bias by lr times max(|b_j|, 0.1 rms(w)), a shift (Derf, in units of
    alpha x) by lr."""
    types = norm_types()
    wanted = None if paths is None else set(paths)
    out = []
    for path, mod in model.named_modules():
        if not isinstance(mod, types) or (wanted is not None and path not in wanted):
            continue
        w = getattr(mod, "weight", None)
        w_rms = float(w.detach().float().pow(2).mean().sqrt()) if w is not None else 1.0
        floor = max(0.1 * w_rms, 1e-6)
        for name, p in mod.named_parameters(recurse=False):
            full = f"{path}.{name}" if path else name
            if name in ("alpha", "scale"):
                log = bool((p.detach() > 0).all())
                out.append((full, p, log, None if log else torch.full_like(p.detach().float(), 1.0)))
            elif name in ("weight", "bias"):
                out.append((full, p, False, p.detach().float().abs().clamp_min(floor)))
            else:
                out.append((full, p, False, torch.ones_like(p.detach().float())))
    return out


class RelativeAdam:
    """Adam in the relative coordinates of `norm_parameters` (see the module docstring): a positive
    scale moves in log space, a linear parameter by lr times its own size. `lr` after a linear
    warmup of `warmup` steps, cosine decay to `final_lr_ratio` * lr over the run (`frac` of it
    done); the global gradient norm is clipped to `clip` in those coordinates. Each step writes the
    float32 master values back into the parameters, in their own dtype."""

    BETAS, EPS = (0.9, 0.999), 1e-12

    def __init__(self, params: list[tuple[str, nn.Parameter, bool, torch.Tensor | None]], *, lr: float, warmup: int,
                 final_lr_ratio: float = 0.1, clip: float = 1.0):
        self.state = [_Param(n, p, log, sc, p.detach().float().clone(), torch.zeros_like(p, dtype=torch.float32),
                             torch.zeros_like(p, dtype=torch.float32)) for n, p, log, sc in params]
        self.lr, self.warmup, self.final_lr_ratio, self.clip = lr, warmup, final_lr_ratio, clip
        self.steps = 0

    @property
    def parameters(self) -> list[nn.Parameter]:
        return [s.param for s in self.state]

    def rate(self, frac: float) -> float:
        if self.steps <= self.warmup:
            return self.lr * self.steps / max(self.warmup, 1)
        return self.lr * (self.final_lr_ratio + (1 - self.final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))

    def step(self, grads: tuple[torch.Tensor | None, ...], frac: float) -> None:
        """One update from the gradients of `parameters` (None: unused), `frac` of the run done."""
        # gradients in the relative coordinates: d/d(log p) = p * d/dp; d/d(p / scale) = scale * d/dp
        gs = []
        for s, g in zip(self.state, grads):
            g = torch.zeros_like(s.master) if g is None else g.float()
            gs.append(g * s.master if s.log else g * s.scale)
        norm = math.sqrt(sum(float(g.pow(2).sum()) for g in gs))
        if self.clip and norm > self.clip:
            gs = [g * (self.clip / norm) for g in gs]
        self.steps += 1
        rate = self.rate(frac)
        (beta1, beta2), t = self.BETAS, self.steps
        with torch.no_grad():
            for s, g in zip(self.state, gs):
                s.m.mul_(beta1).add_(g, alpha=1 - beta1)
                s.v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                upd = (s.m / (1 - beta1 ** t)) / ((s.v / (1 - beta2 ** t)).sqrt() + self.EPS)
                if s.log:
                    s.master.mul_(torch.exp(-rate * upd))
                else:
                    s.master.sub_(rate * upd * s.scale)
                s.param.copy_(s.master.to(s.param.dtype))


def restore_modes(flags: list[tuple[nn.Parameter, bool]], models: tuple[nn.Module, ...], training: tuple[bool, ...]) -> None:
    """Put back what a norm fit changed: each parameter's requires_grad flag and each model's
    train/eval mode."""
    for p, flag in flags:
        p.requires_grad_(flag)
    for m, mode in zip(models, training):
        m.train(mode)


def _has_logits(out: Any) -> bool:
    return getattr(out, "logits", None) is not None


def _output(out: Any, objective: str) -> torch.Tensor:
    if objective in ("kl", "kl+ce"):
        return out.logits
    h = getattr(out, "last_hidden_state", None)
    if h is None:
        h = out[0] if isinstance(out, (tuple, list)) else None
    if h is None:
        raise ValueError(f"the model returns no last_hidden_state for objective {objective!r}")
    return h


def _mask(batch: dict[str, torch.Tensor], like: torch.Tensor, objective: str) -> torch.Tensor | None:
    """[B, T] weights of the positions that count (padding excluded), or None for all."""
    key = "decoder_attention_mask" if "decoder_input_ids" in batch else "attention_mask"
    m = batch.get(key)
    if m is None or m.shape != like.shape[:2]:
        return None
    return m.to(like.dtype)


def _pool(h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return h.mean(1)
    return (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1e-9)


class _Target:
    """The original model's output on one batch, in the form its objective needs."""

    def __init__(self, value: torch.Tensor, extra: torch.Tensor | None = None):
        self.value, self.extra = value, extra


def _make_target(out: torch.Tensor, objective: str, mask: torch.Tensor | None, temperature: float, cache_dtype: torch.dtype,
                 labels: torch.Tensor | None = None) -> _Target:
    """KL objectives: the original's log-probabilities at `temperature` (in `cache_dtype`) and, for
    "kl+ce", its untempered log-probability of each next token. Hidden-state objectives: the
    hidden states and their pooled means."""
    if objective in ("kl", "kl+ce"):
        z = out.float()
        extra = None
        if objective == "kl+ce" and labels is not None:
            extra = torch.log_softmax(z, -1).gather(-1, labels.clamp_min(0)[..., None])[..., 0]
        return _Target(torch.log_softmax(z / temperature, -1).to(cache_dtype), extra)
    h = out.detach().float()
    return _Target(h, _pool(h, mask))


def _next_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The ids each position predicts (the next one in the row), -100 at the last position: the
    decoder's for an encoder-decoder, the input's for a causal LM."""
    ids = batch.get("decoder_input_ids", batch.get("input_ids"))
    if ids is None:
        return None
    return torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)


class _FusedKL(torch.autograd.Function):
    """sum_i w_i T^2 KL(p_i || q_i) [+ sum_i c_i (log p1_i(y_i) - log q1_i(y_i))] from student
    logits z [N, V], with its gradient T w_i (q_i - p_i) [+ c_i (q1_i - onehot(y_i))] computed in
    the same pass, a chunk of rows at a time: one [N, V] buffer instead of the four or five that
    autograd through log_softmax keeps (a 50k vocabulary makes each 200 MB per 1k tokens)."""

    CHUNK = 256

    @staticmethod
    def forward(ctx, z, lp, w, temperature, labels, c, lp_label):  # noqa: D102 - see the class
        grad = torch.empty(z.shape, dtype=torch.float32, device=z.device)
        loss = torch.zeros((), dtype=torch.float64, device=z.device)
        w = w.float()
        c = None if c is None else c.float()
        lp_label = None if lp_label is None else lp_label.float()
        ctx.dtype = z.dtype
        for r in range(0, z.shape[0], _FusedKL.CHUNK):
            sl = slice(r, r + _FusedKL.CHUNK)
            zc = z[sl].float()
            lq = torch.log_softmax(zc / temperature, -1)
            lpc = lp[sl].float()
            p = lpc.exp()
            kl = torch.where(p > 0, p * (lpc - lq), torch.zeros_like(p)).sum(-1)
            loss += (w[sl] * kl).sum().double() * temperature ** 2
            g = (lq.exp() - p).mul_((temperature * w[sl])[:, None])
            if c is not None:
                lq1 = lq if temperature == 1 else torch.log_softmax(zc, -1)
                y = labels[sl].clamp_min(0)[:, None]
                loss += (c[sl] * (lp_label[sl] - lq1.gather(-1, y)[:, 0])).sum().double()
                g.add_(lq1.exp() * c[sl][:, None])
                g.scatter_add_(-1, y, -c[sl][:, None])
            grad[sl] = g
        ctx.save_for_backward(grad)
        return loss.float()

    @staticmethod
    def backward(ctx, go):  # noqa: D102
        (grad,) = ctx.saved_tensors
        return (grad * go).to(ctx.dtype), None, None, None, None, None, None


def _loss(out: torch.Tensor, target: _Target, objective: str, mask: torch.Tensor | None, temperature: float,
          labels: torch.Tensor | None = None) -> torch.Tensor:
    """The objective on one batch (mean over its positions / sequences)."""
    if objective in ("kl", "kl+ce"):
        z = out.reshape(-1, out.shape[-1])
        lp = target.value.reshape(-1, out.shape[-1])
        m = torch.ones(z.shape[0], device=z.device) if mask is None else mask.reshape(-1).float()
        w = m / m.sum().clamp_min(1)
        c = y = lpy = None
        if objective == "kl+ce" and labels is not None and target.extra is not None:
            # the calibration text's own next tokens: the excess of the converted model's loss on
            # them over the original's (negative where it predicts the text better)
            y = labels.reshape(-1)
            keep = (y >= 0).float() * m
            c = keep / keep.sum().clamp_min(1)
            lpy = target.extra.reshape(-1).float()
        return _FusedKL.apply(z, lp, w, float(temperature), y, c, lpy)
    h = out.float()
    total = h.new_zeros(())
    if objective in ("hidden", "hidden+pooled"):
        se = (h - target.value).pow(2).mean(-1)  # [B, T]
        ms = target.value.pow(2).mean(-1)
        if mask is None:
            total = total + se.mean() / ms.mean().clamp_min(1e-30)
        else:
            total = total + (se * mask).sum() / (ms * mask).sum().clamp_min(1e-30)
    if objective in ("pooled", "hidden+pooled"):
        cos = nn.functional.cosine_similarity(_pool(h, mask), target.extra, dim=-1)
        total = total + (1 - cos).mean()
    return total


def _split(batches: list[dict[str, torch.Tensor]], rows: int | None) -> list[dict[str, torch.Tensor]]:
    """The batches cut into pieces of at most `rows` rows (None: as given)."""
    if rows is None:
        return list(batches)
    out = []
    for b in batches:
        n = next(iter(b.values())).shape[0]
        for i in range(0, n, rows):
            out.append({k: v[i:i + rows] for k, v in b.items()})
    return out


def _tokens(batch: dict[str, torch.Tensor]) -> int:
    t = batch.get("decoder_input_ids", batch.get("input_ids"))
    return int(t.numel()) if t is not None else 0


def fit_end_to_end(
    model: nn.Module,
    original: nn.Module,
    batches: list[dict[str, torch.Tensor]],
    *,
    steps: int = 200,
    lr: float = 1e-2,
    objective: str = "auto",
    time_budget_s: float | None = None,
    progress: bool | None = True,
    rows_per_step: int | None = None,
    warmup: int | None = None,
    final_lr_ratio: float = 0.1,
    clip: float = 1.0,
    temperature: float = 1.0,
    paths: list[str] | None = None,
    seed: int = 0,
    revert_if_worse: bool = True,
    clock: Any = None,
) -> dict[str, Any]:
    """Fit the parameters of `model`'s converted norms (DyT, FixedNorm, ElementwiseNorm; or only
    those at `paths`) so that `model` reproduces `original` on `batches`. Returns a summary dict.

    `model` is the converted model with its norm affines still on the norms (unfolded); `original`
    the model it came from; `batches` the calibration batches (dicts of model inputs, as
    `normswap.samples.model_inputs` makes them: text blocks, or Whisper's input_features and
    decoder_input_ids). The original's outputs are computed once, in eval mode without gradients,
    and cached. Every parameter other than the norms' keeps its value bit for bit, and every
    requires_grad flag and train/eval mode is restored on return.

    Optimisation: Adam with relative steps (see the module docstring), `lr` after a linear warmup
    (`warmup` steps, default min(10, steps // 10)), cosine decay to `final_lr_ratio` * lr; global
    gradient norm clipped to `clip` in those relative coordinates; one (sub-)batch per step, the
    batches visited in a seeded random order, cut to `rows_per_step` rows each if given. It stops
    after `steps` steps or once `time_budget_s` seconds (counted from the call, the teacher pass
    included) have passed on `clock` (default time.perf_counter, wall time; time.process_time
    budgets CPU time on a shared machine); with a budget the schedule follows whichever runs out
    first.

    The loss on all batches is measured before and after; if it got worse (`revert_if_worse`),
    the starting parameters are put back. Returns objective, loss_before, loss_after, steps,
    seconds (wall), cpu_seconds (this process), stopped ("steps" / "time"), reverted, parameters (count), sites, tokens_per_step,
    loss_first_steps / loss_last_steps (mean training loss of the first and last 10% of steps).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
    if not batches:
        raise ValueError("no calibration batches")
    clock = time.perf_counter if clock is None else clock
    t0, cpu0 = clock(), time.process_time()
    wall0 = time.perf_counter()
    device = next(model.parameters()).device
    params = norm_parameters(model, paths)
    if not params:
        raise ValueError(f"{type(model).__name__} has no converted norm (DyT, FixedNorm, ElementwiseNorm) to calibrate")
    kwargs_model, kwargs_orig = no_cache(model), no_cache(original)
    pieces = [{k: v.to(device) for k, v in b.items()} for b in _split(batches, rows_per_step)]
    was_training = (model.training, original.training)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    param_ids = {id(p) for _, p, _, _ in params}
    model.eval()
    original.eval()
    bar = None
    try:
        for p, _ in flags:
            p.requires_grad_(id(p) in param_ids)
        # --- the teacher's targets, once
        with torch.no_grad():
            first = original(**pieces[0], **kwargs_orig)
            if objective == "auto":
                objective = "kl" if _has_logits(first) else "hidden+pooled"
            probe = _output(first, objective)
            bytes32 = probe.numel() * 4 * len(pieces)  # the whole cache in float32 (pieces are alike in size)
            cache_dtype = torch.float32 if objective != "kl" or bytes32 <= FLOAT32_CACHE_MAX else torch.float16
            cached = cache_dtype == torch.float32 or bytes32 // 2 <= FLOAT16_CACHE_MAX
            targets: list[_Target | None] = []
            for i, piece in enumerate(pieces):
                if not cached:
                    targets.append(None)
                    continue
                out = _output(first if i == 0 else original(**piece, **kwargs_orig), objective)
                targets.append(_make_target(out, objective, _mask(piece, out, objective), temperature, cache_dtype, _next_tokens(piece)))
            del first, probe

        def target(i: int) -> _Target:
            if targets[i] is not None:
                return targets[i]
            with torch.no_grad():
                out = _output(original(**pieces[i], **kwargs_orig), objective)
                return _make_target(out, objective, _mask(pieces[i], out, objective), temperature, torch.float32, _next_tokens(pieces[i]))

        def evaluate() -> float:
            total_loss, weight = 0.0, 0
            with torch.no_grad():
                for i, piece in enumerate(pieces):
                    out = _output(model(**piece, **kwargs_model), objective)
                    n = _tokens(piece) or 1
                    total_loss += float(_loss(out, target(i), objective, _mask(piece, out, objective), temperature,
                                              _next_tokens(piece))) * n
                    weight += n
            return total_loss / max(weight, 1)

        loss_before = evaluate()
        start = [p.detach().clone() for _, p, _, _ in params]
        warmup = min(10, steps // 10) if warmup is None else warmup
        adam = RelativeAdam(params, lr=lr, warmup=warmup, final_lr_ratio=final_lr_ratio, clip=clip)
        if progress:
            from normswap.evaluation.progress import Progress

            bar = Progress(steps, "end-to-end calibration", None, unit="steps")
            bar.restart()
        gen = torch.Generator().manual_seed(seed)
        order: list[int] = []
        losses: list[float] = []
        stopped = "steps"
        step = 0
        while step < steps:
            if time_budget_s is not None and clock() - t0 >= time_budget_s:
                stopped = "time"
                break
            if not order:
                order = torch.randperm(len(pieces), generator=gen).tolist()
            i = order.pop()
            with torch.enable_grad():
                out = _output(model(**pieces[i], **kwargs_model), objective)
                loss = _loss(out, target(i), objective, _mask(pieces[i], out, objective), temperature, _next_tokens(pieces[i]))
                grads = torch.autograd.grad(loss, adam.parameters, allow_unused=True)
            del out
            lv = float(loss.detach())
            if not math.isfinite(lv):
                stopped = "non-finite loss"
                break
            losses.append(lv)
            step += 1
            frac = step / steps
            if time_budget_s is not None:
                frac = max(frac, (clock() - t0) / time_budget_s)
            adam.step(grads, frac)
            if bar is not None:
                bar.set_postfix(loss=f"{lv:.4g}")
                bar.update(1, tokens=_tokens(pieces[i]))
        if bar is not None:
            bar.total = max(step, 1) if stopped != "steps" else bar.total
            bar.close()
        loss_after = evaluate() if step else loss_before
        reverted = False
        if revert_if_worse and not (loss_after <= loss_before):
            with torch.no_grad():
                for (_, p, _, _), p0 in zip(params, start):
                    p.copy_(p0)
            reverted = True
        k = max(1, len(losses) // 10)
        return {
            "objective": objective,
            "loss_before": loss_before,
            "loss_after": loss_before if reverted else loss_after,
            "loss_after_fit": loss_after,
            "loss_first_steps": sum(losses[:k]) / k if losses else None,
            "loss_last_steps": sum(losses[-k:]) / k if losses else None,
            "steps": step,
            "stopped": stopped,
            "reverted": reverted,
            "seconds": time.perf_counter() - wall0,
            "cpu_seconds": time.process_time() - cpu0,
            "parameters": sum(p.numel() for _, p, _, _ in params),
            "sites": len({n.rsplit(".", 1)[0] for n, _, _, _ in params}),
            "fitted_sites": [] if reverted else sorted({n.rsplit(".", 1)[0] for n, _, _, _ in params}),  # the values it changed
            "tokens_per_step": sum(_tokens(p) for p in pieces) / len(pieces),
            "lr": lr,
            "teacher_cache": str(cache_dtype).replace("torch.", "") if cached else "none (recomputed each step)",
        }
    finally:
        if bar is not None:
            bar.close()
        restore_modes(flags, (model, original), was_training)


# Block length of end-to-end calibration batches for causal LMs and text encoder-decoders: long
# enough that attention over a long context is part of the fit. Measured on SmolLM2-135M-Instruct
# (evaluated on 1,024-token windows): the same 26 steps on 128-token blocks gave perplexity 58,952,
# on 1,024-token blocks 930 (docs/results/calibration-ablation).
E2E_BLOCK = 1024


def long_blocks(model: nn.Module) -> bool:
    """Whether the norm fits take their own long-context batches (`e2e_batches`) rather than the
    per-site calibration batches: causal LMs and text encoder-decoders do; encoders and speech
    models do not."""
    from normswap.samples import is_encoder, is_speech

    return not (is_speech(model) or getattr(model, "main_input_name", "input_ids") != "input_ids" or is_encoder(model))


def e2e_batches(model: nn.Module, *, tokenizer: Any = None, processor: Any = None, text: str | None = None, audio: Any = None,
                n_tokens: int = 4096, seed: int = 0, audio_subsets: Any = None, teacher: nn.Module | None = None) -> list[dict[str, torch.Tensor]]:
    """Calibration batches shaped for `fit_end_to_end` and `normswap.blockfit.fit_blocks`
    (`normswap.samples.model_inputs` underneath).

    Causal LMs and text encoder-decoders: blocks of min(E2E_BLOCK, the model's context) tokens, as
    many a batch as make about E2E_BLOCK tokens (a step then sees a whole long context). Encoders (BERT family): model_inputs' blocks
    of 128 tokens, 8 a batch. Speech models: one utterance a batch, as model_inputs makes them: the
    per-site calibration batches (`long_blocks` says which)."""
    from normswap.samples import max_positions, model_inputs

    if not long_blocks(model):
        return model_inputs(model, tokenizer=tokenizer, processor=processor, text=text, audio=audio, n_tokens=n_tokens, seed=seed,
                            what="calibration", teacher=teacher, audio_subsets=audio_subsets)
    block = min(E2E_BLOCK, max_positions(model))
    # a step sees about E2E_BLOCK tokens: one block, or several rows of a model with a shorter context
    return model_inputs(model, tokenizer=tokenizer, text=text, n_tokens=n_tokens, block=block, batch_size=max(1, E2E_BLOCK // block),
                        seed=seed, what="calibration")
