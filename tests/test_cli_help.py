"""Help texts as a user reads them, without a terminal and at any width: every default shows, the
defaults written into help strings ("[default: ...]") survive, and `--threads` says when fewer
threads are faster."""
from __future__ import annotations

import re

import click
import pytest
import typer
from typer.testing import CliRunner

from cli_util import run_cli
from normswap.cli import app

THREADS_COMMANDS = [["inspect"], ["convert"], ["eval"], ["finetune"], ["recipe", "run"]]


def _commands() -> list[tuple[list[str], click.Command]]:
    """Every leaf command of the app with its argument path (["recipe", "run"], ...)."""
    out = []

    def walk(cmd: click.Command, path: list[str]) -> None:
        if isinstance(cmd, click.Group) or hasattr(cmd, "commands"):
            for name, sub in cmd.commands.items():
                walk(sub, [*path, name])
        else:
            out.append((path, cmd))

    walk(typer.main.get_command(app), [])
    return out


COMMANDS = _commands()


def help_text(args: list[str], columns: int = 80) -> str:
    res = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": str(columns)})
    assert res.exit_code == 0, res.output
    return res.output


def flat(text: str) -> str:
    """Help text with its line wrapping undone: one space where the formatter broke a line, none
    after a hyphen it broke at ("spin-" / "wait")."""
    return " ".join(re.sub(r"(?<=\w)-\n\s*", "-", text).split())


def option_entries(text: str) -> dict[str, str]:
    """Each option's help entry (its name, metavar and wrapped help joined into one line), keyed by its long name."""
    entries: dict[str, str] = {}
    current = None
    for line in text.split("Options:", 1)[1].splitlines():
        m = re.match(r"^  (?:-\w, )?(--[\w-]+)", line)
        if m:
            current = m.group(1)
            entries[current] = line
        elif current and line.startswith("    "):
            entries[current] += "\n" + line
    return {k: flat(v) for k, v in entries.items()}


def test_all_commands_are_found():
    names = {" ".join(p) for p, _ in COMMANDS}
    assert {"inspect", "archs", "convert", "eval", "finetune", "push", "recipe ls", "recipe validate", "recipe run"} <= names


@pytest.mark.parametrize("columns", [40, 200])
def test_eval_help_keeps_written_defaults(columns):
    text = help_text(["eval"], columns)
    assert "[default: the model's positions, at most 1024]" in flat(text)
    assert "[default: --max-length]" in flat(text)
    assert "Window length in tokens ." not in flat(text)
    assert not set("╭│╰─") & set(text)  # plain text: no boxes to break a pipe or a narrow screen


@pytest.mark.parametrize("path,cmd", COMMANDS, ids=[" ".join(p) for p, _ in COMMANDS])
def test_every_default_is_shown(path, cmd):
    """Each option's help ends with its default: given by the code (Typer shows it) or written in
    the help string as "[default: ...]" (which must be printed as written)."""
    entries = option_entries(help_text(path, 60))
    for param in cmd.params:
        if not isinstance(param, click.Option) or param.hidden or "--help" in param.opts:
            continue
        long = next(o for o in param.opts if o.startswith("--"))
        entry = entries[long]
        written = re.findall(r"\[default: [^\]]*\]", param.help or "")
        for w in written:
            assert flat(w) in entry, (long, entry)
        no_default = param.default is None or (param.is_flag and not param.secondary_opts and param.default is False)
        if not no_default:
            assert "[default: " in entry, (long, entry)


def test_ordinary_defaults_show_their_values():
    convert = option_entries(help_text(["convert"]))
    assert "[default: 4096]" in convert["--calib-tokens"]
    assert "[default: fold]" in convert["--fold"]
    assert "[default: a built-in sample]" in convert["--calib-text"]
    finetune = option_entries(help_text(["finetune"]))
    assert "[default: 0.0003]" in finetune["--lr"] and "[default: 8]" in finetune["--batch-size"]
    assert "[default: min(256, model max)]" in finetune["--block-size"]
    assert "[default: human]" in option_entries(help_text(["archs"]))["--format"]


@pytest.mark.parametrize("path", THREADS_COMMANDS, ids=" ".join)
def test_threads_help_explains_spin_waiting(path):
    entry = option_entries(help_text(path, 60))["--threads"]
    for words in ("spin-wait", "one or two threads can be faster than all cores", "OMP_NUM_THREADS", "all cores"):
        assert words in entry, (words, entry)


def test_no_command_prints_the_help_not_an_error(monkeypatch, capsys):
    code, out, err = run_cli([], monkeypatch, capsys)
    assert code == 2 and out == ""
    assert err.startswith("Usage: normswap") and "Commands:" in err and "error:" not in err
    code, out, err = run_cli(["recipe"], monkeypatch, capsys)
    assert code == 2 and "Usage: normswap recipe" in err and "run" in err and "error:" not in err


def test_version_and_help_exit_zero(monkeypatch, capsys):
    code, out, err = run_cli(["--version"], monkeypatch, capsys)
    assert code == 0 and out.startswith("normswap ")
    code, out, err = run_cli(["--help"], monkeypatch, capsys)
    assert code == 0 and "Commands:" in out and err == ""
