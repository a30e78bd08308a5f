"""`normswap export --stock`: an exact conversion written as a plain checkpoint of its original
class, loaded back by stock transformers (no normswap class, no remote code) with the converted
model's outputs and the original's; every conversion no stock class can hold refused with why."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
import typer
from torch import nn

import normswap
from normswap.errors import NormswapError
from normswap.export import export_stock, stock_blockers
from normswap.export.card import build_card, build_stock_card, install_line
from normswap.loading import read_record, save
from cli_util import debris, refused, run_cli
from tiny_models import model_output, rel_error, tiny_inputs, tiny_model

TOL = 1e-5


def _convert(tmp: Path, name: str, to: str = "rmsnorm", overrides: dict | None = None, **kw):
    """A tiny model, its inputs and reference output, converted and saved to tmp/<name>-<to>."""
    original = tiny_model(name, **(overrides or {}))
    x = tiny_inputs(original)
    ref = model_output(original, x)
    model, result = normswap.convert(original, to, **kw)
    folder = tmp / f"{name}-{to}-{'-'.join(f'{k}{v}' for k, v in kw.items())}"
    save(model, folder, result.record)
    return folder, x, ref


def _plain(out: Path, arch: str):
    """The export as stock transformers loads it, with proof that no normswap class is involved."""
    cfg = json.loads((out / "config.json").read_text())
    assert "normswap" not in cfg and "auto_map" not in cfg and cfg["model_type"] != "normswap"
    assert not (out / "modeling_normswap.py").exists()
    model = getattr(transformers, arch).from_pretrained(out)
    assert not [m for m in model.modules() if type(m).__module__.startswith("normswap")]
    return model.eval(), cfg


@pytest.fixture(scope="module")
def gpt2_untied(tmp_path_factory):
    return _convert(tmp_path_factory.mktemp("gpt2"), "gpt2", fold=True, tied_head="untie")


def test_gpt2_untied_is_a_plain_gpt2_with_the_same_logits(gpt2_untied, tmp_path, one_thread):
    folder, x, ref = gpt2_untied
    out = tmp_path / "stock"
    assert stock_blockers(folder) == []
    info = export_stock(folder, out)
    lm = transformers.AutoModelForCausalLM.from_pretrained(out)
    plain, cfg = _plain(out, "GPT2LMHeadModel")
    assert type(lm).__name__ == "GPT2LMHeadModel" and lm.config.model_type == cfg["model_type"] == "gpt2"
    assert cfg["tie_word_embeddings"] is False and lm.lm_head.weight is not lm.transformer.wte.weight
    got = model_output(lm, x)
    assert rel_error(model_output(normswap.load(folder), x), got) <= TOL
    assert rel_error(ref, got) <= TOL  # the conversion was exact, so the stock export is the original's function
    assert info["max_rel_diff"] <= TOL and info["tokens"] > 0 and "model.safetensors" in info["files"]
    # lm_head has no bias in GPT-2: the bias folded into it moved back into ln_f; every other norm is weight 1, bias 0
    assert info["moved_biases"] == {"transformer.ln_f": ["lm_head"]} and lm.lm_head.bias is None
    for name, m in lm.named_modules():
        if isinstance(m, nn.LayerNorm):
            assert torch.equal(m.weight, torch.ones_like(m.weight)), name
            assert (name == "transformer.ln_f") != torch.equal(m.bias, torch.zeros_like(m.bias)), name


def test_its_layernorms_are_rmsnorms(gpt2_untied, tmp_path, one_thread):
    """The card's claim: every norm reads a zero-mean stream, so swapping each stock LayerNorm for
    RMSNorm (same eps, weight, bias) leaves the logits as they are."""
    from normswap.modules import RMSNorm
    from normswap.surgery.paths import set_module

    folder, x, ref = gpt2_untied
    export_stock(folder, tmp_path / "stock")
    lm, _ = _plain(tmp_path / "stock", "GPT2LMHeadModel")
    before = model_output(lm, x)
    for name, m in [(n, m) for n, m in lm.named_modules() if isinstance(m, nn.LayerNorm)]:
        rms = RMSNorm(m.normalized_shape[0], m.eps, weight=True, bias=True)
        rms.load_state_dict(m.state_dict())
        set_module(lm, name, rms)
    assert not any(isinstance(m, nn.LayerNorm) for m in lm.modules())
    assert rel_error(before, model_output(lm, x)) <= TOL and rel_error(ref, model_output(lm, x)) <= TOL


@pytest.mark.parametrize("name,neutral", [("llama", 1.0), ("gemma", 0.0)])
def test_rmsnorm_family_folded_is_a_plain_checkpoint_with_unit_gains(tmp_path, name, neutral, one_thread):
    """Llama's folded gains are all ones; Gemma stores (1 + w), so its are all zero."""
    folder, x, ref = _convert(tmp_path, name, overrides={"tie_word_embeddings": True}, fold=True, tied_head="untie")
    arch = read_record(folder)[0].architecture
    info = export_stock(folder, tmp_path / "stock")
    lm, cfg = _plain(tmp_path / "stock", arch)
    assert cfg["model_type"] == name and cfg["tie_word_embeddings"] is False and info["moved_biases"] == {}
    norms = [m for m in lm.modules() if type(m).__name__.endswith("RMSNorm")]
    assert len(norms) == 5 and all(torch.equal(m.weight, torch.full_like(m.weight, neutral)) for m in norms)
    assert rel_error(ref, model_output(lm, x)) <= TOL
    assert rel_error(model_output(normswap.load(folder), x), model_output(lm, x)) <= TOL


@pytest.mark.parametrize("name,kw,tied", [("llama", {"tied_head": "auto"}, True), ("gpt2", {"tied_head": "untie"}, False)])
def test_unfolded_conversions_keep_their_affine_in_the_stock_norms(tmp_path, name, kw, tied, one_thread):
    folder, x, ref = _convert(tmp_path, name, overrides={"tie_word_embeddings": True}, fold=False, **kw)
    arch = read_record(folder)[0].architecture
    export_stock(folder, tmp_path / "stock")
    lm, cfg = _plain(tmp_path / "stock", arch)
    assert cfg["tie_word_embeddings"] is tied
    assert (lm.get_output_embeddings().weight is lm.get_input_embeddings().weight) == tied
    ones = [torch.equal(m.weight, torch.ones_like(m.weight)) for m in lm.modules() if hasattr(m, "weight") and "Norm" in type(m).__name__]
    assert ones and not any(ones)  # the randomised gains are still there
    assert rel_error(ref, model_output(lm, x)) <= TOL


@pytest.mark.parametrize("name", ["falcon-new", "opt", "gptj"])
def test_folded_biases_without_a_stock_slot_move_back_into_their_norm(tmp_path, name, one_thread):
    """Falcon's linears have no bias at all (two norms per block, each read by its own reader),
    OPT's and GPT-J's LM heads neither: each folded bias returns to the norm its reader reads."""
    folder, x, ref = _convert(tmp_path, name, fold=True, tied_head="untie")
    record = read_record(folder)[0]
    info = export_stock(folder, tmp_path / "stock")
    lm, _ = _plain(tmp_path / "stock", record.architecture)
    moved = {r for readers in info["moved_biases"].values() for r in readers}
    assert moved and moved <= set(record.new_biases)
    assert all(getattr(lm.get_submodule(r), "bias", None) is None for r in moved)
    if name == "falcon-new":
        assert info["moved_biases"]["transformer.h.0.ln_attn"] == ["transformer.h.0.self_attention.query_key_value"]
        assert info["moved_biases"]["transformer.h.0.ln_mlp"] == ["transformer.h.0.mlp.dense_h_to_4h"]
    assert rel_error(ref, model_output(lm, x)) <= TOL


def test_bfloat16_export_is_bounded_by_bfloat16_rounding(tmp_path, one_thread):
    """A bf16 checkpoint: the bias moved back into ln_f is rounded to bf16 once more, so the bound
    is bf16's (2^-6, the conversion's own); the export stays as close to the original as the
    converted checkpoint is."""
    folder, x, ref = _convert(tmp_path, "gpt2", fold=True, tied_head="untie", dtype="bfloat16")
    info = export_stock(folder, tmp_path / "stock")
    lm, cfg = _plain(tmp_path / "stock", "GPT2LMHeadModel")
    assert cfg["dtype"] == "bfloat16" and lm.dtype == torch.bfloat16 and info["tolerance"] == 2.0 ** -6
    assert 0 < info["max_rel_diff"] <= 2.0 ** -6 and info["moved_biases"] == {"transformer.ln_f": ["lm_head"]}
    converted = rel_error(ref, model_output(normswap.load(folder).float(), x))
    assert rel_error(ref, model_output(lm.float(), x)) <= 2 * converted


# ------------------------------------------------------------------------------------------ refusals

REFUSED = [
    ("gpt2", "dyt", {"alpha_init": 0.7}, "DyT"),
    ("gpt2", "rmsnorm", {"fold": True}, "--tied-head untie"),  # default center-embed: lookups centred on the fly
    ("bert", "rmsnorm", {"fold": True}, "not exact"),  # Post-LN: an approximation
    ("whisper", "rmsnorm", {"fold": True, "tied_head": "untie"}, "mean-subtract their input"),
    ("bloom", "rmsnorm", {"fold": True, "tied_head": "untie"}, "re-centre their output"),
    ("gpt2", "none", {"tied_head": "untie"}, "removed"),  # --to none: no norm is left where the stock class has one
]


@pytest.mark.parametrize("name,to,kw,why", REFUSED, ids=[f"{r[0]}-{r[3].split()[0]}" for r in REFUSED])
def test_refused_with_the_reason_and_nothing_written(tmp_path, name, to, kw, why, one_thread):
    folder, _, _ = _convert(tmp_path, name, to, **kw)
    reasons = stock_blockers(folder)
    assert any(why in r for r in reasons), reasons
    assert stock_blockers(read_record(folder)[0]) == reasons  # all of these are in the record itself
    with pytest.raises(NormswapError, match="no stock") as err:
        export_stock(folder, tmp_path / "stock")
    assert why in str(err.value)
    assert not (tmp_path / "stock").exists() and debris(tmp_path) == []


def test_a_removed_norm_is_refused(gpt2_untied):
    import dataclasses

    record = read_record(gpt2_untied[0])[0]
    assert stock_blockers(record) == []
    record.sites[0] = dataclasses.replace(record.sites[0], type="identity")
    assert stock_blockers(record) == ["1 norm removed (e.g. transformer.h.0.ln_1): a stock GPT2LMHeadModel applies a norm there"]


def test_an_eps_the_stock_config_does_not_have_is_refused(gpt2_untied, tmp_path):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(gpt2_untied[0], folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["layer_norm_epsilon"] = 1e-6  # the base config; the sites recorded 1e-5
    (folder / "config.json").write_text(json.dumps(cfg))
    reasons = stock_blockers(folder)
    assert reasons and all("eps 1e-05" in r for r in reasons)


def test_an_export_that_does_not_match_is_never_moved_into_place(gpt2_untied, tmp_path, monkeypatch):
    """Verification runs on the staged folder: a wrong stock parameter (here every norm weight
    off by 0.5) is an error, and neither the destination nor a staging folder is left."""
    from normswap.export import stock

    monkeypatch.setattr(stock, "_neutral_gain", lambda mod, site: 0.5)
    with pytest.raises(NormswapError, match="differs from the converted checkpoint.*nothing was written"):
        export_stock(gpt2_untied[0], tmp_path / "stock")
    assert not (tmp_path / "stock").exists() and debris(tmp_path) == []


def test_existing_output_needs_overwrite(gpt2_untied, tmp_path):
    out = tmp_path / "stock"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(NormswapError, match="exists"):
        export_stock(gpt2_untied[0], out)
    export_stock(gpt2_untied[0], out, overwrite=True)
    assert not (out / "old.txt").exists() and (out / "model.safetensors").is_file()
    with pytest.raises(NormswapError, match="checkpoint itself"):
        export_stock(gpt2_untied[0], gpt2_untied[0], overwrite=True)


# ------------------------------------------------------------------------------------------ cards

def test_cards_show_no_local_path(tmp_path, one_thread):
    """A conversion of a local folder: both cards name it "a local checkpoint", never its path."""
    src = tmp_path / "private-models" / "my-gpt2"
    tiny_model("gpt2").save_pretrained(src)
    model, result = normswap.convert(str(src), "rmsnorm", fold=True, tied_head="untie")
    assert result.record.source["model"] == str(src)
    folder = tmp_path / "rms"
    save(model, folder, result.record)
    info = export_stock(folder, tmp_path / "stock")
    stock_card = (tmp_path / "stock" / "README.md").read_text()
    remote_card = build_card(folder, "me/gpt2-rms")
    for card in (stock_card, remote_card, build_card(folder, None)):
        assert str(tmp_path) not in card and "private-models" not in card and "a local checkpoint" in card.lower()
        assert "file://" not in card and "base_model" not in card.split("---")[1]
    assert "zero-mean stream, and so equal RMSNorm" in stock_card and "without normswap" in stock_card
    assert "weight is 1 and bias 0" in stock_card and "--tied-head untie" in stock_card
    assert "normswap-stock-export" in stock_card and f"{info['max_rel_diff']:.2g}" in stock_card
    assert stock_card == build_stock_card(folder, info)  # what export_stock wrote
    # nor does any other file of the stock export (config.json has no normswap section with the source)
    assert [f.name for f in (tmp_path / "stock").iterdir() if b"private-models" in f.read_bytes()] == []


def test_stock_card_names_a_hub_source(gpt2_untied, tmp_path):
    import shutil

    import yaml

    folder = tmp_path / "m"
    shutil.copytree(gpt2_untied[0], folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["normswap"]["source"] = {"model": "openai-community/gpt2", "revision": None}
    (folder / "config.json").write_text(json.dumps(cfg))
    card = build_stock_card(folder, {"max_rel_diff": 3e-7, "tokens": 512, "output": "logits"}, repo_id="me/gpt2-stock")
    assert yaml.safe_load(card.split("---")[1])["base_model"] == "openai-community/gpt2"
    assert 'from_pretrained("me/gpt2-stock")' in card and "trust_remote_code" not in card


class _Dist:
    def __init__(self, direct_url: dict | None, holds: bool = True):
        self.direct_url, self.holds = direct_url, holds

    def read_text(self, name):
        return json.dumps(self.direct_url) if name == "direct_url.json" and self.direct_url is not None else None

    def locate_file(self, path):
        return Path(normswap.__file__) if self.holds else Path("/elsewhere/normswap/__init__.py")


@pytest.mark.parametrize("dists,want,unwanted", [
    ([_Dist({"dir_info": {"editable": True}, "url": "file:///home/someone/src/normswap"})], "from its source", "someone"),
    ([_Dist(None, holds=False), _Dist({"dir_info": {}, "url": "file:///opt/x"})], "from its source", "/opt/x"),
    ([_Dist(None, holds=False)], "from its source", "pip install normswap=="),  # an egg-info of a checkout
    ([_Dist(None)], f"pip install normswap=={normswap.__version__}", "source"),
    ([_Dist({"vcs_info": {"vcs": "git", "commit_id": "abc123"}, "url": "https://github.com/o/normswap.git"})],
     "pip install 'git+https://github.com/o/normswap.git@abc123'", "source"),
    ([_Dist({"vcs_info": {"vcs": "git", "commit_id": "abc"}, "url": "https://user:tok@host/normswap.git"})], "from its source", "tok"),
])
def test_install_line_works_for_how_normswap_was_installed(monkeypatch, dists, want, unwanted):
    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "distributions", lambda **kw: iter(dists))
    line = install_line()
    assert want in line and unwanted not in line, line


# ------------------------------------------------------------------------------------------ CLI

@pytest.fixture
def cli_with_export(monkeypatch):
    """The real entry point (exit codes, one-line errors) on an app with `export` registered."""
    from normswap import cli
    from normswap.commands import export

    app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
    app.callback()(cli._root)
    export.register(app)
    monkeypatch.setattr(cli, "app", app)


def test_cli_export(cli_with_export, gpt2_untied, tmp_path, monkeypatch, capsys, one_thread):
    folder = gpt2_untied[0]
    code, out, err = run_cli(["export", folder, tmp_path / "stock", "--stock", "--format", "json"], monkeypatch, capsys)
    assert code == 0, err
    info = json.loads(out)
    assert info["kind"] == "stock" and info["model_type"] == "gpt2" and info["max_rel_diff"] <= TOL
    code, _, err = run_cli(["export", folder, tmp_path / "stock", "--stock"], monkeypatch, capsys)
    refused(code, err, "exists (use --overwrite", exit_code=2)
    code, out, err = run_cli(["export", folder, tmp_path / "stock", "--stock", "--overwrite"], monkeypatch, capsys)
    assert code == 0 and "GPT2LMHeadModel" in out and "moved back into transformer.ln_f" in out, err

    code, out, err = run_cli(["export", folder, tmp_path / "hub"], monkeypatch, capsys)  # the remote-code export
    assert code == 0 and "remote-code" in out, err
    assert (tmp_path / "hub" / "modeling_normswap.py").is_file() and str(tmp_path) not in (tmp_path / "hub" / "README.md").read_text()
    assert json.loads((tmp_path / "hub" / "config.json").read_text())["auto_map"]
    code, _, err = run_cli(["export", folder, tmp_path / "hub"], monkeypatch, capsys)
    refused(code, err, "--overwrite", exit_code=2)


def test_cli_export_refusal_is_one_line(cli_with_export, tmp_path, monkeypatch, capsys, one_thread):
    folder, _, _ = _convert(tmp_path, "gpt2", fold=True)  # center-embed
    code, _, err = run_cli(["export", folder, tmp_path / "stock", "--stock"], monkeypatch, capsys)
    line = refused(code, err, "convert with --tied-head untie", exit_code=2)
    assert "no stock GPT2LMHeadModel" in line and not (tmp_path / "stock").exists()
    code, _, err = run_cli(["export", tmp_path / "missing", tmp_path / "stock", "--stock"], monkeypatch, capsys)
    refused(code, err, "is not a folder", exit_code=2)


# ------------------------------------------------------------------------------------------ real asset

def test_standin_stock_export_has_the_original_logits(standin_path, tmp_path, one_thread):
    """The GPT-2 stand-in (a trained model: ln_f's bias moves back through a real 50257 x 128 head)."""
    from normswap.loading import load_pretrained, load_tokenizer
    from normswap.samples import model_inputs
    from normswap.verification import compare

    model, result = normswap.convert(str(standin_path), "rmsnorm", fold=True, tied_head="untie")
    save(model, tmp_path / "rms", result.record)
    info = export_stock(tmp_path / "rms", tmp_path / "stock")
    assert info["max_rel_diff"] <= TOL and info["moved_biases"] == {"transformer.ln_f": ["lm_head"]}
    assert {"tokenizer.json", "generation_config.json", "README.md"} <= set(info["files"])
    lm, _ = _plain(tmp_path / "stock", "GPT2LMHeadModel")
    original = load_pretrained(str(standin_path))
    batches = model_inputs(original, tokenizer=load_tokenizer(str(standin_path)), n_tokens=1024, block=256, batch_size=2, seed=3,
                           what="verification")
    figures = compare(original, lm, batches)
    assert figures["max_rel_diff"] <= TOL and figures["tokens"] == 1024
    assert abs(figures["ppl_converted"] / figures["ppl_original"] - 1) < 1e-5
