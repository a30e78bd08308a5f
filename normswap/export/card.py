"""The model card of a pushed checkpoint: Hub metadata (base_model, tags, model-index results from
the run's results.json) and a body that says how it was converted and how to load it."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from normswap.record import ConversionRecord

_PIPELINE = {"CausalLM": "text-generation", "LMHeadModel": "text-generation", "MaskedLM": "fill-mask",
             "SequenceClassification": "text-classification", "ImageClassification": "image-classification",
             "TokenClassification": "token-classification"}
_AUTO = {"text-generation": "AutoModelForCausalLM", "fill-mask": "AutoModelForMaskedLM",
         "text-classification": "AutoModelForSequenceClassification", "image-classification": "AutoModelForImageClassification",
         "token-classification": "AutoModelForTokenClassification"}


def pipeline_of(architecture: str) -> str | None:
    """The Hub pipeline tag of a transformers class name (None for a bare body such as BertModel)."""
    return next((v for k, v in _PIPELINE.items() if architecture.endswith(k)), None)


def looks_like_hub_id(name: str | None) -> bool:
    """"gpt2", "EleutherAI/pythia-160m": yes; local paths: no."""
    if not name or os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or os.path.exists(name):
        return False
    return all(part and all(c.isalnum() or c in "-_." for c in part) for part in name.split("/"))


def find_results(folder: str | os.PathLike, results: str | os.PathLike | None = None) -> tuple[dict[str, Any] | None, str | None]:
    """The recipe job that produced `folder` and which of its models `folder` is ("converted" or
    "recovered"), from `results` or the nearest results.json above it (job or run level)."""
    folder = Path(folder).resolve()
    candidates = [Path(results)] if results else [d / "results.json" for d in (folder, folder.parent, folder.parent.parent)]
    for path in candidates:
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        for job in data.get("jobs", [data]) if isinstance(data, dict) else []:
            for role, model in (job.get("models") or {}).items():
                if role != "original" and _same(model, folder, path):
                    return job, role
    return None, None


def _same(model: str, folder: Path, results_file: Path) -> bool:
    p = Path(model)
    tries = [p] if p.is_absolute() else [Path.cwd() / p, results_file.parent / p]
    # a relative path recorded by a run started elsewhere: match on its last parts
    return any(t.resolve() == folder for t in tries) or folder.as_posix().endswith("/" + p.as_posix().lstrip("./"))


def _dataset(key: str, note: str, job: dict[str, Any]) -> tuple[str, str, str | None]:
    ev = (job.get("config") or {}).get("eval") or {}
    if key == "ppl":
        data = str(((ev.get("ppl") or {}).get("data")) or "")
        name = Path(data).name if os.path.exists(data) else data
        if "wikitext" in data.lower():
            return "wikitext", f"WikiText ({name})", None
        return name or "text", name or "text", None
    if key.startswith("sts"):
        return "glue", "GLUE STS-B (dev)", "stsb"
    task = key.split("_")[1] if key.startswith("glue_") else "average"
    return "glue", f"GLUE {task} (dev)", task


def eval_results(job: dict[str, Any], role: str) -> list[Any]:
    """model-index entries: each figure of the pushed model, and its delta against the original."""
    from huggingface_hub import EvalResult

    out = []
    for key, row in (job.get("metrics") or {}).items():
        value = row.get(role)
        if value is None:
            continue
        dtype, dname, dconfig = _dataset(key, row.get("note", ""), job)
        task = "text-generation" if key == "ppl" and "MLM" not in row["label"] else (
            "fill-mask" if key == "ppl" else "sentence-similarity" if key.startswith("sts") else "text-classification")
        metric = "perplexity" if key == "ppl" else key.split("_", 2)[-1] if key.startswith("glue_") else "spearmanr"
        common = dict(task_type=task, dataset_type=dtype, dataset_name=dname, dataset_config=dconfig,
                      dataset_split="validation" if dtype == "glue" or "valid" in dname else None)
        out.append(EvalResult(metric_type=metric, metric_value=round(float(value), 6), metric_name=row["label"], **common))
        delta = row.get(f"delta_{role}")
        if delta is not None:
            out.append(EvalResult(metric_type=f"{metric}_delta", metric_value=round(float(delta), 6),
                                  metric_name=f"{row['label']}: delta vs original", **common))
    return out


def build_card(folder: str | os.PathLike, repo_id: str, *, job: dict[str, Any] | None = None, role: str | None = None) -> str:
    """README.md (YAML metadata + Markdown) for the converted checkpoint in `folder`."""
    from huggingface_hub import ModelCard, ModelCardData

    from normswap.loading import read_record

    record, cfg = read_record(folder)
    source = (record.source or {}).get("model")
    finetune = (record.source or {}).get("finetune")
    base = source if looks_like_hub_id(source) else None
    head = pipeline_of(record.architecture)
    tags = ["normswap", record.target, record.base_model_type, "layernorm-replacement"]
    if record.exact:
        tags.append("exact-conversion")
    if finetune:
        tags.append("distillation" if "distill" in (finetune.get("objective") or {}) else "fine-tuned")
    results = eval_results(job, role) if job and role else []
    data = ModelCardData(
        base_model=base, library_name="transformers", pipeline_tag=head, tags=tags,
        model_name=repo_id.split("/")[-1], eval_results=results or None, license=None,
    )
    body = _body(record, cfg, repo_id, source, base, finetune, job, role)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}").content


def _body(record: ConversionRecord, cfg: dict[str, Any], repo_id: str, source: str | None, base: str | None,
          finetune: dict[str, Any] | None, job: dict[str, Any] | None, role: str | None) -> str:
    from normswap import __version__

    auto = _AUTO.get(pipeline_of(record.architecture) or "", "AutoModel")
    name = {"rmsnorm": "RMSNorm", "dyt": "DyT (Dynamic Tanh)"}.get(record.target, record.target)
    n_sites = len(record.sites)
    folded = sum(s.folded for s in record.sites)
    # a model that already used RMSNorm (Llama, Gemma...): its norms kept their function, their gains folded or kept
    was_rmsnorm = bool(record.sites) and all(s.method in ("fold-gain", "keep-gain") for s in record.sites)
    replaced = "RMSNorm replaced by normswap's" if was_rmsnorm else "LayerNorm replaced by"
    how = ("**exact**: the model already used RMSNorm; each norm keeps its eps, and a folded norm's gain g moved "
           "into the linears that read it (W <- W diag(g))" if record.exact and was_rmsnorm else
           "**exact**: every residual-stream writer was centred, so each LayerNorm read a zero-mean input and equals "
           "RMSNorm with the same eps" if record.exact else
           "an **approximation**" + (" (DyT: alpha, weight and bias calibrated per site by least squares on text)" if record.target == "dyt" else ""))
    lines = [
        f"# {repo_id.split('/')[-1]}", "",
        f"`{source or 'a pretrained model'}` ({record.architecture}) with every {replaced} **{name}**, "
        f"made with [normswap](https://pypi.org/project/normswap/) {record.version or __version__}." + (
            f" Base model: [{base}](https://huggingface.co/{base})." if base else ""), "",
        "## How it was converted", "",
        f"- target: {record.target}; {n_sites} norm sites ({record.style}-LN {record.family or record.base_model_type}), "
        f"{folded} with their affine folded into the linears that read them",
        f"- the conversion is {how}",
    ]
    if record.tied_head:
        lines.append(f"- tied LM head: {record.tied_head}")
    if record.centered_embeddings:
        lines.append(f"- centred embedding lookups: {', '.join(record.centered_embeddings)}")
    if record.centered_inputs:
        lines.append(f"- inputs centred explicitly (one mean subtraction): {', '.join(record.centered_inputs)}")
    if record.new_biases:
        lines.append(f"- {len(record.new_biases)} linear layers gained a bias from folding")
    if record.unfolded:
        lines.append(f"- {len(record.unfolded)} sites keep their affine (e.g. {next(iter(record.unfolded.values()))})")
    if finetune:
        obj = ", ".join(f"{k} {v:g}" for k, v in (finetune.get("objective") or {}).items())
        lines.append(f"- then fine-tuned to recover quality: objective {obj}, {finetune.get('steps')} steps, "
                     f"{finetune.get('tokens')} tokens" + (f", teacher `{finetune.get('teacher')}`" if finetune.get("teacher") else ""))
    lines += ["", "## Loading", "",
              "Without normswap (the custom code in this repository rebuilds the converted architecture and loads strictly):", "",
              "```python", f"from transformers import {auto}",
              f"model = {auto}.from_pretrained(\"{repo_id}\", trust_remote_code=True)", "```", "",
              "With normswap installed (`pip install normswap`), no remote code runs:", "",
              "```python", "import normswap", "from huggingface_hub import snapshot_download",
              f"model = normswap.load(snapshot_download(\"{repo_id}\"))", "```", "",
              f"Plain `{auto}.from_pretrained(\"{repo_id}\")` without `trust_remote_code` refuses the `normswap` model "
              "type rather than silently rebuilding LayerNorm.", ""]
    if job and role and job.get("metrics"):
        lines += ["## Evaluation", "",
                  f"From the normswap recipe job `{job.get('name')}`; this checkpoint is the **{role}** model. "
                  "Δ = model - original.", "",
                  "| metric | original | converted | recovered | Δ converted | Δ recovered |", "|---|---:|---:|---:|---:|---:|"]
        for row in job["metrics"].values():
            def f(x: Any) -> str:
                return "" if x is None else f"{x:.4g}"

            def d(x: Any) -> str:
                return "" if x is None else f"{x:+.4g}"
            lines.append(f"| {row['label']} | {f(row.get('original'))} | {f(row.get('converted'))} | {f(row.get('recovered'))} | "
                         f"{d(row.get('delta_converted'))} | {d(row.get('delta_recovered'))} |")
        notes = sorted({f"- {r['label']}: {r['note']}" for r in job["metrics"].values() if r.get("note")})
        lines += ["", *notes, ""]
    lines += ["## Conversion record", "", "The `normswap` section of `config.json` lists every site's new type, "
              "placement, folding and calibrated alpha, the source model and revision, and the tool version.", ""]
    return "\n".join(lines)
