"""`normswap convert MODEL --to rmsnorm|dyt|none --out DIR`."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from normswap.commands.common import FORMAT_OPTION, THREADS_OPTION, OutputFormat, emit_json, setup_runtime, table
from normswap.errors import NormswapError

EXACT_TOLERANCE = 1e-4  # --verify fails an "exact" conversion whose relative logit error exceeds this


def register(app: typer.Typer) -> None:
    app.command("convert")(convert_cmd)


def convert_cmd(
    model: str = typer.Argument(..., help="Hub id or local model folder."),
    to: str = typer.Option(..., "--to", help="Target: rmsnorm, dyt, or none (each norm a fixed scale, its average RMS on the calibration data, folded into the readers: no normalisation left)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (must not exist unless --overwrite)."),
    fold: bool = typer.Option(True, "--fold/--no-fold", help="Fold norm affines into the reading linears where exact."),
    tied_head: str = typer.Option("auto", "--tied-head", help="Tied LM head in Pre-LN models: auto (= center-embed: centre embedding lookups, no extra parameters) or untie (copy the head, then fold into it). RMSNorm models (Llama...): auto keeps the tie and the final norm's gain, untie folds it."),
    calib_text: Optional[Path] = typer.Option(None, "--calib-text", help="Text file for DyT calibration [default: a built-in sample]."),
    calib_audio: Optional[Path] = typer.Option(None, "--calib-audio", help="Speech models (Whisper): a folder of audio files (with a transcripts.tsv, else the original's greedy decodes) for DyT calibration."),
    calib_audio_subsets: Optional[str] = typer.Option(None, "--calib-audio-subsets", help="Only these comma-separated manifest subsets of --calib-audio (calibrate on train, evaluate on test)."),
    calib_tokens: int = typer.Option(4096, "--calib-tokens", help="Calibration tokens for DyT (speech: one utterance per 256, at most 32)."),
    sequential: bool = typer.Option(True, "--sequential/--parallel", help="Calibrate each DyT site on the already converted prefix's output (sequential) or all on the original's (parallel)."),
    alpha_init: Optional[float] = typer.Option(None, "--alpha-init", help="Constant DyT alpha (the DyT paper's init) instead of calibration; keeps the norm's affine."),
    variant: str = typer.Option("dyt", "--variant", help="--to dyt: the elementwise function fitted at each site: dyt (w * tanh(alpha x) + b), dyisru (w * u / sqrt(1 + u^2) + b, u = alpha x: the best measured start on a Llama), dyt-channel / dyisru-channel (an alpha per channel), derf / derf-channel (erf, with a shift)."),
    calibrate: str = typer.Option("site", "--calibrate", help="DyT and none: site (each norm fitted to the original's output at that site, by least squares), e2e (then every norm parameter fitted at once against the original model's output: KL on logits, hidden states for encoders) or block (then each block's norms fitted to the original block's output, one block at a time). e2e and block take minutes on a CPU; nothing but the norms changes."),
    e2e_steps: Optional[int] = typer.Option(None, "--e2e-steps", help="--calibrate e2e: Adam steps at most [default: 200]; --calibrate block: steps per block [default: 20]."),
    e2e_seconds: Optional[float] = typer.Option(None, "--e2e-seconds", help="--calibrate e2e or block: stop after this many seconds (the schedule follows whichever runs out first)."),
    verify: bool = typer.Option(False, "--verify", help="Fail (exit 1) if an exact conversion's relative deviation exceeds the bound. Every in-memory conversion is measured, and one that claims exactness and misses it is never saved."),
    verify_text: Optional[Path] = typer.Option(None, "--verify-text", help="Text for --verify [default: a built-in sample]."),
    verify_audio: Optional[Path] = typer.Option(None, "--verify-audio", help="Speech models: a folder of audio files for --verify [default: the calibration audio, else random features]."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
    low_memory: bool = typer.Option(False, "--low-memory", help="Never hold the model: one block of weights in memory at a time (local safetensors folders; --to rmsnorm or dyt; DyT is calibrated and every approximate result measured block by block). Chosen automatically when the weights exceed half the available memory."),
    device: str = typer.Option("auto", "--device", help="Where calibration and verification run: auto (the first accelerator, else the CPU), cpu, cuda, cuda:N or mps."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Hub revision of MODEL."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow the model's own code (only if you trust it)."),
    drop_mean: bool = typer.Option(False, "--drop-mean", help="Sites whose Pre-LN stream cannot be centred (and models whose structure is unknown): swap LayerNorm for plain RMSNorm, dropping the mean (approximate, measured). By default their RMSNorms subtract the input mean first, keeping LayerNorm's function exactly."),
    plan: str = typer.Option("auto", "--plan", help="Where the norm sites come from: auto (the family table, cross-checked by discovery; discovery where there is no table), table or discover."),
    dtype: str = typer.Option("auto", "--dtype", help="Floating dtype of the saved weights: auto (the source checkpoint's own), float32, bfloat16 or float16."),
    threads: Optional[int] = THREADS_OPTION,
    fmt: OutputFormat = FORMAT_OPTION,
) -> None:
    """Replace every LayerNorm with RMSNorm or DyT and save a checkpoint that loads back exactly."""
    setup_runtime(threads)
    from normswap.audio import subset_names
    from normswap.conversion import check_options, convert_model
    from normswap.loading import save
    from normswap.log import logger
    from normswap.outputs import check_output
    from normswap.textfiles import read_text

    from normswap.archs.plan import check_plan_source

    check_options(to, tied_head=tied_head, dtype=dtype, alpha_init=alpha_init, calib_tokens=calib_tokens, calibrate=calibrate,
                  e2e_steps=e2e_steps, e2e_seconds=e2e_seconds, variant=variant)
    check_plan_source(plan)
    from normswap.devices import check_device

    check_device(device)
    inputs = {"source model": model, "calibration text": calib_text, "verification text": verify_text,
              "calibration audio": calib_audio, "verification audio": verify_audio}
    check_output(out, overwrite=overwrite, inputs=inputs)  # before any long work
    calib = read_text(calib_text) if calib_text is not None else None
    vtext = read_text(verify_text) if verify_text is not None else None
    stream = plan != "discover" and _use_streaming(model, to, alpha_init, low_memory, calibrate, sequential, calib_audio, revision,
                                                   trust_remote_code, variant)
    logger.info("converting %s -> %s%s", model, to, " (streaming, low memory)" if stream else "")
    result = None
    if stream:
        from normswap.streaming import NotStreamable, stream_convert

        try:
            result = stream_convert(model, out, to, fold=fold, tied_head=tied_head, alpha_init=alpha_init, overwrite=overwrite, dtype=dtype,
                                    drop_mean=drop_mean, calib_text=calib, calib_tokens=calib_tokens, verify=verify, verify_text=vtext,
                                    device=device)
        except NotStreamable:
            if low_memory:  # asked for: say why not
                raise
            logger.info("this conversion cannot run block by block: converting in memory instead")
            stream = False
    if result is None:
        converted, result = convert_model(
            model, to, fold=fold, tied_head=tied_head, calib_text=calib, calib_tokens=calib_tokens, sequential=sequential,
            alpha_init=alpha_init, verify=verify, verify_text=vtext, revision=revision, trust_remote_code=trust_remote_code,
            dtype=dtype, drop_mean=drop_mean, calib_audio=calib_audio, verify_audio=verify_audio, plan=plan,
            calibrate=calibrate, e2e_steps=e2e_steps, e2e_seconds=e2e_seconds, device=device, variant=variant,
            calib_audio_subsets=subset_names(calib_audio_subsets, "--calib-audio-subsets"),
        )
        converted.to("cpu")  # saved from host memory, whichever device it ran on
        save(converted, out, result.record, tokenizer=result.tokenizer, copy_from=model if Path(model).is_dir() else None,
             overwrite=overwrite, inputs=inputs)
    logger.info("saved %s", out)
    data = result.to_json() | {"out": str(out), "low_memory": stream}
    check = result.verification or {}
    tolerance = check.get("exact_tolerance", EXACT_TOLERANCE)  # by output dtype
    # the conversion's verdict: half-precision rounding it has shown to be rounding (the float32
    # conversion exact, its warning giving both figures) is within
    failed = verify and result.record.exact and not check.get("within_bound", check.get("max_rel_diff", 0.0) <= tolerance)
    data["verified"] = None if not verify else not failed
    if fmt == OutputFormat.json:
        emit_json(data)
    else:
        _print_human(data)
    if failed:
        raise NormswapError(f"verification failed: relative logit difference {data['max_rel_diff']:.3g} > {tolerance:g} for an exact conversion")


def _use_streaming(model: str, to: str, alpha_init: Optional[float], low_memory: bool, calibrate: str, sequential: bool,
                   calib_audio: Optional[Path], revision: Optional[str], trust_remote_code: bool, variant: str = "dyt") -> bool:
    """--low-memory, or automatically: a local checkpoint over half the available memory whose
    conversion runs block by block (`normswap.streaming.streamable`)."""
    from normswap.log import logger
    from normswap.streaming import available_memory, checkpoint_bytes, streamable

    why = streamable(to, alpha_init, calibrate=calibrate, variant=variant)
    if why is None and not sequential and to == "dyt" and alpha_init is None:
        why = "block-wise calibration is sequential (each site on the converted prefix's inputs): drop --parallel"
    if why is None and calib_audio is not None:
        why = "speech calibration (--calib-audio) runs one utterance a batch, which the block-wise passes do not"
    if low_memory:
        if why:
            raise NormswapError(f"--low-memory: {why}")
        if revision is not None or trust_remote_code:
            raise NormswapError("--low-memory converts local checkpoint folders (no --revision, no --trust-remote-code)")
        return True
    if why or revision is not None or trust_remote_code or not Path(model).is_dir():
        return False
    size, avail = checkpoint_bytes(model), available_memory()
    if size > avail / 2:
        logger.info("weights %.1f GB > half the available memory (%.1f GB): block-wise conversion", size / 1e9, avail / 1e9)
        return True
    return False


def _print_human(d: dict) -> None:
    rows = [[s["path"], s["placement"], s["new_type"], s["method"], "yes" if s["folded"] else "no",
             f"{s['alpha']:.3g}" if "alpha" in s else "", f"{s['calib_rel_error']:.3g}" if "calib_rel_error" in s else ""] for s in d["sites"]]
    typer.echo(table(rows, ["site", "placement", "new", "how", "folded", "alpha", "fit err"]))
    typer.echo("")
    typer.echo(f"target      {d['target']}  ({'exact' if d['exact'] else 'approximate: recover with normswap finetune'})")
    typer.echo(f"dtype       {d['dtype']}")
    if d.get("device"):
        typer.echo(f"device      {d['device']}" + ("  (block by block)" if d.get("low_memory") else ""))
    if d.get("end_to_end"):
        e = d["end_to_end"]
        typer.echo(f"end to end  {e['objective']} {e['loss_before']:.4g} -> {e['loss_after']:.4g} ({e['steps']} steps, "
                   f"{e['seconds']:.0f} s{'; reverted: no gain' if e['reverted'] else ''})")
    if d["tied_head"]:
        typer.echo(f"tied head   {d['tied_head']}")
    if d["unfolded"]:
        reasons: dict[str, list[str]] = {}
        for path, why in d["unfolded"].items():
            reasons.setdefault(why, []).append(path)
        for why, paths in reasons.items():
            typer.echo(f"unfolded    {len(paths)} site(s): {why}")
    if d["new_biases"]:
        typer.echo(f"new biases  {len(d['new_biases'])} linear(s) gained a bias from folding")
    v = d.get("verification")
    if v:
        typer.echo(f"deviation   max |diff| {v['max_abs_diff']:.3g}, relative {v['max_rel_diff']:.3g} ({v['output']}, {v['tokens']} tokens)")
        if "ppl_original" in v:
            typer.echo(f"perplexity  original {v['ppl_original']:.4g}, converted {v['ppl_converted']:.4g} (sample text)")
    if d.get("verified") is not None:
        typer.echo(f"verified    {'passed' if d['verified'] else 'FAILED'}")
    for w in d["warnings"]:
        typer.echo(f"warning     {w}")
    typer.echo(f"saved       {d['out']}  ({d['seconds']:.1f} s)")
