"""`--device` / `--dtype` of `normswap eval` and `device:` / `dtype:` in recipes.

Bad values are one `error:` line; `--dtype bfloat16` evaluates both models in bfloat16 (checked
against an independent loop); `--dtype auto` on half-precision weights on the CPU computes in
float32, exactly as loading them in float32 would; recipes validate the keys, inherit a job-level
default and pass them on as `device=` / `dtype=` keyword arguments.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from cli_util import error_line, refused, run_cli
from normswap.assets import asset
from normswap.errors import NormswapError
from test_eval_support import converted_folder, tiny_gpt2_folder

MAX_TOKENS, WINDOW = 320, 64


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from normswap.loading import load_pretrained, load_tokenizer

    root = tmp_path_factory.mktemp("devdtype")
    gpt2 = tiny_gpt2_folder(root)
    text = root / "valid.txt"
    text.write_text(asset("wikitext2-tokenized", "valid.txt").read_text(encoding="utf-8")[:4000], encoding="utf-8")
    half = root / "tiny-gpt2-bf16"  # the same model stored in bfloat16
    model = load_pretrained(str(gpt2)).to(torch.bfloat16)
    model.save_pretrained(half, safe_serialization=True)
    load_tokenizer(str(gpt2)).save_pretrained(half)
    return {"root": root, "gpt2": gpt2, "rms": converted_folder(gpt2, "rmsnorm", root / "tiny-gpt2-rms"), "half": half, "text": text}


def _ppl_args(env, *extra):
    return ["eval", env["rms"], "--baseline", env["gpt2"], "--ppl", env["text"], "--max-tokens", MAX_TOKENS,
            "--max-length", WINDOW, "--format", "json", *extra]


# ------------------------------------------------------------------------------------------ CLI errors


@pytest.mark.parametrize("args, needle", [
    (["--device", "gpu"], "--device"),
    (["--device", "cuda:x"], "--device"),
    (["--device", ""], "--device"),
    (["--dtype", "float64"], "--dtype"),
    (["--dtype", "int8"], "--dtype"),
    (["--dtype", "half"], "--dtype"),
])
def test_bad_device_or_dtype_is_one_error_line(env, monkeypatch, capsys, args, needle):
    code, out, err = run_cli(_ppl_args(env, *args), monkeypatch, capsys)
    line = error_line(err, code)  # exit 2, one line, no traceback
    assert needle in line and "choose" in line, line
    assert out == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_absent_cuda_names_the_reason(env, monkeypatch, capsys):
    code, out, err = run_cli(_ppl_args(env, "--device", "cuda"), monkeypatch, capsys)
    line = refused(code, err, "no CUDA device")
    assert "--device cuda" in line and out == ""


def test_library_refuses_bad_values_before_loading(env):
    from normswap.evaluation.runner import EvalRequest, run_eval

    for kw, needle in (({"device": "tpu"}, "--device"), ({"dtype": "float8"}, "--dtype"), ({"dtype": 3}, "--dtype")):
        with pytest.raises(NormswapError, match=needle):
            run_eval(EvalRequest(model=str(env["rms"]), ppl=str(env["text"]), **kw))


# ------------------------------------------------------------------------------------- bfloat16 on CPU


@torch.no_grad()
def _own_perplexity(path: Path, text: str, dtype: torch.dtype) -> float:
    """Perplexity by a loop of our own: plain transformers, non-overlapping windows of WINDOW tokens
    over the first MAX_TOKENS tokens, one window at a time, every prediction scored."""
    from transformers import AutoTokenizer, GPT2LMHeadModel

    ids = torch.tensor(AutoTokenizer.from_pretrained(str(path))(text)["input_ids"][:MAX_TOKENS])
    model = GPT2LMHeadModel.from_pretrained(str(path), dtype=torch.float32).to(dtype).eval()
    total, count = 0.0, 0
    for b in range(0, len(ids) - 1, WINDOW):
        e = min(b + WINDOW, len(ids) - 1)
        logits = model(input_ids=ids[b:e][None]).logits[0].float()
        total += float(torch.nn.functional.cross_entropy(logits, ids[b + 1:e + 1], reduction="sum"))
        count += e - b
    assert count == MAX_TOKENS - 1
    return math.exp(total / count)


def test_bfloat16_on_cpu_is_measured_in_bfloat16(env, tmp_path, monkeypatch, capsys):
    out = tmp_path / "res"
    code, stdout, err = run_cli(_ppl_args(env, "--device", "cpu", "--dtype", "bfloat16", "--out", out), monkeypatch, capsys)
    assert code == 0, err
    res = json.loads(stdout)
    assert (res["device"], res["dtype"], res["compute_dtype"]) == ("cpu", "bfloat16", "bfloat16")
    assert res["placement"]["requested_dtype"] == "bfloat16"
    assert res["placement"]["models"] == {r: {"dtype": "bfloat16", "compute_dtype": "bfloat16"} for r in ("converted", "baseline")}
    saved = json.loads((out / "results.json").read_text())
    assert saved["config"]["device"] == "cpu" and saved["config"]["dtype"] == "bfloat16"
    assert saved["results"]["dtype"] == "bfloat16" and saved["results"]["device"] == "cpu"
    p = res["ppl"]
    assert p["tokens"] == MAX_TOKENS - 1 and p["windows"] == math.ceil((MAX_TOKENS - 1) / WINDOW)

    text = env["text"].read_text(encoding="utf-8")
    own16 = _own_perplexity(env["gpt2"], text, torch.bfloat16)
    own32 = _own_perplexity(env["gpt2"], text, torch.float32)
    assert p["baseline"] == pytest.approx(own16, rel=1e-5)  # the baseline (plain gpt2) in bfloat16: float32 is 4e-5 away here
    assert p["baseline"] != own32  # ... not the float32 figure
    assert abs(p["baseline"] - own16) < abs(own32 - own16)
    assert p["baseline"] == pytest.approx(own32, rel=0.05)  # close to it all the same


def test_table_states_device_and_dtype(env, monkeypatch, capsys):
    args = [a for a in _ppl_args(env, "--device", "cpu", "--dtype", "bfloat16") if a not in ("--format", "json")]
    code, stdout, err = run_cli(args, monkeypatch, capsys)
    assert code == 0, err
    assert "device cpu, dtype bfloat16 (compute bfloat16)" in stdout


def test_auto_dtype_on_cpu_computes_half_weights_in_float32(env, monkeypatch, capsys):
    """A bfloat16 checkpoint with --dtype auto: bfloat16 weights, float32 arithmetic (an exact
    upcast), so the figure is exactly that of the same weights loaded in float32."""
    code, stdout, err = run_cli(["eval", env["half"], "--ppl", env["text"], "--max-tokens", MAX_TOKENS, "--max-length", WINDOW,
                                 "--device", "cpu", "--format", "json"], monkeypatch, capsys)
    assert code == 0, err
    auto = json.loads(stdout)
    assert (auto["dtype"], auto["compute_dtype"], auto["placement"]["requested_dtype"]) == ("bfloat16", "float32", "auto")
    code, stdout, err = run_cli(["eval", env["half"], "--ppl", env["text"], "--max-tokens", MAX_TOKENS, "--max-length", WINDOW,
                                 "--device", "cpu", "--dtype", "float32", "--format", "json"], monkeypatch, capsys)
    assert code == 0, err
    f32 = json.loads(stdout)
    assert (f32["dtype"], f32["compute_dtype"]) == ("float32", "float32")
    assert auto["ppl"]["value"] == f32["ppl"]["value"]


@pytest.mark.parametrize("mode", ["probe", "finetune"])
def test_glue_in_bfloat16(env, tmp_path, monkeypatch, capsys, mode):
    """GLUE states its precision too: the probe's encoder runs in bfloat16; fine-tuning trains
    float32 master weights (from the bfloat16-rounded checkpoint) under bfloat16 autocast."""
    from test_eval_support import tiny_bert_folder, write_glue_dir

    bert = env["root"] / "tiny-bert"
    if not bert.exists():
        tiny_bert_folder(env["root"])
    glue_dir = env["root"] / "glue"
    if not glue_dir.exists():
        write_glue_dir(env["root"], 40, 16)
    extra = ["--glue-mode", "probe", "--seeds", 1, "--train-samples", 40] if mode == "probe" else [
        "--epochs", 1, "--train-samples", 16, "--batch-size", 8, "--max-seq-length", 16]
    code, stdout, err = run_cli(["eval", bert, "--glue", "sst2", "--glue-data", glue_dir, *extra, "--device", "cpu", "--dtype", "bfloat16",
                                 "--format", "json"], monkeypatch, capsys)
    assert code == 0, err
    res = json.loads(stdout)
    assert (res["device"], res["dtype"], res["compute_dtype"]) == ("cpu", "bfloat16", "bfloat16")
    prec = res["glue_settings"]["precision"]
    assert prec["device"] == "cpu" and prec["models"]["converted"]["compute_dtype"] == "bfloat16"
    if mode == "finetune":
        assert prec["models"]["converted"]["master_weights"] == "float32" and prec["models"]["converted"]["autocast"] is True
    assert 0 <= res["glue"]["sst2"]["accuracy"]["mean"] <= 1


def test_placement_rules():
    from normswap.evaluation import placement

    cpu = placement.Placement(torch.device("cpu"), "auto")
    assert cpu.compute_dtype(torch.bfloat16) == torch.float32 and cpu.compute_dtype(torch.float32) == torch.float32
    assert placement.Placement(torch.device("cpu"), "float16").compute_dtype(torch.float16) == torch.float16
    assert placement.Placement(torch.device("cuda", 0), "auto").compute_dtype(torch.bfloat16) == torch.bfloat16
    assert placement.check(" CPU ", "torch.bfloat16") == ("cpu", "bfloat16")
    assert placement.check(None, None) == ("auto", "auto")


def test_recipe_dtype_names_match_the_library():
    import typing

    from normswap.conversion import DTYPE_CHOICES
    from normswap.recipes import schema

    assert tuple(DTYPE_CHOICES) == schema.DTYPE_NAMES == typing.get_args(schema.DtypeName)


# ------------------------------------------------------------------------------------------------ recipes


def _recipe(tmp_path: Path, body: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(body)
    return p


def test_recipe_schema_accepts_and_inherits(tmp_path, env):
    from normswap.recipes import load_recipe

    r = load_recipe(_recipe(tmp_path, f"""
name: dd
model: {env['gpt2']}
device: cpu
dtype: bfloat16
convert: {{to: rmsnorm}}
finetune: {{data: {env['text']}, steps: 2, device: auto, dtype: float32}}
eval: {{ppl: {{data: {env['text']}}}}}
runs:
  - {{name: a}}
  - {{name: b, dtype: float16, convert: {{to: rmsnorm, dtype: float32}}}}
"""))
    a, b = r.jobs
    assert (a.convert.device, a.convert.dtype) == ("cpu", "bfloat16")
    assert (a.finetune.device, a.finetune.dtype) == ("auto", "float32")  # set in the section: kept
    assert (a.eval.device, a.eval.dtype) == ("cpu", "bfloat16")
    assert (b.convert.dtype, b.eval.dtype, b.finetune.dtype) == ("float32", "float16", "float32")
    assert a.eval.placement() == {"device": "cpu", "dtype": "bfloat16"}


def test_recipe_schema_unset_means_not_passed(tmp_path, env):
    from normswap.recipes import load_recipe

    job = load_recipe(_recipe(tmp_path, f"model: {env['gpt2']}\nconvert: {{to: rmsnorm}}\neval: {{ppl: {{data: {env['text']}}}}}\n")).jobs[0]
    assert job.eval.placement() == {} and job.convert.device is None and job.convert.dtype == "auto"


@pytest.mark.parametrize("line, needle", [
    ("eval: {ppl: {data: TEXT}, device: gpu}", "eval.device: unknown device 'gpu'"),
    ("eval: {ppl: {data: TEXT}, dtype: float64}", "eval.dtype"),
    ("convert: {to: rmsnorm, device: 3}", "convert.device"),
    ("device: cuda:a\neval: {ppl: {data: TEXT}}", "device: unknown device 'cuda:a'"),
    ("dtype: int8\neval: {ppl: {data: TEXT}}", "dtype"),
    ("eval: {ppl: {data: TEXT}, devise: cpu}", "unknown key 'devise' in eval (did you mean 'device'?)"),
])
def test_recipe_schema_rejects(tmp_path, env, line, needle):
    from normswap.recipes import RecipeError, load_recipe

    body = f"model: {env['gpt2']}\n" + line.replace("TEXT", str(env["text"])) + "\n"
    with pytest.raises(RecipeError) as ex:
        load_recipe(_recipe(tmp_path, body))
    msg = str(ex.value)
    assert needle in msg and str(tmp_path / "r.yaml") + ":" in msg, msg


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_recipe_absent_device_is_refused_at_validation(tmp_path, env):
    from normswap.recipes import RecipeError, load_recipe

    with pytest.raises(RecipeError, match=r"r\.yaml:3: job r: eval\.device cuda: no CUDA device"):
        load_recipe(_recipe(tmp_path, f"model: {env['gpt2']}\neval: {{ppl: {{data: {env['text']}}}}}\ndevice: cuda\n"))


def test_recipe_eval_in_bfloat16_runs(tmp_path, env):
    from normswap.recipes import load_recipe, run_recipe

    r = load_recipe(_recipe(tmp_path, f"""
name: bf16
model: {env['gpt2']}
eval:
  dtype: bfloat16
  device: cpu
  ppl: {{data: {env['text']}, max_tokens: {MAX_TOKENS}, max_length: {WINDOW}}}
"""))
    res = run_recipe(r, output_dir=tmp_path / "runs")
    saved = json.loads((tmp_path / "runs" / "bf16" / "bf16" / "eval" / "original" / "results.json").read_text())
    assert (saved["results"]["dtype"], saved["results"]["compute_dtype"], saved["results"]["device"]) == ("bfloat16", "bfloat16", "cpu")
    assert saved["config"]["dtype"] == "bfloat16"
    own16 = _own_perplexity(env["gpt2"], env["text"].read_text(encoding="utf-8"), torch.bfloat16)
    assert saved["results"]["ppl"]["value"] == pytest.approx(own16, rel=1e-5)
    assert "original on cpu, bfloat16 weights, bfloat16 compute" in Path(res["report"]).read_text()
    assert res["jobs"][0]["placement"]["original"] == {"device": "cpu", "dtype": "bfloat16", "compute_dtype": "bfloat16"}


def test_recipe_runner_passes_device_and_dtype_only_when_set(tmp_path, env, monkeypatch):
    """convert_model gets device= only when the recipe sets it (dtype= always: the output dtype);
    finetune gets them in its TrainConfig ("auto" where unset)."""
    import normswap.conversion
    import normswap.training.api
    from normswap.recipes import load_recipe, runner

    calls: dict[str, dict] = {}

    class Stop(Exception):
        pass

    def fake_convert(*a, **k):
        calls["convert"] = k
        raise Stop

    def fake_finetune(student, *, data=None, out, teacher=None, config=None, overwrite=False, resume=False, on_step=None, audio=None,
                      audio_subsets=None, retain_checkpoints=False, **overrides):
        calls["finetune"] = {"device": config.device, "dtype": config.dtype, **({"given": sorted(overrides)} if overrides else {})}
        raise Stop

    monkeypatch.setattr(normswap.conversion, "convert_model", fake_convert)
    monkeypatch.setattr(normswap.training.api, "finetune", fake_finetune)
    for body, want in (("convert: {to: rmsnorm}", {}), ("convert: {to: rmsnorm, device: cpu}", {"device": "cpu"})):
        job = load_recipe(_recipe(tmp_path, f"model: {env['gpt2']}\n{body}\n")).jobs[0]
        with pytest.raises(Stop):
            runner._convert(job, tmp_path / "c", tmp_path / "c.json")
        assert {k: calls["convert"][k] for k in ("device",) if k in calls["convert"]} == want
        assert calls["convert"]["dtype"] == "auto"
    for body, want in (("", ("auto", "auto")), ("dtype: bfloat16\n", ("auto", "bfloat16")),
                       ("device: cpu\ndtype: float32\n", ("cpu", "float32"))):
        job = load_recipe(_recipe(tmp_path, f"model: {env['gpt2']}\n{body}finetune: {{data: {env['text']}, steps: 1, objective: lm}}\n")).jobs[0]
        with pytest.raises(Stop):
            runner._finetune(job, str(env["rms"]), tmp_path / "f", force=True, progress=False)
        assert (calls["finetune"]["device"], calls["finetune"]["dtype"]) == want and "given" not in calls["finetune"]


def test_recipe_finetune_placement_reaches_the_train_config(tmp_path, env):
    """A finetune section's device/dtype (its own, or the job's) are TrainConfig fields, as on the command line."""
    from normswap.recipes import load_recipe

    job = load_recipe(_recipe(tmp_path, f"model: {env['gpt2']}\nfinetune: {{data: {env['text']}, steps: 1, objective: lm, device: cpu, "
                                        f"gradient_checkpointing: true}}\n")).jobs[0]
    cfg = job.finetune.train_config()
    assert cfg.device == "cpu" and cfg.dtype == "auto" and cfg.gradient_checkpointing
    job = load_recipe(_recipe(tmp_path, f"model: {env['gpt2']}\ndtype: bfloat16\nfinetune: {{data: {env['text']}, steps: 1, objective: lm}}\n")).jobs[0]
    assert job.finetune.train_config().dtype == "bfloat16" and job.finetune.train_config().device == "auto"


def test_fingerprint_unchanged_when_unset(tmp_path, env):
    """A run folder made before device/dtype existed keeps its completed stages."""
    from normswap.recipes import load_recipe, runner

    job = load_recipe(_recipe(tmp_path, f"model: {env['gpt2']}\neval: {{ppl: {{data: {env['text']}}}}}\n")).jobs[0]
    assert "device" not in runner.stage_config(job.eval) and "dtype" not in runner.stage_config(job.eval)
    job = load_recipe(_recipe(tmp_path, f"model: {env['gpt2']}\neval: {{ppl: {{data: {env['text']}}}, dtype: float16}}\n")).jobs[0]
    assert runner.stage_config(job.eval)["dtype"] == "float16"


def test_recipe_overrides(tmp_path, env):
    from normswap.recipes import RecipeError, load_recipe

    path = _recipe(tmp_path, f"model: {env['gpt2']}\nconvert: {{to: rmsnorm}}\neval: {{ppl: {{data: {env['text']}}}}}\n")
    job = load_recipe(path, ["dtype=float16", "eval.device=cpu"]).jobs[0]
    assert (job.convert.dtype, job.eval.dtype, job.eval.device, job.convert.device) == ("float16", "float16", "cpu", None)
    with pytest.raises(RecipeError, match="override 'eval.device=gpu': unknown device 'gpu'"):
        load_recipe(path, ["eval.device=gpu"])
    with pytest.raises(RecipeError, match="no key 'dtpye' in eval"):
        load_recipe(path, ["eval.dtpye=float16"])
