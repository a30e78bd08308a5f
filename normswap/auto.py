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
        return load(path, auto_class=getattr(transformers, auto_name), allow_new_head=allow_new_head)

    return type(f"Normswap{auto_name[4:] or 'Model'}", (), {
        "config_class": NormswapConfig,
        "from_pretrained": classmethod(from_pretrained),
        "__doc__": f"{auto_name} entry for normswap checkpoints: delegates to normswap.load.",
    })


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
    _done = True
