"""Encoder-decoders: two residual streams, the decoder's cross-attention reading the encoder's."""
from __future__ import annotations

from normswap.archs.spec import Family, NormSpec, Stack

# Whisper (speech recognition) is Pre-LN in both stacks. The encoder stream starts at
# gelu(conv2(x)) + positions: no weight of the conv front end can make a GELU's output zero-mean,
# so the first encoder block's input gets one explicit mean subtraction (centre_input), and the
# sublayer writers are centred as usual. The encoder's final norm is read by every decoder block's
# cross-attention keys and values, so its affine folds into all of them (its output,
# encoder_last_hidden_state, is then the un-scaled normalised stream; the logits are unchanged).
# The decoder is GPT-2-like: token lookups tied to proj_out (centred on the fly, CenteredEmbedding),
# learned positions (centred in place).
WHISPER = Family(
    model_type="whisper",
    style="pre",
    stack_name="encoder",
    blocks="encoder.layers",
    block_norms=(
        NormSpec("self_attn_layer_norm", "pre", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        NormSpec("final_layer_norm", "pre", ("fc1",)),
    ),
    block_writers=("self_attn.out_proj", "fc2"),
    embed_writers=(),
    centre_input=True,
    model_norms=(NormSpec("encoder.layer_norm", "final", ("*decoder:encoder_attn.k_proj", "*decoder:encoder_attn.v_proj")),),
    extra_stacks=(
        Stack(
            name="decoder",
            blocks="decoder.layers",
            block_norms=(
                NormSpec("self_attn_layer_norm", "pre", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                NormSpec("encoder_attn_layer_norm", "pre", ("encoder_attn.q_proj",)),
                NormSpec("final_layer_norm", "pre", ("fc1",)),
            ),
            block_writers=("self_attn.out_proj", "encoder_attn.out_proj", "fc2"),
            embed_writers=("decoder.embed_tokens", "decoder.embed_positions"),
            model_norms=(NormSpec("decoder.layer_norm", "final", ("@head",)),),
        ),
    ),
    notes="Speech encoder-decoder: the encoder's input is centred explicitly; cross-attention k/v read the encoder's "
          "final norm; proj_out tied to decoder.embed_tokens.",
)

FAMILIES = (WHISPER,)
