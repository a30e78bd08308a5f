"""Tiny random models (hidden 32, 2 layers) of Hugging Face architectures that have NO normswap table.

A test zoo for discovery: normswap must find the norms, their readers and the residual-stream
writers from the model itself. Same conventions as tiny_models.py (seeded, vocab 100, norm affines
and biases randomised, embeddings given a non-zero mean); fixed buffers-as-parameters (sinusoidal
position tables, requires_grad False) are left as they are.
"""
from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM

from tiny_models import randomise

VOCAB = 100

_DEC = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
_S2S = dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
            encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64)
_VIS = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8)

# (model_type, config kwargs, auto class)
UNTABLED: dict[str, tuple[str, dict, type]] = {
    # ---- LayerNorm Pre-LN decoders
    # gpt2-like names (ln_1/ln_2/ln_f, wte/wpe) but nn.Linear not Conv1D, alternating global/local attention
    "gpt_neo": ("gpt_neo", dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_position_embeddings=64,
                                attention_types=[[["global", "local"], 1]], window_size=8), AutoModelForCausalLM),
    # multi-query attention: one fused c_attn writes q (32) plus a single shared k/v head (2 x 16)
    "gpt_bigcode": ("gpt_bigcode", dict(n_embd=32, n_layer=2, n_head=2, n_inner=64, n_positions=64), AutoModelForCausalLM),
    # parallel block (one ln_1 read by both attention and MLP, like GPT-J) with a fused qkv_proj in mp_num-interleaved order
    "codegen": ("codegen", dict(n_embd=32, n_layer=2, n_head=2, n_inner=64, n_positions=64, n_ctx=64, rotary_dim=8), AutoModelForCausalLM),
    # BART-style decoder names (self_attn_layer_norm, final_layer_norm, layer_norm) and scaled token embeddings (sqrt(d))
    "biogpt": ("biogpt", dict(_DEC), AutoModelForCausalLM),
    # sinusoidal positions held in a buffer (no parameter writes them), scaled embeddings, fairseq names
    "xglm": ("xglm", dict(d_model=32, num_layers=2, attention_heads=2, ffn_dim=64, max_position_embeddings=64), AutoModelForCausalLM),
    # per-head q/k LayerNorm over head_dim (read only by attention scores, off the residual stream), partial rotary (0.5)
    "persimmon": ("persimmon", dict(_DEC, qk_layernorm=True), AutoModelForCausalLM),
    # LayerNorm Llama-like block (gated MLP) with GQA
    "stablelm": ("stablelm", dict(_DEC, num_key_value_heads=1), AutoModelForCausalLM),
    # stablelm with q/k/v biases and per-head q/k LayerNorms (StableLmLayerNormPerHead: a ModuleList of LayerNorms)
    "stablelm-qk": ("stablelm", dict(_DEC, num_key_value_heads=1, use_qkv_bias=True, qk_layernorm=True), AutoModelForCausalLM),
    # stablelm with a parallel residual (attention and MLP both read input_layernorm)
    "stablelm-par": ("stablelm", dict(_DEC, num_key_value_heads=1, use_parallel_residual=True), AutoModelForCausalLM),
    # OlmoLayerNorm: a custom class with NO affine parameters at all (nothing to find by parameter shape)
    "olmo": ("olmo", dict(_DEC, num_key_value_heads=1), AutoModelForCausalLM),
    # CohereLayerNorm (custom class, weight only, mean-subtracting), parallel block, tied head with logit_scale
    "cohere": ("cohere", dict(_DEC, num_key_value_heads=1, logit_scale=0.5), AutoModelForCausalLM),
    # cohere with per-head q/k norms (CohereLayerNorm of shape [heads, head_dim])
    "cohere-qk": ("cohere", dict(_DEC, num_key_value_heads=1, logit_scale=0.5, use_qk_norm=True), AutoModelForCausalLM),
    # nn.LayerNorm without bias (no_bias=True), ALiBi (no position embeddings), fused Wqkv, tied head
    "mpt": ("mpt", dict(d_model=32, n_layers=2, n_heads=2, expansion_ratio=2, max_seq_len=64), AutoModelForCausalLM),
    # text tower of CLIP: base model (no LM head), causal mask, final_layer_norm read by an eos-position pooler (eos 0 here)
    "clip_text": ("clip_text_model", dict(_DEC), AutoModel),
    # ---- LayerNorm Pre-LN encoder-decoders
    # layernorm_embedding right after the embeddings plus a final layer_norm per stack; tied shared embeddings
    "mbart": ("mbart", dict(_S2S, pad_token_id=1, decoder_start_token_id=2), AutoModelForSeq2SeqLM),
    # sinusoidal positions as frozen parameters (requires_grad False), final layer_norm per stack, decoder starts on pad
    "pegasus": ("pegasus", dict(_S2S, pad_token_id=1, decoder_start_token_id=1), AutoModelForSeq2SeqLM),
    # sinusoidal positions in a buffer, scaled embeddings, final layer_norm per stack
    "m2m_100": ("m2m_100", dict(_S2S, pad_token_id=1, decoder_start_token_id=2), AutoModelForSeq2SeqLM),
    # ---- Post-LN untabled
    # Post-LN encoder-decoder with layernorm_embedding (the stream is normalised after every sublayer)
    "bart": ("bart", dict(_S2S, pad_token_id=1, decoder_start_token_id=2), AutoModelForSeq2SeqLM),
    # Post-LN encoder-decoder with NO embedding norm: the stream enters block 0 un-normalised; sinusoidal positions
    "marian": ("marian", dict(_S2S, pad_token_id=1, decoder_start_token_id=1, decoder_vocab_size=VOCAB), AutoModelForSeq2SeqLM),
    # ---- Vision Pre-LN
    # ViT-like names but an extra distillation token (two prepended tokens), base model with pooler
    "deit": ("deit", dict(_VIS), AutoModel),
    # layer scale (lambda1 vectors scale every writer's output), position interpolation, final layernorm
    "dinov2": ("dinov2", dict(_VIS), AutoModel),
    # layer scale (lambda_1/lambda_2), relative position bias, mean pooling through a pooler LayerNorm
    "beit": ("beit", dict(_VIS, use_mean_pooling=True, use_relative_position_bias=True, layer_scale_init_value=0.1), AutoModel),
    # no cls token, post_layernorm then an attention-pooling head with its own LayerNorm (a norm read by a pooler MLP)
    "siglip_vision": ("siglip_vision_model", dict(_VIS), AutoModel),
    # ---- RMSNorm untabled (bonus)
    # Qwen2-like with per-head q_norm/k_norm RMSNorms (head_dim 16), read only by the attention scores
    "qwen3": ("qwen3", dict(_DEC, num_key_value_heads=1, head_dim=16), AutoModelForCausalLM),
    # norms AFTER the sublayers (post_attention_layernorm / post_feedforward_layernorm on the branch output) plus q/k norms over all heads
    "olmo2": ("olmo2", dict(_DEC, num_key_value_heads=1), AutoModelForCausalLM),
    # Llama-like with fused qkv_proj and fused gate_up_proj (one reader split into several roles)
    "phi3": ("phi3", dict(_DEC, num_key_value_heads=1, pad_token_id=0), AutoModelForCausalLM),
    # T5LayerNorm: named LayerNorm but an RMSNorm (no mean, no bias), relative position bias, tied head after a d_model**-0.5 scale
    "t5": ("t5", dict(d_model=32, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=2, pad_token_id=1,
                      decoder_start_token_id=1), AutoModelForSeq2SeqLM),
}

VISION = ["deit", "dinov2", "beit", "siglip_vision"]
SEQ2SEQ = ["mbart", "pegasus", "m2m_100", "bart", "marian", "t5"]
RMS_UNTABLED = ["qwen3", "olmo2", "phi3", "t5"]
POST_LN_UNTABLED = ["bart", "marian"]


def untabled_model(name: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny random model of an untabled architecture; norm weights and biases are randomised too.
    `overrides` change config fields."""
    model_type, kwargs, auto = UNTABLED[name]
    kwargs = dict(kwargs, **overrides)
    if name not in VISION:
        kwargs.setdefault("vocab_size", VOCAB)
        for key in ("bos_token_id", "eos_token_id"):
            kwargs.setdefault(key, 0)
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    return randomise(auto.from_config(config), keep_frozen=True).eval()


def untabled_inputs(model: torch.nn.Module, batch: int = 2, length: int = 12, seed: int = 1) -> dict[str, torch.Tensor]:
    """input_ids (and decoder_input_ids for text encoder-decoders), or pixel_values for image models."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    if getattr(model, "main_input_name", "input_ids") == "pixel_values":
        return {"pixel_values": torch.randn(batch, getattr(cfg, "num_channels", 3), cfg.image_size, cfg.image_size, generator=g)}
    out = {"input_ids": torch.randint(3, VOCAB, (batch, length), generator=g)}
    if getattr(cfg, "is_encoder_decoder", False):
        out["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, length), generator=g)
    return out
