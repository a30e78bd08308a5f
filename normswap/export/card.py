"""The model card of a pushed checkpoint: Hub metadata (base_model, tags, model-index results from
the run's results.json) and a body that says how it was converted and how to load it.

A card is published: it never shows a local filesystem path (a model is named by its Hub id, or as
"a local checkpoint", see `public_name`), and its install line is one that works for the normswap
that wrote it (`install_line`: a package index, a public URL, or "from its source")."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

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


def public_name(name: str | None, *, missing: str = "a pretrained model") -> str:
    """How a card names a model: its Hub id, "a local checkpoint" for anything that is not one
    (a path on the machine that converted it means nothing to a reader, and may tell too much)."""
    if not name:
        return missing
    return name if looks_like_hub_id(name) else "a local checkpoint"


def install_line() -> str:
    """A sentence saying how to install the normswap writing this card.

    From a package index: `pip install normswap==X`. From a public VCS or archive URL (pip's
    direct_url.json): that URL, pinned to its commit. From a local folder or an editable checkout:
    no pip line can name that folder for someone else, so "normswap X, installed from its source"."""
    import importlib.metadata as md

    from normswap import __version__

    info, located = None, False
    for dist in md.distributions(name="normswap"):
        text = dist.read_text("direct_url.json")
        if text:
            try:
                info = json.loads(text)
            except ValueError:
                info = {}
            break
        located = located or _holds_this_package(dist)
    source = f"Install normswap {__version__} from its source: `pip install .` in a checkout of the normswap repository."
    if info is None:
        return f"Install it with `pip install normswap=={__version__}`." if located else source
    url = str(info.get("url", ""))
    parts = urlparse(url)
    public = parts.scheme in ("https", "http") and "@" not in parts.netloc
    vcs = info.get("vcs_info") if isinstance(info.get("vcs_info"), dict) else None
    if public and vcs and vcs.get("vcs") and vcs.get("commit_id"):
        return f"Install it with `pip install '{vcs['vcs']}+{url}@{vcs['commit_id']}'`."
    if public and "archive_info" in info:
        return f"Install it with `pip install '{url}'`."
    return source


def _holds_this_package(dist: Any) -> bool:
    """Whether `dist` is the installed metadata of the normswap being run (an egg-info folder in
    the current directory of a source checkout is not)."""
    import normswap

    try:
        return Path(str(dist.locate_file("normswap/__init__.py"))).resolve() == Path(normswap.__file__).resolve()
    except (OSError, TypeError, ValueError):
        return False


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
        name = data if looks_like_hub_id(data) and not os.path.exists(data) else Path(data).name  # never a path
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


def build_card(folder: str | os.PathLike, repo_id: str | None, *, job: dict[str, Any] | None = None, role: str | None = None) -> str:
    """README.md (YAML metadata + Markdown) for the converted checkpoint in `folder`, meant for the
    Hub repository `repo_id` (None: an export not yet meant for one; the card says "this folder")."""
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
        model_name=repo_id.split("/")[-1] if repo_id else None, eval_results=results or None, license=None,
    )
    body = _body(record, cfg, repo_id, source, base, finetune, job, role)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}").content


def _quoted(name: str | None) -> str:
    """A model name for the card's text: `hub/id` in code quotes, else "a local checkpoint"."""
    shown = public_name(name)
    return f"`{shown}`" if shown == name else shown


def _body(record: ConversionRecord, cfg: dict[str, Any], repo_id: str | None, source: str | None, base: str | None,
          finetune: dict[str, Any] | None, job: dict[str, Any] | None, role: str | None) -> str:
    from normswap import __version__

    auto = _AUTO.get(pipeline_of(record.architecture) or "", "AutoModel")
    where = repo_id or "path/to/this/folder"
    name = {"rmsnorm": "RMSNorm", "dyt": "DyT (Dynamic Tanh)", "none": "no normalisation (fixed scales)"}.get(record.target, record.target)
    n_sites = len(record.sites)
    folded = sum(s.folded for s in record.sites)
    # a model that already used RMSNorm (Llama, Gemma...): its norms kept their function, their gains folded or kept
    was_rmsnorm = bool(record.sites) and all(s.method in ("fold-gain", "keep-gain") for s in record.sites)
    replaced = "RMSNorm replaced by normswap's" if was_rmsnorm else "LayerNorm replaced by"
    how = ("**exact**: the model already used RMSNorm; each norm keeps its eps, and a folded norm's gain g moved "
           "into the linears that read it (W <- W diag(g))" if record.exact and was_rmsnorm else
           "**exact**: every residual-stream writer was centred, so each LayerNorm read a zero-mean input and equals "
           "RMSNorm with the same eps" if record.exact else
           "an **approximation**" + {"dyt": " (DyT: alpha, weight and bias calibrated per site by least squares on text)",
                                     "none": " (each norm divides by a fixed scale, its average RMS on calibration text, folded with "
                                             "the affine into the linears that read it where they can absorb it)"}.get(record.target, ""))
    shown = f"`{base}`" if base else public_name(source)
    lines = [
        f"# {repo_id.split('/')[-1] if repo_id else 'normswap conversion'}", "",
        f"{shown[0].upper()}{shown[1:]} ({record.architecture}) with every {replaced} **{name}**, "
        f"made with normswap {record.version or __version__}." + (
            f" Base model: [{base}](https://huggingface.co/{base})." if base else ""), "",
        "## How it was converted", "",
        f"- target: {record.target}; {n_sites} norm sites ({record.style}-LN {record.family or record.base_model_type}), "
        f"{folded} with their affine folded into the linears that read them",
        f"- the conversion is {how}",
    ]
    from normswap.modules import VARIANTS

    variants = sorted({s.type for s in record.sites} & set(VARIANTS))
    if variants:  # DyT's relatives (`--variant`): the function each site computes
        lines.append(f"- elementwise function: {', '.join(variants)} (w * f(alpha x) + b with f in place of DyT's tanh; "
                     "config.json's normswap section names each site's)")
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
                     f"{finetune.get('tokens')} tokens" + (f", teacher {_quoted(finetune.get('teacher'))}" if finetune.get("teacher") else ""))
    lines += ["", "## Loading", "",
              "Without normswap (the custom code in this repository rebuilds the converted architecture and loads strictly):", "",
              "```python", f"from transformers import {auto}",
              f"model = {auto}.from_pretrained(\"{where}\", trust_remote_code=True)", "```", "",
              f"With normswap installed, no remote code runs. {install_line()}", "",
              "```python", "import normswap",
              *(["from huggingface_hub import snapshot_download", f"model = normswap.load(snapshot_download(\"{repo_id}\"))"]
                if repo_id else [f"model = normswap.load(\"{where}\")"]),
              "```", "",
              f"Plain `{auto}.from_pretrained(\"{where}\")` without `trust_remote_code` refuses the `normswap` model "
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


def build_stock_card(folder: str | os.PathLike, info: dict[str, Any], *, repo_id: str | None = None) -> str:
    """README.md of a stock export (`normswap.export.stock`) of the converted checkpoint `folder`:
    a plain checkpoint of the original class, with what its norms compute now and how it was made.
    `info` holds the export's figures (max_rel_diff, tokens, moved_biases, transformers_version);
    `repo_id` names it (else "this folder")."""
    from huggingface_hub import ModelCard, ModelCardData

    from normswap import __version__
    from normswap.export.stock import STOCK_MARK
    from normswap.loading import read_record

    record, _ = read_record(folder)
    source = (record.source or {}).get("model")
    base = source if looks_like_hub_id(source) else None
    head = pipeline_of(record.architecture)
    auto = _AUTO.get(head or "", "AutoModel")
    where = repo_id or "path/to/this/folder"
    data = ModelCardData(base_model=base, library_name="transformers", pipeline_tag=head, license=None,
                         tags=["normswap", STOCK_MARK, record.base_model_type, "rmsnorm", "exact-conversion"],
                         model_name=repo_id.split("/")[-1] if repo_id else None)
    was_rmsnorm = all(s.method in ("fold-gain", "keep-gain") for s in record.sites)
    folded = [s for s in record.sites if s.folded]
    centred = [s for s in record.sites if s.method == "exact"]
    own_mean = [s for s in record.sites if s.center]
    moved = info.get("moved_biases") or {}
    eps = sorted({f"{s.eps:g}" for s in record.sites})
    shown = f"`{base}`" if base else public_name(source)
    lines = [f"# {repo_id.split('/')[-1] if repo_id else 'Stock export of a normswap conversion'}", "",
             f"A plain `{record.architecture}` checkpoint (model type `{record.base_model_type}`) of {shown} after an exact "
             f"normswap {record.version or __version__} conversion to RMSNorm. It loads with stock transformers, without "
             "normswap and without remote code, so every runtime that reads this architecture (vLLM, llama.cpp's "
             "converters, TransformerLens...) reads it too.", "",
             "## What the norms compute", ""]
    if was_rmsnorm:
        lines.append(f"- The model already used RMSNorm; each norm keeps its eps ({', '.join(eps)}).")
        if folded:
            lines.append(f"- {len(folded)} of {len(record.sites)} norms had their gain g folded into the linears that read them "
                         "(W <- W diag(g)): their weight now stands for a gain of exactly one (in a `(1 + w)` form, w = 0).")
    else:
        if centred:
            lines.append(f"- Every residual-stream writer (embeddings, attention and MLP output projections) was centred, so "
                         f"{len(centred)} of the {len(record.sites)} norms now read a zero-mean stream, and so equal RMSNorm: "
                         f"on a zero-mean input LayerNorm(x) = RMSNorm(x) with the same eps ({', '.join(eps)}). A runtime may "
                         "swap these LayerNorms for RMSNorm without changing the output.")
        if own_mean:
            lines.append(f"- {len(own_mean)} norms read a stream that cannot be centred: they keep LayerNorm's own mean "
                         "subtraction (the stock LayerNorm is exactly the converted norm there).")
        if folded:
            lines.append(f"- {len(folded)} norms had their affine folded into the linears that read them: their LayerNorm "
                         "weight is 1 and bias 0" + (", except as below." if moved else "."))
        for site, readers in moved.items():
            lines.append(f"- `{site}` has bias beta = b / g: the folded bias of {', '.join(f'`{r}`' for r in readers)}, which "
                         f"has no bias in a stock `{record.architecture}`, moved back into the norm (W' beta = W b).")
    kept = [s.path for s in record.sites if not s.folded]
    if kept:
        lines.append(f"- {len(kept)} norms keep their affine (e.g. `{kept[0]}`).")
    lines += ["", "## How it was made", "",
              f"- source: {shown}; normswap `convert --to rmsnorm{' --fold' if folded else ''}"
              f"{' --tied-head untie' if record.tied_head == 'untie' else ''}`, then `normswap export --stock`",
              f"- exact: every site keeps the function of the original ({record.style}-LN {record.family or record.base_model_type})"]
    if record.tied_head == "untie":
        lines.append("- the LM head was untied from the token embedding (its own copy, vocab x d more parameters), so "
                     "`tie_word_embeddings` is false")
    lines.append(f"- checked when exported: stock transformers {info.get('transformers_version', '')} loading this folder "
                 f"matches the normswap checkpoint to {info.get('max_rel_diff', float('nan')):.2g} of the {info.get('output', 'outputs')} "
                 f"(max relative difference, {info.get('tokens')} tokens)")
    lines += ["", "## Loading", "", "```python", f"from transformers import {auto}",
              f"model = {auto}.from_pretrained(\"{where}\")", "```", "",
              "No normswap is needed. The normswap checkpoint it was exported from loads with `normswap.load`. "
              f"{install_line()}", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)).content
