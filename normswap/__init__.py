"""normswap: normalisation surgery on pretrained transformers.

Library API (the CLI is a thin layer over it):

    import normswap
    report = normswap.inspect("path/or/hub-id")
    model, result = normswap.convert("gpt2", to="rmsnorm", fold=True)
    normswap.save(model, "gpt2-rms", result.record)
    model = normswap.load("gpt2-rms")

Importing normswap also registers the "normswap" model type with transformers' Auto classes, so
`AutoModelForCausalLM.from_pretrained("gpt2-rms")` rebuilds the converted model exactly.

The `normswap` command imports this package too, but must answer `--help`, `--version` and
`archs` without torch (which alone takes seconds to import). Started as the command
(`normswap.interrupts.launched_as_cli()`), the package therefore imports nothing heavy: the
commands that load models register the Auto classes themselves before any work
(`normswap.commands.common.setup_runtime`), and `load` / `save` / `load_pretrained` resolve on
first use (the module `__getattr__` below). A library import keeps the eager registration: a
post-import hook on transformers would make it lazy there too, but it would run normswap's
registration (and torch's import) inside whatever import of transformers the user's code happens
to do next, and a failure there would surface in an unrelated line.
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

from normswap import interrupts as _interrupts  # noqa: E402
from normswap.errors import NormswapError  # noqa: E402

_LAZY = ("load", "load_pretrained", "save")  # from normswap.loading, which imports torch

if _interrupts.launched_as_cli():  # Ctrl-C during the slow imports that follow: one line, not a traceback
    _interrupts.install()
else:
    from normswap.loading import load, load_pretrained, save  # noqa: E402
    from normswap.auto import register as _register_auto_classes  # noqa: E402

    # Importing normswap registers the "normswap" model type with transformers' Auto classes.
    _register_auto_classes()


def __getattr__(name: str) -> Any:
    """`normswap.load` and friends in the command line process, where they are not imported eagerly."""
    if name in _LAZY:
        from normswap import loading

        return getattr(loading, name)
    raise AttributeError(f"module 'normswap' has no attribute {name!r}")


def inspect(*args, **kwargs):  # noqa: A001 - mirrors the CLI verb
    """Describe a model's norm sites; see `normswap.inspection.inspect_model`."""
    from normswap.inspection import inspect_model

    return inspect_model(*args, **kwargs)


def convert(*args, **kwargs):
    """Convert a model's norms; see `normswap.conversion.convert_model`."""
    from normswap.conversion import convert_model

    return convert_model(*args, **kwargs)


__all__ = ["NormswapError", "convert", "inspect", "load", "load_pretrained", "save", "__version__"]
