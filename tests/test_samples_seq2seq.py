"""token_blocks for text encoder-decoders: input_ids plus decoder_input_ids, the same block shifted
right by one behind the decoder start id (teacher forcing on the same text)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from normswap.errors import NormswapError
from normswap.samples import model_inputs, token_blocks
from tiny_models import tiny_model
from untabled_models import SEQ2SEQ, VOCAB, untabled_model


class _Tok:
    """A stand-in tokenizer: one id per word (ids 3..99), no special tokens."""

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [3 + (sum(map(ord, w)) % (VOCAB - 3)) for w in text.split()]}


def test_decoder_ids_are_the_block_shifted_right(one_thread):
    model = untabled_model("mbart")
    start = model.config.decoder_start_token_id
    assert start == 2
    batches = token_blocks(model, None, None, n_tokens=48, block=16, batch_size=2)
    assert [b["input_ids"].shape for b in batches] == [torch.Size([2, 16]), torch.Size([1, 16])]
    for b in batches:
        assert set(b) == {"input_ids", "decoder_input_ids"}
        ids, dec = b["input_ids"], b["decoder_input_ids"]
        assert dec.shape == ids.shape and dec.dtype == torch.long
        assert (dec[:, 0] == start).all()
        assert torch.equal(dec[:, 1:], ids[:, :-1])


def test_matches_the_model_family_shift(one_thread):
    from transformers.models.bart.modeling_bart import shift_tokens_right

    model = untabled_model("bart")
    (b,) = token_blocks(model, None, None, n_tokens=32, block=16, batch_size=4)
    want = shift_tokens_right(b["input_ids"], model.config.pad_token_id, model.config.decoder_start_token_id)
    assert torch.equal(b["decoder_input_ids"], want)


def test_text_through_a_tokenizer(one_thread):
    model = untabled_model("marian")
    text = " ".join(f"w{i}" for i in range(50))
    tok = _Tok()
    batches = token_blocks(model, tok, text, n_tokens=24, block=12, batch_size=8)
    ids = tok(text)["input_ids"]
    (b,) = batches
    assert b["input_ids"].tolist() == [ids[:12], ids[12:24]]  # no [CLS]/[SEP] for encoder-decoders
    assert b["decoder_input_ids"].tolist() == [[model.config.decoder_start_token_id] + ids[:11],
                                               [model.config.decoder_start_token_id] + ids[12:23]]


@pytest.mark.parametrize("unset, want", [
    (("decoder_start_token_id",), 1),                                  # pad
    (("decoder_start_token_id", "pad_token_id"), 5),                   # bos
    (("decoder_start_token_id", "pad_token_id", "bos_token_id"), 7),   # eos
    (("decoder_start_token_id", "pad_token_id", "bos_token_id", "eos_token_id"), 0),
])
def test_start_id_fallbacks(one_thread, unset, want):
    model = untabled_model("bart", bos_token_id=5, eos_token_id=7)
    assert model.config.pad_token_id == 1
    for key in unset:
        setattr(model.config, key, None)
        setattr(model.generation_config, key, None)
    (b,) = token_blocks(model, None, None, n_tokens=8, block=8, batch_size=1)
    assert (b["decoder_input_ids"][:, 0] == want).all()
    assert torch.equal(b["decoder_input_ids"][:, 1:], b["input_ids"][:, :-1])


def test_generation_config_start_id_when_config_has_none(one_thread):
    model = untabled_model("bart")
    model.config.decoder_start_token_id = None
    model.generation_config.decoder_start_token_id = 9
    (b,) = token_blocks(model, None, None, n_tokens=8, block=8, batch_size=1)
    assert (b["decoder_input_ids"][:, 0] == 9).all()


def test_block_capped_by_positions(one_thread):
    model = untabled_model("bart")  # max_position_embeddings 64
    (b,) = token_blocks(model, None, None, n_tokens=128, block=128, batch_size=8)
    assert b["input_ids"].shape == b["decoder_input_ids"].shape == (2, 64)


@pytest.mark.parametrize("name", SEQ2SEQ)
def test_forward_runs_on_the_batches(one_thread, name):
    model = untabled_model(name)
    batches = model_inputs(model, n_tokens=32, block=16, batch_size=2, what="verification")
    assert batches and all("decoder_input_ids" in b for b in batches)
    with torch.no_grad():
        for b in batches:
            out = model(**b)
            assert out.logits.shape == (*b["decoder_input_ids"].shape, model.config.vocab_size)
            assert torch.isfinite(out.logits).all()


def test_decoder_only_batches_unchanged(one_thread):
    (b,) = token_blocks(tiny_model("gpt2"), None, None, n_tokens=16, block=16, batch_size=1)
    assert set(b) == {"input_ids"}


def test_speech_main_input_still_refused(one_thread):
    model = tiny_model("whisper")
    with pytest.raises(NormswapError, match=r"^WhisperForConditionalGeneration takes input_features and decoder inputs: "
                                            r"normswap cannot build calibration or verification inputs for it yet"):
        token_blocks(model, None, None, n_tokens=16, block=16)


class _Stub(nn.Module):
    def __init__(self, main_input, seq2seq):
        super().__init__()
        from transformers import PretrainedConfig

        self.main_input_name = main_input
        self.config = PretrainedConfig(is_encoder_decoder=seq2seq, vocab_size=VOCAB)


@pytest.mark.parametrize("main_input, seq2seq, msg", [
    ("input_values", False, "_Stub takes input_values: normswap cannot build calibration or verification inputs for it yet, "
                            "so it cannot convert it measurably"),
    ("pixel_values", True, "_Stub takes pixel_values and decoder inputs: normswap cannot build calibration or verification "
                           "inputs for it yet, so it cannot convert it measurably"),
])
def test_other_main_inputs_still_refused(main_input, seq2seq, msg):
    with pytest.raises(NormswapError) as err:
        token_blocks(_Stub(main_input, seq2seq), None, None, n_tokens=16, block=16)
    assert str(err.value) == msg
