"""Causal decoders. All Pre-LN except OPT-350m's flavour (`do_layer_norm_before=False`)."""
from __future__ import annotations

from typing import Any

from normswap.archs.spec import Family, NormSpec

GPT2 = Family(
    model_type="gpt2",
    style="pre",
    blocks="h",
    block_norms=(
        NormSpec("ln_1", "pre", ("attn.c_attn",)),
        NormSpec("ln_2", "pre", ("mlp.c_fc",)),
    ),
    block_writers=("attn.c_proj", "mlp.c_proj"),
    embed_writers=("wte", "wpe"),
    model_norms=(NormSpec("ln_f", "final", ("@head",)),),
    notes="Linears are transformers' Conv1D: weight stored [in, out]. Head tied to wte.",
    token_wise=("mlp",),
)

GPT_NEOX = Family(
    model_type="gpt_neox",
    style="pre",
    blocks="layers",
    # With use_parallel_residual (Pythia) both norms read the same stream x; without it the MLP
    # norm reads x + attn(x). Either way each norm has one reader and the writers are the same.
    block_norms=(
        NormSpec("input_layernorm", "pre", ("attention.query_key_value",)),
        NormSpec("post_attention_layernorm", "pre", ("mlp.dense_h_to_4h",)),
    ),
    block_writers=("attention.dense", "mlp.dense_4h_to_h"),
    embed_writers=("embed_in",),
    model_norms=(NormSpec("final_layer_norm", "final", ("@head",)),),
    notes="Pythia: parallel residual, rotary positions (no position embedding), untied head.",
    token_wise=("mlp",),
)

GPTJ = Family(
    model_type="gptj",
    style="pre",
    blocks="h",
    # Parallel block: one norm feeds attention and MLP alike.
    block_norms=(NormSpec("ln_1", "pre", ("attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.fc_in")),),
    block_writers=("attn.out_proj", "mlp.fc_out"),
    embed_writers=("wte",),
    model_norms=(NormSpec("ln_f", "final", ("@head",)),),
    notes="q/k/v have no bias: folding a norm bias gives them one. Head untied, with bias.",
    token_wise=("mlp",),
)

PHI = Family(
    model_type="phi",
    style="pre",
    blocks="layers",
    # Parallel block like GPT-J. Optional q/k layernorms (qk_layernorm) act on heads, not on the
    # residual stream, and are left alone.
    block_norms=(
        NormSpec("input_layernorm", "pre", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.fc1")),
    ),
    block_writers=("self_attn.dense", "mlp.fc2"),
    embed_writers=("embed_tokens",),
    model_norms=(NormSpec("final_layernorm", "final", ("@head",)),),
    token_wise=("mlp",),
)

_BLOOM_BASE = Family(
    model_type="bloom",
    style="pre",
    blocks="h",
    block_norms=(
        NormSpec("input_layernorm", "pre", ("self_attention.query_key_value",)),
        NormSpec("post_attention_layernorm", "pre", ("mlp.dense_h_to_4h",)),
    ),
    block_writers=("self_attention.dense", "mlp.dense_4h_to_h"),
    # The stream starts at word_embeddings_layernorm's output, not at the lookup: the lookup is
    # centred so that norm is exact too, and the norm re-centres its own output (ALiBi: no
    # position embedding).
    embed_writers=("word_embeddings",),
    model_norms=(
        # Read by the first block's input_layernorm (and the residual add), not by a linear.
        NormSpec("word_embeddings_layernorm", "embed", ()),
        NormSpec("ln_f", "final", ("@head",)),
    ),
    notes="Head tied to word_embeddings.",
)


def _bloom_variant(config: Any) -> Family:
    # apply_residual_connection_post_layernorm=True makes each norm's output the residual, as in
    # Post-LN: then no weight change can centre the stream.
    if getattr(config, "apply_residual_connection_post_layernorm", False):
        return _BLOOM_BASE.but(style="post", block_norms=tuple(n.but_placement("post") for n in _BLOOM_BASE.block_norms))
    return _BLOOM_BASE


BLOOM = _BLOOM_BASE.but(variant=_bloom_variant)

_FALCON_BASE = Family(
    model_type="falcon",
    style="pre",
    blocks="h",
    block_norms=(
        NormSpec("input_layernorm", "pre", ("self_attention.query_key_value", "mlp.dense_h_to_4h")),
    ),
    block_writers=("self_attention.dense", "mlp.dense_4h_to_h"),
    embed_writers=("word_embeddings",),
    model_norms=(NormSpec("ln_f", "final", ("@head",)),),
    notes="Linears have no bias by default: folding a norm bias gives them one.",
)


def _falcon_variant(config: Any) -> Family:
    # Three layouts: parallel with one shared norm (7b), parallel with separate attention and MLP
    # norms (new_decoder_architecture, 40b/180b), and sequential (parallel_attn=False).
    two_norms = getattr(config, "new_decoder_architecture", False) and (getattr(config, "num_ln_in_parallel_attn", None) or 2) == 2
    if not getattr(config, "parallel_attn", True):
        return _FALCON_BASE.but(block_norms=(
            NormSpec("input_layernorm", "pre", ("self_attention.query_key_value",)),
            NormSpec("post_attention_layernorm", "pre", ("mlp.dense_h_to_4h",)),
        ))
    if two_norms:
        return _FALCON_BASE.but(block_norms=(
            NormSpec("ln_attn", "pre", ("self_attention.query_key_value",)),
            NormSpec("ln_mlp", "pre", ("mlp.dense_h_to_4h",)),
        ))
    return _FALCON_BASE


FALCON = _FALCON_BASE.but(variant=_falcon_variant)

_OPT_PRE = Family(
    model_type="opt",
    style="pre",
    blocks="decoder.layers",
    block_norms=(
        NormSpec("self_attn_layer_norm", "pre", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        NormSpec("final_layer_norm", "pre", ("fc1",)),
    ),
    block_writers=("self_attn.out_proj", "fc2"),
    # project_in exists when word_embed_proj_dim != hidden_size: then it, not the lookup, writes
    # the stream.
    embed_writers=("decoder.embed_tokens", "decoder.embed_positions"),
    model_norms=(NormSpec("decoder.final_layer_norm", "final", ("@head",)),),
    notes="Head tied to embed_tokens.",
)

_OPT_POST = _OPT_PRE.but(
    style="post",
    # OPT-350m: each norm follows its residual add; its output feeds the next sublayer and the stream.
    block_norms=(
        NormSpec("self_attn_layer_norm", "post", ("fc1",)),
        NormSpec("final_layer_norm", "post", (">self_attn.q_proj", ">self_attn.k_proj", ">self_attn.v_proj", "^decoder.project_out?")),
    ),
    model_norms=(),
    notes="Post-LN flavour (do_layer_norm_before=False, e.g. opt-350m): no final norm, project_in/out.",
)


def _opt_variant(config: Any) -> Family:
    family = _OPT_PRE if getattr(config, "do_layer_norm_before", True) else _OPT_POST
    if getattr(config, "word_embed_proj_dim", config.hidden_size) != config.hidden_size:
        # project_in reads the lookup and writes the stream, so it is the writer to centre (centring
        # the lookup would not centre its output); project_out, not the head, reads the final norm.
        family = family.but(embed_writers=("decoder.project_in", "decoder.embed_positions"))
        if family.model_norms:
            family = family.but(model_norms=(NormSpec("decoder.final_layer_norm", "final", ("decoder.project_out",)),))
    return family


OPT = _OPT_PRE.but(variant=_opt_variant)

FAMILIES = (GPT2, GPT_NEOX, GPTJ, PHI, BLOOM, FALCON, OPT)
