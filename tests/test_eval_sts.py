"""Zero-shot STS and fidelity: pooling, correlations against scipy, the MiniLM reference figure."""
from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import transformers
from scipy.stats import pearsonr, spearmanr

from normswap.assets import asset
from normswap.errors import NormswapError
from normswap.evaluation import sts
from normswap.loading import load_pretrained, load_tokenizer

STSB_DEV = asset("glue", "STS-B", "dev.tsv")


@pytest.fixture(scope="module")
def minilm(minilm_path):
    return load_pretrained(str(minilm_path), auto_class=transformers.AutoModel), load_tokenizer(str(minilm_path))


@pytest.fixture(scope="module")
def dev_pairs():
    if not STSB_DEV.is_file():
        pytest.skip("STS-B asset missing")
    return sts.read_sts(STSB_DEV)


def test_reads_the_glue_stsb_layout(dev_pairs):
    assert len(dev_pairs) == 1500
    assert dev_pairs[0] == sts.StsPair("A man with a hard hat is dancing.", "A man wearing a hard hat is dancing.", 5.0)
    assert all(0.0 <= p.score <= 5.0 for p in dev_pairs)


def test_headerless_and_malformed_files(tmp_path):
    f = tmp_path / "pairs.tsv"
    f.write_text("x\tA cat.\tA dog.\t1.5\ny\tA \"quoted\" cat.\tA cat.\t4\n")
    assert sts.read_sts(f) == [sts.StsPair("A cat.", "A dog.", 1.5), sts.StsPair('A "quoted" cat.', "A cat.", 4.0)]
    f.write_text("sentence1\tsentence2\tscore\nA cat.\tA dog.\thigh\n")
    with pytest.raises(NormswapError, match=r"pairs.tsv:2: not an STS-B row"):
        sts.read_sts(f)
    f.write_text("")
    with pytest.raises(NormswapError, match="empty"):
        sts.read_sts(f)


def test_pooling_mode_from_sentence_transformers_config(tmp_path, minilm_path):
    assert sts.pooling_mode(minilm_path) == "mean"
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    assert sts.pooling_mode(tmp_path) == "cls"
    assert sts.pooling_mode(tmp_path / "nothing") == "mean"


def test_sts_matches_an_independent_per_sentence_loop(minilm, dev_pairs):
    """Batched, length-sorted, padded embedding == one sentence at a time with no padding."""
    model, tok = minilm
    pairs = dev_pairs[::125]  # 12 pairs across the genres
    corr, cos, emb = sts.evaluate_sts(model, tok, pairs, batch_size=7)
    ref_cos = []
    with torch.no_grad():
        for p in pairs:
            e = [model(**tok(s, return_tensors="pt")).last_hidden_state[0].mean(0) for s in (p.sentence1, p.sentence2)]
            ref_cos.append(torch.nn.functional.cosine_similarity(e[0], e[1], dim=0).item())
    assert cos.tolist() == pytest.approx(ref_cos, abs=1e-5)
    gold = [p.score for p in pairs]
    assert corr["spearman"] == pytest.approx(spearmanr(ref_cos, gold)[0], abs=1e-6)
    assert corr["pearson"] == pytest.approx(pearsonr(ref_cos, gold)[0], abs=1e-5)
    assert emb.shape == (24, 384)


def test_fidelity_is_one_for_the_same_model_and_lower_for_a_perturbed_one(minilm, dev_pairs):
    model, tok = minilm
    sentences = [p.sentence1 for p in dev_pairs[:16]]
    a = sts.embed(model, tok, sentences)
    assert sts.fidelity(a, sts.embed(model, tok, sentences, batch_size=3)) == pytest.approx(1.0, abs=1e-6)
    noisy = a + 0.5 * torch.randn(a.shape, generator=torch.Generator().manual_seed(0)) * a.std()
    f = sts.fidelity(a, noisy)
    assert 0.5 < f < 0.99


@pytest.mark.slow
def test_minilm_zero_shot_stsb_dev_spearman(minilm, dev_pairs):
    """Reference figure from assets/README.md: 0.8667 (mean pooling, cosine)."""
    model, tok = minilm
    corr, _, _ = sts.evaluate_sts(model, tok, dev_pairs, pooling=sts.pooling_mode(asset("all-MiniLM-L6-v2")))
    assert corr["spearman"] == pytest.approx(0.8667, abs=5e-4)
