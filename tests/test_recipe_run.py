"""Running recipes: the run folder, results.json, report.md and plots; resume, changed settings, --force.
The full quickstart is a slow test."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from normswap.recipes import load_recipe, run_recipe

RECIPE = """\
name: tiny
runs:
  - name: rms
    model: {model}
    convert:
      to: rmsnorm
      verify: false
    finetune:
      objective: distill
      data: {text}
      steps: 2
      batch_size: 2
      block_size: 32
      val_examples: 2
      log_every: 1
    eval:
      ppl:
        data: {text}
        max_length: 64
        max_tokens: 256
"""


@pytest.fixture(scope="module")
def small_text(tmp_path_factory) -> Path:
    from normswap.assets import asset

    src = asset("wikitext2-tokenized", "valid.txt")
    if not src.exists():
        pytest.skip("WikiText-2 asset missing")
    p = tmp_path_factory.mktemp("text") / "small.txt"
    p.write_text(src.read_text()[:20000])
    return p


def _stages(run: Path, job: str) -> dict:
    return json.loads((run / job / "stages.json").read_text())


def test_run_writes_the_folder_and_resumes(tmp_path, standin_path, small_text):
    recipe_file = tmp_path / "tiny.yaml"
    recipe_file.write_text(RECIPE.format(model=standin_path, text=small_text))
    res = run_recipe(load_recipe(recipe_file), output_dir=tmp_path / "runs")
    run = tmp_path / "runs" / "tiny"
    for f in ("recipe.yaml", "resolved.yaml", "run.log", "results.json", "report.md", "deltas.png", "loss_curves.png",
              "rms/convert/config.json", "rms/finetune/model.safetensors", "rms/finetune/loss_curve.png",
              "rms/eval/original/results.json", "rms/eval/converted/results.json", "rms/eval/recovered/results.json", "rms/results.json"):
        assert (run / f).is_file(), f
    row = res["jobs"][0]["metrics"]["ppl"]
    assert row["original"] == pytest.approx(row["converted"], rel=1e-4)  # Pre-LN rmsnorm is exact
    assert row["recovered"] is not None and row["delta_recovered"] == pytest.approx(row["recovered"] - row["original"])
    report = (run / "report.md").read_text()
    assert "| rms | rmsnorm | perplexity ↓ |" in report and "![deltas](deltas.png)" in report and "loss_curves.png" in report
    assert "job rms: convert" in (run / "run.log").read_text()
    saved = json.loads((run / "results.json").read_text())
    assert saved["config"]["jobs"][0]["finetune"]["steps"] == 2 and saved["versions"]["torch"] and "git" in saved
    first = _stages(run, "rms")

    # again: everything is complete, nothing runs
    mtime = (run / "rms" / "finetune" / "model.safetensors").stat().st_mtime
    again = run_recipe(load_recipe(recipe_file), output_dir=tmp_path / "runs")
    assert set(again["jobs"][0]["skipped"]) == {"convert", "finetune", "eval:original", "eval:converted", "eval:recovered"}
    assert _stages(run, "rms") == first and (run / "rms" / "finetune" / "model.safetensors").stat().st_mtime == mtime
    assert again["jobs"][0]["metrics"] == res["jobs"][0]["metrics"]

    # a changed eval setting re-runs only the evaluations (here: of one model)
    changed = run_recipe(load_recipe(recipe_file, ["runs.rms.eval.ppl.max_tokens=128", "runs.rms.eval.models=[converted]"]),
                         output_dir=tmp_path / "runs")
    assert set(changed["jobs"][0]["skipped"]) == {"convert", "finetune"}
    assert changed["jobs"][0]["metrics"]["ppl"]["note"].startswith("127 tokens")


def test_force_runs_complete_stages_again(tmp_path, standin_path):
    recipe_file = tmp_path / "c.yaml"
    recipe_file.write_text(f"model: {standin_path}\nconvert:\n  to: rmsnorm\n  verify: false\n")
    run_recipe(load_recipe(recipe_file), output_dir=tmp_path)
    first = _stages(tmp_path / "c", "c")["convert"]
    assert run_recipe(load_recipe(recipe_file), output_dir=tmp_path)["jobs"][0]["skipped"] == ["convert"]
    time.sleep(1.1)
    forced = run_recipe(load_recipe(recipe_file), output_dir=tmp_path, force=True)
    assert forced["jobs"][0]["skipped"] == [] and _stages(tmp_path / "c", "c")["convert"]["finished"] > first["finished"]
    assert "(no evaluation in this recipe)" in (tmp_path / "c" / "report.md").read_text()


@pytest.mark.slow
def test_quickstart_recipe_end_to_end(tmp_path, standin_path, minilm_path):
    """The README's main job: all four jobs, on the real assets, in a few minutes on 2 cores."""
    from normswap.recipes import find_recipe

    t0 = time.perf_counter()
    res = run_recipe(load_recipe(find_recipe("quickstart")), output_dir=tmp_path)
    wall = time.perf_counter() - t0
    jobs = {j["name"]: j for j in res["jobs"]}
    assert jobs["gpt2-rmsnorm"]["metrics"]["ppl"]["converted"] == pytest.approx(jobs["gpt2-rmsnorm"]["metrics"]["ppl"]["original"], rel=1e-4)
    dyt = jobs["gpt2-dyt"]["metrics"]["ppl"]
    assert dyt["recovered"] < dyt["converted"]  # distillation recovers part of the DyT gap
    sts = jobs["minilm-dyt"]["metrics"]["sts_spearman"]
    assert sts["original"] == pytest.approx(0.8667, abs=1e-3) and sts["recovered"] > sts["converted"]
    assert (tmp_path / "quickstart" / "report.md").is_file()
    print(f"quickstart wall time {wall:.0f} s")


def test_whisper_recipe_runs_convert_distil_and_wer_on_a_tiny_whisper(tmp_path):
    """recipes/whisper-tiny-dyt.yaml as shipped, pointed at a tiny random Whisper (the real
    processor files) and three real utterances: calibration on the train subset, distillation on
    it, WER on all and on the test-clean+dev-clean group, audio seconds in the report."""
    from normswap.assets import asset
    from normswap.recipes import find_recipe

    if not (asset("whisper-tiny.en").is_dir() and asset("librispeech-subset").is_dir()):
        pytest.skip("whisper-tiny.en / librispeech-subset assets missing")
    from test_eval_asr import IDS, speech_folder, tiny_whisper

    ids = dict(IDS, **{"1988-24833-0001": "dev-clean"})
    model, data = tiny_whisper(tmp_path / "whisper"), speech_folder(tmp_path / "speech", ids)
    overrides = [f"model={model}", f"convert.calib_audio={data}", "convert.calib_tokens=512", f"finetune.audio={data}",
                 "finetune.steps=2", "finetune.batch_size=1", "finetune.val_examples=1", f"eval.asr.data={data}"]
    res = run_recipe(load_recipe(find_recipe("whisper-tiny-dyt"), overrides), output_dir=tmp_path / "runs")
    job = res["jobs"][0]
    summary = _stages(tmp_path / "runs" / "whisper-tiny-dyt", "whisper-tiny-dyt")
    assert summary["convert"]["summary"]["target"] == "dyt" and summary["convert"]["summary"]["max_rel_diff"] is not None
    ft = summary["finetune"]["summary"]
    assert ft["steps"] == 2 and ft["audio_seconds"] > 0
    metrics = job["metrics"]
    assert {"asr_wer", "asr_wer_test-clean+dev-clean"} <= set(metrics)
    saved = json.loads((tmp_path / "runs" / "whisper-tiny-dyt" / "whisper-tiny-dyt" / "eval" / "converted" / "results.json").read_text())
    asr = saved["results"]["asr"]
    group, parts = asr["subsets"]["test-clean+dev-clean"], [asr["subsets"]["test-clean"], asr["subsets"]["dev-clean"]]
    assert group["utterances"] == 2 and group["errors"] == sum(p["errors"] for p in parts)
    assert group["wer"] == pytest.approx(sum(p["errors"] for p in parts) / sum(p["words"] for p in parts))
    report = (tmp_path / "runs" / "whisper-tiny-dyt" / "report.md").read_text()
    assert "s of audio" in report and "test-clean+dev-clean" in report


def test_a_convert_stage_takes_the_variant_and_the_norm_fit(tmp_path, standin_path):
    from normswap.loading import read_record

    recipe_file = tmp_path / "v.yaml"
    recipe_file.write_text(f"model: {standin_path}\nconvert:\n  to: dyt\n  variant: dyisru\n  calibrate: block\n  e2e_steps: 2\n"
                           "  calib_tokens: 256\n  verify: false\n")
    run_recipe(load_recipe(recipe_file), output_dir=tmp_path)
    info = json.loads(next((tmp_path / "v" / "v").rglob("convert.json")).read_text())
    assert {s["new_type"] for s in info["sites"]} == {"dyisru"}
    assert info["end_to_end"]["mode"] == "block" and info["end_to_end"]["steps_per_unit"] == 2
    model_dir = next(p.parent for p in (tmp_path / "v" / "v").rglob("config.json"))
    assert {s.type for s in read_record(model_dir)[0].sites} == {"dyisru"}
