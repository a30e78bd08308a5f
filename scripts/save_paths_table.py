"""The ecosystem round-trip table: each save path x each converted model -> the max |difference| of
the model's outputs after the round trip (0 expected), or why the path does not apply.

    python scripts/save_paths_table.py            # -> docs/results/save-paths/table.json and README.md

Paths: save_pretrained, a Trainer checkpoint and a resume from an earlier one, push_to_hub (the
upload monkeypatched: nothing leaves the machine), accelerate's save_model with the carried config,
SentenceTransformer load/save, AutoPeft (an adapter's base rebuilt from the adapter alone), the
stock export (plain transformers, no normswap code). Needs NORMSWAP_ASSETS (all-MiniLM-L6-v2, the
gpt2 stand-in) and the test extras (sentence-transformers, peft).
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import normswap  # noqa: E402
from normswap.assets import asset  # noqa: E402
from tiny_models import model_output, tiny_inputs, tiny_model  # noqa: E402

OUT = ROOT / "docs" / "results" / "save-paths"
SENTENCES = ["A man is playing a guitar.", "The weather is lovely today.", "Norms read a zero-mean stream."]


def convert_all(root: Path) -> dict[str, Path]:
    """The four converted models of the table, saved under `root`."""
    jobs = {
        "MiniLM DyT": lambda: normswap.convert(str(asset("all-MiniLM-L6-v2")), "dyt", calib_tokens=1024),
        "MiniLM RMSNorm": lambda: normswap.convert(str(asset("all-MiniLM-L6-v2")), "rmsnorm", fold=True),
        "stand-in RMSNorm folded (untied head)": lambda: normswap.convert(str(asset("gpt2-standin-wt2")), "rmsnorm", fold=True,
                                                                         tied_head="untie"),
        "tiny Llama folded (untied head)": lambda: normswap.convert(tiny_model("llama"), "rmsnorm", fold=True, tied_head="untie"),
    }
    return {name: normswap.save(make()[0], root / str(i)) for i, (name, make) in enumerate(jobs.items())}


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def reference(folder: Path) -> tuple[Any, dict[str, torch.Tensor], torch.Tensor]:
    model = normswap.load(folder)
    x = tiny_inputs(model, length=10)
    return model, x, model_output(model, x)


def via_save_pretrained(folder: Path, work: Path) -> float:
    model, x, ref = reference(folder)
    model.save_pretrained(work / "sp")
    return diff(ref, model_output(normswap.load(work / "sp"), x))


def via_trainer(folder: Path, work: Path) -> float:
    """3 steps with a checkpoint each step; the last checkpoint against the trained model, and a run
    resumed from the first checkpoint against the uninterrupted one: the larger difference."""
    from transformers import AutoModelForMaskedLM, Trainer, TrainingArguments

    def student():
        model = normswap.load(folder)
        if model.config.model_type == "bert":  # a body: train it as a masked LM
            model = normswap.load(folder, auto_class=AutoModelForMaskedLM, allow_new_head=True)
        return model

    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": (ids := torch.randint(3, 100, (16,), generator=g)), "labels": ids.clone()} for _ in range(8)]

    def args(out):
        return TrainingArguments(output_dir=str(out), max_steps=3, per_device_train_batch_size=2, save_steps=1, learning_rate=1e-3,
                                 report_to=[], use_cpu=True, seed=0, disable_tqdm=True)

    model = student()
    Trainer(model=model, args=args(work / "run"), train_dataset=data).train()
    resumed = student()
    Trainer(model=resumed, args=args(work / "resumed"), train_dataset=data).train(resume_from_checkpoint=str(work / "run" / "checkpoint-1"))
    x = tiny_inputs(model, length=10)
    model.eval(), resumed.eval()
    ref = model_output(model, x)
    return max(diff(ref, model_output(normswap.load(work / "run" / "checkpoint-3"), x)), diff(ref, model_output(resumed, x)))


def via_push_to_hub(folder: Path, work: Path) -> float:
    import huggingface_hub

    uploaded = work / "uploaded"

    def upload_folder(self, *, repo_id, folder_path, **kw):
        shutil.copytree(folder_path, uploaded)
        return huggingface_hub.CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/0", commit_message="",
                                          commit_description="", oid="0" * 40)

    saved = (huggingface_hub.HfApi.create_repo, huggingface_hub.HfApi.upload_folder)
    huggingface_hub.HfApi.create_repo = lambda self, repo_id, **kw: huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")
    huggingface_hub.HfApi.upload_folder = upload_folder
    try:
        model, x, ref = reference(folder)
        model.push_to_hub("me/table", token="hf_" + "x" * 34)
    finally:
        huggingface_hub.HfApi.create_repo, huggingface_hub.HfApi.upload_folder = saved
    return diff(ref, model_output(normswap.load(uploaded), x))


def via_accelerate(folder: Path, work: Path) -> float:
    from accelerate import Accelerator

    model, x, ref = reference(folder)
    acc = Accelerator(cpu=True)
    prepared = acc.prepare(model)
    acc.save_model(prepared, work / "acc")
    acc.unwrap_model(prepared).config.save_pretrained(work / "acc")
    return diff(ref, model_output(normswap.load(work / "acc"), x))


def via_sentence_transformers(folder: Path, work: Path) -> float | str:
    from sentence_transformers import SentenceTransformer

    if not (folder / "modules.json").is_file():
        return "n/a (not a sentence-transformers model)"
    st = SentenceTransformer(str(folder), device="cpu")
    emb = st.encode(SENTENCES, convert_to_tensor=True)
    st.save(str(work / "st"))
    return diff(emb, SentenceTransformer(str(work / "st"), device="cpu").encode(SENTENCES, convert_to_tensor=True))


def via_auto_peft(folder: Path, work: Path) -> float:
    from peft import AutoPeftModel, AutoPeftModelForCausalLM, LoraConfig, get_peft_model

    model, x, _ = reference(folder)
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"}
    targets = sorted(names & {"q_proj", "v_proj", "c_attn", "query", "value"})
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    peft_model.save_pretrained(work / "adapter")
    auto = AutoPeftModel if model.config.model_type == "bert" else AutoPeftModelForCausalLM
    return diff(model_output(peft_model, x), model_output(auto.from_pretrained(work / "adapter"), x))


def via_stock(folder: Path, work: Path) -> float | str:
    """The stock export against the converted model (normswap.export.stock, when present)."""
    try:
        from normswap.export.stock import export_stock, stock_blockers
    except ImportError:
        return "n/a (no stock export in this version)"
    import transformers

    why = stock_blockers(folder)
    if why:
        return "refused: " + "; ".join(why)
    export_stock(folder, work / "stock")
    cfg = json.loads((work / "stock" / "config.json").read_text())
    plain = getattr(transformers, cfg["architectures"][0]).from_pretrained(work / "stock")
    model, x, ref = reference(folder)
    return diff(ref, model_output(plain.eval(), x))


PATHS: dict[str, Callable[[Path, Path], float | str]] = {
    "save_pretrained": via_save_pretrained,
    "Trainer checkpoint + resume": via_trainer,
    "push_to_hub (dry)": via_push_to_hub,
    "accelerate save_model + config": via_accelerate,
    "SentenceTransformer load/save": via_sentence_transformers,
    "AutoPeft": via_auto_peft,
    "stock export": via_stock,
}


def main() -> None:
    torch.set_num_threads(1)
    rows: dict[str, dict[str, Any]] = {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folders = convert_all(Path(tmp) / "converted")
        for model_name, folder in folders.items():
            rows[model_name] = {}
            for path_name, fn in PATHS.items():
                work = Path(tempfile.mkdtemp(dir=tmp))
                try:
                    rows[model_name][path_name] = fn(folder, work)
                except Exception as err:  # noqa: BLE001 - a failing path is a row of the table, not the end of it
                    rows[model_name][path_name] = f"FAILED: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
                print(f"{model_name:40s} {path_name:32s} {rows[model_name][path_name]}", file=sys.stderr, flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    data = {"rows": rows, "seconds": round(time.perf_counter() - t0, 1), "torch": torch.__version__,
            "transformers": __import__("transformers").__version__, "normswap": normswap.__version__}
    (OUT / "table.json").write_text(json.dumps(data, indent=2) + "\n")
    cols = list(PATHS)

    def cell(v: Any) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["# Save paths: max |output difference| after each round trip (0 expected)", "",
             "Made by `python scripts/save_paths_table.py`; outputs are logits (last hidden state for MiniLM,",
             "embeddings for sentence-transformers) on 2 x 10 token ids.", "",
             "| model | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    lines += [f"| {m} | " + " | ".join(cell(r[c]) for c in cols) + " |" for m, r in rows.items()]
    (OUT / "README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
