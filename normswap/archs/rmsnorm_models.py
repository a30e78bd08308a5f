"""Modern decoders that already use RMSNorm: only DyT conversion applies to them."""
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
)
MISTRAL = LLAMA.but(model_type="mistral")
QWEN2 = LLAMA.but(model_type="qwen2")
# Gemma's RMSNorm multiplies by (1 + w): normswap reads each norm's effect from data (calibration),
# so the offset needs no special case.
GEMMA = LLAMA.but(model_type="gemma", notes="Norm weight used as (1 + w); embeddings scaled by sqrt(d).")

FAMILIES = (LLAMA, MISTRAL, QWEN2, GEMMA)
