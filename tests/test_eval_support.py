"""Builders shared by the eval tests (this module holds no tests): tiny model folders and GLUE-layout data.

Tiny models use the real tokenizers from the assets, so tokenisation, special tokens and padding
are the real thing while forward passes stay cheap.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

import normswap
from normswap.assets import asset
from normswap.loading import load_tokenizer


def save_plain(model: torch.nn.Module, tokenizer, folder: Path) -> Path:
    """A plain HF folder (safetensors) with its tokenizer."""
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_bert_folder(root: Path, seed: int = 0, name: str = "tiny-bert") -> Path:
    """A random 2-layer BertModel (hidden 32) with the MiniLM WordPiece tokenizer."""
    tok = load_tokenizer(str(asset("all-MiniLM-L6-v2")))
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    return save_plain(BertModel(cfg).eval(), tok, root / name)


def tiny_gpt2_folder(root: Path, seed: int = 0, name: str = "tiny-gpt2") -> Path:
    """A random 2-layer GPT2LMHeadModel (n_embd 32, 64 positions) with the GPT-2 BPE tokenizer."""
    tok = load_tokenizer(str(asset("gpt2-standin-wt2")))
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=64)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # non-trivial norm affines, so the exact conversion has something to fold
        for n, p in model.named_parameters():
            if "ln_" in n:
                p.add_(torch.randn_like(p) * 0.2)
    return save_plain(model, tok, root / name)


def converted_folder(source: Path, to: str, out: Path) -> Path:
    """`source` converted with normswap and saved as a normswap checkpoint."""
    model, result = normswap.convert(str(source), to=to, calib_tokens=256)
    normswap.save(model, out, result.record, tokenizer=load_tokenizer(str(source)), copy_from=source)
    return out


POSITIVE = ["good", "great", "fine", "lovely", "superb", "nice"]
NEGATIVE = ["bad", "awful", "poor", "dull", "terrible", "ugly"]
FILLER = ["the", "film", "was", "really", "quite", "story", "acting", "and", "plot", "it", "music"]


def sentiment_rows(n: int, seed: int) -> list[tuple[str, int]]:
    """A learnable SST-2-like task: the label is whether the sentence holds a positive word."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randint(0, 1)
        words = rng.sample(FILLER, 4) + [rng.choice(POSITIVE if label else NEGATIVE)]
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


def write_glue_dir(root: Path, n_train: int = 96, n_dev: int = 40) -> Path:
    """A GLUE-layout folder with synthetic SST-2 (header), CoLA (no header) and STS-B (10 columns)."""
    glue = root / "glue"
    for folder in ("SST-2", "CoLA", "STS-B"):
        (glue / folder).mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", n_train, 1), ("dev", n_dev, 2)):
        rows = sentiment_rows(n, seed)
        (glue / "SST-2" / f"{split}.tsv").write_text("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in rows))
        (glue / "CoLA" / f"{split}.tsv").write_text("".join(f"src\t{y}\t\t{s}\n" for s, y in rows))
        head = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
        body = "".join(f"{i}\tg\tf\t2012\t{i:04d}\tnone\tnone\t{a}\t{b}\t{5.0 * (ya == yb):.3f}\n"
                       for i, ((a, ya), (b, yb)) in enumerate(zip(rows, rows[1:] + rows[:1])))
        (glue / "STS-B" / f"{split}.tsv").write_text(head + body)
    return glue
