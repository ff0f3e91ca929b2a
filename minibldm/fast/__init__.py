"""Opt-in speed around the reference core: the same computation, organised for a CPU.

`optimize(models)` swaps reference modules for faster ones with the same parameters (so the
same state-dict keys): conv.MatmulConv2d for the UNet's and trimap branch's big 3x3 convolutions,
conv.GridUpsample for the decoder's upsampling. `adapt.adapt_decoder` is Algorithm 2 batched,
compiled or under autocast; `compile_frozen` is torch.compile for sampling. Each route
is tested against the reference path it replaces (tests/test_fast.py).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..autoencoder import Upsample
from .adapt import adapt_decoder
from .conv import (BIG_WEIGHT, SMALL_GRID, UPSAMPLE_MIN_CHANNELS, GridUpsample, MatmulConv2d,
                   is_plain_3x3)

__all__ = ["optimize", "adapt_decoder", "compile_frozen"]


def swap_on_cpu(net: nn.Module | None, match: Callable[[nn.Module], bool],
                make: Callable[[nn.Module], nn.Module]) -> None:
    """Replace every submodule m of `net` with match(m) by make(m), under the same name (so the
    state-dict keys stay), when `net` is a network on a CPU (the routes are measured there)."""
    if net is None or not any(p.device.type == "cpu" for p in net.parameters()):
        return
    found = [(parent, name, child) for parent in net.modules()
             for name, child in parent.named_children() if match(child)]
    for parent, name, child in found:
        setattr(parent, name, make(child))


def optimize(models, big_weight: float = BIG_WEIGHT, small_grid: float = SMALL_GRID,
             upsample_min_channels: float = UPSAMPLE_MIN_CHANNELS):
    """Apply the CPU routes in place to `models` (anything with `unet`, `control` and
    `autoencoder`, each possibly None) and return it; networks on other devices are left alone.

    MatmulConv2d takes the plain 3x3 convolutions of at least `big_weight` weights and runs them
    as a matrix product at inference on grids of at most `small_grid` positions; GridUpsample
    takes the upsampling layers of at least `upsample_min_channels` channels. The defaults are
    the measured thresholds; float("inf") turns a route off, 0 forces it (small_grid: inverse)."""
    for net in (models.unet, models.control):
        swap_on_cpu(net, lambda m: (type(m) is nn.Conv2d and is_plain_3x3(m)
                                    and m.weight.numel() >= big_weight),
                    lambda m: MatmulConv2d(m, small_grid))
    swap_on_cpu(models.autoencoder,
                lambda m: isinstance(m, Upsample) and m.conv.in_channels >= upsample_min_channels,
                GridUpsample)
    return models


def compile_frozen(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """torch.compile for sampling (built on the first call; call it under torch.no_grad()). On a
    CPU with inductor's `freezing`: the weights, which sampling never changes, become constants
    of the graph, packed once for oneDNN; the graph keeps that copy beside the module's.

    inductor reads `freezing` when it compiles (the first call, any recompile for a new shape),
    not at torch.compile(), so each call switches it on; torch.compile's own
    `options={"freezing": True}` was measured to leave the weights unfrozen."""
    compiled = torch.compile(module)
    if device.type != "cpu":
        return compiled
    import torch._inductor.config as inductor_config  # 2 s to import: only when compiling
    forward = compiled.forward

    def frozen_forward(*args, **kwargs):
        with inductor_config.patch(freezing=True):
            return forward(*args, **kwargs)
    compiled.forward = frozen_forward
    return compiled
