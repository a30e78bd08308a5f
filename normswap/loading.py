"""Loading source models and converted checkpoints; saving converted checkpoints atomically.

A converted checkpoint is a folder with `model.safetensors`, tokenizer files and a `config.json`
whose `model_type` is "normswap" and whose `normswap` section records the conversion. Plain
transformers refuses that model type with an error instead of silently rebuilding LayerNorm;
`normswap.load` (and the Auto classes, once `normswap` is imported) rebuild it exactly.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from normswap.errors import NormswapError
from normswap.log import logger
from normswap.outputs import atomic_output  # noqa: F401  (re-exported: the streaming path uses it)
from normswap.record import ConversionRecord, apply_structure

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
MODEL_TYPE = "normswap"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "merges.txt", "spiece.model", "tokenizer.model", "sentencepiece.bpe.model")
# A fine-tuned source's run files are its own, not the converted model's.
_TRAINING_ARTEFACTS = {"checkpoints", "train_log.jsonl", "loss_curve.png", "finetune_config.json", "finetune_result.json"}
_NOT_COPIED = {CONFIG_NAME, "README.md", ".gitattributes", *_TRAINING_ARTEFACTS}


def is_converted(path: str | os.PathLike) -> bool:
    """True if `path` is a folder written by `normswap.save` (model_type "normswap" or a `normswap`
    section in config.json). An unreadable or invalid config.json is an error, not "no"."""
    if not (Path(path) / CONFIG_NAME).is_file():
        return False
    cfg = _read_config(path)
    return cfg.get("model_type") == MODEL_TYPE or "normswap" in cfg


def _read_config(folder: str | os.PathLike) -> dict[str, Any]:
    """config.json of a model folder as a dict: a JSON object whose `model_type` and `architectures`
    have the types transformers expects; otherwise one NormswapError naming the file."""
    from normswap.integrity import read_json_object

    file = Path(folder) / CONFIG_NAME
    cfg = read_json_object(file)
    if "model_type" in cfg and not isinstance(cfg["model_type"], str):
        raise NormswapError(f"invalid {file}: model_type must be a string, got {type(cfg['model_type']).__name__}")
    archs = cfg.get("architectures")
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        raise NormswapError(f"invalid {file}: architectures must be a list of class names")
    return cfg


def read_record(path: str | os.PathLike) -> tuple[ConversionRecord, dict[str, Any]]:
    """The conversion record (validated, see `ConversionRecord.from_dict`) and the base config dict
    of a converted folder."""
    cfg = _read_config(path)
    if "normswap" not in cfg:
        raise NormswapError(f"{path} is not a normswap checkpoint (config.json has no 'normswap' section)")
    record = ConversionRecord.from_dict(cfg.pop("normswap"), where=Path(path) / CONFIG_NAME)
    cfg["model_type"] = record.base_model_type
    return record, cfg


def check_source(name_or_path: str) -> Path | None:
    """Local folder checks with clear errors; None for something that can only be a Hub id.

    A local folder's config.json must be a valid JSON object and every safetensors header valid
    (`normswap.integrity`), so a damaged file is one error here, before any model is built."""
    from normswap.integrity import read_checkpoint, weight_files

    p = Path(name_or_path).expanduser()
    if p.exists():
        if not p.is_dir():
            raise NormswapError(f"{name_or_path} is a file, not a model folder")
        if not (p / CONFIG_NAME).is_file():
            raise NormswapError(f"{name_or_path} is not a model folder (no config.json)")
        _read_config(p)
        names = [f.name for f in p.iterdir()]
        if not any(n.endswith(".safetensors") or n == "model.safetensors.index.json" for n in names):
            if any(n.endswith((".bin", ".pt", ".pth")) for n in names):
                raise NormswapError(f"{name_or_path} has only pickle weights (.bin); normswap loads safetensors only")
            raise NormswapError(f"{name_or_path} has no weights (no *.safetensors file)")
        files, weight_map = weight_files(p, any_name=True)
        read_checkpoint(files, weight_map, p / WEIGHTS_INDEX_NAME)
        return p
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1 or os.sep in name_or_path.strip("/").split("/", 1)[-1]
    if looks_local or os.environ.get("HF_HUB_OFFLINE") == "1":
        raise NormswapError(f"model {name_or_path!r} not found: no such folder" + (" (and the Hub is offline)" if not looks_local else ""))
    return None


def _architecture_class(config: Any, auto_class: Any = None) -> Any:
    """The model class a source config names in `architectures` (AutoModel where it names none).

    An entry that names no transformers model class (nor a class of the model's own code through
    `auto_map`) is an error: falling back to AutoModel would give the bare body without its head."""
    import transformers

    if auto_class is not None:
        return auto_class
    archs = getattr(config, "architectures", None) or []
    if isinstance(archs, str) or not isinstance(archs, (list, tuple)):
        archs = [archs]
    found = []
    for arch in archs:
        cls = _model_class(arch) if isinstance(arch, str) else None
        if cls is None and isinstance(arch, str):
            cls = _remote_auto_class(config, arch)
        if cls is None:
            where = getattr(config, "_name_or_path", "") or "the model"
            raise NormswapError(f"config.json of {where}: architectures entry {str(arch)[:80]!r} names no transformers model class")
        found.append(cls)
    return found[0] if found else transformers.AutoModel


def _model_class(name: str) -> Any:
    """transformers.<name> if it is a model class (a PreTrainedModel subclass), else None."""
    import transformers
    from transformers import PreTrainedModel

    if not name.isidentifier() or name.startswith("_"):
        return None
    try:
        cls = getattr(transformers, name, None)
    except Exception:  # noqa: BLE001 - a lazy import of an optional backend failing
        return None
    return cls if isinstance(cls, type) and issubclass(cls, PreTrainedModel) and cls is not PreTrainedModel else None


def _remote_auto_class(config: Any, arch: str) -> Any:
    """The Auto class whose `auto_map` entry is the model's own class `arch` (remote code)."""
    import transformers

    auto_map = getattr(config, "auto_map", None)
    if not isinstance(auto_map, dict):
        return None
    for auto_name, ref in auto_map.items():
        if isinstance(ref, str) and ref.rsplit(".", 1)[-1] == arch and str(auto_name).startswith("AutoModel"):
            cls = getattr(transformers, str(auto_name), None)
            if cls is not None:
                return cls
    return None


def load_config(name_or_path: str, *, revision: str | None = None, trust_remote_code: bool = False) -> Any:
    """The transformers config of a source model (not of a converted folder)."""
    from transformers import AutoConfig

    check_source(name_or_path)
    try:
        return AutoConfig.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    except (ValueError, TypeError, KeyError, AttributeError) as err:  # unknown model_type, ill-typed fields...
        raise NormswapError(f"cannot read the config of {name_or_path}: {str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__}") from None
    except OSError as err:
        raise NormswapError(f"cannot load {name_or_path}: {str(err).splitlines()[0]}") from None


def load_pretrained(
    name_or_path: str,
    *,
    auto_class: Any = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    dtype: torch.dtype | str = torch.float32,
    allow_new_head: bool = False,
    **model_kwargs: Any,
) -> nn.Module:
    """Load a model from a local folder or the Hub: a plain checkpoint or a normswap one.

    Weights are read from safetensors only (never unpickled). The model comes back in eval mode,
    its floating weights in `dtype`: float32 by default, "auto" for the checkpoint's own (the
    dominant floating dtype of its stored tensors, see `normswap.conversion.resolve_dtypes`).
    """
    local = check_source(name_or_path)
    if isinstance(dtype, str):
        from normswap.conversion import resolve_dtypes

        config = None if local is not None else load_config(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
        dtype = resolve_dtypes(dtype, source=local, config=config)[0]
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
    if local is not None:
        _check_source_weights(model, local)
    model.eval()
    model.config._normswap_source = {"model": str(name_or_path), "revision": revision}
    return model


def _check_source_weights(model: nn.Module, folder: Path) -> None:
    """A plain checkpoint's weights as from_pretrained loaded them: an integer tensor stored for a
    floating parameter (which from_pretrained casts without a word) and non-finite values are
    errors, since a conversion of them could only be garbage."""
    from normswap.integrity import check_values, read_checkpoint, weight_files

    files, weight_map = weight_files(folder, any_name=True)
    stored = {name: (h.file, t) for h in read_checkpoint(files, weight_map, folder / WEIGHTS_INDEX_NAME) for name, t in h.tensors.items()}
    prefix = getattr(model, "base_model_prefix", "")
    for name, param in model.named_parameters():
        short = name[len(prefix) + 1:] if prefix and name.startswith(prefix + ".") else name
        hit = stored.get(name) or stored.get(short) or (stored.get(f"{prefix}.{name}") if prefix else None)
        if hit is not None and param.is_floating_point() and not hit[1].torch_dtype.is_floating_point:
            raise NormswapError(f"{hit[0]}: tensor {hit[1].name} has dtype {hit[1].torch_dtype}, but {name} is a floating-point parameter")
        check_values(name, param.detach(), hit[0] if hit is not None else folder)


def _is_head_key(model: nn.Module, key: str) -> bool:
    """Keys outside the base model (a task head that from_pretrained initialises on purpose)."""
    prefix = getattr(model, "base_model_prefix", "")
    return bool(prefix) and getattr(model, prefix, None) is not None and not key.startswith(prefix + ".")


def load_tokenizer(name_or_path: str, *, revision: str | None = None, trust_remote_code: bool = False) -> Any:
    """The tokenizer stored with a model (None if it has none).

    For a local folder, an invalid config.json or tokenizer files that fail to load are an error
    naming the folder, not "no tokenizer"."""
    from transformers import AutoTokenizer

    local = Path(str(name_or_path))
    if local.is_dir():
        if (local / CONFIG_NAME).is_file():
            _read_config(local)
        if not any((local / f).exists() for f in _TOKENIZER_FILES):
            return None  # transformers would otherwise build an empty tokenizer from nothing
    try:
        tok = AutoTokenizer.from_pretrained(str(name_or_path), revision=revision, trust_remote_code=trust_remote_code)
    except ImportError as err:  # a tokenizer backend (sentencepiece, tiktoken...) is not installed
        logger.warning("cannot load the tokenizer of %s: %s", name_or_path, str(err).strip().splitlines()[0][:200] if str(err).strip() else err)
        return None
    except Exception as err:  # no tokenizer files, unknown class...
        if local.is_dir():  # files that are there but do not load: damaged, not absent
            msg = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
            raise NormswapError(f"cannot load the tokenizer files of {name_or_path}: {msg}") from None
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
    parameters that the file lacks are left at their fresh initialisation. The model comes back in
    `dtype`, by default the dtype its weights were saved in.

    Before anything is built, the record is validated (`ConversionRecord.from_dict`), every
    safetensors header too (`normswap.integrity`), and the record's digest is recomputed over the
    record and the files' tensor names, dtypes and shapes: a mismatch means they were modified.
    """
    import transformers
    from transformers import AutoConfig

    from normswap.integrity import read_checkpoint, weight_files

    path = Path(path)
    if not (path / CONFIG_NAME).is_file():
        raise NormswapError(f"{path} is not a model folder (no config.json)")
    record, cfg = read_record(path)
    files, weight_map = weight_files(path)
    headers = read_checkpoint(files, weight_map, path / WEIGHTS_INDEX_NAME)
    modified = not _check_digest(record, _read_config(path)["normswap"], headers, path)
    cfg.pop("model_type")
    cfg.pop("transformers_version", None)
    cfg.update(config_overrides)
    cls = auto_class or getattr(transformers, record.architecture, None)
    if cls is None:
        raise NormswapError(f"{path}: architecture {record.architecture} is not in this transformers version")
    try:
        config = AutoConfig.for_model(record.base_model_type, **cfg)
        model = cls.from_config(config) if hasattr(cls, "from_config") and not hasattr(cls, "config_class") else cls(config)
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, RuntimeError, OverflowError, AssertionError) as err:
        msg = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise NormswapError(f"cannot build {record.architecture} from {path / CONFIG_NAME}: {msg}") from None
    apply_structure(model, record, path / CONFIG_NAME)
    _load_weights_strict(model, path, allow_new_head=allow_new_head, headers=headers, modified=modified,
                         other_head=allow_new_head and type(model).__name__ != record.architecture)
    if dtype is None and record.dtype is not None:  # the dtype it was saved in (None: as built, float32)
        dtype = getattr(torch, record.dtype)
    if dtype is not None:
        model = model.to(dtype)
    _apply_generation_config(model, path)
    model.eval()
    from normswap.carry import attach

    return attach(model, record, name_or_path=path, aux_from=path)


def _apply_generation_config(model: nn.Module, path: Path) -> None:
    """The folder's generation_config.json (copied from the source), as from_pretrained applies it:
    Whisper's no_timestamps_token_id, max_length and alignment_heads live there, not in config.json."""
    file = path / "generation_config.json"
    if not file.is_file() or getattr(model, "generation_config", None) is None:
        return
    from transformers import GenerationConfig

    from normswap.integrity import read_json_object

    read_json_object(file, "generation config")  # one line for a damaged file
    try:
        model.generation_config = GenerationConfig.from_pretrained(str(path))
    except (OSError, ValueError, TypeError) as err:
        raise NormswapError(f"invalid generation config {file}: {str(err).strip().splitlines()[0][:200]}") from None


_MODIFIED = "the conversion record or the weights were modified after saving (the integrity digest in config.json does not match them)"


def _check_digest(record: ConversionRecord, stored: dict[str, Any], headers: list[Any], path: Path) -> bool:
    """Whether the record's digest matches the record as stored in config.json (`stored`) and the
    weights' headers. The stored form, not the parsed one: a field that a later normswap adds with
    a default would otherwise change the digest of every checkpoint saved before it. A record
    without a digest (saved by an older normswap) passes, with a logged warning."""
    from normswap.integrity import record_digest, tensor_list

    if record.digest is None:
        logger.warning("%s has no integrity digest (saved by an older normswap, or its config.json was written apart "
                       "from its weights): loading it without checking that its conversion record and weights belong "
                       "together", path)
        return True
    return record_digest(stored, tensor_list(headers)) == record.digest


def _load_weights_strict(model: nn.Module, path: Path, *, allow_new_head: bool, headers: list[Any] | None = None,
                         modified: bool = False, other_head: bool = False) -> None:
    """Load the folder's weights into `model`: every tensor must find a parameter or buffer of the
    same shape and a compatible dtype (floating for floating, exact otherwise) and every parameter
    a tensor; parameters must be finite. `headers` are the files' validated headers (read here if
    not given); `modified` (a digest mismatch) is reported with the first other error found, or alone.
    `other_head`: the model is of another class than the one saved (another head on the same body),
    whose own head tensors (a pooler) it has no place for and leaves out."""
    from safetensors.torch import load_file

    from normswap.integrity import check_values, read_checkpoint, tensor_mismatch, weight_files

    if headers is None:
        files, weight_map = weight_files(path)
        headers = read_checkpoint(files, weight_map, path / WEIGHTS_INDEX_NAME)
    file = path / WEIGHTS_INDEX_NAME if len(headers) > 1 or headers[0].file.name != WEIGHTS_NAME else headers[0].file
    state: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    for h in headers:
        try:
            part = load_file(str(h.file))
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
            raise NormswapError(f"corrupt or truncated weights in {h.file}: {str(err).strip().splitlines()[0][:200]}") from None
        if set(part) != set(h.tensors):
            raise NormswapError(f"corrupt or truncated weights in {h.file}: the file changed while it was read")
        state.update(part)
        origin.update(dict.fromkeys(part, h.file))
    names = _match_prefix(model, {k: k for k in state})  # model key -> key in the file
    state = {k: state[old] for k, old in names.items()}
    expected = model.state_dict(keep_vars=True)
    unexpected = [k for k in state if k not in expected]
    if other_head and unexpected:  # BertForMaskedLM given a BertModel's pooler, as from_pretrained is
        logger.info("%s: %d saved tensor(s) have no place in %s and are not loaded, e.g. %s", file,
                    len(unexpected), type(model).__name__, unexpected[0])
        state = {k: v for k, v in state.items() if k in expected}
        unexpected = []
    loaded_ids = {id(expected[k]) for k in state if k in expected}
    missing = [k for k in expected if id(expected[k]) not in loaded_ids]
    if allow_new_head:
        missing = [k for k in missing if not _is_head_key(model, k)]
    if missing or unexpected:
        what = (f"missing {missing[:3]}" if missing else "") + (" " if missing and unexpected else "") + (
            f"unexpected {unexpected[:3]}" if unexpected else "")
        raise NormswapError(f"{file} does not match the recorded architecture: {what}" + (f"; {_MODIFIED}" if modified else ""))
    also = f"; {_MODIFIED}" if modified else ""
    for k, t in state.items():
        why = tensor_mismatch(t.dtype, t.shape, expected[k])
        if why is not None:
            raise NormswapError(f"{origin[names[k]]}: tensor {names[k]} {why}{also}")
    if modified:
        raise NormswapError(f"{path}: {_MODIFIED}")
    params = {id(p) for p in model.parameters()}
    for k, t in state.items():
        if id(expected[k]) in params:
            check_values(names[k], t, origin[names[k]])
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise NormswapError(f"{file} does not match the recorded architecture: {str(err).strip().splitlines()[-1][:200]}") from None


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
    record: ConversionRecord | None = None,
    *,
    tokenizer: Any = None,
    processor: Any = None,
    copy_from: str | os.PathLike | None = None,
    overwrite: bool = False,
    inputs: dict[str, Any] | None = None,
) -> Path:
    """Write a converted model to `out` atomically: a temporary folder moved into place when complete.

    `record` defaults to the one the model carries (models from `normswap.convert`, `normswap.load`
    and `normswap finetune` carry theirs, see `normswap.carry`). Besides weights and config, the
    source's auxiliary files (tokenizer, sentence-transformers pooling...) are copied from
    `copy_from`, and the tokenizer and processor are saved, so the folder is self-contained; each
    defaults to what the model carries (the folder it was loaded or converted from, the tokenizer
    its conversion used). `out` may not be, contain or lie inside `copy_from` or any of `inputs`
    (name -> path). Afterwards the model carries the record, and is known by `out` if it had no
    folder of its own yet.
    """
    from normswap.carry import attach, extras_of, record_of, set_name_or_path, write_weights_and_config

    record = record if record is not None else record_of(model)
    if record is None:
        raise NormswapError("normswap.save needs a conversion record: this model was not converted by normswap "
                            "(pass the record of normswap.convert's result)")
    extras = extras_of(model)
    copy_from = copy_from if copy_from is not None else extras.aux_from
    tokenizer = tokenizer if tokenizer is not None else extras.tokenizer
    processor = processor if processor is not None else extras.processor
    out = Path(out)
    with atomic_output(out, overwrite=overwrite, inputs={"source model": copy_from, **(inputs or {})}) as tmp:
        if copy_from is not None and Path(copy_from).is_dir():
            _copy_aux_files(Path(copy_from), tmp)
        if processor is not None:
            processor.save_pretrained(str(tmp))  # a speech processor holds the tokenizer too
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        write_weights_and_config(model, tmp, record)
    attach(model, record, tokenizer=tokenizer, processor=processor)
    if not getattr(model, "name_or_path", ""):
        set_name_or_path(model, out)
    return out


def write_config(folder: Path, config: Any, record: ConversionRecord) -> None:
    """config.json of a converted checkpoint whose weights are already in `folder` (the streaming
    path): the base config, model_type "normswap", the record and its digest over the written
    tensors' names, dtypes and shapes (`normswap.carry.converted_config`)."""
    from normswap.carry import converted_config
    from normswap.integrity import read_checkpoint, tensor_list, weight_files

    files, weight_map = weight_files(folder)
    headers = read_checkpoint(files, weight_map, folder / WEIGHTS_INDEX_NAME)
    cfg = converted_config(config, record, tensor_list(headers))
    record.digest = cfg["normswap"]["digest"]
    (folder / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str) + "\n")


def _copy_aux_files(src: Path, dst: Path) -> None:
    for item in src.iterdir():
        if item.name in _NOT_COPIED or item.name.endswith(_WEIGHT_SUFFIXES) or item.name.startswith("."):
            continue
        if item.is_dir():
            shutil.copytree(item, dst / item.name)
        else:
            shutil.copy2(item, dst / item.name)
