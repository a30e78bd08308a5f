"""`finetune(...)`: recovery fine-tuning of a converted model, from paths to a saved, loadable result.

This module wires the pieces together and checks the user's input up front (each mistake is one
NormswapError line): output folder, budget, vocabularies, data. The loop itself is in `loop.py`.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from normswap.errors import NormswapError
from normswap.log import logger
from normswap.training.config import TrainConfig
from normswap.training.data import TrainData, build_data, build_speech_data
from normswap.evaluation.results import write_json
from normswap.outputs import swap_into_place
from normswap.training.checkpoint import CHECKPOINTS, latest_checkpoint
from normswap.training.loop import LoopResult, train_loop
from normswap.training.objectives import Objective, model_kind, parse_objective
from normswap.training.params import select_trainable
from normswap.training.progressive import Schedule, default_every, describe, set_mix, unwrap_sites, wrap_sites
from normswap.training.report import LOG_NAME, PLOT_NAME, TrainLog, plot_losses

CONFIG_FILE = "finetune_config.json"
RESULT_FILE = "finetune_result.json"
# What a run writes beside its model; never taken from the student folder (which has them if it was fine-tuned)
TRAINING_FILES = frozenset({CHECKPOINTS, LOG_NAME, PLOT_NAME, CONFIG_FILE, RESULT_FILE})


@dataclass(kw_only=True)
class FinetuneResult(LoopResult):
    """What a run did: the loop's outcome (steps, tokens, losses) plus where it wrote and how."""

    out: str
    objective: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    # causal LMs: the per-token loss distribution on the held-out examples (evaluation.token_losses),
    # {"examples", "teacher", "before", "after"}: the teacher, the student before and after training
    token_losses: dict[str, Any] = field(default_factory=dict)
    # --progressive: {"order", "every", "fade", "sites": [{"path", "group", "start", "why"}, ...]}
    progressive: dict[str, Any] = field(default_factory=dict)
    device: str = ""  # where the (main) process trained: "cpu", "cuda:0", "mps"
    dtype: str = ""  # the saved weights' dtype (the student trains on float32 master weights)
    precision: str = ""  # the arithmetic: "float32", or the mixed-precision dtype ("bfloat16", "float16")
    teacher_dtype: str | None = None  # the teacher's weights (frozen; half under mixed precision)
    gradient_checkpointing: bool = False
    # how the processes shared the work: {"processes", "type": "single" | "ddp" | "fsdp", "fsdp_version"}
    distributed: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _one_run_per_folder(fn: Callable[..., FinetuneResult]) -> Callable[..., FinetuneResult]:
    """Hold the lock of `out` while the run lasts (see `normswap.locking.folder_lock`); under
    `accelerate launch` only the main process locks (the others are part of the same run)."""
    import functools

    @functools.wraps(fn)
    def run(student: str | os.PathLike, *, out: str | os.PathLike, **kwargs: Any) -> FinetuneResult:
        from contextlib import nullcontext

        from normswap.locking import folder_lock

        config = kwargs.get("config")
        spec = kwargs.get("device", getattr(config, "device", None) if config is not None else None)
        state = start_state(spec)  # before anything else asks accelerate which process this is
        with folder_lock(Path(out), "finetune") if state.is_main_process else nullcontext():
            return fn(student, out=out, **kwargs)

    return run


@_one_run_per_folder
def finetune(
    student: str | os.PathLike,
    *,
    data: str | os.PathLike | None = None,
    out: str | os.PathLike,
    teacher: str | os.PathLike | None = None,
    config: TrainConfig | None = None,
    overwrite: bool = False,
    resume: bool = False,
    on_step: Callable[[int, dict[str, Any], nn.Module], None] | None = None,
    audio: str | os.PathLike | None = None,
    audio_subsets: Sequence[str] | None = None,
    retain_checkpoints: bool = False,
    **overrides: Any,
) -> FinetuneResult:
    """Fine-tune the converted model at `student` on `data` and save it to `out` in normswap's format.

    A speech encoder-decoder (Whisper) trains on `audio` instead: a folder of audio files with
    transcripts (as `normswap eval --asr` reads it; `audio_subsets` keeps some subsets of its
    manifest.tsv), teacher-forced on the transcripts; its budget is `steps`.

    `config` (or keyword overrides of its fields, e.g. `steps=100, objective="distill"`) sets the run.
    With `resume`, training continues from the newest checkpoint in `out` with the saved settings'
    data order, optimizer, scheduler and RNG, so the result matches an uninterrupted run.
    `device` ("auto": the first accelerator, else the CPU; under a multi-process `accelerate launch`
    the launcher places each process, and a conflicting explicit device is an error) and `dtype`
    (the saved weights' and the teacher's dtype; "auto": the student checkpoint's own) are fields of
    the config like the others. The student trains on float32 master weights, computing in
    `precision` ("auto": the launcher's mixed precision, else a half `dtype`'s, else bf16/fp16 on
    CUDA and float32 elsewhere). `gradient_checkpointing` recomputes activations in backward.
    Under `accelerate launch` with an FSDP config the student and the teacher are sharded
    (`normswap.training.sharding`); checkpoints and the final model are gathered whole.
    With `overwrite`, an existing `out` is replaced only once the new run is complete: until then
    the run lives in a staging folder beside it (see `work_folder`), which `resume` continues.
    Returns a FinetuneResult; an interrupted run (Ctrl-C) returns status "interrupted" after
    saving a checkpoint. Raises NormswapError on bad input and TrainingDiverged on NaN/inf loss.
    One run per `out`: while it runs, another one refuses (see `normswap.locking.folder_lock`).
    Once a run completes and its final model is saved, its training checkpoints (`checkpoints/`,
    needed only to resume, each about three times the model) are deleted unless
    `retain_checkpoints`; an interrupted or time-limited run keeps them, so it can be continued.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    from normswap.devices import device_name
    from normswap.loading import is_converted, load_pretrained, load_tokenizer, read_record
    from normswap.training.sharding import enable_cpu_fsdp, fsdp_version, gather_model_state, is_fsdp

    cfg = TrainConfig.from_dict({**(config or TrainConfig()).to_dict(), **overrides})
    unknown = set(overrides) - set(cfg.to_dict())
    if unknown:
        raise TypeError(f"unknown finetune settings: {sorted(unknown)}")
    cfg.check()
    weights = parse_objective(cfg.objective)
    out = Path(out)
    subsets = _check_source(data, audio, audio_subsets, cfg)
    student, data, audio = str(student), str(data) if data is not None else None, str(audio) if audio is not None else None
    source = audio if audio is not None else data
    teacher = str(teacher) if teacher is not None else None
    state = start_state(cfg.device)
    if not state.is_main_process:  # under `accelerate launch`: one process reports
        logger.setLevel(logging.WARNING)
    work = work_folder(out, overwrite=overwrite, resume=resume,
                       inputs={"student": student, "teacher": teacher, "data": data, "audio": audio})
    state.wait_for_everyone()  # every process has chosen `work` before the main one writes to it
    if resume:
        _check_resume_config(work, cfg, student=student, teacher=teacher, data=data, audio=audio, audio_subsets=subsets)
    if (weights.get("distill", 0) > 0 or cfg.progressive) and teacher is None:
        raise NormswapError("--teacher is needed for " + ("the distill objective" if weights.get("distill", 0) > 0 else "--progressive"))
    if audio is not None:  # the folder's problems are one line before any model loads
        from normswap.audio import read_audio_folder

        speech = read_audio_folder(audio, subsets=subsets)

    out_dtype = _saved_dtype(cfg.dtype, student)
    mixed = _mixed_precision(cfg.precision, state.device.type, out_dtype)
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)] if cfg.progressive else []
    _fresh_accelerator_state(state, mixed)
    accelerator = Accelerator(cpu=state.device.type == "cpu", mixed_precision=mixed, kwargs_handlers=handlers)
    enable_cpu_fsdp(accelerator)  # an FSDP config on CPU processes: accelerate itself would not shard
    fsdp = is_fsdp(accelerator)
    sharding_version = fsdp_version(accelerator)
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision)
    teacher_dtype = half or out_dtype  # the frozen teacher runs in the lower precision

    model = load_pretrained(student)  # float32: the master weights
    record = read_record(student)[0] if is_converted(student) else None
    if cfg.progressive and record is None:
        raise NormswapError(f"--progressive needs a converted student; {student} is a plain checkpoint")
    tokenizer = load_tokenizer(student)
    if tokenizer is None:
        raise NormswapError(f"student {student} has no tokenizer files")
    kind = model_kind(model)
    if audio is not None and kind != "speech":
        raise NormswapError(f"--audio needs a speech encoder-decoder student (such as WhisperForConditionalGeneration); "
                            f"{student} is a {type(model).__name__}")
    if audio is None and kind == "speech":
        raise NormswapError(f"{student} is a speech encoder-decoder ({type(model).__name__}): train it on speech with --audio DIR, not --data")
    if cfg.gradient_checkpointing:
        _enable_gradient_checkpointing(model, student, accelerator)
    teacher_model = None
    if teacher is not None:
        teacher_model = load_pretrained(teacher, dtype=teacher_dtype)
        if kind == "speech" and model_kind(teacher_model) != "speech":
            raise NormswapError(f"teacher {teacher} is a {type(teacher_model).__name__}, not a speech encoder-decoder like {student}")
        check_vocabularies(student, model, tokenizer, teacher, teacher_model, load_tokenizer(teacher))
        if weights.get("distill", 0) > 0 and kind != "encoder" and model_kind(teacher_model) == "encoder":
            raise NormswapError(f"teacher {teacher} has no LM head, so it has no logits to distil into {student}")
    objective = Objective(
        weights=weights, kind=kind, temperature=cfg.temperature,
        hidden_weight=cfg.hidden_weight if cfg.hidden_weight is not None else (1.0 if kind == "encoder" else 0.0),
        pooled_weight=cfg.pooled_weight, center_hidden=bool(record and record.style == "pre"),
        mask_token_id=getattr(tokenizer, "mask_token_id", None), special_ids=list(getattr(tokenizer, "all_special_ids", [])),
        vocab_size=int(getattr(model.config, "vocab_size", 0) or 0),
    )
    objective.check()

    processor = None
    if audio is not None:
        from normswap.evaluation.asr import load_processor

        processor = load_processor(student)
        data_ = build_speech_data(speech, model, tokenizer, processor, seed=cfg.seed, val_examples=cfg.val_examples, what=student)
    else:
        max_len = _max_positions(model.config)
        block_size = cfg.block_size or min(256, max_len or 256)
        if max_len and block_size > max_len:
            raise NormswapError(f"--block-size {block_size} is longer than the model's maximum of {max_len} positions")
        packing = cfg.packing or ("lines" if kind == "encoder" else "blocks")
        cfg.block_size, cfg.packing = block_size, packing
        data_ = build_data(data, tokenizer, block_size=block_size, packing=packing, encoder=kind == "encoder",
                           seed=cfg.seed, val_examples=cfg.val_examples)
    total_steps = _total_steps(cfg, data_, accelerator.num_processes)
    if data_.speech:
        what = f"{len(data_.train)} training utterances ({data_.train.seconds(list(range(len(data_.train)))) / 60:.1f} min of audio, " \
               f"{data_.train.n_tokens()} decoder tokens)"
    else:
        what = f"{len(data_.train)} training examples ({data_.train.n_tokens()} tokens)"
    logger.info("%s: %s, %d held out; %d steps of %d x %d x %d examples", source, what, len(data_.val), total_steps,
                cfg.batch_size, cfg.grad_accum, accelerator.num_processes)

    example = data_.train.batch(list(range(min(2, len(data_.train)))))
    trainable = select_trainable(model, cfg.train, objective.model_inputs(example))
    logger.info("training %d parameter tensors (%s, %d parameters)", len(trainable), cfg.train,
                sum(p.numel() for p in model.parameters() if p.requires_grad))
    progressive, plan = None, {}
    if cfg.progressive:
        paths = wrap_sites(model, record, teacher_model, fallback_eps=_config_eps(model.config), order=cfg.swap_order)
        model.to(torch.float32)  # the original norms come from the teacher, maybe in half precision
        schedule = Schedule(every=cfg.swap_every or default_every(total_steps, len(paths)), fade=cfg.fade_steps)
        progressive = (paths, schedule)
        plan = {"order": cfg.swap_order, "every": schedule.every, "fade": schedule.fade,
                "sites": describe(record, cfg.swap_order, schedule)}
        _log_plan(plan, total_steps)
    causal_val = kind == "causal" and audio is None and len(data_.val) > 0
    val_stats = causal_val and accelerator.is_main_process
    token_stats: dict[str, Any] = {}
    if val_stats:
        token_stats = _token_stats_before(model, teacher_model, data_, cfg, tokenizer, accelerator.device, progressive)

    created = not work.exists()
    if accelerator.is_main_process:
        if not resume and work != out and work.exists():  # an earlier, abandoned replacement run
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        if not resume:
            (work / CONFIG_FILE).write_text(json.dumps({
                "student": student, "teacher": teacher, "data": data, "audio": audio, "audio_subsets": subsets,
                "total_steps": total_steps,
                "config": cfg.to_dict(), **provenance()}, indent=2, default=str) + "\n")
    accelerator.wait_for_everyone()

    sharded = None
    try:
        try:
            if fsdp:  # FSDP2 refuses 0-dim parameters (DyT's alpha): 1-element while sharded
                from normswap.training.sharding import promote_scalars

                sharded = promote_scalars(model)
            result = train_loop(model=model, teacher=teacher_model, objective=objective, data=data_, cfg=cfg,
                                total_steps=total_steps, out=work, accelerator=accelerator, resume=resume,
                                progressive=progressive, on_step=on_step, sharded=sharded)
        finally:
            if accelerator.is_main_process:
                plot_losses(TrainLog(work).read(), work / PLOT_NAME, title=f"{Path(student).name} <- {objective_label(weights)} on {Path(source).name}")
        from normswap.conversion import dtype_name

        final = FinetuneResult(
            out=str(out), objective=weights, config=cfg.to_dict(), token_losses=token_stats, progressive=plan,
            device="cpu" if accelerator.device.type == "cpu" else device_name(accelerator.device), dtype=dtype_name(out_dtype), precision=dtype_name(half or torch.float32),
            teacher_dtype=dtype_name(teacher_dtype) if teacher_model is not None else None,
            gradient_checkpointing=cfg.gradient_checkpointing,
            distributed={"processes": accelerator.num_processes,
                         "type": "fsdp" if fsdp else "ddp" if accelerator.num_processes > 1 else "single",
                         **({"fsdp_version": sharding_version} if fsdp else {})},
            **asdict(result))
        if result.status in ("completed", "time_limit"):
            if fsdp:  # gathered whole (a collective), rebuilt unsharded on the main process
                if causal_val and progressive is None:  # every process runs the sharded forward
                    after = _val_token_stats(model, data_, cfg, tokenizer)
                    if val_stats:
                        token_stats["after"] = after
                full = gather_model_state(model, accelerator, sharded)
                trained = _unsharded(student, full, progressive[0] if progressive else None) if accelerator.is_main_process else None
                if val_stats and progressive is not None:
                    token_stats["after"] = _val_token_stats(trained, data_, cfg, tokenizer)
            else:
                trained = accelerator.unwrap_model(model)
                if progressive is not None:
                    unwrap_sites(trained, progressive[0])
                if val_stats:
                    token_stats["after"] = _val_token_stats(trained, data_, cfg, tokenizer)
            if val_stats:
                _log_token_stats(token_stats)
            if accelerator.is_main_process:
                if cfg.gradient_checkpointing:
                    off = getattr(trained, "activation_checkpointing_disable", None) or getattr(trained, "gradient_checkpointing_disable", None)
                    if off is not None:
                        off()
                trained.to(out_dtype)
                save_final(trained, work, record, tokenizer, student=student, teacher=teacher, data=source, result=final,
                           processor=processor)
            accelerator.wait_for_everyone()
        drop = result.status == "completed" and not retain_checkpoints
        if drop:
            final.checkpoint = None  # about to go: the result must not name it
        if accelerator.is_main_process:
            write_json(work / RESULT_FILE, {**final.to_dict(), **provenance()})
            if drop:
                _drop_checkpoints(work)
            if work != out and result.status != "interrupted":
                swap_into_place(work, out)  # the old folder goes only now, by rename
        accelerator.wait_for_everyone()
    except BaseException:
        # A failed run leaves no folder behind unless it holds a checkpoint to resume from.
        if accelerator.is_main_process and created and work.is_dir() and latest_checkpoint(work) is None:
            shutil.rmtree(work, ignore_errors=True)
        raise
    if final.checkpoint and work != out and result.status == "interrupted":
        logger.info("the interrupted run is kept in %s until it completes; %s is unchanged", work, out)
    return final


def _log_plan(plan: dict[str, Any], total_steps: int) -> None:
    sites = plan["sites"]
    counts = {g: sum(s["group"] == g for s in sites) for g in ("mlp", "attn", "final")}
    how = "MLP norms, then attention norms, then the final norm(s)" if plan["order"] == "published" else "model order"
    logger.info("progressive: %d sites in %s order (%s: %d mlp, %d attn, %d final), one every %d steps%s: %s at step %d "
                "... %s at step %d of %d", len(sites), plan["order"], how, counts["mlp"], counts["attn"], counts["final"],
                plan["every"], f", fading over {plan['fade']} steps" if plan["fade"] else "", sites[0]["path"], sites[0]["start"],
                sites[-1]["path"], sites[-1]["start"], total_steps)
    if sites[-1]["start"] + plan["fade"] > total_steps:
        logger.warning("progressive: the last swaps start after the run's %d steps (%s at step %d): those sites end the run "
                       "unswapped in training, and are swapped only in the saved model; lower --swap-every or train longer",
                       total_steps, sites[-1]["path"], sites[-1]["start"])


def _val_token_stats(model: nn.Module, data: TrainData, cfg: TrainConfig, tokenizer: Any) -> dict[str, Any]:
    """The per-token loss distribution of a causal LM on the held-out examples (a dict)."""
    from normswap.evaluation.token_losses import token_loss_stats

    val = data.val
    batches = (val.batch(list(range(i, min(len(val), i + cfg.batch_size)))) for i in range(0, len(val), cfg.batch_size))
    return token_loss_stats(model, batches, tokenizer, worst=5).to_dict()


def _token_stats_before(model: nn.Module, teacher: nn.Module | None, data: TrainData, cfg: TrainConfig, tokenizer: Any,
                        device: Any, progressive: tuple[list[str], Schedule] | None) -> dict[str, Any]:
    """Teacher and student (as converted: every site swapped) on the held-out examples, before training."""
    stats: dict[str, Any] = {"examples": len(data.val), "data": "the held-out validation examples"}
    if teacher is not None:
        stats["teacher"] = _val_token_stats(teacher.to(device), data, cfg, tokenizer)
    model.to(device)
    if progressive is not None:
        set_mix(model, progressive[0], 1.0)  # the converted student; the loop sets each step's mix
    stats["before"] = _val_token_stats(model, data, cfg, tokenizer)
    if progressive is not None:
        set_mix(model, progressive[0], 0.0)
    return stats


def _log_token_stats(stats: dict[str, Any]) -> None:
    for role in ("teacher", "before", "after"):
        s = stats.get(role)
        if s:
            logger.info("token loss (%s, %d held-out tokens): mean %.4f median %.4f p99 %.4f p99.9 %.4f max %.4f",
                        role, s["tokens"], s["mean"], s["median"], s["p99"], s["p999"], s["max"])


def _drop_checkpoints(work: Path) -> None:
    """Delete a completed run's training checkpoints; a failure to delete is a warning, not a
    failed run (the final model is already saved)."""
    from normswap.training.checkpoint import drop_checkpoints

    try:
        freed = drop_checkpoints(work)
    except OSError as err:
        logger.warning("could not delete the training checkpoints in %s (%s); the final model is saved", work, err.strerror or err)
        return
    if freed:
        logger.info("deleted the training checkpoints (%.1f MB; only needed to resume an interrupted run)", freed / 2**20)


def objective_label(weights: dict[str, float]) -> str:
    return "+".join(k if len(weights) == 1 else f"{v:g}*{k}" for k, v in weights.items())


def check_vocabularies(student: str, s_model: nn.Module, s_tok: Any, teacher: str, t_model: nn.Module, t_tok: Any) -> None:
    """Teacher and student must share one vocabulary: same size, and the same tokens where both have tokenizers."""
    sv, tv = getattr(s_model.config, "vocab_size", None), getattr(t_model.config, "vocab_size", None)
    if sv is not None and tv is not None and sv != tv:
        raise NormswapError(f"teacher and student have different vocabularies: {teacher} has {tv} tokens, {student} has {sv}")
    if s_tok is not None and t_tok is not None and s_tok.get_vocab() != t_tok.get_vocab():
        raise NormswapError(f"teacher and student have different vocabularies: the tokenizers of {teacher} and {student} differ")


def staging_folder(out: Path) -> Path:
    """Where an --overwrite run of `out` lives until it completes (beside `out`, so the final
    move is a rename on the same file system)."""
    return out.parent / f".{out.name}.replacement"


def work_folder(out: Path, *, overwrite: bool, resume: bool, inputs: dict[str, str | None]) -> Path:
    """The folder this run writes into: `out` itself for a new folder or a resumed run, a staging
    folder beside it when --overwrite replaces an existing one (and when --resume continues such a
    replacement). Refuses an `out` that is, contains or lies inside an input; deletes nothing."""
    from normswap.outputs import check_output

    if overwrite and resume:
        raise NormswapError("give --overwrite or --resume, not both")
    staged = staging_folder(out)
    check_output(out, overwrite=overwrite, inputs=inputs, allow_existing=resume)
    check_output(staged, overwrite=True, inputs=inputs)
    if resume:
        for candidate in (staged, out):
            if candidate.is_dir() and latest_checkpoint(candidate) is not None:
                return candidate
        if not out.is_dir():
            raise NormswapError(f"nothing to resume: {out} does not exist")
        raise NormswapError(f"nothing to resume in {out}: no checkpoint")
    if out.exists():
        if not overwrite:
            raise NormswapError(f"output folder {out} exists (use --overwrite to replace it or --resume to continue)")
        return staged
    return out


def resumable(out: Path) -> bool:
    """True if `finetune(..., resume=True)` has an unfinished run of `out` to continue."""
    staged = staging_folder(out)
    if staged.is_dir() and latest_checkpoint(staged) is not None:
        return True
    return out.is_dir() and latest_checkpoint(out) is not None and not (out / "config.json").is_file()


def _check_source(data: Any, audio: Any, audio_subsets: Sequence[str] | None, cfg: TrainConfig) -> list[str] | None:
    """Exactly one data source; what speech does not take. Returns the subsets asked for."""
    if data is not None and audio is not None:
        raise NormswapError("give --data (text) or --audio DIR (speech), not both")
    if data is None and audio is None:
        raise NormswapError("no training data: give --data FILE (text) or --audio DIR (speech)")
    if audio_subsets is not None and audio is None:
        raise NormswapError("--audio-subsets needs --audio DIR")
    if audio is None:
        return None
    if cfg.tokens is not None:
        raise NormswapError("--audio takes its budget in --steps (--tokens counts text tokens)")
    for name in ("block_size", "packing"):
        if getattr(cfg, name) is not None:
            raise NormswapError(f"--{name.replace('_', '-')} is for text data; --audio batches whole utterances")
    from normswap.audio import subset_names

    return subset_names(audio_subsets, "--audio-subsets")


def _check_resume_config(out: Path, cfg: TrainConfig, *, student: str, teacher: str | None, data: str | None,
                         audio: str | None = None, audio_subsets: list[str] | None = None) -> None:
    """A resumed run must see the same data order and schedule as the interrupted one."""
    try:
        saved = json.loads((out / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        raise NormswapError(f"cannot resume {out}: {CONFIG_FILE} is missing or unreadable") from None
    saved_cfg = saved.get("config", {})
    if saved_cfg.get("progressive") and "swap_order" not in saved_cfg:
        saved_cfg = {**saved_cfg, "swap_order": "forward"}  # runs from before --swap-order swapped in forward order
    old = TrainConfig.from_dict(saved_cfg)
    diffs = [k for k in TrainConfig.RESUME_KEYS if k not in ("steps", "block_size", "packing")
             and getattr(cfg, k) != getattr(old, k)]
    if cfg.tokens is None and old.tokens is None and cfg.steps != old.steps:
        diffs.append("steps")
    if cfg.tokens != old.tokens:
        diffs.append("tokens")
    for k in ("block_size", "packing"):
        if getattr(cfg, k) is not None and getattr(cfg, k) != getattr(old, k):
            diffs.append(k)
    for name, now in (("student", student), ("teacher", teacher), ("data", data), ("audio", audio), ("audio_subsets", audio_subsets)):
        if saved.get(name) != now:
            diffs.append(name)
    if diffs:
        raise NormswapError(f"cannot resume {out}: settings differ from the interrupted run ({', '.join(diffs)})")


def _max_positions(config: Any) -> int | None:
    for attr in ("n_positions", "max_position_embeddings", "n_ctx", "seq_length"):
        v = getattr(config, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _config_eps(config: Any) -> float:
    for attr in ("layer_norm_epsilon", "layer_norm_eps", "rms_norm_eps"):
        v = getattr(config, attr, None)
        if v is not None:
            return float(v)
    return 1e-5


def _mixed_precision(precision: str, device_type: str = "cuda" if torch.cuda.is_available() else "cpu",
                     dtype: torch.dtype = torch.float32) -> str:
    """Accelerate's mixed_precision for --precision. "auto": the launcher's config (`accelerate
    launch` exports ACCELERATE_MIXED_PRECISION), else a half --dtype's own (float16 on CUDA only),
    else bf16 on CUDA where supported (fp16 otherwise), else float32."""
    if precision == "fp32":
        return "no"
    if precision in ("bf16", "fp16"):
        return precision
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "").lower()
    if launcher in ("bf16", "fp16"):
        return launcher
    if dtype == torch.bfloat16:
        return "bf16"
    if dtype == torch.float16 and device_type == "cuda":
        return "fp16"
    if device_type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def _saved_dtype(spec: str, student: str) -> torch.dtype:
    """The saved weights' dtype: `spec`, or for "auto" the student checkpoint's own (the dominant
    floating dtype of its stored tensors; float32 where it has none of DTYPES)."""
    from normswap.conversion import resolve_dtypes
    from normswap.loading import check_source, load_config

    local = check_source(student)
    return resolve_dtypes(spec, source=local, config=None if local is not None else load_config(student))[0]


def start_state(spec: str | None) -> Any:
    """Accelerate's process state, started for `--device spec`; returns it (a PartialState).

    One process: `spec` resolved here (`normswap.devices.resolve_device`: a named device that is
    absent is an error); a state left by an earlier run in this Python process on another device
    is reset. Several processes (`accelerate launch`, torchrun): the launcher has placed each one
    (its GPU by local rank, or the CPU with `use_cpu` or on a machine without accelerators), so an
    explicit device of another kind, or any device index, is an error.
    """
    from accelerate import PartialState
    from accelerate.state import AcceleratorState

    from normswap.devices import check_device, resolve_device

    spec = check_device(spec)
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1:
        use_cpu = os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes")
        auto = resolve_device("auto")
        launcher = "cpu" if use_cpu or auto.type == "cpu" else auto.type
        if spec != "auto" and (":" in spec or spec != launcher):
            where = "its GPU by local rank (cuda:LOCAL_RANK)" if launcher == "cuda" else f"the {launcher}"
            raise NormswapError(f"--device {spec}: under accelerate launch with {world} processes the launcher places each "
                                f"process on {where}; drop --device (or give auto or {launcher}), or change the accelerate config")
        return PartialState(cpu=launcher == "cpu")
    device = resolve_device(spec)
    if PartialState._shared_state:
        now = PartialState().device
        if now.type != device.type or (device.type == "cuda" and (now.index if now.index is not None else torch.cuda.current_device())
                                       != device.index):
            AcceleratorState._reset_state(reset_partial_state=True)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device.index)
    return PartialState(cpu=device.type == "cpu")


def _fresh_accelerator_state(state: Any, mixed: str) -> None:
    """One process (a library caller, a test, a notebook) may run several fine-tunes: accelerate
    refuses a second Accelerator with another mixed precision, so the earlier run's state goes.
    (Under a multi-process launch the state is the launcher's, never reset.)"""
    from accelerate.state import AcceleratorState

    if state.num_processes > 1 or not AcceleratorState._shared_state:
        return
    if AcceleratorState._shared_state.get("_mixed_precision", mixed) != mixed:
        AcceleratorState._reset_state()


def _enable_gradient_checkpointing(model: nn.Module, student: str, accelerator: Any) -> None:
    """--gradient-checkpointing: transformers' own, non-reentrant (it works with frozen parameters
    and with FSDP); a model class without it is an error."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None) if is_fsdp_state(accelerator) else None
    if plugin is not None and getattr(plugin, "activation_checkpointing", False):
        logger.info("--gradient-checkpointing: the FSDP config's fsdp_activation_checkpointing already recomputes activations")
        return
    if not getattr(model, "supports_gradient_checkpointing", False) or not (
            hasattr(model, "activation_checkpointing_enable") or hasattr(model, "gradient_checkpointing_enable")):
        raise NormswapError(f"--gradient-checkpointing: {type(model).__name__} ({student}) does not support gradient "
                            "checkpointing; run without it (or use FSDP's fsdp_activation_checkpointing)")
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5's name (the old one warns)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False  # a cache is useless in training and conflicts with recomputation


def is_fsdp_state(accelerator: Any) -> bool:
    from normswap.training.sharding import is_fsdp

    return is_fsdp(accelerator)


def _unsharded(student: str, state: dict[str, torch.Tensor], fade_paths: list[str] | None) -> nn.Module:
    """The trained model rebuilt whole on the main process from a gathered FSDP state dict: a fresh
    copy of the student's architecture (after --progressive, the FadeNorm scaffolding dropped: each
    site keeps its new module), loaded strictly."""
    from normswap.loading import load_pretrained

    if fade_paths:
        renamed: dict[str, torch.Tensor] = {}
        for k, v in state.items():
            site = next((p for p in fade_paths if k.startswith(p + ".")), None)
            if site is None:
                renamed[k] = v
            elif k.startswith(site + ".new."):
                renamed[site + "." + k[len(site) + 5:]] = v
        state = renamed
    model = load_pretrained(student)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise NormswapError(f"the gathered FSDP state does not fit {student}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.load_state_dict(state, strict=True)
    return model


def _total_steps(cfg: TrainConfig, data: TrainData, nproc: int) -> int:
    if cfg.steps is not None:
        return cfg.steps
    per_step = cfg.batch_size * cfg.grad_accum * nproc * data.mean_tokens()
    if cfg.tokens < per_step:
        raise NormswapError(f"--tokens {cfg.tokens} is smaller than one batch ({cfg.batch_size} x {cfg.grad_accum} x "
                            f"{nproc} examples of ~{data.mean_tokens():.0f} tokens = {per_step:.0f} tokens)")
    return max(1, math.ceil(cfg.tokens / per_step))


def provenance() -> dict[str, Any]:
    """Versions, git hash and date, for results files."""
    import transformers

    import normswap

    try:
        git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True,
                             timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        git = None
    return {"versions": {"normswap": normswap.__version__, "torch": torch.__version__, "transformers": transformers.__version__},
            "git": git, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def save_final(model: nn.Module, out: Path, record: Any, tokenizer: Any, *, student: str, teacher: str | None,
               data: str, result: FinetuneResult, processor: Any = None) -> None:
    """Write the fine-tuned model into `out` beside the logs and checkpoints.

    The model is first written complete into a hidden folder (with normswap.save for converted
    students, so `normswap.load(out)` rebuilds it strictly), then its files are moved into `out`
    one by one with config.json last: `out` only looks like a model once every file is in place.
    """
    from normswap.loading import CONFIG_NAME, save

    tmp = out / ".final-model"
    shutil.rmtree(tmp, ignore_errors=True)
    model.eval()
    if record is not None:
        note = {"from": student, "teacher": teacher, "data": data, "objective": result.objective,
                "steps": result.step, "tokens": result.tokens, "val": result.val,
                **({"audio_seconds": round(result.audio_seconds, 3)} if result.audio_seconds else {})}
        record.source = {**(record.source or {}), "finetune": note}
        save(model, tmp, record, tokenizer=tokenizer, copy_from=student, overwrite=True)
    else:
        model.save_pretrained(str(tmp), safe_serialization=True)
        (processor or tokenizer).save_pretrained(str(tmp))  # a speech processor holds the tokenizer
    files = sorted(tmp.iterdir(), key=lambda p: p.name == CONFIG_NAME)
    for f in files:
        if f.name in TRAINING_FILES:  # a fine-tuned student's own training record, copied with its files: this run has its own
            continue
        dst = out / f.name
        if dst.is_dir() and not dst.is_symlink():
            shutil.rmtree(dst)
        os.replace(f, dst)
    shutil.rmtree(tmp)
