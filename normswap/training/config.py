"""Settings of a fine-tuning run, and parsing of human counts like "2M" tokens."""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields
from typing import Any

from normswap.errors import NormswapError

# progressive swap orders (normswap.training.progressive.swap_order; kept here, torch-free, for recipe validation)
SWAP_ORDERS = ("published", "forward")
# normswap.conversion.DTYPE_CHOICES, spelt out here so that recipe validation needs no torch
DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")
_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}


def parse_count(text: str | int | None) -> int | None:
    """"2M" -> 2_000_000, "1.5k" -> 1500, "200000" -> 200000; None stays None."""
    if text is None or isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmbgKMBG]?)\s*", str(text))
    if not m:
        raise NormswapError(f"cannot read the count {text!r} (use e.g. 200000, 500k, 2M)")
    return int(round(float(m.group(1)) * _SUFFIX[m.group(2).lower()]))


@dataclass
class TrainConfig:
    """Every knob of a run. Fields that decide the data order and the schedule must match on --resume."""

    objective: str = "lm"
    temperature: float = 2.0
    hidden_weight: float | None = None  # None: 1 for bare encoders, 0 otherwise
    pooled_weight: float = 1.0
    steps: int | None = None
    tokens: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    block_size: int | None = None  # None: min(256, the model's maximum length)
    packing: str | None = None  # None: "lines" for bare encoders, "blocks" otherwise
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup: float = 0.05  # < 1: fraction of the steps; >= 1: a step count
    weight_decay: float = 0.01
    clip: float = 1.0
    train: str = "all"
    progressive: bool = False
    swap_every: int | None = None
    fade_steps: int = 0
    swap_order: str = "published"  # progressive: "published" (MLP norms, attention norms, final) or "forward"
    val_examples: int = 16
    eval_every: int | None = None  # None: about 10 evaluations per run
    save_every: int | None = None  # None: about 5 checkpoints per run
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    dropout: float | None = 0.0  # None keeps the model's dropout; 0 matches the teacher exactly
    max_seconds: float | None = None  # wall-clock limit: stop early (keeping the model) when reached
    # where and in what the run happens (none of them changes which examples a step sees: not checked on resume)
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps (normswap.devices); under a multi-process launch the launcher's
    dtype: str = "auto"  # the saved weights' (and the teacher's) dtype: auto (the checkpoint's own) | float32 | bfloat16 | float16
    gradient_checkpointing: bool = False  # recompute activations in backward (model.gradient_checkpointing_enable)

    # fields that change which examples a step sees, or the schedule: checked on --resume
    RESUME_KEYS = ("objective", "steps", "batch_size", "grad_accum", "block_size", "packing", "seed",
                   "lr", "min_lr_ratio", "warmup", "train", "progressive", "swap_every", "fade_steps", "swap_order")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def check(self) -> None:
        if self.steps is not None and self.tokens is not None:
            raise NormswapError("give --steps or --tokens, not both")
        if self.steps is None and self.tokens is None:
            raise NormswapError("give a budget: --steps N or --tokens N (e.g. 2M)")
        if self.steps is not None and self.steps < 1:
            raise NormswapError("--steps must be at least 1")
        if self.tokens is not None and self.tokens < 1:
            raise NormswapError("--tokens must be positive")
        for name in ("batch_size", "grad_accum", "keep_checkpoints", "log_every"):
            if getattr(self, name) < 1:
                raise NormswapError(f"--{name.replace('_', '-')} must be at least 1")
        def number(name: str, value: float | None, lo: float, hi: float = math.inf, *, lo_open: bool = False) -> None:
            if value is None:
                return
            ok = math.isfinite(value) and (value > lo if lo_open else value >= lo) and value <= hi
            if not ok:
                bound = f"> {lo:g}" if lo_open else f">= {lo:g}"
                raise NormswapError(f"--{name} must be a number {bound}" + (f" and <= {hi:g}" if math.isfinite(hi) else "") + f", got {value}")

        number("lr", self.lr, 0, lo_open=True)
        number("min-lr-ratio", self.min_lr_ratio, 0, 1)
        number("warmup", self.warmup, 0)
        number("weight-decay", self.weight_decay, 0)
        number("clip", self.clip, 0)
        number("temperature", self.temperature, 0, lo_open=True)
        number("hidden-weight", self.hidden_weight, 0)
        number("pooled-weight", self.pooled_weight, 0)
        number("dropout", self.dropout, 0, 1)
        number("time-limit", None if self.max_seconds is None else self.max_seconds / 60, 0, lo_open=True)  # minutes
        for name in ("val_examples", "fade_steps"):
            if getattr(self, name) < 0:
                raise NormswapError(f"--{name.replace('_', '-')} must be at least 0")
        for name in ("eval_every", "save_every", "swap_every"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise NormswapError(f"--{name.replace('_', '-')} must be at least 1")
        from normswap.training.params import TRAIN_MODES

        if self.train not in TRAIN_MODES:
            raise NormswapError(f"unknown --train {self.train!r} (use {', '.join(TRAIN_MODES)})")
        if self.swap_order not in SWAP_ORDERS:
            raise NormswapError(f"unknown --swap-order {self.swap_order!r} (use {' or '.join(SWAP_ORDERS)})")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise NormswapError(f"unknown --precision {self.precision!r} (use auto, fp32, bf16 or fp16)")
        from normswap.devices import check_device

        self.device = check_device(self.device)
        if str(self.dtype).removeprefix("torch.") not in DTYPE_NAMES:
            raise NormswapError(f"unknown --dtype {str(self.dtype)[:40]!r}: choose one of {', '.join(DTYPE_NAMES)}")
        self.dtype = str(self.dtype).removeprefix("torch.")
        if self.block_size is not None and self.block_size < 2:
            raise NormswapError("--block-size must be at least 2")
