"""Speech recognition: greedy transcription with a speech encoder-decoder (Whisper) and word error rate.

Protocol (as Whisper's paper and the Open ASR leaderboard score English): greedy decoding without
timestamps, through the model's own `generate` and generation config; features from the
checkpoint's own processor; Whisper's English text normaliser (built from the model folder's
`normalizer.json`) on both reference and hypothesis; word edit distance (jiwer) summed over
utterances and divided by the number of normalised reference words (corpus WER, not the mean of
per-utterance rates).

The difference between two models on the same utterances comes with a paired bootstrap 95%
interval: resample utterances with replacement, recompute both corpus WERs on the same resample,
take the 2.5th and 97.5th percentiles of the difference (fixed seed, so reruns agree).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from normswap.audio import AudioSet, Utterance, load_audio
from normswap.errors import NormswapError
from normswap.evaluation import bootstrap
from normswap.evaluation.progress import progress_bar, short_name

NORMALIZER_FILE = "normalizer.json"
BOOTSTRAP_RESAMPLES = bootstrap.RESAMPLES
BOOTSTRAP_SEED = bootstrap.SEED


# ------------------------------------------------------------------------------------------ scoring


@dataclass(frozen=True)
class WordErrors:
    """The word alignment counts of one utterance (or a sum of them)."""

    words: int  # normalised reference words
    hits: int
    substitutions: int
    deletions: int
    insertions: int

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions


def word_errors(references: Sequence[str], hypotheses: Sequence[str]) -> list[WordErrors]:
    """Per-pair word alignment counts (jiwer's Levenshtein alignment) of already normalised texts.
    An empty reference is allowed: each hypothesis word is then an insertion."""
    import jiwer

    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    if not references:
        return []
    out = jiwer.process_words(list(references), list(hypotheses))
    rows = []
    for ref, align in zip(out.references, out.alignments):
        c = {"equal": 0, "substitute": 0, "delete": 0, "insert": 0}
        for chunk in align:
            c[chunk.type] += (chunk.hyp_end_idx - chunk.hyp_start_idx) if chunk.type == "insert" else (chunk.ref_end_idx - chunk.ref_start_idx)
        rows.append(WordErrors(len(ref), c["equal"], c["substitute"], c["delete"], c["insert"]))
    return rows


def total(rows: Sequence[WordErrors]) -> WordErrors:
    return WordErrors(*(sum(getattr(r, k) for r in rows) for k in ("words", "hits", "substitutions", "deletions", "insertions")))


def corpus_wer(rows: Sequence[WordErrors]) -> float:
    """Errors summed over utterances / reference words summed over utterances."""
    t = total(rows)
    if t.words == 0:
        raise NormswapError("the references have no words after normalisation, so a word error rate is undefined")
    return t.errors / t.words


def summary(rows: Sequence[WordErrors]) -> dict[str, Any]:
    t = total(rows)
    return {"wer": corpus_wer(rows), "words": t.words, "utterances": len(rows), "errors": t.errors, "hits": t.hits,
            "substitutions": t.substitutions, "deletions": t.deletions, "insertions": t.insertions}


def paired_bootstrap(errors_a: Sequence[int], errors_b: Sequence[int], words: Sequence[int], *,
                     resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED, level: float = 0.95) -> tuple[float, float]:
    """A percentile interval for corpus WER(a) - WER(b) over the same utterances.

    Each resample draws n utterance indices with replacement (`numpy.random.default_rng(seed)`,
    `integers(0, n, n)` per resample, in order) and takes sum(errors_a - errors_b) / sum(words) on
    it; resamples without any reference word are skipped (possible only when most utterances
    have none). Drawn in blocks, so memory stays small for large test sets (the shared
    `normswap.evaluation.bootstrap`, whose index stream this is)."""
    ea, eb, w = (np.asarray(v, dtype=np.int64) for v in (errors_a, errors_b, words))
    n = len(w)
    if n == 0 or not (len(ea) == len(eb) == n):
        raise ValueError("paired_bootstrap needs the same, non-zero number of utterances for both models")
    diff = ea - eb

    def delta(idx: np.ndarray) -> np.ndarray:
        num, den = diff[idx].sum(axis=1), w[idx].sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)  # no reference word: left out

    d = bootstrap.bootstrap_deltas(delta, n, resamples=resamples, seed=seed, batched=True)
    if d.size == 0:
        raise NormswapError("no bootstrap resample has a reference word: the interval is undefined")
    return bootstrap.percentile_interval(d, level)


# --------------------------------------------------------------------------------------- checkpoints


def load_normalizer(model: str) -> Callable[[str], str]:
    """Whisper's English text normaliser with the spelling map of the model's `normalizer.json`."""
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    from normswap.integrity import read_json_object

    folder = Path(model)
    if folder.is_dir():
        file = folder / NORMALIZER_FILE
        if not file.is_file():
            raise NormswapError(f"{model} has no {NORMALIZER_FILE} (the English spelling map of Whisper's text normaliser), "
                                "which the WER protocol needs")
    else:
        from transformers.utils import cached_file

        try:
            found = cached_file(model, NORMALIZER_FILE, _raise_exceptions_for_missing_entries=False)
        except OSError as err:
            raise NormswapError(f"cannot fetch {NORMALIZER_FILE} of {model}: {str(err).splitlines()[0][:200]}") from None
        if found is None:
            raise NormswapError(f"{model} has no {NORMALIZER_FILE} (Whisper's English spelling map), which the WER protocol needs")
        file = Path(found)
    mapping = read_json_object(file, "normalizer file")
    bad = next((k for k, v in mapping.items() if not isinstance(v, str)), None)
    if bad is not None:
        raise NormswapError(f"invalid normalizer file {file}: the spelling of {bad!r} is not a string")
    return EnglishTextNormalizer(mapping)


def speech_architecture(model: str) -> str:
    """The model's class name if it is a speech-recognition encoder-decoder (checked from its config,
    before any weights are read); otherwise one line saying what it is."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES

    from normswap.loading import is_converted, load_config, read_record

    speech = set(MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES.values())
    if Path(model).is_dir() and is_converted(model):
        record, _ = read_record(model)
        archs, kind = [record.architecture], record.base_model_type
    else:
        cfg = load_config(model)
        archs, kind = list(getattr(cfg, "architectures", None) or []), cfg.model_type
    for a in archs:
        if a in speech:
            return a
    what = archs[0] if archs else f"{kind} model without an architectures entry"
    raise NormswapError(f"--asr needs a speech-recognition encoder-decoder (such as WhisperForConditionalGeneration); "
                        f"{model} is a {what}")


def load_processor(model: str) -> Any:
    """The checkpoint's own processor (feature extractor + tokenizer)."""
    from transformers import AutoProcessor

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            proc = AutoProcessor.from_pretrained(model)
    except Exception as err:  # noqa: BLE001 - missing or damaged processor files, unknown classes
        msg = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise NormswapError(f"cannot load the processor (feature extractor and tokenizer) of {model}: {msg}") from None
    fe = getattr(proc, "feature_extractor", None)
    if fe is None or getattr(proc, "tokenizer", None) is None or not getattr(fe, "sampling_rate", None):
        raise NormswapError(f"{model} has no speech processor (processor_config.json or preprocessor_config.json with a "
                            f"feature extractor, and tokenizer files); got {type(proc).__name__}")
    return proc


def max_seconds(processor: Any) -> float | None:
    """The longest input the feature extractor keeps (Whisper: 30 s; longer audio would be cut)."""
    fe = processor.feature_extractor
    n = getattr(fe, "n_samples", None)
    return n / fe.sampling_rate if n else None


# ------------------------------------------------------------------------------------- transcription


@torch.no_grad()
def transcribe(model: nn.Module, processor: Any, utterances: Sequence[Utterance], *, batch_size: int = 16,
               progress: bool | None = None, name: str = "the model") -> list[str]:
    """Greedy transcriptions (no timestamps) of `utterances`, in their order.

    Utterances are decoded in batches of similar duration (fewer padded decoder steps), with the
    model's generation config (forced prompt, suppressed tokens, max length)."""
    import transformers

    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    rate = int(processor.feature_extractor.sampling_rate)
    kwargs: dict[str, Any] = {"do_sample": False, "num_beams": 1}
    if model.config.model_type == "whisper":
        kwargs["return_timestamps"] = False
        if getattr(model.generation_config, "is_multilingual", False):
            kwargs.update(language="en", task="transcribe")  # the normaliser is English
    order = sorted(range(len(utterances)), key=lambda i: utterances[i].seconds)
    texts: list[str | None] = [None] * len(utterances)
    bar = progress_bar(len(utterances), f"transcribing ({short_name(name)})", progress, unit="utterances", done_word="transcribed")
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # Whisper's generate warns on every batch about its own defaults
    try:
        for k in range(0, len(order), batch_size):
            idx = order[k:k + batch_size]
            audio = [load_audio(utterances[i], rate) for i in idx]
            feats = processor.feature_extractor(audio, sampling_rate=rate, return_tensors="pt").input_features
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ids = model.generate(input_features=feats.to(device=device, dtype=dtype), **kwargs)
            if not isinstance(ids, torch.Tensor):
                ids = ids.sequences if hasattr(ids, "sequences") else ids["sequences"]
            for i, t in zip(idx, processor.tokenizer.batch_decode(ids, skip_special_tokens=True)):
                texts[i] = t.strip()
            bar.update(len(idx))
    finally:
        transformers.logging.set_verbosity(verbosity)
        bar.close()
    return [t or "" for t in texts]


def evaluate(hypotheses: dict[str, list[str]], data: AudioSet, normalizer: Callable[[str], str], *,
             resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
             groups: Sequence[str] = ()) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """WER of each role's hypotheses against the folder's references: the results row (overall and
    per subset, with the paired interval when there is a baseline) and per-utterance records.
    `groups` adds rows for unions of subsets, each named by its members joined with "+"
    ("test-clean+dev-clean"), beside the subsets' own (see `check_groups`)."""
    refs = [u.text or "" for u in data.utterances]
    refs_norm = [normalizer(r) for r in refs]
    norm = {role: [normalizer(h) for h in hyps] for role, hyps in hypotheses.items()}
    rows = {role: word_errors(refs_norm, hyps) for role, hyps in norm.items()}
    row = _row(rows, range(len(refs)), resamples, seed)
    subsets = data.subsets
    if subsets:
        row["subsets"] = {s: _row(rows, [i for i, u in enumerate(data.utterances) if u.subset == s], resamples, seed) for s in subsets}
        for g in check_groups(groups, data):
            members = set(g.split("+"))
            row["subsets"][g] = _row(rows, [i for i, u in enumerate(data.utterances) if u.subset in members], resamples, seed)
    if "baseline" in hypotheses:  # transcripts equal character for character (an exact conversion's test)
        row["identical_transcripts"] = sum(h == g for h, g in zip(hypotheses["converted"], hypotheses["baseline"]))
    row.update(normalizer="whisper-english", decoding="greedy, no timestamps", seconds_of_audio=round(data.seconds, 3),
               bootstrap={"resamples": resamples, "seed": seed, "level": 0.95} if "baseline" in rows else None)
    per_utt = []
    for i, u in enumerate(data.utterances):
        rec: dict[str, Any] = {"id": u.id, "subset": u.subset, "reference": refs[i], "reference_normalised": refs_norm[i]}
        for role in hypotheses:
            r = rows[role][i]
            rec[role] = {"hypothesis": hypotheses[role][i], "hypothesis_normalised": norm[role][i], "words": r.words,
                         "substitutions": r.substitutions, "deletions": r.deletions, "insertions": r.insertions, "errors": r.errors}
        per_utt.append(rec)
    return row, per_utt


def check_groups(groups: Sequence[str], data: AudioSet) -> list[str]:
    """The groups ("a+b" unions of the folder's subsets) as given, each member checked: one line
    naming the first that the manifest (after any subset selection) does not have."""
    known = data.subsets
    for g in groups:
        for member in g.split("+"):
            if member not in known:
                have = ", ".join(map(repr, known)) if known else "none (no manifest.tsv)"
                raise NormswapError(f"--asr-groups {g!r}: no subset {member!r} in {data.root}; its subsets are {have}")
    return list(groups)


def _row(rows: dict[str, list[WordErrors]], idx: Sequence[int], resamples: int, seed: int) -> dict[str, Any]:
    conv = [rows["converted"][i] for i in idx]
    out = summary(conv)
    if "baseline" in rows:
        base = [rows["baseline"][i] for i in idx]
        b = summary(base)
        lo, hi = paired_bootstrap([r.errors for r in conv], [r.errors for r in base], [r.words for r in conv],
                                  resamples=resamples, seed=seed)
        out.update(baseline=b["wer"], baseline_errors=b["errors"], baseline_substitutions=b["substitutions"],
                   baseline_deletions=b["deletions"], baseline_insertions=b["insertions"],
                   delta=out["wer"] - b["wer"], delta_ci95=[lo, hi])
    else:
        out.update(baseline=None, delta=None, delta_ci95=None)
    return out


def predictions_table(per_utt: list[dict[str, Any]], roles: Sequence[str]) -> tuple[list[str], list[list[Any]]]:
    """Header and rows of predictions/asr.tsv (tabs and newlines inside texts become spaces)."""
    header = ["id", "subset", "reference", "reference_normalised", "words"]
    for role in roles:
        p = "" if role == "converted" else "baseline_"
        header += [f"{p}hypothesis", f"{p}hypothesis_normalised", f"{p}substitutions", f"{p}deletions", f"{p}insertions", f"{p}errors"]
    out = []
    for rec in per_utt:
        r = [rec["id"], rec["subset"] or "", _cell(rec["reference"]), _cell(rec["reference_normalised"]), rec[roles[0]]["words"]]
        for role in roles:
            x = rec[role]
            r += [_cell(x["hypothesis"]), _cell(x["hypothesis_normalised"]), x["substitutions"], x["deletions"], x["insertions"], x["errors"]]
        out.append(r)
    return header, out


def _cell(text: str) -> str:
    return " ".join(text.split())
