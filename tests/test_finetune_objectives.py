"""Losses and parameter selection for recovery fine-tuning (objectives.py, params.py)."""
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

from normswap.errors import NormswapError
from normswap.training.objectives import Objective, hidden_mse, kl_loss, lm_loss, model_kind
from normswap.training.params import find_readers, param_groups, select_trainable


pytestmark = pytest.mark.usefixtures("one_thread")


def _gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=64)).eval()


def test_lm_loss_matches_transformers():
    model = _gpt2()
    ids = torch.randint(0, 100, (2, 10))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    out = model(input_ids=ids, labels=ids)
    assert torch.allclose(lm_loss(out.logits, batch, "causal"), out.loss, atol=1e-6)


def test_kl_is_zero_for_identical_models_and_positive_otherwise():
    a, b = _gpt2(0), _gpt2(1)
    ids = torch.randint(0, 100, (2, 10))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        la, lb = a(input_ids=ids).logits, b(input_ids=ids).logits
    assert float(kl_loss(la, la, mask, 2.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(kl_loss(la, lb, mask, 2.0)) > 1e-4
    # padding positions do not count
    mask2 = mask.clone()
    mask2[:, 5:] = 0
    lb2 = lb.clone()
    lb2[:, 5:] = la[:, 5:] + 10 * torch.randn_like(la[:, 5:])
    assert float(kl_loss(lb2, la, mask2, 2.0)) == pytest.approx(float(kl_loss(lb, la, mask2, 2.0)), rel=1e-5)


def test_hidden_mse_centring_ignores_per_token_mean():
    t = [torch.randn(2, 5, 8) for _ in range(3)]
    s = [x + 3.0 for x in t]  # same stream up to a per-token mean (a centred Pre-LN student)
    mask = torch.ones(2, 5)
    assert float(hidden_mse(tuple(s), tuple(t), mask, center=True)) == pytest.approx(0.0, abs=1e-10)
    assert float(hidden_mse(tuple(s), tuple(t), mask, center=False)) > 1.0
    with pytest.raises(NormswapError, match="as many layers"):
        hidden_mse(tuple(s[:2]), tuple(t), mask, center=False)


def test_encoder_objective_uses_hidden_and_pooled_mse():
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100)
    teacher = BertModel(cfg).eval()
    student = BertModel(cfg).eval()
    student.load_state_dict(teacher.state_dict())
    assert model_kind(student) == "encoder"
    obj = Objective(weights={"distill": 1.0}, kind="encoder", hidden_weight=1.0)
    ids = torch.randint(5, 100, (2, 7))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    assert float(obj.loss(student, teacher, batch)[0]) == pytest.approx(0.0, abs=1e-8)
    with torch.no_grad():
        student.encoder.layer[0].output.LayerNorm.weight.mul_(1.5)
    assert float(obj.loss(student, teacher, batch)[0]) > 1e-3
    with pytest.raises(NormswapError, match="no LM head"):
        Objective(weights={"lm": 1.0}, kind="encoder").check()


def test_masking_is_seeded_and_spares_special_tokens():
    obj = Objective(weights={"lm": 1.0}, kind="masked", mask_token_id=99, special_ids=[0, 1], vocab_size=100)
    ids = torch.randint(2, 99, (4, 50))
    ids[:, 0], ids[:, -1] = 0, 1
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    a, b, c = obj.prepare(batch, seed=5), obj.prepare(batch, seed=5), obj.prepare(batch, seed=6)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    assert not torch.equal(a["labels"], c["labels"])
    chosen = a["labels"] != -100
    assert 0.05 < chosen.float().mean() < 0.3
    assert not chosen[:, 0].any() and not chosen[:, -1].any()
    assert (a["input_ids"][chosen] == 99).float().mean() > 0.6


def test_readers_of_gpt2_norms():
    model = _gpt2()
    ids = torch.randint(0, 100, (1, 6))
    readers = find_readers(model, {"input_ids": ids})
    assert readers["transformer.h.0.ln_1"] == ["transformer.h.0.attn.c_attn"]
    assert readers["transformer.h.1.ln_2"] == ["transformer.h.1.mlp.c_fc"]
    assert readers["transformer.ln_f"] == ["lm_head"]  # through GPT-2's reshape of ln_f's output


def test_readers_of_bert_post_ln_norms():
    torch.manual_seed(0)
    model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100))
    readers = find_readers(model, {"input_ids": torch.randint(5, 100, (1, 6))})
    assert set(readers["embeddings.LayerNorm"]) == {f"encoder.layer.0.attention.self.{n}" for n in ("query", "key", "value")}
    assert readers["encoder.layer.0.attention.output.LayerNorm"] == ["encoder.layer.0.intermediate.dense"]


def test_select_trainable_modes():
    model = _gpt2()
    ids = {"input_ids": torch.randint(0, 100, (1, 6))}
    names = select_trainable(model, "norms")
    assert names and all(".ln_" in n for n in names)
    names = set(select_trainable(model, "norms+readers", ids))
    assert "transformer.h.0.attn.c_attn.weight" in names and "transformer.h.0.mlp.c_proj.weight" not in names
    assert "transformer.wte.weight" in names  # lm_head reads ln_f and is tied to wte
    assert len(select_trainable(model, "all")) == len(list(model.parameters()))
    groups = param_groups(model, 0.01)
    decayed = {id(p) for p in groups[0]["params"]}
    assert id(model.transformer.h[0].ln_1.weight) not in decayed and id(model.transformer.h[0].attn.c_attn.weight) in decayed
    with pytest.raises(NormswapError, match="unknown --train"):
        select_trainable(model, "heads")
