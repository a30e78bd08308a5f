"""Synthetic checkpoints for the scale benchmarks: a model's config and random weights written as
sharded safetensors, one tensor at a time (never the whole model in memory), in any dtype.

Shapes (parameter counts with the vocabularies below):

    llama-1p5b   Llama (RMSNorm, GQA 32/8 heads, SwiGLU 2048->8192), 24 layers, vocab 32000, tied: 1.52B
    gpt2-xl      GPT-2-XL (LayerNorm, 1600 wide, 25 heads), 48 layers, vocab 50257: 1.56B
    llama-small  the same Llama shape at 512 wide, 4 layers: the equality check
    gpt2-small   the same GPT-2 shape at 256 wide, 4 layers: the equality check

    python scripts/synthetic_checkpoint.py llama-1p5b /tmp/llama-1p5b --dtype bfloat16

Weights are N(0, 0.02) (embeddings offset by 0.01), norm gains 1 + N(0, 0.1) and biases N(0, 0.1):
random, but every norm has a non-trivial affine to fold and calibrate. Used as a module by
`bench_scale.py`.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

SHAPES: dict[str, dict[str, Any]] = {
    "llama-1p5b": dict(family="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=True),
    "llama-small": dict(family="llama", hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                        num_key_value_heads=2, vocab_size=32000, tie_word_embeddings=True),
    "gpt2-xl": dict(family="gpt2", n_embd=1600, n_layer=48, n_head=25, vocab_size=50257),
    "gpt2-small": dict(family="gpt2", n_embd=256, n_layer=4, n_head=4, vocab_size=50257),
    # the real GPT-2 sizes below XL, for bench_convert.py
    "gpt2-medium": dict(family="gpt2", n_embd=1024, n_layer=24, n_head=16, vocab_size=50257),
    "gpt2-base": dict(family="gpt2", n_embd=768, n_layer=12, n_head=12, vocab_size=50257),
}


def build_config(shape: str) -> Any:
    """The transformers config of a shape, with `architectures` set (what the loaders read)."""
    from transformers import GPT2Config, LlamaConfig

    spec = dict(SHAPES[shape])
    family = spec.pop("family")
    if family == "llama":
        config = LlamaConfig(max_position_embeddings=2048, rms_norm_eps=1e-5, **spec)
        config.architectures = ["LlamaForCausalLM"]
    else:
        config = GPT2Config(n_positions=1024, **spec)
        config.architectures = ["GPT2LMHeadModel"]
    return config


def _is_norm(name: str) -> bool:
    return any(k in name for k in (".ln_", "ln_f.", "layernorm", "norm."))


def generate(folder: Path, shape: str, dtype: str = "bfloat16", shard_bytes: int = 2_000_000_000, seed: int = 0) -> dict[str, Any]:
    """Write `shape`'s config and random weights into `folder` (which must not exist)."""
    import torch
    from transformers import AutoModelForCausalLM

    from normswap.streaming import ShardWriter

    torch_dtype = getattr(torch, dtype)
    config = build_config(shape)
    config.dtype = torch_dtype
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    plan, seen = [], set()
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) not in seen and t.is_floating_point():  # tied tensors once; GPT-2's bool masks are not stored
            seen.add(id(t))
            plan.append((name, list(t.shape), torch_dtype))
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    writer = ShardWriter(folder, plan, shard_bytes, {"format": "pt"})
    params = 0
    for name, shp, _ in writer:
        if len(shp) == 1 and _is_norm(name):
            t = (1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(shp, generator=g)
        else:
            t = 0.02 * torch.randn(shp, generator=g) + (0.01 if "wte" in name or "wpe" in name or "embed" in name else 0.0)
        writer.write(name, t.to(torch_dtype))
        params += t.numel()
        del t
    if len(writer.names) > 1:
        writer.write_index()
    config.save_pretrained(folder)
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    return {"shape": shape, "config": SHAPES[shape], "dtype": dtype, "parameters": params, "bytes_on_disk": size,
            "shards": len(writer.names), "generate_s": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("folder", type=Path)
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16")
    ap.add_argument("--shard-gb", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(json.dumps(generate(args.folder, args.shape, args.dtype, int(args.shard_gb * 1e9), args.seed)))


if __name__ == "__main__":
    main()
