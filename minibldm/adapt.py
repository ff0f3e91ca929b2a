"""AdaBLDM's online decoder adaptation (Li et al. 2024, arXiv 2402.19330, Algorithm 2).

The blended latent z* decodes to an image whose background drifts from x_OK (the autoencoder
is lossy). Per generated image, a copy of the decoder Phi is fine-tuned for a few steps so that
it reproduces x_OK outside the defect mask M* while keeping its own rendering of the defect:

    L = MSE(D(z*) * M*, x_fg * M*) + lambda * MSE(D(z*) * (1 - M*), x_OK * (1 - M*)),

x_fg = Phi(z*) from the unadapted decoder, means over all pixels, lambda = 100 (the reference
code's weighting; the paper names the weight lambda_con of the defect term instead, so both are
parameters). T_ft = 200 AdamW steps at lr 1e-4. The post-quant conv stays frozen: its output is
computed once. The caller's decoder is never modified, so nothing leaks from one image to the next.

AUTOCAST. The adaptation may run inside torch.autocast (float32 weights, bfloat16 compute). Within
one autocast region torch casts each float32 parameter once and reuses that low-precision copy
until the region ends, so a loop wrapped in one region would keep computing with the weights of
step 0 while AdamW updates the float32 ones: the loss barely moves. Every variant below therefore
clears the autocast cache after each optimizer step.

PRECISION. The trained copy is always float32 (its "master" weights). A bfloat16 or float16
decoder (sample --dtype) is adapted as a float32 copy under autocast to its dtype (but see
adapt_decoders, which vmap keeps in float32): trained in bfloat16 directly, AdamW's steps of
lr 1e-4 are mostly below bfloat16's resolution of the weights, and on the tiny model's pill
image the final loss ended 50% above float32's (+4% with float32 master weights). float16 adds a
gradient scaler, since the loss's per-pixel gradients are smaller than float16 resolves. The
scaler starts high and skips each update whose gradients overflowed, halving its scale; a
skipped update is done again at the lower scale rather than counted, so `steps` is always the
number of real updates, as in float32 (counted, the first steps were lost: in a 3-step test, 2
of the 3). Under any autocast, the output head (norm_out, conv_out: a small share of the work)
runs in float32, so the loss sees an unrounded image (+2%, down from +4%).
See docs/BENCHMARKS.md.

MEMORY. The gradients are dropped (set to None) right after each optimizer step rather than just
before the next backward pass, as `zero_grad` is often placed: otherwise the previous step's
gradients (one decoder's worth) stay alive through the next forward pass, on top of its
activations, which is where the adaptation's memory peaks. The results are the same. And
adapt_decoder (one image, eager, images of at least 256 x 256) has its copy's ResnetBlocks
recompute their GroupNorm outputs in the backward pass rather than keep them
(autoencoder.norm_silu): the whole method's peak at SD 1.5 size, 256 px, float32, fell from 7.45
to 7.11 GiB, and an iteration takes 0-9% longer (median of nine pairs of runs timed in turn: 4%;
docs/BENCHMARKS.md). Same values and gradients.

SPEED. Three changes that leave the computation as it is, up to the order of float sums. (1) The
decoder's upsampling convolutions run on their input grid on a CPU (conv.upsample_conv: 4 instead
of 9 multiplies per output value; they are 28% of the SD decoder's work). (2) On a CPU, images of
at least 256 x 256 pixels are adapted in channels-last memory order, where oneDNN's convolutions
and their gradients over many pixels run faster. (3) AdamW is fused (_adamw). At SD 1.5 size and
256 px on 2 CPU cores an iteration went from the speed of a plain diffusers loop (1.01x) to
1.13-1.14x it eager, 1.21x compiled and 3.86x under bfloat16 autocast (docs/BENCHMARKS.md).
"""
from __future__ import annotations

import contextlib
import copy
import weakref
from typing import Callable

import torch
import torch.nn as nn
from torch import Tensor
from torch.func import functional_call, stack_module_state, vmap


# Images of at least this many pixels recompute the GroupNorm outputs (MEMORY above): measured,
# about +4% time at SD 1.5 size and 256 px (what keeps float32 sampling under 8 GB), and +12%
# for the tiny model's narrow decoder at 128 px, whose memory is small anyway.
RECOMPUTE_FROM = 256 * 256

# On a CPU, images of at least this many pixels are adapted in channels-last memory order (the
# trained copy's weights and its input, so every activation follows): oneDNN's convolutions and
# their gradients over many pixels run faster so (SPEED above).
CHANNELS_LAST_FROM = 256 * 256


def _memory_format(h: Tensor, x_ok: Tensor) -> torch.memory_format:
    big = h.device.type == "cpu" and x_ok.shape[-2] * x_ok.shape[-1] >= CHANNELS_LAST_FROM
    return torch.channels_last if big else torch.contiguous_format


def adaptation_loss(out: Tensor, x_fg: Tensor, x_ok: Tensor, mask: Tensor,
                    fg_weight: float = 1.0, bg_weight: float = 100.0) -> Tensor:
    """Algorithm 2's loss; each term a mean over all pixels. mask (B, 1, H, W) is 1 on the defect."""
    fg = ((out - x_fg) * mask).pow(2).mean()
    bg = ((out - x_ok) * (1 - mask)).pow(2).mean()
    return fg_weight * fg + bg_weight * bg


def run_stages(stages: list, h: Tensor) -> Tensor:
    """Decoder.stages (or a tail of them, always ending with the output head) in order. Under
    autocast the head runs in float32 (see PRECISION above)."""
    for fn, _ in stages[:-1]:
        h = fn(h)
    head = stages[-1][0]
    if torch.is_autocast_enabled(h.device.type):
        with torch.autocast(h.device.type, enabled=False):
            return head(h.float())
    return head(h)


def _precision(decoder: nn.Module, device: torch.device):
    """(autocast context, gradient scaler) for adapting a float32 copy of `decoder`: autocast to
    the decoder's own dtype when that is bfloat16 or float16, nothing (the caller's autocast, if
    any, stays in force) when it is float32. The scaler is active for float16 only."""
    low = next(decoder.parameters()).dtype
    low = low if low in (torch.bfloat16, torch.float16) else None
    ctx = torch.autocast(device.type, dtype=low) if low is not None else contextlib.nullcontext()
    return ctx, torch.amp.GradScaler(device.type, enabled=low == torch.float16)


def _adamw(params: list[Tensor], lr: float) -> torch.optim.AdamW:
    """AdamW with torch's defaults (betas 0.9, 0.999, weight decay 0.01), fused: one kernel for
    every parameter's update instead of a chain of elementwise passes over all of them (the SD
    decoder's 49.5 M parameters: 41 against 230 ms per step on 2 CPU cores). Same formula."""
    return torch.optim.AdamW(params, lr=lr, fused=True)


# Skipped float16 updates in a row after which the adaptation gives up (PRECISION above): the
# scaler halves its scale at each, so by then it is below 2**-14 of where it started.
MAX_SKIPPED = 30


def _update(loss: Tensor, opt: torch.optim.Optimizer,
            scaler: torch.amp.GradScaler | None = None) -> bool:
    """One step of every variant: backward and AdamW (through the gradient scaler, if any), then
    the gradients dropped at once (MEMORY above) and autocast's weight copies forgotten
    (AUTOCAST above). False when the scaler found overflowed gradients and skipped the update."""
    applied = True
    if scaler is None or not scaler.is_enabled():
        loss.backward()
        opt.step()
    else:
        scale = scaler.get_scale()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        applied = scaler.get_scale() >= scale  # the scale only falls when the update was skipped
    opt.zero_grad(set_to_none=True)
    torch.clear_autocast_cache()
    return applied


def _steps(steps: int, step_fn: Callable[[], tuple[Tensor, bool]],
           callback: Callable[[int, float], None] | None) -> list[float]:
    """Run step_fn (one update: (its loss, whether it was applied)) until `steps` updates were
    applied; a skipped one (float16 overflow) is done again. Returns the loss before each."""
    losses, skipped = [], 0
    while len(losses) < steps:
        loss, applied = step_fn()
        if not applied:
            skipped += 1
            if skipped > MAX_SKIPPED:
                raise RuntimeError(f"decoder adaptation: float16 gradients overflowed in "
                                   f"{skipped} updates in a row; adapt in bfloat16 or float32")
            continue
        skipped = 0
        losses.append(loss.item())
        if callback is not None:
            callback(len(losses) - 1, losses[-1])
    return losses


def _setup(decoder: nn.Module, h: Tensor, blocks: int | None):
    """What every variant starts from: x_fg = Phi(z*) unadapted, the index of the first trained
    stage, that stage's input (the frozen stages run once), and the ids of the trained
    parameters of `decoder`."""
    if blocks is not None and blocks < 0:
        raise ValueError(f"blocks must be >= 0, got {blocks}")
    stages = decoder.stages()
    frozen = 0 if blocks is None else max(0, len(stages) - 1 - blocks)
    with torch.no_grad():
        x_fg = decoder(h)
        start = h
        for fn, _ in stages[:frozen]:
            start = fn(start)
    trained = {id(p) for _, modules in stages[frozen:] for m in modules for p in m.parameters()}
    return x_fg, frozen, start, trained


def adapt_decoder(decoder: nn.Module, h: Tensor, x_ok: Tensor, mask: Tensor, steps: int = 200,
                  lr: float = 1e-4, fg_weight: float = 1.0, bg_weight: float = 100.0,
                  callback: Callable[[int, float], None] | None = None,
                  blocks: int | None = None, compile: bool = False) -> tuple[Tensor, list[float]]:
    """Fine-tune a copy of `decoder` on one image and return (its output, the loss per step).

    decoder: the autoencoder's `decoder` (post_quant_conv excluded); h: its input for z*
    (`autoencoder.decoder_input(z*)`), (B, z_channels, h, w); x_ok: (B, 3, H, W) in [-1, 1];
    mask: (B, 1, H, W). The returned image is the adapted decoder's output after the last step.
    losses[k] is the loss before update k; len(losses) == steps + 1 (the last: after training).

    blocks (opt-in, not the paper's method): train only the output head and the last `blocks`
    upsampling levels; the stages before them (Decoder.stages) are frozen, so their output is
    computed once and each step runs forward and backward through the tail alone. None (or
    len(decoder.up) + 1, which includes conv_in + mid) trains the whole decoder.

    compile: run each step's forward, loss and backward through torch.compile (inductor fuses
    the norms, activations and the loss). The graph is built once per decoder and reused for
    every image: the copy's parameters are passed in as tensors (torch.func.functional_call).
    """
    if compile:
        return _adapt_compiled(decoder, h, x_ok, mask, steps, lr, fg_weight, bg_weight, callback,
                               blocks)
    x_fg, frozen, start, _ = _setup(decoder, h, blocks)
    tuned = copy.deepcopy(decoder).float().train()  # float32 master weights: see PRECISION above
    for m in tuned.modules():  # see MEMORY above
        if hasattr(m, "recompute"):
            m.recompute = x_ok.shape[-2] * x_ok.shape[-1] >= RECOMPUTE_FROM
    fmt = _memory_format(h, x_ok)  # see SPEED above
    tuned.to(memory_format=fmt)
    start = start.contiguous(memory_format=fmt)
    stages = tuned.stages()[frozen:]
    tuned.requires_grad_(False)
    for _, modules in stages:
        for m in modules:
            m.requires_grad_(True)

    opt = _adamw([p for p in tuned.parameters() if p.requires_grad], lr)
    precision, scaler = _precision(decoder, h.device)

    def step():
        loss = adaptation_loss(run_stages(stages, start), x_fg, x_ok, mask, fg_weight, bg_weight)
        return loss, _update(loss, opt, scaler)
    with precision:
        losses = _steps(steps, step, callback)
        with torch.no_grad():
            out = run_stages(stages, start)
            losses.append(adaptation_loss(out, x_fg, x_ok, mask, fg_weight, bg_weight).item())
    return out.to(x_fg.dtype).contiguous(), losses


class _Tail(nn.Module):
    """The decoder's stages from `first` on, as one module (for torch.func.functional_call)."""

    def __init__(self, decoder: nn.Module, first: int):
        super().__init__()
        self.decoder, self.first = decoder, first

    def forward(self, h: Tensor) -> Tensor:
        return run_stages(self.decoder.stages()[self.first:], h)


def adapt_decoders(decoder: nn.Module, h: Tensor, x_ok: Tensor, mask: Tensor, steps: int = 200,
                   lr: float = 1e-4, fg_weight: float = 1.0, bg_weight: float = 100.0,
                   callback: Callable[[int, float], None] | None = None,
                   blocks: int | None = None) -> tuple[Tensor, list[list[float]]]:
    """adapt_decoder for a batch of B images at once, each with its own copy of the decoder.

    The B copies' parameters are stacked along a new first dimension (torch.func) and one
    vmapped forward and backward serves all of them: image b's loss reaches only copy b, and
    AdamW's update is elementwise, so each copy follows exactly the path it would alone (equal
    to adapt_decoder image by image up to floating-point summation order). Returns (the B
    outputs, per image the loss per step); callback(step, mean loss over the batch).

    It computes in float32 whatever the decoder's dtype or the caller's autocast: torch applies
    no autocast inside vmap (a convolution under autocast stays float32 there, torch 2.13).
    """
    b = h.shape[0]
    x_fg, frozen, start, trained = _setup(decoder, h, blocks)
    tail = _Tail(copy.deepcopy(decoder).float().train(), frozen)  # see PRECISION above
    params, buffers = stack_module_state([tail] * b)  # copies: B independent leaf tensors each
    params = {f"decoder.{n}": params[f"decoder.{n}"].requires_grad_()
              for n, p in decoder.named_parameters() if id(p) in trained}
    fixed = {n: p.detach() for n, p in tail.named_parameters() if n not in params}

    def one(p, x, fg, ok, m):  # one image: its parameters and (1, ...) tensors
        out = functional_call(tail, ({**fixed, **p}, {k: v[0] for k, v in buffers.items()}), (x,))
        return out, adaptation_loss(out, fg, ok, m, fg_weight, bg_weight)

    batched = vmap(one, in_dims=(0, 0, 0, 0, 0))
    # torch applies no autocast inside vmap (measured, torch 2.13): the batch computes in float32
    split = [t.float().unsqueeze(1) for t in (start, x_fg, x_ok, mask)]
    opt = _adamw(list(params.values()), lr)
    losses: list[list[float]] = [[] for _ in range(b)]
    for step in range(steps):  # float32 (see above): no autocast, no gradient scaler
        _, loss = batched(params, *split)
        _update(loss.sum(), opt)
        for i, v in enumerate(loss.tolist()):
            losses[i].append(v)
        if callback is not None:
            callback(step, sum(loss.tolist()) / b)
    with torch.no_grad():
        out, loss = batched(params, *split)
    for i, v in enumerate(loss.tolist()):
        losses[i].append(v)
    return out.squeeze(1).to(x_fg.dtype), losses


_COMPILED: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _compiled_step(decoder: nn.Module, frozen: int) -> Callable:
    """torch.compile of (parameters, tail input, targets) -> (output, loss) for this decoder's
    stages from `frozen` on; one per (decoder, frozen), so later images reuse the graph."""
    per_decoder = _COMPILED.setdefault(decoder, {})
    if frozen not in per_decoder:
        tail = _Tail(copy.deepcopy(decoder).float(), frozen)  # a template: parameters come as arguments

        def step(params, start, x_fg, x_ok, mask, fg_weight, bg_weight):
            out = functional_call(tail, params, (start,))
            return out, adaptation_loss(out, x_fg, x_ok, mask, fg_weight, bg_weight)
        per_decoder[frozen] = torch.compile(step)
    return per_decoder[frozen]


def _adapt_compiled(decoder, h, x_ok, mask, steps, lr, fg_weight, bg_weight, callback, blocks):
    """adapt_decoder through the compiled step; the same optimisation, fused kernels."""
    x_fg, frozen, start, trained = _setup(decoder, h, blocks)
    step = _compiled_step(decoder, frozen)
    fmt = _memory_format(h, x_ok)  # see SPEED above
    params = {f"decoder.{n}": p.detach().float().clone(memory_format=fmt if p.dim() == 4 else
                                                       torch.preserve_format)
              .requires_grad_(id(p) in trained)
              for n, p in decoder.named_parameters()}  # float32 master weights: see PRECISION
    start = start.contiguous(memory_format=fmt)
    opt = _adamw([p for p in params.values() if p.requires_grad], lr)
    precision, scaler = _precision(decoder, h.device)

    def one():
        _, loss = step(params, start, x_fg, x_ok, mask, fg_weight, bg_weight)
        return loss, _update(loss, opt, scaler)
    with precision:
        losses = _steps(steps, one, callback)
        with torch.no_grad():
            out, loss = step(params, start, x_fg, x_ok, mask, fg_weight, bg_weight)
    losses.append(loss.item())
    return out.detach().to(x_fg.dtype).contiguous(), losses
