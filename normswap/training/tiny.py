"""Tiny teacher/student pairs built in-process, for tests, examples and the benchmark's smoke mode.

A word-level tokenizer over a small synthetic vocabulary keeps the models tiny (no 50k-token head),
and the student is the teacher with every LayerNorm swapped for a DyT that starts from the
LayerNorm's affine: a real normswap checkpoint (with a conversion record), loadable with
`normswap.load`, whose outputs differ from the teacher's, so recovery training has work to do.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch
from torch import nn

WORDS = [f"w{i}" for i in range(90)]
SPECIALS = ["<pad>", "<unk>", "<eos>", "[CLS]", "[SEP]", "[MASK]"]


def tiny_tokenizer(shuffled: bool = False) -> Any:
    """A word-level fast tokenizer: 6 special tokens + 90 words (in another order if `shuffled`:
    the same size, a different vocabulary)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = list(reversed(WORDS)) if shuffled else WORDS
    vocab = {t: i for i, t in enumerate(SPECIALS + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")


def tiny_bert_tokenizer() -> Any:
    """The same vocabulary with BERT-style [CLS] ... [SEP] wrapping and a [MASK] token."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    base = tiny_tokenizer()
    tok = base.backend_tokenizer
    cls_id, sep_id = SPECIALS.index("[CLS]"), SPECIALS.index("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                       special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


def tiny_corpus(n_lines: int = 400, seed: int = 0) -> str:
    """Synthetic text with learnable structure: each word mostly predicts the next."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        w = rng.randrange(len(WORDS))
        line = []
        for _ in range(rng.randint(5, 20)):
            line.append(WORDS[w])
            w = (w * 7 + 3) % len(WORDS) if rng.random() < 0.8 else rng.randrange(len(WORDS))
        lines.append(" ".join(line))
    return "\n".join(lines) + "\n"


def _dyt_swap(model: nn.Module, style: str) -> Any:
    """Replace every nn.LayerNorm by a DyT initialised from its affine; returns the ConversionRecord."""
    import normswap
    from normswap.modules import DyT
    from normswap.record import ConversionRecord, SiteRecord
    from normswap.surgery.paths import set_module

    sites = []
    for path, m in list(model.named_modules()):
        if isinstance(m, nn.LayerNorm):
            dyt = DyT(m.normalized_shape[0], alpha=0.8)
            with torch.no_grad():
                dyt.weight.copy_(m.weight)
                dyt.bias.copy_(m.bias)
            set_module(model, path, dyt)
            sites.append(SiteRecord(path=path, placement="pre" if style == "pre" else "post", type="dyt",
                                    dim=dyt.dim, eps=None, weight=True, bias=True, method="alpha-init"))
    return ConversionRecord(target="dyt", base_model_type=model.config.model_type, architecture=type(model).__name__,
                            family=model.config.model_type, style=style, exact=False, sites=sites,
                            source={"model": "tiny"}, version=normswap.__version__)


def make_tiny_pair(root: Path, kind: str = "causal", seed: int = 0, shuffled_vocab: bool = False) -> tuple[Path, Path]:
    """Write a tiny teacher (plain HF folder) and its DyT student (normswap folder) under `root`.

    kind: "causal" (GPT-2), "encoder" (bare BertModel) or "masked" (BertForMaskedLM).
    Returns (teacher_path, student_path).
    """
    import copy

    from transformers import BertConfig, BertForMaskedLM, BertModel, GPT2Config, GPT2LMHeadModel

    import normswap

    torch.manual_seed(seed)
    if kind == "causal":
        tok = tiny_tokenizer(shuffled_vocab)
        cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=len(tok), n_positions=64,
                         bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
        teacher, style = GPT2LMHeadModel(cfg), "pre"
    else:
        tok = tiny_bert_tokenizer()
        cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         vocab_size=len(tok), max_position_embeddings=64, pad_token_id=tok.pad_token_id)
        teacher, style = (BertModel(cfg) if kind == "encoder" else BertForMaskedLM(cfg)), "post"
    teacher.eval()
    name = f"tiny-{kind}" + ("-shuffled" if shuffled_vocab else "")
    t_path, s_path = root / name, root / f"{name}-dyt"
    teacher.save_pretrained(str(t_path))
    tok.save_pretrained(str(t_path))
    student = copy.deepcopy(teacher)
    record = _dyt_swap(student, style)
    normswap.save(student, s_path, record, tokenizer=tok)
    return t_path, s_path


def dyt_student(teacher: Path, out: Path, style: str = "pre") -> Path:
    """The model of the `teacher` folder with every LayerNorm a DyT (as `make_tiny_pair` builds its
    students), saved to `out` as a normswap checkpoint with the teacher's auxiliary files
    (tokenizer, processor, generation config): a student for any architecture, e.g. a tiny Whisper."""
    import normswap
    from normswap.loading import load_pretrained

    model = load_pretrained(str(teacher))
    normswap.save(model, out, _dyt_swap(model, style), copy_from=teacher)
    return out
