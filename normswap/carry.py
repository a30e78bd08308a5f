"""A converted model carries its conversion record, so that every way of saving it keeps the conversion.

`normswap.load`, `normswap.convert` and `normswap finetune` hand back models that carry their
record (`attach`). Saving goes through one of three doors, and each keeps the conversion:

- `model.save_pretrained(dir)`: what `push_to_hub`, transformers' `Trainer` / `Seq2SeqTrainer`
  checkpoints, `SentenceTransformer.save`, PEFT's `merge_and_unload().save_pretrained` and
  accelerate's documented `unwrap_model(m).save_pretrained(..., save_function=accelerator.save)`
  all call. The carried model's own `save_pretrained` writes the normswap format (weights, then
  config.json with `model_type: normswap`, the record and its integrity digest) into the folder,
  file by file, as transformers does: the folder may hold other files (a Trainer checkpoint's
  optimizer state).
- `model.config.save_pretrained(dir)` (beside weights written by accelerate's `save_model`, which
  writes no config): the carried config serialises as a normswap config too. The digest covers
  the tensors' names, dtypes and shapes, which the config takes from the model it belongs to; a
  config that has lost its model writes no digest, and `normswap.load` says so when it loads.
- `model.push_to_hub(repo)`: the Hub export (`normswap.export`): weights, the self-contained
  `modeling_normswap.py`, `auto_map` and the model card, so the repository loads with
  `trust_remote_code=True` without normswap, or with normswap installed.

`config.name_or_path` (and the model's `name_or_path`, which PEFT records as an adapter's base)
names the converted folder a model was loaded from or last saved to, never the original
LayerNorm model, so `AutoPeftModelForCausalLM.from_pretrained(adapter)` rebuilds the converted base.

Plain models (no record) are never touched: their `save_pretrained` is transformers' own.
"""
from __future__ import annotations

import json
import os
import tempfile
import types
import weakref
from pathlib import Path
from typing import Any

import torch
from torch import nn

from normswap.integrity import state_tensor_list
from normswap.record import ConversionRecord

_RECORD = "_normswap_record"  # on the config: the ConversionRecord it carries
_MODEL = "_normswap_model"  # on the config: a weak reference to the model it belongs to
_EXTRAS = "_normswap_extras"  # on the model: tokenizer, processor, the folder of its auxiliary files


class _Extras:
    """What `normswap.save` writes beside a model's weights: its tokenizer and processor, and the
    folder whose auxiliary files (tokenizer files, sentence-transformers pooling) it came with.
    Shared, not copied, by `copy.deepcopy` of the model: a copy has the same tokenizer."""

    def __init__(self, tokenizer: Any = None, processor: Any = None, aux_from: str | os.PathLike | None = None):
        self.tokenizer, self.processor, self.aux_from = tokenizer, processor, aux_from

    def __deepcopy__(self, memo: dict) -> "_Extras":
        return self


class _ModelRef:
    """A weak reference from a config to the model it belongs to, which follows `copy.deepcopy`
    of the model (the copy's config points at the copy) and is dropped by pickling."""

    def __init__(self, model: nn.Module | None):
        self._ref = weakref.ref(model) if model is not None else None

    def __call__(self) -> nn.Module | None:
        return self._ref() if self._ref is not None else None

    def __deepcopy__(self, memo: dict) -> "_ModelRef":
        model = self()
        return _ModelRef(memo.get(id(model), model) if model is not None else None)

    def __reduce__(self) -> Any:
        return (_ModelRef, (None,))


def record_of(model: nn.Module) -> ConversionRecord | None:
    """The conversion record `model` carries (None for a plain model)."""
    return getattr(getattr(model, "config", None), _RECORD, None)


def extras_of(model: nn.Module) -> _Extras:
    return getattr(model, _EXTRAS, None) or _Extras()


def attach(model: nn.Module, record: ConversionRecord, *, name_or_path: str | os.PathLike | None = None,
           tokenizer: Any = None, processor: Any = None, aux_from: str | os.PathLike | None = None) -> nn.Module:
    """Make `model` carry `record`: its config serialises as a normswap config and its
    `save_pretrained` / `push_to_hub` write normswap checkpoints (see the module docstring).

    `name_or_path` is the converted folder the model came from ("" for one not saved yet: never
    the original model's name). `tokenizer`, `processor` and `aux_from` are what `normswap.save`
    writes beside the weights when it is not given them."""
    config = model.config
    if not isinstance(config, CarriedConfig):
        config.__class__ = carried_config_class(type(config))
    config.__dict__[_RECORD] = record
    config.__dict__[_MODEL] = _ModelRef(model)
    old = extras_of(model)
    model.__dict__[_EXTRAS] = _Extras(tokenizer if tokenizer is not None else old.tokenizer,
                                      processor if processor is not None else old.processor,
                                      aux_from if aux_from is not None else old.aux_from)
    if name_or_path is not None:
        set_name_or_path(model, name_or_path)
    # Bound to this instance only: the class (and every plain model of it) keeps transformers' own.
    model.__dict__["save_pretrained"] = types.MethodType(_save_pretrained, model)
    model.__dict__["push_to_hub"] = types.MethodType(_push_to_hub, model)
    return model


def set_name_or_path(model: nn.Module, name: str | os.PathLike) -> None:
    """The folder a model is known by: `model.name_or_path` (what PEFT records as an adapter's
    base) and `config._name_or_path`."""
    model.config._name_or_path = str(name)
    model.name_or_path = str(name)


class CarriedConfig:
    """Mixed in before a model's own config class (see `carried_config_class`): the same config,
    whose `to_dict` leaves out what it carries and whose JSON form (config.json) is a normswap
    config. `to_dict` stays the base model type's, so code that reads `config.to_dict()["model_type"]`
    (PEFT's default LoRA targets, for one) still sees "bert" or "llama"."""

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()  # type: ignore[misc]
        for key in (_RECORD, _MODEL, "_normswap_source"):
            d.pop(key, None)
        return d

    def to_json_string(self, use_diff: bool = True) -> str:
        record = self.__dict__.get(_RECORD)
        if record is None:
            return super().to_json_string(use_diff)  # type: ignore[misc]
        ref = self.__dict__.get(_MODEL)
        model = ref() if ref is not None else None
        tensors = None
        if model is not None:
            state = unique_state(model)
            describe(record, model, state)
            tensors = state_tensor_list(state)
        return json.dumps(converted_config(self, record, tensors), indent=2, sort_keys=True, default=str) + "\n"

    # `type(config).from_pretrained(folder)` (PEFT reads an adapter's base config so) reads a
    # converted folder's config.json as the base config it holds: a plain one, carrying nothing.
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, **kwargs: Any) -> Any:
        base = _base_config_class(cls)
        config_dict, kwargs = base.get_config_dict(pretrained_model_name_or_path, **kwargs)
        return cls.from_dict(config_dict, **kwargs)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> Any:
        base = _base_config_class(cls)
        fields = dict(config_dict)
        record = fields.pop("normswap", None)
        if isinstance(record, dict):
            fields["model_type"] = record.get("base_model_type", base.model_type)
            fields["architectures"] = [record.get("architecture")]
        return base.from_dict(fields, **kwargs)

    def __reduce__(self) -> Any:  # the class is made at run time: pickle it as base class + state
        return (_rebuild_config, (_base_config_class(type(self)), dict(self.__dict__)))


_CLASSES: dict[type, type] = {}


def carried_config_class(base: type) -> type:
    """`base` (BertConfig, LlamaConfig...) with `CarriedConfig` mixed in; one class per base."""
    if base not in _CLASSES:
        _CLASSES[base] = type(base.__name__, (CarriedConfig, base), {"__module__": base.__module__, "__doc__": base.__doc__})
    return _CLASSES[base]


def _base_config_class(cls: type) -> type:
    return next(c for c in cls.__mro__[1:] if c is not CarriedConfig and not issubclass(c, CarriedConfig))


def _rebuild_config(base: type, state: dict[str, Any]) -> Any:
    config = base.__new__(base)
    config.__dict__.update(state)
    if _RECORD in state:
        config.__class__ = carried_config_class(base)
    return config


def converted_config(config: Any, record: ConversionRecord, tensors: list[Any] | None) -> dict[str, Any]:
    """The config.json of a converted checkpoint: the base config, model_type "normswap", the
    record (validated as `normswap.load` will read it) and its digest over the record and
    `tensors` (the saved tensors' names, dtypes and shapes; None: no digest)."""
    from normswap.integrity import record_digest
    from normswap.loading import MODEL_TYPE

    as_read = json.loads(json.dumps({**record.to_dict(), "digest": None}, default=str))
    checked = ConversionRecord.from_dict(as_read, where="the record being saved").to_dict()
    digest = record_digest(checked, tensors) if tensors is not None else None
    cfg = config.to_dict()
    # Where the model was loaded from is the loader's to say (normswap.load sets it to the folder);
    # written down it would be a stale local path, uploaded with the checkpoint.
    for key in ("_normswap_source", "_name_or_path"):
        cfg.pop(key, None)
    cfg["model_type"] = MODEL_TYPE
    cfg["architectures"] = [record.architecture]
    cfg["normswap"] = {**checked, "digest": digest}
    return cfg


def unique_state(model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """`state` (default: the model's state dict) with each tied tensor once, under its first name
    (the body's embedding, not the head), so that the bare body can be loaded from the same file.

    A tensor shared under a name that the model as configured does not tie (transformers ties by
    `_tied_weights_keys` only while `tie_word_embeddings` holds, so a head untied by
    `--tied-head untie` unties BART's encoder and decoder lookups from `shared` too) is written
    again under that name, or it would be missing when the checkpoint loads."""
    expand = getattr(model, "get_expanded_tied_weights_keys", None)
    try:
        ties = expand(all_submodels=True) if expand is not None else None
    except Exception:  # noqa: BLE001 - a model's own tie table that transformers cannot expand
        ties = None
    tied_names = None if ties is None else set(ties) | set(ties.values())
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, tuple[int, ...]]] = set()
    for name, t in (state if state is not None else model.state_dict()).items():
        key = (t.data_ptr(), tuple(t.shape))
        if key in seen:
            if tied_names is None or name in tied_names:
                continue
            out[name] = t.detach().clone()
            continue
        seen.add(key)
        out[name] = t.detach().contiguous()
    return out


def saved_dtype(state: dict[str, torch.Tensor]) -> str | None:
    """The dominant floating dtype of `state`, by element count, as the record names it."""
    from normswap.conversion import dtype_name

    counts: dict[torch.dtype, int] = {}
    for t in state.values():
        if t.is_floating_point():
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    return dtype_name(max(counts, key=counts.get)) if counts else None


def write_weights_and_config(model: nn.Module, folder: Path, record: ConversionRecord,
                             state: dict[str, torch.Tensor] | None = None) -> None:
    """model.safetensors and config.json of `model` in `folder`, each written to a temporary file
    and renamed into place, weights first: the folder holds a loadable checkpoint, or the one it
    held before, never half of one. Earlier weight files of another layout (shards) are removed.
    The record's dtype is the weights' as written, and its digest covers them."""
    from safetensors.torch import save_file

    from normswap.loading import CONFIG_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

    state = unique_state(model, state)
    describe(record, model, state)
    folder.mkdir(parents=True, exist_ok=True)
    _replace(folder / WEIGHTS_NAME, lambda f: save_file(state, str(f), metadata={"format": "pt", "normswap": record.version}))
    for stale in [*folder.glob("model-*-of-*.safetensors"), folder / WEIGHTS_INDEX_NAME]:
        stale.unlink(missing_ok=True)
    cfg = converted_config(model.config, record, state_tensor_list(state))
    record.digest = cfg["normswap"]["digest"]
    _replace(folder / CONFIG_NAME, lambda f: f.write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str) + "\n"))


def describe(record: ConversionRecord, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Bring the record's dtype and architecture up to date with the model as it is saved: cast
    since it was converted, or loaded with another head (a body as AutoModelForMaskedLM)."""
    record.dtype = saved_dtype(state) or record.dtype
    record.architecture = _architecture_name(model) or record.architecture


def _architecture_name(model: nn.Module) -> str | None:
    """The transformers class name of `model`, which may carry another head than the record's
    (a body loaded as AutoModelForMaskedLM): the checkpoint is of the model as it is saved."""
    import transformers

    name = type(model).__name__
    try:
        return name if getattr(transformers, name, None) is type(model) else None
    except Exception:  # noqa: BLE001 - a lazy import of an optional backend failing
        return None


def _replace(target: Path, write: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _save_pretrained(self: nn.Module, save_directory: str | os.PathLike, is_main_process: bool = True,
                     state_dict: dict[str, torch.Tensor] | None = None, push_to_hub: bool = False, **kwargs: Any) -> None:
    """`save_pretrained` of a model that carries a conversion record: the normswap format (see the
    module docstring). `state_dict` (a Trainer's or accelerate's gathered weights) is written
    instead of the model's own; safetensors always (transformers' sharding and `save_function`
    options do not apply: one safetensors file, written by normswap)."""
    from normswap.log import logger

    record = record_of(self)
    if record is None:  # the config was replaced by a plain one: nothing left to carry
        return type(self).save_pretrained(self, save_directory, is_main_process=is_main_process, state_dict=state_dict,
                                          push_to_hub=push_to_hub, **kwargs)
    if not is_main_process:
        return None
    folder = Path(save_directory)
    if folder.is_file():
        raise NotADirectoryError(f"{folder} is a file, not a folder")
    ignored = [k for k in ("save_function", "safe_serialization", "variant") if kwargs.get(k) not in (None, True)]
    if ignored:
        logger.debug("save_pretrained(%s=...) does not apply to a normswap checkpoint (one safetensors file)", ", ".join(ignored))
    write_weights_and_config(self, folder, record, state_dict)
    generation = getattr(self, "generation_config", None)
    if generation is not None and getattr(self, "can_generate", lambda: False)():
        generation.save_pretrained(str(folder))
    if not getattr(self, "name_or_path", ""):
        set_name_or_path(self, folder)
    if push_to_hub:
        repo_id = kwargs.get("repo_id") or folder.name
        _push_folder(folder, repo_id, token=kwargs.get("token"), private=kwargs.get("private"),
                     commit_message=kwargs.get("commit_message"), revision=kwargs.get("revision"))
    return None


def _push_to_hub(self: nn.Module, repo_id: str, *, commit_message: str | None = None, private: bool | None = None,
                 token: str | bool | None = None, revision: str | None = None, **kwargs: Any) -> str:
    """`push_to_hub` of a model that carries a conversion record: the Hub export of the model (as
    `normswap.save` writes it, with its tokenizer) with remote code and a model card, uploaded by
    `normswap.export.push`. Returns the commit URL."""
    from normswap.loading import save

    with tempfile.TemporaryDirectory(prefix="normswap-push-") as tmp:
        folder = save(self, Path(tmp) / "model")
        return _push_folder(folder, repo_id, token=token, private=private, commit_message=commit_message, revision=revision)


def _push_folder(folder: Path, repo_id: str, *, token: Any, private: bool | None, commit_message: str | None,
                 revision: str | None) -> str:
    from normswap.export import push

    info = push(folder, repo_id, private=bool(private), revision=revision, commit_message=commit_message,
                token=token if isinstance(token, str) else None)
    return info["url"]
