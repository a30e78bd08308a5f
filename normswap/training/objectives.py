"""Training objectives: language-model loss, distillation from the original model, and mixtures.

- `lm`: next-token cross-entropy for causal LMs, masked-token cross-entropy (seeded 15% mask) for
  masked LMs, cross-entropy on the teacher-forced transcript for speech encoder-decoders
  (Whisper). An encoder without an LM head has no LM loss.
- `distill`: KL(teacher || student) of the output distributions at temperature T (scaled by T^2 so
  its gradient does not shrink with T), plus, with `hidden_weight`, the relative MSE between hidden
  states layer by layer. An encoder without a head has no logits: its distillation is the relative
  MSE of the hidden states and of the mean-pooled sentence embedding. A speech encoder-decoder is
  distilled on its teacher-forced decoder logits (the labelled positions: transcript and eos, not
  padding, not the forced prompt); its hidden-state term compares the audio encoder's layers over
  every frame (the decoder cross-attends to all of them, padding included).

Hidden states of a Pre-LN conversion live in a centred residual stream (the writers were centred),
while the teacher's stream has a per-token mean: they are compared after centring, and the last
hidden state (the final norm's output, whose affine may have been folded into the head) is skipped.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from normswap.errors import NormswapError

OBJECTIVES = ("lm", "distill")


def parse_objective(spec: str) -> dict[str, float]:
    """"lm", "distill", "lm+distill" (equal weights) or "lm=0.3,distill=0.7" -> {name: weight}."""
    spec = spec.strip().lower().replace(" ", "")
    parts = spec.replace("+", ",").split(",") if spec else []
    weights: dict[str, float] = {}
    for part in parts:
        name, _, w = part.partition("=")
        if name not in OBJECTIVES:
            raise NormswapError(f"unknown objective {name!r} in {spec!r} (use lm, distill, or a mix like lm=0.5,distill=0.5)")
        try:
            weights[name] = float(w) if w else 1.0
        except ValueError:
            raise NormswapError(f"bad weight {w!r} for objective {name!r}") from None
        if weights[name] < 0:
            raise NormswapError(f"objective weight for {name} must be >= 0")
    if not weights or sum(weights.values()) <= 0:
        raise NormswapError(f"objective {spec!r} has no positive weight")
    return weights


def model_kind(model: nn.Module) -> str:
    """"causal", "masked", "speech" (a speech-recognition encoder-decoder) or "encoder" (no LM
    head), from the model class."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES, MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES)

    name = type(model).__name__
    if name in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()):
        return "causal"
    if name in set(MODEL_FOR_MASKED_LM_MAPPING_NAMES.values()):
        return "masked"
    if name in set(MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES.values()):
        return "speech"
    return "encoder"


@dataclass
class Objective:
    """A weighted mixture of objectives and their settings."""

    weights: dict[str, float]
    kind: str  # model_kind of the student
    temperature: float = 2.0
    hidden_weight: float = 0.0  # per-layer hidden-state MSE (added to distill)
    pooled_weight: float = 1.0  # pooled-embedding MSE (encoders without a head)
    center_hidden: bool = False  # Pre-LN conversion: compare centred residual streams
    mask_prob: float = 0.15
    mask_token_id: int | None = None
    special_ids: list[int] = field(default_factory=list)
    vocab_size: int = 0

    @property
    def needs_teacher(self) -> bool:
        return self.weights.get("distill", 0) > 0

    @property
    def needs_hidden(self) -> bool:
        return self.needs_teacher and self.hidden_weight > 0

    def check(self) -> None:
        if self.weights.get("lm", 0) > 0 and self.kind == "encoder":
            raise NormswapError("the student has no LM head (a bare encoder), so it has no lm loss: use --objective distill")
        if self.kind == "masked" and self.mask_token_id is None and self.weights.get("lm", 0) > 0:
            raise NormswapError("masked-LM loss needs a tokenizer with a mask token")
        if self.kind == "encoder" and self.needs_teacher and self.hidden_weight <= 0 and self.pooled_weight <= 0:
            raise NormswapError("a bare encoder has no logits: distill it with --hidden-weight or --pooled-weight > 0")
        if self.temperature <= 0:
            raise NormswapError("--temperature must be > 0")

    def prepare(self, batch: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
        """Add what the loss needs to a batch: for masked LMs, a seeded 15% mask and its labels."""
        if self.kind != "masked" or self.mask_token_id is None:
            return batch
        ids, attn = batch["input_ids"], batch["attention_mask"]
        g = torch.Generator().manual_seed(seed)
        candidates = attn.bool() & ~torch.isin(ids, torch.tensor(self.special_ids or [-1]))
        chosen = (torch.rand(ids.shape, generator=g) < self.mask_prob) & candidates
        labels = torch.where(chosen, ids, torch.full_like(ids, -100))
        r = torch.rand(ids.shape, generator=g)
        rand_ids = torch.randint(0, max(1, self.vocab_size), ids.shape, generator=g)
        masked = torch.where(chosen & (r < 0.8), torch.full_like(ids, self.mask_token_id), ids)
        masked = torch.where(chosen & (r >= 0.8) & (r < 0.9), rand_ids, masked)
        return {"input_ids": masked, "attention_mask": attn, "labels": labels}

    def loss(self, student: nn.Module, teacher: nn.Module | None, batch: dict[str, torch.Tensor], *,
             with_lm: bool = False) -> tuple[torch.Tensor, dict[str, float]]:
        """The weighted loss and its parts (as floats, for logging).

        With `with_lm`, the LM loss is reported even when its weight is 0 (validation of a distilled
        LM reports its perplexity too).
        """
        inputs = self.model_inputs(batch)
        s_out = student(**inputs, output_hidden_states=self.needs_hidden)
        if self.kind == "encoder" and self.needs_teacher and self.pooled_weight > 0 and getattr(s_out, "last_hidden_state", None) is None:
            raise NormswapError("the student returns neither logits nor hidden states")
        parts: dict[str, torch.Tensor] = {}
        has_lm_labels = self.kind in ("causal", "speech") or (self.kind == "masked" and "labels" in batch)
        if self.weights.get("lm", 0) > 0 or (with_lm and has_lm_labels):
            parts["lm"] = lm_loss(s_out.logits, batch, self.kind)
        if self.needs_teacher:
            if teacher is None:
                raise NormswapError("the distill objective needs --teacher")
            with torch.no_grad():
                t_out = teacher(**inputs, output_hidden_states=self.needs_hidden)
            parts["distill"] = self._distill(s_out, t_out, loss_mask(batch))
        total = sum(self.weights.get(k, 0.0) * v for k, v in parts.items())
        return total, {k: float(v.detach()) for k, v in parts.items()}

    def model_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        """What the model is called with (speech: features and teacher-forced decoder ids, no cache)."""
        if self.kind == "speech":
            return {"input_features": batch["input_features"], "decoder_input_ids": batch["decoder_input_ids"], "use_cache": False}
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def _distill(self, s_out: Any, t_out: Any, mask: torch.Tensor) -> torch.Tensor:
        terms = []
        if self.kind != "encoder":
            terms.append(kl_loss(s_out.logits, t_out.logits, mask, self.temperature))
        if self.needs_hidden:
            if self.kind == "speech":  # the audio encoder, every frame
                pair, h_mask = (s_out.encoder_hidden_states, t_out.encoder_hidden_states), None
            else:
                pair, h_mask = (s_out.hidden_states, t_out.hidden_states), mask
            terms.append(self.hidden_weight * hidden_mse(*pair, h_mask, center=self.center_hidden))
        if self.kind == "encoder" and self.pooled_weight > 0:
            terms.append(self.pooled_weight * relative_mse(mean_pool(s_out.last_hidden_state, mask),
                                                          mean_pool(t_out.last_hidden_state, mask)))
        return sum(terms)


def loss_mask(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The positions a loss counts: the attention mask of text, the labelled decoder positions of
    speech (label -100: padding and the forced prompt)."""
    if "attention_mask" in batch:
        return batch["attention_mask"]
    return (batch["labels"] != -100).long()


def lm_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    """Next-token CE (causal, padding ignored) or CE on the labelled positions (masked: the masked
    tokens; speech: the teacher-forced transcript's next tokens)."""
    if kind == "causal":
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
    labels = batch["labels"]
    if not (labels != -100).any():  # a batch where nothing was masked: zero loss, graph kept
        return logits.sum() * 0.0
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)


def kl_loss(s_logits: torch.Tensor, t_logits: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)), averaged over the non-padding tokens."""
    s = F.log_softmax(s_logits.float() / temperature, dim=-1)
    t = F.log_softmax(t_logits.float() / temperature, dim=-1)
    kl = (t.exp() * (t - s)).sum(-1)
    m = mask.to(kl.dtype)
    return temperature ** 2 * (kl * m).sum() / m.sum().clamp_min(1)


def relative_mse(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """||s - t||^2 / ||t||^2 over the (masked) tokens: scale-free, so layers weigh alike."""
    d = (s.float() - t.float()).pow(2).sum(-1)
    n = t.float().pow(2).sum(-1)
    if mask is not None:
        m = mask.to(d.dtype)
        d, n = d * m, n * m
    return d.sum() / n.sum().clamp_min(1e-12)


def hidden_mse(s_hidden: tuple[torch.Tensor, ...], t_hidden: tuple[torch.Tensor, ...], mask: torch.Tensor | None, *,
               center: bool) -> torch.Tensor:
    """Mean over layers of the relative MSE between hidden states (centred for Pre-LN conversions)."""
    if len(s_hidden) != len(t_hidden):
        raise NormswapError(f"hidden-state distillation needs as many layers in student and teacher ({len(s_hidden)} vs {len(t_hidden)})")
    pairs = list(zip(s_hidden, t_hidden))
    if center:
        pairs = pairs[:-1]  # the final norm's output: its affine may live in the head now
    losses = []
    for s, t in pairs:
        if s.shape != t.shape:
            raise NormswapError(f"hidden-state distillation needs equal hidden sizes ({s.shape[-1]} vs {t.shape[-1]})")
        if center:
            s, t = s - s.mean(-1, keepdim=True), t - t.mean(-1, keepdim=True)
        losses.append(relative_mse(s, t, mask))
    return torch.stack(losses).mean()


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of token vectors over the attention mask (sentence-transformers' mean pooling)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1)
