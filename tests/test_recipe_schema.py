"""Recipe files: every shipped recipe validates; mistakes are one error naming the key, file and line;
key=value overrides; ${assets} and recipe-relative paths."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from normswap.recipes import RecipeError, find_recipe, list_recipes, load_recipe

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))


def test_the_shipped_recipes_are_there():
    names = {p.stem for p in RECIPES}
    assert {"quickstart", "gpt2-rmsnorm", "gpt2-dyt", "pythia-160m-dyt", "bert-base-dyt-glue", "roberta-base-rmsnorm-glue",
            "vit-base-rmsnorm", "minilm-dyt-glue"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_shipped_recipe_validates(path, standin_path):
    recipe = load_recipe(path)  # schema, stage order, budgets, GLUE task names, and local files exist
    assert recipe.jobs and all(j.stages for j in recipe.jobs)
    for job in recipe.jobs:
        if job.convert and job.convert.to == "rmsnorm" and job.model in ("gpt2", "google/vit-base-patch16-224-in21k"):
            assert job.convert.fold and job.convert.verify  # the exact conversions are checked


def test_quickstart_shape(standin_path, minilm_path):
    r = load_recipe(find_recipe("quickstart"))
    assert [j.name for j in r.jobs] == ["gpt2-rmsnorm", "gpt2-dyt", "minilm-rmsnorm", "minilm-dyt"]
    assert {j.convert.to for j in r.jobs} == {"rmsnorm", "dyt"}
    assert r.jobs[0].model == str(standin_path) and r.jobs[2].model == str(minilm_path)
    assert [j.finetune.steps for j in r.jobs if j.finetune] == [60, 30] and r.jobs[1].finetune.teacher == "original"


def _write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


BASE = """\
name: t
model: gpt2
convert:
  to: dyt
finetune:
  data: wikitext:wikitext-103-raw-v1@train
  steps: 10
eval:
  ppl:
    data: wikitext:wikitext-2-raw-v1:test
"""


def test_misspelt_key_names_key_file_and_line(tmp_path):
    p = _write(tmp_path, BASE.replace("  steps: 10", "  stesp: 10"))
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}:7: unknown key 'stesp' in finetune") and "did you mean 'steps'" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("text,line,needle", [
    (BASE.replace("convert:", "convrt:"), 3, "unknown key 'convrt' in the top level"),
    (BASE.replace("    data: wikitext:wikitext-2", "    dat: wikitext:wikitext-2"), 10, "unknown key 'dat' in eval.ppl"),
    (BASE.replace("  to: dyt", "  to: layernorm"), 4, "convert.to: Input should be 'rmsnorm', 'dyt' or 'none'"),
    (BASE.replace("  steps: 10", "  steps: 10\n  tokens: 5M"), 5, "give steps or tokens, not both"),
    ("stages: [convert, evaluate]\n" + BASE, 1, "unknown stage 'evaluate' (did you mean 'eval'?)"),
    ("stages: [eval, convert]\n" + BASE, 1, "stages must run in the order"),
    (BASE + "  glue:\n    tasks: [sst2, mnli-typo]\n    data: /x\n", 12, "mnli-typo"),
])
def test_bad_values_and_keys(tmp_path, text, line, needle):
    p = _write(tmp_path, text)
    with pytest.raises(RecipeError) as e:
        load_recipe(p, check_files=False)
    assert str(e.value).startswith(f"{p}:{line}:"), str(e.value)
    assert needle in str(e.value)


def test_errors_in_runs_point_at_the_run_or_the_default(tmp_path):
    text = """\
stages: [convert]
convert:
  to: rmsnorm
  fld: true
runs:
  - name: a
    model: gpt2
  - name: b
    model: gpt2
    convert:
      tied_hed: untie
"""
    with pytest.raises(RecipeError, match=r"r\.yaml:4: unknown key 'fld'"):
        load_recipe(_write(tmp_path, text), check_files=False)
    with pytest.raises(RecipeError, match=r"r\.yaml:10: unknown key 'tied_hed' in runs\.b\.convert \(did you mean 'tied_head'\?\)"):
        load_recipe(_write(tmp_path, text.replace("  fld: true\n", "")), check_files=False)


@pytest.mark.parametrize("text,needle", [
    ("model: [gpt2\n", "r.yaml:2: not valid YAML"),
    ("just a sentence\n", "not a recipe"),
    ("model: gpt2\nstages: [convert]\n", "stage convert is listed but the recipe has no convert section"),
    ("model: gpt2\n", "no stages to run"),
    ("model: gpt2\nconvert:\n  to: dyt\n  calib_text: ${nope}/x.txt\n", "r.yaml:4: convert.calib_text: unknown variable ${nope}"),
])
def test_bad_files(tmp_path, text, needle):
    with pytest.raises(RecipeError, match=None) as e:
        load_recipe(_write(tmp_path, text), check_files=False)
    assert needle in str(e.value), str(e.value)


def test_missing_recipe_and_missing_local_inputs(tmp_path):
    with pytest.raises(RecipeError, match="recipe .*nope.yaml not found"):
        load_recipe(tmp_path / "nope.yaml")
    p = _write(tmp_path, "model: ./no-such-model\nconvert:\n  to: rmsnorm\n")
    with pytest.raises(RecipeError, match=r"r\.yaml:1: job t: model: no such folder .*no-such-model|r\.yaml:1: job r: model: no such folder"):
        load_recipe(p)


def test_overrides(tmp_path):
    p = _write(tmp_path, BASE)
    r = load_recipe(p, ["model=EleutherAI/pythia-160m", "finetune.tokens=5M", "convert.calib_tokens=1024", "stages=[convert,eval]"])
    job = r.jobs[0]
    assert job.model == "EleutherAI/pythia-160m" and job.convert.calib_tokens == 1024
    assert job.finetune.tokens == 5_000_000 and job.finetune.steps is None  # tokens replaces steps
    assert job.stages == ["convert", "eval"] and r.overrides[1] == "finetune.tokens=5M"
    assert r.resolved()["overrides"] == r.overrides


@pytest.mark.parametrize("item,needle", [
    ("finetune.tokenz=5M", "override 'finetune.tokenz=5M': no key 'tokenz' in finetune (did you mean 'tokens'?)"),
    ("convert.to.x=1", "convert.to has no sub-keys"),
    ("nokey=1", "no key 'nokey' in the recipe"),
    ("runs.zz.model=gpt2", "no job 'zz' under runs"),
    ("finetune.steps=abc", "override 'finetune.steps=abc'"),
    ("justtext", "is not key=value"),
])
def test_bad_overrides(tmp_path, item, needle):
    with pytest.raises(RecipeError) as e:
        load_recipe(_write(tmp_path, BASE), [item], check_files=False)
    assert needle in str(e.value), str(e.value)


def test_override_one_job_of_several_does_not_touch_anchored_siblings(tmp_path):
    text = """\
x-eval: &ev
  ppl: {data: /some/file.txt, max_tokens: 100}
runs:
  - {name: a, model: gpt2, convert: {to: rmsnorm}, eval: *ev}
  - {name: b, model: gpt2, convert: {to: dyt}, eval: *ev}
"""
    r = load_recipe(_write(tmp_path, text), ["runs.a.eval.ppl.max_tokens=50", "runs.1.convert.calib_tokens=99"], check_files=False)
    assert [j.eval.ppl.max_tokens for j in r.jobs] == [50, 100]
    assert r.jobs[1].convert.calib_tokens == 99 and r.jobs[0].convert.calib_tokens == 4096


def test_assets_variable_and_recipe_relative_paths(tmp_path, monkeypatch):
    assets = tmp_path / "assets"
    (assets / "m").mkdir(parents=True)
    (tmp_path / "recipes" / "data").mkdir(parents=True)
    (tmp_path / "recipes" / "data" / "train.txt").write_text("hello\n")
    monkeypatch.setenv("NORMSWAP_ASSETS", str(assets))
    p = _write(tmp_path / "recipes", "model: ${assets}/m\nfinetune:\n  data: data/train.txt\n  steps: 1\n")
    job = load_recipe(p).jobs[0]
    assert job.model == str(assets / "m")
    assert job.finetune.data == str(tmp_path / "recipes" / "data" / "train.txt")
    monkeypatch.setenv("NORMSWAP_ASSETS", str(tmp_path / "elsewhere"))
    with pytest.raises(RecipeError, match="model: no such folder"):
        load_recipe(p)


def test_list_recipes_finds_the_shipped_ones():
    assert {"quickstart", "gpt2-dyt"} <= {p.stem for p in list_recipes()}


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "normswap", *map(str, args)], capture_output=True, text=True, timeout=300)


def test_cli_validate_and_ls(tmp_path, standin_path):
    from typer.testing import CliRunner

    from normswap.cli import app

    ok = CliRunner().invoke(app, ["recipe", "validate", str(RECIPES[0].parent / "gpt2-dyt.yaml"), "model=gpt2", "finetune.tokens=5M"])
    assert ok.exit_code == 0 and "valid, 1 job(s)" in ok.output, ok.output
    ls = CliRunner().invoke(app, ["recipe", "ls"])
    assert ls.exit_code == 0 and "quickstart" in ls.output and "INVALID" not in ls.output
    bad = _cli("recipe", "validate", _write(tmp_path, BASE.replace("  steps: 10", "  stesp: 10")))
    errors = [l for l in bad.stderr.splitlines() if l.startswith("error:")]
    assert bad.returncode != 0 and "Traceback" not in bad.stderr and len(errors) == 1
    assert "r.yaml:7: unknown key 'stesp'" in errors[0]
