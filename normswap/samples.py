"""Model inputs for calibration and verification: text packed into token blocks, and for speech
encoder-decoders (Whisper) log-mel features with teacher-forced decoder ids.

Without a tokenizer (tiny test models), for image models, or for speech without an audio folder,
seeded random inputs stand in. `model_inputs` is the dispatcher: it picks by the model's main input.
"""
from __future__ import annotations

import random
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from normswap.audio import Utterance, check_lengths, load_audio, read_audio_folder
from normswap.errors import NormswapError


def default_text() -> str:
    """The built-in sample (original prose shipped with normswap), so commands work without data."""
    return resources.files("normswap").joinpath("data/sample.txt").read_text(encoding="utf-8")


def max_positions(model: nn.Module) -> int:
    cfg = model.config
    for key in ("n_positions", "max_position_embeddings", "seq_length", "n_ctx", "max_seq_len"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return 2048


ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "distilbert", "electra"}


def is_encoder(model: nn.Module) -> bool:
    """Bidirectional text models (BERT family): blocks get [CLS] ... [SEP]."""
    return model.config.model_type in ENCODER_TYPES and not getattr(model.config, "is_decoder", False)


def token_blocks(
    model: nn.Module,
    tokenizer,
    text: str | None,
    *,
    n_tokens: int,
    block: int = 128,
    batch_size: int = 8,
    seed: int = 0,
    what: str = "calibration text",
) -> list[dict[str, torch.Tensor]]:
    """Batches of equal-length blocks covering about `n_tokens` tokens of `text` (no padding).

    `text` None means the built-in sample. Seeded random token ids stand in only where no text was
    given and there is no tokenizer (tiny test models; the caller says so in its warnings); given
    text without a tokenizer, or for an image model (random images stand in), is an error naming
    `what` ("calibration text", "verification text").

    A text encoder-decoder (main input `input_ids`, `config.is_encoder_decoder`: BART, mBART,
    Marian, Pegasus, M2M-100, T5) gets each block as `input_ids` and, teacher-forced on the same
    text, as `decoder_input_ids` shifted right by one: the config's `decoder_start_token_id` first
    (else the generation config's, else the pad, bos or eos id, else 0), the block's last token
    dropped. Encoder-decoders with another main input (speech: `speech_batches`; images in, text
    out) and other main inputs are refused (NormswapError)."""
    cfg = model.config
    main_input = getattr(model, "main_input_name", "input_ids")
    seq2seq = bool(getattr(cfg, "is_encoder_decoder", False))
    if main_input not in ("input_ids", "pixel_values") or (seq2seq and main_input != "input_ids"):
        # Speech (input_features), image encoder-decoders: text blocks are not inputs these models accept
        raise NormswapError(f"{type(model).__name__} takes {main_input}{' and decoder inputs' if getattr(cfg, 'is_encoder_decoder', False) else ''}: "
                            f"normswap cannot build calibration or verification inputs for it yet, so it cannot convert it measurably")
    if getattr(cfg, "model_type", "") == "vit" or "pixel_values" in main_input:
        if text is not None:
            raise NormswapError(f"{type(model).__name__} takes images, not text: the {what} cannot be used")
        size = getattr(cfg, "image_size", 224)
        g = torch.Generator().manual_seed(seed)
        n_images = max(1, n_tokens // max(1, (size // getattr(cfg, "patch_size", 16)) ** 2))
        return [{"pixel_values": torch.randn(min(batch_size, n_images - i), getattr(cfg, "num_channels", 3), size, size, generator=g)}
                for i in range(0, n_images, batch_size)]
    block = min(block, max_positions(model))
    encoder = is_encoder(model)
    body = block - 2 if encoder else block
    if tokenizer is None:
        if text is not None:
            raise NormswapError(f"{type(model).__name__} has no tokenizer: cannot tokenise the {what} "
                                "(add the tokenizer files to the model folder)")
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, cfg.vocab_size, (max(n_tokens, body),), generator=g).tolist()
    else:
        text = default_text() if text is None else text
        if not text.strip():
            raise NormswapError(f"{what} is empty")
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) < body:
            raise NormswapError(f"{what} is too short: {len(ids)} tokens, need at least {body}")
    n_blocks = max(1, min(len(ids) // body, -(-n_tokens // body)))
    rows = []
    for i in range(n_blocks):
        chunk = ids[i * body:(i + 1) * body]
        if encoder and tokenizer is not None:
            chunk = [tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id] + chunk + [
                tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id]
        rows.append(chunk)
    t = torch.tensor(rows, dtype=torch.long)
    if seq2seq:
        start = 0  # decoder_start_token_id (config, then generation config), else pad, bos, eos, else 0
        gen = getattr(model, "generation_config", None)
        for src, key in ((cfg, "decoder_start_token_id"), (gen, "decoder_start_token_id"),
                         (cfg, "pad_token_id"), (cfg, "bos_token_id"), (cfg, "eos_token_id")):
            v = getattr(src, key, None)
            v = (v[0] if v else None) if isinstance(v, (list, tuple)) else v
            if isinstance(v, int) and v >= 0:
                start = v
                break
        d = torch.cat([torch.full((len(t), 1), start, dtype=torch.long), t[:, :-1]], dim=1)
        return [{"input_ids": t[i:i + batch_size], "decoder_input_ids": d[i:i + batch_size]} for i in range(0, len(t), batch_size)]
    return [{"input_ids": t[i:i + batch_size]} for i in range(0, len(t), batch_size)]


# ------------------------------------------------------------------------------------------- speech


def is_speech(model: nn.Module) -> bool:
    """A speech encoder-decoder (Whisper): log-mel `input_features` in, decoder token ids out."""
    return getattr(model, "main_input_name", None) == "input_features" and bool(getattr(model.config, "is_encoder_decoder", False))


def _token_id(tokenizer, token: str) -> int | None:
    if tokenizer is None:
        return None
    i = tokenizer.convert_tokens_to_ids(token)
    return i if isinstance(i, int) and i != tokenizer.unk_token_id else None


def decoder_prompt(model: nn.Module, tokenizer=None) -> list[int]:
    """The forced decoder prefix of greedy decoding without timestamps, as Whisper's `generate`
    builds it (`_retrieve_init_tokens`) with `return_timestamps=False` (and, for multilingual models,
    `language="en", task="transcribe"`, as `normswap eval --asr` decodes): <|startoftranscript|>,
    then <|en|> <|transcribe|> for multilingual models, then <|notimestamps|>. For whisper-tiny.en
    that is [50257, 50362]. Ids come from the generation config (`decoder_start_token_id`,
    `lang_to_id`, `task_to_id`, the legacy `forced_decoder_ids`, `no_timestamps_token_id`), the
    tokenizer's special tokens filling what an older config lacks."""
    gen, cfg = getattr(model, "generation_config", None), model.config
    start = getattr(gen, "decoder_start_token_id", None)
    start = start if start is not None else getattr(cfg, "decoder_start_token_id", None)
    start = start if start is not None else _token_id(tokenizer, "<|startoftranscript|>")
    if start is None:
        raise NormswapError(f"{type(model).__name__} has no decoder_start_token_id (generation_config.json or config.json)")
    prompt = [start]
    no_ts = getattr(gen, "no_timestamps_token_id", None)
    no_ts = no_ts if no_ts is not None else _token_id(tokenizer, "<|notimestamps|>")
    lang_to_id, task_to_id = getattr(gen, "lang_to_id", None) or {}, getattr(gen, "task_to_id", None) or {}
    multilingual = getattr(gen, "is_multilingual", None)
    if multilingual is None:
        multilingual = bool(lang_to_id)
    if multilingual:
        lang = lang_to_id.get("<|en|>", _token_id(tokenizer, "<|en|>"))
        task = task_to_id.get("transcribe", _token_id(tokenizer, "<|transcribe|>"))
        if lang is None or task is None:
            raise NormswapError(f"{type(model).__name__} is multilingual but its generation config has no <|en|> or "
                                "transcribe token id (lang_to_id, task_to_id)")
        prompt += [lang, task]
    else:
        # legacy configs force positions 1, 2, ... (for tiny.en: [[1, 50362]]); a None is "detect"
        forced = getattr(gen, "forced_decoder_ids", None) or getattr(cfg, "forced_decoder_ids", None) or []
        for i, (pos, tok) in enumerate(sorted(forced), start=1):
            if pos != i:
                break
            if tok is not None and tok != no_ts:
                prompt.append(int(tok))
    if no_ts is not None:
        prompt.append(no_ts)
    return prompt


def eos_id(model: nn.Module, tokenizer=None) -> int:
    """The id that ends a decoder sequence: the generation config's, the config's, the tokenizer's."""
    for src in (getattr(model, "generation_config", None), model.config, tokenizer):
        eos = getattr(src, "eos_token_id", None)
        if isinstance(eos, (list, tuple)):
            eos = eos[0] if eos else None
        if eos is not None:
            return int(eos)
    raise NormswapError(f"{type(model).__name__} has no eos_token_id (generation_config.json or config.json)")


def _max_target(model: nn.Module) -> int:
    return int(getattr(model.config, "max_target_positions", None) or 448)


def sentence_case(text: str) -> str:
    """`text` as Whisper writes it when it is all upper case (LibriSpeech's references): lower-cased
    with its first character capitalised (after any leading quote or bracket), white space folded.
    Text with any lower-case letter is kept as it is (white space folded)."""
    text = " ".join(text.split())
    if any(c.islower() for c in text):
        return text
    low = text.lower()
    i = next((i for i, c in enumerate(low) if c.isalnum()), None)  # past leading quotes; a digit stays first
    return low if i is None else low[:i] + low[i].upper() + low[i + 1:]


def teacher_forced_ids(model: nn.Module, tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Decoder ids that teacher-force each transcript: `decoder_prompt`, the tokens of " " + text,
    then eos, truncated to the model's `max_target_positions`.

    Whisper's greedy output starts its text with a space token ("ĠHe", "Ġcould", ...; checked on
    whisper-tiny.en), hence the leading space. LibriSpeech transcripts are ALL UPPER CASE while
    Whisper writes natural case: upper-case BPE tokens are rare, so forcing them would calibrate and
    verify the decoder on inputs it never produces (and that tokenise into about twice as many
    pieces). A transcript without any lower-case letter is therefore put into sentence case first
    (`sentence_case`); proper nouns and "I" stay lower case, the nearest one can get without a
    truecaser."""
    if tokenizer is None:
        raise NormswapError(f"{type(model).__name__} has no tokenizer: cannot tokenise transcripts (add the tokenizer files to the model folder)")
    prompt, eos, limit = decoder_prompt(model, tokenizer), eos_id(model, tokenizer), _max_target(model)
    out = []
    for text in texts:
        body = tokenizer(" " + sentence_case(text), add_special_tokens=False)["input_ids"]
        out.append((prompt + list(body) + [eos])[:limit])
    return out


def speech_features(processor: Any, utterances: Sequence[Utterance]) -> torch.Tensor:
    """Log-mel features [n, n_mels, frames], float32, from the checkpoint's own feature extractor at
    its own sampling rate (audio resampled to it), each utterance padded to the extractor's window
    (Whisper: 30 s, 3000 frames; its encoder accepts nothing else)."""
    fe = processor.feature_extractor
    rate = int(fe.sampling_rate)
    audio = [load_audio(u, rate) for u in utterances]
    feats = fe(audio, sampling_rate=rate, return_tensors="pt").input_features
    return feats.to(torch.float32)


# Stand-ins for a speech model without an audio folder: decoder length after the prompt, and the
# range of the features. Whisper's log-mel is (max(log10 S, max - 8) + 4) / 4, so one utterance's
# values span 2 units, about [-1, 1] on speech (-0.72 to 1.28 on a LibriSpeech utterance).
RANDOM_DECODER_TOKENS = 30
RANDOM_FEATURE_RANGE = (-1.0, 1.0)


def _random_speech(model: nn.Module, tokenizer, n: int, batch_size: int, seed: int) -> list[dict[str, torch.Tensor]]:
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    prompt = torch.tensor(decoder_prompt(model, tokenizer), dtype=torch.long)
    length = max(len(prompt) + 1, min(_max_target(model), len(prompt) + RANDOM_DECODER_TOKENS))
    lo, hi = RANDOM_FEATURE_RANGE
    out = []
    for i in range(0, n, batch_size):
        k = min(batch_size, n - i)
        feats = torch.rand(k, cfg.num_mel_bins, 2 * cfg.max_source_positions, generator=g) * (hi - lo) + lo
        body = torch.randint(0, cfg.vocab_size, (k, length - len(prompt)), generator=g)
        out.append({"input_features": feats, "decoder_input_ids": torch.cat([prompt.expand(k, -1), body], dim=1)})
    return out


@torch.no_grad()
def greedy_ids(model: nn.Module, teacher: nn.Module, features: torch.Tensor, tokenizer=None, *, batch_size: int = 8) -> list[list[int]]:
    """Decoder ids from `teacher`'s greedy decode of `features` without timestamps (the protocol of
    `normswap eval --asr`): `model`'s `decoder_prompt`, the tokens the teacher emitted, and eos when
    it emitted one (not when it stopped at its max length), within `max_target_positions`."""
    import warnings

    import transformers

    p = next(teacher.parameters())
    prompt, eos, limit = decoder_prompt(model, tokenizer), eos_id(teacher, tokenizer), _max_target(model)
    teacher_prompt = decoder_prompt(teacher, tokenizer)
    kwargs: dict[str, Any] = {"do_sample": False, "num_beams": 1, "return_dict_in_generate": True}
    if teacher.config.model_type == "whisper":
        kwargs["return_timestamps"] = False
        if getattr(teacher.generation_config, "is_multilingual", False):
            kwargs.update(language="en", task="transcribe")
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # Whisper's generate warns about its own defaults
    out = []
    try:
        for k in range(0, len(features), batch_size):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                seqs = teacher.generate(input_features=features[k:k + batch_size].to(device=p.device, dtype=p.dtype), **kwargs)
            seqs = seqs if isinstance(seqs, torch.Tensor) else seqs.sequences
            for row in seqs.tolist():
                if row[:len(teacher_prompt)] == teacher_prompt:  # return_dict_in_generate keeps the prompt; a bare tensor may not
                    row = row[len(teacher_prompt):]
                body = row[:row.index(eos) + 1] if eos in row else row  # padding after eos dropped
                out.append((prompt + body)[:limit])
    finally:
        transformers.logging.set_verbosity(verbosity)
    return out


def speech_batches(
    model: nn.Module,
    *,
    processor: Any,
    tokenizer=None,
    audio: str | Path | None,
    n_utterances: int = 16,
    batch_size: int = 1,
    seed: int = 0,
    what: str = "calibration audio",
    teacher: nn.Module | None = None,
    subsets: Sequence[str] | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Batches of `input_features` (float32, [b, n_mels, frames]) and `decoder_input_ids` for a
    speech encoder-decoder: the first `n_utterances` utterances of the `audio` folder in a seeded
    shuffled order, each decoder teacher-forced on its transcript (`teacher_forced_ids`) or, in a
    folder without transcripts, on `teacher`'s greedy decode (`greedy_ids`; the original model,
    which the caller must give).

    No padding: with `batch_size` 1 (the default) each batch is one utterance and its whole decoder
    sequence. With a larger `batch_size` the chosen utterances are sorted by decoder length and
    grouped in that order, each group's decoder ids cut to its shortest (so a longer one loses its
    last tokens, eos included, rather than being padded with tokens the model never reads).

    `audio` None: seeded random stand-ins (features uniform in RANDOM_FEATURE_RANGE of shape
    [1, num_mel_bins, 2 * max_source_positions], decoder ids the prompt then random ids), as
    `token_blocks` does for tiny text models without a tokenizer; the caller warns. Every problem
    with the folder is one NormswapError line starting with `what` ("calibration audio (--calib-audio)").
    `subsets` keeps only those manifest subsets (calibrate on train, evaluate on test)."""
    name = type(model).__name__
    if not is_speech(model):
        raise NormswapError(f"{name} takes {getattr(model, 'main_input_name', 'input_ids')}, not audio: the {what} cannot be used")
    if n_utterances < 1 or batch_size < 1:
        raise NormswapError(f"{what}: need at least one utterance a batch, got n_utterances={n_utterances}, batch_size={batch_size}")
    if tokenizer is None:
        tokenizer = getattr(processor, "tokenizer", None)
    if audio is None:
        return _random_speech(model, tokenizer, n_utterances, batch_size, seed)
    if processor is None or getattr(processor, "feature_extractor", None) is None:
        raise NormswapError(f"{what}: {name} has no speech processor (preprocessor_config.json with a feature extractor), "
                            "so its audio cannot be turned into features")
    from normswap.evaluation.asr import max_seconds

    try:
        data = read_audio_folder(audio, require_transcripts=False, subsets=subsets)
        check_lengths(data, max_seconds(processor), name)
        order = list(range(len(data.utterances)))
        random.Random(seed).shuffle(order)
        chosen = [data.utterances[i] for i in order[:n_utterances]]
        feats = speech_features(processor, chosen)
    except NormswapError as err:
        raise NormswapError(f"{what}: {err}") from None
    if all(u.text is not None for u in chosen):
        ids = teacher_forced_ids(model, tokenizer, [u.text for u in chosen])
    elif teacher is None:
        raise NormswapError(f"{what}: {audio} has no transcripts, so the decoder inputs must come from the original model's "
                            "transcription, and none was given (add transcripts.tsv, id<TAB>text a line)")
    else:
        ids = greedy_ids(model, teacher, feats, tokenizer)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i])) if batch_size > 1 else list(range(len(ids)))
    out = []
    for k in range(0, len(order), batch_size):
        idx = order[k:k + batch_size]
        n = min(len(ids[i]) for i in idx)
        out.append({"input_features": feats[idx], "decoder_input_ids": torch.tensor([ids[i][:n] for i in idx], dtype=torch.long)})
    return out


AUDIO_OPTIONS = {"calibration": "--calib-audio", "verification": "--verify-audio"}


def utterances_for(n_tokens: int) -> int:
    """How many utterances stand for `n_tokens` calibration or verification tokens: one per 256
    (a LibriSpeech utterance is ~12 s, ~1/3 of Whisper's 1500 encoder positions, and ~40 decoder
    tokens), between 1 and 32: --calib-tokens 4096 gives 16 utterances, verification's 1024 gives 4."""
    return max(1, min(32, n_tokens // 256))


def model_inputs(
    model: nn.Module,
    *,
    tokenizer=None,
    processor: Any = None,
    text: str | None = None,
    audio: str | Path | None = None,
    n_tokens: int,
    block: int = 128,
    batch_size: int = 8,
    seed: int = 0,
    what: str = "calibration",
    teacher: nn.Module | None = None,
    n_utterances: int | None = None,
    audio_subsets: Sequence[str] | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Calibration or verification batches for any model normswap converts: `speech_batches` for a
    speech encoder-decoder (`n_utterances`, else `utterances_for(n_tokens)` utterances, one a
    batch, so `block` and `batch_size` do not apply), else `token_blocks` (text and image models;
    text encoder-decoders get teacher-forced decoder ids too). `what` names the purpose, "calibration" or
    "verification": errors say "calibration text" or "calibration audio (--calib-audio)"."""
    name = type(model).__name__
    if is_speech(model):
        if text is not None:
            raise NormswapError(f"{name} takes audio, not text: use --calib-audio/--verify-audio instead of the {what} text")
        option = AUDIO_OPTIONS.get(what)
        return speech_batches(model, processor=processor, tokenizer=tokenizer, audio=audio, seed=seed, teacher=teacher, subsets=audio_subsets,
                              n_utterances=n_utterances if n_utterances is not None else utterances_for(n_tokens),
                              what=f"{what} audio ({option})" if option else f"{what} audio")
    if audio is not None:
        raise NormswapError(f"{name} takes {getattr(model, 'main_input_name', 'input_ids')}, not audio: "
                            f"the {what} audio is for speech models (use text instead)")
    return token_blocks(model, tokenizer, text, n_tokens=n_tokens, block=block, batch_size=batch_size, seed=seed, what=f"{what} text")
