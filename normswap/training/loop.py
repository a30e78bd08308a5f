"""The Accelerate training loop: accumulation, clipping, AdamW with warmup and cosine decay,
validation, atomic checkpoints, exact resume, a guard against non-finite loss, clean Ctrl-C.

It runs unchanged under `accelerate launch`: each process takes its own slice of every global
batch (the slice is a pure function of step, micro-step and rank), gradients are synchronised by
the prepared model, and only the main process writes files.
"""
from __future__ import annotations

import math
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from normswap.errors import NormswapError
from normswap.log import logger
from normswap.training.checkpoint import resume_checkpoint, save_checkpoint
from normswap.training.config import TrainConfig
from normswap.training.data import Examples, TrainData
from normswap.training.objectives import Objective, loss_mask
from normswap.training.params import param_groups
from normswap.training.progressive import Schedule, apply_schedule
from normswap.training.report import TrainLog


class TrainingDiverged(NormswapError):
    """The loss (or gradient norm) became NaN or infinite; training stopped without saving it."""

    exit_code = 3


@dataclass
class LoopResult:
    """How a training loop ended, and how far it got."""

    status: str  # "completed" | "time_limit" (stopped early at cfg.max_seconds, model kept) | "interrupted"
    step: int
    total_steps: int
    tokens: int
    train_seconds: float
    tokens_per_second: float
    last_loss: float | None
    val: dict[str, float] = field(default_factory=dict)
    checkpoint: str | None = None
    signal: str | None = None  # what interrupted the run: "SIGINT" or "SIGTERM"
    audio_seconds: float = 0.0  # speech: seconds of audio trained on (tokens are the labelled decoder tokens)
    audio_seconds_per_second: float = 0.0


def lr_lambda(total_steps: int, warmup_steps: int, min_ratio: float) -> Callable[[int], float]:
    """Linear warmup to 1, then cosine decay to `min_ratio` at the last step."""
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    return int(cfg.warmup) if cfg.warmup >= 1 else int(round(cfg.warmup * total_steps))


class _StopFlag:
    """Set by SIGINT or SIGTERM: the loop finishes the current step, saves and returns."""

    def __init__(self) -> None:
        self.set = False
        self.signal: str | None = None  # "SIGINT" or "SIGTERM"


@contextmanager
def _signals_to_flag(flag: _StopFlag) -> Iterator[None]:
    """The first Ctrl-C (or SIGTERM, as a scheduler or `kill` sends) sets the flag and restores the
    old handlers, so that a second one aborts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signums = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.getsignal(s) for s in signums}

    def restore() -> None:
        for s in signums:
            if signal.getsignal(s) is handler:
                signal.signal(s, previous[s])

    def handler(signum: int, frame: Any) -> None:
        flag.set, flag.signal = True, signal.Signals(signum).name
        restore()
        what = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
        print(f"\nnormswap: {what}: finishing this step, saving a checkpoint (again to abort)", file=sys.stderr)

    for s in signums:
        if previous[s] is not signal.SIG_IGN:
            signal.signal(s, handler)
    try:
        yield
    finally:
        restore()


def set_dropout(model: nn.Module, p: float | None) -> None:
    """Set every dropout probability to `p` (None keeps the model's own)."""
    if p is None:
        return
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = p


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def _mix_seed(*parts: int) -> int:
    h = 0x9E3779B9
    for p in parts:
        h = (h * 1_000_003 + int(p) + 0x7F4A7C15) % (2**61 - 1)
    return h


@torch.no_grad()
def evaluate(model: nn.Module, teacher: nn.Module | None, objective: Objective, examples: Examples,
             batch_size: int, accelerator: Any, seed: int) -> dict[str, float]:
    """Mean objective loss (and LM loss where the model has one) over the held-out examples."""
    if len(examples) == 0:
        return {}
    was_training = model.training
    model.eval()
    totals: dict[str, float] = {}
    weight = 0.0
    try:
        for start in range(0, len(examples), batch_size):
            idx = list(range(start, min(len(examples), start + batch_size)))
            batch = _to(objective.prepare(examples.batch(idx), seed=_mix_seed(seed, 7, start)), accelerator.device)
            with accelerator.autocast():
                loss, parts = objective.loss(model, teacher, batch, with_lm=True)
            n = float(loss_mask(batch).sum())
            totals["val_loss"] = totals.get("val_loss", 0.0) + float(loss) * n
            for k, v in parts.items():
                totals[f"val_{k}"] = totals.get(f"val_{k}", 0.0) + v * n
            weight += n
    finally:
        model.train(was_training)
    out = {k: v / weight for k, v in totals.items()}
    if "val_lm" in out:
        out["val_ppl"] = math.exp(min(out["val_lm"], 50.0))
    return out


def train_loop(
    *,
    model: nn.Module,
    teacher: nn.Module | None,
    objective: Objective,
    data: TrainData,
    cfg: TrainConfig,
    total_steps: int,
    out: Path,
    accelerator: Any,
    resume: bool = False,
    progressive: tuple[list[str], Schedule] | None = None,
    on_step: Callable[[int, dict[str, Any], nn.Module], None] | None = None,
    sharded: dict[str, tuple[int, ...]] | None = None,
) -> LoopResult:
    """Train `model` for `total_steps` optimizer steps (continuing from the newest checkpoint if `resume`).

    `on_step(step, info, model)` is called after every optimizer step (for callers that watch or
    steer a run: tests, notebooks).

    Under FSDP (`accelerate launch` with an FSDP config) the student is sharded by Accelerate, and
    so is a teacher (frozen, in the weights' dtype it was given: a half dtype under bf16/fp16 mixed
    precision, with the same offload policy); `sharded` holds the original shapes of the scalar
    parameters made 1-element for FSDP (`normswap.training.sharding.promote_scalars`, applied here
    when the caller has not).
    """
    from tqdm.auto import tqdm

    from accelerate.utils import set_seed

    set_seed(cfg.seed, device_specific=True)  # dropout draws: same seed, same run (resume restores the saved state)
    from normswap.training.sharding import is_fsdp, promote_scalars

    set_dropout(model, cfg.dropout)
    model.train()
    fsdp = is_fsdp(accelerator)
    if fsdp and sharded is None:
        sharded = promote_scalars(model)
    if not fsdp:
        sharded = None
    if teacher is not None:
        teacher.eval()
        teacher.requires_grad_(False)  # frozen: never in the optimizer, no gradients kept
        if not fsdp:
            teacher.to(accelerator.device)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, warmup_steps(cfg, total_steps), cfg.min_lr_ratio))
    model, optimizer = accelerator.prepare(model, optimizer)
    if teacher is not None and fsdp:  # sharded (and offloaded) like the student; it only runs forward
        promote_scalars(teacher)
        teacher = accelerator.prepare(teacher)
        teacher.eval()
    trainable = [p for p in model.parameters() if p.requires_grad]

    main = accelerator.is_main_process
    log = TrainLog(out, enabled=main)
    step, tokens, seconds = 0, 0, 0.0
    resumed_from: Path | None = None
    if resume:  # the newest intact checkpoint: damaged ones are skipped with a warning
        resumed_from, state = resume_checkpoint(out, model=model, optimizer=optimizer, scheduler=scheduler,
                                                accelerator=accelerator, sharded=sharded)
        ckpt = resumed_from
        step, tokens, seconds = int(state["step"]), int(state["tokens"]), float(state.get("audio_seconds", 0.0))
        log.truncate_after(step)
        logger.info("resumed from %s (step %d of %d, %d tokens)", ckpt, step, total_steps, tokens)

    start_step = step
    eval_every = cfg.eval_every or max(1, total_steps // 10)
    save_every = cfg.save_every or max(1, total_steps // 5)
    nproc, bs = accelerator.num_processes, cfg.batch_size
    flag = _StopFlag()
    bar = tqdm(total=total_steps, initial=step, desc="finetune", unit="step", file=sys.stderr, dynamic_ncols=True,
               disable=not (main and sys.stderr.isatty()))
    train_seconds, run_tokens, run_audio, last_loss, val = 0.0, 0, 0.0, None, {}
    last_ckpt: Path | None = resumed_from
    status = "completed"
    run_start = time.perf_counter()

    def state_dict() -> dict[str, Any]:
        return {"step": step, "tokens": tokens, "audio_seconds": seconds, "total_steps": total_steps, "scheduler": scheduler.state_dict(),
                "scaler": accelerator.scaler.state_dict() if getattr(accelerator, "scaler", None) is not None else None,
                "config": cfg.to_dict()}

    def checkpoint() -> Path:
        return save_checkpoint(out, step, model=model, optimizer=optimizer, state=state_dict(),
                               accelerator=accelerator, keep=cfg.keep_checkpoints, sharded=sharded)

    with _signals_to_flag(flag):
        while step < total_steps:
            if progressive is not None:
                apply_schedule(accelerator.unwrap_model(model), progressive[0], progressive[1], step)
            t0 = time.perf_counter()
            step_loss, parts_sum, step_tokens, step_audio = _accumulate_gradients(model, teacher, objective, data, step, cfg, accelerator)
            if not math.isfinite(step_loss):
                _diverged("loss", step_loss, step + 1, last_ckpt, bar, cfg.lr)
            grad_norm = float(accelerator.clip_grad_norm_(trainable, cfg.clip)) if cfg.clip > 0 else float("nan")
            if cfg.clip > 0 and not math.isfinite(grad_norm) and cfg.precision != "fp16" and accelerator.mixed_precision != "fp16":
                _diverged("gradient norm", grad_norm, step + 1, last_ckpt, bar, cfg.lr)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens += step_tokens
            run_tokens += step_tokens
            seconds += step_audio
            run_audio += step_audio
            train_seconds += time.perf_counter() - t0
            last_loss = step_loss
            tps, aps = run_tokens / max(train_seconds, 1e-9), run_audio / max(train_seconds, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", **({"audio_s_s": f"{aps:,.1f}"} if data.speech else {"tok_s": f"{tps:,.0f}"}))
            info = {"kind": "train", "step": step, "tokens": tokens, "loss": step_loss,
                    **{f"loss_{k}": v for k, v in parts_sum.items()}, "lr": scheduler.get_last_lr()[0],
                    "grad_norm": grad_norm, "tokens_per_s": tps, "elapsed_s": train_seconds,
                    **({"audio_seconds": seconds, "audio_seconds_per_s": aps} if data.speech else {})}
            if step % cfg.log_every == 0 or step == total_steps:
                log.write(info)
                if main and not sys.stderr.isatty():
                    eta = (total_steps - step) * train_seconds / max(1, step - start_step)
                    rate = f"{aps:.1f} audio s/s" if data.speech else f"{tps:.0f} tok/s"
                    logger.info("step %d/%d loss %.4f lr %.2e %s eta %.0fs", step, total_steps, step_loss,
                                info["lr"], rate, eta)
            if step % eval_every == 0 or step == total_steps:
                val = evaluate(model, teacher, objective, data.val, bs, accelerator, data.seed)
                if val:
                    log.write({"kind": "val", "step": step, "tokens": tokens, **val})
                    msg = f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in val.items())
                    if bar.disable:
                        logger.info(msg)
                    else:
                        bar.write(msg, file=sys.stderr)
            if on_step is not None:
                on_step(step, info, accelerator.unwrap_model(model))
            stop = flag.set
            if nproc > 1:
                stop = bool(accelerator.reduce(torch.tensor([float(stop)], device=accelerator.device), "sum")[0] > 0)
            out_of_time = bool(cfg.max_seconds) and time.perf_counter() - run_start >= cfg.max_seconds and step < total_steps
            if step % save_every == 0 or (stop and step < total_steps) or out_of_time:
                last_ckpt = checkpoint()
            if out_of_time and not stop:
                status = "time_limit"
                val = evaluate(model, teacher, objective, data.val, bs, accelerator, data.seed)
                log.write({"kind": "val", "step": step, "tokens": tokens, **val})
                logger.info("time limit of %.0f s reached at step %d of %d: keeping the model as it is", cfg.max_seconds, step, total_steps)
                break
            if stop and step < total_steps:
                status = "interrupted"
                logger.info("interrupted at step %d of %d: checkpoint %s (continue with --resume)", step, total_steps, last_ckpt)
                break
    bar.close()
    return LoopResult(status=status, step=step, total_steps=total_steps, tokens=tokens, train_seconds=train_seconds,
                      tokens_per_second=run_tokens / max(train_seconds, 1e-9), last_loss=last_loss, val=val,
                      checkpoint=str(last_ckpt) if last_ckpt else None, signal=flag.signal if status == "interrupted" else None,
                      audio_seconds=seconds, audio_seconds_per_second=run_audio / max(train_seconds, 1e-9))


def _accumulate_gradients(model: nn.Module, teacher: nn.Module | None, objective: Objective, data: TrainData, step: int,
                          cfg: TrainConfig, accelerator: Any) -> tuple[float, dict[str, float], int, float]:
    """Forward and backward over the micro-batches of one optimizer step.

    Each process takes its own slice of the global batch, a pure function of (step, micro-step,
    rank): that is what makes the data position resumable without a sampler state. Returns the
    mean loss (over micro-batches and processes), its parts, and the tokens (and seconds of audio)
    seen by all processes.
    """
    nproc, rank, bs, accum = accelerator.num_processes, accelerator.process_index, cfg.batch_size, cfg.grad_accum
    loss_sum, parts_sum, n_tokens, n_seconds = 0.0, {}, 0, 0.0
    for micro in range(accum):
        pos = ((step * accum + micro) * nproc + rank) * bs
        index = data.indices(pos, bs)
        batch = data.train.batch(index)
        batch = _to(objective.prepare(batch, seed=_mix_seed(data.seed, step, micro, rank)), accelerator.device)
        with accelerator.no_sync(model) if micro < accum - 1 else _null():  # sync gradients once per step
            with accelerator.autocast():
                loss, parts = objective.loss(model, teacher, batch)
            accelerator.backward(loss / accum)
        loss_sum += float(loss.detach()) / accum
        for k, v in parts.items():
            parts_sum[k] = parts_sum.get(k, 0.0) + v / accum
        n_tokens += int(loss_mask(batch).sum())
        n_seconds += data.train.seconds(index)
    if nproc > 1:
        totals = accelerator.reduce(torch.tensor([loss_sum, float(n_tokens), n_seconds], device=accelerator.device, dtype=torch.float64), "sum")
        loss_sum, n_tokens, n_seconds = float(totals[0]) / nproc, int(totals[1]), float(totals[2])
    return loss_sum, parts_sum, n_tokens, n_seconds


@contextmanager
def _null() -> Iterator[None]:
    yield


def _diverged(what: str, value: float, step: int, last_ckpt: Path | None, bar: Any, lr: float) -> None:
    """Stop with advice that works: the run is deterministic, so resuming its last checkpoint with the
    same settings repeats the same steps, and `--resume` refuses a changed --lr (it would change the
    schedule of the saved run); a new run with a lower --lr does not have that problem."""
    bar.close()
    kept = f"the last good checkpoint, {last_ckpt}, is kept, but resuming it with the same settings repeats the same steps" \
        if last_ckpt else "no checkpoint had been written yet"
    raise TrainingDiverged(f"{what} became {value} at step {step}: training stopped ({kept}); start again with a lower "
                           f"learning rate, e.g. --lr {lr / 10:.3g} (a tenth of {lr:.3g}) with --overwrite")
