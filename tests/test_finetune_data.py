"""Training data: reading, packing, the held-out slice and the seeded order (normswap.training.data)."""
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import pytest
import torch

from normswap.errors import NormswapError
from normswap.training.config import parse_count
from normswap.training.data import build_data, read_texts
from normswap.training.objectives import parse_objective
from normswap.training.tiny import tiny_bert_tokenizer, tiny_corpus, tiny_tokenizer


@pytest.fixture
def corpus(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text(tiny_corpus(200))
    return p


def test_blocks_are_full_and_deterministic(corpus):
    tok = tiny_tokenizer()
    a = build_data(corpus, tok, block_size=16, packing="blocks", encoder=False, seed=3, val_examples=8)
    b = build_data(corpus, tok, block_size=16, packing="blocks", encoder=False, seed=3, val_examples=8)
    c = build_data(corpus, tok, block_size=16, packing="blocks", encoder=False, seed=4, val_examples=8)
    assert a.train.blocks.shape[1] == 16 and len(a.val) == 8
    assert torch.equal(a.train.blocks, b.train.blocks) and torch.equal(a.val.blocks, b.val.blocks)
    assert a.indices(0, 50) == b.indices(0, 50)
    assert not torch.equal(a.val.blocks, c.val.blocks)
    # held-out blocks never appear in training
    train_rows = {tuple(r) for r in a.train.blocks.tolist()}
    assert not any(tuple(r) in train_rows for r in a.val.blocks.tolist())
    # the packed stream holds every token of the text (plus one EOS), up to the last partial block
    n_words = len(corpus.read_text().split())
    total = (len(a.train) + len(a.val)) * 16
    assert n_words + 1 - 16 < total <= n_words + 1


def test_epochs_cover_every_example_once(corpus):
    d = build_data(corpus, tiny_tokenizer(), block_size=16, packing="blocks", encoder=False, seed=0, val_examples=4)
    n = len(d.train)
    first, second = d.indices(0, n), d.indices(n, n)
    assert sorted(first) == list(range(n)) and sorted(second) == list(range(n))
    assert first != second  # a fresh order each epoch


def test_encoder_blocks_are_wrapped_in_special_tokens(corpus):
    tok = tiny_bert_tokenizer()
    d = build_data(corpus, tok, block_size=12, packing="blocks", encoder=True, seed=0, val_examples=2)
    assert (d.train.blocks[:, 0] == tok.cls_token_id).all() and (d.train.blocks[:, -1] == tok.sep_token_id).all()


def test_lines_are_padded_with_a_mask(corpus):
    tok = tiny_bert_tokenizer()
    d = build_data(corpus, tok, block_size=10, packing="lines", encoder=True, seed=0, val_examples=4)
    batch = d.train.batch([0, 1, 2, 3])
    lengths = batch["attention_mask"].sum(1)
    assert batch["input_ids"].shape[1] == int(lengths.max()) <= 10
    assert (batch["input_ids"][batch["attention_mask"] == 0] == tok.pad_token_id).all()
    assert (batch["input_ids"][:, 0] == tok.cls_token_id).all()


def test_folder_reads_text_files_in_order(tmp_path):
    (tmp_path / "b.txt").write_text("w2 w3")
    (tmp_path / "a.txt").write_text("w1")
    (tmp_path / "skip.bin").write_bytes(b"\x00\x01")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.md").write_text("w4")
    assert read_texts(tmp_path) == ["w1", "w2 w3", "w4"]


def test_empty_and_missing_data_are_user_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    with pytest.raises(NormswapError, match="empty"):
        build_data(empty, tiny_tokenizer(), block_size=8, packing="blocks", encoder=False, seed=0, val_examples=1)
    short = tmp_path / "short.txt"
    short.write_text("w1 w2 w3")
    with pytest.raises(NormswapError, match="fewer tokens than one block"):
        build_data(short, tiny_tokenizer(), block_size=64, packing="blocks", encoder=False, seed=0, val_examples=1)
    with pytest.raises(NormswapError, match="not found"):
        read_texts(str(tmp_path / "nope.txt"))
    with pytest.raises(NormswapError, match="offline"):
        read_texts("wikitext:wikitext-2-raw-v1")
    (tmp_path / "d").mkdir()
    with pytest.raises(NormswapError, match="no text files"):
        read_texts(tmp_path / "d")


def test_parse_count_and_objective():
    assert parse_count("2M") == 2_000_000 and parse_count("1.5k") == 1500 and parse_count("300") == 300
    with pytest.raises(NormswapError):
        parse_count("lots")
    assert parse_objective("distill") == {"distill": 1.0}
    assert parse_objective("lm+distill") == {"lm": 1.0, "distill": 1.0}
    assert parse_objective("lm=0.25, distill=0.75") == {"lm": 0.25, "distill": 0.75}
    for bad in ("kl", "lm=-1", "lm=0", "lm=x"):
        with pytest.raises(NormswapError):
            parse_objective(bad)
