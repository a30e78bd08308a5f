"""Sharded fine-tuning: `accelerate launch --config_file recipes/accelerate/fsdp-cpu-gloo.yaml -m normswap
finetune ...` (FSDP2, full sharding, two CPU processes over gloo) against one process with the same
global batch, on a tiny GPT-2 (tied head, LayerNorm -> DyT) and a tiny Llama (RMSNorm -> DyT): the same
final weights within float32 rounding, DyT's 0-dim alphas trained and saved 0-dim, the teacher
sharded too, and a checkpoint written under FSDP resumed (under FSDP) to the same final weights.

Each launch starts two Python processes (about 10-20 s on a shared 2-core machine).
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import normswap
from normswap.training import finetune
from normswap.training.tiny import make_tiny_pair, tiny_corpus, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
CPU_CONFIG = ROOT / "recipes" / "accelerate" / "fsdp-cpu-gloo.yaml"
ACCELERATE = Path(sys.executable).parent / "accelerate"
# float32 rounding: the sharded run reduces gradients in another order (reduce-scatter of per-rank
# means vs one mean over the global batch); measured max |diff| 5.6e-8 (GPT-2) and 1.3e-7 (Llama) after
# 4 AdamW steps at lr 3e-3; the resumed FSDP run matched the uninterrupted one exactly (0)
ATOL = 1e-5
STEPS, PER_PROCESS, PROCESSES = 4, 2, 2
COMMON = dict(objective="lm=0.5,distill=0.5", steps=STEPS, block_size=16, lr=3e-3, val_examples=4, save_every=2, log_every=1)

pytestmark = pytest.mark.usefixtures("one_thread")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list, *, timeout: float = 300, launcher: tuple = ()) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file fsdp-cpu-gloo.yaml [LAUNCHER] -m normswap finetune ARGS` as a user runs it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [str(ACCELERATE), "launch", "--config_file", str(CPU_CONFIG), "--main_process_port", str(_free_port()),
           *launcher, "-m", "normswap", "finetune", *map(str, args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def _cli_args(student, teacher, data, out, **extra) -> list:
    s = dict(COMMON, batch_size=PER_PROCESS, **extra)
    args = [student, "--teacher", teacher, "--data", data, "--out", out, "--format", "json"]
    for k, v in s.items():
        args += [f"--{k.replace('_', '-')}", v]
    return args


def _llama_pair(root: Path) -> tuple[Path, Path]:
    """A tiny Llama teacher and its student with every RMSNorm a DyT (0-dim alpha) from its gain."""
    from tiny_models import tiny_model

    from normswap.modules import DyT
    from normswap.record import ConversionRecord, SiteRecord
    from normswap.surgery.paths import set_module

    tok = tiny_tokenizer()
    teacher = tiny_model("llama", vocab_size=len(tok), bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    t_path, s_path = root / "tiny-llama", root / "tiny-llama-dyt"
    teacher.save_pretrained(str(t_path))
    tok.save_pretrained(str(t_path))
    student = copy.deepcopy(teacher)
    sites = []
    for path, m in list(student.named_modules()):
        if type(m).__name__.endswith("RMSNorm"):
            dyt = DyT(m.weight.shape[0], alpha=0.8)
            with torch.no_grad():
                dyt.weight.copy_(m.weight)
                dyt.bias.zero_()
            set_module(student, path, dyt)
            sites.append(SiteRecord(path=path, placement="final" if path == "model.norm" else "pre", type="dyt", dim=dyt.dim,
                                    eps=None, weight=True, bias=True, method="alpha-init"))
    record = ConversionRecord(target="dyt", base_model_type="llama", architecture=type(student).__name__, family="llama",
                              style="pre", exact=False, sites=sites, source={"model": "tiny"}, version=normswap.__version__)
    normswap.save(student, s_path, record, tokenizer=tok)
    return t_path, s_path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fsdp-data") / "corpus.txt"
    path.write_text(tiny_corpus(300))
    return path


@pytest.fixture(scope="module")
def gpt2_pair(tmp_path_factory):
    return make_tiny_pair(tmp_path_factory.mktemp("fsdp-gpt2"), "causal")


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory):
    return _llama_pair(tmp_path_factory.mktemp("fsdp-llama"))


@pytest.fixture(scope="module")
def gpt2_sharded(gpt2_pair, corpus, tmp_path_factory):
    """One FSDP run of the GPT-2 pair, checkpoints kept (the resume test continues from them)."""
    teacher, student = gpt2_pair
    out = tmp_path_factory.mktemp("fsdp-gpt2-run") / "sharded"
    proc = launch(_cli_args(student, teacher, corpus, out, device="cpu") + ["--retain-checkpoints"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, json.loads(proc.stdout)


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype, k
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def _single(student, teacher, corpus, out) -> dict[str, torch.Tensor]:
    """The same run in one process, the whole global batch (2 processes x 2 examples) at once."""
    res = finetune(student, teacher=teacher, data=corpus, out=out, batch_size=PER_PROCESS * PROCESSES, **COMMON)
    assert res.status == "completed" and res.distributed == {"processes": 1, "type": "single"}
    return load_file(str(out / "model.safetensors"))


def _check_sharded_result(result: dict, out: Path, student: Path) -> dict[str, torch.Tensor]:
    assert result["status"] == "completed" and result["step"] == STEPS
    assert result["distributed"] == {"processes": PROCESSES, "type": "fsdp", "fsdp_version": 2}
    assert result["device"] == "cpu" and result["dtype"] == "float32" and result["teacher_dtype"] == "float32"
    assert result["tokens"] == STEPS * PER_PROCESS * PROCESSES * 16
    model = normswap.load(out)  # strict: every key and shape of the normswap format
    alphas = [m.alpha for m in model.modules() if isinstance(m, normswap.modules.DyT)]
    assert alphas and all(a.dim() == 0 for a in alphas)  # 1-element while sharded, 0-dim again when saved
    before, after = load_file(str(student / "model.safetensors")), load_file(str(out / "model.safetensors"))
    moved = [k for k in before if k.endswith("alpha") and float((after[k] - before[k]).abs()) > 100 * ATOL]
    assert moved, "DyT alphas did not train under FSDP"
    return after


def test_fsdp_gpt2_equals_single_process(gpt2_sharded, gpt2_pair, corpus, tmp_path):
    teacher, student = gpt2_pair
    out, result = gpt2_sharded
    sharded = _check_sharded_result(result, out, student)
    single = _single(student, teacher, corpus, tmp_path / "single")
    diff = _max_diff(sharded, single)
    print(f"gpt2: max |sharded - single| = {diff:.3g} (atol {ATOL:g})")
    assert diff <= ATOL
    start = load_file(str(student / "model.safetensors"))
    assert _max_diff(single, start) > 100 * ATOL  # the runs did train: the comparison means something


def test_fsdp_llama_equals_single_process(llama_pair, corpus, tmp_path):
    teacher, student = llama_pair
    out = tmp_path / "sharded"
    proc = launch(_cli_args(student, teacher, corpus, out))  # --device auto: the launcher's CPU processes
    assert proc.returncode == 0, proc.stderr[-4000:]
    sharded = _check_sharded_result(json.loads(proc.stdout), out, student)
    single = _single(student, teacher, corpus, tmp_path / "single")
    diff = _max_diff(sharded, single)
    print(f"llama: max |sharded - single| = {diff:.3g} (atol {ATOL:g})")
    assert diff <= ATOL


def test_fsdp_checkpoint_loads_and_resumes_to_the_same_weights(gpt2_sharded, gpt2_pair, corpus, tmp_path):
    teacher, student = gpt2_pair
    full, _ = gpt2_sharded
    ckpt = full / "checkpoints" / "step-0000002"
    # the checkpoint's weights are a normswap model's: 0-dim alphas, every name; they load strictly
    tensors = load_file(str(ckpt / "model.safetensors"))
    model = normswap.load(student)
    model.load_state_dict(tensors, strict=True)
    assert all(tensors[k].dim() == 0 for k in tensors if k.endswith("alpha"))
    assert json.loads((ckpt / "state.json").read_text())["optimizer_keys"] == "names"
    # the run as it stood after step 2 (as an interruption leaves it), continued under FSDP
    cut = tmp_path / "cut"
    cut.mkdir()
    shutil.copy2(full / "finetune_config.json", cut)
    shutil.copy2(full / "train_log.jsonl", cut)
    shutil.copytree(ckpt, cut / "checkpoints" / ckpt.name)
    proc = launch(_cli_args(student, teacher, corpus, cut, device="cpu") + ["--resume"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resumed from" in proc.stderr
    result = json.loads(proc.stdout)
    assert result["status"] == "completed" and result["step"] == STEPS
    diff = _max_diff(load_file(str(cut / "model.safetensors")), load_file(str(full / "model.safetensors")))
    print(f"gpt2 resume: max |resumed - uninterrupted| = {diff:.3g} (atol {ATOL:g})")
    assert diff <= ATOL
    steps = [json.loads(ln)["step"] for ln in (cut / "train_log.jsonl").read_text().splitlines() if json.loads(ln)["kind"] == "train"]
    assert steps == list(range(1, STEPS + 1))
    # an FSDP checkpoint is not resumed by one process (its optimizer state is keyed by name): one error line
    one = tmp_path / "one"
    shutil.copytree(ckpt, one / "checkpoints" / ckpt.name)
    shutil.copy2(full / "finetune_config.json", one)
    with pytest.raises(normswap.NormswapError, match="sharded"):
        finetune(student, teacher=teacher, data=corpus, out=one, resume=True, batch_size=PER_PROCESS, **COMMON)

def test_conflicting_device_under_a_multi_process_launch_is_an_error(gpt2_pair, corpus, tmp_path):
    teacher, student = gpt2_pair
    proc = launch(_cli_args(student, teacher, corpus, tmp_path / "o", device="cuda:1"), timeout=200)
    assert proc.returncode != 0
    errors = {ln for ln in proc.stderr.splitlines() if ln.startswith("error:")}
    assert errors and all("--device cuda:1" in e and "launcher" in e for e in errors), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr.split("error:")[0]
    assert not (tmp_path / "o").exists()


def test_fsdp_bf16_mixed_precision_with_gradient_checkpointing(gpt2_pair, corpus, tmp_path):
    """The GPU recipe's settings on CPU processes: bf16 mixed precision (the teacher's weights in bf16,
    sharded), gradient checkpointing; the saved model keeps the checkpoint's float32."""
    teacher, student = gpt2_pair
    out = tmp_path / "bf16"
    cmd = _cli_args(student, teacher, corpus, out) + ["--gradient-checkpointing"]
    proc = launch(cmd, launcher=("--mixed_precision", "bf16"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout)
    assert result["status"] == "completed" and result["distributed"]["type"] == "fsdp"
    assert (result["precision"], result["teacher_dtype"], result["dtype"]) == ("bfloat16", "bfloat16", "float32")
    assert result["gradient_checkpointing"] is True
    weights = load_file(str(out / "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in weights.values())
    normswap.load(out)
