"""Algorithm 2 (minibldm/adapt.py), faster: the same optimisation and loss, organised for speed.

- One image: a float32 copy under autocast to the decoder's own dtype (bfloat16, or float16
  through a gradient scaler whose skipped updates are done again, so `steps` counts real
  updates), fused AdamW; for big images channels-last order on a CPU, and the ResnetBlocks'
  norms recomputed in the backward pass (less memory).
- compile=True: forward, loss and backward through torch.compile, one graph per decoder reused
  for every image (the parameters are passed in as tensors).
- A batch: one decoder copy per image, stacked with torch.func, one vmapped forward and
  backward. Image b's loss reaches only copy b and AdamW is elementwise, so each copy follows
  its path alone (up to summation order). float32 only: torch applies no autocast inside vmap.
- blocks=N (not the paper's method): train only the output head and the last N upsampling
  levels; the frozen stages before them run once per image.

The gains are measured in docs/BENCHMARKS.md. Autocast caches each float32 weight's low-precision
copy for the whole region, so the cache is cleared after every update (else the loop would keep
computing with step 0's weights).
"""
from __future__ import annotations

import contextlib
import copy
import weakref
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor
from torch.func import functional_call, stack_module_state, vmap

from ..adapt import adaptation_loss
from ..autoencoder import ResnetBlock
from ..config import AdaptConfig

RECOMPUTE_FROM = 256 * 256  # pixels from which the copy's norms are recomputed (one image)
CHANNELS_LAST_FROM = 256 * 256  # pixels from which a CPU adapts in channels-last order
MAX_SKIPPED = 30  # float16 updates skipped in a row after which the adaptation gives up


def decoder_stages(decoder: nn.Module) -> list[tuple[Callable, list[nn.Module]]]:
    """The decoder's forward as (function, its modules) in order: conv_in + mid, each up level
    from the deepest, the output head. Running the functions one after the other is forward."""
    d = decoder
    return ([(lambda z: d.mid(d.conv_in(z)), [d.conv_in, d.mid])]
            + [(level, [level]) for level in reversed(d.up)]
            + [(lambda h: d.conv_out(F.silu(d.norm_out(h))), [d.norm_out, d.conv_out])])


def run_stages(stages: list, h: Tensor) -> Tensor:
    """Decoder stages (a tail of them, always ending with the output head) in order. Under
    autocast the head runs in float32, so the loss sees an unrounded image."""
    for fn, _ in stages[:-1]:
        h = fn(h)
    head = stages[-1][0]
    if torch.is_autocast_enabled(h.device.type):
        with torch.autocast(h.device.type, enabled=False):
            return head(h.float())
    return head(h)


class RecomputedResnetBlock(nn.Module):
    """autoencoder.ResnetBlock with the same children, keeping only each norm's input for the
    backward pass and computing silu(norm(x)) again there: one activation less per norm."""

    def __init__(self, block: ResnetBlock):
        super().__init__()
        self.norm1, self.conv1 = block.norm1, block.conv1
        self.norm2, self.conv2 = block.norm2, block.conv2
        self.nin_shortcut = block.nin_shortcut

    def forward(self, x: Tensor) -> Tensor:
        def norm_silu(norm, t):
            return torch.utils.checkpoint.checkpoint(lambda u: F.silu(norm(u)), t,
                                                     use_reentrant=False)
        h = self.conv1(norm_silu(self.norm1, x))
        h = self.conv2(norm_silu(self.norm2, h))
        return self.nin_shortcut(x) + h


def recompute_norms(decoder: nn.Module) -> nn.Module:
    """Swap every ResnetBlock of `decoder` (a private copy) for a RecomputedResnetBlock."""
    for level in decoder.up:
        for j, block in enumerate(level.block):
            level.block[j] = RecomputedResnetBlock(block)
    for name in ("block_1", "block_2"):
        setattr(decoder.mid, name, RecomputedResnetBlock(getattr(decoder.mid, name)))
    return decoder


class _Tail(nn.Module):
    """The decoder's stages from `first` on, as one module (for torch.func.functional_call)."""

    def __init__(self, decoder: nn.Module, first: int):
        super().__init__()
        self.decoder, self.first = decoder, first

    def forward(self, h: Tensor) -> Tensor:
        return run_stages(decoder_stages(self.decoder)[self.first:], h)


def _setup(decoder: nn.Module, h: Tensor, blocks: int | None):
    """What every variant starts from: x_fg = Phi(z*) unadapted, the index of the first trained
    stage, that stage's input (the frozen stages run once), and the names of the trained
    parameters of `decoder` (in its order)."""
    if blocks is not None and blocks < 0:
        raise ValueError(f"blocks must be >= 0, got {blocks}")
    stages = decoder_stages(decoder)
    frozen = 0 if blocks is None else max(0, len(stages) - 1 - blocks)
    with torch.no_grad():
        x_fg = decoder(h)
        start = h
        for fn, _ in stages[:frozen]:
            start = fn(start)
    ids = {id(p) for _, modules in stages[frozen:] for m in modules for p in m.parameters()}
    return x_fg, frozen, start, [n for n, p in decoder.named_parameters() if id(p) in ids]


def _optimise(run: Callable[[], tuple[Tensor, Tensor]], params: list[Tensor], cfg: AdaptConfig,
              callback, fused: bool, device: torch.device, dtype: torch.dtype):
    """The loop of every variant: AdamW (torch's defaults; fused: one kernel for all updates, the
    same formula) on float32 `params` until cfg.steps updates were applied, run() giving (output,
    per-image losses (B,)). A bfloat16 or float16 decoder `dtype` runs under autocast to it (a
    float32 one under the caller's autocast, if any); float16 through a gradient scaler, whose
    skipped updates (overflowed gradients) are done again. Returns (the output after the last
    step, per image the loss before each step and after the last); callback(step, mean loss)."""
    low = dtype if dtype in (torch.bfloat16, torch.float16) else None
    precision = torch.autocast(device.type, dtype=low) if low else contextlib.nullcontext()
    scaler = torch.amp.GradScaler(device.type, enabled=low == torch.float16)  # else a no-op
    opt = torch.optim.AdamW(params, lr=cfg.lr, fused=fused or None)
    history, skipped = [], 0
    with precision:
        while len(history) < cfg.steps:
            loss = run()[1].reshape(-1)
            scale = scaler.get_scale()
            scaler.scale(loss.sum()).backward()
            scaler.step(opt)
            scaler.update()
            # drop the gradients now (not alive in the next forward pass, where memory peaks)
            # and forget autocast's weight copies
            opt.zero_grad(set_to_none=True)
            torch.clear_autocast_cache()
            if scaler.get_scale() < scale:  # the scale only falls when the update was skipped
                skipped += 1
                if skipped > MAX_SKIPPED:
                    raise RuntimeError(f"decoder adaptation: float16 gradients overflowed in "
                                       f"{skipped} updates in a row; adapt in bfloat16 or float32")
                continue
            skipped = 0
            history.append(loss.tolist())
            if callback is not None:
                callback(len(history) - 1, sum(history[-1]) / len(history[-1]))
        with torch.no_grad():
            out, loss = run()
    return out.detach(), [list(curve) for curve in zip(*history, loss.reshape(-1).tolist())]


_COMPILED: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _compiled_step(decoder: nn.Module, frozen: int) -> Callable:
    """torch.compile of (parameters, tail input, targets) -> (output, loss) for this decoder's
    stages from `frozen` on; one per (decoder, frozen), so later images reuse the graph."""
    per_decoder = _COMPILED.setdefault(decoder, {})
    if frozen not in per_decoder:
        # a template: the parameters come in as arguments
        tail = _Tail(copy.deepcopy(decoder).float(), frozen)

        def step(params, start, x_fg, x_ok, mask, fg_weight, bg_weight):
            out = functional_call(tail, params, (start,))
            return out, adaptation_loss(out, x_fg, x_ok, mask, fg_weight, bg_weight)
        per_decoder[frozen] = torch.compile(step)
    return per_decoder[frozen]


def _adapt_one(decoder, h, x_ok, mask, cfg: AdaptConfig, callback, blocks, compile: bool,
               recompute: bool, fmt: torch.memory_format, fused: bool):
    """One image on a float32 copy of the decoder (module docstring): eager, or its parameters
    passed to the compiled step."""
    x_fg, frozen, start, trained = _setup(decoder, h, blocks)
    start = start.contiguous(memory_format=fmt)
    tuned = copy.deepcopy(decoder).float().train()
    if recompute:
        recompute_norms(tuned)  # same parameter names; the compiled step never runs `tuned`
    params = dict(tuned.to(memory_format=fmt).named_parameters())
    for n, p in params.items():
        p.requires_grad_(n in trained)
    weights = (cfg.fg_weight, cfg.bg_weight)
    if compile:
        step = _compiled_step(decoder, frozen)
        named = {f"decoder.{n}": p for n, p in params.items()}

        def run():
            return step(named, start, x_fg, x_ok, mask, *weights)
    else:
        stages = decoder_stages(tuned)[frozen:]

        def run():
            out = run_stages(stages, start)
            return out, adaptation_loss(out, x_fg, x_ok, mask, *weights)
    return _optimise(run, [p for p in params.values() if p.requires_grad], cfg, callback, fused,
                     h.device, next(decoder.parameters()).dtype)


def _adapt_batched(decoder, h, x_ok, mask, cfg: AdaptConfig, callback, blocks, fused: bool):
    """B images at once, one decoder copy each, stacked with torch.func (module docstring)."""
    x_fg, frozen, start, trained = _setup(decoder, h, blocks)
    tail = _Tail(copy.deepcopy(decoder).float().train(), frozen)
    params, buffers = stack_module_state([tail] * h.shape[0])  # B independent leaf tensors each
    params = {f"decoder.{n}": params[f"decoder.{n}"].requires_grad_() for n in trained}
    fixed = {n: p.detach() for n, p in tail.named_parameters() if n not in params}

    def one(p, x, fg, ok, m):  # one image: its parameters and (1, ...) tensors
        out = functional_call(tail, ({**fixed, **p}, {k: v[0] for k, v in buffers.items()}), (x,))
        return out, adaptation_loss(out, fg, ok, m, cfg.fg_weight, cfg.bg_weight)

    batched = vmap(one, in_dims=(0, 0, 0, 0, 0))
    split = [t.float().unsqueeze(1) for t in (start, x_fg, x_ok, mask)]
    out, losses = _optimise(lambda: batched(params, *split), list(params.values()), cfg,
                            callback, fused, h.device, torch.float32)
    return out.squeeze(1), losses


def adapt_decoder(decoder: nn.Module, h: Tensor, x_ok: Tensor, mask: Tensor,
                  cfg: AdaptConfig = AdaptConfig(),
                  callback: Callable[[int, float], None] | None = None, *,
                  blocks: int | None = None, compile: bool = False,
                  recompute_from: float = RECOMPUTE_FROM,
                  channels_last_from: float = CHANNELS_LAST_FROM, fused: bool = True
                  ) -> tuple[Tensor, list[list[float]]]:
    """adapt.adapt_decoder's contract, faster: (the B adapted images in x_ok's dtype, per image
    the loss before each step and after the last). A batch of B > 1 is adapted together (vmap;
    callback(step, mean loss)); one image eager, or compiled with `compile`.

    blocks: module docstring. One image of at least `recompute_from` pixels recomputes its
    norms (eager only); on a CPU, one of at least `channels_last_from` pixels adapts in
    channels-last order (0 forces either, float("inf") turns it off). fused: AdamW's fused
    kernel (False: torch's default implementation, the same formula)."""
    pixels = x_ok.shape[-2] * x_ok.shape[-1]
    big = h.device.type == "cpu" and pixels >= channels_last_from
    fmt = torch.channels_last if big else torch.contiguous_format
    with torch.enable_grad():
        if h.shape[0] > 1:
            out, losses = _adapt_batched(decoder, h, x_ok, mask, cfg, callback, blocks, fused)
        else:
            out, losses = _adapt_one(decoder, h, x_ok, mask, cfg, callback, blocks, compile,
                                     pixels >= recompute_from, fmt, fused)
    return out.to(x_ok.dtype).contiguous(), losses
