"""Loading source models and converted checkpoints; saving converted checkpoints atomically.

A converted checkpoint is a folder with `model.safetensors`, tokenizer files and a `config.json`
whose `model_type` is "normswap" and whose `normswap` section records the conversion. Plain
transformers refuses that model type with an error instead of silently rebuilding LayerNorm;
`normswap.load` (and the Auto classes, once `normswap` is imported) rebuild it exactly.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from normswap.errors import NormswapError
from normswap.log import logger
from normswap.record import ConversionRecord, apply_structure

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
MODEL_TYPE = "normswap"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "merges.txt", "spiece.model", "tokenizer.model", "sentencepiece.bpe.model")
_NOT_COPIED = {CONFIG_NAME, "README.md", ".gitattributes"}


def is_converted(path: str | os.PathLike) -> bool:
    """True if `path` is a folder written by `normswap.save`."""
    cfg = Path(path) / CONFIG_NAME
    if not cfg.is_file():
        return False
    try:
        return MODEL_TYPE in json.loads(cfg.read_text()).get("normswap", {}) or json.loads(cfg.read_text()).get("model_type") == MODEL_TYPE
    except (OSError, ValueError):
        return False


def read_record(path: str | os.PathLike) -> tuple[ConversionRecord, dict[str, Any]]:
    """The conversion record and the base config dict of a converted folder."""
    cfg = json.loads((Path(path) / CONFIG_NAME).read_text())
    if "normswap" not in cfg:
        raise NormswapError(f"{path} is not a normswap checkpoint (config.json has no 'normswap' section)")
    record = ConversionRecord.from_dict(cfg.pop("normswap"))
    cfg["model_type"] = record.base_model_type
    return record, cfg


def check_source(name_or_path: str) -> Path | None:
    """Local folder checks with clear errors; None for something that can only be a Hub id."""
    p = Path(name_or_path).expanduser()
    if p.exists():
        if not p.is_dir():
            raise NormswapError(f"{name_or_path} is a file, not a model folder")
        if not (p / CONFIG_NAME).is_file():
            raise NormswapError(f"{name_or_path} is not a model folder (no config.json)")
        names = [f.name for f in p.iterdir()]
        if not any(n.endswith(".safetensors") or n == "model.safetensors.index.json" for n in names):
            if any(n.endswith((".bin", ".pt", ".pth")) for n in names):
                raise NormswapError(f"{name_or_path} has only pickle weights (.bin); normswap loads safetensors only")
            raise NormswapError(f"{name_or_path} has no weights (no *.safetensors file)")
        return p
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1 or os.sep in name_or_path.strip("/").split("/", 1)[-1]
    if looks_local or os.environ.get("HF_HUB_OFFLINE") == "1":
        raise NormswapError(f"model {name_or_path!r} not found: no such folder" + (" (and the Hub is offline)" if not looks_local else ""))
    return None


def _architecture_class(config: Any, auto_class: Any = None) -> Any:
    import transformers

    if auto_class is not None:
        return auto_class
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    return transformers.AutoModel


def load_config(name_or_path: str, *, revision: str | None = None, trust_remote_code: bool = False) -> Any:
    """The transformers config of a source model (not of a converted folder)."""
    from transformers import AutoConfig

    check_source(name_or_path)
    try:
        return AutoConfig.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    except ValueError as err:  # unknown model_type and the like
        raise NormswapError(f"cannot read the config of {name_or_path}: {str(err).splitlines()[0]}") from None
    except OSError as err:
        raise NormswapError(f"cannot load {name_or_path}: {str(err).splitlines()[0]}") from None


def load_pretrained(
    name_or_path: str,
    *,
    auto_class: Any = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    dtype: torch.dtype = torch.float32,
    allow_new_head: bool = False,
    **model_kwargs: Any,
) -> nn.Module:
    """Load a model from a local folder or the Hub: a plain checkpoint or a normswap one.

    Weights are read from safetensors only (never unpickled). The model comes back in eval mode.
    """
    local = check_source(name_or_path)
    if local is not None and is_converted(local):
        return load(local, auto_class=auto_class, allow_new_head=allow_new_head, dtype=dtype, **model_kwargs)
    config = load_config(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    # Config fields (num_labels, problem_type...) go on the config: from_pretrained(config=...)
    # would hand them to the model's constructor instead.
    for key in [k for k in model_kwargs if hasattr(config, k) or k in ("num_labels", "id2label", "label2id", "problem_type")]:
        setattr(config, key, model_kwargs.pop(key))
    cls = _architecture_class(config, auto_class)
    try:
        model, info = cls.from_pretrained(
            name_or_path, config=config, revision=revision, trust_remote_code=trust_remote_code,
            use_safetensors=True, dtype=dtype, output_loading_info=True, **model_kwargs,
        )
    except (OSError, ValueError, RuntimeError) as err:
        raise NormswapError(f"cannot load weights of {name_or_path}: {str(err).strip().splitlines()[0][:300]}") from None
    except Exception as err:  # safetensors raises its own error types on corrupt files
        if type(err).__module__.startswith("safetensors") or "safetensors" in type(err).__name__.lower() or "header" in str(err).lower():
            raise NormswapError(f"corrupt or truncated weights in {name_or_path}: {str(err).splitlines()[0][:200]}") from None
        raise
    missing = [k for k in info.get("missing_keys", []) if not _is_head_key(model, k)]
    if missing:
        raise NormswapError(f"weights of {name_or_path} are incomplete: {len(missing)} missing, e.g. {missing[0]}")
    model.eval()
    model.config._normswap_source = {"model": str(name_or_path), "revision": revision}
    return model


def _is_head_key(model: nn.Module, key: str) -> bool:
    """Keys outside the base model (a task head that from_pretrained initialises on purpose)."""
    prefix = getattr(model, "base_model_prefix", "")
    return bool(prefix) and getattr(model, prefix, None) is not None and not key.startswith(prefix + ".")


def load_tokenizer(name_or_path: str, *, revision: str | None = None, trust_remote_code: bool = False) -> Any:
    """The tokenizer stored with a model (None if it has none)."""
    from transformers import AutoTokenizer

    local = Path(str(name_or_path))
    if local.is_dir() and not any((local / f).exists() for f in _TOKENIZER_FILES):
        return None  # transformers would otherwise build an empty tokenizer from nothing
    try:
        tok = AutoTokenizer.from_pretrained(str(name_or_path), revision=revision, trust_remote_code=trust_remote_code)
    except Exception as err:  # no tokenizer files, unknown class...
        logger.debug("no tokenizer for %s: %s", name_or_path, err)
        return None
    return tok if len(tok) > 1 else None


# --------------------------------------------------------------------------------------- normswap format


def load(
    path: str | os.PathLike,
    *,
    auto_class: Any = None,
    allow_new_head: bool = False,
    dtype: torch.dtype | None = None,
    **config_overrides: Any,
) -> nn.Module:
    """Rebuild a converted checkpoint and load its weights strictly.

    The base architecture is built from the saved config, the recorded structural changes are
    re-applied, and then every tensor in the file must find a parameter and every parameter a
    tensor: a missing or unexpected key is an error. `auto_class` picks another head for the same
    body (e.g. AutoModelForSequenceClassification for GLUE); with `allow_new_head` the head
    parameters that the file lacks are left at their fresh initialisation.
    """
    import transformers
    from transformers import AutoConfig

    path = Path(path)
    if not (path / CONFIG_NAME).is_file():
        raise NormswapError(f"{path} is not a model folder (no config.json)")
    record, cfg = read_record(path)
    cfg.pop("model_type")
    cfg.pop("transformers_version", None)
    cfg.update(config_overrides)
    config = AutoConfig.for_model(record.base_model_type, **cfg)
    cls = auto_class or getattr(transformers, record.architecture, None)
    if cls is None:
        raise NormswapError(f"{path}: architecture {record.architecture} is not in this transformers version")
    model = cls.from_config(config) if hasattr(cls, "from_config") and not hasattr(cls, "config_class") else cls(config)
    apply_structure(model, record)
    _load_weights_strict(model, path, allow_new_head=allow_new_head)
    if dtype is not None:
        model = model.to(dtype)
    model.eval()
    return model


def _load_weights_strict(model: nn.Module, path: Path, *, allow_new_head: bool) -> None:
    from safetensors.torch import load_file

    file = path / WEIGHTS_NAME
    index = path / WEIGHTS_INDEX_NAME
    if file.is_file():
        files = [file]
    elif index.is_file():  # sharded (written by the streaming conversion)
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError):
            raise NormswapError(f"corrupt {index}") from None
        files = [path / f for f in dict.fromkeys(weight_map.values())]
        file = index
    else:
        raise NormswapError(f"{path} has no {WEIGHTS_NAME}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except Exception as err:
            raise NormswapError(f"corrupt or truncated weights in {f}: {str(err).splitlines()[0][:200]}") from None
    state = _match_prefix(model, state)
    own = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    result = model.load_state_dict(state, strict=False)
    # Tied parameters appear under several names; the file stores one of them.
    loaded_ids = {id(own[k]) for k in state if k in own}
    missing = [k for k in result.missing_keys if id(own.get(k)) not in loaded_ids]
    if allow_new_head:
        missing = [k for k in missing if not _is_head_key(model, k)]
    if missing or result.unexpected_keys:
        what = (f"missing {missing[:3]}" if missing else "") + (" " if missing and result.unexpected_keys else "") + (
            f"unexpected {result.unexpected_keys[:3]}" if result.unexpected_keys else "")
        raise NormswapError(f"{file} does not match the recorded architecture: {what}")


def _match_prefix(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map keys between a model with a head and its bare body (as from_pretrained does)."""
    prefix = getattr(model, "base_model_prefix", "")
    if not prefix:
        return state
    has_body_attr = getattr(model, prefix, None) is not None
    file_prefixed = any(k.startswith(prefix + ".") for k in state)
    if has_body_attr and not file_prefixed:  # body checkpoint -> model with head
        return {f"{prefix}.{k}": v for k, v in state.items()}
    if not has_body_attr and file_prefixed:  # checkpoint with head -> body: drop the head
        return {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}
    return state


def save(
    model: nn.Module,
    out: str | os.PathLike,
    record: ConversionRecord,
    *,
    tokenizer: Any = None,
    copy_from: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a converted model to `out` atomically: a temporary folder moved into place when complete.

    Besides weights and config, the source's auxiliary files (tokenizer, pooling config...) are
    copied from `copy_from`, and the tokenizer (if given) is saved so the folder is self-contained.
    """
    from safetensors.torch import save_file

    out = Path(out)
    with atomic_output(out, overwrite=overwrite) as tmp:
        if copy_from is not None and Path(copy_from).is_dir():
            _copy_aux_files(Path(copy_from), tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        save_file(_unique_state(model), str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "normswap": record.version})
        write_config(tmp, model.config, record)
    return out


@contextlib.contextmanager
def atomic_output(out: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """A temporary folder beside `out`, moved into place only if the block completes.

    An existing `out` is refused unless `overwrite`; on any error (or Ctrl-C) the temporary folder
    is removed and `out` is left as it was.
    """
    if out.exists() and not overwrite:
        raise NormswapError(f"output folder {out} exists (use --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            trash = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, trash)
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_config(folder: Path, config: Any, record: ConversionRecord) -> None:
    """config.json of a converted checkpoint: the base config, model_type "normswap", the record."""
    cfg = config.to_dict()
    cfg.pop("_normswap_source", None)
    cfg["model_type"] = MODEL_TYPE
    cfg["architectures"] = [record.architecture]
    cfg["normswap"] = record.to_dict()
    (folder / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str) + "\n")


def _unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each tied tensor once, under its first name (the body's embedding, not
    the head), so that the bare body can be loaded from the same file."""
    state: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, tuple[int, ...]]] = set()
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        state[name] = t.detach().contiguous()
    return state


def _copy_aux_files(src: Path, dst: Path) -> None:
    for item in src.iterdir():
        if item.name in _NOT_COPIED or item.name.endswith(_WEIGHT_SUFFIXES) or item.name.startswith("."):
            continue
        if item.is_dir():
            shutil.copytree(item, dst / item.name)
        else:
            shutil.copy2(item, dst / item.name)
