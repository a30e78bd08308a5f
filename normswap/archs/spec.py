"""The shape of per-architecture knowledge: which norms a family has, who reads them, who writes
the residual stream.

Paths are relative, so one table serves every head class of a family (GPT2Model, GPT2LMHeadModel,
GPT2ForSequenceClassification...):
- block-level names are relative to one transformer block (`Family.blocks` lists the blocks);
- model-level names are relative to the base model (`model.base_model`);
- head-level names are relative to the root model.
Reader names use a small prefix notation, resolved in `normswap.archs.plan`:
    "attn.c_attn"   same scope as the norm (its block, or the base model)
    ">attention.q"  the next block (a Post-LN norm's output feeds the next block)
    "^pooler.dense" relative to the base model (for a block norm: the last block's only)
    "/classifier"   relative to the root model
    "@head"         the model's output embeddings (LM head), if it has one
    "*dec:q_proj"   that name in every block of the stack called "dec" (cross-attention: every
                    decoder block's k/v projections read the encoder's final norm)
A trailing "?" marks a name that some configurations lack.

Most families have one residual stream, described by the Family's own fields. Encoder-decoders
have two: the Family's fields describe the first (the encoder), `extra_stacks` the others, each a
`Stack` with the same fields, its paths also relative to the base model.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Literal

Placement = Literal["pre", "post", "final", "embed", "head"]


@dataclass(frozen=True)
class NormSpec:
    """One norm in the family table."""

    name: str
    placement: Placement
    readers: tuple[str, ...] = ()
    # False where the norm's output is itself visible (e.g. ViT's final norm is last_hidden_state),
    # so its affine cannot move into the readers without changing the model's output.
    foldable: bool = True

    def but_placement(self, placement: Placement) -> "NormSpec":
        return replace(self, placement=placement)


@dataclass(frozen=True)
class Stack:
    """One residual stream: its blocks, their norms and writers, and what starts it."""

    name: str  # how readers of other stacks name it ("*name:..."); "" for a family's only stream
    blocks: str
    block_norms: tuple[NormSpec, ...]
    block_writers: tuple[str, ...]
    embed_writers: tuple[str, ...] = ()
    model_norms: tuple[NormSpec, ...] = ()
    # True where the stream starts at a sum that no weight change can centre (Whisper's encoder:
    # gelu(conv2(x)) + positions): the first block's input gets one explicit mean subtraction,
    # recorded like the centred embedding lookups.
    centre_input: bool = False
    token_wise: tuple[str, ...] = ()  # see Family.token_wise


@dataclass(frozen=True)
class Family:
    """Everything normswap knows about one `config.model_type`."""

    model_type: str
    style: Literal["pre", "post"]  # Pre-LN: norms read the residual stream; Post-LN: norms are the stream
    blocks: str  # ModuleList of transformer blocks, relative to the base model
    block_norms: tuple[NormSpec, ...]
    block_writers: tuple[str, ...]  # sublayer output projections that add into the stream
    embed_writers: tuple[str, ...]  # embeddings (modules or parameters) that start the stream
    model_norms: tuple[NormSpec, ...] = ()  # embed / final norms on the base model
    head_norms: tuple[NormSpec, ...] = ()  # norms inside task heads (relative to the root)
    norm_kind: Literal["layernorm", "rmsnorm"] = "layernorm"
    # The norms scale by (gain_offset + weight): 0 for the usual `weight * x_hat`, 1 for Gemma,
    # which stores w and multiplies by (1 + w). Folding and DyT read the gain through it.
    gain_offset: float = 0.0
    notes: str = ""
    stack_name: str = ""  # the name of the stream the fields above describe (see Stack.name)
    centre_input: bool = False  # see Stack.centre_input
    # Block submodules (block-level names) that act on each token alone, with no norm inside: the
    # feed-forward. Block-wise passes run them a slice of tokens at a time, which bounds their
    # intermediate activations (a SwiGLU MLP holds about three [tokens, 4d] tensors at once).
    token_wise: tuple[str, ...] = ()
    extra_stacks: tuple[Stack, ...] = ()  # further streams (the decoder of an encoder-decoder)
    # Families whose layout depends on config flags (OPT's do_layer_norm_before, Falcon's
    # parallel_attn) give a function that returns the right variant for a config.
    variant: Callable[[Any], "Family"] | None = field(default=None, compare=False, repr=False)

    def for_config(self, config: Any) -> "Family":
        """The table for this particular config (resolving flag-dependent variants)."""
        return self.variant(config) if self.variant is not None else self

    @property
    def stacks(self) -> tuple[Stack, ...]:
        """Every residual stream, in forward order (the Family's own fields first)."""
        main = Stack(self.stack_name, self.blocks, self.block_norms, self.block_writers, self.embed_writers,
                     self.model_norms, self.centre_input, self.token_wise)
        return (main, *self.extra_stacks)

    def but(self, **changes: Any) -> "Family":
        """A copy with some fields changed (used to declare variants and related families)."""
        return replace(self, **changes)
