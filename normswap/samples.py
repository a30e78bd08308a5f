"""Model inputs for calibration and verification: text packed into token blocks.

Without a tokenizer (tiny test models) or for image models, seeded random inputs stand in.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch
from torch import nn

from normswap.errors import NormswapError


def default_text() -> str:
    """The built-in sample (original prose shipped with normswap), so commands work without data."""
    return resources.files("normswap").joinpath("data/sample.txt").read_text(encoding="utf-8")


def max_positions(model: nn.Module) -> int:
    cfg = model.config
    for key in ("n_positions", "max_position_embeddings", "seq_length", "n_ctx"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return 2048


ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "distilbert", "electra"}


def is_encoder(model: nn.Module) -> bool:
    """Bidirectional text models (BERT family): blocks get [CLS] ... [SEP]."""
    return model.config.model_type in ENCODER_TYPES and not getattr(model.config, "is_decoder", False)


def token_blocks(
    model: nn.Module,
    tokenizer,
    text: str | None,
    *,
    n_tokens: int,
    block: int = 128,
    batch_size: int = 8,
    seed: int = 0,
    what: str = "calibration text",
) -> list[dict[str, torch.Tensor]]:
    """Batches of equal-length blocks covering about `n_tokens` tokens of `text` (no padding).

    `text` None means the built-in sample. Seeded random token ids stand in only where no text was
    given and there is no tokenizer (tiny test models; the caller says so in its warnings); given
    text without a tokenizer, or for an image model (random images stand in), is an error naming
    `what` ("calibration text", "verification text")."""
    cfg = model.config
    main_input = getattr(model, "main_input_name", "input_ids")
    if main_input not in ("input_ids", "pixel_values") or getattr(cfg, "is_encoder_decoder", False):
        # Speech (input_features), encoder-decoders: text blocks are not inputs these models accept
        raise NormswapError(f"{type(model).__name__} takes {main_input}{' and decoder inputs' if getattr(cfg, 'is_encoder_decoder', False) else ''}: "
                            f"normswap cannot build calibration or verification inputs for it yet, so it cannot convert it measurably")
    if getattr(cfg, "model_type", "") == "vit" or "pixel_values" in main_input:
        if text is not None:
            raise NormswapError(f"{type(model).__name__} takes images, not text: the {what} cannot be used")
        size = getattr(cfg, "image_size", 224)
        g = torch.Generator().manual_seed(seed)
        n_images = max(1, n_tokens // max(1, (size // getattr(cfg, "patch_size", 16)) ** 2))
        return [{"pixel_values": torch.randn(min(batch_size, n_images - i), getattr(cfg, "num_channels", 3), size, size, generator=g)}
                for i in range(0, n_images, batch_size)]
    block = min(block, max_positions(model))
    encoder = is_encoder(model)
    body = block - 2 if encoder else block
    if tokenizer is None:
        if text is not None:
            raise NormswapError(f"{type(model).__name__} has no tokenizer: cannot tokenise the {what} "
                                "(add the tokenizer files to the model folder)")
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, cfg.vocab_size, (max(n_tokens, body),), generator=g).tolist()
    else:
        text = default_text() if text is None else text
        if not text.strip():
            raise NormswapError(f"{what} is empty")
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) < body:
            raise NormswapError(f"{what} is too short: {len(ids)} tokens, need at least {body}")
    n_blocks = max(1, min(len(ids) // body, -(-n_tokens // body)))
    rows = []
    for i in range(n_blocks):
        chunk = ids[i * body:(i + 1) * body]
        if encoder and tokenizer is not None:
            chunk = [tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id] + chunk + [
                tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id]
        rows.append(chunk)
    t = torch.tensor(rows, dtype=torch.long)
    return [{"input_ids": t[i:i + batch_size]} for i in range(0, len(t), batch_size)]
