"""GPU smoke test (issue 17, item 6): a ~1B-parameter synthetic checkpoint converted with
calibration on a CUDA device, then a few bf16 fine-tuning steps, with wall times and peak GPU memory.

Everything is made here, so the script needs nothing but the project (no Hub, no assets):
- the checkpoint: `synthetic_checkpoint.py`'s Llama shape (bf16, GQA, SwiGLU), `--layers` deep
  (16 layers: 1.05B parameters), plus a word-level tokenizer over its vocabulary;
- the text: seeded random words of that vocabulary, for calibration and for training.

Steps, each the CLI as a user types it, run in this process so that the CUDA allocator's peak is
read after each (`torch.cuda.max_memory_allocated`, reset between steps):
1. `normswap convert SRC --to dyt --device cuda --calib-text calib.txt` (in memory), and with
   `--low-memory` (block-wise), each verified against the source;
2. `normswap finetune DYT --data train.txt --steps N --precision bf16 --device cuda
   --gradient-checkpointing --train all`.

    python scripts/gpu_smoke.py --out docs/results/scale/gpu_smoke.json
    python scripts/gpu_smoke.py --device cpu --layers 2 --width 256 --steps 2   # the script itself, anywhere

Without a CUDA device (and no `--device cpu`) it stops with one error line and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))


def write_tokenizer(folder: Path, vocab_size: int) -> list[str]:
    """A word-level tokenizer whose ids cover the model's vocabulary; returns its words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(vocab_size - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(str(folder))
    return words[3:]


def write_text(path: Path, words: list[str], n_words: int, seed: int) -> None:
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(words) for _ in range(100)) for _ in range(n_words // 100)]
    path.write_text("\n".join(lines) + "\n")


def run_cli(argv: list[str]) -> dict:
    """One `normswap ...` command in this process: exit code, wall time, peak device memory."""
    import torch

    from normswap.cli import app

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    try:
        app(argv, standalone_mode=False)
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    if cuda:
        torch.cuda.synchronize()
    out = {"argv": ["normswap", *argv], "exit_code": code, "wall_s": round(time.perf_counter() - t0, 1)}
    if cuda:
        out["peak_gpu_allocated_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 3)
        out["peak_gpu_reserved_gb"] = round(torch.cuda.max_memory_reserved() / 1e9, 3)
    print(json.dumps(out), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--width", type=int, default=2048, help="hidden size (the MLP is 4x, heads of 64, 4 query heads per key/value head)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--calib-tokens", type=int, default=4096)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None, help="write the figures here as JSON")
    args = ap.parse_args()

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: no CUDA device here (this smoke test is for a GPU machine; --device cpu runs the script itself)", file=sys.stderr)
        raise SystemExit(2)

    import synthetic_checkpoint as sc

    heads = max(args.width // 64, 1)
    sc.SHAPES["gpu-smoke"] = dict(family="llama", hidden_size=args.width, intermediate_size=4 * args.width, num_hidden_layers=args.layers,
                                  num_attention_heads=heads, num_key_value_heads=max(heads // 4, 1), vocab_size=32000,
                                  tie_word_embeddings=True)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="normswap-gpu-smoke-"))
    work.mkdir(parents=True, exist_ok=True)
    src = work / "src"
    report: dict = {"device": args.device, "torch": torch.__version__}
    if torch.cuda.is_available():
        report["gpu"] = torch.cuda.get_device_name(0)
    try:
        if src.exists():
            shutil.rmtree(src)
        report["checkpoint"] = sc.generate(src, "gpu-smoke", "bfloat16")
        words = write_tokenizer(src, 32000)
        write_text(work / "calib.txt", words, 20_000, seed=0)
        write_text(work / "train.txt", words, 200_000, seed=1)
        common = ["--to", "dyt", "--device", args.device, "--calib-text", str(work / "calib.txt"),
                  "--calib-tokens", str(args.calib_tokens), "--verify", "--overwrite", "--format", "json"]
        report["convert_in_memory"] = run_cli(["convert", str(src), "--out", str(work / "dyt"), *common])
        report["convert_blockwise"] = run_cli(["convert", str(src), "--out", str(work / "dyt-blk"), "--low-memory", *common])
        report["finetune_bf16"] = run_cli(["finetune", str(work / "dyt"), "--data", str(work / "train.txt"), "--steps", str(args.steps),
                                           "--batch-size", "4", "--block-size", "256", "--precision", "bf16" if args.device != "cpu" else "fp32",
                                           "--device", args.device, "--gradient-checkpointing", "--out", str(work / "ft"),
                                           "--overwrite", "--format", "json"])
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    ok = all(report[k]["exit_code"] == 0 for k in ("convert_in_memory", "convert_blockwise", "finetune_bf16"))
    report["ok"] = ok
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "checkpoint"}, indent=2))
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
