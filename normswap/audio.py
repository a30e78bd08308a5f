"""Reading a folder of speech for `normswap eval --asr`: audio files, their transcripts and subsets.

A folder holds audio files (FLAC, WAV, OGG, ... anything `soundfile` reads), anywhere below it (a
flat folder, `audio/`, or LibriSpeech's `speaker/chapter/` layout), each utterance named by its
file's stem. Beside them:

- `transcripts.tsv` at the top: `id<TAB>text`, one utterance a line (an optional `id<TAB>text`
  header); without it, LibriSpeech's own `*.trans.txt` files (`id text` a line) are read;
- `manifest.tsv` at the top, optional: a header with at least `id` and `subset` columns, one row
  per utterance (e.g. test-clean, dev-clean), so that WER is also reported per subset.

Every problem is one `NormswapError` naming the file (and line): an empty folder, an unreadable,
empty, truncated or non-finite audio file, two files with the same utterance id, an utterance
without a transcript or a manifest row, a malformed or duplicated transcript line. Audio is mixed
down to mono and, when its rate is not the model's, resampled with a polyphase filter
(`scipy.signal.resample_poly`).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from normswap import textfiles as readers
from normswap.errors import NormswapError
from normswap.log import logger

AUDIO_SUFFIXES = (".flac", ".wav", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif", ".aifc", ".au", ".snd", ".caf", ".w64", ".rf64")
TRANSCRIPTS_FILE = "transcripts.tsv"
MANIFEST_FILE = "manifest.tsv"
LIBRISPEECH_SUFFIX = ".trans.txt"


@dataclass
class Utterance:
    """One audio file with its transcript and subset (None where the folder gives none)."""

    id: str
    path: Path
    text: str | None
    subset: str | None
    sample_rate: int
    frames: int
    channels: int

    @property
    def seconds(self) -> float:
        return self.frames / self.sample_rate


@dataclass
class AudioSet:
    """The utterances of a folder (sorted by id) and the files their text and subsets came from."""

    root: Path
    utterances: list[Utterance]
    transcripts: list[Path]
    manifest: Path | None

    @property
    def seconds(self) -> float:
        return sum(u.seconds for u in self.utterances)

    @property
    def subsets(self) -> list[str]:
        """The subsets in order of first appearance (empty without a manifest)."""
        return list(dict.fromkeys(u.subset for u in self.utterances if u.subset is not None))


def read_audio_folder(folder: str | os.PathLike, *, require_transcripts: bool = True,
                      subsets: Sequence[str] | None = None) -> AudioSet:
    """The utterances below `folder` with their transcripts and subsets (headers of the audio read,
    not the samples: `check_decodable` and `load_audio` read those). `subsets` keeps only the
    utterances of those manifest subsets."""
    root = Path(folder).expanduser()
    if not root.exists():
        raise NormswapError(f"audio folder {folder} not found")
    if not root.is_dir():
        raise NormswapError(f"audio folder {folder} is a file, not a folder")
    files, trans_files = _walk(root)
    if not files:
        raise NormswapError(f"audio folder {folder} has no audio files ({', '.join(s.lstrip('.') for s in AUDIO_SUFFIXES[:4])}, ...)")
    tsv = root / TRANSCRIPTS_FILE
    texts: dict[str, str] | None = None
    sources: list[Path] = []
    if tsv.exists():
        texts, sources = read_transcripts(tsv), [tsv]
    elif trans_files:
        texts, sources = _read_librispeech(trans_files), trans_files
    elif require_transcripts:
        raise NormswapError(f"audio folder {folder} has no transcripts: expected {tsv} (id<TAB>text a line) "
                            f"or LibriSpeech *{LIBRISPEECH_SUFFIX} files")
    manifest = root / MANIFEST_FILE
    groups = read_manifest(manifest) if manifest.exists() else None
    utterances = []
    for uid, path in sorted(files.items()):
        text = None
        if texts is not None:
            if uid not in texts:
                raise NormswapError(f"no transcript for utterance {uid} ({path}) in {_names(sources, root)}")
            text = texts[uid]
        subset = None
        if groups is not None:
            if uid not in groups:
                raise NormswapError(f"{manifest} has no row for utterance {uid} ({path})")
            subset = groups[uid]
        utterances.append(_header(uid, path, text, subset))
    if texts is not None:
        extra = sorted(set(texts) - set(files))
        if extra:
            logger.warning("%s: %d transcript(s) without an audio file are ignored, e.g. %s", _names(sources, root), len(extra), extra[0])
    if subsets:
        if groups is None:
            raise NormswapError(f"subsets {', '.join(subsets)} were asked for, but audio folder {folder} has no {MANIFEST_FILE}")
        known = list(dict.fromkeys(u.subset for u in utterances))
        unknown = [s for s in subsets if s not in known]
        if unknown:
            raise NormswapError(f"{manifest} has no subset {unknown[0]!r}; its subsets are {', '.join(map(repr, known))}")
        utterances = [u for u in utterances if u.subset in subsets]
    return AudioSet(root=root, utterances=utterances, transcripts=sources, manifest=manifest if groups is not None else None)


def _names(files: list[Path], root: Path) -> str:
    if len(files) == 1:
        return str(files[0])
    return f"the *{LIBRISPEECH_SUFFIX} files of {root}"


def _walk(root: Path) -> tuple[dict[str, Path], list[Path]]:
    """Audio files by utterance id, and LibriSpeech transcript files, below `root` (hidden entries
    skipped, symbolic links to folders not followed, so a link loop cannot recurse forever)."""
    files: dict[str, Path] = {}
    trans: list[Path] = []

    def fail(err: OSError) -> None:
        raise NormswapError(f"cannot read audio folder {err.filename}: {err.strerror or err}")

    for dirpath, dirnames, filenames in os.walk(root, onerror=fail, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            if name.endswith(LIBRISPEECH_SUFFIX):
                trans.append(path)
                continue
            if not name.lower().endswith(AUDIO_SUFFIXES):
                continue
            uid = name[:name.rfind(".")]
            if uid in files:
                raise NormswapError(f"two audio files for utterance {uid}: {files[uid]} and {path}")
            files[uid] = path
    return files, trans


def _soundfile():
    """The soundfile module, or one line on how to get it (it bundles libsndfile in its wheels)."""
    try:
        import soundfile
    except (ImportError, OSError) as err:  # OSError: the package is there but libsndfile is not
        raise NormswapError(f"reading audio needs the soundfile package and libsndfile (pip install soundfile): {err}") from None
    return soundfile


def _header(uid: str, path: Path, text: str | None, subset: str | None) -> Utterance:
    sf = _soundfile()

    if not path.is_file():  # a FIFO or device named x.wav, or a dangling link
        raise NormswapError(f"audio file {path} is not a regular file")
    try:
        info = sf.info(str(path))
    except Exception as err:  # noqa: BLE001 - libsndfile's errors (LibsndfileError, RuntimeError, TypeError)
        raise NormswapError(f"cannot read audio file {path}: {_reason(err)}") from None
    if info.frames <= 0 or info.samplerate <= 0 or info.channels <= 0:
        raise NormswapError(f"audio file {path} is empty (no samples)")
    return Utterance(uid, path, text, subset, int(info.samplerate), int(info.frames), int(info.channels))


def _reason(err: Exception) -> str:
    msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if msg.startswith("Error opening"):  # "Error opening '/x.flac': Format not recognised." -> the reason alone
        msg = msg.split(": ", 1)[-1]
    return msg[:200]


def read_transcripts(path: Path) -> dict[str, str]:
    """`id<TAB>text` lines (an optional `id<TAB>text` header): utterance id -> reference text."""
    texts: dict[str, str] = {}
    first_line: dict[str, int] = {}
    rows = [(n, r) for n, r in readers.read_tsv(path, "transcripts file") if r and any(c.strip() for c in r)]
    if rows and [c.strip().lower() for c in rows[0][1]] == ["id", "text"]:
        rows = rows[1:]
    for n, row in rows:
        if len(row) == 1:
            raise NormswapError(f"{path}:{n}: expected id<TAB>text, found no tab")
        if len(row) > 2:
            raise NormswapError(f"{path}:{n}: {len(row)} columns; expected id<TAB>text (a tab inside the text?)")
        uid, text = row[0].strip(), row[1].strip()
        if not uid:
            raise NormswapError(f"{path}:{n}: empty utterance id")
        if not text:
            raise NormswapError(f"{path}:{n}: empty transcript for utterance {uid}")
        if uid in texts:
            raise NormswapError(f"{path}:{n}: utterance {uid} is listed twice (first on line {first_line[uid]})")
        texts[uid], first_line[uid] = text, n
    if not texts:
        raise NormswapError(f"transcripts file {path} is empty")
    return texts


def _read_librispeech(files: list[Path]) -> dict[str, str]:
    """LibriSpeech's `<speaker>-<chapter>.trans.txt` files: `id TEXT` a line."""
    texts: dict[str, str] = {}
    where: dict[str, str] = {}
    for f in files:
        for n, line in enumerate(readers.read_text(f, allow_empty=True).split("\n"), start=1):
            if not line.strip():
                continue
            uid, _, text = line.strip().partition(" ")
            if not text.strip():
                raise NormswapError(f"{f}:{n}: expected 'id TEXT', found no text")
            if uid in texts:
                raise NormswapError(f"{f}:{n}: utterance {uid} is listed twice (first at {where[uid]})")
            texts[uid], where[uid] = text.strip(), f"{f}:{n}"
    return texts


def read_manifest(path: Path) -> dict[str, str]:
    """utterance id -> subset, from a TSV file whose header has `id` and `subset` columns."""
    rows = [(n, r) for n, r in readers.read_tsv(path, "manifest file") if r and any(c.strip() for c in r)]
    if not rows:
        raise NormswapError(f"manifest file {path} is empty")
    header = [c.strip().lower() for c in rows[0][1]]
    missing = [c for c in ("id", "subset") if c not in header]
    if missing:
        raise NormswapError(f"{path}:{rows[0][0]}: the header has no {' and no '.join(map(repr, missing))} column "
                            f"(expected a header such as id<TAB>subset)")
    i_id, i_subset = header.index("id"), header.index("subset")
    groups: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for n, row in rows[1:]:
        if len(row) != len(header):
            raise NormswapError(f"{path}:{n}: {len(row)} columns but the header has {len(header)}")
        uid, subset = row[i_id].strip(), row[i_subset].strip()
        if not uid or not subset:
            raise NormswapError(f"{path}:{n}: empty {'id' if not uid else 'subset'}")
        if uid in groups:
            raise NormswapError(f"{path}:{n}: utterance {uid} is listed twice (first on line {first_line[uid]})")
        groups[uid], first_line[uid] = subset, n
    return groups


def subset_names(names: str | Sequence[str] | None, option: str) -> list[str] | None:
    """Manifest subset names as an option gives them ("test-clean,dev-clean" or a list), stripped;
    None where none was given. Given but empty is one line naming `option`."""
    if names is None:
        return None
    parts = names.split(",") if isinstance(names, str) else list(names)
    found = [s.strip() for s in parts if s.strip()]
    if not found:
        raise NormswapError(f"{option} is empty: give subset names from the folder's {MANIFEST_FILE}, e.g. test-clean,dev-clean")
    return found


def check_lengths(data: AudioSet, max_seconds: float | None, what: str) -> None:
    """Refuse an utterance longer than `max_seconds` (the model's input window, e.g. Whisper's 30 s)."""
    if max_seconds is None:
        return
    for u in data.utterances:
        if u.seconds > max_seconds + 1e-9:
            raise NormswapError(f"audio file {u.path} is {u.seconds:.1f} s long; {what} transcribes at most {max_seconds:g} s "
                                "per utterance (split it into shorter files)")


def load_audio(utt: Utterance, sample_rate: int) -> np.ndarray:
    """The samples of one utterance: float32, mono (channels averaged), at `sample_rate`.

    A file that ends before its header's frame count (truncated) or holds NaN or infinite samples
    is an error naming it."""
    sf = _soundfile()

    try:
        x, rate = sf.read(str(utt.path), dtype="float32", always_2d=True)
    except Exception as err:  # noqa: BLE001 - libsndfile's errors
        raise NormswapError(f"cannot read audio file {utt.path}: {_reason(err)}") from None
    if x.shape[0] == 0:
        raise NormswapError(f"audio file {utt.path} is empty (no samples)")
    if x.shape[0] < utt.frames:
        raise NormswapError(f"audio file {utt.path} is truncated: {x.shape[0]} of the {utt.frames} samples its header announces")
    if not np.isfinite(x).all():
        raise NormswapError(f"audio file {utt.path} holds NaN or infinite samples")
    mono = x.mean(axis=1) if x.shape[1] > 1 else x[:, 0]
    if rate != sample_rate:
        mono = resample(mono, rate, sample_rate)
    return np.ascontiguousarray(mono, dtype=np.float32)


def resample(x: np.ndarray, rate: int, target: int) -> np.ndarray:
    """`x` from `rate` to `target` Hz: polyphase filtering by target/rate reduced to lowest terms
    (a Kaiser-windowed FIR with scipy's defaults, as librosa's "polyphase" mode)."""
    from scipy.signal import resample_poly

    g = math.gcd(int(rate), int(target))
    return resample_poly(x.astype(np.float64), target // g, rate // g).astype(np.float32)


def check_decodable(data: AudioSet, sample_rate: int) -> None:
    """Decode every file once (samples discarded), so that a truncated or damaged file fails before
    any model is loaded rather than in the middle of a transcription."""
    resampled = sorted({u.sample_rate for u in data.utterances if u.sample_rate != sample_rate})
    if resampled:
        n = sum(u.sample_rate != sample_rate for u in data.utterances)
        logger.info("resampling %d of %d audio file(s) from %s Hz to %d Hz (scipy.signal.resample_poly)",
                    n, len(data.utterances), "/".join(map(str, resampled)), sample_rate)
    for u in data.utterances:
        load_audio(u, u.sample_rate)
