"""minibldm.Pipeline: AdaBLDM for Python users, and the engine of `python -m minibldm.sample`.

    from minibldm import Pipeline
    pipe = Pipeline.load("weights/tiny")        # a weights folder or a training run's folder
    out = pipe(good, mask, "magnetic tile", "crack", seed=0)
    out.image, out.mask, out.record             # uint8 (H, W, 3), uint8 (H, W) 0/255, a dict

`good` is an image of any size (a PIL image, a uint8 (H, W, 3) or (H, W) array, or a path);
`mask` is the defect mask M* at the same size (nonzero = defect). The defaults are the command's:
the paper's whole method with the reference code's knobs (config.SampleConfig), the CPU speed
routes of minibldm/fast (the same computation; `reference=True` runs the pure reference path).

Full resolution. The model works at its own size S (config.json's image_size), as it was trained:
training resizes each whole image to S x S, so the window the model sees is the whole image
(`zoom` 1), resized to S x S with its M* and foreground F. Algorithms 1 and 2 run there
(minibldm/pipeline.defect_image). An S x S image comes back as the method made it. Any other
size gets the model's change (its output minus the window as it saw it) resized back to the window
and added to the full-resolution good image inside M* grown by `margin` model pixels and
feathered (blend_back): the defect is the model's on the source's own fine texture, every pixel
farther away is the good image's own, bit for bit, and the label is M* at full resolution. `zoom` z > 1 generates in a window of 1/z of the
image's height and width around M* instead (more detail per pixel, at a scale the model saw only
if it was trained on such crops).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from . import adapt, fast
from .cli import default_device
from .config import SampleConfig
from .foreground import estimate_foreground
from .images import DataError, mask_to_tensor, read_image, read_mask, resize_image, to_uint8
from .io import WeightsError
from .masks import bbox, trimap
from .pipeline import defect_image, encode_prompt, paste_background, per_image_noise, prompt, psnr
from .weights import load, read_config



def bundled_weights() -> Path:
    """The bundled tiny model: weights/tiny in a source checkout (or an editable install), else
    the copy that a plain `pip install` puts in the package (setup.py's build step)."""
    here = Path(__file__).resolve().parent
    checkout = here.parent / "weights" / "tiny"
    return checkout if (checkout / "config.json").is_file() else here / "bundled" / "tiny"


DEFAULT_WEIGHTS = bundled_weights()
MARGIN = 3  # model pixels around M* where the generated image is blended in (paste_background)


@dataclass
class Job:
    """One image to make: the full-resolution good image, its defect mask M* and foreground F
    (bool (H, W)), the prompt, and the seed of its noise (every random draw of the sampler)."""
    good: np.ndarray
    mask: Tensor
    foreground: Tensor
    prompt: str
    seed: int


@dataclass
class Result:
    """The defect image (uint8 (H, W, 3)), its mask (uint8 (H, W), 0/255) and the record the
    command writes to the manifest. `preview`: the model-size tensors good | trimap | before
    adaptation | after, (3, S, S) each in [-1, 1], and M* (1, S, S), for contact sheets."""
    image: np.ndarray
    mask: np.ndarray
    record: dict
    preview: list = field(default_factory=list, repr=False)


def as_image(x) -> np.ndarray:
    """A PIL image, a path or an array to uint8 (H, W, 3)."""
    if isinstance(x, (str, Path)):
        return read_image(x)
    a = np.array(x.convert("RGB") if isinstance(x, Image.Image) else x)
    if a.dtype != np.uint8 or a.ndim not in (2, 3):
        raise DataError(f"an image must be uint8 (H, W) or (H, W, 3), got {a.dtype} {a.shape}")
    return np.repeat(a[..., None], 3, axis=2) if a.ndim == 2 else np.ascontiguousarray(a[..., :3])


def as_mask(x) -> Tensor:
    """A PIL image, a path, an array or a tensor to a bool (H, W) mask (nonzero = 1)."""
    if isinstance(x, (str, Path)):
        return read_mask(x)[0] > 0.5
    if isinstance(x, Image.Image):
        x = np.asarray(x.convert("L"))
    m = torch.as_tensor(np.array(x) if not isinstance(x, Tensor) else x)
    return (m.amax(-1) if m.ndim == 3 else m) > 0


def window(mask: Tensor, zoom: float, size: int, margin: int = MARGIN) -> tuple[int, int, int, int]:
    """(y, x, h, w) of the part of an (H, W) image the model sees: the whole image at zoom 1;
    else an (H/zoom, W/zoom) window centred on M*'s bounding box, grown to hold the box and
    `margin` model pixels around it, and kept inside the image."""
    H, W = mask.shape
    if zoom == 1:
        return 0, 0, H, W
    y0, y1, x0, x1 = bbox(mask)
    h, w = math.ceil(H / zoom), math.ceil(W / zoom)
    pad_y, pad_x = math.ceil(2 * margin * h / size), math.ceil(2 * margin * w / size)
    h, w = min(H, max(h, y1 - y0 + 1 + pad_y)), min(W, max(w, x1 - x0 + 1 + pad_x))
    y = min(max(round((y0 + y1 + 1) / 2 - h / 2), 0), H - h)
    x = min(max(round((x0 + x1 + 1) / 2 - w / 2), 0), W - w)
    return y, x, h, w


def blend_back(good: np.ndarray, made: Tensor, seen: Tensor, mask: Tensor, win: tuple, size: int,
               margin: int = MARGIN) -> np.ndarray:
    """The model's change to the window `win` of the full-size good image: `made` minus `seen`
    (the model's (3, S, S) output and the window as the model saw it, in [-1, 1]), resized to the
    window and added to the good image inside M* grown by `margin` model pixels and feathered.
    Adding the change, not pasting the upsampled image, keeps the source's own fine texture
    under the defect and in the feather (an upsampled patch would be a blurred square, which a
    detector could learn instead of the defect). The good image's pixels everywhere else."""
    y, x, h, w = win

    def up(t: Tensor) -> Tensor:
        return F.interpolate(t[None].double(), size=(h, w), mode="bilinear", align_corners=False,
                             antialias=h < size or w < size)

    region = torch.from_numpy(good[y:y + h, x:x + w]).permute(2, 0, 1)[None].double() / 127.5 - 1
    radius = math.ceil(margin * max(h, w) / size)
    blended = paste_background(region + up(made) - up(seen), region,
                               mask[y:y + h, x:x + w][None, None].double(), radius)
    out = good.copy()
    out[y:y + h, x:x + w] = to_uint8(blended[0])
    return out


class Pipeline:
    """A loaded generator: call it with a good image, a defect mask, the object and defect
    names and a seed (module docstring); `run` makes a batch of `Job`s."""

    def __init__(self, models, cfg: SampleConfig = SampleConfig(), size: int | None = None,
                 paste_background: bool = False, zoom: float = 1.0, adapt_fn=None):
        if models.control is None:
            raise WeightsError("these weights have no trimap branch (control.safetensors)")
        if not zoom >= 1:
            raise ValueError(f"zoom must be at least 1, got {zoom}")
        self.models, self.cfg, self.paste, self.zoom = models, cfg, paste_background, zoom
        self.size = 256 if size is None else size
        if self.size <= 0 or self.size % models.config.size_multiple:
            raise ValueError(f"size {self.size}: must be a multiple of "
                             f"{models.config.size_multiple} for these weights")
        self.adapt_fn = adapt_fn or fast.adapt_decoder
        param = next(models.unet.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.prompts: dict[str, tuple[Tensor, Tensor]] = {}

    @classmethod
    def load(cls, weights: str | Path = DEFAULT_WEIGHTS, control: str | Path | None = None,
             device: str | None = None, dtype: torch.dtype = torch.float32,
             cfg: SampleConfig = SampleConfig(), size: int | None = None,
             reference: bool = False, compile: bool = False, adapt_blocks: int | None = None,
             **kwargs) -> "Pipeline":
        """Load a weights folder (with its trimap branch, or `control`'s). device: cuda when
        available, else cpu. reference: the pure reference path (minibldm/adapt.py's loop, no CPU
        routes); compile: torch.compile the UNet, the branch and the adaptation."""
        device = device or default_device()
        models = load(weights, device=device, dtype=dtype, control=control)
        if models.control is None:
            raise WeightsError(f"{weights}: has no trimap branch (control.safetensors)")
        if not reference:
            fast.optimize(models)
        if compile:
            models.unet = fast.compile_frozen(models.unet, torch.device(device))
            models.control = fast.compile_frozen(models.control, torch.device(device))
        adapt_fn = adapt.adapt_decoder if reference else functools.partial(
            fast.adapt_decoder, blocks=adapt_blocks, compile=compile)
        size = size or read_config(weights).get("image_size", 256)
        return cls(models, cfg, size, adapt_fn=adapt_fn, **kwargs)

    def __call__(self, good, mask, object_name: str, defect: str, seed: int = 0,
                 foreground=None, texture: bool = False) -> Result:
        """One defect image. foreground: F at the image's size (default: estimated, as the
        command does; texture=True: the whole image)."""
        image, m = as_image(good), as_mask(mask)
        if tuple(m.shape) != image.shape[:2]:
            raise DataError(f"the mask is {tuple(m.shape)} but the image {image.shape[:2]} (H, W)")
        if not m.any():
            raise DataError("the mask is empty")
        fg = (torch.ones(m.shape, dtype=torch.bool) if texture else
              as_mask(foreground) if foreground is not None else estimate_foreground(image) > 0.5)
        return self.run([Job(image, m, fg, prompt(object_name, defect), seed)])[0]

    def encode(self, text: str) -> tuple[Tensor, Tensor]:
        if text not in self.prompts:
            self.prompts[text] = encode_prompt(self.models, text)
        return self.prompts[text]

    def run(self, jobs: list[Job], progress=None, adapt_progress=None) -> list[Result]:
        """Make a batch: each job at the model's size S in its window (module docstring), all
        sampled and adapted together; image j's randomness comes from jobs[j].seed alone."""
        S, dev, dt = self.size, self.device, self.dtype
        wins = [window(j.mask, self.zoom, S) for j in jobs]
        crops = [(j.good[y:y + h, x:x + w], j.mask[y:y + h, x:x + w].float(),
                  j.foreground[y:y + h, x:x + w].float()) for j, (y, x, h, w) in zip(jobs, wins)]
        x_ok = torch.stack([torch.from_numpy(resize_image(g, S).copy()).permute(2, 0, 1).float()
                            / 127.5 - 1 for g, _, _ in crops]).to(dev, dt)
        mask = torch.stack([mask_to_tensor(m, S)[None] for _, m, _ in crops])
        hint = torch.stack([trimap(m[0], mask_to_tensor(f, S)) for m, (_, _, f) in zip(mask, crops)])
        mask, hint = mask.to(dev, dt), hint.to(dev, dt)
        cond, uncond = (torch.cat(c) for c in zip(*(self.encode(j.prompt) for j in jobs)))
        gens = [torch.Generator(dev).manual_seed(j.seed) for j in jobs]
        res = defect_image(self.models, x_ok, mask, hint, cond, uncond, per_image_noise(gens),
                           self.cfg, self.adapt_fn, progress, adapt_progress)
        before, after = res["before"], res["after"]
        if self.paste:
            after = paste_background(after, x_ok, mask)
        results = []
        for b, (job, win) in enumerate(zip(jobs, wins)):
            H, W = job.mask.shape
            native = (H, W) == (S, S) and win == (0, 0, S, S)
            image = (to_uint8(after[b]) if native else
                     blend_back(job.good, after[b].detach().cpu(), x_ok[b].cpu(), job.mask, win, S))
            region, bg = job.mask.numpy(), 1 - mask[b:b + 1]
            change = np.abs(image[region].astype(np.float64) - job.good[region]).mean()
            losses = res["losses"][b]
            record = dict(prompt=job.prompt, noise_seed=job.seed, size=[H, W], window=list(win),
                          stages=vars(self.cfg.stages), adapt_loss_before=losses[0],
                          adapt_loss_after=losses[-1],
                          psnr_bg_before=psnr(before[b:b + 1], x_ok[b:b + 1], bg),
                          psnr_bg_after=psnr(after[b:b + 1], x_ok[b:b + 1], bg),
                          change_in_mask=round(float(change), 3))
            results.append(Result(image, region.astype(np.uint8) * 255, record,
                                  [x_ok[b], hint[b] * 2 - 1, before[b], after[b], mask[b]]))
        return results
