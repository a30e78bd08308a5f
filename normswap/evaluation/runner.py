"""One evaluation run: converted model against its baseline on perplexity, STS and GLUE.

Everything that can be checked cheaply (task names, data files, text, tokenizers, heads, window
length) is checked before any long work starts, so a mistake costs seconds, not a fine-tuning run.
Models are loaded one at a time where possible to keep memory at one model.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from normswap.errors import NormswapError
from normswap.evaluation import checks, glue, glue_data, perplexity, results, sts
from normswap.evaluation.glue import GlueSettings
from normswap.log import logger


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
    glue_settings: GlueSettings = field(default_factory=GlueSettings)
    dev_samples: int | None = None  # score a fixed subset of dev (budget runs); None: all of dev
    out: str | None = None
    progress: bool | None = None  # None: a bar only when stderr is a terminal

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _models(req: EvalRequest) -> list[tuple[str, str]]:
    """(role, path) pairs: the converted model first, then the baseline if any."""
    return [("converted", req.model)] + ([("baseline", req.baseline)] if req.baseline else [])


def _validate(req: EvalRequest) -> tuple[Any, list[glue_data.GlueTask]]:
    if not (req.ppl or req.sts or req.glue):
        raise NormswapError("nothing to evaluate: give --ppl FILE, --sts FILE and/or --glue TASKS")
    tasks: list[glue_data.GlueTask] = []
    if req.glue:
        tasks = glue_data.parse_tasks(req.glue)
        if not req.glue_data:
            raise NormswapError("--glue needs --glue-data DIR (a folder in the GLUE layout: DIR/SST-2/train.tsv, ...)")
        req.glue_settings.validate()
        for t in tasks:
            glue_data.split_file(req.glue_data, t, "train")
            glue_data.split_file(req.glue_data, t, "dev")
    if req.glue_data and not req.glue:
        raise NormswapError("--glue-data needs --glue TASKS")
    if req.max_length is not None and req.max_length < 2:
        raise NormswapError(f"--max-length must be at least 2, got {req.max_length}")
    if req.stride is not None and req.stride < 1:
        raise NormswapError(f"--stride must be positive, got {req.stride}")
    from normswap.loading import check_source, load_tokenizer

    for _, path in _models(req):
        check_source(path)  # the loader's own path checks, before anything heavy
    tok = load_tokenizer(req.model)
    if tok is None:
        raise NormswapError(f"{req.model} has no tokenizer files")
    if req.baseline:
        checks.check_same_tokenizer(load_tokenizer(req.baseline), tok, req.baseline, req.model)
    return tok, tasks


def run_eval(req: EvalRequest) -> dict[str, Any]:
    """Run every requested evaluation; returns the results dict (and writes files under `req.out`)."""
    t0 = time.perf_counter()
    tok, tasks = _validate(req)
    text = perplexity.load_text(req.ppl) if req.ppl else None
    pairs = sts.read_sts(req.sts) if req.sts else None
    out = results.prepare_out(req.out) if req.out else None
    res: dict[str, Any] = {"model": req.model, "baseline": req.baseline}
    details: dict[str, Any] = {}
    if text is not None:
        res["ppl"] = run_perplexity(req, tok, text)
    if pairs is not None:
        res["sts"] = run_sts(req, tok, pairs, out)
    if tasks:
        res["glue"], res["glue_settings"], details["glue_runs"] = run_glue(req, tok, tasks, out)
    res["seconds"] = time.perf_counter() - t0
    if out is not None:
        payload = {"config": req.to_dict(), **results.provenance(), "results": res, **details}
        res["results_file"] = str(results.write_json(out / "results.json", payload))
        chart = results.delta_chart(out / "deltas.png", res, f"{Path(req.model).name} vs {Path(req.baseline or '').name or 'nothing'}")
        if chart is not None:
            res["chart"] = str(chart)
    return res


# ------------------------------------------------------------------------------------------- perplexity


def _load_lm(path: str) -> tuple[nn.Module, str]:
    from normswap.loading import load_pretrained

    model = load_pretrained(path)
    return model, checks.require_lm_head(model, path)


def run_perplexity(req: EvalRequest, tok: Any, text: str) -> dict[str, Any]:
    """Perplexity of the converted model and the baseline on the same tokens and windows."""
    ids = perplexity.tokenize_text(tok, text, req.max_tokens)
    loaded = {role: _load_lm(path) for role, path in _models(req)}  # check heads and lengths before scoring
    kind = loaded["converted"][1]
    if "baseline" in loaded and loaded["baseline"][1] != kind:
        raise NormswapError(f"{req.model} is a {kind} LM but {req.baseline} is a {loaded['baseline'][1]} LM")
    limit = checks.max_positions(loaded["converted"][0].config)
    max_length = req.max_length or min(limit or 1024, 1024)
    for role, path in _models(req):
        checks.check_max_length(loaded[role][0], max_length, path)
    if kind == "masked" and req.stride is not None:
        logger.warning("--stride applies to causal LMs only; masked LMs are scored on non-overlapping chunks")
    scored: dict[str, perplexity.PerplexityResult] = {}
    for role, path in _models(req):
        model = loaded.pop(role)[0].to(_device())
        logger.info("perplexity of %s (%s LM, %d tokens, max_length %d)", path, kind, int(ids.numel()), max_length)
        if kind == "causal":
            scored[role] = perplexity.causal_perplexity(model, ids, max_length=max_length, stride=req.stride,
                                                        batch_size=req.ppl_batch_size, progress=req.progress)
        elif req.pseudo_ppl:
            scored[role] = perplexity.pseudo_perplexity(model, tok, ids, max_length=max_length,
                                                        batch_size=req.ppl_batch_size, progress=req.progress)
        else:
            scored[role] = perplexity.masked_lm_perplexity(model, tok, ids, max_length=max_length, mask_probability=req.mlm_probability,
                                                           seed=req.mask_seed, batch_size=req.ppl_batch_size, progress=req.progress)
        del model
    c = scored["converted"]
    row: dict[str, Any] = {
        "kind": c.kind, "value": c.value, "nll": c.nll, "tokens": c.tokens, "max_length": c.max_length,
        "stride": c.stride, "windows": c.windows, "text_tokens": c.text_tokens,
        "nll_median": c.nll_median, "nll_p99": c.nll_p99, **c.extra,
    }
    if "baseline" in scored:
        b = scored["baseline"]
        row.update(baseline=b.value, delta=c.value - b.value, baseline_nll=b.nll, delta_nll=c.nll - b.nll,
                   baseline_nll_median=b.nll_median, baseline_nll_p99=b.nll_p99)
    else:
        row.update(baseline=None, delta=None)
    return row


# ------------------------------------------------------------------------------------------------- STS


def run_sts(req: EvalRequest, tok: Any, pairs: list[sts.StsPair], out: Path | None) -> dict[str, Any]:
    """Zero-shot STS of both models and the fidelity of the converted embeddings to the baseline's."""
    import transformers

    from normswap.loading import load_pretrained

    pooling = sts.pooling_mode(req.model)
    corr, cos, emb = {}, {}, {}
    for role, path in _models(req):
        model = load_pretrained(path, auto_class=transformers.AutoModel).to(_device())
        logger.info("zero-shot STS of %s on %d pairs (%s pooling)", path, len(pairs), pooling)
        corr[role], cos[role], emb[role] = sts.evaluate_sts(model, tok, pairs, pooling=pooling, batch_size=req.sts_batch_size, progress=req.progress)
        del model
    row: dict[str, Any] = {"spearman": corr["converted"]["spearman"], "pearson": corr["converted"]["pearson"],
                           "pairs": len(pairs), "pooling": pooling}
    if "baseline" in corr:
        row.update(baseline_spearman=corr["baseline"]["spearman"], baseline_pearson=corr["baseline"]["pearson"],
                   delta=corr["converted"]["spearman"] - corr["baseline"]["spearman"],
                   fidelity=sts.fidelity(emb["baseline"], emb["converted"]))
    else:
        row.update(baseline_spearman=None, fidelity=None, delta=None)
    if out is not None:
        header = ["index", "gold", "converted_cosine"] + (["baseline_cosine"] if "baseline" in cos else [])
        rows = [[i, p.score, float(cos["converted"][i])] + ([float(cos["baseline"][i])] if "baseline" in cos else [])
                for i, p in enumerate(pairs)]
        results.write_tsv(out / "predictions" / "sts.tsv", header, rows)
    return row


# ------------------------------------------------------------------------------------------------ GLUE


def run_glue(req: EvalRequest, tok: Any, tasks: list[glue_data.GlueTask], out: Path | None) -> tuple[dict, dict, list]:
    """Fine-tune and score every (task, seed) for both models; summaries, settings and per-run details."""
    s = req.glue_settings
    data = {}
    for t in tasks:  # read everything first: a bad file fails before any training
        train_rows = glue_data.subsample(glue_data.read_split(req.glue_data, t, "train"), s.train_samples, s.data_seed)
        dev_rows = glue_data.subsample(glue_data.read_split(req.glue_data, t, "dev"), req.dev_samples, s.data_seed)
        data[t.name] = (dev_rows, glue.encode(tok, train_rows, s.max_seq_length), glue.encode(tok, dev_rows, s.max_seq_length))
    summary: dict[str, Any] = {}
    sizes: dict[str, dict[str, int]] = {}
    details: list[dict[str, Any]] = []
    for t in tasks:
        dev_rows, train_enc, dev_enc = data[t.name]
        runs: dict[str, list[glue.GlueRun]] = {role: [] for role, _ in _models(req)}
        for seed in range(s.seeds):
            for role, path in _models(req):
                run = glue.run_task_seed(path, tok, t, train_enc, dev_enc, s, seed, req.progress)
                runs[role].append(run)
                details.append({"role": role, "model": path, **{k: v for k, v in asdict(run).items() if k != "predictions"}})
            if out is not None:
                _write_glue_predictions(out, t, seed, dev_rows, runs)
        summary[t.name] = glue.summarise(runs["converted"], runs.get("baseline"))
        sizes[t.name] = {"train_examples": len(train_enc.labels), "dev_examples": len(dev_enc.labels)}
    summary["average"] = {"score": glue.glue_average(summary)}
    settings = {**s.to_dict(), "dev_samples": req.dev_samples, "data": sizes}
    return summary, settings, details


def _write_glue_predictions(out: Path, task: glue_data.GlueTask, seed: int, dev_rows: list[glue_data.GlueExample],
                            runs: dict[str, list[glue.GlueRun]]) -> None:
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
