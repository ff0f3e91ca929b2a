"""The defect detector used to compare training data: a small segmentation U-Net.

The same network, loss and schedule are trained from scratch for every data source, so the
numbers differ only by the defect images given to it. Anomaly map: the sigmoid of its logits;
image score: the map's maximum after a 21x21 mean filter (`image_scores`).
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor, nn

from ..io import read_safetensors, save_atomic


class Block(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__(nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(groups, c_out),
                         nn.SiLU(), nn.Conv2d(c_out, c_out, 3, padding=1),
                         nn.GroupNorm(groups, c_out), nn.SiLU())


class SegNet(nn.Module):
    """(B, 3, S, S) images in [-1, 1] -> (B, 1, S, S) defect logits; S a multiple of
    2 ** (len(channels) - 1). Per level (`channels`, full resolution first) two (3x3 conv,
    GroupNorm with `groups`, SiLU); 2x2 max-pool down, nearest up, skips concatenated; a 1x1
    conv gives one logit per pixel, its bias `out_bias` a prior of about 5% defect pixels."""

    def __init__(self, channels: tuple[int, ...] = (16, 32, 64, 128), groups: int = 8,
                 out_bias: float = -3.0):
        super().__init__()
        ch, g = channels, groups
        self.down = nn.ModuleList([Block(c_in, c, g) for c_in, c in zip((3,) + ch[:-1], ch)])
        self.up = nn.ModuleList([Block(ch[i + 1] + ch[i], ch[i], g)
                                 for i in reversed(range(len(ch) - 1))])
        self.out = nn.Conv2d(ch[0], 1, 1)
        nn.init.constant_(self.out.bias, out_bias)

    def forward(self, x: Tensor) -> Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        x = skips.pop()
        for block in self.up:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
            x = block(torch.cat([x, skips.pop()], 1))
        return self.out(x)


def loss(logits: Tensor, target: Tensor) -> Tensor:
    """BCE + soft Dice (1 - (2 sum(p t) + 1) / (sum p + sum t + 1), over the whole batch; good
    images have an all-zero target)."""
    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits)
    dice = 1 - (2 * (p * target).sum() + 1) / (p.sum() + target.sum() + 1)
    return bce + dice


class Checkpoint:
    """Where a detector's training is saved every `every` steps so that a killed run resumes
    exactly: the network, Adam's moments and the losses so far, in one safetensors file that
    also records `key` (the run's settings). A file with another key is refused, not resumed."""

    def __init__(self, path: str | Path, key: str, every: int = 200):
        self.path, self.key, self.every = Path(path), key, every

    def stored_key(self) -> str | None:
        """The settings the file was written with; None when there is no file."""
        if not self.path.is_file():
            return None
        with safe_open(str(self.path), "pt") as f:
            return (f.metadata() or {}).get("settings", "")

    def save(self, net: nn.Module, opt: torch.optim.Optimizer, losses: list[float]) -> None:
        tensors = {f"net.{k}": v for k, v in net.state_dict().items()}
        for i, state in opt.state_dict()["state"].items():
            tensors.update({f"adam.{i}.{k}": v for k, v in state.items()})
        tensors["losses"] = torch.tensor(losses, dtype=torch.float64)
        save_atomic(tensors, self.path, {"settings": self.key})

    def load(self, net: nn.Module, opt: torch.optim.Optimizer) -> list[float]:
        """Restore `net` and `opt` in place; returns the losses so far ([] without a file)."""
        if not self.path.is_file():
            return []
        tensors = read_safetensors(self.path)
        net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
        state: dict[int, dict] = {}
        for k, v in tensors.items():
            if k.startswith("adam."):
                _, i, name = k.split(".")
                state.setdefault(int(i), {})[name] = v
        opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
        return tensors["losses"].tolist()


def train(net: SegNet, batch: Callable[[int], tuple[Tensor, Tensor]], steps: int,
          lr: float = 2e-3, device: str = "cpu", log: Callable[[str], None] | None = None,
          channels_last: bool = True, checkpoint: Checkpoint | None = None) -> list[float]:
    """Train `net` for `steps` Adam steps; batch(step) -> (images (B, 3, S, S), masks (B, 1, S,
    S)). The learning rate decays from `lr` to 0 along a half cosine. Returns the loss per step.
    channels_last: store the activations as (B, S, S, C), 1.3x faster on a 2-core CPU for the
    same function (float rounding aside; tests/test_evaluate.py compares the two runs' losses).
    checkpoint: resume from it when its file exists, and save to it every `checkpoint.every`
    steps; the batches are a function of the step, so a resumed run repeats the straight one."""
    layout = torch.channels_last if channels_last else torch.contiguous_format
    net.to(memory_format=layout).train()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    losses = checkpoint.load(net, opt) if checkpoint else []
    first, t0 = len(losses), time.time()
    if first and log is not None:
        log(f"detector: resuming at step {first}/{steps} from {checkpoint.path}")
    every = max(1, steps // 20)
    for step in range(first, steps):
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        images, masks = batch(step)
        value = loss(net(images.to(device).contiguous(memory_format=layout)), masks.to(device))
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        losses.append(value.item())
        if checkpoint and (step + 1) % checkpoint.every == 0 and step + 1 < steps:
            checkpoint.save(net, opt, losses)
        if log is not None and ((step + 1) % every == 0 or step + 1 == steps):
            spent = time.time() - t0
            left = spent / (step + 1 - first) * (steps - step - 1)
            log(f"detector step {step + 1}/{steps}: loss {sum(losses[-every:]) / every:.4f} "
                f"({spent:.0f} s, about {left / 60:.0f} min left)")
    net.to(memory_format=torch.contiguous_format).eval()
    return losses


def loss_curve(losses: list[float], points: int = 50) -> list[float]:
    """The loss per step averaged over `points` equal spans (fewer if there are fewer steps)."""
    spans = torch.tensor(losses, dtype=torch.float64).tensor_split(min(points, len(losses)))
    return [round(float(s.mean()), 5) for s in spans]


@torch.no_grad()
def anomaly_maps(net: SegNet, images: Tensor, batch_size: int = 16,
                 device: str = "cpu") -> Tensor:
    """(N, 3, S, S) images -> (N, S, S) defect probabilities, on the CPU."""
    net.eval()
    out = [torch.sigmoid(net(images[i:i + batch_size].to(device)))[:, 0].cpu()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out) if out else images.new_zeros(0, *images.shape[-2:])


def image_scores(maps: Tensor, window: int = 21) -> Tensor:
    """(N, S, S) maps -> (N,) scores: the maximum of the map's `window` x `window` mean (stride
    1, padded pixels not counted)."""
    smooth = F.avg_pool2d(maps[:, None], window, stride=1, padding=window // 2,
                          count_include_pad=False)
    return smooth.flatten(1).amax(1)
