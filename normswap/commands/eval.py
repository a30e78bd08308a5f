"""`normswap eval`: a converted model against its baseline on perplexity, zero-shot STS, GLUE and speech recognition.

    normswap eval gpt2-rms --baseline gpt2 --ppl wiki.test.raw --max-length 1024 --stride 512 --out results/
    normswap eval bert-dyt --baseline bert-base-uncased --glue sst2,cola,rte,stsb --glue-data glue/ --seeds 3 --out results/
    normswap eval minilm-dyt --baseline all-MiniLM-L6-v2 --sts glue/STS-B/dev.tsv
    normswap eval whisper-rms --baseline whisper-tiny.en --asr librispeech-subset --out results/
    normswap eval gpt2-dyt --baseline gpt2 --tasks piqa,arc_easy,hellaswag --tasks-data zeroshot/ --limit 500 --out results/
    normswap eval gpt2-rms --baseline gpt2 --ppl wiki.test.raw --device cuda --dtype bfloat16

Both models run on --device (auto: the first accelerator, else the CPU) with their weights in
--dtype (auto: each checkpoint's own). An explicit --dtype is also the arithmetic dtype, on the CPU
too; with auto, half-precision weights on the CPU are computed in float32 (an exact upcast). The
results state the device, the weights' dtype and the compute dtype.

Results go to stdout (a table, or one JSON object with --format json); logs and progress to stderr.
With --out: results.json (config, versions, git hash, date, per-seed numbers), per-example
predictions under predictions/ (asr.tsv: every utterance's reference, hypotheses, normalised forms
and errors), lm-eval's own results and per-sample logs under lm_eval/, and deltas.png.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import typer

from normswap.commands.common import FORMAT_OPTION, THREADS_OPTION, OutputFormat, emit_json, setup_runtime, table
from normswap.errors import NormswapError


def register(app: typer.Typer) -> None:
    """Add the `eval` command to the CLI."""
    app.command("eval", help="Evaluate a model against its baseline: perplexity, zero-shot STS, GLUE fine-tuning, speech recognition (WER).")(eval_cmd)


def eval_cmd(
    model: str = typer.Argument(..., help="Model to evaluate: a converted folder, a plain folder, or a Hub id (online)."),
    baseline: Optional[str] = typer.Option(None, "--baseline", "-b", help="The original model to compare against (same tokenizer)."),
    ppl: Optional[str] = typer.Option(None, "--ppl", help="Text file to score (read as-is), or a `datasets` name[:config[:split]] when online."),
    max_length: Optional[int] = typer.Option(None, "--max-length", help="Window length in tokens [default: the model's positions, at most 1024]."),
    stride: Optional[int] = typer.Option(None, "--stride", help="Causal LMs: tokens between window starts [default: --max-length]."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Score only the first N tokens of the text."),
    pseudo_ppl: bool = typer.Option(False, "--pseudo-ppl", help="Masked LMs: pseudo-perplexity (each token masked in turn; slow)."),
    mlm_probability: float = typer.Option(0.15, "--mlm-probability", help="Masked LMs: fraction of tokens masked."),
    mask_seed: int = typer.Option(0, "--mask-seed", help="Masked LMs: seed of the fixed mask."),
    sts_file: Optional[str] = typer.Option(None, "--sts", help="STS pairs in the GLUE STS-B layout: zero-shot Spearman/Pearson and fidelity."),
    glue_tasks: Optional[str] = typer.Option(None, "--glue", help="Comma-separated GLUE tasks: sst2, cola, rte, stsb, mrpc, qnli, qqp, mnli, wnli."),
    glue_dir: Optional[str] = typer.Option(None, "--glue-data", help="Folder in the GLUE layout (SST-2/train.tsv, SST-2/dev.tsv, ...)."),
    glue_mode: str = typer.Option("finetune", "--glue-mode", help="GLUE: finetune (a classification head per task and seed) or probe "
                                  "(frozen encoder, mean-pooled features, a linear head fitted by scikit-learn: minutes on a CPU)."),
    glue_protocol: Optional[str] = typer.Option(None, "--glue-protocol", help="GLUE fine-tuning: 'reference' runs each task with its "
                                                "documented settings (normswap.evaluation.glue.REFERENCE_PROTOCOL); options given "
                                                "explicitly override them."),
    seeds: Optional[int] = typer.Option(None, "--seeds", help="GLUE: number of seeds (0..N-1), the same for both models [default: 1; probe 3]."),
    train_samples: Optional[int] = typer.Option(None, "--train-samples", help="GLUE: train on a fixed random subset of N train rows "
                                                "(probe: a subset per seed)."),
    dev_samples: Optional[int] = typer.Option(None, "--dev-samples", help="GLUE: score a fixed random subset of N dev rows [default: all]."),
    epochs: Optional[float] = typer.Option(None, "--epochs", help="GLUE fine-tuning: training epochs (fractions allowed) [default: 3]."),
    lr: Optional[float] = typer.Option(None, "--lr", help="GLUE fine-tuning: peak learning rate (AdamW, linear warm-up and decay) [default: 5e-5]."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="GLUE: training batch size [default: 32] (probe: sentences per "
                                             "forward pass); --tasks: requests per forward pass [default: 8]."),
    max_seq_length: Optional[int] = typer.Option(None, "--max-seq-length", help="GLUE: truncate inputs to this many tokens [default: 128]."),
    asr_dir: Optional[str] = typer.Option(None, "--asr", help="Speech encoder-decoders (Whisper): a folder of audio files (flac, wav...) with "
                                          "transcripts.tsv (id<TAB>text) and optionally manifest.tsv (id, subset): greedy WER."),
    asr_subsets: Optional[str] = typer.Option(None, "--asr-subsets", help="ASR: only these comma-separated manifest subsets (e.g. test-clean,dev-clean)."),
    asr_groups: Optional[str] = typer.Option(None, "--asr-groups", help="ASR: also report unions of subsets, comma-separated, members joined by + (e.g. test-clean+dev-clean)."),
    asr_batch_size: int = typer.Option(16, "--asr-batch-size", help="ASR: utterances transcribed per batch."),
    zs_tasks: Optional[str] = typer.Option(None, "--tasks", help="Causal LMs: comma-separated lm-evaluation-harness tasks (lambada_openai, piqa, "
                                           "arc_easy, arc_challenge, hellaswag, boolq, winogrande, openbookqa, or any lm-eval task)."),
    tasks_data: Optional[str] = typer.Option(None, "--tasks-data", help="Offline task files, DIR/<task>/... as their authors distribute them "
                                             "(the layout of shared/assets/zeroshot)."),
    include_path: Optional[str] = typer.Option(None, "--include-path", help="Folder of your own lm-eval task YAMLs (used like lm-eval's)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="--tasks: score only the first N documents of each task."),
    num_fewshot: Optional[int] = typer.Option(None, "--num-fewshot", help="--tasks: few-shot examples per prompt [default: each task's own, 0]."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Folder for results.json, predictions/ and deltas.png (must not exist unless --overwrite)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out folder (once the new results are complete)."),
    device: str = typer.Option("auto", "--device", help="Where both models run: auto (the first accelerator, else the CPU), cpu, cuda, "
                               "cuda:N or mps."),
    dtype: str = typer.Option("auto", "--dtype", help="Both models' weights and arithmetic: auto (each checkpoint's own dtype; half "
                              "precision computed in float32 on the CPU), float32, bfloat16 or float16."),
    threads: Optional[int] = THREADS_OPTION,
    fmt: OutputFormat = FORMAT_OPTION,
) -> None:
    setup_runtime(threads)
    from normswap.evaluation import placement

    device, dtype = placement.check(device, dtype)  # the form only: one error line before anything loads
    from normswap.evaluation.glue import GlueSettings
    from normswap.audio import subset_names
    from normswap.evaluation.runner import EvalRequest, run_eval
    from normswap.evaluation.zeroshot import TaskSettings

    for option, value in (("--tasks-data", tasks_data), ("--include-path", include_path), ("--limit", limit), ("--num-fewshot", num_fewshot)):
        if value is not None and zs_tasks is None:
            raise NormswapError(f"{option} needs --tasks TASKS")
    given = {k: v for k, v in dict(train_samples=train_samples, epochs=epochs, lr=lr, batch_size=batch_size, max_seq_length=max_seq_length,
                                    seeds=seeds).items() if v is not None}
    req = EvalRequest(
        model=model, baseline=baseline, ppl=ppl, max_length=max_length, stride=stride, max_tokens=max_tokens,
        pseudo_ppl=pseudo_ppl, mlm_probability=mlm_probability, mask_seed=mask_seed, sts=sts_file,
        glue=glue_tasks, glue_data=glue_dir, dev_samples=dev_samples, out=out, overwrite=overwrite,
        asr=asr_dir, asr_subsets=subset_names(asr_subsets, "--asr-subsets"),
        asr_groups=subset_names(asr_groups, "--asr-groups"), asr_batch_size=asr_batch_size,
        glue_settings=GlueSettings(**given), glue_mode=glue_mode, glue_protocol=glue_protocol, glue_given=given,
        tasks=TaskSettings(names=zs_tasks, data=tasks_data, include_path=include_path, limit=limit, num_fewshot=num_fewshot,
                           batch_size=8 if batch_size is None else batch_size) if zs_tasks is not None else None,
        device=device, dtype=dtype,
    )
    res = run_eval(req)
    if fmt == OutputFormat.json:
        emit_json(res)
    else:
        typer.echo(render(res))


def render(res: dict[str, Any]) -> str:
    """The human table: one row per figure (baseline, converted, delta), then the settings they depend on."""
    rows: list[list[Any]] = []
    notes: list[str] = []
    p = res.get("ppl")
    if p:
        label = {"causal": "perplexity", "masked": "MLM perplexity", "pseudo": "pseudo-perplexity"}[p["kind"]]
        rows.append(["ppl", "text", label, _v(p.get("baseline")), _v(p["value"]), _d(p.get("delta"))])
        rows.append(["ppl", "text", "nll/token", _v(p.get("baseline_nll")), _v(p["nll"]), _d(p.get("delta_nll"))])
        if p.get("bits_per_byte") is not None:
            rows.append(["ppl", "text", "bits/byte" if p["kind"] == "causal" else "pseudo bits/byte", _v(p.get("baseline_bits_per_byte")),
                         _v(p["bits_per_byte"]), _d(p.get("delta_bits_per_byte"))])
        how = f"stride {p['stride']}" if p["kind"] == "causal" else (
            f"{p['mask_probability']:.0%} mask, seed {p['seed']}" if p["kind"] == "masked" else "every token masked in turn")
        notes.append(f"ppl: {p['tokens']} tokens scored of {p['text_tokens']}"
                     + (f" ({p['bytes']} UTF-8 bytes)" if p.get("bytes") is not None else "") + f", max_length {p['max_length']}, {how}")
        if any(isinstance(x, float) and math.isinf(x) for x in (p["value"], p.get("baseline"))):
            notes.append("ppl: inf means exp(nll/token) overflows a float64 (nll above 709.78 nats): compare the nll/token row")
    s = res.get("sts")
    if s:
        rows.append(["sts", "zero-shot", "spearman", _v(s.get("baseline_spearman")), _v(s["spearman"]), _d(s.get("delta"))])
        rows.append(["sts", "zero-shot", "pearson", _v(s.get("baseline_pearson")), _v(s["pearson"]),
                     _d(s["pearson"] - s["baseline_pearson"] if s.get("baseline_pearson") is not None else None)])
        if s.get("fidelity") is not None:
            rows.append(["sts", "fidelity", "mean cosine", "", _v(s["fidelity"]), ""])
        notes.append(f"sts: {s['pairs']} pairs, {s['pooling']} pooling, cosine similarity")
    a = res.get("asr")
    if a:
        parts = [("all", a)] + list((a.get("subsets") or {}).items())
        for name, r in parts:
            rows.append(["asr", name, "WER", _v(r.get("baseline")), _v(r["wer"]), _d(r.get("delta"))])
        how = "; ".join(f"{name} {r['utterances']} utt / {r['words']} words, S/D/I {r['substitutions']}/{r['deletions']}/{r['insertions']}"
                        + (f", delta 95% CI [{r['delta_ci95'][0]:+.4f}, {r['delta_ci95'][1]:+.4f}]" if r.get("delta_ci95") else "")
                        for name, r in parts)
        notes.append(f"asr: {a['decoding']}, Whisper English normaliser, corpus WER; {how}"
                     + (f"; paired bootstrap over utterances, {a['bootstrap']['resamples']} resamples, seed {a['bootstrap']['seed']}"
                        if a.get("bootstrap") else ""))
    g = res.get("glue")
    if g:
        st = res["glue_settings"]
        label = {"probe": "probe", "reference": "fine-tune, reference protocol", "custom": "fine-tune"}[st.get("protocol", "custom")]
        for task, metrics in g.items():
            for metric, r in metrics.items():
                conv = f"{r['mean']:.4f}" + (f" ± {r['std']:.4f}" if "std" in r else "")
                base = (f"{r['baseline_mean']:.4f}" + (f" ± {r['baseline_std']:.4f}" if "baseline_std" in r else "")) if "baseline_mean" in r else ""
                ci = r.get("delta_ci95")
                flag = "" if r.get("within_noise") is None else (" (noise)" if r["within_noise"] else " *")
                rows.append([f"glue ({label})" if task != "average" else "glue", task, metric, base, conv, _d(r.get("delta")),
                             (f"[{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else "") + flag])
        notes.append(f"glue: {label}; {st['seeds']} seed(s), mean ± std over seeds; " + "; ".join(
            f"{t} {d['train_examples']}/{d['dev_examples']} train/dev rows, {_glue_how(st, t)}" for t, d in st["data"].items()))
        if any("delta_ci95" in r for m in g.values() for r in m.values()):
            notes.append("glue delta 95% CI: paired bootstrap over dev items (metric averaged over seeds); (noise) = the interval "
                         "contains 0 or |delta| <= 2 x the baseline's seed-to-seed std; * = outside both")
    zs = res.get("tasks")
    if zs:
        for task, r in zs.items():
            for metric, cell in r.items():
                if isinstance(cell, dict):
                    rows.append(["zero-shot", task, metric, _pm(cell.get("baseline"), cell.get("baseline_stderr")),
                                 _pm(cell.get("value"), cell.get("stderr")), _d(cell.get("delta")), _ci(cell)])
        st = res["tasks_settings"]
        docs = f"first {st['limit']} documents per task" if st.get("limit") else "all documents"
        shots = "each task's default shots" if st.get("num_fewshot") is None else f"{st['num_fewshot']}-shot"
        note = (f"zero-shot: lm-evaluation-harness {st.get('lm_eval')}, value ± lm-eval's stderr; {docs}; {shots}; "
                f"data: {st.get('data') or 'lm-eval (online)'}")
        if res.get("baseline"):
            b = st["bootstrap"]
            note += f"; delta 95% CI: paired bootstrap over documents, {b['resamples']} resamples, seed {b['seed']}; * = excludes 0"
        notes.append(note)
    if res.get("device"):
        notes.append(_placement_note(res))
    headers = ["part", "task", "metric", "baseline", "converted", "delta"] + (["delta 95% CI"] if any(len(r) > 6 and r[6] for r in rows) else [])
    text = table([(r + [""] * (len(headers) - len(r)))[:len(headers)] for r in rows], headers)
    if res.get("results_file"):
        notes.append(f"results: {res['results_file']}")
    return text + "\n\n" + "\n".join(notes)


def _placement_note(res: dict[str, Any]) -> str:
    """"device cpu, dtype bfloat16 (compute bfloat16)", with each model's dtypes when they differ."""
    note = f"device {res['device']}, dtype {res.get('dtype')} (compute {res.get('compute_dtype')})"
    p = res.get("placement") or {}
    if p.get("requested_dtype") == "auto":
        note += "; --dtype auto: each checkpoint's own" + ("; half precision computed in float32 on the CPU" if res["device"] == "cpu" else "")
    models = p.get("models") or {}
    if len({(m.get("dtype"), m.get("compute_dtype")) for m in models.values()}) > 1:
        note += "; " + ", ".join(f"{role} {m.get('dtype')} (compute {m.get('compute_dtype')})" for role, m in models.items())
    return note


def _v(x: Any) -> str:
    return "" if x is None else f"{x:.4f}" if abs(x) < 1000 else f"{x:.1f}"


def _d(x: Any) -> str:
    return "" if x is None else f"{x:+.4f}"


def _glue_how(st: dict[str, Any], task: str) -> str:
    s = (st.get("tasks") or {}).get(task) or st
    if st.get("protocol") == "probe":
        return f"{s['cv_folds']}-fold CV head, max_seq_length {s['max_seq_length']}"
    return f"epochs {s['epochs']}, lr {s['lr']}, batch {s['batch_size']}, max_seq_length {s['max_seq_length']}"


def _pm(x: Any, err: Any) -> str:
    return "" if x is None else _v(x) + (f" ± {err:.4f}" if isinstance(err, float) and math.isfinite(err) else "")


def _ci(cell: dict[str, Any]) -> str:
    ci = cell.get("ci95")
    if not ci:
        return ""
    return f"[{ci[0]:+.4f}, {ci[1]:+.4f}]" + (" *" if cell.get("excludes_zero") else "")
