"""Reference vectors for people porting minibldm: the inputs and outputs of every component of a
model, in one safetensors file, so a port can check itself piece by piece
(`python tools/export_vectors.py OUT`; tests/test_vectors.py checks the committed file for the
bundled tiny model against the current code).

Entries are named `<component>.in.<name>` and `<component>.out.<name>`; the file's metadata holds
"descriptions" (JSON: entry -> what it is), "prompts", "sample" (the whole-sample settings),
"tolerance" (JSON: component -> the max abs difference a float32 port should stay within, as a
fraction of the entry's largest magnitude, at least 1) and "weights" (sha256 of each network file).

Components (shapes for the tiny model: 128 px images, 16 x 16 x 4 latents, 128-wide text):
  tokenizer     prompts (metadata) -> ids, padded with the end token to 77
  text_encoder  ids -> last hidden state after the final LayerNorm
  control       trimap branch: (z_t, hint, t, context = τ("")) -> its residuals, one per UNet
                skip connection and then the middle block's, as `residual.<i>`
  unet          (z_t, t, context, residuals) -> ε; and without residuals -> eps_no_control
  encoder       image in [-1, 1] -> posterior mean and clamped logvar (unscaled)
  decoder       scaled latent -> image (decode: unscale, post_quant_conv, decoder)
  ddim          one DDIM step (eta 0) from t to t_prev with the given ε -> z_prev, x0; the
                schedule ā in float64 as `ddim.in.alphas_cumprod`
  sample        the whole default method for one image (minibldm.pipeline.defect_image): x_OK,
                the defect mask, the trimap, the prompt ids, and every random draw in order
                (`sample.in.noise`, one (1, 4, h, w) slice per draw) -> z_OK, z*, the decoded image
                before and after the 200-step decoder adaptation, and the loss per step
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from minibldm.adapt import adapt_decoder
from minibldm.config import AdaptConfig, SampleConfig, Stages
from minibldm.ddim import alphas_cumprod, ddim_step
from minibldm.io import file_sha256, save_atomic
from minibldm.masks import trimap
from minibldm.pipeline import defect_image
from minibldm.weights import FILES, Models

PROMPTS = ["a woven fabric with a hole", "a metal washer with a scratch", "",
           "A PILL, with   black specks!"]
SAMPLE = {"category": "washer", "defect": "scratch", "stages": {"steps": 50, "latent_start": 26,
          "latent_stop": 46, "image_start": 45}, "guidance": 9.0, "eta": 0.0, "adapt_steps": 200,
          "adapt_lr": 1e-4, "fg_weight": 1.0, "bg_weight": 100.0}
TOLERANCE = {"tokenizer": 0, "text_encoder": 1e-5, "control": 1e-5, "unet": 1e-5, "encoder": 1e-5,
             "decoder": 1e-5, "ddim": 1e-6, "sample": 2e-3}
DESCRIPTIONS = {
    "tokenizer.out.ids": "token ids of the prompts in metadata 'prompts', (P, 77) int64",
    "text_encoder.out.hidden": "τ(ids): the text encoder's final hidden states, (P, 77, d)",
    "control.in.z_t": "noisy latent, (2, c, h, w)",
    "control.in.t": "timesteps, (2,) int64",
    "control.in.hint": "trimap Γ: 0 background, 0.5 foreground, 1 defect, 3 equal channels, (2, 3, H, W)",
    "control.in.context": "τ(\"\") for both samples, (2, 77, d)",
    "control.out.residual.<i>": "the trimap branch's i-th residual (zero conv outputs; the last "
                                "is the middle block's)",
    "unet.in.context": "τ of prompts 0 and 1, (2, 77, d); z_t and t are control.in's",
    "unet.out.eps": "ε with the control residuals added to the skips and the middle block",
    "unet.out.eps_no_control": "ε without a trimap branch",
    "encoder.in.image": "a synthetic washer image with a scratch, in [-1, 1], (1, 3, H, W)",
    "encoder.out.mean": "posterior mean (unscaled), (1, c, h, w)",
    "encoder.out.logvar": "posterior log-variance clamped to [-30, 20]",
    "decoder.in.z": "scaled latent: scale_factor * encoder.out.mean",
    "decoder.out.image": "decode(z), (1, 3, H, W)",
    "ddim.in.alphas_cumprod": "ā_t for t = 0..999 (ldm's linear schedule), float64",
    "ddim.in.z_t": "latent at t (control.in.z_t's first sample)",
    "ddim.in.eps": "ε (unet.out.eps's first sample)",
    "ddim.in.t": "t and t_prev, (2,) int64",
    "ddim.out.z_prev": "DDIM (eta 0) latent at t_prev",
    "ddim.out.x0": "predicted x0",
    "sample.in.x_ok": "defect-free image x_OK in [-1, 1] (encoder.in.image's scene), (1, 3, H, W)",
    "sample.in.mask": "defect mask M* (the scratch of encoder.in.image), (1, 1, H, W), 1 on the defect",
    "sample.in.hint": "trimap Γ of the mask and the object's foreground, (1, 3, H, W)",
    "sample.in.ids": "token ids of the prompt and of \"\", (2, 77)",
    "sample.in.noise": "every standard normal draw of the method in order, (K, 1, c, h, w): "
                       "z_OK's posterior noise, z_T, one per latent-editing step, two per "
                       "image-editing step (posterior sample, re-noising)",
    "sample.out.z_ok": "z_OK = scale * posterior sample of x_OK",
    "sample.out.z": "z*, the latent after Algorithm 1",
    "sample.out.before": "decode(z*) by the frozen decoder",
    "sample.out.after": "the output of the adapted decoder after the last adaptation step",
    "sample.out.losses": "adaptation loss before each step, then after the last, (steps + 1,)",
}



class Tape:
    """Standard normal draws: recorded from a generator, or replayed from a tensor."""

    def __init__(self, generator: torch.Generator | None = None, replay: torch.Tensor | None = None):
        self.generator, self.replay, self.drawn = generator, replay, []

    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        if self.replay is not None:
            x = self.replay[len(self.drawn)].to(like.dtype)
        else:
            x = torch.randn(like.shape, generator=self.generator, dtype=like.dtype)
        self.drawn.append(x)
        return x


def make_inputs(m: Models, seed: int = 0) -> dict[str, torch.Tensor]:
    """The inputs every component reads (drawn from `seed`; images from minibldm.synth)."""
    from minibldm.commands.synth import image_rng, make_defect, make_good

    cfg = m.config
    f = cfg.autoencoder.factor
    size = cfg.autoencoder.resolution
    c, h = cfg.autoencoder.embed_dim, size // f
    g = torch.Generator().manual_seed(seed)
    def rng():
        return image_rng(seed, SAMPLE["category"], "vectors", 0)

    def tensor(image):
        return torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1

    image, mask, fg = make_defect(SAMPLE["category"], SAMPLE["defect"], rng(), size)
    x = tensor(image)
    mask_t, fg_t = torch.from_numpy(mask).float(), torch.from_numpy(fg).float()
    hint1 = trimap(mask_t, fg_t)
    hint2 = trimap(torch.zeros_like(mask_t), torch.ones_like(fg_t))  # a surface, no defect
    return {"control.in.z_t": torch.randn(2, c, h, h, generator=g),
            "control.in.t": torch.tensor([981, 261]),
            "control.in.hint": torch.stack([hint1, hint2]),
            "encoder.in.image": x,
            "ddim.in.t": torch.tensor([981, 961]),
            "sample.in.x_ok": tensor(make_good(SAMPLE["category"], rng(), size)[0]),  # same scene
            "sample.in.mask": mask_t[None, None],
            "sample.in.hint": hint1[None]}


@torch.no_grad()
def compute(m: Models, inputs: dict[str, torch.Tensor], noise: torch.Tensor | None = None,
            seed: int = 0, adapt=adapt_decoder) -> dict[str, torch.Tensor]:
    """Every entry: `inputs` (make_inputs) completed with what the components compute. The
    whole sample draws its noise from `seed`, or replays `noise`."""
    out = dict(inputs)
    ids = m.tokenizer(PROMPTS)
    out["tokenizer.out.ids"] = ids
    hidden = m.text_encoder(ids)
    out["text_encoder.out.hidden"] = hidden
    z_t, t, hint = inputs["control.in.z_t"], inputs["control.in.t"], inputs["control.in.hint"]
    uncond = hidden[2:3].expand(2, -1, -1)
    out["control.in.context"] = uncond
    residuals = m.control(z_t, hint, t, uncond)
    for i, r in enumerate(residuals):
        out[f"control.out.residual.{i}"] = r
    context = hidden[:2]
    out["unet.in.context"] = context
    eps = m.unet(z_t, t, context, control=residuals)
    out["unet.out.eps"] = eps
    out["unet.out.eps_no_control"] = m.unet(z_t, t, context)

    ae = m.autoencoder
    mean, logvar = ae.moments(inputs["encoder.in.image"])
    out["encoder.out.mean"], out["encoder.out.logvar"] = mean, logvar
    # a component downstream of another reads the file's copy of its input when one is given
    # (recompute), as a port does: the DDIM step amplifies a 1e-6 change of ε ~15x at t = 981
    out["decoder.in.z"] = inputs.get("decoder.in.z", ae.cfg.scale_factor * mean)
    out["decoder.out.image"] = ae.decode(out["decoder.in.z"])

    ac = alphas_cumprod()
    out["ddim.in.alphas_cumprod"] = ac
    out["ddim.in.z_t"] = inputs.get("ddim.in.z_t", z_t[:1])
    out["ddim.in.eps"] = inputs.get("ddim.in.eps", eps[:1])
    t_now, t_prev = inputs["ddim.in.t"].tolist()
    out["ddim.out.z_prev"], out["ddim.out.x0"] = ddim_step(
        out["ddim.in.z_t"], out["ddim.in.eps"], torch.tensor([t_now]), t_prev, ac)

    sample_ids = m.tokenizer([f"a metal washer with a {SAMPLE['defect']}", ""])
    cond, unc = m.text_encoder(sample_ids).chunk(2)
    tape = Tape(torch.Generator().manual_seed(seed + 1), noise)
    cfg = SampleConfig(Stages(**SAMPLE["stages"]), SAMPLE["guidance"], SAMPLE["eta"],
                       adapt=AdaptConfig(SAMPLE["adapt_steps"], SAMPLE["adapt_lr"],
                                         SAMPLE["fg_weight"], SAMPLE["bg_weight"]))
    res = defect_image(m, inputs["sample.in.x_ok"], inputs["sample.in.mask"],
                       inputs["sample.in.hint"], cond, unc, tape, cfg, adapt)
    out["sample.in.ids"] = sample_ids
    out["sample.in.noise"] = torch.stack(tape.drawn)
    for k in ("z_ok", "z", "before", "after"):
        out[f"sample.out.{k}"] = res[k]
    out["sample.out.losses"] = torch.tensor(res["losses"][0], dtype=torch.float64)
    return out


def export(m: Models, weights_dir: str | Path, path: str | Path, seed: int = 0) -> dict:
    """Compute every entry for the model of `weights_dir` and write them to `path`."""
    tensors = compute(m, make_inputs(m, seed), seed=seed)
    wdir = Path(weights_dir)
    files = {name: file_sha256(wdir / f) for name, f in FILES.items() if (wdir / f).is_file()}
    meta = {"descriptions": json.dumps(DESCRIPTIONS), "prompts": json.dumps(PROMPTS),
            "sample": json.dumps(SAMPLE), "tolerance": json.dumps(TOLERANCE),
            "weights": json.dumps(files), "seed": str(seed), "torch": torch.__version__}
    save_atomic({k: v.clone() for k, v in tensors.items()}, path, meta)  # no shared storage
    return tensors


def read(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def recompute(m: Models, ref: dict[str, torch.Tensor], adapt=adapt_decoder) -> dict[str, torch.Tensor]:
    """Every entry, recomputed by the current code from the inputs and recorded noise of `ref`;
    the decoder and the DDIM step from ref's own inputs (each component checked on its own).
    adapt: Algorithm 2's implementation (fast.adapt_decoder checks the fast path)."""
    inputs = {k: ref[k] for k in ("control.in.z_t", "control.in.t", "control.in.hint",
                                  "encoder.in.image", "ddim.in.t", "sample.in.x_ok",
                                  "sample.in.mask", "sample.in.hint", "decoder.in.z",
                                  "ddim.in.z_t", "ddim.in.eps")}
    return compute(m, inputs, noise=ref["sample.in.noise"], adapt=adapt)


def differences(ref: dict[str, torch.Tensor], new: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per entry of `ref`: the max abs difference to `new`, divided by max(1, the entry's largest
    magnitude); inf where `new` lacks it or has another shape."""
    diffs = {}
    for k, v in ref.items():
        if k not in new or new[k].shape != v.shape:
            diffs[k] = float("inf")
            continue
        a, b = new[k].double(), v.double()
        diffs[k] = ((a - b).abs().max() / max(1.0, b.abs().max().item())).item() if v.numel() else 0.0
    return diffs
