"""The recipe file format: YAML read with line numbers, checked with pydantic before anything runs.

A recipe is a list of *jobs*. Each job takes one model through the stages `convert`, `finetune` and
`eval` (any subset, in that order). Keys at the top of the file are defaults for every job; the
entries of `runs:` add to or replace them (deep merge), so a recipe with one model needs no `runs:`
at all, and one with several models or targets lists them under `runs:`:

    name: quickstart
    stages: [convert, eval]
    eval: {ppl: {data: ${assets}/wikitext2-tokenized/valid.txt, max_tokens: 8192}}
    runs:
      - {name: gpt2-rms, model: ${assets}/gpt2-standin-wt2, convert: {to: rmsnorm}}
      - {name: gpt2-dyt, model: ${assets}/gpt2-standin-wt2, convert: {to: dyt}}

Every mapping is closed (`extra="forbid"`): an unknown or mistyped key is an error that names the
key, the file and the line (found from PyYAML's node marks), with a suggestion when one is close.

Where and in which dtype a stage runs: `device:` (auto, cpu, cuda, cuda:N, mps) and `dtype:` (auto,
float32, bfloat16, float16) on the convert, finetune and eval sections, or once for the whole job
(at the top of the file, or in a `runs:` entry), which every section that sets none inherits:

    device: cuda
    convert: {to: dyt, dtype: bfloat16}      # the saved weights' dtype (`normswap convert --dtype`)
    eval: {ppl: {data: ...}, dtype: bfloat16}  # both models evaluated in bfloat16 on cuda
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from normswap.errors import NormswapError
from normswap.training.config import TrainConfig, parse_count

STAGES = ("convert", "finetune", "eval")
ROLES = ("original", "converted", "recovered")
JOB_KEYS = ("name", "model", "stages", "device", "dtype") + STAGES
DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")  # normswap.conversion.DTYPE_CHOICES (which imports torch)
DtypeName = Literal["auto", "float32", "bfloat16", "float16"]
PLACEMENT_KEYS = ("device", "dtype")


def _comma_list(v: Any) -> Any:
    """"a, b" -> ["a", "b"] (a list is kept as given)."""
    return [t.strip() for t in v.split(",") if t.strip()] if isinstance(v, str) else v


# A list of names that a recipe may also write as one comma-separated string.
Names = Annotated[list[str], BeforeValidator(_comma_list)]


class RecipeError(NormswapError):
    """A recipe that cannot run: bad file, bad key, bad value, bad override."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _device(v: Any) -> Any:
    """A device spec checked for its form (normswap.devices.check_device, no torch import); whether
    it exists here is checked with the recipe's inputs (`loader.check_inputs`)."""
    if v is None:
        return v
    if not isinstance(v, str):
        raise ValueError(f"a device is a string: auto, cpu, cuda, cuda:N or mps (got {v!r})")
    from normswap.devices import DEVICE_CHOICES, check_device

    try:
        return check_device(v)
    except NormswapError:
        raise ValueError(f"unknown device {v.strip()[:40]!r}: choose {DEVICE_CHOICES}") from None


# `device:` of a section or a job: None means "not set here" (inherited, else the library's "auto").
Device = Annotated[Optional[str], BeforeValidator(_device)]


class _Placed(_Strict):
    """A stage that takes `device` and `dtype` (None: not set, so inherited from the job)."""

    device: Device = None
    dtype: Optional[DtypeName] = None

    def placement(self) -> dict[str, str]:
        """The `device=` / `dtype=` keyword arguments this section sets (only those set)."""
        return {k: v for k in PLACEMENT_KEYS if (v := getattr(self, k)) is not None}


# ------------------------------------------------------------------------------------------ stages


class ConvertStage(_Placed):
    """`normswap convert` settings (see `normswap.conversion.convert_model`)."""

    to: Literal["rmsnorm", "dyt", "none"]
    fold: bool = True
    tied_head: Literal["auto", "center-embed", "untie"] = "auto"
    calib_text: Optional[str] = None
    calib_audio: Optional[str] = None  # speech models: a folder of audio files (normswap.audio)
    calib_audio_subsets: Optional[Names] = Field(None, min_length=1)
    calib_tokens: int = Field(4096, gt=0)
    sequential: bool = True
    alpha_init: Optional[float] = None
    variant: str = "dyt"  # --to dyt: the elementwise function fitted (normswap.conversion.VARIANT_CHOICES)
    calibrate: Literal["site", "e2e", "block"] = "site"
    e2e_steps: Optional[int] = Field(None, gt=0)
    e2e_seconds: Optional[float] = Field(None, gt=0)
    verify: bool = True
    verify_text: Optional[str] = None
    verify_audio: Optional[str] = None
    revision: Optional[str] = None
    trust_remote_code: bool = False
    dtype: DtypeName = "auto"  # the output's dtype, as before (always passed to convert_model)


class _FinetuneBase(_Placed):
    """`normswap finetune` settings: the data (text, or `audio` for speech models), the teacher,
    and every field of TrainConfig."""

    data: Optional[str] = None
    audio: Optional[str] = None  # speech models: a folder of audio files with transcripts
    audio_subsets: Optional[Names] = Field(None, min_length=1)
    teacher: Optional[str] = "original"  # "original": the job's source model; null: no teacher

    @model_validator(mode="after")
    def _one_source(self) -> "_FinetuneBase":
        if (self.data is None) == (self.audio is None):
            raise ValueError("give exactly one of data (text) and audio (a speech folder)")
        if self.audio_subsets is not None and self.audio is None:
            raise ValueError("audio_subsets needs audio")
        return self

    @field_validator("tokens", "steps", mode="before", check_fields=False)
    @classmethod
    def _count(cls, v: Any) -> Any:
        if isinstance(v, str):
            try:
                return parse_count(v)
            except NormswapError as err:
                raise ValueError(str(err)) from None
        return v

    @model_validator(mode="after")
    def _budget(self) -> "_FinetuneBase":
        cfg = self.train_config()
        try:
            cfg.check()
        except NormswapError as err:
            raise ValueError(str(err).replace("--", "")) from None
        return self

    def train_config(self) -> TrainConfig:
        """The run's TrainConfig; `device` and `dtype` (`_Placed`: unset means inherited, then
        TrainConfig's "auto") are its fields too."""
        return TrainConfig.from_dict({k: v for k, v in self.model_dump().items() if not (k in PLACEMENT_KEYS and v is None)})


def _finetune_model() -> type[_FinetuneBase]:
    """FinetuneStage with one field per TrainConfig field, so the two cannot drift apart."""
    hints = typing.get_type_hints(TrainConfig)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(TrainConfig):
        if f.name in PLACEMENT_KEYS:  # `_Placed`'s, validated and inherited like every section's
            continue
        tp = hints[f.name]
        if f.name in ("steps", "tokens"):
            tp = Optional[Union[int, str]]  # "5M" and the like, parsed by the validator
        fields[f.name] = (tp, f.default)
    return create_model("FinetuneStage", __base__=_FinetuneBase, **fields)


FinetuneStage = _finetune_model()


class PplEval(_Strict):
    """Perplexity (causal sliding window, or masked-LM loss for encoders with an MLM head)."""

    data: str
    max_length: Optional[int] = Field(None, ge=2)
    stride: Optional[int] = Field(None, ge=1)
    max_tokens: Optional[int] = Field(None, ge=2)
    batch_size: int = Field(8, ge=1)
    pseudo: bool = False
    mlm_probability: float = Field(0.15, gt=0, lt=1)
    mask_seed: int = 0


class StsEval(_Strict):
    """Zero-shot STS-B: Spearman of the cosine similarity of pooled embeddings."""

    data: str
    batch_size: int = Field(64, ge=1)


class AsrEval(_Strict):
    """Speech recognition (Whisper): greedy WER on a folder of audio files with transcripts.tsv."""

    data: str
    subsets: Optional[Names] = Field(None, min_length=1)
    groups: Optional[Names] = Field(None, min_length=1)  # unions of subsets: "test-clean+dev-clean"
    batch_size: int = Field(16, ge=1)


class GlueEval(_Strict):
    """GLUE per task and seed, the same settings for every model: fine-tuning (a classification head;
    `protocol: reference` for the documented per-task settings) or `mode: probe` (frozen encoder,
    linear head). Settings left out take the protocol's value, else normswap's default."""

    tasks: Names = Field(min_length=1)
    data: str
    mode: Literal["finetune", "probe"] = "finetune"
    protocol: Optional[Literal["reference"]] = None
    train_samples: Optional[int] = Field(None, ge=1)
    dev_samples: Optional[int] = Field(None, ge=1)
    epochs: Optional[float] = Field(None, gt=0)
    lr: Optional[float] = Field(None, gt=0)
    batch_size: Optional[int] = Field(None, ge=1)
    max_seq_length: Optional[int] = Field(None, ge=8)
    seeds: Optional[int] = Field(None, ge=1)
    warmup_ratio: Optional[float] = Field(None, ge=0, lt=1)
    weight_decay: Optional[float] = Field(None, ge=0)
    data_seed: Optional[int] = None

    def given(self) -> dict[str, Any]:
        """The training settings this recipe sets (the rest come from the protocol or the defaults)."""
        return {k: v for k in ("train_samples", "epochs", "lr", "batch_size", "max_seq_length", "seeds", "warmup_ratio",
                               "weight_decay", "data_seed") if (v := getattr(self, k)) is not None}

    @field_validator("tasks")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        from normswap.evaluation.glue_data import parse_tasks

        try:
            parse_tasks(",".join(v))
        except NormswapError as err:
            raise ValueError(str(err)) from None
        return v


class TasksEval(_Strict):
    """Zero-shot tasks through lm-evaluation-harness (causal LMs): acc / acc_norm with lm-eval's stderr."""

    names: Names = Field(min_length=1)
    data: Optional[str] = None  # DIR/<task>/... in the authors' formats (offline)
    include_path: Optional[str] = None  # the user's own lm-eval task YAMLs
    limit: Optional[int] = Field(None, ge=1)
    num_fewshot: Optional[int] = Field(None, ge=0)
    batch_size: int = Field(8, ge=1)


class EvalStage(_Placed):
    """Which evaluations, on which models: original (the job's model), converted, recovered (fine-tuned)."""

    ppl: Optional[PplEval] = None
    sts: Optional[StsEval] = None
    glue: Optional[GlueEval] = None
    asr: Optional[AsrEval] = None
    tasks: Optional[TasksEval] = None
    models: list[Literal["original", "converted", "recovered"]] = Field(default_factory=lambda: list(ROLES))

    @model_validator(mode="after")
    def _something(self) -> "EvalStage":
        if not (self.ppl or self.sts or self.glue or self.asr or self.tasks):
            raise ValueError("eval needs at least one of ppl, sts, glue, asr, tasks")
        return self


class Job(_Strict):
    """One model through its stages (after merging the recipe's defaults into the `runs:` entry)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    model: str
    stages: list[str]
    device: Device = None  # defaults for the sections below that set none
    dtype: Optional[DtypeName] = None
    convert: Optional[ConvertStage] = None
    finetune: Optional[FinetuneStage] = None  # type: ignore[valid-type]
    eval: Optional[EvalStage] = None

    @field_validator("stages", mode="before")
    @classmethod
    def _stages(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [s.strip() for s in v.split(",") if s.strip()]
        if not isinstance(v, list):
            return v
        for s in v:
            if s not in STAGES:
                close = difflib.get_close_matches(str(s), STAGES, n=1)
                raise ValueError(f"unknown stage {s!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                                 + f"; stages are {', '.join(STAGES)}")
        if len(set(v)) != len(v):
            raise ValueError(f"a stage is listed twice: {v}")
        if not v:
            raise ValueError("no stages to run")
        if list(v) != [s for s in STAGES if s in v]:
            raise ValueError(f"stages must run in the order {', '.join(STAGES)}, got {', '.join(v)}")
        return v

    @model_validator(mode="after")
    def _sections(self) -> "Job":
        for s in self.stages:
            if getattr(self, s) is None:
                need = {"convert": "`to`", "finetune": "`data` and a budget", "eval": "ppl, sts, glue, asr or tasks"}[s]
                raise ValueError(f"stage {s} is listed but the recipe has no {s} section (it needs {need})")
        if "recovered" in (self.eval.models if self.eval else []) and "finetune" not in self.stages:
            self.eval.models = [m for m in self.eval.models if m != "recovered"]
        if self.eval and "converted" in self.eval.models and "convert" not in self.stages:
            self.eval.models = [m for m in self.eval.models if m != "converted"]
        for key in PLACEMENT_KEYS:  # the job's device / dtype: for every section that sets none itself
            value = getattr(self, key)
            for stage in STAGES:
                section = getattr(self, stage)
                if value is not None and section is not None and key not in section.model_fields_set:
                    setattr(section, key, value)
        return self


class RecipeTop(_Strict):
    """The top level of the file: run-wide keys, job defaults, and the optional list of jobs."""

    name: Optional[str] = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    description: str = ""
    output_dir: str = "runs"
    model: Optional[str] = None
    stages: Optional[Any] = None
    device: Device = None
    dtype: Optional[DtypeName] = None
    convert: Optional[dict[str, Any]] = None
    finetune: Optional[dict[str, Any]] = None
    eval: Optional[dict[str, Any]] = None
    runs: Optional[list[dict[str, Any]]] = Field(None, min_length=1)


@dataclasses.dataclass
class Recipe:
    """A validated recipe: its file, its run-wide settings and its jobs (paths resolved)."""

    path: Path
    name: str
    description: str
    output_dir: str
    jobs: list[Job]
    raw: dict[str, Any]
    overrides: list[str] = dataclasses.field(default_factory=list)

    def resolved(self) -> dict[str, Any]:
        """The fully resolved configuration, as written to the run folder."""
        return {
            "recipe": str(self.path), "name": self.name, "description": self.description,
            "output_dir": self.output_dir, "overrides": list(self.overrides),
            "jobs": [j.model_dump(mode="json") for j in self.jobs],
        }


# --------------------------------------------------------------------------------- YAML with lines


def read_yaml(path: Path) -> tuple[dict[str, Any], dict[tuple, int]]:
    """The recipe's data and a map from key path (tuple of keys / list indices) to its line (1-based)."""
    if not path.exists():
        raise RecipeError(f"recipe {path} not found")
    if not path.is_file():
        raise RecipeError(f"recipe {path} is not a file")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_RECIPE_BYTES + 1)
        if len(raw) > MAX_RECIPE_BYTES:
            raise RecipeError(f"recipe {path} is larger than {MAX_RECIPE_BYTES // 2**20} MiB; a recipe is a small YAML file")
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise RecipeError(f"cannot read recipe {path}: {' '.join(str(err).split())[:200]}") from None
    lines: dict[tuple, int] = {}
    data = load_bounded(text, str(path), on_node=lambda node: _walk(node, (), lines))  # lines before merge keys are flattened
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: not a recipe (expected a YAML mapping of keys such as model, convert, eval; got {type(data).__name__})")
    return data, lines


# Bounds on what a recipe's YAML may expand to. PyYAML builds an alias as a shared reference, so a
# "billion laughs" file (aliases of aliases, a few hundred bytes) loads at once but explodes when
# walked, copied or dumped: it is measured on the composed node graph and refused before that.
MAX_RECIPE_BYTES = 1 * 2**20
MAX_DEPTH = 50  # nesting levels, aliases expanded (recipes use about 5)
MAX_NODES = 100_000  # keys, values and items, aliases expanded
MAX_CHARS = 10_000_000  # characters of all scalars, aliases expanded


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader whose (recursive) composer refuses to nest deeper than MAX_DEPTH."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _TooBig(f"nested more than {MAX_DEPTH} levels deep", self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


class _TooBig(Exception):
    def __init__(self, what: str, mark: Any):
        super().__init__(what)
        self.what, self.mark = what, mark


def load_bounded(text: str, where: str, on_node: Any = None) -> Any:
    """One YAML document read with SafeLoader, refusing (RecipeError, one line) invalid YAML and
    documents that nest deeper than MAX_DEPTH or expand (through aliases) to more than MAX_NODES
    values or MAX_CHARS characters. `where` names the source in errors; `on_node(node)` is called
    with the checked node graph before it is constructed."""
    loader = _BoundedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node)
        if on_node is not None:
            on_node(node)
        return loader.construct_document(node)
    except _TooBig as err:
        raise _refusal(err, where) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f"{where}:{mark.line + 1}" if mark is not None else where
        what = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise RecipeError(f"{at}: not valid YAML ({what})") from None
    except RecursionError:  # the limits above should make this unreachable
        raise RecipeError(f"{where}: refused: nested too deeply") from None
    finally:
        loader.dispose()


def check_bounded(text: str, where: str) -> None:
    """Refuse (RecipeError) YAML text that nests or expands beyond the bounds of `load_bounded`;
    text that is not valid YAML passes (the caller decides what that means)."""
    loader = _BoundedLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None:
            _check_expansion(node)
    except _TooBig as err:
        raise _refusal(err, where) from None
    except (yaml.YAMLError, RecursionError):
        return
    finally:
        loader.dispose()


def _refusal(err: _TooBig, where: str) -> RecipeError:
    at = f"{where}:{err.mark.line + 1}" if err.mark is not None and not where.startswith("override") else where
    return RecipeError(f"{at}: refused: {err.what}")


def _check_expansion(root: Any) -> None:
    """Size, text and depth of the document with every alias expanded, in time linear in the node
    graph (each node is measured once; an alias reuses its measure). Cycles (`&a [*a]`) are refused."""
    size: dict[int, tuple[int, int, int]] = {}  # id(node) -> (nodes, chars, depth)
    on_path: set[int] = set()
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        kids = _children(node)
        if done:
            on_path.discard(key)
            nodes = 1 + sum(size[id(c)][0] for c in kids)
            chars = (len(node.value) if isinstance(node, yaml.ScalarNode) else 0) + sum(size[id(c)][1] for c in kids)
            depth = 1 + max((size[id(c)][2] for c in kids), default=0)
            if nodes > MAX_NODES:
                raise _TooBig(f"YAML aliases expand to more than {MAX_NODES:,} values (a 'billion laughs' document?)", node.start_mark)
            if chars > MAX_CHARS:
                raise _TooBig(f"YAML aliases expand to more than {MAX_CHARS:,} characters", node.start_mark)
            if depth > MAX_DEPTH:
                raise _TooBig(f"nested more than {MAX_DEPTH} levels deep (through aliases)", node.start_mark)
            size[key] = (nodes, chars, depth)
            continue
        if key in size:
            continue
        on_path.add(key)
        stack.append((node, True))
        for c in kids:
            if id(c) in on_path:
                raise _TooBig("a YAML alias refers to a structure that contains it (a recursive document)", c.start_mark)
            if id(c) not in size:
                stack.append((c, False))


def _children(node: Any) -> list[Any]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _walk(node: Any, prefix: tuple, lines: dict[tuple, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = prefix + (k.value,)
            lines[key] = k.start_mark.line + 1
            _walk(v, key, lines)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            lines[prefix + (i,)] = v.start_mark.line + 1
            _walk(v, prefix + (i,), lines)


def line_of(lines: dict[tuple, int], prefixes: list[tuple], loc: tuple) -> int | None:
    """The line of `loc` under whichever prefix matches most of it (the first prefix on ties): a
    job's key may come from its `runs:` entry or from the recipe's top-level defaults."""
    best, best_m = None, -1
    for prefix in prefixes:
        for m in range(len(loc), -1, -1):
            key = prefix + tuple(loc[:m])
            if key in lines:
                if m > best_m:
                    best, best_m = lines[key], m
                break
    return best


# --------------------------------------------------------------------------------------- variables

_VAR = re.compile(r"\$\{([^}]*)\}")
PATH_KEYS = {("model",), ("convert", "calib_text"), ("convert", "verify_text"), ("convert", "calib_audio"),
             ("convert", "verify_audio"), ("finetune", "data"), ("finetune", "audio"),
             ("finetune", "teacher"), ("eval", "ppl", "data"), ("eval", "sts", "data"), ("eval", "glue", "data"),
             ("eval", "asr", "data"), ("eval", "tasks", "data"), ("eval", "tasks", "include_path")}


def expand(value: str, recipe_dir: Path) -> str:
    """Replace ${assets} (NORMSWAP_ASSETS or ../shared/assets) and ${recipe_dir}; others are errors."""
    from normswap.assets import assets_dir

    def sub(m: re.Match) -> str:
        name = m.group(1).strip()
        if name == "assets":
            return str(assets_dir())
        if name == "recipe_dir":
            return str(recipe_dir)
        if name.startswith("env:"):
            var = name[4:]
            if var not in os.environ:
                raise KeyError(f"environment variable {var} is not set")
            return os.environ[var]
        raise KeyError(f"unknown variable ${{{name}}} (use ${{assets}}, ${{recipe_dir}} or ${{env:NAME}})")

    return _VAR.sub(sub, value)


def resolve_path(value: str, recipe_dir: Path) -> str:
    """A path key's value: variables expanded; a relative path that exists beside the recipe (or
    starts with ./ or ../) is taken relative to the recipe file; anything else (a Hub id, a
    `datasets` name) is left as written."""
    value = expand(value, recipe_dir)
    p = Path(value).expanduser()
    if p.is_absolute():
        return str(p)
    if value.startswith(("./", "../")) or (recipe_dir / p).exists():
        return str((recipe_dir / p).resolve())
    return value


def suggest(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def format_error(err: dict[str, Any], path: Path, lines: dict[tuple, int], where: tuple, candidates: list[tuple],
                 model: type[BaseModel] | None) -> str:
    """One line for one pydantic error: file:line: what, naming the key."""
    loc = tuple(err["loc"])
    line = line_of(lines, candidates, loc)
    at = f"{path}:{line}" if line else str(path)
    dotted = ".".join(str(x) for x in where + loc)
    if err["type"] == "extra_forbidden":
        known = _known_keys(model, loc[:-1]) if model else []
        parent = ".".join(str(x) for x in where + loc[:-1]) or "the top level"
        return f"{at}: unknown key {loc[-1]!r} in {parent}{suggest(str(loc[-1]), known)}" + (
            f"; known keys: {', '.join(known)}" if known else "")
    if err["type"] == "missing":
        return f"{at}: missing key {dotted!r}"
    msg = err["msg"].removeprefix("Value error, ")
    got = err.get("input")
    shown = "" if isinstance(got, (dict, list)) or got is None or err["type"].startswith(("value_error", "assertion")) else f" (got {got!r})"
    return f"{at}: {dotted or 'recipe'}: {msg}{shown}"


def _known_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    cls = model
    for part in loc:
        if isinstance(part, int):
            continue
        field = cls.model_fields.get(str(part)) if cls else None
        if field is None:
            return []
        cls = submodel(field.annotation)
        if cls is None:
            return []
    return list(cls.model_fields)


def submodel(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside Optional[...] / list[...], if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        m = submodel(arg)
        if m is not None:
            return m
    return None


def validation_error(exc: ValidationError, path: Path, lines: dict[tuple, int], where: tuple, candidates: list[tuple],
                     model: type[BaseModel]) -> RecipeError:
    # an unknown key usually explains the rest (a misspelt required key is also "missing"): show it first
    errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
    first = format_error(errors[0], path, lines, where, candidates, model)
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    return RecipeError(first + more)
