"""Tiny random models (hidden 32, 2 layers) of every supported family, built in-process."""
from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSpeechSeq2Seq

VOCAB = 100

# (model_type, config kwargs, auto class)
TINY: dict[str, tuple[str, dict, type]] = {
    "gpt2": ("gpt2", dict(n_embd=32, n_layer=2, n_head=2, n_positions=64), AutoModelForCausalLM),
    "gpt_neox": ("gpt_neox", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=64), AutoModelForCausalLM),
    "gpt_neox-seq": ("gpt_neox", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=64, use_parallel_residual=False), AutoModelForCausalLM),
    "gptj": ("gptj", dict(n_embd=32, n_layer=2, n_head=2, n_positions=64, rotary_dim=8), AutoModelForCausalLM),
    "opt": ("opt", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, ffn_dim=64, max_position_embeddings=64, word_embed_proj_dim=32), AutoModelForCausalLM),
    "opt-proj": ("opt", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, ffn_dim=64, max_position_embeddings=64, word_embed_proj_dim=16), AutoModelForCausalLM),
    "opt-post": ("opt", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, ffn_dim=64, max_position_embeddings=64, word_embed_proj_dim=16, do_layer_norm_before=False), AutoModelForCausalLM),
    "phi": ("phi", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=64), AutoModelForCausalLM),
    "bloom": ("bloom", dict(hidden_size=32, n_layer=2, n_head=2), AutoModelForCausalLM),
    "falcon": ("falcon", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2), AutoModelForCausalLM),
    "falcon-new": ("falcon", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_kv_heads=2, new_decoder_architecture=True), AutoModelForCausalLM),
    "falcon-seq": ("falcon", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, parallel_attn=False, bias=True), AutoModelForCausalLM),
    "vit": ("vit", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8), AutoModel),
    "bert": ("bert", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64), AutoModelForMaskedLM),
    "roberta": ("roberta", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, pad_token_id=1), AutoModelForMaskedLM),
    "distilbert": ("distilbert", dict(dim=32, n_layers=2, n_heads=2, hidden_dim=64), AutoModelForMaskedLM),
    "electra": ("electra", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, embedding_size=32), AutoModelForMaskedLM),
    "xlm-roberta": ("xlm-roberta", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, pad_token_id=1), AutoModelForMaskedLM),
    "llama": ("llama", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=64), AutoModelForCausalLM),
    "mistral": ("mistral", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, intermediate_size=64, max_position_embeddings=64), AutoModelForCausalLM),
    "qwen2": ("qwen2", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, intermediate_size=64, max_position_embeddings=64), AutoModelForCausalLM),
    "gemma": ("gemma", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16, intermediate_size=64, max_position_embeddings=64), AutoModelForCausalLM),
    # speech encoder-decoder: 8 mel bins, 32 input frames (2 x max_source_positions)
    "whisper": ("whisper", dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
                                encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8, max_source_positions=16, max_target_positions=64,
                                decoder_start_token_id=1, pad_token_id=2), AutoModelForSpeechSeq2Seq),
}
RMS_MODELS = ["llama", "mistral", "qwen2", "gemma"]

PRE_LN = ["gpt2", "gpt_neox", "gpt_neox-seq", "gptj", "opt", "opt-proj", "phi", "bloom", "falcon", "falcon-new", "falcon-seq", "vit", "whisper"]
POST_LN = ["bert", "roberta", "distilbert", "electra", "xlm-roberta", "opt-post"]


def tiny_model(name: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny random model; norm weights and biases are randomised too, so folding is exercised.
    `overrides` change config fields (e.g. tie_word_embeddings=True)."""
    model_type, kwargs, auto = TINY[name]
    kwargs = dict(kwargs, **overrides)
    if model_type != "vit":
        kwargs.setdefault("vocab_size", VOCAB)
    for key in ("bos_token_id", "eos_token_id"):
        kwargs.setdefault(key, 0)
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    return randomise(auto.from_config(config)).eval()


def randomise(model: torch.nn.Module, keep_frozen: bool = False) -> torch.nn.Module:
    """Norm affines and biases made non-trivial (so folding is exercised) and embeddings given a
    non-zero mean (so centring is); `keep_frozen` leaves fixed tables (sinusoidal positions) as built."""
    with torch.no_grad():
        for name_, p in model.named_parameters():
            if keep_frozen and not p.requires_grad:
                continue
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if name_.endswith("weight") else 0.0))
            elif "embed" in name_ or "wte" in name_ or "wpe" in name_ or name_.endswith("shared.weight"):
                p.add_(torch.randn_like(p) * 0.05 + 0.02)
    return model


def model_output(model: torch.nn.Module, x: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits, or the last hidden state of a model without a head."""
    with torch.no_grad():
        o = model(**x)
    return o.logits if getattr(o, "logits", None) is not None else o.last_hidden_state


def rel_error(ref: torch.Tensor, got: torch.Tensor) -> float:
    """max |got - ref| / max |ref|."""
    return float((got - ref).abs().max() / ref.abs().max())


def tiny_inputs(model: torch.nn.Module, batch: int = 2, length: int = 12, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if model.config.model_type == "vit":
        return {"pixel_values": torch.randn(batch, 3, 32, 32, generator=g)}
    if model.config.model_type == "whisper":
        cfg = model.config
        return {"input_features": torch.randn(batch, cfg.num_mel_bins, 2 * cfg.max_source_positions, generator=g),
                "decoder_input_ids": torch.randint(3, VOCAB, (batch, length), generator=g)}
    return {"input_ids": torch.randint(3, VOCAB, (batch, length), generator=g)}
