"""Modern decoders that already use RMSNorm (`w * x / rms(x)`, no centring, no bias).

`--to rmsnorm` keeps each norm's function (normswap's RMSNorm, same eps) and with `--fold` moves its
gain into the readers listed here (design notes 2.5: exact, as FlashNorm and SliceGPT do); `--to dyt`
calibrates. The readers are every linear that consumes the norm's output (checked by a forward
hook in tests/test_archs.py): a reader missing from a table would make folding wrong."""
from __future__ import annotations

from normswap.archs.spec import Family, NormSpec

LLAMA = Family(
    model_type="llama",
    style="pre",
    norm_kind="rmsnorm",
    blocks="layers",
    block_norms=(
        NormSpec("input_layernorm", "pre", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        NormSpec("post_attention_layernorm", "pre", ("mlp.gate_proj", "mlp.up_proj")),
    ),
    block_writers=("self_attn.o_proj", "mlp.down_proj"),
    embed_writers=("embed_tokens",),
    model_norms=(NormSpec("norm", "final", ("@head",)),),
    token_wise=("mlp",),  # SwiGLU: down(act(gate(x)) * up(x)), token by token
)
MISTRAL = LLAMA.but(model_type="mistral")
QWEN2 = LLAMA.but(model_type="qwen2")
# Gemma's RMSNorm multiplies by (1 + w) (in float32): the gain that folds, or that DyT starts from,
# is 1 + w. Its head is tied to embed_tokens by default, so the final norm's gain folds only with
# --tied-head untie.
GEMMA = LLAMA.but(model_type="gemma", gain_offset=1.0, notes="Norm weight used as (1 + w); embeddings scaled by sqrt(d).")

FAMILIES = (LLAMA, MISTRAL, QWEN2, GEMMA)
