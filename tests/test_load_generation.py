"""A converted folder keeps the source's generation_config.json and `normswap.load` applies it;
every Auto class a source may be loaded with accepts a converted folder after `import normswap`."""
from __future__ import annotations

import json

import pytest
import torch

import normswap
from cli_util import refused, run_cli
from tiny_models import tiny_inputs, tiny_model


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    model = tiny_model("gpt2")
    model.generation_config.max_length = 33
    model.generation_config.no_repeat_ngram_size = 2
    model.save_pretrained(root / "src")
    assert json.loads((root / "src" / "generation_config.json").read_text())["max_length"] == 33
    converted, result = normswap.convert(str(root / "src"), "rmsnorm", fold=True)
    normswap.save(converted, root / "out", result.record, copy_from=root / "src")
    return root


def test_generation_config_is_kept_and_applied(converted):
    assert (converted / "out" / "generation_config.json").is_file()
    model = normswap.load(converted / "out")
    assert model.generation_config.max_length == 33 and model.generation_config.no_repeat_ngram_size == 2


def test_speech_and_seq2seq_auto_classes_route_to_normswap(converted):
    import transformers

    for name in ("AutoModelForCausalLM", "AutoModelForSpeechSeq2Seq", "AutoModelForSeq2SeqLM"):
        auto = getattr(transformers, name)
        assert normswap.auto.NormswapConfig in auto._model_mapping, name
    model = transformers.AutoModelForCausalLM.from_pretrained(converted / "out")
    x = tiny_inputs(model)
    with torch.no_grad():
        assert torch.equal(model(**x).logits, normswap.load(converted / "out")(**x).logits)


@pytest.mark.hostile("readers")
def test_damaged_generation_config_is_one_line(converted, tmp_path, monkeypatch, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(converted / "out", bad)
    (bad / "generation_config.json").write_text("{not json")
    with pytest.raises(normswap.NormswapError, match="generation config"):
        normswap.load(bad)
    code, _, err = run_cli(["inspect", str(bad)], monkeypatch, capsys)
    refused(code, err, "generation config", exit_code=2)
