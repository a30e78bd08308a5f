"""One evaluation run: converted model against its baseline on perplexity, STS, GLUE and speech recognition.

Everything that can be checked cheaply (task names, data files, text, tokenizers, heads, window
length) is checked before any long work starts, so a mistake costs seconds, not a fine-tuning run.
Models are loaded one at a time where possible to keep memory at one model.

Where and in which precision the models run is `device` and `dtype` (`normswap.evaluation.placement`):
both models on the same device, in the same dtype; the results state the device, the weights'
dtype and the dtype the arithmetic ran in (`device`, `dtype`, `compute_dtype`, and per model under
`placement`).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from normswap import audio
from normswap.errors import NormswapError
from normswap.evaluation import asr as asr_eval, checks, glue, glue_data, perplexity, placement, results, sts
from normswap.evaluation.glue import GlueSettings
from normswap.evaluation.zeroshot import TaskSettings
from normswap.log import logger
from normswap.outputs import atomic_output, check_output


@dataclass
class EvalRequest:
    """What `normswap eval` was asked to do (also written to the results file as the config)."""

    model: str
    baseline: str | None = None
    ppl: str | None = None
    max_length: int | None = None  # default: the model's positions, at most 1024
    stride: int | None = None  # default: max_length (non-overlapping windows)
    max_tokens: int | None = None  # score only the first N tokens of the text
    pseudo_ppl: bool = False
    mlm_probability: float = 0.15
    mask_seed: int = 0
    ppl_batch_size: int = 8
    sts: str | None = None
    sts_batch_size: int = 64
    glue: str | None = None
    glue_data: str | None = None
    glue_settings: GlueSettings = field(default_factory=GlueSettings)  # --glue-mode finetune without a protocol
    glue_mode: str = "finetune"  # "finetune" (a head per task and seed) | "probe" (frozen encoder, linear head)
    glue_protocol: str | None = None  # "reference": per-task settings of glue.REFERENCE_PROTOCOL
    glue_given: dict[str, Any] = field(default_factory=dict)  # settings given explicitly: they override a protocol's
    dev_samples: int | None = None  # score a fixed subset of dev (budget runs); None: all of dev
    asr: str | None = None  # folder of audio files with transcripts.tsv (and manifest.tsv): WER
    asr_subsets: list[str] | None = None  # only these manifest subsets (e.g. test-clean); None: every utterance
    asr_groups: list[str] | None = None  # unions of subsets reported beside them ("test-clean+dev-clean")
    asr_batch_size: int = 16
    asr_resamples: int = 1000  # paired bootstrap of the WER difference (asr.BOOTSTRAP_RESAMPLES)
    asr_seed: int = 0  # its seed (asr.BOOTSTRAP_SEED)
    tasks: TaskSettings | None = None  # zero-shot tasks through lm-evaluation-harness
    out: str | None = None
    overwrite: bool = False  # replace an existing `out` (once the new results are complete)
    progress: bool | None = None  # None: a bar only when stderr is a terminal
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps (normswap.devices): every model runs there
    dtype: str = "auto"  # auto (each checkpoint's own) | float32 | bfloat16 | float16 (normswap.evaluation.placement)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _placement(req: EvalRequest) -> placement.Placement:
    """Where the request's models run and in which dtype (an absent device is an error)."""
    return placement.resolve(req.device, req.dtype)


def _models(req: EvalRequest) -> list[tuple[str, str]]:
    """(role, path) pairs: the converted model first, then the baseline if any."""
    return [("converted", req.model)] + ([("baseline", req.baseline)] if req.baseline else [])


def _validate(req: EvalRequest) -> tuple[Any, list[glue_data.GlueTask]]:
    if not (req.ppl or req.sts or req.glue or req.asr or req.tasks):
        raise NormswapError("nothing to evaluate: give --ppl FILE, --sts FILE, --glue TASKS, --tasks TASKS and/or --asr DIR")
    req.device, req.dtype = placement.check(req.device, req.dtype)  # the form, then whether the device is here
    _placement(req)
    if req.out:
        check_output(req.out, overwrite=req.overwrite, inputs=_inputs(req))
    tasks: list[glue_data.GlueTask] = []
    if req.glue:
        tasks = glue_data.parse_tasks(req.glue)
        if not req.glue_data:
            raise NormswapError("--glue needs --glue-data DIR (a folder in the GLUE layout: DIR/SST-2/train.tsv, ...)")
        for t in tasks:
            glue_settings_for(req, t).validate()
        for t in tasks:
            glue_data.split_file(req.glue_data, t, "train")
            glue_data.split_file(req.glue_data, t, "dev")
    if req.glue_data and not req.glue:
        raise NormswapError("--glue-data needs --glue TASKS")
    _check_options(req)
    from normswap.loading import check_source, load_tokenizer

    for _, path in _models(req):
        check_source(path)  # the loader's own path checks, before anything heavy
    tok = load_tokenizer(req.model)
    if tok is None:
        raise NormswapError(f"{req.model} has no tokenizer files")
    if req.baseline:
        checks.check_same_tokenizer(load_tokenizer(req.baseline), tok, req.baseline, req.model)
    if tasks:
        _check_glue_data(req, tok, tasks)
    return tok, tasks


def at_least(value: Any, low: int, option: str) -> None:
    """Refuse a count below `low` (None: not given), naming the option."""
    if value is not None and value < low:
        raise NormswapError(f"{option} must be {'positive' if low == 1 else f'at least {low}'}, got {value}")


def _check_options(req: EvalRequest) -> None:
    """Refuse out-of-range counts and non-finite numbers before anything is loaded (GLUE settings
    too, whether or not --glue is given: a nonsensical value is a mistake either way)."""
    at_least(req.max_length, 2, "--max-length")
    at_least(req.stride, 1, "--stride")
    at_least(req.max_tokens, 2, "--max-tokens")
    at_least(req.dev_samples, 1, "--dev-samples")
    at_least(req.ppl_batch_size, 1, "the perplexity batch size")
    at_least(req.sts_batch_size, 1, "the STS batch size")
    at_least(req.asr_batch_size, 1, "--asr-batch-size")
    at_least(req.asr_resamples, 1, "the number of bootstrap resamples")
    if req.asr_subsets is not None and not req.asr:
        raise NormswapError("--asr-subsets needs --asr DIR")
    if req.asr_groups is not None and not req.asr:
        raise NormswapError("--asr-groups needs --asr DIR")
    audio.subset_names(req.asr_subsets, "--asr-subsets")
    audio.subset_names(req.asr_groups, "--asr-groups")
    if req.max_length is not None and req.stride is not None and req.stride > req.max_length:
        raise NormswapError(f"--stride {req.stride} is longer than --max-length {req.max_length}: tokens between windows would go unscored")
    if not (isinstance(req.mlm_probability, (int, float)) and 0 < req.mlm_probability < 1):
        raise NormswapError(f"--mlm-probability must be in (0, 1), got {req.mlm_probability}")
    if not -(2**63) <= req.mask_seed < 2**64:  # what torch.Generator.manual_seed accepts
        raise NormswapError(f"--mask-seed must fit in 64 bits, got {req.mask_seed}")
    req.glue_settings.validate()


def _check_glue_data(req: EvalRequest, tok: Any, tasks: list[glue_data.GlueTask]) -> None:
    """Read every GLUE split now (a bad row fails in seconds, before any other evaluation runs),
    refuse a regression dev split whose scores are all equal (its correlations are undefined) and
    inputs longer than a model's positions."""
    from normswap.loading import load_config

    limits = []
    for _, path in _models(req):
        try:
            limits.append((checks.max_positions(load_config(path)), path))
        except NormswapError:
            pass  # a converted folder or an unusual config: the loader reports problems later
    for t in tasks:
        s = glue_settings_for(req, t)
        splits = {split: glue_data.read_split(req.glue_data, t, split) for split in ("train", "dev")}
        dev = glue_data.subsample(splits["dev"], req.dev_samples, DEV_SEED)
        if t.is_regression and len({e.label for e in dev}) == 1:
            raise NormswapError(f"the dev scores of {t.name} ({glue_data.split_file(req.glue_data, t, 'dev')}) are all {dev[0].label:g}, "
                                "so its correlations are undefined")
        special = tok.num_special_tokens_to_add(pair=len(t.text_columns) > 1) if hasattr(tok, "num_special_tokens_to_add") else 0
        if s.max_seq_length < special + len(t.text_columns):
            raise NormswapError(f"--max-seq-length {s.max_seq_length} leaves no room for the {len(t.text_columns)} text(s) of {t.name} "
                                f"after {special} special tokens")
        for limit, path in limits:
            if limit is not None and s.max_seq_length > limit:
                train = glue_data.subsample(splits["train"], s.train_samples, getattr(s, "data_seed", DEV_SEED))
                longest = max(len(ids) for ids in glue.encode(tok, train + dev, s.max_seq_length).input_ids)
                if longest > limit:
                    raise NormswapError(f"--max-seq-length {s.max_seq_length} is above the {limit} positions of {path}, and {t.name} "
                                        f"has inputs of {longest} tokens; give --max-seq-length {limit} or less")


def run_eval(req: EvalRequest) -> dict[str, Any]:
    """Run every requested evaluation; returns the results dict (and writes files under `req.out`)."""
    t0 = time.perf_counter()
    tok, tasks = _validate(req)
    speech = _validate_asr(req) if req.asr else None
    specs = _validate_tasks(req) if req.tasks else None
    text = perplexity.load_text(req.ppl) if req.ppl else None
    pairs = sts.read_sts(req.sts) if req.sts else None
    if not req.out:
        return _evaluate(req, tok, tasks, text, pairs, None, t0, speech, specs)
    # Results are written into a staging folder that replaces --out only when complete.
    final = Path(req.out)
    with atomic_output(final, overwrite=req.overwrite, inputs=_inputs(req)) as out:
        (out / "predictions").mkdir()
        res = _evaluate(req, tok, tasks, text, pairs, out, t0, speech, specs)
    for key in ("results_file", "chart"):
        if key in res:
            res[key] = str(final / Path(res[key]).relative_to(out))
    return res


def _inputs(req: EvalRequest) -> dict[str, str | None]:
    return {"model": req.model, "baseline": req.baseline, "--ppl text": req.ppl, "--sts file": req.sts, "--glue-data folder": req.glue_data,
            "--asr folder": req.asr, "--tasks-data folder": req.tasks.data if req.tasks else None,
            "--include-path folder": req.tasks.include_path if req.tasks else None}


def _evaluate(req: EvalRequest, tok: Any, tasks: list[glue_data.GlueTask], text: str | None, pairs: list[sts.StsPair] | None,
              out: Path | None, t0: float, speech: AsrInputs | None = None, specs: list[Any] | None = None) -> dict[str, Any]:
    res: dict[str, Any] = {"model": req.model, "baseline": req.baseline}
    details: dict[str, Any] = {}
    place = _placement(req)
    if text is not None:
        res["ppl"] = run_perplexity(req, tok, text)
    if pairs is not None:
        res["sts"] = run_sts(req, tok, pairs, out)
    if speech is not None:
        res["asr"] = run_asr(req, speech, out)
    if specs is not None:
        from normswap.evaluation import zeroshot

        res["tasks"], res["tasks_settings"] = zeroshot.run_tasks(_models(req), req.tasks, specs, out, req.progress,
                                                                 device=place.device, dtype=place.dtype)
    if tasks:
        res["glue"], res["glue_settings"], details["glue_runs"] = run_glue(req, tok, tasks, out)
    per_role: dict[str, dict[str, Any]] = {}
    glue_precision = ((res.get("glue_settings") or {}).get("precision") or {}).get("models") or {}
    for part in (res.get("ppl"), res.get("sts"), res.get("asr"), res.get("tasks_settings"), {"precision": glue_precision}):
        for role, info in ((part or {}).get("precision") or {}).items():
            if info:
                per_role.setdefault(role, {k: info[k] for k in ("dtype", "compute_dtype") if k in info})
    res.update(placement.summary(per_role, place))
    res["seconds"] = time.perf_counter() - t0
    checks.refuse_nan(res, req.model)
    if out is not None:
        payload = {"config": req.to_dict(), **results.provenance(), "results": res, **details}
        res["results_file"] = str(results.write_json(out / "results.json", payload))
        chart = results.delta_chart(out / "deltas.png", res, f"{Path(req.model).name} vs {Path(req.baseline or '').name or 'nothing'}")
        if chart is not None:
            res["chart"] = str(chart)
    return res


# ------------------------------------------------------------------------------------------- perplexity


def _load_lm(path: str, dtype: Any = torch.float32) -> tuple[nn.Module, str]:
    from normswap.loading import load_pretrained

    model = load_pretrained(path, dtype=dtype)
    return model, checks.require_lm_head(model, path)


def run_perplexity(req: EvalRequest, tok: Any, text: str) -> dict[str, Any]:
    """Perplexity of the converted model and the baseline on the same tokens and windows."""
    tt = perplexity.tokenize_text_bytes(tok, text, req.max_tokens)
    ids = tt.ids
    place = _placement(req)
    loaded = {role: _load_lm(path, place.load_dtype) for role, path in _models(req)}  # check heads and lengths before scoring
    kind = loaded["converted"][1]
    if "baseline" in loaded and loaded["baseline"][1] != kind:
        raise NormswapError(f"{req.model} is a {kind} LM but {req.baseline} is a {loaded['baseline'][1]} LM")
    limit = checks.max_positions(loaded["converted"][0].config)
    max_length = req.max_length or min(limit or 1024, 1024)
    if kind == "causal" and req.stride is not None and req.stride > max_length:
        raise NormswapError(f"--stride {req.stride} is longer than the {max_length}-token windows: tokens between windows would go unscored")
    for role, path in _models(req):
        checks.check_max_length(loaded[role][0], max_length, path)
    if kind == "masked" and req.stride is not None:
        logger.warning("--stride applies to causal LMs only; masked LMs are scored on non-overlapping chunks")
    scored: dict[str, perplexity.PerplexityResult] = {}
    precision: dict[str, dict[str, Any]] = {}
    for role, path in _models(req):
        precision[role] = {}
        with placement.placed(loaded.pop(role)[0], place, precision[role]) as model:
            logger.info("perplexity of %s (%s LM, %d tokens, max_length %d; %s, %s weights, %s compute)", path, kind, int(ids.numel()),
                        max_length, place.describe()["device"], precision[role]["dtype"], precision[role]["compute_dtype"])
            scored[role] = _score(req, model, kind, tok, ids, max_length, path, tt)
        del model
    for role, path in _models(req):
        if math.isinf(scored[role].value):
            logger.warning("the perplexity of %s overflows a float64: exp(%.1f nats/token) is reported as inf", path, scored[role].nll)
    c = scored["converted"]
    row: dict[str, Any] = {
        "kind": c.kind, "value": c.value, "nll": c.nll, "tokens": c.tokens, "max_length": c.max_length,
        "stride": c.stride, "windows": c.windows, "text_tokens": c.text_tokens,
        "nll_median": c.nll_median, "nll_p99": c.nll_p99, "nll_sum": c.nll_sum, "bits_per_byte": c.bits_per_byte, "bytes": c.bytes,
        **c.extra, "precision": precision,
    }
    if "baseline" in scored:
        b = scored["baseline"]
        row.update(baseline=b.value, delta=_difference(c.value, b.value), baseline_nll=b.nll, delta_nll=c.nll - b.nll,
                   baseline_nll_median=b.nll_median, baseline_nll_p99=b.nll_p99, baseline_bits_per_byte=b.bits_per_byte,
                   delta_bits_per_byte=None if c.bits_per_byte is None or b.bits_per_byte is None else c.bits_per_byte - b.bits_per_byte)
    else:
        row.update(baseline=None, delta=None)
    return row


def _score(req: EvalRequest, model: nn.Module, kind: str, tok: Any, ids: torch.Tensor, max_length: int, path: str,
           tt: Any) -> perplexity.PerplexityResult:
    if kind == "causal":
        return perplexity.causal_perplexity(model, ids, max_length=max_length, stride=req.stride,
                                            batch_size=req.ppl_batch_size, progress=req.progress, name=path, text=tt)
    if req.pseudo_ppl:
        return perplexity.pseudo_perplexity(model, tok, ids, max_length=max_length,
                                            batch_size=req.ppl_batch_size, progress=req.progress, name=path, text=tt)
    return perplexity.masked_lm_perplexity(model, tok, ids, max_length=max_length, mask_probability=req.mlm_probability,
                                           seed=req.mask_seed, batch_size=req.ppl_batch_size, progress=req.progress, name=path)


def _difference(a: float, b: float) -> float | None:
    """a - b for perplexities that may be inf (exp overflowed): inf - inf is undefined, so None, not NaN."""
    if math.isinf(a) and math.isinf(b):
        logger.warning("both perplexities overflow a float64 (inf): compare their nll/token instead")
        return None
    return a - b


# ---------------------------------------------------------------------------------- zero-shot tasks


def _validate_tasks(req: EvalRequest) -> list[Any]:
    """Task names, data files and lm-eval's task index, checked before any model is loaded."""
    from normswap.evaluation import zeroshot

    s = req.tasks
    for value, low, option in ((s.limit, 1, "--limit"), (s.batch_size, 1, "--batch-size"),
                               (s.resamples, 1, "the number of bootstrap resamples"), (s.num_fewshot, 0, "--num-fewshot")):
        at_least(value, low, option)
    s.names = zeroshot.parse_names(s.names)
    return zeroshot.task_specs(s)


# ------------------------------------------------------------------------------------------------- STS


def run_sts(req: EvalRequest, tok: Any, pairs: list[sts.StsPair], out: Path | None) -> dict[str, Any]:
    """Zero-shot STS of both models and the fidelity of the converted embeddings to the baseline's."""
    import transformers

    from normswap.loading import load_pretrained

    pooling = sts.pooling_mode(req.model)
    place = _placement(req)
    corr, cos, emb = {}, {}, {}
    precision: dict[str, dict[str, Any]] = {}
    for role, path in _models(req):
        precision[role] = {}
        with placement.placed(load_pretrained(path, auto_class=transformers.AutoModel, dtype=place.load_dtype), place,
                              precision[role]) as model:
            logger.info("zero-shot STS of %s on %d pairs (%s pooling)", path, len(pairs), pooling)
            corr[role], cos[role], emb[role] = sts.evaluate_sts(model, tok, pairs, pooling=pooling, batch_size=req.sts_batch_size,
                                                                progress=req.progress, name=path)
        del model
    row: dict[str, Any] = {"spearman": corr["converted"]["spearman"], "pearson": corr["converted"]["pearson"],
                           "pairs": len(pairs), "pooling": pooling, "precision": precision}
    if "baseline" in corr:
        row.update(baseline_spearman=corr["baseline"]["spearman"], baseline_pearson=corr["baseline"]["pearson"],
                   delta=corr["converted"]["spearman"] - corr["baseline"]["spearman"],
                   fidelity=sts.fidelity(emb["baseline"], emb["converted"]))
        if not math.isfinite(row["fidelity"]):
            raise NormswapError(f"the STS fidelity of {req.model} to {req.baseline} is {row['fidelity']}: not a number")
    else:
        row.update(baseline_spearman=None, fidelity=None, delta=None)
    if out is not None:
        header = ["index", "gold", "converted_cosine"] + (["baseline_cosine"] if "baseline" in cos else [])
        rows = [[i, p.score, float(cos["converted"][i])] + ([float(cos["baseline"][i])] if "baseline" in cos else [])
                for i, p in enumerate(pairs)]
        results.write_tsv(out / "predictions" / "sts.tsv", header, rows)
    return row


# ------------------------------------------------------------------------------------------------ GLUE


DEV_SEED = 0  # picks the --dev-samples subset, the same for every model, task and protocol
PROBE_OPTIONS = ("train_samples", "seeds", "max_seq_length", "batch_size")  # what --glue-mode probe takes from the command line
GLUE_PROTOCOLS = ("reference",)


def glue_settings_for(req: EvalRequest, task: glue_data.GlueTask) -> Any:
    """The settings one task runs with: the probe protocol's (`glue_probe.PROBE_PROTOCOL`), the
    reference fine-tuning protocol's (`glue.REFERENCE_PROTOCOL`) or the request's own, with the
    options given explicitly (`req.glue_given`) replacing a protocol's values."""
    import dataclasses

    if req.glue_mode == "probe":
        from normswap.evaluation import glue_probe

        wrong = sorted(set(req.glue_given) - set(PROBE_OPTIONS))
        if wrong:
            raise NormswapError(f"--{wrong[0].replace('_', '-')} applies to fine-tuning, not to --glue-mode probe "
                                f"(a probe takes {', '.join('--' + o.replace('_', '-') for o in PROBE_OPTIONS)})")
        if req.glue_protocol is not None:
            raise NormswapError(f"--glue-protocol {req.glue_protocol} is a fine-tuning protocol; --glue-mode probe has its own")
        return dataclasses.replace(glue_probe.probe_settings(task), **req.glue_given)
    if req.glue_mode != "finetune":
        raise NormswapError(f"unknown --glue-mode {req.glue_mode!r} (finetune or probe)")
    if req.glue_protocol is None:
        return req.glue_settings
    if req.glue_protocol not in GLUE_PROTOCOLS:
        raise NormswapError(f"unknown --glue-protocol {req.glue_protocol!r} ({', '.join(GLUE_PROTOCOLS)})")
    if task.name not in glue.REFERENCE_PROTOCOL:
        raise NormswapError(f"the reference protocol covers {', '.join(glue.REFERENCE_PROTOCOL)}, not {task.name}")
    return dataclasses.replace(glue.REFERENCE_PROTOCOL[task.name], **req.glue_given)


def run_glue(req: EvalRequest, tok: Any, tasks: list[glue_data.GlueTask], out: Path | None) -> tuple[dict, dict, list]:
    """Fine-tune (or probe) and score every (task, seed) for both models; summaries, settings and per-run details."""
    from normswap.evaluation import glue_probe

    probe = req.glue_mode == "probe"
    place = _placement(req)
    precision: dict[str, dict[str, Any]] = {}  # role -> the dtypes its models ran in (the same for every task and seed)
    jobs = {}
    for t in tasks:  # read everything first: a bad file fails before any training
        s = glue_settings_for(req, t)
        train_rows = glue_data.read_split(req.glue_data, t, "train")
        dev_rows = glue_data.subsample(glue_data.read_split(req.glue_data, t, "dev"), req.dev_samples, DEV_SEED)
        if probe:  # the probe draws its train_samples rows per seed itself
            cache: dict[Any, Any] = {}  # features by text, per model, shared by the seeds

            def one(path: str, seed: int, info: dict[str, Any], t=t, s=s, train_rows=train_rows, dev_rows=dev_rows,
                    cache=cache) -> glue.GlueRun:
                return glue_probe.run_probe_task_seed(path, tok, t, train_rows, dev_rows, s, seed, req.progress, cache,
                                                      place=place, precision=info)
            train_n = min(len(train_rows), s.train_samples or len(train_rows))
        else:
            train_enc = glue.encode(tok, glue_data.subsample(train_rows, s.train_samples, s.data_seed), s.max_seq_length)
            dev_enc = glue.encode(tok, dev_rows, s.max_seq_length)

            def one(path: str, seed: int, info: dict[str, Any], t=t, s=s, train_enc=train_enc, dev_enc=dev_enc) -> glue.GlueRun:
                return glue.run_task_seed(path, tok, t, train_enc, dev_enc, s, seed, req.progress, place=place, precision=info)
            train_n = len(train_enc.labels)
        jobs[t.name] = (t, s, dev_rows, one, train_n)
    summary: dict[str, Any] = {}
    sizes: dict[str, dict[str, int]] = {}
    details: list[dict[str, Any]] = []
    for t, s, dev_rows, one, train_n in jobs.values():
        runs: dict[str, list[glue.GlueRun]] = {role: [] for role, _ in _models(req)}
        for seed in range(s.seeds):
            for role, path in _models(req):
                run = one(path, seed, precision.setdefault(role, {}))
                runs[role].append(run)
                details.append({"role": role, "model": path, **{k: v for k, v in asdict(run).items() if k not in ("predictions", "references")}})
            if out is not None:
                write_glue_predictions(out, t, seed, dev_rows, runs)
        summary[t.name] = glue.summarise(runs["converted"], runs.get("baseline"))
        sizes[t.name] = {"train_examples": train_n, "dev_examples": len(dev_rows)}
    summary["average"] = {"score": glue.glue_average(summary)}
    per_task = {name: asdict(s) for name, (_, s, *_rest) in jobs.items()}
    settings: dict[str, Any] = {"mode": req.glue_mode, "protocol": "probe" if probe else (req.glue_protocol or "custom"),
                                "dev_samples": req.dev_samples, "data": sizes, "tasks": per_task,
                                "seeds": max(s["seeds"] for s in per_task.values()),
                                "precision": {**place.describe(), "models": precision}}
    if not probe and req.glue_protocol is None:
        settings.update({k: v for k, v in req.glue_settings.to_dict().items() if k not in settings})
    return summary, settings, details


def write_glue_predictions(out: Path, task: glue_data.GlueTask, seed: int, dev_rows: list[glue_data.GlueExample],
                           runs: dict[str, list[glue.GlueRun]]) -> None:
    """predictions/<task>_seed<k>.tsv: each dev row's label and every model's prediction at its latest seed."""
    roles = list(runs)
    header = ["row", "label"] + roles
    rows = []
    for i, ex in enumerate(dev_rows):
        label = ex.label if task.labels is None else task.labels[int(ex.label)]
        preds = [runs[r][-1].predictions[i] for r in roles]
        if task.labels is not None:
            preds = [task.labels[int(p)] for p in preds]
        rows.append([ex.row, label, *preds])
    results.write_tsv(out / "predictions" / f"{task.name}_seed{seed}.tsv", header, rows)


# ------------------------------------------------------------------------------------ speech recognition


@dataclass
class AsrInputs:
    """What `--asr` needs, read and checked before any model is loaded."""

    data: Any  # normswap.audio.AudioSet
    processors: dict[str, Any]  # role -> the checkpoint's own processor
    normalizer: Any


def _validate_asr(req: EvalRequest) -> AsrInputs:
    """The folder (audio headers, transcripts, manifest), both models' configs (speech
    encoder-decoders), their processors and the normaliser; then every audio file decoded once."""

    data = audio.read_audio_folder(req.asr, subsets=audio.subset_names(req.asr_subsets, "--asr-subsets"))
    asr_eval.check_groups(audio.subset_names(req.asr_groups, "--asr-groups") or (), data)  # before any model is loaded
    processors = {}
    for role, path in _models(req):
        asr_eval.speech_architecture(path)
        processors[role] = asr_eval.load_processor(path)
    rates = {role: int(p.feature_extractor.sampling_rate) for role, p in processors.items()}
    if len(set(rates.values())) > 1:
        raise NormswapError(f"{req.model} reads audio at {rates['converted']} Hz but {req.baseline} at {rates['baseline']} Hz")
    for role, path in _models(req):
        audio.check_lengths(data, asr_eval.max_seconds(processors[role]), path)
    normalizer = asr_eval.load_normalizer(req.model)
    audio.check_decodable(data, rates["converted"])
    logger.info("asr: %d utterances (%.1f min of audio) from %s%s", len(data.utterances), data.seconds / 60, req.asr,
                f", subsets {', '.join(data.subsets)}" if data.subsets else "")
    return AsrInputs(data, processors, normalizer)


def run_asr(req: EvalRequest, speech: AsrInputs, out: Path | None) -> dict[str, Any]:
    """Greedy transcription by both models of the same utterances, WER and the paired interval."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES

    from normswap.loading import load_pretrained

    place = _placement(req)
    hyps: dict[str, list[str]] = {}
    precision: dict[str, dict[str, Any]] = {}
    for role, path in _models(req):
        model = load_pretrained(path, dtype=place.load_dtype)
        if type(model).__name__ not in set(MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES.values()) or not hasattr(model, "generate"):
            raise NormswapError(f"--asr needs a speech-recognition encoder-decoder; {path} loads as {type(model).__name__}")
        precision[role] = {}
        with placement.placed(model, place, precision[role]) as model:
            logger.info("asr: transcribing %d utterances with %s (greedy, no timestamps, batch %d)", len(speech.data.utterances), path,
                        req.asr_batch_size)
            hyps[role] = asr_eval.transcribe(model, speech.processors[role], speech.data.utterances, batch_size=req.asr_batch_size,
                                             progress=req.progress, name=path)
        del model
    row, per_utt = asr_eval.evaluate(hyps, speech.data, speech.normalizer, resamples=req.asr_resamples, seed=req.asr_seed,
                                     groups=audio.subset_names(req.asr_groups, "--asr-groups") or ())
    row["data"] = str(req.asr)
    row["precision"] = precision
    if out is not None:
        header, rows = asr_eval.predictions_table(per_utt, list(hyps))
        results.write_tsv(out / "predictions" / "asr.tsv", header, rows)
    return row
