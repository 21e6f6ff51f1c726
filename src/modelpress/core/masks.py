"""Pruning masks that stay enforced through training.

A mask is a non-persistent ``bool`` buffer ``<param>_mask`` (True: kept; same shape as the parameter)
next to the parameter it masks. It is not saved in the state_dict: the zeros in the
weight already say where the model is sparse, so a checkpoint stays a plain one.

Every training loop in modelpress calls :func:`apply_masks` after each optimizer step, so
pruned weights stay exactly zero whatever the optimizer's momentum does. :func:`strip_masks`
removes the buffers (the zeros stay) once pruning is final.
"""
from __future__ import annotations

import torch
from torch import nn

SUFFIX = "_mask"


def set_mask(module: nn.Module, param_name: str, mask: torch.Tensor) -> None:
    """Attach (or replace) the mask of ``module.<param_name>`` (non-zero: kept) and zero the masked
    weights. The mask is stored as ``bool``: a quarter of a float32 copy of the weight."""
    param = getattr(module, param_name)
    mask = (mask != 0).to(device=param.device)
    if mask.shape != param.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != parameter shape {tuple(param.shape)}")
    buf = param_name + SUFFIX
    if buf in module._buffers:
        module._buffers[buf] = mask
    else:
        module.register_buffer(buf, mask, persistent=False)
    with torch.no_grad():
        param.mul_(mask).add_(0.0)  # + 0.0: a masked negative weight is -0.0 after mul_; make it +0.0


def get_mask(module: nn.Module, param_name: str = "weight") -> torch.Tensor | None:
    return module._buffers.get(param_name + SUFFIX)


def masked_params(model: nn.Module):
    """Yield ``(module_name, module, param_name, mask)`` for every masked parameter.

    A buffer named like a mask whose base is not a tensor is the model's own (timm's Swin blocks
    hold an ``attn_mask`` buffer beside their ``attn`` module): not a mask."""
    for mname, module in model.named_modules():
        for bname, buf in list(module._buffers.items()):
            if not bname.endswith(SUFFIX) or buf is None:
                continue
            base = bname[: -len(SUFFIX)]
            if isinstance(getattr(module, base, None), torch.Tensor):
                yield mname, module, base, buf


@torch.no_grad()
def apply_masks(model: nn.Module) -> None:
    """Re-zero every masked parameter (call after each optimizer step)."""
    for _, module, pname, mask in masked_params(model):
        getattr(module, pname).mul_(mask).add_(0.0)  # pruned zeros are +0.0: sparse storage keeps no signs


def has_masks(model: nn.Module) -> bool:
    return next(masked_params(model), None) is not None


def strip_masks(model: nn.Module) -> nn.Module:
    """Remove mask buffers; the pruned weights stay zero. Returns the model."""
    apply_masks(model)
    for _, module, pname, _ in list(masked_params(model)):
        del module._buffers[pname + SUFFIX]
    return model
