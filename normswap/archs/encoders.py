"""Encoders: the BERT family (Post-LN) and ViT (Pre-LN)."""
from __future__ import annotations

from normswap.archs.spec import Family, NormSpec

# BERT-style Post-LN: h = LN(x + F(x)). The norm's output *is* the residual stream, so its mean
# cannot be removed by weight changes and RMSNorm/DyT are approximations recovered by training.
# Readers are listed for inspection (and the hook check); they are never folded into, because the
# residual path reads the same output.
BERT = Family(
    model_type="bert",
    style="post",
    blocks="encoder.layer",
    block_norms=(
        NormSpec("attention.output.LayerNorm", "post", ("intermediate.dense",)),
        NormSpec("output.LayerNorm", "post", (">attention.self.query", ">attention.self.key", ">attention.self.value", "^pooler.dense?")),
    ),
    block_writers=("attention.output.dense", "output.dense"),
    embed_writers=("embeddings.word_embeddings", "embeddings.position_embeddings", "embeddings.token_type_embeddings"),
    model_norms=(NormSpec("embeddings.LayerNorm", "embed", ("encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.key", "encoder.layer.0.attention.self.value")),),
    head_norms=(NormSpec("cls.predictions.transform.LayerNorm", "head", ("cls.predictions.decoder",)),),
    notes="A few hidden dimensions carry very large LN weights and biases (outliers): kept, never clipped.",
    token_wise=("intermediate",),  # dense + activation (BertOutput holds a norm)
)

ROBERTA = BERT.but(
    model_type="roberta",
    head_norms=(NormSpec("lm_head.layer_norm", "head", ("lm_head.decoder",)),),
)
XLM_ROBERTA = ROBERTA.but(model_type="xlm-roberta")

ELECTRA = BERT.but(
    model_type="electra",
    # embeddings_project maps embedding_size -> hidden_size when they differ (small/base discriminators).
    model_norms=(NormSpec("embeddings.LayerNorm", "embed", ("embeddings_project?", "encoder.layer.0.attention.self.query")),),
    head_norms=(NormSpec("generator_predictions.LayerNorm", "head", ("generator_lm_head",)),),
)

DISTILBERT = Family(
    model_type="distilbert",
    style="post",
    blocks="transformer.layer",
    block_norms=(
        NormSpec("sa_layer_norm", "post", ("ffn.lin1",)),
        NormSpec("output_layer_norm", "post", (">attention.q_lin", ">attention.k_lin", ">attention.v_lin")),
    ),
    block_writers=("attention.out_lin", "ffn.lin2"),
    embed_writers=("embeddings.word_embeddings", "embeddings.position_embeddings"),
    model_norms=(NormSpec("embeddings.LayerNorm", "embed", ("transformer.layer.0.attention.q_lin",)),),
    head_norms=(NormSpec("vocab_layer_norm", "head", ("vocab_projector",)),),
)

# ViT is Pre-LN; the patch embedding is a conv, and the CLS token and position embeddings are bare
# parameters: all of them write the stream and are centred over the hidden dimension.
VIT = Family(
    model_type="vit",
    style="pre",
    blocks="layers",
    block_norms=(
        NormSpec("layernorm_before", "pre", ("attention.q_proj", "attention.k_proj", "attention.v_proj")),
        NormSpec("layernorm_after", "pre", ("mlp.fc1",)),
    ),
    block_writers=("attention.o_proj", "mlp.fc2"),
    embed_writers=("embeddings.patch_embeddings.projection", "embeddings.cls_token", "embeddings.position_embeddings", "embeddings.mask_token?"),
    # The final norm's output is last_hidden_state itself (pooler and classifier read only the CLS
    # row): it keeps its affine, and is exact as an affine RMSNorm.
    model_norms=(NormSpec("layernorm", "final", ("^pooler.dense?", "/classifier?"), foldable=False),),
)

FAMILIES = (BERT, ROBERTA, XLM_ROBERTA, ELECTRA, DISTILBERT, VIT)
