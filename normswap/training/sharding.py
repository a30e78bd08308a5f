"""Sharded training (FSDP under `accelerate launch`): what normswap adds to Accelerate's own FSDP.

- **Scalar parameters.** DyT's alpha is a 0-dim parameter, and FSDP2's `fully_shard` refuses
  scalars ("Change a to a 1D tensor with numel equal to 1"). Before sharding, every 0-dim parameter
  becomes a 1-element one (`promote_scalars`; broadcasting gives the same forward), and every
  state dict that leaves the sharded model (checkpoints, the final model) gets the original shapes
  back, so saved files are the same as an unsharded run's and `normswap.load` reads them strictly.
- **CPU processes.** Accelerate applies its FSDP plugin on accelerators only: on a CPU-only
  machine an FSDP config would silently train replicated (DDP over gloo). normswap then switches the
  same plugin on itself (`enable_cpu_fsdp`), so `accelerate launch --config_file
  recipes/accelerate/fsdp-cpu-gloo.yaml` really shards; accelerate's FSDP2 code (fully_shard,
  optimizer parameter switch, gradient clipping, full state dicts) does the rest, as on GPUs.
- **Full state dicts.** Checkpoints and the final model are gathered whole (FULL_STATE_DICT, to
  the CPU) and written by the main process; the optimizer state is gathered keyed by parameter
  name (torch.distributed.checkpoint's full optimizer state dict) and spread back on resume.
"""
from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from normswap.log import logger


def fsdp_requested() -> bool:
    """True when `accelerate launch` was given an FSDP config (it exports ACCELERATE_USE_FSDP)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")


def enable_cpu_fsdp(accelerator: Any) -> bool:
    """Switch Accelerate's FSDP plugin on for CPU processes (gloo), where Accelerate itself leaves
    it off. Returns True if it did."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if not fsdp_requested() or accelerator.distributed_type != DistributedType.MULTI_CPU:
        return False
    plugin = FullyShardedDataParallelPlugin()  # the FSDP_* variables accelerate launch exported from the config
    if int(plugin.fsdp_version) != 2:
        from normswap.errors import NormswapError

        raise NormswapError("FSDP on CPU processes needs fsdp_version: 2 in the accelerate config (FSDP1 needs an accelerator); "
                            "see recipes/accelerate/fsdp-cpu-gloo.yaml")
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    from accelerate import PartialState

    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = DistributedType.FSDP
    # every later AcceleratorState() copies PartialState's fields over its own (set_seed makes one):
    # the process state must say FSDP too, or the run would fall back to DDP mid-way
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    logger.info("FSDP%s on %d CPU processes (gloo): accelerate shards only on accelerators, so normswap applies its plugin",
                plugin.fsdp_version, accelerator.num_processes)
    return True


def is_fsdp(accelerator: Any) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def fsdp_version(accelerator: Any) -> int | None:
    if not is_fsdp(accelerator):
        return None
    return int(getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1) or 1)


def promote_scalars(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Make every 0-dim parameter a 1-element one, in place; returns {state-dict name: original
    shape} (every name a shared parameter has)."""
    promoted: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None or p.dim() != 0:
                continue
            if id(p) not in promoted:
                promoted[id(p)] = nn.Parameter(p.detach().reshape(1).clone(), requires_grad=p.requires_grad)
            module._parameters[name] = promoted[id(p)]
    if not promoted:
        return {}
    new_ids = {id(p) for p in promoted.values()}
    return {n: () for n, p in model.named_parameters(remove_duplicate=False) if id(p) in new_ids}


def restore_shapes(state: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """A gathered state dict with the promoted scalars given back their 0-dim shape."""
    return {k: (v.reshape(shapes[k]) if k in shapes else v) for k, v in state.items()}


def promote_state(state: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """The other way: a saved state dict shaped for the promoted (sharded) model."""
    return {k: (v.reshape(1) if k in shapes and v.dim() == 0 else v) for k, v in state.items()}


def _canonical(name: str) -> str:
    for junk in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(junk, "")
    return name


def gather_model_state(model: nn.Module, accelerator: Any, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """The whole model's state dict on the CPU (a collective: every process calls it), with
    the original scalar shapes; every tensor its own storage (safetensors refuses shared ones)."""
    state = accelerator.get_state_dict(model, unwrap=True)
    out: dict[str, torch.Tensor] = {}
    for k, v in (state or {}).items():
        k = _canonical(k)
        v = v.detach().to("cpu")
        out[k] = v.reshape(shapes[k]).clone() if k in shapes else v.clone()
    # tied weights (GPT-2's lm_head is wte): accelerate keeps one name; every name of the model is written
    aliases: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(_canonical(n))
    for names in aliases.values():
        have = next((n for n in names if n in out), None)
        for n in names:
            if have is not None and n not in out:
                out[n] = out[have].clone()
    return out


def model_shapes(model: nn.Module, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Global tensor shapes of a (sharded) model's state dict, as a checkpoint stores them."""
    out = {}
    for k, v in model.state_dict().items():
        k = _canonical(k)
        out[k] = tuple(shapes[k]) if k in shapes else tuple(v.shape)
    return out


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]) -> None:
    """Spread a full state dict (every process holds it) over the sharded model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, promote_state(state, shapes), options=StateDictOptions(full_state_dict=True, strict=False))


def gather_optimizer_state(model: nn.Module, optimizer: Any) -> dict[str, Any]:
    """The optimizer's full state, keyed by parameter name (a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    opt = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one
    state = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state


def load_optimizer_state(model: nn.Module, optimizer: Any, state: dict[str, Any]) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    opt = getattr(optimizer, "optimizer", optimizer)
    set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=True))
