"""Hostile input for fine-tuning and recipes: damaged checkpoints on --resume, advice after a NaN
loss that works, one run per output folder (a lock beside it), and bounded recipe YAML (alias
bombs, recursion, deep nesting, huge files)."""
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import hashlib
import json
import logging
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cli_util import debris, refused, run_cli, tree_digest
from normswap.training import finetune
from normswap.training.tiny import make_tiny_pair, tiny_corpus

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = ["--batch-size", "4", "--block-size", "16", "--val-examples", "4", "--log-every", "1"]
RUN = ["--steps", "8", "--save-every", "3", *FAST]  # checkpoints at 3, 6; the base run stops at 7
API_RUN = dict(steps=8, save_every=3, batch_size=4, block_size=16, val_examples=4, log_every=1)


@pytest.fixture(autouse=True)
def _logs_to_captured_stderr(capsys):
    """normswap's stderr log handler is made once per process: point it at this test's stderr."""
    from normswap.log import logger, setup_logging

    setup_logging()
    handlers = [h for h in logger.handlers if type(h) is logging.StreamHandler]
    old = [h.setStream(sys.stderr) for h in handlers]
    yield
    for h, stream in zip(handlers, old):
        if stream is not None:
            h.setStream(stream)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny student, its data, a run interrupted at step 7 (checkpoints step-6 and step-7) and
    the same run uninterrupted (the reference a correct resume must reproduce)."""
    import signal

    root = tmp_path_factory.mktemp("hostile-train")
    teacher, student = make_tiny_pair(root, "causal")
    data = root / "corpus.txt"
    data.write_text(tiny_corpus(200))

    def stop_at_7(step, info, model):
        if step == 7:
            os.kill(os.getpid(), signal.SIGINT)

    part = finetune(student, data=data, out=root / "interrupted", on_step=stop_at_7, **API_RUN)
    assert part.status == "interrupted" and part.step == 7
    assert sorted(p.name for p in (root / "interrupted" / "checkpoints").iterdir()) == ["step-0000006", "step-0000007"]
    ref = finetune(student, data=data, out=root / "reference", **API_RUN)
    assert ref.status == "completed"
    return {"root": root, "teacher": teacher, "student": student, "data": data,
            "interrupted": root / "interrupted", "reference": load_file(str(root / "reference" / "model.safetensors"))}


def _resume_args(base, out: Path) -> list:
    return ["finetune", base["student"], "--data", base["data"], "--out", out, "--resume", *RUN]


def _clean(folder: Path) -> None:
    """No staging debris and no lock file left beside or inside the run folder."""
    assert debris(folder) == [] and debris(folder.parent) == [], (debris(folder), debris(folder.parent))
    assert not (folder.parent / f".{folder.name}.lock").exists()


# ------------------------------------------------------------------------------ damaged checkpoints


def _state(ckpt: Path) -> dict:
    return json.loads((ckpt / "state.json").read_text())


def _write_state(ckpt: Path, state: dict) -> None:
    (ckpt / "state.json").write_text(json.dumps(state))


def _record(ckpt: Path, name: str) -> None:
    """Record a deliberately rewritten file's size and digest in state.json, so that what is tested
    is the reader, not the digest check."""
    st, f = _state(ckpt), ckpt / name
    st["files"][name] = {"bytes": f.stat().st_size, "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
    _write_state(ckpt, st)


def _truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _flip(f: Path) -> None:
    b = bytearray(f.read_bytes())
    mid = len(b) // 2
    b[mid:mid + 16] = bytes(x ^ 0x5A for x in b[mid:mid + 16])
    f.write_bytes(bytes(b))


class _Payload:
    """A pickle that runs a shell command when unpickled (weights_only=True must refuse it)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _dmg_state_not_json(c, tmp):
    (c / "state.json").write_text('{"step": 7, "tokens": ')


def _dmg_state_missing_keys(c, tmp):
    st = _state(c)
    del st["scheduler"]
    _write_state(c, st)


def _dmg_state_bad_types(c, tmp):
    _write_state(c, {**_state(c), "step": "seven"})


def _dmg_state_step_mismatch(c, tmp):
    _write_state(c, {**_state(c), "step": 3})


def _dmg_state_missing(c, tmp):
    (c / "state.json").unlink()


def _dmg_model_truncated(c, tmp):
    _truncate(c / "model.safetensors")


def _dmg_model_bytes_flipped(c, tmp):
    _flip(c / "model.safetensors")


def _dmg_model_truncated_no_digests(c, tmp):  # a checkpoint without recorded digests: the reader itself
    st = _state(c)
    del st["files"]
    _write_state(c, st)
    _truncate(c / "model.safetensors")


def _dmg_model_missing(c, tmp):
    (c / "model.safetensors").unlink()


def _dmg_optimizer_garbage(c, tmp):
    (c / "optimizer.pt").write_bytes(os.urandom(4096))
    _record(c, "optimizer.pt")


def _dmg_optimizer_pickle_payload(c, tmp):
    torch.save({"state": {}, "param_groups": [_Payload(tmp / "PWNED")]}, c / "optimizer.pt")
    _record(c, "optimizer.pt")


def _dmg_optimizer_wrong_shapes(c, tmp):
    opt = torch.load(c / "optimizer.pt", weights_only=True)
    first = next(iter(opt["state"].values()))
    first["exp_avg"] = torch.zeros(3, 3, 3)
    torch.save(opt, c / "optimizer.pt")
    _record(c, "optimizer.pt")


def _dmg_rng_not_a_generator_state(c, tmp):
    torch.save({"torch": torch.zeros(5)}, c / "rng-0.pt")
    _record(c, "rng-0.pt")


DAMAGE = {  # id: (damage, what the warning must say)
    "state-not-json": (_dmg_state_not_json, "state.json is not valid JSON"),
    "state-missing-keys": (_dmg_state_missing_keys, "state.json has no 'scheduler'"),
    "state-bad-types": (_dmg_state_bad_types, "'step' is 'seven'"),
    "state-step-mismatch": (_dmg_state_step_mismatch, "says step 3 in the folder of step 7"),
    "state-missing": (_dmg_state_missing, "state.json is missing"),
    "model-truncated": (_dmg_model_truncated, "model.safetensors is truncated"),
    "model-bytes-flipped": (_dmg_model_bytes_flipped, "model.safetensors is corrupt"),
    "model-truncated-no-digests": (_dmg_model_truncated_no_digests, "not a readable safetensors file"),
    "model-missing": (_dmg_model_missing, "model.safetensors is missing"),
    "optimizer-garbage": (_dmg_optimizer_garbage, "optimizer.pt is not a readable torch file"),
    "optimizer-pickle-payload": (_dmg_optimizer_pickle_payload, "optimizer.pt holds Python objects other than tensors"),
    "optimizer-wrong-shapes": (_dmg_optimizer_wrong_shapes, "has shape (3, 3, 3)"),
    "rng-not-a-generator-state": (_dmg_rng_not_a_generator_state, "rng-0.pt is not a random-number generator state"),
}


@pytest.mark.hostile("resume")
@pytest.mark.parametrize("case", list(DAMAGE))
def test_resume_falls_back_past_a_damaged_newest_checkpoint(base, tmp_path, monkeypatch, capsys, case):
    damage, needle = DAMAGE[case]
    work = tmp_path / "run"
    shutil.copytree(base["interrupted"], work)
    damage(work / "checkpoints" / "step-0000007", tmp_path)
    code, _, err = run_cli(_resume_args(base, work), monkeypatch, capsys)
    assert code == 0, err
    warning = [ln for ln in err.splitlines() if "step-0000007 is damaged" in ln]
    assert len(warning) == 1 and needle in warning[0] and "falling back to step-0000006" in warning[0], err
    assert "Traceback" not in err and "error:" not in err
    assert re.search(r"resumed from \S*step-0000006 \(step 6 of 8", err), err
    out = load_file(str(work / "model.safetensors"))  # the resumed run is the uninterrupted one
    assert out.keys() == base["reference"].keys()
    for k, v in base["reference"].items():
        torch.testing.assert_close(out[k], v, rtol=1e-5, atol=1e-6, msg=k)
    assert not (tmp_path / "PWNED").exists()  # nothing was unpickled
    _clean(work)


@pytest.mark.hostile("resume")
def test_resume_with_no_intact_checkpoint_is_one_line_and_changes_nothing(base, tmp_path, monkeypatch, capsys):
    work = tmp_path / "run"
    shutil.copytree(base["interrupted"], work)
    _dmg_state_not_json(work / "checkpoints" / "step-0000007", tmp_path)
    _dmg_model_truncated(work / "checkpoints" / "step-0000006", tmp_path)
    before = tree_digest(work)
    code, _, err = run_cli(_resume_args(base, work), monkeypatch, capsys)
    line = refused(code, err, "no intact checkpoint", exit_code=2)
    assert "step-0000007/state.json is not valid JSON" in line and "step-0000006/model.safetensors is truncated" in line
    assert tree_digest(work) == before
    _clean(work)


@pytest.mark.hostile("readers")
def test_a_damaged_state_json_is_one_line_naming_the_file(base, tmp_path, monkeypatch, capsys):
    work = tmp_path / "run"
    shutil.copytree(base["interrupted"], work)
    shutil.rmtree(work / "checkpoints" / "step-0000006")
    state = work / "checkpoints" / "step-0000007" / "state.json"
    state.write_bytes(b"\xff\xfe not utf-8 \x00")
    before = tree_digest(work)
    code, _, err = run_cli(_resume_args(base, work), monkeypatch, capsys)
    line = refused(code, err, f"{state} is not valid JSON", exit_code=2)
    assert line.count("\n") == 0 and tree_digest(work) == before
    _clean(work)


@pytest.mark.hostile("resume")
def test_damaged_checkpoints_skipped_on_resume_do_not_outlive_the_good_ones(base, tmp_path, monkeypatch, capsys):
    """Pruning keeps the newest checkpoints by step: damaged ones newer than the resumed step must
    go when the resumed run saves, or they would push out every good one (here with keep 1)."""
    from normswap.training.checkpoint import read_state

    work = tmp_path / "run"
    shutil.copytree(base["interrupted"], work)
    ckpts = work / "checkpoints"
    _dmg_state_not_json(ckpts / "step-0000007", tmp_path)
    shutil.copytree(ckpts / "step-0000007", ckpts / "step-0000009")  # say, from a longer run
    args = ["finetune", base["student"], "--data", base["data"], "--out", work, "--resume", "--steps", "8",
            "--save-every", "1", "--keep-checkpoints", "1", "--retain-checkpoints", *FAST]  # neither changes the data order or schedule
    code, _, err = run_cli(args, monkeypatch, capsys)
    assert code == 0, err
    assert "step-0000009 is damaged" in err and "step-0000007 is damaged" in err
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-0000008"]  # the good, newest one
    assert read_state(ckpts / "step-0000008")["step"] == 8
    _clean(work)


@pytest.mark.hostile("resume")
def test_nan_loss_advice_is_a_command_that_works(base, tmp_path, monkeypatch, capsys):
    """A learning rate that blows the tiny model up; the error's advice, followed to the letter, succeeds."""
    out = tmp_path / "nan"
    args = ["finetune", base["student"], "--data", base["data"], "--out", out, "--steps", "4", "--save-every", "3",
            "--warmup", "0", *FAST]
    code, _, err = run_cli([*args, "--lr", "1e6"], monkeypatch, capsys)
    line = refused(code, err, "became nan", exit_code=3)
    assert "--overwrite" in line and "step-0000003" in line
    advised = re.search(r"--lr (\S+)", line).group(1)
    assert float(advised) == pytest.approx(1e5)
    code, _, err = run_cli([*args, "--lr", advised, "--overwrite"], monkeypatch, capsys)
    assert code == 0, err
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    _clean(out)


# ----------------------------------------------------------------------------- one run per folder


def _lock_file(folder: Path) -> Path:
    return folder.parent / f".{folder.name}.lock"


def _write_lock(folder: Path, pid: int, host: str | None = None, what: str = "finetune") -> Path:
    lock = _lock_file(folder)
    lock.write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "what": what,
                                "started": "2024-01-01T00:00:00+0000"}) + "\n")
    return lock


@pytest.fixture
def live_pid():
    proc = subprocess.Popen(["sleep", "300"])
    yield proc.pid
    proc.kill()
    proc.wait()


@pytest.fixture
def dead_pid():
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.mark.hostile("lock")
def test_second_finetune_process_refuses_a_folder_in_use(base, tmp_path, live_pid):
    """A real second process: `python -m normswap finetune` while another live process holds the lock."""
    out = tmp_path / "busy"
    lock = _write_lock(out, live_pid)
    held = lock.read_bytes()
    before = tree_digest(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "normswap", "finetune", str(base["student"]), "--data", str(base["data"]),
                           "--out", str(out), "--steps", "2", *FAST], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    line = refused(proc.returncode, proc.stderr, f"pid {live_pid}", exit_code=2)
    assert "in use" in line and str(lock) in line
    assert lock.read_bytes() == held and tree_digest(tmp_path) == before and not out.exists()


@pytest.mark.hostile("lock")
def test_second_recipe_run_refuses_a_run_folder_in_use(base, tmp_path, monkeypatch, capsys, live_pid):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(f"name: tiny\nmodel: {base['teacher']}\neval:\n  ppl:\n    data: {base['data']}\n    max_length: 16\n")
    runs = tmp_path / "runs"
    runs.mkdir()
    lock = _write_lock(runs / "tiny", live_pid, what="recipe run")
    before = tree_digest(tmp_path)
    code, _, err = run_cli(["recipe", "run", recipe, "--output-dir", runs], monkeypatch, capsys)
    line = refused(code, err, f"pid {live_pid}", exit_code=2)
    assert "recipe run" in line and tree_digest(tmp_path) == before and lock.is_file()


@pytest.mark.hostile("lock")
def test_a_lock_held_by_this_process_is_refused_by_another_process(base, tmp_path):
    from normswap.locking import folder_lock

    out = tmp_path / "mine"
    with folder_lock(out, "finetune") as lock:
        assert lock == _lock_file(out) and json.loads(lock.read_text())["pid"] == os.getpid()
        proc = subprocess.run([sys.executable, "-m", "normswap", "finetune", str(base["student"]), "--data", str(base["data"]),
                               "--out", str(out), "--steps", "2", *FAST], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
        refused(proc.returncode, proc.stderr, f"pid {os.getpid()}", exit_code=2)
    assert not _lock_file(out).exists() and not out.exists()


@pytest.mark.hostile("lock")
def test_a_stale_lock_is_reported_and_taken_over(base, tmp_path, monkeypatch, capsys, dead_pid):
    out = tmp_path / "stale"
    _write_lock(out, dead_pid)
    code, _, err = run_cli(["finetune", base["student"], "--data", base["data"], "--out", out, "--steps", "2", *FAST],
                           monkeypatch, capsys)
    assert code == 0, err
    assert re.search(rf"taking over the stale lock .*pid {dead_pid}\b.*no longer running", err), err
    assert (out / "config.json").is_file()
    _clean(out)


@pytest.mark.hostile("lock")
def test_an_unreadable_lock_file_is_taken_over(tmp_path):
    from normswap.locking import folder_lock

    out = tmp_path / "x"
    _lock_file(out).write_bytes(b"")  # a run killed between creating the file and writing it
    t = time.monotonic()
    with folder_lock(out, "finetune") as lock:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert time.monotonic() - t < 5 and not _lock_file(out).exists()


@pytest.mark.hostile("lock")
def test_a_lock_from_another_host_is_respected(tmp_path):
    from normswap.locking import FolderLocked, folder_lock

    out = tmp_path / "nfs"
    lock = _write_lock(out, 12345, host="elsewhere.example")
    with pytest.raises(FolderLocked, match=r"pid 12345 on elsewhere\.example") as err:
        with folder_lock(out, "finetune"):
            pass
    assert "\n" not in str(err.value) and lock.is_file()


@pytest.mark.hostile("lock")
def test_the_same_process_cannot_lock_a_folder_twice(tmp_path):
    from normswap.locking import FolderLocked, folder_lock

    with folder_lock(tmp_path / "a", "recipe run"):
        with pytest.raises(FolderLocked, match=f"pid {os.getpid()}"):
            with folder_lock(tmp_path / "a", "finetune"):
                pass
        with folder_lock(tmp_path / "b", "finetune"):  # another folder is fine
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.hostile("lock")
def test_a_lock_path_that_is_a_folder_is_one_line(base, tmp_path, monkeypatch, capsys):
    out = tmp_path / "weird"
    _lock_file(out).mkdir()
    before = tree_digest(tmp_path)
    code, _, err = run_cli(["finetune", base["student"], "--data", base["data"], "--out", out, "--steps", "2", *FAST],
                           monkeypatch, capsys)
    refused(code, err, "cannot lock", exit_code=2)
    assert tree_digest(tmp_path) == before


@pytest.mark.hostile("lock")
def test_a_refused_run_leaves_no_lock_and_no_folders(base, tmp_path, monkeypatch, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    out = tmp_path / "new" / "deeper" / "out"  # parents that do not exist yet
    before = tree_digest(tmp_path)
    code, _, err = run_cli(["finetune", base["student"], "--data", empty, "--out", out, "--steps", "2", *FAST],
                           monkeypatch, capsys)
    refused(code, err, "empty", exit_code=2)
    assert tree_digest(tmp_path) == before and not (tmp_path / "new").exists()


# ------------------------------------------------------------------------------------ recipe YAML


def _laughs(levels: int = 9) -> str:
    lines = ["name: lol", "model: gpt2", 'x-a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    names = "abcdefghijklmnop"
    for i in range(1, levels):
        ref = f"*{names[i - 1]}"
        lines.append(f"x-{names[i]}: &{names[i]} [{','.join([ref] * 9)}]")
    return "\n".join(lines) + "\n"


YAML_BOMBS = {  # id: (recipe text, what the error line must say)
    "billion-laughs": (_laughs(), "aliases expand to more than 100,000 values"),
    "recursive-alias": ("name: r\nmodel: gpt2\nx-loop: &a [1, *a]\n", "contains it"),
    "recursive-mapping": ("name: r\nmodel: gpt2\nconvert: &c {to: dyt, more: *c}\n", "contains it"),
    "deep-nesting": ("name: d\nmodel: gpt2\nx-deep: " + "[" * 60 + "]" * 60 + "\n", "nested more than 50 levels"),
    "very-deep-nesting": ("name: d\nmodel: gpt2\nx-deep: " + "[" * 100_000 + "]" * 100_000 + "\n", "nested more than 50 levels"),
    "deep-through-aliases": ("name: d\nmodel: gpt2\nx-0: &l0 [[[[[[[[[[1]]]]]]]]]]\n"
                             + "".join(f"x-{i}: &l{i} [[[[[[[[[[*l{i - 1}]]]]]]]]]]\n" for i in range(1, 8)),
                             "levels deep (through aliases)"),
    "long-scalar-aliased": ("name: s\nmodel: gpt2\nx-s: &s " + "y" * 200_000 + "\nx-l: &l [" + ",".join(["*s"] * 60) + "]\n"
                            + "x-m: [" + ",".join(["*l"] * 2) + "]\n", "10,000,000 characters"),
    "mapping-bomb-via-merge-key": ("name: m\nmodel: gpt2\nx-a: &a {k0: [1,2,3,4,5,6,7,8,9,10]}\n"
                       + "".join(f"x-{i}: &m{i} {{a: *{'a' if i == 1 else f'm{i - 1}'}, b: *{'a' if i == 1 else f'm{i - 1}'}, "
                                 f"c: *{'a' if i == 1 else f'm{i - 1}'}, d: *{'a' if i == 1 else f'm{i - 1}'}}}\n" for i in range(1, 12))
                       + "convert:\n  <<: *m11\n  to: dyt\n", "aliases expand"),
}


@pytest.mark.hostile("recipe-yaml")
@pytest.mark.parametrize("case", list(YAML_BOMBS))
def test_recipe_yaml_bombs_are_refused_quickly(tmp_path, monkeypatch, capsys, case):
    text, needle = YAML_BOMBS[case]
    recipe = tmp_path / f"{case}.yaml"
    recipe.write_text(text)
    if case == "billion-laughs":
        assert len(text.encode()) < 450
    before = tree_digest(tmp_path)
    t = time.monotonic()
    code, _, err = run_cli(["recipe", "validate", recipe, "--no-check-files"], monkeypatch, capsys)
    assert time.monotonic() - t < 10
    line = refused(code, err, needle, exit_code=2)
    assert str(recipe) in line and "RecursionError" not in err
    assert tree_digest(tmp_path) == before


@pytest.mark.hostile("recipe-yaml")
def test_a_huge_recipe_file_is_refused_without_parsing(tmp_path, monkeypatch, capsys):
    recipe = tmp_path / "huge.yaml"
    recipe.write_text("name: h\nmodel: gpt2\n" + "# padding\n" * 300_000)
    t = time.monotonic()
    code, _, err = run_cli(["recipe", "validate", recipe], monkeypatch, capsys)
    assert time.monotonic() - t < 5
    refused(code, err, "larger than 1 MiB", exit_code=2)


@pytest.mark.hostile("recipe-yaml")
def test_an_override_alias_bomb_is_refused(tmp_path, monkeypatch, capsys):
    recipe = tmp_path / "ok.yaml"
    recipe.write_text("name: ok\nmodel: gpt2\nconvert: {to: dyt}\n")
    bomb = "[" + ",".join(f"&{c} [" + ",".join(["*" + p] * 9) + "]" if p else f"&{c} [1,1,1,1,1,1,1,1,1]"
                          for c, p in zip("abcdefghi", [""] + list("abcdefgh"))) + "]"
    t = time.monotonic()
    code, _, err = run_cli(["recipe", "validate", recipe, f"convert.calib_text={bomb}"], monkeypatch, capsys)
    assert time.monotonic() - t < 10
    refused(code, err, "override", exit_code=2)
    assert "aliases expand" in err


@pytest.mark.hostile("recipe-yaml")
def test_recipe_run_of_a_bomb_writes_nothing(tmp_path, monkeypatch, capsys):
    recipe = tmp_path / "lol.yaml"
    recipe.write_text(_laughs())
    before = tree_digest(tmp_path)
    code, _, err = run_cli(["recipe", "run", recipe, "--output-dir", tmp_path / "runs"], monkeypatch, capsys)
    refused(code, err, "aliases expand", exit_code=2)
    assert tree_digest(tmp_path) == before and not (tmp_path / "runs").exists()


@pytest.mark.hostile("recipe-yaml")
def test_recipe_ls_lists_a_bomb_as_invalid_and_carries_on(tmp_path, monkeypatch, capsys):
    (tmp_path / "lol.yaml").write_text(_laughs())
    (tmp_path / "fine.yaml").write_text("name: fine\nmodel: gpt2\nconvert: {to: rmsnorm}\n")
    monkeypatch.setenv("NORMSWAP_RECIPES", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    t = time.monotonic()
    code, out, err = run_cli(["recipe", "ls", "--format", "json"], monkeypatch, capsys)
    assert code == 0 and time.monotonic() - t < 20, err
    rows = {r["name"]: r for r in json.loads(out)}
    assert "aliases expand" in rows["lol"]["error"] and rows["fine"]["error"] is None


def test_ordinary_aliases_and_merge_keys_still_work(tmp_path):
    from normswap.recipes import load_recipe

    recipe = tmp_path / "anchors.yaml"
    recipe.write_text("name: a\nx-conv: &conv {to: dyt, calib_tokens: 512}\nx-ppl: &ppl {data: wikitext:x, max_length: 64}\n"
                      "runs:\n  - {name: one, model: gpt2, convert: *conv, eval: {ppl: *ppl}}\n"
                      "  - name: two\n    model: gpt2\n    convert:\n      <<: *conv\n      to: rmsnorm\n")
    r = load_recipe(recipe, check_files=False)
    assert [j.convert.to for j in r.jobs] == ["dyt", "rmsnorm"] and r.jobs[1].convert.calib_tokens == 512
