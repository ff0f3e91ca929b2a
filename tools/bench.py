"""Side-by-side speed benchmark: minibldm against diffusers on the same device, with the same
random weights (diffusers' networks converted by minibldm.convert, as users convert theirs).

    python tools/bench.py [--device cpu|cuda] [--size sd15|tiny] [--dtype float32 bfloat16]
                          [--parts peak step adapt adapt-trained pipeline memory sd-pipeline]
                          [--compile] [--channels-last]
                          [--repeats 3] [--adapt-steps N] [--rounds R] [--keep-norms] [--ablate]
                          [--adapt-res PX] [--adapt-blocks N ...]
                          [--batch-size B ...]
                          --out BENCH.json

Parts (medians of --repeats timed runs after one warm-up):
  peak      the device's matmul throughput (4096^2 on GPUs, 2048^2 on CPUs), GFLOP/s per dtype
  step      one guided denoising step, batch 1 (both guidance halves), 32x32 latent, UNet + trimap
            branch: minibldm eager (the branch once, shared by both halves), minibldm compiled
            (--compile), and diffusers UNet2DConditionModel + ControlNetModel eager the way its
            ControlNet pipeline runs them (the branch on both halves, reading the empty prompt
            as AdaBLDM's reference code does); FLOPs counted by
            torch.utils.flop_counter (with attention on CPUs, which it misses: sdpa_cpu_flops),
            so GFLOP/s and the fraction of the matmul peak follow;
            --channels-last adds minibldm eager in channels_last memory order
  adapt     one decoder-adaptation iteration (forward, loss, backward, AdamW) at 256x256:
            minibldm.adapt_decoder against a plain loop over diffusers' AutoencoderKL decoder;
            float32, and minibldm under bfloat16 autocast when bfloat16 is asked for; each runs
            --adapt-steps iterations (200: the final losses are compared) at --adapt-res;
            --compile adds the compiled adaptation, --adapt-blocks N its opt-in faster variants;
            --rounds R runs all the variants in turn R times (speed-ups: the median of the
            rounds' own ratios); --keep-norms adds eager without the GroupNorm recomputation;
            --ablate adds eager without each speed change that leaves the computation as it is
            (the upsampling route, channels-last, fused AdamW), and without all three
  pipeline  the whole default method for one image (minibldm.pipeline.defect_image with the
            fast layer, as `python -m minibldm.sample` runs it; 50 steps and 200 adaptation
            steps) with weights/tiny: wall time and peak memory (a subprocess's peak RSS on CPU,
            max_memory_allocated on a GPU)
  adapt-trained
            the 200-step adaptation with the trained tiny decoder (weights/tiny) on a synthetic
            pill and the same pill with a stain, where the loss stays far from 0: final loss of
            float32, bfloat16 autocast, a bfloat16 decoder (as sample --dtype bfloat16 runs it),
            compiled (--compile) and --adapt-blocks variants, and
            the background PSNR each reaches
  memory    peak memory of the whole method at --size (random weights; sd15 at 256 px, tiny at
            128 px; per --dtype and --batch-size), with short stage lengths: the peak does not
            depend on them; --compile adds the same run compiled as sample --compile does it
  sd-pipeline
            the whole default method at --size (random weights, 50 DDIM and 200 adaptation
            steps): seconds per image, images per hour and peak memory per dtype and
            --batch-size (and compiled with --compile); not in the default parts: at SD 1.5
            size, tens of minutes per image on a CPU
minibldm runs with the fast layer applied (minibldm.fast.optimize and fast.adapt_decoder), as
the sample command does; switches are passed as their arguments. The JSON holds every timing,
the device, torch and diffusers versions and the date.
"""
import argparse
import copy
import datetime
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parent.parent
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int, warmup: int = 1) -> dict:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "runs_s": times}


def sdpa_cpu_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of torch's CPU flash-attention kernel, from the shapes of query (..., Sq, D), key
    (..., Sk, D) and value (..., Sk, Dv): Q K^T and the weights times V. torch's counter has no
    formula for this kernel (torch 2.13), so attention went uncounted on CPUs, on both sides."""
    n = math.prod(query[:-2])
    return 2 * n * query[-2] * key[-2] * (query[-1] + value[-1])


def flops(fn) -> int:
    cpu_attention = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: sdpa_cpu_flops}
    with FlopCounterMode(display=False, custom_mapping=cpu_attention) as counter:
        fn()
    return counter.get_total_flops()


def matmul_peak(device, dtype, repeats) -> float:
    n = 4096 if device.type == "cuda" else 2048
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    r = timed(lambda: a @ b, device, max(repeats, 5))
    return 2 * n ** 3 / r["median_s"] / 1e9


def optimized(autoencoder=None, unet=None, control=None, **thresholds):
    """fast.optimize on these networks (in place), as the sample command applies it after
    loading; thresholds: its keyword arguments."""
    from minibldm import fast
    return fast.optimize(SimpleNamespace(autoencoder=autoencoder, unet=unet, control=control),
                         **thresholds)


def unet_configs(size: str):
    from minibldm.config import SD15, TINY
    return (SD15 if size == "sd15" else TINY).unet


def diffusers_pair(cfg):
    import diffusers
    levels = len(cfg.channel_mult)
    attn = [2 ** i in cfg.attention_resolutions for i in range(levels)]
    kw = dict(block_out_channels=tuple(cfg.model_channels * m for m in cfg.channel_mult),
              down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
              layers_per_block=cfg.num_res_blocks, cross_attention_dim=cfg.context_dim,
              attention_head_dim=cfg.num_heads, norm_num_groups=cfg.norm_num_groups,
              in_channels=cfg.in_channels, transformer_layers_per_block=cfg.transformer_depth)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn))
    unet = diffusers.UNet2DConditionModel(out_channels=cfg.out_channels, up_block_types=up, **kw)
    ctrl = diffusers.ControlNetModel(conditioning_channels=cfg.hint_channels, **kw)
    with torch.no_grad():  # non-zero zero-convs, so the residuals are real work and real values
        for name, p in ctrl.named_parameters():
            if "zero_conv" in name or "controlnet_" in name:
                p.normal_(0, 0.01)
    return unet.eval(), ctrl.eval()


@torch.no_grad()
def bench_step(args, device, results):
    from minibldm.control import ControlNet
    from minibldm.convert import control_from_diffusers, unet_from_diffusers
    from minibldm.fast import compile_frozen
    from minibldm.io import load_into
    from minibldm.sampler import guided_eps
    from minibldm.unet import UNet

    cfg = unet_configs(args.size)
    torch.manual_seed(0)
    ref_unet, ref_ctrl = diffusers_pair(cfg)
    unet = load_into(UNet(cfg), unet_from_diffusers(ref_unet.state_dict(), cfg), "diffusers", "UNet").eval()
    ctrl = load_into(ControlNet(cfg), control_from_diffusers(ref_ctrl.state_dict(), cfg), "diffusers",
                     "control").eval()
    latent = 32 if args.size == "sd15" else 16
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 4, latent, latent, generator=g)
    cond, uncond = torch.randn(2, 1, 77, cfg.context_dim, generator=g)
    hint = (torch.rand(1, 3, latent * 8, latent * 8, generator=g) > 0.5).float()
    t = torch.tensor([501])
    out = {}
    for dname in args.dtype:
        dt = DTYPES[dname]
        nets = [m.to(device, dt) for m in (ref_unet, ref_ctrl, unet, ctrl)]
        optimized(unet=nets[2], control=nets[3])  # on a CPU; once is all (it is idempotent)
        zz, cc, uu, hh, tt = (x.to(device, dt) if x.is_floating_point() else x.to(device)
                              for x in (z, cond, uncond, hint, t))

        def diffusers_step():
            lat, ctx = torch.cat([zz, zz]), torch.cat([cc, uu])
            # the branch reads the empty prompt (AdaBLDM's reference code), on both halves
            down, mid = nets[1](lat, torch.cat([tt, tt]), torch.cat([uu, uu]),
                                controlnet_cond=torch.cat([hh, hh]), return_dict=False)
            e = nets[0](lat, torch.cat([tt, tt]), ctx, down_block_additional_residuals=down,
                        mid_block_additional_residual=mid).sample
            e_c, e_u = e.chunk(2)
            return e_u + 9.0 * (e_c - e_u)

        ours = guided_eps(nets[2], nets[3], cc, uu, hh, 9.0)
        row = {}
        for name, fn in (("diffusers", diffusers_step), ("minibldm", lambda: ours(zz, tt))):
            row[name] = timed(fn, device, args.repeats)
            row[name]["gflop"] = flops(fn) / 1e9
            print(f"step {dname} {name}: {row[name]['median_s']:.3f} s", file=sys.stderr, flush=True)
        if args.channels_last:  # the same networks and inputs in NHWC memory order
            cl = torch.channels_last
            ul, cn = (copy.deepcopy(m).to(memory_format=cl) for m in nets[2:])
            step_cl = guided_eps(ul, cn, cc, uu, hh.contiguous(memory_format=cl), 9.0)
            zl = zz.contiguous(memory_format=cl)
            row["minibldm_channels_last"] = timed(lambda: step_cl(zl, tt), device, args.repeats)
            row["minibldm_channels_last"]["speedup_vs_minibldm"] = (
                row["minibldm"]["median_s"] / row["minibldm_channels_last"]["median_s"])
            row["channels_last_vs_eager_max_abs"] = (
                step_cl(zl, tt).float() - ours(zz, tt).float()).abs().max().item()
            print(f"step {dname} channels_last: {row['minibldm_channels_last']['median_s']:.3f} s",
                  file=sys.stderr, flush=True)
            del ul, cn
        ref = diffusers_step().float()
        row["relative_difference"] = ((ours(zz, tt).float() - ref).norm() / ref.norm()).item()
        if args.compile:
            cu, cctrl = compile_frozen(nets[2], device), compile_frozen(nets[3], device)
            compiled = guided_eps(cu, cctrl, cc, uu, hh, 9.0)
            t0 = time.perf_counter()
            compiled(zz, tt)
            sync(device)
            row["minibldm_compiled"] = timed(lambda: compiled(zz, tt), device, args.repeats)
            row["minibldm_compiled"]["compile_s"] = time.perf_counter() - t0
            row["compiled_vs_eager_max_abs"] = (compiled(zz, tt).float() - ours(zz, tt).float()).abs().max().item()
            print(f"step {dname} compiled: {row['minibldm_compiled']['median_s']:.3f} s", file=sys.stderr)
        row["speedup_vs_diffusers"] = row["diffusers"]["median_s"] / row["minibldm"]["median_s"]
        peak = results.get("peak_gflops", {}).get(dname)
        if args.compile:  # the same computation: eager's FLOP count (the counter cannot run compiled)
            row["minibldm_compiled"]["gflop"] = row["minibldm"]["gflop"]
        for name in ("diffusers", "minibldm", "minibldm_compiled")[:3 if args.compile else 2]:
            row[name]["gflops_per_s"] = row[name]["gflop"] / row[name]["median_s"]
            if peak:
                row[name]["fraction_of_matmul_peak"] = row[name]["gflops_per_s"] / peak
        out[dname] = row
    results["step"] = out
    del ref_unet, ref_ctrl, unet, ctrl


def sd_vae(size: str):
    import diffusers
    if size == "sd15":
        return diffusers.AutoencoderKL(
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            sample_size=256)
    return diffusers.AutoencoderKL(
        block_out_channels=(16, 32, 64, 64), layers_per_block=1, latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=128)


def timed_adaptation(decoder, h, x_ok, mask, steps: int, device, autocast: bool = False,
                     **options):
    """minibldm.fast.adapt_decoder, timed per iteration (the first also holds the setup and any
    compile), under bfloat16 autocast if asked; options: its keyword arguments (blocks, compile,
    recompute_from, channels_last_from, fused). Returns (seconds per iteration, output, losses)."""
    from minibldm.config import AdaptConfig
    from minibldm.fast import adapt_decoder
    stamps = [time.perf_counter()]

    def cb(step, loss):
        sync(device)
        stamps.append(time.perf_counter())
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        out, losses = adapt_decoder(decoder, h, x_ok, mask, AdaptConfig(steps=steps), cb,
                                    **options)
    return [b - a for a, b in zip(stamps, stamps[1:])], out, losses[0]


def bench_adapt(args, device, results):
    from minibldm.adapt import adaptation_loss
    from minibldm.autoencoder import Autoencoder
    from minibldm.config import SD15, TINY
    from minibldm.convert import autoencoder_from_diffusers
    from minibldm.io import load_into

    cfg = (SD15 if args.size == "sd15" else TINY).autoencoder
    res = args.adapt_res or (256 if args.size == "sd15" else 128)
    torch.manual_seed(0)
    vae = sd_vae(args.size).eval()
    ae = load_into(Autoencoder(cfg), autoencoder_from_diffusers(vae.state_dict()), "diffusers", "VAE").eval()
    vae, ae = vae.to(device), ae.to(device)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 4, res // 8, res // 8, generator=g).to(device)
    x_ok = (torch.rand(1, 3, res, res, generator=g) * 2 - 1).to(device)
    mask = torch.zeros(1, 1, res, res, device=device)
    mask[..., res // 4: res // 2, res // 3: res // 2] = 1
    with torch.no_grad():
        h = ae.decoder_input(z)
        x_fg = vae.decoder(vae.post_quant_conv(z / cfg.scale_factor))
    n = args.adapt_steps or args.repeats + 1
    # the decoder as the sample command adapts it (its upsampling on the input grid, on a CPU),
    # and without that route for --ablate
    decoders = {route: optimized(copy.deepcopy(ae), **({} if route else {
                    "upsample_min_channels": float("inf")})).autoencoder.decoder
                for route in (True, False)}

    def per_step(times):
        return {"median_s": statistics.median(times[1:]), "runs_s": times[1:]}

    def ours(autocast: bool, blocks: int | None = None, compile: bool = False,
             keep_norms: bool = False, without: tuple[str, ...] = ()):
        # keep_norms: the norms kept for the backward pass at any size; without: the speed
        # changes that --ablate turns off, each through fast.adapt_decoder's or optimize's arguments
        options = {"blocks": blocks, "compile": compile}
        if keep_norms:
            options["recompute_from"] = float("inf")
        if "channels_last" in without:
            options["channels_last_from"] = float("inf")
        if "fused" in without:
            options["fused"] = False
        times, _, losses = timed_adaptation(decoders["upsample" not in without], h, x_ok, mask, n,
                                            device, autocast, **options)
        # the first iteration (dropped from the median) holds the compile when there is one
        return {**per_step(times), "first_iteration_s": times[0]}, losses

    def theirs():
        dec = copy.deepcopy(vae.decoder).train()
        opt = torch.optim.AdamW(dec.parameters(), lr=1e-4)
        hin = vae.post_quant_conv(z / cfg.scale_factor).detach()
        times, losses = [], []
        for _ in range(n):
            t0 = time.perf_counter()
            out = dec(hin)
            loss = adaptation_loss(out, x_fg, x_ok, mask)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            sync(device)
            times.append(time.perf_counter() - t0)
        with torch.no_grad():  # the loss after the last step, as adapt_decoder reports it
            losses.append(adaptation_loss(dec(hin), x_fg, x_ok, mask).item())
        return per_step(times), losses

    # every variant, run in turn, --rounds times: a shared machine's speed drifts by 10-20%
    # over minutes, so each round's ratios compare variants timed minutes apart at most
    variants = {"diffusers_float32": theirs, "minibldm_float32": lambda: ours(False)}
    if args.keep_norms:
        variants["minibldm_float32_keep_norms"] = lambda: ours(False, keep_norms=True)
    if args.ablate:  # eager float32 without each speed change of adapt.py's SPEED, and without all
        for off in (("upsample",), ("channels_last",), ("fused",),
                    ("upsample", "channels_last", "fused")):
            name = "minibldm_float32_without_" + "_".join(off)
            variants[name] = lambda off=off: ours(False, without=off)
    if args.compile:
        variants["minibldm_compiled_float32"] = lambda: ours(False, compile=True)
    for b in args.adapt_blocks or ():
        variants[f"minibldm_blocks{b}_float32"] = lambda b=b: ours(False, blocks=b)
    if "bfloat16" in args.dtype:
        variants["minibldm_bf16_autocast"] = lambda: ours(True)
    runs = {k: [] for k in variants}
    for _ in range(args.rounds):
        for k, fn in variants.items():
            runs[k].append(fn())
    row = {k: r[0][0] for k, r in runs.items()}  # the first round's timings and losses
    loss = {k: r[0][1] for k, r in runs.items()}
    for k, r in runs.items():
        row[k]["round_medians_s"] = [t["median_s"] for t, _ in r]
        row[k]["median_s"] = statistics.median(row[k]["round_medians_s"])
        if k.startswith("minibldm_"):
            per_round = [d / o for d, o in zip(row["diffusers_float32"]["round_medians_s"],
                                              row[k]["round_medians_s"])]
            row[k]["speedup_vs_diffusers_float32_per_round"] = per_round
            row[k]["speedup_vs_diffusers_float32"] = statistics.median(per_round)
    l_ref, l_ours = loss["diffusers_float32"], loss["minibldm_float32"]
    row["resolution"], row["iterations"], row["rounds"] = res, n, args.rounds
    every = max(1, n // 20)  # the loss curves, about 20 points each
    row["loss_curves"] = {"every": every, **{k: v[::every] for k, v in loss.items()}}
    row["first_loss_float32"] = {"diffusers": l_ref[0], "minibldm": l_ours[0]}
    row["final_loss_float32"] = {"diffusers": l_ref[-1], "minibldm": l_ours[-1],
                                 "relative_difference": l_ours[-1] / l_ref[-1] - 1}
    if args.compile:
        l_c = loss["minibldm_compiled_float32"]
        row["final_loss_compiled_float32"] = {"minibldm": l_c[-1],
                                              "relative_difference": l_c[-1] / l_ref[-1] - 1}
    if "bfloat16" in args.dtype:
        l_bf = loss["minibldm_bf16_autocast"]
        row["first_loss_bf16"] = l_bf[0]
        row["final_loss_bf16"] = {"minibldm": l_bf[-1],
                                  "relative_difference_vs_diffusers_float32": l_bf[-1] / l_ref[-1] - 1}
    for k in variants:
        extra = (f" ({row[k]['speedup_vs_diffusers_float32']:.2f}x diffusers, per round "
                 + ", ".join(f"{x:.2f}" for x in row[k]["speedup_vs_diffusers_float32_per_round"])
                 + ")") if k.startswith("minibldm_") else ""
        print(f"adapt {k}: {row[k]['median_s']:.3f} s/iteration{extra}", file=sys.stderr,
              flush=True)
    results["adapt"] = row


PIPELINE = """
import json, sys, time, torch
import minibldm
from minibldm import fast
from minibldm.masks import trimap
from minibldm.pipeline import defect_image
from minibldm.sampler import gaussian
dev = torch.device(sys.argv[1]); m = fast.optimize(minibldm.load(sys.argv[2], device=dev))
S = json.load(open(sys.argv[2] + "/config.json"))["image_size"]
x = torch.rand(1, 3, S, S, device=dev) * 2 - 1
mask = torch.zeros(S, S); mask[S // 4: S // 2, S // 3: S // 2] = 1
hint = trimap(mask, torch.ones(S, S))[None].to(dev)
with torch.no_grad():
    cond, uncond = m.text_encoder(m.tokenizer(["a pill with a crack", ""]).to(dev)).chunk(2)
if dev.type == "cuda":
    torch.cuda.reset_peak_memory_stats()
t0 = time.perf_counter()
defect_image(m, x, mask[None, None].to(dev), hint, cond, uncond,
             gaussian(torch.Generator(dev).manual_seed(0)), adapt=fast.adapt_decoder)
if dev.type == "cuda":
    torch.cuda.synchronize()
wall = time.perf_counter() - t0
def hwm():  # this process's peak RSS; ru_maxrss would carry over the parent's across fork + exec
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024
peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else hwm()
print(json.dumps({"seconds": wall, "peak_bytes": peak}))
"""


MEMORY = """
import functools, json, sys, time, torch
from minibldm import fast
from minibldm.autoencoder import Autoencoder
from minibldm.clip import TextEncoder
from minibldm.config import PRESETS, AdaptConfig, SampleConfig, Stages
from minibldm.control import ControlNet
from minibldm.masks import trimap
from minibldm.pipeline import defect_image, per_image_noise
from minibldm.unet import UNet
from minibldm.weights import Models
dev, dt, compiled = torch.device(sys.argv[1]), getattr(torch, sys.argv[2]), sys.argv[3] == "compile"
full = sys.argv[4] == "full"  # the default 50 DDIM + 200 adaptation steps, else the short run
cfg, B = PRESETS[sys.argv[5]], int(sys.argv[6])  # model size, images per batch
def hwm():
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated()
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024
torch.manual_seed(0)
nets = [net(c).to(dev, dt).eval().requires_grad_(False) for net, c in
        ((Autoencoder, cfg.autoencoder), (UNet, cfg.unet), (TextEncoder, cfg.text), (ControlNet, cfg.unet))]
m = fast.optimize(Models(cfg, nets[0], nets[1], nets[2], None, nets[3]))  # as minibldm.sample does
weights = hwm()
S = 256 if sys.argv[5] == "sd15" else 128
x = torch.rand(B, 3, S, S, device=dev, dtype=dt) * 2 - 1
mask = torch.zeros(S, S); mask[S // 4: S // 2, S // 3: S // 2] = 1
hint = trimap(mask, torch.ones(S, S))[None].to(dev, dt).repeat(B, 1, 1, 1)
with torch.no_grad():
    ids = torch.randint(0, cfg.text.vocab_size, (2, 77), device=dev)
    cond, uncond = (e.repeat(B, 1, 1) for e in m.text_encoder(ids).chunk(2))
m.text_encoder = nets[2] = None  # as minibldm.sample does once the prompts are encoded
if compiled:  # as sample --compile does
    m.unet, m.control = fast.compile_frozen(m.unet, dev), fast.compile_frozen(m.control, dev)
stamps = []  # the end of each adaptation step
def adapt_step(step, loss):
    if dev.type == "cuda":
        torch.cuda.synchronize()
    stamps.append(time.perf_counter())
t0 = time.perf_counter()
cfg = SampleConfig(stages=Stages() if full else Stages(4, 1, 3, 3),
                   adapt=AdaptConfig(steps=200 if full else 2))
r = defect_image(m, x, mask[None, None].to(dev, dt).repeat(B, 1, 1, 1), hint, cond, uncond,
                 per_image_noise([torch.Generator(dev).manual_seed(i) for i in range(B)]), cfg,
                 adapt=functools.partial(fast.adapt_decoder, compile=compiled),
                 adapt_progress=adapt_step)
if dev.type == "cuda":
    torch.cuda.synchronize()
end = time.perf_counter()
steps = sorted(b - a for a, b in zip(stamps, stamps[1:]))
print(json.dumps({"seconds": end - t0, "peak_bytes": hwm(), "weights_bytes": weights,
                  "images": r["after"].shape[0],
                  # sampling and decoding up to the end of the first adaptation step (which holds
                  # the adaptation's setup and any compile), then the median later step
                  "until_first_adapt_step_s": stamps[0] - t0,
                  "adapt_step_median_s": steps[len(steps) // 2] if steps else None}))
"""


def bench_adapt_trained(args, device, results):
    """The full 200-step adaptation with a trained decoder (weights/tiny, 128 px), where the
    loss stays far from 0: a synthetic pill and the same pill with a stain (synth draws both
    from one generator state, so only the stain's pixels differ); z* = the stained image's
    latent (posterior mean), x_OK the clean one, M* the stain's mask. Each variant's final
    loss, its relative difference from float32 eager, the background PSNR of its output
    against x_OK, and seconds per iteration."""
    import numpy as np
    import minibldm
    from minibldm.commands.synth import image_rng, make_defect, make_good
    from minibldm.images import to_tensor
    from minibldm.pipeline import psnr

    ae = optimized(minibldm.load(REPO / "weights" / "tiny", device=device).autoencoder).autoencoder
    res, steps = 128, args.adapt_steps or 200
    rng = lambda: image_rng(0, "pill", "bench", 0)  # noqa: E731
    good, _ = make_good("pill", rng(), 256)
    bad, mask, _ = make_defect("pill", "stain", rng(), 256)
    x_ok = to_tensor(good, res)[None].to(device)
    x_ng = to_tensor(bad, res)[None].to(device)
    mk = torch.from_numpy(np.asarray(mask, np.float32))[None, None]
    mk = torch.nn.functional.interpolate(mk, size=(res, res), mode="area")
    mk = (mk > 0.5).float().to(device)
    with torch.no_grad():
        h = ae.decoder_input(ae.encode(x_ng))

    def variant(autocast=False, blocks=None, compile=False, weights=torch.float32):
        # weights=bfloat16: a bfloat16 decoder and inputs, as `sample --dtype bfloat16` passes them
        dec = copy.deepcopy(ae.decoder).to(weights) if weights != torch.float32 else ae.decoder
        times, out, losses = timed_adaptation(dec, h.to(weights), x_ok.to(weights), mk.to(weights),
                                              steps, device, autocast, blocks=blocks,
                                              compile=compile)
        return {"median_s": statistics.median(times[1:]), "first_iteration_s": times[0],
                "first_loss": losses[0], "final_loss": losses[-1],
                "psnr_bg": psnr(out.float().clamp(-1, 1), x_ok, 1 - mk),
                "losses_every_10": losses[::10]}

    rows = {"float32": variant()}
    if "bfloat16" in args.dtype:
        rows["bf16_autocast"] = variant(autocast=True)
        rows["bf16_weights"] = variant(weights=torch.bfloat16)
    if args.compile:
        rows["compiled_float32"] = variant(compile=True)
    for b in args.adapt_blocks or ():
        rows[f"blocks{b}_float32"] = variant(blocks=b)
    ref = rows["float32"]
    for name, r in rows.items():
        r["final_loss_vs_float32"] = r["final_loss"] / ref["final_loss"] - 1
        r["speedup_vs_float32"] = ref["median_s"] / r["median_s"]
        print(f"adapt-trained {name}: {r['median_s'] * 1e3:.1f} ms/iteration, loss "
              f"{r['first_loss']:.5f} -> {r['final_loss']:.5f} ({r['final_loss_vs_float32']:+.2%} "
              f"vs float32), background {r['psnr_bg']:.2f} dB", file=sys.stderr, flush=True)
    results["adapt_trained_tiny"] = {"resolution": res, "steps": steps, "rows": rows}


def sd_method_runs(args, device, length: str):
    """The MEMORY script once per dtype, batch size (and compiled, with --compile), each in its
    own process: {name: {"seconds", "seconds_per_image", "batch", "peak_bytes",
    "weights_bytes"}}. length: "short" or "full"."""
    rows = {}
    for dtype in args.dtype:
        for mode in ("eager", "compile") if args.compile else ("eager",):
            for b in args.batch_size:
                r = subprocess.run([sys.executable, "-c", MEMORY, device.type, dtype, mode, length,
                                    args.size, str(b)], capture_output=True, text=True, check=True)
                row = json.loads(r.stdout.strip().splitlines()[-1])
                row.update(batch=b, seconds_per_image=row["seconds"] / b)
                name = (dtype + ("_compiled" if mode == "compile" else "")
                        + (f"_batch{b}" if b > 1 else ""))
                rows[name] = row
    return rows


def bench_memory(args, device, results):
    """Peak memory of the whole method at --size (random weights; sd15: 256 px, tiny: 128 px),
    per dtype and batch size. Peak memory does
    not depend on the step counts, so 4 DDIM steps (free, latent and image editing all visited)
    and 2 adaptation steps stand in for 50 and 200."""
    rows = sd_method_runs(args, device, "short")
    for name, r in rows.items():
        print(f"memory {args.size} {name}: peak {r['peak_bytes'] / 2 ** 30:.2f} GiB "
              f"(weights alone {r['weights_bytes'] / 2 ** 30:.2f} GiB)", file=sys.stderr, flush=True)
    results["memory"] = {"size": args.size, "rows": rows, "memory": "peak RSS (VmHWM) of the "
                         "process" if device.type == "cpu" else "torch.cuda.max_memory_allocated"}


def bench_sd_pipeline(args, device, results):
    """The whole default method at --size (random weights; sd15: 256 px; 50 DDIM steps, 200
    adaptation steps): seconds per image, images per hour and peak memory per dtype and batch
    size (the memory part's script, at full length)."""
    rows = sd_method_runs(args, device, "full")
    for name, r in rows.items():
        r["images_per_hour"] = 3600 / r["seconds_per_image"]
        print(f"sd-pipeline {args.size} {name}: {r['seconds_per_image']:.1f} s per image, peak "
              f"{r['peak_bytes'] / 2 ** 30:.2f} GiB", file=sys.stderr, flush=True)
    results["sd_pipeline"] = {"size": args.size, "rows": rows, "ddim_steps": 50, "adapt_steps": 200,
                              "resolution": 256 if args.size == "sd15" else 128}


def bench_pipeline(args, device, results):
    weights = REPO / "weights" / "tiny"
    runs = []
    for _ in range(max(1, args.repeats)):
        r = subprocess.run([sys.executable, "-c", PIPELINE, device.type, str(weights)],
                           capture_output=True, text=True, check=True)
        runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
    results["pipeline_tiny"] = {"median_s": statistics.median(r["seconds"] for r in runs),
                                "peak_bytes": max(r["peak_bytes"] for r in runs), "runs": runs,
                                "memory": "peak RSS (VmHWM) of the process" if device.type == "cpu"
                                else "torch.cuda.max_memory_allocated"}
    print(f"pipeline (tiny): {results['pipeline_tiny']['median_s']:.1f} s per image", file=sys.stderr)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", choices=("sd15", "tiny"), default="sd15")
    p.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=sorted(DTYPES))
    p.add_argument("--parts", nargs="+", default=["peak", "step", "adapt", "pipeline", "memory"],
                   choices=("peak", "step", "adapt", "adapt-trained", "pipeline", "memory",
                            "sd-pipeline"))
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd networks")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--channels-last", action="store_true",
                   help="also time minibldm's guided step in channels_last memory order")
    p.add_argument("--adapt-steps", type=int, metavar="N",
                   help="adaptation iterations per variant (default repeats + 1); with 200, the "
                   "final losses of the whole adaptation are compared")
    p.add_argument("--keep-norms", action="store_true",
                   help="adapt part: also time the eager adaptation without recomputing its "
                   "GroupNorm outputs (fast.adapt_decoder's recompute_from)")
    p.add_argument("--ablate", action="store_true",
                   help="adapt part: also time the eager float32 adaptation without each speed "
                   "change that keeps the computation (upsampling route, channels-last, fused "
                   "AdamW) and without all three")
    p.add_argument("--rounds", type=int, default=1, metavar="R",
                   help="adapt part: run every variant in turn R times; medians over the rounds")
    p.add_argument("--adapt-res", type=int, metavar="PX",
                   help="adaptation image side (default 256 for sd15, 128 for tiny)")
    p.add_argument("--adapt-blocks", type=int, nargs="+", metavar="N",
                   help="adapt and adapt-trained parts: also time --adapt-blocks N (float32)")
    p.add_argument("--batch-size", type=int, nargs="+", default=[1], metavar="B",
                   help="memory and sd-pipeline parts: images per batch (several: one run each)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    import diffusers
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else
               f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
               "torch": torch.__version__, "diffusers": diffusers.__version__,
               "date": datetime.date.today().isoformat(), "size": args.size,
               "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:])}
    if "peak" in args.parts:
        results["peak_gflops"] = {d: matmul_peak(device, DTYPES[d], args.repeats) for d in args.dtype}
        print(f"matmul peak: {results['peak_gflops']}", file=sys.stderr, flush=True)
    if "step" in args.parts:
        bench_step(args, device, results)
    if "adapt" in args.parts:
        bench_adapt(args, device, results)
    if "adapt-trained" in args.parts:
        bench_adapt_trained(args, device, results)
    if "pipeline" in args.parts:
        bench_pipeline(args, device, results)
    if "memory" in args.parts:
        bench_memory(args, device, results)
    if "sd-pipeline" in args.parts:
        bench_sd_pipeline(args, device, results)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
