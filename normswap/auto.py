"""Registration of the "normswap" model type with transformers' Auto classes.

A converted folder says `model_type: normswap`; after `import normswap`, AutoConfig and the Auto
model classes below route it to `normswap.load`, which rebuilds the base architecture with the
recorded changes and loads strictly.
"""
from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

# Every Auto class whose base class a converted source may have had (a speech encoder-decoder is
# loaded through AutoModelForSpeechSeq2Seq, a T5-style one through AutoModelForSeq2SeqLM...).
_AUTO_NAMES = (
    "AutoModel", "AutoModelForCausalLM", "AutoModelForMaskedLM", "AutoModelForSequenceClassification",
    "AutoModelForImageClassification", "AutoModelForTokenClassification", "AutoModelForQuestionAnswering",
    "AutoModelForMultipleChoice", "AutoModelForSeq2SeqLM", "AutoModelForSpeechSeq2Seq", "AutoModelForCTC",
    "AutoModelForAudioClassification", "AutoModelForPreTraining",
)


class NormswapConfig(PretrainedConfig):
    """Config of a converted checkpoint: the base config's fields plus the `normswap` record."""

    model_type = "normswap"


def _proxy(auto_name: str) -> type:
    def from_pretrained(cls, path: Any, *args: Any, config: Any = None, **kwargs: Any) -> Any:
        import transformers

        from normswap.loading import load

        allow_new_head = auto_name not in ("AutoModel",)
        # The dtype asked for (PEFT's AutoPeft classes and sentence-transformers pass one); the
        # other from_pretrained options (device maps, revisions of a local folder) do not apply.
        return load(path, auto_class=getattr(transformers, auto_name), allow_new_head=allow_new_head, dtype=_dtype_arg(kwargs))

    return type(f"Normswap{auto_name[4:] or 'Model'}", (), {
        "config_class": NormswapConfig,
        "from_pretrained": classmethod(from_pretrained),
        "__doc__": f"{auto_name} entry for normswap checkpoints: delegates to normswap.load.",
    })


def _dtype_arg(kwargs: dict[str, Any]) -> Any:
    """The dtype a from_pretrained call asks for (PEFT's AutoPeft classes and sentence-transformers
    pass one), as normswap.load takes it; the other options (device maps, a local folder's
    revision) do not apply to a converted checkpoint."""
    import torch

    dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
    if isinstance(dtype, str):
        dtype = None if dtype == "auto" else getattr(torch, dtype)
    return dtype


def _route_concrete_classes() -> None:
    """`LlamaForCausalLM.from_pretrained(converted_folder)` (what PEFT's AutoPeft classes call for
    an adapter saved without a task type, and what people type) would build the plain class and
    re-initialise the norms it cannot find, with a warning at most: silently wrong. After `import
    normswap`, a local folder written by normswap goes to `normswap.load` instead, for every
    model class; anything else is transformers' own from_pretrained, untouched."""
    from pathlib import Path

    from transformers import PreTrainedModel

    original = PreTrainedModel.__dict__["from_pretrained"].__func__
    if getattr(original, "_normswap_routed", False):
        return

    def from_pretrained(cls: Any, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> Any:
        from normswap.loading import is_converted, load, read_record

        path = pretrained_model_name_or_path
        if isinstance(path, (str, Path)) and Path(path).is_dir() and kwargs.get("config") is None and is_converted(path):
            record, _ = read_record(path)
            return load(path, auto_class=cls, allow_new_head=cls.__name__ != record.architecture, dtype=_dtype_arg(kwargs))
        return original(cls, pretrained_model_name_or_path, *args, **kwargs)

    from_pretrained.__doc__ = original.__doc__
    from_pretrained._normswap_routed = True  # type: ignore[attr-defined]
    PreTrainedModel.from_pretrained = classmethod(from_pretrained)


_done = False


def register() -> None:
    """Idempotently register the normswap model type with transformers' Auto classes."""
    global _done
    if _done:
        return
    import transformers
    from transformers import AutoConfig

    AutoConfig.register("normswap", NormswapConfig, exist_ok=True)
    for name in _AUTO_NAMES:
        auto = getattr(transformers, name, None)
        if auto is not None:  # not every transformers version has every Auto class
            auto.register(NormswapConfig, _proxy(name), exist_ok=True)
    _route_concrete_classes()
    _done = True
