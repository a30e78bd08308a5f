"""Training data: read text (file, folder or `datasets` name), tokenize, pack, split, batch; or
speech (a folder of audio with transcripts) for speech encoder-decoders such as Whisper.

Everything here is deterministic for a seed: the held-out slice and the order of training
examples depend only on (data, tokenizer, block size, packing, seed), and the examples of any step
can be recomputed from the step number alone. That is what lets `--resume` continue at the exact
data position without saving a sampler state.

Speech examples (`SpeechExamples`) are utterances: log-mel `input_features` from the checkpoint's
processor, `decoder_input_ids` teacher-forced from the transcript (`normswap.samples.
teacher_forced_ids`: Whisper's forced prompt, the text, eos) and `labels`, the next tokens. A batch
pads the decoder rows at the end; padded positions and the positions that predict the forced
prompt carry label -100 and are left out of every loss. The decoder is causal and its positions
absolute, so real tokens never see the padding behind them: no decoder attention mask is needed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from normswap.errors import NormswapError

TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst", ".raw", ".tokens")
_CHUNK_LINES = 2000  # lines tokenized per call: bounded memory, near-identical tokens to one call


def read_texts(source: str | os.PathLike) -> list[str]:
    """The documents of `source`: one text file, a folder of text files, or a `datasets` name.

    A folder contributes every file ending in one of TEXT_SUFFIXES, recursively, in sorted order.
    A `datasets` name is `name[:config][@split]` (split defaults to "train") and needs the Hub.
    """
    path = Path(source).expanduser()
    if path.is_file():
        return [_read_file(path)]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise NormswapError(f"data folder {source} has no text files ({', '.join(TEXT_SUFFIXES)})")
        return [_read_file(f) for f in files]
    return _read_dataset(str(source))


def _read_file(path: Path) -> str:
    from normswap.textfiles import read_text

    return read_text(path, allow_empty=True)  # an empty document in a folder of them is no mistake


def _read_dataset(name: str) -> list[str]:
    looks_local = name.startswith((".", "/", "~")) or os.sep in name and name.count("/") > 1
    if looks_local or os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        raise NormswapError(f"data {name!r} not found: no such file or folder" + ("" if looks_local else " (and the Hub is offline, so it cannot be a `datasets` name)"))
    try:
        import datasets
    except ImportError:
        raise NormswapError(f"data {name!r} is not a file or folder, and the `datasets` library is not installed") from None
    split = "train"
    if "@" in name:
        name, split = name.rsplit("@", 1)
    dname, _, config = name.partition(":")
    try:
        ds = datasets.load_dataset(dname, config or None, split=split)
    except Exception as err:  # network errors, unknown names...
        raise NormswapError(f"cannot load dataset {name!r}: {str(err).splitlines()[0][:200]}") from None
    column = "text" if "text" in ds.column_names else next(
        (c for c, f in ds.features.items() if getattr(f, "dtype", None) == "string"), None)
    if column is None:
        raise NormswapError(f"dataset {name!r} has no text column")
    return ["\n".join(ds[column])]


@dataclass
class Examples:
    """Tokenized examples: a [N, L] block tensor (packing="blocks") or a list of variable-length rows."""

    blocks: torch.Tensor | None = None
    rows: list[list[int]] = field(default_factory=list)
    pad_id: int = 0

    def __len__(self) -> int:
        return int(self.blocks.shape[0]) if self.blocks is not None else len(self.rows)

    def subset(self, index: torch.Tensor) -> "Examples":
        if self.blocks is not None:
            return Examples(blocks=self.blocks[index], pad_id=self.pad_id)
        return Examples(rows=[self.rows[i] for i in index.tolist()], pad_id=self.pad_id)

    def batch(self, index: list[int]) -> dict[str, torch.Tensor]:
        """input_ids and attention_mask for the examples at `index` (rows padded on the right)."""
        if self.blocks is not None:
            ids = self.blocks[index]
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        rows = [self.rows[i] for i in index]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, :len(r)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def n_tokens(self) -> int:
        return int(self.blocks.numel()) if self.blocks is not None else sum(len(r) for r in self.rows)

    def seconds(self, index: list[int]) -> float:
        """Seconds of audio behind the examples at `index`: none for text."""
        return 0.0


FEATURE_CACHE_BYTES = 2 * 2**30  # log-mel features are kept in memory when all of them fit in this


@dataclass
class SpeechExamples:
    """Utterances and their teacher-forced decoder sequences (prompt + transcript + eos).

    Features are computed from the audio when a batch first needs them and kept while every
    utterance's features together fit in FEATURE_CACHE_BYTES (whisper: 0.96 MB each, about 2,200
    utterances); beyond that they are recomputed each time (the same values)."""

    utterances: list[Any]  # normswap.audio.Utterance
    sequences: list[list[int]]
    prompt_len: int
    processor: Any
    pad_id: int
    _features: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.utterances)

    def subset(self, index: torch.Tensor) -> "SpeechExamples":
        idx = index.tolist()
        return SpeechExamples([self.utterances[i] for i in idx], [self.sequences[i] for i in idx], self.prompt_len,
                              self.processor, self.pad_id, self._features)

    def features(self, index: list[int]) -> torch.Tensor:
        from normswap.samples import speech_features

        utts = [self.utterances[i] for i in index]
        missing = list(dict.fromkeys(u.id for u in utts if u.id not in self._features))
        if missing:
            by_id = {u.id: u for u in utts}
            new = speech_features(self.processor, [by_id[m] for m in missing])
            if new[0].numel() * new.element_size() * len(self.utterances) > FEATURE_CACHE_BYTES:
                fresh = dict(zip(missing, new))
                return torch.stack([self._features.get(u.id, fresh.get(u.id)) for u in utts])
            self._features.update((m, f.clone()) for m, f in zip(missing, new))
        return torch.stack([self._features[u.id] for u in utts])

    def batch(self, index: list[int]) -> dict[str, torch.Tensor]:
        """input_features, decoder_input_ids (padded at the end) and labels (-100 where no loss)."""
        rows = [self.sequences[i] for i in index]
        width = max(len(r) for r in rows) - 1
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r) - 1] = torch.tensor(r[:-1], dtype=torch.long)
            labels[i, self.prompt_len - 1:len(r) - 1] = torch.tensor(r[self.prompt_len:], dtype=torch.long)
        return {"input_features": self.features(index), "decoder_input_ids": ids, "labels": labels}

    def n_tokens(self) -> int:
        """Decoder tokens that carry a loss: transcript tokens and eos."""
        return sum(len(r) - self.prompt_len for r in self.sequences)

    def seconds(self, index: list[int]) -> float:
        return sum(self.utterances[i].seconds for i in index)


def tokenize_blocks(texts: list[str], tokenizer: Any, block_size: int, *, encoder: bool) -> Examples:
    """Concatenate all documents into one token stream and cut it into full blocks.

    Causal models get an EOS token between documents. Encoders (BERT-like) get each block wrapped in
    their special tokens ([CLS] ... [SEP]) so that every block looks like an ordinary input.
    """
    stream: list[int] = []
    for text in texts:
        lines = text.splitlines(keepends=True)
        for i in range(0, len(lines), _CHUNK_LINES):
            chunk = "".join(lines[i:i + _CHUNK_LINES])
            if chunk.strip():
                stream.extend(tokenizer(chunk, add_special_tokens=False)["input_ids"])
        if not encoder and tokenizer.eos_token_id is not None and stream:
            stream.append(tokenizer.eos_token_id)
    if encoder:
        head, tail = _special_wrap(tokenizer)
        body = block_size - len(head) - len(tail)
        n = len(stream) // body
        t = torch.tensor(stream[:n * body], dtype=torch.long).view(n, body)
        blocks = torch.cat([torch.tensor(head, dtype=torch.long).expand(n, -1), t,
                            torch.tensor(tail, dtype=torch.long).expand(n, -1)], dim=1)
    else:
        n = len(stream) // block_size
        blocks = torch.tensor(stream[:n * block_size], dtype=torch.long).view(n, block_size)
    return Examples(blocks=blocks, pad_id=_pad_id(tokenizer))


def tokenize_lines(texts: list[str], tokenizer: Any, max_length: int) -> Examples:
    """One example per non-empty line, with the tokenizer's special tokens, truncated to max_length."""
    lines = [ln.strip() for text in texts for ln in text.splitlines()]
    lines = [ln for ln in lines if ln]
    rows: list[list[int]] = []
    for i in range(0, len(lines), _CHUNK_LINES):
        enc = tokenizer(lines[i:i + _CHUNK_LINES], truncation=True, max_length=max_length)
        rows.extend(r for r in enc["input_ids"] if r)
    return Examples(rows=rows, pad_id=_pad_id(tokenizer))


def _special_wrap(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a single sequence, found by probing
    (transformers 5 fast tokenizers apply them in the post-processor, not in a Python method)."""
    text = "a b c"
    plain = tokenizer(text, add_special_tokens=False)["input_ids"]
    full = tokenizer(text)["input_ids"]
    for k in range(len(full) - len(plain) + 1):
        if full[k:k + len(plain)] == plain:
            return full[:k], full[k + len(plain):]
    return [], []


def _pad_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        v = getattr(tokenizer, attr, None)
        if v is not None:
            return int(v)
    return 0


@dataclass
class TrainData:
    """Training and held-out examples plus the deterministic, seed-driven order of training examples."""

    train: Examples | SpeechExamples
    val: Examples | SpeechExamples
    seed: int
    _perms: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    def order(self, epoch: int) -> torch.Tensor:
        """The permutation of training examples used in `epoch` (a pure function of seed and epoch)."""
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch + 1)
            self._perms = {epoch: torch.randperm(len(self.train), generator=g)}
        return self._perms[epoch]

    def indices(self, start: int, count: int) -> list[int]:
        """Training-example indices at global positions start .. start+count-1 of the endless stream."""
        n = len(self.train)
        return [int(self.order(g // n)[g % n]) for g in range(start, start + count)]

    def mean_tokens(self) -> float:
        return self.train.n_tokens() / max(1, len(self.train))

    @property
    def speech(self) -> bool:
        return isinstance(self.train, SpeechExamples)


def build_data(source: str | os.PathLike, tokenizer: Any, *, block_size: int, packing: str, encoder: bool,
               seed: int, val_examples: int) -> TrainData:
    """Read, tokenize and split `source`; raises NormswapError on empty or too-small data."""
    texts = read_texts(source)
    if not any(t.strip() for t in texts):
        raise NormswapError(f"data {source} is empty")
    if packing == "blocks":
        examples = tokenize_blocks(texts, tokenizer, block_size, encoder=encoder)
    elif packing == "lines":
        examples = tokenize_lines(texts, tokenizer, block_size)
    else:
        raise NormswapError(f"unknown packing {packing!r} (use blocks or lines)")
    if len(examples) == 0:
        raise NormswapError(f"data {source} has fewer tokens than one block of {block_size}; use a smaller --block-size or more data")
    return _split(examples, seed, val_examples)


def _split(examples: Examples | SpeechExamples, seed: int, val_examples: int) -> TrainData:
    """Hold out min(val_examples, a tenth) of the examples, drawn by `seed`."""
    n_val = min(val_examples, len(examples) // 10)
    perm = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed))
    return TrainData(train=examples.subset(perm[n_val:]), val=examples.subset(perm[:n_val]), seed=seed)


def build_speech_data(found: Any, model: Any, tokenizer: Any, processor: Any, *, seed: int, val_examples: int,
                      what: str) -> TrainData:
    """The utterances of `found` (a `normswap.audio.AudioSet`, read with transcripts) teacher-forced
    for `model` (`what` names it in errors), each file decoded once up front, split as text is."""
    from normswap import audio
    from normswap.evaluation.asr import max_seconds
    from normswap.log import logger
    from normswap.samples import decoder_prompt, eos_id, teacher_forced_ids

    audio.check_lengths(found, max_seconds(processor), what)
    audio.check_decodable(found, int(processor.feature_extractor.sampling_rate))
    utts = found.utterances
    sequences = teacher_forced_ids(model, tokenizer, [u.text for u in utts])
    prompt = decoder_prompt(model, tokenizer)
    eos = eos_id(model, tokenizer)
    cut = [u.id for u, s in zip(utts, sequences) if s[-1] != eos]
    if cut:
        logger.warning("%d transcript(s) are longer than the decoder's %d positions and were cut, e.g. %s",
                       len(cut), model.config.max_target_positions, cut[0])
    examples = SpeechExamples(utts, sequences, len(prompt), processor, _pad_id(tokenizer))
    return _split(examples, seed, val_examples)
