"""Family tables checked against real (tiny) models: every named module exists and a forward-hook
check confirms that each listed reader consumes the norm's output."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from normswap.archs import Family, NormSpec, get_family, register_family
from normswap.archs.plan import build_plan, check_readers
from normswap.surgery.paths import get_module
from tiny_models import POST_LN, PRE_LN, TINY, tiny_inputs, tiny_model


@pytest.mark.parametrize("name", list(TINY))
def test_table_matches_model(name):
    model = tiny_model(name)
    plan = build_plan(model)
    assert plan.known and plan.sites
    # Every LayerNorm / RMSNorm of the model is covered by the table.
    norms = [n for n, m in model.named_modules() if isinstance(m, nn.LayerNorm) or type(m).__name__.endswith("RMSNorm")]
    assert sorted(s.path for s in plan.sites) == sorted(norms)
    assert plan.writers and plan.embed_writers
    for site in plan.sites:
        for reader in site.readers:
            get_module(model, reader)  # raises if absent
    assert check_readers(model, plan, tiny_inputs(model)) == {}


@pytest.mark.parametrize("name", PRE_LN + POST_LN)
def test_style(name):
    assert build_plan(tiny_model(name)).style == ("pre" if name in PRE_LN else "post")


def test_hook_check_catches_a_wrong_table():
    model = tiny_model("gpt2")
    plan = build_plan(model)
    wrong = plan.sites[0]
    wrong.readers = ["transformer.h.0.mlp.c_fc"]  # reads ln_2, not ln_1
    assert check_readers(model, plan, tiny_inputs(model)) == {wrong.path: ["transformer.h.0.mlp.c_fc"]}


def test_unknown_family_is_discovered():
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    model = GPTNeoForCausalLM(GPTNeoConfig(hidden_size=32, num_layers=2, num_heads=2, attention_types=[[["global"], 2]], vocab_size=100, max_position_embeddings=64))
    plan = build_plan(model)
    assert plan.family is None and plan.source == "discovery" and plan.style == "pre"
    assert [s.placement for s in plan.sites] == ["pre", "pre", "pre", "pre", "final"]
    assert all(s.centred for s in plan.sites)


def test_register_family_from_outside_makes_conversion_exact():
    """A user-registered table (GPT-Neo) gets the full exact treatment."""
    import normswap
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    neo = Family(
        model_type="gpt_neo", style="pre", blocks="h",
        block_norms=(NormSpec("ln_1", "pre", ("attn.attention.q_proj", "attn.attention.k_proj", "attn.attention.v_proj")),
                     NormSpec("ln_2", "pre", ("mlp.c_fc",))),
        block_writers=("attn.attention.out_proj", "mlp.c_proj"), embed_writers=("wte", "wpe"),
        model_norms=(NormSpec("ln_f", "final", ("@head",)),),
    )
    register_family(neo)
    try:
        torch.manual_seed(0)
        model = GPTNeoForCausalLM(GPTNeoConfig(hidden_size=32, num_layers=2, num_heads=2, attention_types=[[["global"], 2]], vocab_size=100, max_position_embeddings=64)).eval()
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "ln" in n:
                    p.add_(torch.randn_like(p) * 0.3)
        x = {"input_ids": torch.randint(0, 100, (2, 10))}
        with torch.no_grad():
            ref = model(**x).logits
        assert check_readers(model, build_plan(model), x) == {}
        model, result = normswap.convert(model, "rmsnorm", fold=True, tied_head="untie")
        with torch.no_grad():
            got = model(**x).logits
        assert result.record.exact
        assert float((got - ref).abs().max() / ref.abs().max()) < 1e-5
    finally:
        from normswap.archs import _REGISTRY

        _REGISTRY.pop("gpt_neo", None)
    assert get_family("gpt_neo") is None
