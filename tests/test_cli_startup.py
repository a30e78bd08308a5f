"""Start-up of the command line: `--help`, `--version` and `archs` import neither torch nor
transformers; the commands that compute set torch's threads (`--threads`) and register the
"normswap" model type before any work; a library `import normswap` keeps its eager registration."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from cli_util import refused, run_cli

HEAVY = ("torch", "transformers")


def imported_modules(*args: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run `python -X importtime -m normswap ARGS`; return the process and the modules it imported."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "normswap", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    names = {ln.rsplit("|", 1)[-1].strip() for ln in proc.stderr.splitlines() if ln.startswith("import time:")}
    assert names, proc.stderr[-2000:]  # the importtime report is there, so an absent name means not imported
    return proc, names


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["archs"], ["archs", "--format", "json"], ["eval", "--help"],
                                  ["convert", "--help"], ["recipe", "run", "--help"]])
def test_light_commands_import_no_torch(args):
    proc, names = imported_modules(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    heavy = sorted(n for n in names if n.split(".")[0] in HEAVY)
    assert not heavy, f"normswap {' '.join(args)} imported {heavy[:5]}"
    assert "normswap.cli" in names
    if args[0] == "archs" and "json" in args:
        stdout = proc.stdout
        assert {"gpt2", "llama", "whisper", "bert"} <= {f["model_type"] for f in json.loads(stdout)}


def test_archs_lists_the_same_tables_as_the_plan_module():
    """`archs` describes the families with the torch-free helper; plan.describe_family is the same function."""
    from normswap.archs import describe_family, families, get_family
    from normswap.archs import plan

    assert plan.describe_family is describe_family
    gpt2 = describe_family(get_family("gpt2"))
    assert gpt2["norms"] == ["ln_1", "ln_2", "ln_f"] and gpt2["style"] == "pre"
    assert any(describe_family(f)["flag_dependent"] for f in families())  # OPT / Falcon variants


CLI_MODE_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.argv = ["normswap"]  # as the console script: normswap.interrupts.launched_as_cli() is true
    import normswap
    out = {"torch_at_import": "torch" in sys.modules, "transformers_at_import": "transformers" in sys.modules}
    from normswap import load, save, load_pretrained  # resolved lazily
    import normswap.loading
    out["lazy_names"] = load is normswap.loading.load and save is normswap.loading.save and load_pretrained is normswap.loading.load_pretrained
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    out["registered_before"] = "normswap" in CONFIG_MAPPING
    import torch
    from normswap.commands.common import setup_runtime
    setup_runtime()
    out["threads_default"] = torch.get_num_threads()
    setup_runtime(2)
    out["threads_2"] = torch.get_num_threads()
    out["interop_2"] = torch.get_num_interop_threads()
    out["registered_after"] = "normswap" in CONFIG_MAPPING
    print(json.dumps(out))
""")


def test_cli_mode_is_lazy_and_setup_runtime_registers_and_sets_threads():
    proc = subprocess.run([sys.executable, "-c", CLI_MODE_SCRIPT], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["torch_at_import"] is False and out["transformers_at_import"] is False
    assert out["lazy_names"] is True
    assert out["registered_before"] is False and out["registered_after"] is True
    assert out["threads_default"] == 1  # no --threads: OMP_NUM_THREADS is honoured
    assert out["threads_2"] == 2 and out["interop_2"] == 2


def test_library_import_registers_eagerly():
    """The test process imported normswap as a library: the Auto classes know the model type, and
    the top-level names are the loading module's."""
    import normswap
    import normswap.loading
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    assert "normswap" in CONFIG_MAPPING
    from normswap import load, load_pretrained, save

    assert (load, load_pretrained, save) == (normswap.loading.load, normswap.loading.load_pretrained, normswap.loading.save)
    with pytest.raises(AttributeError):
        normswap.no_such_name  # noqa: B018


class ThreadsSet(BaseException):
    """Raised by the patched torch.set_num_threads: the command applied --threads and stops there."""

    def __init__(self, n: int):
        super().__init__(n)
        self.n = n


def _raise(n: int) -> None:
    raise ThreadsSet(n)


# Every command that computes, with the arguments it needs to parse (none of them is reached:
# the threads are set before any work).
COMPUTING = {
    "inspect": ["inspect", "no-such-model"],
    "convert": ["convert", "no-such-model", "--to", "rmsnorm", "--out", "never-written"],
    "eval": ["eval", "no-such-model"],
    "finetune": ["finetune", "no-such-model", "--out", "never-written"],
    "recipe run": ["recipe", "run", "no-such-recipe.yaml"],
}


@pytest.mark.parametrize("command", list(COMPUTING))
def test_threads_is_applied_before_any_work(command, monkeypatch, capsys, tmp_path):
    import torch

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch, "set_num_threads", _raise)
    with pytest.raises(ThreadsSet) as got:
        run_cli([*COMPUTING[command], "--threads", "3"], monkeypatch, capsys)
    assert got.value.n == 3
    assert not (tmp_path / "never-written").exists()


def test_without_threads_torch_keeps_its_count(monkeypatch, capsys, tmp_path):
    import torch

    monkeypatch.setattr(torch, "set_num_threads", _raise)
    monkeypatch.setattr(torch, "set_num_interop_threads", _raise)
    code, out, err = run_cli(["inspect", str(tmp_path / "no-such-model")], monkeypatch, capsys)
    refused(code, err)  # the missing model, not a thread change


@pytest.mark.parametrize("value", ["0", "-1", "two"])
@pytest.mark.parametrize("command", ["inspect", "eval", "recipe run"])
def test_bad_threads_is_one_usage_error(command, value, monkeypatch, capsys):
    code, out, err = run_cli([*COMPUTING[command], "--threads", value], monkeypatch, capsys)
    line = refused(code, err, "--threads", exit_code=2)
    assert out == "" and len(err.strip().splitlines()) == 1, err
    assert line.startswith("error: ")


def test_interop_threads_fixed_already_is_not_an_error(monkeypatch):
    """torch allows set_num_interop_threads once per process: a second command in the same process
    keeps the first count and still sets the intra-op threads."""
    import torch

    from normswap.commands.common import apply_threads

    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)

    def fixed(n):
        raise RuntimeError("Error: cannot set number of interop threads after parallel work has started")

    monkeypatch.setattr(torch, "set_num_interop_threads", fixed)
    apply_threads(4)
    assert calls == [4]
