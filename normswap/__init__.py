"""normswap: normalisation surgery on pretrained transformers.

Library API (the CLI is a thin layer over it):

    import normswap
    report = normswap.inspect("path/or/hub-id")
    model, result = normswap.convert("gpt2", to="rmsnorm", fold=True)
    normswap.save(model, "gpt2-rms", result.record)
    model = normswap.load("gpt2-rms")

Importing normswap also registers the "normswap" model type with transformers' Auto classes, so
`AutoModelForCausalLM.from_pretrained("gpt2-rms")` rebuilds the converted model exactly.
"""
from __future__ import annotations

__version__ = "0.1.0"

from normswap import interrupts as _interrupts  # noqa: E402

if _interrupts.launched_as_cli():  # Ctrl-C during the slow imports below: one line, not a traceback
    _interrupts.install()
from normswap.errors import NormswapError  # noqa: E402
from normswap.loading import load, load_pretrained, save  # noqa: E402
from normswap.auto import register as _register_auto_classes  # noqa: E402

# Importing normswap registers the "normswap" model type with transformers' Auto classes.
_register_auto_classes()

def inspect(*args, **kwargs):  # noqa: A001 - mirrors the CLI verb
    """Describe a model's norm sites; see `normswap.inspection.inspect_model`."""
    from normswap.inspection import inspect_model

    return inspect_model(*args, **kwargs)


def convert(*args, **kwargs):
    """Convert a model's norms; see `normswap.conversion.convert_model`."""
    from normswap.conversion import convert_model

    return convert_model(*args, **kwargs)


__all__ = ["NormswapError", "convert", "inspect", "load", "load_pretrained", "save", "__version__"]
