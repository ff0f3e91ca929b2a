"""Training you can watch: a progress line every --log-every steps (Progress) and, every
--preview-every steps, from process 0, OUT/samples/step_NNNNNN.png: a small grid of what the
model draws now for the same few training items (the run's samples 0..3: their images, trimaps
and prompts), beside loss.png.

Per row, by stage:
  control      the training pair (defect pasted in) | its trimap | a sample from noise with that
               trimap and prompt (what the branch has learnt to put where);
  unet, text   the training image | a sample from noise with its prompt;
  autoencoder  the training image | its reconstruction (the posterior mean, decoded).
Samples are plain guided DDIM (20 steps, guidance 9.0, no blending), their noise fixed by --seed,
so grids of successive steps differ only by what the networks learnt.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ..config import Stages
from ..ddim import alphas_cumprod
from ..images import save_png, to_uint8
from ..sampler import blended_sample, guided_eps
from .trainsamples import latent_shape

ROWS, STEPS, GUIDANCE = 4, 20, 9.0


def preview_items(dataset, rows: int = ROWS) -> list[dict]:
    """The run's first samples: the same items at every preview (item i depends on (seed, i))."""
    return [dataset[i] for i in range(min(rows, len(dataset)))]


@torch.no_grad()
def draw(nets: dict, tokenizer, stage: str, items: list[dict], size: int, seed: int,
         device: torch.device) -> np.ndarray:
    """The grid (uint8 (rows x S, columns x S, 3)) of what the networks draw for `items`."""
    ae = nets["autoencoder"]
    image = torch.stack([it["image"] for it in items]).to(device)
    if stage == "autoencoder":
        columns = [image, ae.decode(ae.encode(image))]
    else:
        prompts = [it["prompt"] for it in items]
        text = nets["text_encoder"]
        cond = text(tokenizer(prompts).to(device))
        uncond = text(tokenizer([""]).to(device)).expand(len(items), -1, -1)
        control = nets.get("control") if stage == "control" else None
        hint = torch.stack([it["hint"] for it in items]).to(device) if control is not None else None
        eps = guided_eps(nets["unet"], control, cond, uncond, hint, GUIDANCE)
        z_shape = (len(items), *latent_shape(ae.cfg, size))
        g = torch.Generator().manual_seed(seed)
        z_like = torch.zeros(z_shape, device=device)
        free = Stages(STEPS, STEPS, STEPS, STEPS)  # no editing: plain DDIM from noise
        z = blended_sample(eps, None, None, z_like, image, torch.zeros_like(image[:, :1]),
                           alphas_cumprod().to(device), free,
                           noise=lambda like: torch.randn(like.shape, generator=g).to(like))
        sample = ae.decode(z)
        columns = [image, hint * 2 - 1, sample] if control is not None else [image, sample]
    rows = [np.concatenate([to_uint8(c[b]) for c in columns], axis=1) for b in range(len(items))]
    return np.concatenate(rows, axis=0)


def write_preview(run, tokenizer, items: list[dict], done: int) -> Path:
    """OUT/samples/step_{done:06d}.png for the networks as they are after step `done`."""
    nets = run.nets
    trained = [nets[n] for n in run.trained]
    modes = [net.training for net in trained]
    for net in trained:
        net.eval()
    try:
        grid = draw(nets, tokenizer, run.args.stage, items, run.args.size, run.args.seed,
                    run.device)
    finally:
        for net, mode in zip(trained, modes):
            net.train(mode)
    path = run.out / "samples" / f"step_{done:06d}.png"
    save_png(grid, path)
    return path


class Progress:
    """A progress line every --log-every steps (and at the first and last): the mean loss since
    the last line, the rate, and the time left."""

    def __init__(self, start: int, steps: int, every: int, log):
        self.start, self.steps, self.every, self.log = start, steps, every, log
        self.t_last, self.s_last, self.recent = time.perf_counter(), start, []

    def add(self, done: int, value: float) -> None:
        self.recent.append(value)
        if done % self.every and done != self.steps and done != self.start + 1:
            return
        now = time.perf_counter()
        rate = (done - self.s_last) / max(now - self.t_last, 1e-9)
        left = (self.steps - done) / rate
        self.log(f"step {done}/{self.steps}  loss {sum(self.recent) / len(self.recent):.5f}  "
                 f"{rate:.2f} steps/s  left {int(left // 3600)}:{int(left % 3600 // 60):02d}:"
                 f"{int(left % 60):02d}")
        self.t_last, self.s_last, self.recent = now, done, []
