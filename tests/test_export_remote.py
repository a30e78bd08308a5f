"""The Hub export: modeling_normswap.py matches normswap's maths and reloads a checkpoint with
identical outputs in a Python where `import normswap` fails."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import normswap
from normswap.errors import NormswapError
from normswap.export.remote import AUTO_MAP, MODELING_FILE, TEMPLATE, export_for_hub, modeling_source
from normswap.loading import save
from normswap.modules import DyT, FixedNorm, RMSNorm
from tiny_models import tiny_inputs, tiny_model


def _template():
    spec = importlib.util.spec_from_file_location("normswap_template_modeling", TEMPLATE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("weight,bias,recenter", [(True, True, False), (True, False, True), (False, False, False), (False, True, True)])
def test_template_norms_equal_normswap_modules(weight, bias, recenter):
    t = _template()
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16) * 3 + 0.5
    for ours, theirs in ((RMSNorm(16, 1e-5, weight=weight, bias=bias, recenter=recenter), t.RMSNorm(16, 1e-5, weight=weight, bias=bias, recenter=recenter)),
                         (DyT(16, alpha=0.7, weight=weight, bias=bias, recenter=recenter), t.DyT(16, alpha=0.7, weight=weight, bias=bias, recenter=recenter)),
                         (FixedNorm(16, 2.5, weight=weight, bias=bias, recenter=recenter, center=not recenter),
                          t.FixedNorm(16, 2.5, weight=weight, bias=bias, recenter=recenter, center=not recenter))):
        with torch.no_grad():
            for p in ours.parameters():
                p.copy_(torch.randn_like(p))
        theirs.load_state_dict(ours.state_dict(), strict=True)
        assert torch.equal(ours(x), theirs(x))  # autograd: the defining formulas
        assert torch.equal(ours(x.to(torch.bfloat16)), theirs(x.to(torch.bfloat16)))
        with torch.no_grad():  # inference: the same fast forms (small inputs: normswap's eager kernel)
            assert torch.equal(ours(x), theirs(x))
            assert torch.equal(ours(x.to(torch.bfloat16)), theirs(x.to(torch.bfloat16)))


def test_template_centred_embedding_and_new_norm_match():
    from normswap.modules import CenteredEmbedding, new_norm

    t = _template()
    a, b = CenteredEmbedding(10, 8), t.CenteredEmbedding(10, 8)
    b.load_state_dict(a.state_dict())
    ids = torch.tensor([[1, 2, 9]])
    assert torch.equal(a(ids), b(ids))
    spec = {"type": "rmsnorm", "dim": 8, "eps": 1e-6, "weight": False, "bias": True, "recenter": True}
    assert type(new_norm(spec)).__name__ == type(t.new_norm(spec)).__name__
    assert new_norm(spec).eps == t.new_norm(spec).eps


def test_template_never_imports_normswap():
    src = modeling_source()
    assert not re.search(r"^\s*(import|from)\s+normswap\b", src, re.M)
    assert f'NORMSWAP_VERSION = "{normswap.__version__}"' in src


def _converted(tmp_path: Path, name: str, to: str) -> tuple[torch.nn.Module, Path]:
    # DyT with a constant alpha (no calibration search: the export does not care how alpha was found)
    model, result = normswap.convert(tiny_model(name), to, **({"alpha_init": 0.7} if to == "dyt" else {}))
    out = tmp_path / f"{name}-{to}"
    save(model, out, result.record)
    return model, out


_CHILD = textwrap.dedent("""
    import json, sys
    sys.modules["normswap"] = None          # `import normswap` raises ImportError from here on
    try:
        import normswap
    except ImportError:
        pass
    else:
        raise SystemExit("normswap is importable")
    import torch, transformers
    for case in json.loads(sys.argv[1]):
        model = getattr(transformers, case["auto"]).from_pretrained(case["folder"], trust_remote_code=True)
        x = torch.load(case["inputs"], weights_only=True)
        with torch.no_grad():
            o = model(**x)
        y = o.logits if getattr(o, "logits", None) is not None else o.last_hidden_state
        torch.save({"y": y, "cls": type(model).__name__,
                    "norms": sorted({type(m).__name__ for m in model.modules() if type(m).__name__ in ("RMSNorm", "DyT", "LayerNorm", "FixedNorm")})},
                   case["out"])
""")

# (tiny model, target, Auto class used by the child, what the reference output is)
CASES = [("gpt2", "dyt", "AutoModelForCausalLM", "logits"), ("gpt2", "rmsnorm", "AutoModelForCausalLM", "logits"),
         ("bert", "dyt", "AutoModelForMaskedLM", "logits"), ("gpt_neox", "rmsnorm", "AutoModelForCausalLM", "logits"),
         ("gpt2", "dyt", "AutoModel", "body"), ("gemma", "rmsnorm", "AutoModelForCausalLM", "logits"),
         ("bert", "none", "AutoModelForMaskedLM", "logits"), ("llama", "none", "AutoModelForCausalLM", "logits")]
NORM_CLASSES = {"dyt": {"DyT"}, "rmsnorm": {"RMSNorm"}, "none": set()}  # what each target leaves


@pytest.fixture(scope="module")
def reloaded(tmp_path_factory):
    """Every case exported, then reloaded in ONE child process where normswap cannot be imported."""
    root = tmp_path_factory.mktemp("remote")
    cases, expected = [], []
    for i, (name, to, auto, what) in enumerate(CASES):
        d = root / f"case{i}"
        d.mkdir()
        model, folder = _converted(d, name, to)
        export = d / "export"
        files = export_for_hub(folder, export, card="---\nlibrary_name: transformers\n---\n# card\n")
        x = tiny_inputs(model)
        torch.save(x, d / "x.pt")
        with torch.no_grad():
            want = model(**x).logits if what == "logits" else model.transformer(**x).last_hidden_state
        cases.append({"folder": str(export), "auto": auto, "inputs": str(d / "x.pt"), "out": str(d / "y.pt")})
        expected.append({"model": model, "export": export, "files": files, "x": x, "want": want})
    script = root / "child.py"
    script.write_text(_CHILD)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(root / "modules")}
    proc = subprocess.run([sys.executable, str(script), json.dumps(cases)], capture_output=True, text=True, timeout=600, cwd=root, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [(c, e, torch.load(c["out"], weights_only=True)) for c, e in zip(cases, expected)]


@pytest.mark.parametrize("i", range(len(CASES)), ids=[f"{n}-{t}-{a}" for n, t, a, _ in CASES])
def test_remote_code_export_reloads_identically_without_normswap(reloaded, i):
    name, to, auto, what = CASES[i]
    case, exp, got = reloaded[i]
    assert {"config.json", "model.safetensors", MODELING_FILE, "README.md"} <= set(exp["files"])
    cfg = json.loads((exp["export"] / "config.json").read_text())
    assert cfg["auto_map"] == AUTO_MAP and "normswap" in cfg
    assert got["cls"] == (type(exp["model"]).__name__ if what == "logits" else "GPT2Model")
    assert torch.equal(got["y"], exp["want"])
    assert "LayerNorm" not in got["norms"] and NORM_CLASSES[to] <= set(got["norms"])
    if to == "none":  # fixed scales at most, where they could not fold (BERT's stream, a tied head)
        assert set(got["norms"]) <= {"FixedNorm"}
    if what == "logits":  # normswap itself still loads the export (the record is untouched)
        with torch.no_grad():
            assert torch.equal(normswap.load(exp["export"])(**exp["x"]).logits, exp["want"])


def test_export_refuses_plain_checkpoints_and_foreign_folders(tmp_path):
    plain = tmp_path / "plain"
    tiny_model("gpt2").save_pretrained(plain)
    with pytest.raises(NormswapError, match="not a converted checkpoint"):
        export_for_hub(plain, tmp_path / "x")
    with pytest.raises(NormswapError, match="not a model folder"):
        export_for_hub(tmp_path, tmp_path / "x")
    _, folder = _converted(tmp_path, "gpt2", "rmsnorm")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "precious.txt").write_text("keep")
    with pytest.raises(NormswapError, match="not an earlier normswap export"):
        export_for_hub(folder, tmp_path / "busy")
    assert (tmp_path / "busy" / "precious.txt").exists()


def test_export_leaves_training_artefacts_out(tmp_path):
    _, folder = _converted(tmp_path, "gpt2", "rmsnorm")
    (folder / "checkpoints" / "step-1").mkdir(parents=True)
    (folder / "checkpoints" / "step-1" / "optimizer.safetensors").write_bytes(b"x")
    for f in ("train_log.jsonl", "finetune_config.json", "finetune_result.json", "loss_curve.png"):
        (folder / f).write_text("{}")
    files = export_for_hub(folder, tmp_path / "export")
    assert not any(f.startswith("checkpoints") or f in ("train_log.jsonl", "finetune_config.json", "loss_curve.png") for f in files)


def test_template_mean_keeping_rmsnorm_and_centred_block_input_match():
    """The two structural changes of issue 12: RMSNorm(center=True) is LayerNorm itself, and a
    block whose input is centred; the Hub template must compute both exactly as normswap does."""
    from normswap.modules import center_input

    t = _template()
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16) * 2 + 0.7
    ours, theirs = RMSNorm(16, 1e-5, weight=True, bias=True, center=True), t.RMSNorm(16, 1e-5, weight=True, bias=True, center=True)
    ln = torch.nn.LayerNorm(16, eps=1e-5)
    with torch.no_grad():
        for p, q in zip(ours.parameters(), ln.parameters()):
            p.copy_(torch.randn_like(p))
            q.copy_(p)
    theirs.load_state_dict(ours.state_dict())
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))
        torch.testing.assert_close(ours(x), ln(x), rtol=1e-5, atol=1e-6)
    a, b = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)
    b.load_state_dict(a.state_dict())
    center_input(a)
    t.center_input(b)
    with torch.no_grad():
        assert torch.equal(a(x), b(x)) and torch.equal(a(x), torch.nn.functional.linear(x - x.mean(-1, keepdim=True), b.weight, b.bias))
