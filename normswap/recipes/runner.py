"""Running a validated recipe: every job's stages, in order, each into its own folder, resumable.

Run folder layout (`<output_dir>/<recipe name>/`):

    recipe.yaml          the recipe file as given          resolved.yaml  after overrides and paths
    run.log              normswap's log of every run        results.json   all figures + provenance
    report.md            tables and plots                   deltas.png, loss_curves.png
    <job>/convert/       the converted checkpoint           <job>/convert.json   what conversion did
    <job>/finetune/      the recovered checkpoint, train_log.jsonl, loss_curve.png, checkpoints
    <job>/eval/<role>/   results.json, predictions/ (role: original, converted, recovered)
    <job>/stages.json    completed stages and their fingerprints
    <job>/results.json   the job's figures (read by `normswap push` for the model card)

A stage is complete when `stages.json` holds it with the fingerprint of its current settings and
inputs (which include the fingerprints of the stages before it). Re-running the recipe skips
complete stages, re-runs changed ones and everything after them, and continues an interrupted
fine-tuning from its last checkpoint; `force=True` runs everything again.

`device` and `dtype` (of a section, or inherited from the job) reach the library functions as
keyword arguments, and only when the recipe sets them: `convert_model(..., device=)` (its `dtype=`
is the output dtype, always passed), `finetune(..., device=, dtype=)` and the evaluation request
(`EvalRequest.device` / `.dtype`, "auto" when unset). A stage's fingerprint includes them when set.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

from normswap.errors import NormswapError
from normswap.log import logger
from normswap.outputs import atomic_output, check_output
from normswap.recipes.schema import PATH_KEYS, Job, Recipe

STATE_FILE = "stages.json"


def fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_config(section: Any, **kwargs: Any) -> dict[str, Any]:
    """A section's settings as fingerprinted: `device` / `dtype` left out when unset, so a run
    folder made before those keys existed keeps its completed stages."""
    cfg = section.model_dump(mode="json", **kwargs)
    for key in ("device", "dtype"):
        if cfg.get(key, "") is None:
            del cfg[key]
    return cfg


@contextlib.contextmanager
def _log_to(path: Path) -> Iterator[None]:
    """Copy normswap's log records into the run's log file (stderr keeps its own handler)."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    handler.setLevel(logging.INFO)
    old_level = logger.level
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()
        logger.setLevel(old_level)


class _State:
    """The job's stages.json: which stages are complete, with which fingerprint."""

    def __init__(self, job_dir: Path):
        self.path = job_dir / STATE_FILE
        self.data: dict[str, Any] = {}
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as err:
                data = err
            if isinstance(data, dict) and all(isinstance(v, dict) for v in data.values()):
                self.data = data
            else:  # a damaged record of completed stages costs a re-run of those stages, nothing else
                logger.warning("%s is damaged (%s): every stage of this job runs again", self.path,
                               data if isinstance(data, Exception) else "not a mapping of stages")

    def done(self, stage: str, fp: str) -> dict[str, Any] | None:
        entry = self.data.get(stage)
        return entry if entry and entry.get("fingerprint") == fp else None

    def mark(self, stage: str, fp: str, seconds: float, summary: dict[str, Any]) -> None:
        self.data[stage] = {"fingerprint": fp, "seconds": round(seconds, 2), "summary": summary,
                            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        tmp = self.path.with_name("." + self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        tmp.replace(self.path)

    def forget(self, stage: str) -> None:
        self.data.pop(stage, None)


def run_dir_of(recipe: Recipe, output_dir: str | Path | None = None) -> Path:
    return Path(output_dir if output_dir is not None else recipe.output_dir) / recipe.name


def run_recipe(recipe: Recipe, *, output_dir: str | Path | None = None, force: bool = False,
               jobs: list[str] | None = None, progress: bool | None = None) -> dict[str, Any]:
    """Run every job of `recipe` (or the named `jobs`); returns the run's results dict. One run per
    run folder: while it runs, another one refuses (see `normswap.locking.folder_lock`)."""
    from normswap.locking import folder_lock

    with folder_lock(run_dir_of(recipe, output_dir), "recipe run"):
        return _run_recipe(recipe, output_dir=output_dir, force=force, jobs=jobs, progress=progress)


def _run_recipe(recipe: Recipe, *, output_dir: str | Path | None = None, force: bool = False,
                jobs: list[str] | None = None, progress: bool | None = None) -> dict[str, Any]:
    """Run every job of `recipe` (or the named `jobs`); returns the run's results dict."""
    from normswap.recipes.report import write_report, write_results

    selected = recipe.jobs
    if jobs:
        unknown = [j for j in jobs if j not in {x.name for x in recipe.jobs}]
        if unknown:
            raise NormswapError(f"no job {unknown[0]!r} in {recipe.path} (jobs: {', '.join(j.name for j in recipe.jobs)})")
        selected = [j for j in recipe.jobs if j.name in jobs]
    run_dir = run_dir_of(recipe, output_dir)
    check_output(run_dir, overwrite=False, allow_existing=True, inputs=recipe_inputs(recipe), flag="run folder")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise NormswapError(f"cannot create run folder {run_dir}: {err.strerror}") from None
    t0 = time.perf_counter()
    if not (run_dir / "recipe.yaml").exists() or not (run_dir / "recipe.yaml").samefile(recipe.path):
        shutil.copyfile(recipe.path, run_dir / "recipe.yaml")
    (run_dir / "resolved.yaml").write_text(yaml.safe_dump(recipe.resolved(), sort_keys=False))
    outcomes: list[dict[str, Any]] = []
    with _log_to(run_dir / "run.log"):
        logger.info("recipe %s: %d job(s) -> %s%s", recipe.path, len(selected), run_dir, " (--force)" if force else "")
        if recipe.overrides:
            logger.info("overrides: %s", " ".join(recipe.overrides))
        for job in selected:
            outcomes.append(run_job(job, run_dir, force=force, progress=progress))
        wall = time.perf_counter() - t0
        results = write_results(recipe, run_dir, outcomes, wall)
        report = write_report(recipe, run_dir, results)
        logger.info("report: %s (%.1f s)", report, wall)
    results["report"] = str(report)
    return results


def recipe_inputs(recipe: Recipe) -> dict[str, Any]:
    """Every local input the recipe's jobs read (models, data), named for error messages."""
    found: dict[str, Any] = {}
    for job in recipe.jobs:
        for key in PATH_KEYS:
            node: Any = job
            for k in key:
                node = getattr(node, k, None) if node is not None else None
            if isinstance(node, (str, Path)) and node not in ("original",):
                found[f"{job.name} {'.'.join(key)}"] = node
    return found


def run_job(job: Job, run_dir: Path, *, force: bool = False, progress: bool | None = None) -> dict[str, Any]:
    """One job's stages; returns {name, model, target, stages: {stage: summary}, evals: {role: results}}."""
    from normswap.recipes.report import job_results

    job_dir = run_dir / job.name
    job_dir.mkdir(parents=True, exist_ok=True)
    state = _State(job_dir)
    models: dict[str, str] = {"original": job.model}
    summaries: dict[str, Any] = {}
    timings: dict[str, float] = {}
    upstream = fingerprint({"model": job.model})
    role_fp = {"original": upstream}  # the fingerprint of the stage that made each model
    skipped: list[str] = []

    for stage in job.stages:
        cfg = stage_config(getattr(job, stage))
        fp = fingerprint({"stage": stage, "config": cfg, "upstream": upstream})
        if stage in ("convert", "finetune"):
            out = job_dir / stage
            if stage == "convert":
                role, make = "converted", lambda: _convert(job, out, job_dir / "convert.json")
            else:
                source = models.get("converted", job.model)
                role, make = "recovered", lambda: _finetune(job, source, out, force=force, progress=progress)
            entry = _run_once(state, stage, fp, out / "config.json", make, skipped, force)
            models[role] = str(out)
            role_fp[role] = fp
        else:  # eval: one sub-stage per model, so an interrupted evaluation keeps what it finished
            evals: dict[str, Any] = {}
            t_eval = 0.0
            for role in job.eval.models:
                if role not in models:
                    continue
                key = f"eval:{role}"
                rfp = fingerprint({"stage": key, "config": cfg, "upstream": role_fp[role]})
                res_file = job_dir / "eval" / role / "results.json"
                fresh: dict[str, Any] = {}  # this run's results as returned, when the stage runs now

                def evaluate() -> dict[str, Any]:  # called at once, inside this iteration
                    fresh["res"] = _evaluate(job, role, models[role], job_dir / "eval" / role, run_dir, force=force, progress=progress)
                    return {"results": str(res_file)}

                entry = _run_once(state, key, rfp, res_file, evaluate, skipped, force)
                evals[role] = fresh["res"] if "res" in fresh else json.loads(res_file.read_text())["results"]
                t_eval += entry["seconds"]
            summaries["eval"] = evals
            summaries["paired"] = _paired_task_deltas(job, job_dir)
            timings["eval"] = t_eval
            continue
        summaries[stage] = entry["summary"]
        timings[stage] = entry["seconds"]
        upstream = fp
    if skipped:
        logger.info("job %s: skipped complete stage(s) %s (use --force to redo)", job.name, ", ".join(skipped))
    return job_results(job, job_dir, models, summaries, timings, skipped)


def _run_once(state: _State, key: str, fp: str, output: Path, run: Callable[[], dict[str, Any]],
              skipped: list[str], force: bool) -> dict[str, Any]:
    """Run a stage unless an earlier run with the same fingerprint finished it and left `output`;
    returns the stage's state entry (summary and seconds)."""
    entry = None if force else state.done(key, fp)
    if entry is not None and _intact_json(output):
        skipped.append(key)
        return entry
    state.forget(key)
    t = time.perf_counter()
    summary = run()
    state.mark(key, fp, time.perf_counter() - t, summary)
    return state.data[key]


def _intact_json(path: Path) -> bool:
    """A stage's output file exists and reads as a JSON object (a damaged one means: run again)."""
    try:
        return isinstance(json.loads(path.read_text(encoding="utf-8")), dict)
    except (OSError, ValueError):
        return False


# ---------------------------------------------------------------------------------------- stages


def _convert(job: Job, out: Path, info_file: Path) -> dict[str, Any]:
    from normswap.conversion import convert_model
    from normswap.loading import save
    from normswap.textfiles import read_text

    c = job.convert
    extra = {"device": c.device} if c.device is not None else {}  # dtype (the output's) is always passed
    logger.info("job %s: convert %s -> %s%s", job.name, job.model, c.to, f" on {c.device}" if extra else "")
    model, result = convert_model(
        job.model, c.to, fold=c.fold, tied_head=c.tied_head,
        calib_text=read_text(c.calib_text) if c.calib_text else None, calib_tokens=c.calib_tokens,
        sequential=c.sequential, alpha_init=c.alpha_init, verify=c.verify,
        verify_text=read_text(c.verify_text) if c.verify_text else None, revision=c.revision,
        trust_remote_code=c.trust_remote_code, dtype=c.dtype, calib_audio=c.calib_audio, verify_audio=c.verify_audio,
        calib_audio_subsets=c.calib_audio_subsets, variant=c.variant, calibrate=c.calibrate, e2e_steps=c.e2e_steps,
        e2e_seconds=c.e2e_seconds, **extra,
    )
    model.to("cpu")  # saved from host memory, whichever device it ran on ("auto" may have picked an accelerator)
    save(model, out, result.record, tokenizer=result.tokenizer, copy_from=job.model if Path(job.model).is_dir() else None,
         overwrite=True)
    data = result.to_json() | {"out": str(out)}
    info_file.write_text(json.dumps(data, indent=2, default=str) + "\n")
    errs = [s["calib_rel_error"] for s in data["sites"] if "calib_rel_error" in s]
    return {"target": c.to, "exact": data["exact"], "sites": len(data["sites"]), "folded": sum(s["folded"] for s in data["sites"]),
            "max_rel_diff": data.get("max_rel_diff"), "max_abs_diff": data.get("max_abs_diff"),
            "dtype": data.get("dtype"), "device": data.get("device"),
            "calib_rel_error_mean": sum(errs) / len(errs) if errs else None, "tied_head": data["tied_head"],
            "warnings": data["warnings"], "seconds": data["seconds"]}


def _finetune(job: Job, student: str, out: Path, *, force: bool, progress: bool | None) -> dict[str, Any]:
    from normswap.training import finetune
    from normswap.training.api import resumable
    from normswap.training.objectives import parse_objective

    f = job.finetune
    cfg = f.train_config()
    weights = parse_objective(cfg.objective)
    teacher = None
    if f.teacher is not None and (weights.get("distill", 0) > 0 or cfg.progressive):
        teacher = job.model if f.teacher == "original" else f.teacher
    resume = not force and resumable(out)
    logger.info("job %s: finetune %s (%s%s) on %s%s", job.name, student, cfg.objective,
                f", teacher {teacher}" if teacher else "", f.data or f.audio, ", resuming" if resume else "")
    source = {"data": f.data} if f.data is not None else {"audio": f.audio, "audio_subsets": f.audio_subsets}
    result = None
    if resume:
        try:
            result = finetune(student, **source, out=out, teacher=teacher, config=cfg, resume=True)
        except NormswapError as err:
            logger.info("job %s: cannot resume (%s); starting over", job.name, err)
    if result is None:
        result = finetune(student, **source, out=out, teacher=teacher, config=cfg, overwrite=True)
    if result.status == "interrupted":
        import signal

        from normswap.interrupts import Interrupted

        logger.info("job %s: fine-tuning interrupted at step %d; run the recipe again to resume", job.name, result.step)
        raise Interrupted(signal.SIGTERM if result.signal == "SIGTERM" else signal.SIGINT)
    return {"objective": cfg.objective, "teacher": teacher, "status": result.status, "steps": result.step,
            "total_steps": result.total_steps, "tokens": result.tokens, "train_seconds": round(result.train_seconds, 1),
            "tokens_per_second": round(result.tokens_per_second, 1), "last_loss": result.last_loss, "val": result.val,
            **({"audio_seconds": round(result.audio_seconds, 1), "audio_seconds_per_second": round(result.audio_seconds_per_second, 2)}
               if f.audio is not None else {}),
            "loss_curve": str(out / "loss_curve.png") if (out / "loss_curve.png").is_file() else None}


def _evaluate(job: Job, role: str, model: str, out: Path, run_dir: Path, *, force: bool, progress: bool | None) -> dict[str, Any]:
    """Evaluate one model alone (deltas are taken later, against the original's figures). The
    original's figures are shared between the jobs of a run that evaluate it the same way."""
    from normswap.evaluation.results import write_json
    from normswap.evaluation.runner import run_eval

    req = eval_request(job, model, out, progress)
    cache = run_dir / ".cache" / f"original-{fingerprint({'model': model, 'eval': stage_config(job.eval, exclude={'models'})})}"
    if role == "original" and not force and (cache / "results.json").is_file():
        logger.info("job %s: original %s already evaluated in this run; reusing %s", job.name, model, cache)
        with atomic_output(out, overwrite=True) as tmp:
            link_tree(cache, tmp)
        return json.loads((out / "results.json").read_text())["results"]
    logger.info("job %s: evaluate %s (%s)", job.name, role, model)
    res = run_eval(req)
    if not (out / "results.json").is_file():  # run_eval writes it; keep the contract explicit
        write_json(out / "results.json", {"results": res})
    if role == "original":
        with atomic_output(cache, overwrite=True) as tmp:
            link_tree(out, tmp)
    return res


def link_tree(src: Path, dst: Path) -> None:
    """Copy folder `src` into `dst` as hard links where the file system allows them, else as
    copies: the shared evaluation of the original is the same bytes in every job that uses it, and
    no one writes into a finished evaluation folder (a new evaluation is a new folder, swapped in
    by `atomic_output`), so the links never see a change meant for only one of them."""
    def link(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:  # another file system, or one without hard links
            shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=link, dirs_exist_ok=True)


def _paired_task_deltas(job: Job, job_dir: Path) -> dict[str, Any]:
    """Zero-shot deltas against the original with paired intervals: each model was scored alone,
    but on the same documents, so lm-eval's per-sample logs pair them afterwards."""
    if not (job.eval and job.eval.tasks):
        return {}
    from normswap.evaluation import zeroshot

    original = zeroshot.load_run(job_dir / "eval" / "original" / "lm_eval")
    if original is None:
        return {}
    settings = eval_request(job, job.model, job_dir).tasks
    out = {}
    for role in ("converted", "recovered"):
        run = zeroshot.load_run(job_dir / "eval" / role / "lm_eval")
        if run is not None:
            out[role] = zeroshot.paired_deltas(run, original, settings)
    return out


def eval_request(job: Job, model: str, out: Path, progress: bool | None = None) -> Any:
    from normswap.evaluation.glue import GlueSettings
    from normswap.evaluation.runner import EvalRequest

    e = job.eval
    req = EvalRequest(model=model, baseline=None, out=str(out), overwrite=True, progress=progress, **e.placement())
    if e.ppl:
        req.ppl, req.max_length, req.stride, req.max_tokens = e.ppl.data, e.ppl.max_length, e.ppl.stride, e.ppl.max_tokens
        req.pseudo_ppl, req.mlm_probability, req.mask_seed, req.ppl_batch_size = e.ppl.pseudo, e.ppl.mlm_probability, e.ppl.mask_seed, e.ppl.batch_size
    if e.sts:
        req.sts, req.sts_batch_size = e.sts.data, e.sts.batch_size
    if e.glue:
        g = e.glue
        req.glue, req.glue_data, req.dev_samples = ",".join(g.tasks), g.data, g.dev_samples
        req.glue_settings, req.glue_given = GlueSettings(**g.given()), g.given()
        req.glue_mode, req.glue_protocol = g.mode, g.protocol
    if e.asr:
        req.asr, req.asr_subsets, req.asr_batch_size, req.asr_groups = e.asr.data, e.asr.subsets, e.asr.batch_size, e.asr.groups
    if e.tasks:
        from normswap.evaluation.zeroshot import TaskSettings

        t = e.tasks
        req.tasks = TaskSettings(names=list(t.names), data=t.data, include_path=t.include_path, limit=t.limit,
                                 num_fewshot=t.num_fewshot, batch_size=t.batch_size)
    return req
