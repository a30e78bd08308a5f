"""`normswap finetune`: recovery fine-tuning of a converted model (LM loss or distillation).

    normswap finetune gpt2-dyt --teacher gpt2 --data corpus.txt --tokens 2M --out gpt2-dyt-ft
    accelerate launch -m normswap finetune gpt2-dyt --teacher gpt2 --data corpus.txt --tokens 200M --out gpt2-dyt-ft
    accelerate launch --config_file recipes/accelerate/fsdp-gpu-bf16.yaml -m normswap finetune llama-dyt --teacher llama \
        --objective distill --data corpus.txt --tokens 200M --gradient-checkpointing --out llama-dyt-ft
    normswap finetune whisper-dyt --teacher whisper-tiny.en --objective distill --audio librispeech --steps 200 --out whisper-dyt-ft

Progress goes to stderr; the result (a table, or JSON with --format json) to stdout. Ctrl-C saves a
checkpoint and exits with code 130; `--resume` continues it. A NaN/inf loss exits with code 3.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from normswap.commands.common import FORMAT_OPTION, THREADS_OPTION, OutputFormat, emit_json, setup_runtime, table


def register(app: typer.Typer) -> None:
    app.command("finetune", help="Recover quality after conversion: LM loss or distillation from the original model.")(finetune_cmd)


def token_loss_table(stats: dict) -> str:
    """Per-token loss on the held-out examples, teacher and student side by side, then the student's
    worst tokens after training."""
    from normswap.evaluation.token_losses import compare_rows

    labels = {"teacher": "teacher", "before": "student before", "after": "student after"}
    cols = {labels[k]: stats[k] for k in labels if stats.get(k)}
    text = table(compare_rows(cols), ["token loss (nats)", *cols])
    last = stats.get("after") or stats.get("before")
    if last and last.get("worst"):
        text += "\n" + table([[f"{w['loss']:.3f}", repr(w["token"]), repr(w["context"][-40:])] for w in last["worst"]],
                             [f"worst tokens ({'after' if stats.get('after') else 'before'})", "token", "context"])
    return text


def finetune_cmd(
    student: str = typer.Argument(..., help="Converted model folder (from `normswap convert`)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: final model, train_log.jsonl, loss_curve.png (and checkpoints/ while training)."),
    data: Optional[str] = typer.Option(None, "--data", help="Text file, folder of text files, or a `datasets` name (online only)."),
    audio: Optional[str] = typer.Option(None, "--audio", help="Speech encoder-decoders (Whisper), instead of --data: a folder of audio files "
                                        "with transcripts.tsv (as `eval --asr` reads it), teacher-forced on the transcripts."),
    audio_subsets: Optional[str] = typer.Option(None, "--audio-subsets", help="--audio: only these comma-separated manifest subsets."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="The original model (needed for distill and --progressive)."),
    objective: str = typer.Option("lm", "--objective", help="lm, distill, or a mix such as lm=0.3,distill=0.7."),
    tokens: Optional[str] = typer.Option(None, "--tokens", help="Token budget, e.g. 2M (or give --steps)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer steps (or give --tokens)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Examples per micro-batch per process."),
    grad_accum: int = typer.Option(1, "--grad-accum", help="Micro-batches per optimizer step."),
    block_size: Optional[int] = typer.Option(None, "--block-size", help="Tokens per example [default: min(256, model max)]."),
    packing: Optional[str] = typer.Option(None, "--packing", help="blocks (pack text into full blocks) or lines (one example per line) [default: lines for bare encoders, else blocks]."),
    lr: float = typer.Option(3e-4, "--lr", help="Peak learning rate (AdamW)."),
    min_lr_ratio: float = typer.Option(0.1, "--min-lr-ratio", help="Cosine decay ends at lr * this."),
    warmup: float = typer.Option(0.05, "--warmup", help="Warmup: a fraction of the steps (<1) or a step count."),
    weight_decay: float = typer.Option(0.01, "--weight-decay", help="AdamW weight decay."),
    clip: float = typer.Option(1.0, "--clip", help="Gradient-norm clipping (0: off)."),
    train: str = typer.Option("all", "--train", help="Which parameters train: all, norms, norms+readers."),
    temperature: float = typer.Option(2.0, "--temperature", help="Distillation temperature."),
    hidden_weight: Optional[float] = typer.Option(None, "--hidden-weight", help="Weight of per-layer hidden-state MSE in distill [default: 1 for bare encoders, else 0]."),
    pooled_weight: float = typer.Option(1.0, "--pooled-weight", help="Weight of pooled-embedding MSE (bare encoders)."),
    progressive: bool = typer.Option(False, "--progressive", help="Swap the new norms in one at a time during training."),
    swap_every: Optional[int] = typer.Option(None, "--swap-every", help="Steps between swaps in --progressive [default: spread over the first half]."),
    fade_steps: int = typer.Option(0, "--fade-steps", help="Fade each swap in over this many steps (0: swap at once)."),
    swap_order: str = typer.Option("published", "--swap-order", help="--progressive: published (MLP norms first, then attention "
                                   "norms, then the final norm, as in published LayerNorm removal) or forward (model order)."),
    val_examples: int = typer.Option(16, "--val-examples", help="Held-out examples for validation loss."),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", help="Validation every N steps [default: 10 per run]."),
    save_every: Optional[int] = typer.Option(None, "--save-every", help="Checkpoint every N steps [default: 5 per run]."),
    keep_checkpoints: int = typer.Option(2, "--keep-checkpoints", help="How many recent checkpoints to keep while training."),
    retain_checkpoints: bool = typer.Option(False, "--retain-checkpoints", help="Keep checkpoints/ once the run completes "
                                            "[default: deleted when the final model is saved; interrupted runs keep theirs]."),
    log_every: int = typer.Option(10, "--log-every", help="Write train_log.jsonl (and a log line without a TTY) every N steps."),
    seed: int = typer.Option(0, "--seed", help="Seed of the data split, order and masks."),
    precision: str = typer.Option("auto", "--precision", help="Arithmetic: auto (the accelerate config's mixed precision, else a half --dtype's, "
                                  "else bf16/fp16 on CUDA and fp32 elsewhere), fp32, bf16, fp16."),
    device: str = typer.Option("auto", "--device", help="Where it trains: auto (the first accelerator, else the CPU), cpu, cuda, cuda:N or mps. "
                               "Under `accelerate launch` with several processes the launcher places them (a conflicting --device is an error)."),
    dtype: str = typer.Option("auto", "--dtype", help="The saved weights' and the teacher's dtype: auto (the student checkpoint's own), float32, "
                              "bfloat16 or float16. The student trains on float32 master weights."),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing", help="Recompute activations in backward "
                                                "(less memory, about a third more compute); an error for models without it."),
    dropout: Optional[float] = typer.Option(0.0, "--dropout", help="Dropout during training (negative: keep the model's own)."),
    time_limit: Optional[float] = typer.Option(None, "--time-limit", help="Stop after this many minutes, keeping the model as trained so far."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its newest checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out folder."),
    threads: Optional[int] = THREADS_OPTION,
    fmt: OutputFormat = FORMAT_OPTION,
) -> None:
    setup_runtime(threads)  # per process under `accelerate launch`
    from normswap.devices import check_device
    from normswap.training.config import DTYPE_NAMES

    check_device(device)  # the form only: one error line before anything loads
    if dtype.removeprefix("torch.") not in DTYPE_NAMES:
        from normswap.errors import NormswapError

        raise NormswapError(f"unknown --dtype {dtype[:40]!r}: choose one of {', '.join(DTYPE_NAMES)}")
    from normswap.audio import subset_names
    from normswap.training import TrainConfig, finetune, parse_count

    cfg = TrainConfig(
        objective=objective, temperature=temperature, hidden_weight=hidden_weight, pooled_weight=pooled_weight,
        steps=steps, tokens=parse_count(tokens), batch_size=batch_size, grad_accum=grad_accum, block_size=block_size,
        packing=packing, lr=lr, min_lr_ratio=min_lr_ratio, warmup=warmup, weight_decay=weight_decay, clip=clip,
        train=train, progressive=progressive, swap_every=swap_every, fade_steps=fade_steps, swap_order=swap_order, val_examples=val_examples,
        eval_every=eval_every, save_every=save_every, keep_checkpoints=keep_checkpoints, log_every=log_every, seed=seed,
        precision=precision, device=device, dtype=dtype, gradient_checkpointing=gradient_checkpointing, max_seconds=time_limit * 60 if time_limit is not None else None, dropout=None if dropout is not None and dropout < 0 else dropout,
    )
    result = finetune(student, teacher=teacher, data=data, audio=audio, audio_subsets=subset_names(audio_subsets, "--audio-subsets"),
                      out=out, config=cfg, overwrite=overwrite, resume=resume, retain_checkpoints=retain_checkpoints)
    from accelerate import PartialState

    if not PartialState().is_main_process:  # under `accelerate launch`, only the main process prints the result
        return
    if fmt == OutputFormat.json:
        emit_json(result.to_dict())
    else:
        rows = [["status", result.status], ["out", result.out], ["steps", f"{result.step}/{result.total_steps}"],
                ["device", result.device + (f" x {result.distributed['processes']} ({result.distributed['type']})"
                                            if result.distributed.get("processes", 1) > 1 else "")],
                ["dtype", f"{result.dtype} (compute {result.precision}"
                          + (f", teacher {result.teacher_dtype}" if result.teacher_dtype else "") + ")"]]
        if audio is not None:
            rows += [["audio seconds", round(result.audio_seconds, 1)], ["audio s/s", round(result.audio_seconds_per_second, 2)],
                     ["decoder tokens", result.tokens]]
        else:
            rows += [["tokens", result.tokens], ["tokens/s", round(result.tokens_per_second, 1)]]
        rows.append(["last train loss", result.last_loss])
        rows += [[k.replace("_", " "), v] for k, v in result.val.items()]
        if result.checkpoint:
            rows.append(["checkpoint", result.checkpoint])
        typer.echo(table(rows, ["finetune", "value"]))
        if result.token_losses:
            typer.echo("")
            typer.echo(token_loss_table(result.token_losses))
    if result.status == "interrupted":
        typer.echo(f"interrupted at step {result.step} of {result.total_steps}; continue with --resume", err=True)
        raise typer.Exit(143 if result.signal == "SIGTERM" else 130)
