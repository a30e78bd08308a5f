"""Hostile cases for outputs, interrupts and I/O: inputs are never touched, `--overwrite` swaps only
a complete result into place, Ctrl-C and SIGTERM give one line and a truthful exit code, write
failures give one line and leave nothing behind.

Every case asserts the exit code, exactly one `error:` line and no traceback, the inputs
byte-identical (`tree_digest`), and no partial output or hidden debris (`debris`).
"""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_util import debris, refused, run_cli, tree_digest
from normswap.training.tiny import make_tiny_pair, tiny_corpus

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = ["--batch-size", "4", "--block-size", "16", "--val-examples", "4"]
NORMSWAP = [sys.executable, "-m", "normswap"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile-out")
    teacher, student = make_tiny_pair(root, "causal")
    data = root / "corpus.txt"
    data.write_text(tiny_corpus(120))
    return {"root": root, "teacher": teacher, "student": student, "data": data}


@pytest.fixture
def work(assets, tmp_path):
    """A private copy of the tiny models (the cases below try to damage their inputs)."""
    import shutil

    for name in ("teacher", "student"):
        shutil.copytree(assets[name], tmp_path / name)
    shutil.copy(assets["data"], tmp_path / "corpus.txt")
    return {"root": tmp_path, "teacher": tmp_path / "teacher", "student": tmp_path / "student", "data": tmp_path / "corpus.txt"}


def _digests(*paths: Path) -> dict[str, str]:
    return {str(p): tree_digest(p) for p in paths}


def _convert(model: Path, out: Path, *extra: str) -> list[str]:
    return ["convert", str(model), "--to", "rmsnorm", "--out", str(out), *extra]


def _finetune(student: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["finetune", str(student), "--data", str(data), "--steps", "2", "--out", str(out), *FAST, *extra]


# ------------------------------------------------------------------------ 1. never touch an input

INPUT_CASES = {
    "convert-out-is-source": (lambda w: _convert(w["teacher"], w["teacher"], "--overwrite"), "itself"),
    "convert-out-contains-source": (lambda w: _convert(w["teacher"], w["root"], "--overwrite"), "contains"),
    "convert-out-inside-source": (lambda w: _convert(w["teacher"], w["teacher"] / "sub"), "inside"),
    "convert-out-inside-source-overwrite": (lambda w: _convert(w["teacher"], w["teacher"] / "sub", "--overwrite"), "inside"),
    "convert-out-is-calib-text": (lambda w: _convert(w["teacher"], w["data"], "--to", "dyt", "--calib-text", str(w["data"]), "--overwrite"), "calibration text"),
    "convert-lowmem-out-is-source": (lambda w: _convert(w["teacher"], w["teacher"], "--low-memory", "--overwrite"), "itself"),
    "convert-out-symlink-to-source": (lambda w: _convert(w["teacher"], _link(w["root"] / "alias", w["teacher"]), "--overwrite"), "itself"),
    "convert-out-parent-via-dotdot": (lambda w: _convert(w["teacher"], w["teacher"] / "x" / ".." / "..", "--overwrite"), "contains"),
    "finetune-out-is-student": (lambda w: _finetune(w["student"], w["data"], w["student"], "--overwrite"), "student"),
    "finetune-out-inside-teacher": (lambda w: _finetune(w["student"], w["data"], w["teacher"] / "ft", "--teacher", str(w["teacher"]),
                                                        "--objective", "distill"), "teacher"),
    "finetune-out-is-data-file": (lambda w: _finetune(w["student"], w["data"], w["data"], "--overwrite"), "data"),
    "finetune-out-contains-student": (lambda w: _finetune(w["student"], w["data"], w["root"], "--overwrite"), "contains"),
    "finetune-resume-out-is-student": (lambda w: _finetune(w["student"], w["data"], w["student"], "--resume"), "student"),
    "eval-out-is-model": (lambda w: ["eval", str(w["teacher"]), "--ppl", str(w["data"]), "--out", str(w["teacher"]), "--overwrite"], "itself"),
    "eval-out-inside-baseline": (lambda w: ["eval", str(w["student"]), "--baseline", str(w["teacher"]), "--ppl", str(w["data"]),
                                            "--out", str(w["teacher"] / "res")], "inside"),
    "eval-out-is-ppl-file": (lambda w: ["eval", str(w["teacher"]), "--ppl", str(w["data"]), "--out", str(w["data"]), "--overwrite"], "--ppl"),
    "convert-out-is-root": (lambda w: _convert(w["teacher"], Path("/"), "--overwrite"), "root folder"),
    "convert-out-is-home": (lambda w: _convert(w["teacher"], Path("~"), "--overwrite"), "home folder"),
    "convert-out-is-cwd": (lambda w: _convert(w["teacher"], Path("."), "--overwrite"), "current folder"),
    "push-export-dir-is-checkpoint": (lambda w: ["push", str(w["student"]), "me/x", "--dry-run", "--export-dir", str(w["student"])], "itself"),
    "push-export-dir-inside-checkpoint": (lambda w: ["push", str(w["student"]), "me/x", "--dry-run", "--export-dir", str(w["student"] / "hub")], "inside"),
}


def _link(link: Path, target: Path) -> Path:
    link.symlink_to(target)
    return link


@pytest.mark.hostile("inputs")
@pytest.mark.parametrize("case", list(INPUT_CASES))
def test_output_never_touches_an_input(case, work, monkeypatch, capsys):
    make_args, needle = INPUT_CASES[case]
    args = make_args(work)
    scratch = work["root"] / "cwd"
    scratch.mkdir()
    monkeypatch.chdir(scratch)  # "." is a folder of its own, holding no input
    before = _digests(work["teacher"], work["student"], work["data"])
    code, out, err = run_cli(args, monkeypatch, capsys)
    refused(code, err, needle, exit_code=2)
    assert _digests(work["teacher"], work["student"], work["data"]) == before
    assert debris(work["root"]) == [] and debris(work["teacher"]) == [] and debris(work["student"]) == []


@pytest.mark.hostile("inputs")
def test_push_dry_run_onto_its_own_earlier_export(work, monkeypatch, capsys):
    """The reproducer: `push E --dry-run --export-dir E` with E an earlier export deleted E."""
    export = work["root"] / "export"
    code, _, err = run_cli(["push", str(work["student"]), "me/x", "--dry-run", "--export-dir", str(export)], monkeypatch, capsys)
    assert code == 0, err
    before = tree_digest(export)
    code, _, err = run_cli(["push", str(export), "me/x", "--dry-run", "--export-dir", str(export)], monkeypatch, capsys)
    refused(code, err, "itself", exit_code=2)
    assert tree_digest(export) == before and debris(work["root"]) == []


@pytest.mark.hostile("inputs")
def test_recipe_run_folder_inside_an_input(work, monkeypatch, capsys):
    recipe = work["root"] / "r.yaml"
    recipe.write_text(f"name: inside\nmodel: {work['teacher']}\nconvert: {{to: rmsnorm}}\n")
    before = _digests(work["teacher"])
    code, _, err = run_cli(["recipe", "run", str(recipe), "--output-dir", str(work["teacher"])], monkeypatch, capsys)
    refused(code, err, "inside", exit_code=2)
    assert _digests(work["teacher"]) == before and not (work["teacher"] / "inside").exists()


@pytest.mark.hostile("inputs")
def test_recipe_run_folder_contains_the_data(work, monkeypatch, capsys):
    data_dir = work["root"] / "runs" / "has-data"
    data_dir.mkdir(parents=True)
    corpus = data_dir / "corpus.txt"
    corpus.write_text(tiny_corpus(50))
    recipe = work["root"] / "r.yaml"
    recipe.write_text(f"name: has-data\nmodel: {work['student']}\nfinetune: {{data: {corpus}, steps: 2}}\n")
    before = _digests(corpus, work["student"])
    code, _, err = run_cli(["recipe", "run", str(recipe), "--output-dir", str(work["root"] / "runs")], monkeypatch, capsys)
    refused(code, err, "contains", exit_code=2)
    assert _digests(corpus, work["student"]) == before


@pytest.mark.hostile("inputs")
def test_finetune_overwrite_with_missing_data_keeps_the_old_folder(work, monkeypatch, capsys):
    """The reproducer: `finetune ... --out GOOD --overwrite --data typo.txt` deleted GOOD first."""
    good = work["root"] / "good"
    assert run_cli(_finetune(work["student"], work["data"], good), monkeypatch, capsys)[0] == 0
    before = tree_digest(good)
    code, _, err = run_cli(_finetune(work["student"], work["root"] / "typo.txt", good, "--overwrite"), monkeypatch, capsys)
    refused(code, err, "typo.txt", exit_code=2)
    assert tree_digest(good) == before and debris(work["root"]) == []


@pytest.mark.hostile("inputs")
def test_finetune_overwrite_failing_mid_run_keeps_the_old_folder(work, monkeypatch, capsys):
    """A run that dies during training leaves the old folder intact and no staging folder."""
    good = work["root"] / "good"
    assert run_cli(_finetune(work["student"], work["data"], good), monkeypatch, capsys)[0] == 0
    before = tree_digest(good)

    import safetensors.torch

    def full(model, filename, *a, **k):
        Path(filename).write_bytes(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(safetensors.torch, "save_model", full)  # the first training checkpoint
    code, _, err = run_cli(_finetune(work["student"], work["data"], good, "--overwrite"), monkeypatch, capsys)
    refused(code, err, "No space left", exit_code=2)
    assert tree_digest(good) == before and debris(work["root"]) == []
    assert not (work["root"] / ".good.replacement").exists()


@pytest.mark.hostile("inputs")
def test_finetune_overwrite_replaces_only_when_complete(work, monkeypatch, capsys):
    good = work["root"] / "good"
    good.mkdir()
    (good / "old.txt").write_text("old")
    seen = []
    from normswap.training import api

    real = api.save_final

    def spy(model, out, *a, **k):
        seen.append((good / "old.txt").is_file())  # the old folder is still there while the new model is written
        return real(model, out, *a, **k)

    monkeypatch.setattr(api, "save_final", spy)
    code, _, err = run_cli(_finetune(work["student"], work["data"], good, "--overwrite"), monkeypatch, capsys)
    assert code == 0, err
    assert seen == [True] and not (good / "old.txt").exists() and (good / "model.safetensors").is_file()
    assert debris(work["root"]) == []


@pytest.mark.hostile("inputs")
def test_convert_overwrite_failing_at_save_keeps_the_old_folder(work, monkeypatch, capsys):
    import safetensors.torch

    out = work["root"] / "out"
    assert run_cli(_convert(work["teacher"], out), monkeypatch, capsys)[0] == 0
    before = tree_digest(out)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(a[1]) if len(a) > 1 else None)

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    code, _, err = run_cli(_convert(work["teacher"], out, "--overwrite"), monkeypatch, capsys)
    refused(code, err, "No space left", exit_code=2)
    assert tree_digest(out) == before and debris(work["root"]) == []


@pytest.mark.hostile("inputs")
def test_eval_out_existing_folder_is_refused_then_replaced(work, monkeypatch, capsys):
    """`eval --out` into an existing folder mixed old and new files; now it follows --overwrite."""
    res = work["root"] / "res"
    res.mkdir()
    (res / "stale.json").write_text("{}")
    base = ["eval", str(work["teacher"]), "--ppl", str(work["data"]), "--max-length", "16", "--out", str(res)]
    code, _, err = run_cli(base, monkeypatch, capsys)
    refused(code, err, "--overwrite", exit_code=2)
    assert (res / "stale.json").is_file()
    code, _, err = run_cli(base + ["--overwrite", "--format", "json"], monkeypatch, capsys)
    assert code == 0, err
    assert not (res / "stale.json").exists() and (res / "results.json").is_file() and debris(work["root"]) == []


def test_convert_overwrite_swaps_and_leaves_no_debris(work, monkeypatch, capsys):
    out = work["root"] / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    code, _, err = run_cli(_convert(work["teacher"], out, "--overwrite"), monkeypatch, capsys)
    assert code == 0, err
    assert not (out / "old.txt").exists() and (out / "model.safetensors").is_file() and debris(work["root"]) == []


# ------------------------------------------------------------------------------ 3. I/O failures


@pytest.mark.hostile("io")
@pytest.mark.parametrize("where", ["proc", "parent-is-file", "broken-link"])
def test_unwritable_destination_is_refused_before_work(where, work, monkeypatch, capsys):
    import normswap.conversion as conversion

    if where == "proc":
        out = Path("/proc/normswap-out")
    elif where == "parent-is-file":
        out = work["data"] / "out"
    else:
        (work["root"] / "dangling").symlink_to(work["root"] / "nowhere")
        out = work["root"] / "dangling" / "out"
    monkeypatch.setattr(conversion, "convert_model", lambda *a, **k: pytest.fail("conversion ran before the output check"))
    before = _digests(work["teacher"], work["data"])
    code, _, err = run_cli(_convert(work["teacher"], out), monkeypatch, capsys)
    refused(code, err, str(out).split("/")[-2] if where != "proc" else "/proc", exit_code=2)
    assert _digests(work["teacher"], work["data"]) == before and debris(work["root"]) == []


@pytest.mark.hostile("io")
@pytest.mark.parametrize("command", ["finetune", "eval", "recipe"])
def test_unwritable_destination_other_commands(command, work, monkeypatch, capsys):
    blocker = work["root"] / "blocker"
    blocker.write_text("a file, not a folder")
    out = blocker / "sub"  # a path below a file: nothing can be created there
    if command == "finetune":
        args = _finetune(work["student"], work["data"], out)
    elif command == "eval":
        args = ["eval", str(work["teacher"]), "--ppl", str(work["data"]), "--out", str(out)]
    else:
        recipe = work["root"] / "r.yaml"
        recipe.write_text(f"name: r\nmodel: {work['teacher']}\nconvert: {{to: rmsnorm}}\n")
        args = ["recipe", "run", str(recipe), "--output-dir", str(out)]
    before = _digests(work["teacher"], work["student"], work["data"])
    code, _, err = run_cli(args, monkeypatch, capsys)
    refused(code, err, "not a folder", exit_code=2)
    assert _digests(work["teacher"], work["student"], work["data"]) == before and debris(work["root"]) == []


@pytest.mark.hostile("io")
@pytest.mark.parametrize("failure", ["enospc", "eacces", "erofs", "safetensors-error"])
def test_write_failure_mid_save_is_one_line_and_removes_partial_output(failure, work, monkeypatch, capsys):
    import safetensors.torch

    def fail(tensors, filename, *a, **k):
        Path(filename).write_bytes(b"partial")  # as a real full disk would leave it
        if failure == "safetensors-error":
            from safetensors import SafetensorError

            raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space left on device\" })")
        code = {"enospc": errno.ENOSPC, "eacces": errno.EACCES, "erofs": errno.EROFS}[failure]
        raise OSError(code, os.strerror(code), filename)

    monkeypatch.setattr(safetensors.torch, "save_file", fail)
    out = work["root"] / "out"
    before = _digests(work["teacher"])
    code, _, err = run_cli(_convert(work["teacher"], out), monkeypatch, capsys)
    refused(code, err, "nothing was written", exit_code=2)
    assert not out.exists() and debris(work["root"]) == [] and _digests(work["teacher"]) == before
    assert not any(p.name.endswith(".tmp") for p in work["root"].rglob("*"))


@pytest.mark.hostile("io")
def test_export_write_failure_keeps_the_earlier_export(work, monkeypatch, capsys):
    import shutil as _shutil

    export = work["root"] / "export"
    assert run_cli(["push", str(work["student"]), "me/x", "--dry-run", "--export-dir", str(export)], monkeypatch, capsys)[0] == 0
    before = tree_digest(export)
    real = _shutil.copy2

    def full(src, dst, *a, **k):
        if str(src).endswith("model.safetensors"):
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real(src, dst, *a, **k)

    monkeypatch.setattr("normswap.export.remote.shutil.copy2", full)
    code, _, err = run_cli(["push", str(work["student"]), "me/x", "--dry-run", "--export-dir", str(export)], monkeypatch, capsys)
    refused(code, err, "No space left", exit_code=2)
    assert tree_digest(export) == before and debris(work["root"]) == []


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_outputs_follow_the_umask(mask, work, monkeypatch, capsys):
    out = work["root"] / "out"
    old = os.umask(mask)
    try:
        code, _, err = run_cli(_convert(work["teacher"], out), monkeypatch, capsys)
    finally:
        os.umask(old)
    assert code == 0, err
    assert (out.stat().st_mode & 0o777) == 0o777 & ~mask
    for f in out.iterdir():
        assert (f.stat().st_mode & 0o777) == 0o666 & ~mask, f


# ------------------------------------------------------------------- 2. interrupts and exit codes


def _spawn(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([*NORMSWAP, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _signal_when(proc: subprocess.Popen, sig: int, *, after: float = 0.0, line: str | None = None, timeout: float = 120) -> tuple[str, str]:
    """Send `sig` once `line` appeared on stderr (or after `after` seconds); return (stdout, stderr)."""
    err_lines: list[str] = []
    if line is not None:
        t0 = time.time()
        for raw in proc.stderr:
            err_lines.append(raw)
            if line in raw or time.time() - t0 > timeout:
                break
    else:
        time.sleep(after)
    proc.send_signal(sig)
    out, rest = proc.communicate(timeout=timeout)
    return out, "".join(err_lines) + rest


def _long_text(work) -> Path:
    """Calibration text long enough that fitting takes seconds after the "converting" line (the
    tiny corpus calibrates in 0.1 s, so a signal under load could arrive after the run ended)."""
    path = work["root"] / "long.txt"
    if not path.exists():
        path.write_text(tiny_corpus(20000))
    return path


@pytest.mark.hostile("interrupts")
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_convert_interrupted_during_calibration(sig, code, work):
    out = work["root"] / "out"
    before = _digests(work["teacher"])
    proc = _spawn(["convert", str(work["teacher"]), "--to", "dyt", "--calib-tokens", "200000", "--calib-text", str(_long_text(work)),
                   "--out", str(out)], work["root"])
    _, err = _signal_when(proc, sig, line="converting")
    refused(proc.returncode, err, "interrupted", exit_code=code)
    assert not out.exists() and debris(work["root"]) == [] and _digests(work["teacher"]) == before


@pytest.mark.hostile("interrupts")
@pytest.mark.parametrize("after", [0.2, 1.0])
def test_interrupt_during_start_up(after, work):
    proc = _spawn(["inspect", str(work["teacher"])], work["root"])
    _, err = _signal_when(proc, signal.SIGINT, after=after)
    if proc.returncode == 0:  # the command finished before the signal came
        pytest.skip("inspect finished within the delay")
    refused(proc.returncode, err, "interrupted", exit_code=130)


@pytest.mark.hostile("interrupts")
def test_eval_interrupted(work):
    big = work["root"] / "big.txt"
    big.write_text(tiny_corpus(4000))
    res = work["root"] / "res"
    proc = _spawn(["eval", str(work["teacher"]), "--ppl", str(big), "--max-length", "16", "--stride", "1", "--out", str(res)], work["root"])
    _, err = _signal_when(proc, signal.SIGINT, line="perplexity of")
    refused(proc.returncode, err, "interrupted", exit_code=130)
    assert not res.exists() and debris(work["root"]) == []


@pytest.mark.hostile("interrupts")
def test_finetune_sigterm_saves_a_checkpoint_and_resumes(work, monkeypatch, capsys):
    out = work["root"] / "ft"
    proc = _spawn(_finetune(work["student"], work["data"], out)[:-len(FAST)] + FAST + ["--log-every", "1"] +
                  ["--steps", "100000"], work["root"])
    _, err = _signal_when(proc, signal.SIGTERM, line="step 2/")
    assert proc.returncode == 143, err
    assert "Traceback" not in err and "continue with --resume" in err
    state = json.loads(next((out / "checkpoints").iterdir()).joinpath("state.json").read_text())
    assert state["step"] >= 2 and debris(work["root"]) == []


@pytest.mark.hostile("interrupts")
def test_recipe_convert_stage_interrupted(work):
    recipe = work["root"] / "r.yaml"
    recipe.write_text(f"name: r\nmodel: {work['teacher']}\nconvert: {{to: dyt, calib_tokens: 200000, calib_text: {_long_text(work)}}}\n")
    proc = _spawn(["recipe", "run", str(recipe), "--output-dir", str(work["root"] / "runs")], work["root"])
    _, err = _signal_when(proc, signal.SIGINT, line="convert")
    refused(proc.returncode, err, "interrupted", exit_code=130)
    assert not (work["root"] / "runs" / "r" / "r" / "convert").exists() and debris(work["root"] / "runs" / "r" / "r") == []


@pytest.mark.hostile("interrupts")
def test_debris_of_a_killed_run_is_removed_by_the_next(work, monkeypatch, capsys):
    out = work["root"] / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    stale = work["root"] / f".out.tmp-{dead}-abc123"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    code, _, err = run_cli(_convert(work["teacher"], out), monkeypatch, capsys)
    assert code == 0, err
    assert not stale.exists() and debris(work["root"]) == []


@pytest.mark.hostile("interrupts")
def test_swap_cut_short_by_a_kill_is_put_back(work, monkeypatch, capsys):
    """Killed between moving the old folder aside and moving the new one in: the old one returns."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    out = work["root"] / "out"
    aside = work["root"] / f".out.old-{dead}-xyz789"
    aside.mkdir()
    (aside / "keep.txt").write_text("the user's previous result")
    code, _, err = run_cli(_convert(work["teacher"], out), monkeypatch, capsys)  # no --overwrite: out is back, so refused
    refused(code, err, "exists", exit_code=2)
    assert (out / "keep.txt").read_text() == "the user's previous result" and debris(work["root"]) == []


@pytest.mark.hostile("interrupts")
def test_exit_code_of_typer_exit_is_kept(monkeypatch, capsys):
    """`normswap.cli.main` used to drop the code Typer returns (an interrupted finetune exited 0)."""
    import typer

    from normswap import cli

    monkeypatch.setattr(cli, "app", lambda **k: 130)
    code, _, _ = run_cli(["inspect", "x"], monkeypatch, capsys)
    assert code == 130
    monkeypatch.setattr(cli, "app", lambda **k: (_ for _ in ()).throw(typer.Exit(7)))
    assert run_cli(["inspect", "x"], monkeypatch, capsys)[0] == 7


# ------------------------------------------------------------------------ usage errors, own files

USAGE_CASES = {
    "unknown-command": ["frobnicate"],
    "missing-argument": ["convert"],
    "missing-option-value": ["convert", "m", "--to"],
    "not-an-integer": ["eval", "m", "--seeds", "abc"],
    "not-a-number": ["finetune", "s", "--out", "o", "--data", "d", "--lr", "fast"],
    "unknown-option": ["inspect", "m", "--no-such-flag"],
}


@pytest.mark.hostile("usage")
@pytest.mark.parametrize("case", list(USAGE_CASES))
def test_usage_error_is_one_line(case, monkeypatch, capsys):
    code, out, err = run_cli(USAGE_CASES[case], monkeypatch, capsys)
    line = refused(code, err, "--help", exit_code=2)
    assert out == "" and len(err.strip().splitlines()) == 1, err
    assert "Usage:" not in err and line.startswith("error: ")


@pytest.mark.hostile("resume")
def test_damaged_train_log_does_not_stop_a_resume(work, monkeypatch, capsys):
    out = work["root"] / "ft"
    stop = {"n": 0}
    from normswap.training import loop

    flag_cls = loop._StopFlag

    class StopAt2(flag_cls):  # stop after two steps, as a Ctrl-C would
        @property
        def set(self):
            stop["n"] += 1
            return stop["n"] > 2

        @set.setter
        def set(self, value):
            pass

    monkeypatch.setattr(loop, "_StopFlag", StopAt2)
    args = _finetune(work["student"], work["data"], out)[:-len(FAST)] + FAST + ["--steps", "6", "--log-every", "1"]
    code, _, err = run_cli(args, monkeypatch, capsys)
    assert code == 130, err
    monkeypatch.setattr(loop, "_StopFlag", flag_cls)
    with (out / "train_log.jsonl").open("a") as f:
        f.write('{"kind": "train", "step": 3, "lo')  # a line cut short by a kill
    half = out / "checkpoints" / ".tmp-step-0000003"  # a checkpoint the kill cut short
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"half")
    code, _, err = run_cli(args + ["--resume"], monkeypatch, capsys)
    assert code == 0, err
    assert "damaged line" in err and "Traceback" not in err
    assert not half.exists() and debris(out / "checkpoints") == []
    assert json.loads((out / "finetune_result.json").read_text())["status"] == "completed"


@pytest.mark.hostile("resume")
def test_damaged_stages_file_reruns_the_stages(work, monkeypatch, capsys):
    recipe = work["root"] / "r.yaml"
    recipe.write_text(f"name: r\nmodel: {work['teacher']}\nconvert: {{to: rmsnorm}}\n")
    args = ["recipe", "run", str(recipe), "--output-dir", str(work["root"] / "runs"), "--format", "json"]
    assert run_cli(args, monkeypatch, capsys)[0] == 0
    stages = work["root"] / "runs" / "r" / "r" / "stages.json"
    stages.write_text("{not json")
    code, _, err = run_cli(args, monkeypatch, capsys)
    assert code == 0 and "damaged" in err and "Traceback" not in err, err
    assert json.loads(stages.read_text())["convert"]["fingerprint"]


@pytest.mark.hostile("resume")
def test_damaged_stage_output_reruns_the_stage(work, monkeypatch, capsys):
    recipe = work["root"] / "r.yaml"
    recipe.write_text(f"name: r\nmodel: {work['teacher']}\nconvert: {{to: rmsnorm}}\n"
                      f"eval: {{ppl: {{data: {work['data']}, max_length: 16}}, models: [converted]}}\n")
    args = ["recipe", "run", str(recipe), "--output-dir", str(work["root"] / "runs"), "--format", "json"]
    assert run_cli(args, monkeypatch, capsys)[0] == 0
    res = work["root"] / "runs" / "r" / "r" / "eval" / "converted" / "results.json"
    res.write_text("[truncated")
    code, _, err = run_cli(args, monkeypatch, capsys)
    assert code == 0 and "Traceback" not in err, err
    assert "results" in json.loads(res.read_text())


def test_finetune_checkpoints_follow_the_umask(work, monkeypatch, capsys):
    out = work["root"] / "ft"
    old = os.umask(0o022)
    try:
        code, _, err = run_cli(_finetune(work["student"], work["data"], out) + ["--retain-checkpoints"], monkeypatch, capsys)
    finally:
        os.umask(old)
    assert code == 0, err
    assert any((out / "checkpoints").iterdir())
    for f in out.rglob("*"):
        want = 0o755 if f.is_dir() else 0o644
        assert (f.stat().st_mode & 0o777) == want, f


# ------------------------------------------------------------ source checkpoints with bad values


def _tampered_source(work: Path, how: str) -> Path:
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    src = work / f"source-{how}"
    shutil.copytree(work / "teacher", src)
    state = load_file(str(src / "model.safetensors"))
    key = next(k for k in state if k.endswith("mlp.c_fc.weight"))
    if how == "nan":
        state[key][0, 0] = float("nan")
    elif how == "inf":
        state[key][1, 2] = float("-inf")
    else:
        state[key] = (state[key] * 100).to(torch.int64)
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    return src


@pytest.mark.hostile("corrupt-weights")
@pytest.mark.parametrize("how", ["nan", "inf", "int64"])
@pytest.mark.parametrize("path", ["in-memory", "low-memory"])
def test_source_with_bad_weight_values_is_refused(how, path, work, monkeypatch, capsys):
    src = _tampered_source(work["root"], how)
    before = tree_digest(src)
    out = work["root"] / "out"
    extra = ["--low-memory"] if path == "low-memory" else []
    code, _, err = run_cli(_convert(src, out, *extra), monkeypatch, capsys)
    refused(code, err, "dtype" if how == "int64" else "non-finite", exit_code=2)
    assert tree_digest(src) == before and not out.exists() and debris(work["root"]) == []


# ---------------------------------------------------------------- out-of-range options, up front

CONVERT_OPTION_CASES = {
    "calib-tokens-negative": (["--to", "dyt", "--calib-tokens", "-5"], "--calib-tokens"),
    "calib-tokens-zero": (["--to", "dyt", "--calib-tokens", "0"], "--calib-tokens"),
    "alpha-init-nan": (["--to", "dyt", "--alpha-init", "nan"], "--alpha-init"),
    "alpha-init-inf": (["--to", "dyt", "--alpha-init", "inf"], "--alpha-init"),
    "alpha-init-zero": (["--to", "dyt", "--alpha-init", "0"], "--alpha-init"),
    "alpha-init-negative": (["--to", "dyt", "--alpha-init", "-1"], "--alpha-init"),
    "alpha-init-negative-lowmem": (["--to", "dyt", "--alpha-init", "-1", "--low-memory"], "--alpha-init"),
    "unknown-target": (["--to", "layernorm"], "unknown target"),
    "unknown-dtype": (["--to", "rmsnorm", "--dtype", "int8"], "--dtype"),
}


@pytest.mark.hostile("options")
@pytest.mark.parametrize("case", list(CONVERT_OPTION_CASES))
def test_convert_option_out_of_range(case, work, monkeypatch, capsys):
    import normswap.loading as loading

    extra, needle = CONVERT_OPTION_CASES[case]
    monkeypatch.setattr(loading, "load_pretrained", lambda *a, **k: pytest.fail("the model was loaded before the options were checked"))
    out = work["root"] / "out"
    code, _, err = run_cli(["convert", str(work["teacher"]), "--out", str(out), *extra], monkeypatch, capsys)
    refused(code, err, needle, exit_code=2)
    assert not out.exists() and debris(work["root"]) == []


FINETUNE_OPTION_CASES = {
    "lr-nan": ["--lr", "nan"], "lr-negative": ["--lr", "-1"], "warmup-negative": ["--warmup", "-1"],
    "temperature-zero": ["--temperature", "0"], "time-limit-negative": ["--time-limit", "-1"],
    "time-limit-zero": ["--time-limit", "0"], "val-examples-negative": ["--val-examples", "-1"],
    "clip-negative": ["--clip", "-1"], "dropout-above-one": ["--dropout", "2"], "weight-decay-negative": ["--weight-decay", "-1"],
    "min-lr-ratio-above-one": ["--min-lr-ratio", "2"], "eval-every-zero": ["--eval-every", "0"],
    "save-every-zero": ["--save-every", "0"], "hidden-weight-nan": ["--hidden-weight", "nan"], "train-unknown": ["--train", "foo"],
    "batch-size-zero": ["--batch-size", "0"], "steps-negative": ["--steps", "-3"], "tokens-negative": ["--tokens", "-5"],
}


@pytest.mark.hostile("options")
@pytest.mark.parametrize("case", list(FINETUNE_OPTION_CASES))
def test_finetune_option_out_of_range(case, work, monkeypatch, capsys):
    import normswap.loading as loading

    monkeypatch.setattr(loading, "load_pretrained", lambda *a, **k: pytest.fail("the model was loaded before the options were checked"))
    out = work["root"] / "ft"
    args = ["finetune", str(work["student"]), "--data", str(work["data"]), "--out", str(out), "--steps", "2", *FINETUNE_OPTION_CASES[case]]
    before = _digests(work["student"], work["data"])
    code, _, err = run_cli(args, monkeypatch, capsys)
    needle = "count" if case == "tokens-negative" else FINETUNE_OPTION_CASES[case][0].lstrip("-").split("-")[0]
    refused(code, err, needle, exit_code=2)
    assert not out.exists() and debris(work["root"]) == [] and _digests(work["student"], work["data"]) == before


@pytest.mark.hostile("io")
@pytest.mark.parametrize("error", ["oserror", "safetensors-error"])
def test_full_disk_at_a_training_checkpoint(error, work, monkeypatch, capsys):
    """A fresh run whose first checkpoint hits a full disk: one line, and no folder left behind."""
    import safetensors.torch
    from safetensors import SafetensorError

    def full(model, filename, *a, **k):
        Path(filename).write_bytes(b"half a checkpoint")
        if error == "oserror":
            raise OSError(errno.ENOSPC, "No space left on device", filename)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_model", full)
    out = work["root"] / "ft"
    code, _, err = run_cli(_finetune(work["student"], work["data"], out), monkeypatch, capsys)
    refused(code, err, "No space left", exit_code=2)
    assert not out.exists() and debris(work["root"]) == []


# --------------------------------------------------- nothing saved unmeasured (issue 12, item 4)


@pytest.fixture
def tiny_whisper(tmp_path):
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    config = WhisperConfig(vocab_size=100, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                           decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8,
                           max_source_positions=16, max_target_positions=16, pad_token_id=0, bos_token_id=1,
                           eos_token_id=2, decoder_start_token_id=1)
    path = tmp_path / "whisper"
    WhisperForConditionalGeneration(config).save_pretrained(path)
    return path


@pytest.fixture
def tiny_wav2vec2(tmp_path):
    """A speech encoder (raw waveform input_values) normswap cannot build inputs for."""
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    config = Wav2Vec2Config(vocab_size=32, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                            conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=4,
                            num_conv_pos_embedding_groups=2, do_stable_layer_norm=True)
    path = tmp_path / "wav2vec2"
    Wav2Vec2ForCTC(config).save_pretrained(path)
    return path


@pytest.fixture
def tiny_bart(tmp_path):
    """A Post-LN encoder-decoder normswap has no table for (discovered; its conversion is approximate)."""
    from transformers import BartConfig, BartForConditionalGeneration

    config = BartConfig(vocab_size=100, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                        encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=32)
    path = tmp_path / "bart"
    BartForConditionalGeneration(config).save_pretrained(path)
    return path


@pytest.mark.hostile("degradation")
@pytest.mark.parametrize("model,extra,needle", [
    ("wav2vec2", ["--to", "dyt"], "cannot build calibration or verification inputs"),
    ("wav2vec2", ["--to", "rmsnorm", "--drop-mean"], "cannot build calibration or verification inputs"),
    ("bart", ["--to", "rmsnorm", "--drop-mean", "--low-memory"], "no family table"),
])
def test_a_model_normswap_cannot_measure_is_refused(model, extra, needle, tiny_whisper, tiny_bart, tiny_wav2vec2, tmp_path, monkeypatch, capsys):
    """--low-memory used to save an unmeasured Whisper whose every transcript was '.', exit 0."""
    src = {"whisper": tiny_whisper, "bart": tiny_bart, "wav2vec2": tiny_wav2vec2}[model]
    before = tree_digest(src)
    out = tmp_path / "out"
    code, _, err = run_cli(["convert", str(src), "--out", str(out), *extra], monkeypatch, capsys)
    refused(code, err, needle, exit_code=2)
    assert not out.exists() and debris(tmp_path) == [] and tree_digest(src) == before


@pytest.mark.parametrize("extra", [["--to", "rmsnorm"], ["--to", "rmsnorm", "--low-memory"], ["--to", "dyt"],
                                   ["--to", "dyt", "--alpha-init", "0.5", "--low-memory"]])
def test_whisper_converts_and_what_is_approximate_is_measured(extra, tiny_whisper, tmp_path, monkeypatch, capsys):
    """What the reproducers of issue 12 do now: exact RMSNorm in memory and streaming; DyT
    calibrated (random features stand in: no processor in this folder) and measured, in memory or
    block by block (--low-memory once saved this model unmeasured, every transcript '.')."""
    out = tmp_path / "out"
    code, stdout, err = run_cli(["convert", str(tiny_whisper), "--out", str(out), "--format", "json", *extra], monkeypatch, capsys)
    assert code == 0, err
    data = json.loads(stdout)
    assert data["exact"] == (extra[1] == "rmsnorm") and out.is_dir()
    assert data["low_memory"] == ("--low-memory" in extra)
    if extra[1] == "dyt":
        assert data["max_rel_diff"] is not None and data["max_rel_diff"] > 1e-3
        assert any("random features" in w for w in data["warnings"])


def test_automatic_streaming_of_an_approximate_conversion_is_measured(work, monkeypatch, capsys):
    """Chosen automatically (a large checkpoint), streaming measures an approximate result block by
    block, on the files as written, and reports the same deviation the in-memory path does."""
    from normswap import streaming

    from tiny_models import tiny_model

    src = work["root"] / "bert"
    tiny_model("bert").save_pretrained(src)  # Post-LN: --to rmsnorm is approximate
    calls = []
    real = streaming.stream_convert
    monkeypatch.setattr(streaming, "stream_convert", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(streaming, "available_memory", lambda: 1)  # every checkpoint is "large"
    out = work["root"] / "out"
    code, stdout, err = run_cli(["convert", str(src), "--to", "rmsnorm", "--out", str(out), "--format", "json"], monkeypatch, capsys)
    assert code == 0, err
    data = json.loads(stdout)
    assert calls == [1]
    assert data["low_memory"] is True and data["exact"] is False and data["max_rel_diff"] is not None
    monkeypatch.setattr(streaming, "available_memory", lambda: 1 << 50)  # now it fits: the in-memory path
    code, stdout, err = run_cli(["convert", str(src), "--to", "rmsnorm", "--out", str(work["root"] / "memory"), "--format", "json"],
                                monkeypatch, capsys)
    assert code == 0, err
    in_memory = json.loads(stdout)
    assert calls == [1] and in_memory["low_memory"] is False
    assert in_memory["max_rel_diff"] == pytest.approx(data["max_rel_diff"], rel=1e-4)


@pytest.mark.hostile("bad-input")
def test_calibration_audio_for_a_speech_model_without_a_processor_is_refused(tiny_whisper, tmp_path, monkeypatch, capsys):
    """Audio needs the checkpoint's feature extractor: its absence is the error, not random features."""
    from normswap.assets import asset

    speech = asset("librispeech-subset")
    if not speech.is_dir():
        pytest.skip("librispeech-subset asset missing")
    out = tmp_path / "out"
    code, _, err = run_cli(["convert", str(tiny_whisper), "--to", "dyt", "--calib-audio", str(speech), "--out", str(out)], monkeypatch, capsys)
    refused(code, err, "cannot load the processor", exit_code=2)
    assert not out.exists() and debris(tmp_path) == []
