"""Where the time of one guided denoising step goes, and the best share of the matmul peak this
device could reach with it.

    python tools/profile_step.py [--size sd15|tiny] [--dtype float32] [--compile] [--out STEP.json]

The step is tools/bench.py's: batch 1 (both guidance halves), UNet and trimap branch, the branch
once for both halves, with the fast layer as the sample command applies it (random weights; the
time does not depend on them). It measures

  - the device's matmul peak (bench.matmul_peak) and its memory read bandwidth (the sum of a
    512 MiB tensor: every byte read once from memory);
  - every matmul, convolution and attention of the step, with its FLOPs and the bytes it must at
    least move (its inputs, weights and output, each once); a roofline bound for each,
    max(FLOPs / peak, bytes / bandwidth), is the least time the device could take for it;
  - the step timed (median of --repeats), and one run under torch.profiler with each op's own
    time put into a category: matmul, convolution, attention, fused kernels (inductor's, with
    --compile) and other.

From these it prints two ceilings on the share of the matmul peak: the one reached if every
matmul, convolution and attention ran at its roofline bound while the rest (norms,
activations, copies) took the time it took here, and the one reached if, on top of that, the
rest took no time at all. A target above the first needs faster norms and activations as well
as matmuls at the speed of the peak's large square one; above the second, no kernel on this
device can meet it, only doing less work. CPU only (the bandwidth and the profile are a CPU's).
"""
import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import DTYPES, flops, matmul_peak, optimized, timed  # noqa: E402

aten = torch.ops.aten
ATTENTION = aten._scaled_dot_product_flash_attention_for_cpu


def read_bandwidth(repeats: int = 5) -> float:
    """Bytes per second read from memory: the sum of 512 MiB of float32 (far beyond any cache)."""
    x = torch.ones(128 * 2 ** 20)
    r = timed(lambda: x.sum(), torch.device("cpu"), repeats)
    return x.numel() * x.element_size() / r["median_s"]


class MatmulOps(TorchDispatchMode):
    """Records (kind, FLOPs, bytes moved at least) for each matmul, convolution and attention."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        packet = func.overloadpacket
        if packet in (aten.mm, aten.addmm, aten.bmm, aten.convolution, ATTENTION):
            kind = {aten.convolution: "convolution", ATTENTION: "attention"}.get(packet, "matmul")
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            first = out[0] if isinstance(out, tuple) else out
            moved = sum(t.numel() * t.element_size() for t in tensors + [first])
            self.ops.append((kind, flops(lambda: func(*args, **(kwargs or {}))), moved))
        return out


def category(name: str) -> str:
    if "scaled_dot_product" in name:
        return "attention"
    if "conv" in name:
        return "convolution"
    if name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "mkl::_mkl_linear",
                "mkldnn::_linear_pointwise"):
        return "matmul"
    if "CompiledFxGraph" in name:
        return "fused kernels"
    return "other"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=("sd15", "tiny"), default="sd15")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--compile", action="store_true", help="also profile the compiled step "
                   "(sample --compile's: inductor with frozen weights)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    args = p.parse_args(argv)
    from minibldm import fast
    from minibldm.config import SD15, TINY
    from minibldm.control import ControlNet
    from minibldm.sampler import guided_eps
    from minibldm.unet import UNet

    device, dt = torch.device("cpu"), DTYPES[args.dtype]
    cfg = (SD15 if args.size == "sd15" else TINY).unet
    torch.manual_seed(0)
    unet, ctrl = UNet(cfg).eval().to(dt), ControlNet(cfg).eval().to(dt)
    optimized(unet=unet, control=ctrl)
    latent = 32 if args.size == "sd15" else 16
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 4, latent, latent, generator=g).to(dt)
    cond, uncond = torch.randn(2, 1, 77, cfg.context_dim, generator=g).to(dt)
    hint = (torch.rand(1, 3, latent * 8, latent * 8, generator=g) > 0.5).to(dt)
    t = torch.tensor([501])
    peak = matmul_peak(device, dt, 5) * 1e9
    bandwidth = read_bandwidth()
    print(f"matmul peak {peak / 1e9:.0f} GFLOP/s, read bandwidth {bandwidth / 1e9:.1f} GB/s",
          file=sys.stderr, flush=True)
    res = {"date": datetime.date.today().isoformat(), "torch": torch.__version__,
           "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
           "size": args.size, "dtype": args.dtype, "matmul_peak_gflops": peak / 1e9,
           "read_bandwidth_gb_per_s": bandwidth / 1e9, "variants": {}}
    with torch.no_grad():
        eager = guided_eps(unet, ctrl, cond, uncond, hint, 9.0)
        recorder = MatmulOps()
        with recorder:
            eager(z, t)
        by_kind = {}
        for kind, f, moved in recorder.ops:
            row = by_kind.setdefault(kind, {"calls": 0, "gflop": 0.0, "gb_moved": 0.0, "bound_s": 0.0})
            row["calls"] += 1
            row["gflop"] += f / 1e9
            row["gb_moved"] += moved / 1e9
            row["bound_s"] += max(f / peak, moved / bandwidth)
        total = sum(r["gflop"] for r in by_kind.values())
        res["ops"] = by_kind
        res["gflop"] = total
        variants = [("eager", eager)]
        if args.compile:
            variants.append(("compiled", guided_eps(fast.compile_frozen(unet, device),
                                                    fast.compile_frozen(ctrl, device), cond, uncond,
                                                    hint, 9.0)))
        for name, step in variants:
            t0 = time.perf_counter()
            step(z, t)  # warm-up (and the compile)
            first = time.perf_counter() - t0
            seconds = timed(lambda: step(z, t), device, args.repeats)["median_s"]
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                step(z, t)
            spent = {}
            for e in prof.key_averages():
                spent[category(e.key)] = spent.get(category(e.key), 0.0) + e.self_cpu_time_total / 1e6
            profiled = sum(spent.values())
            bound = sum(r["bound_s"] for r in by_kind.values())
            rest = profiled - sum(spent.get(k, 0.0) for k in by_kind)
            row = {"seconds": seconds, "first_call_s": first, "gflops_per_s": total / seconds,
                   "share_of_peak": total / seconds / (peak / 1e9), "profiled_s": profiled,
                   "by_category_s": spent,
                   # each kind's roofline bound over the time it took: 1 is the best possible
                   "speed_of_bound": {k: r["bound_s"] / spent[k] for k, r in by_kind.items()
                                      if spent.get(k)},
                   # every matmul, convolution and attention at its roofline bound, the rest
                   # (norms, activations, copies: inductor's fused kernels when compiled) as profiled
                   "ceiling_share": total * 1e9 / (bound + rest) / peak,
                   # ... and the rest free
                   "ceiling_share_rest_free": total * 1e9 / bound / peak}
            res["variants"][name] = row
            print(f"{name}: {seconds:.3f} s, {row['gflops_per_s']:.0f} GFLOP/s = "
                  f"{row['share_of_peak']:.0%} of the matmul peak", file=sys.stderr)
    show(res)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


def show(res: dict) -> None:
    print(f"{res['size']} {res['dtype']}: matmul peak {res['matmul_peak_gflops']:.0f} GFLOP/s, "
          f"read bandwidth {res['read_bandwidth_gb_per_s']:.1f} GB/s, {res['gflop']:.1f} GFLOP")
    names = list(res["variants"])
    print("| op | calls | GFLOP | GB moved (at least) | roofline bound | "
          + " | ".join(f"{n}: time, speed of the bound" for n in names) + " |")
    print("|---" * (5 + len(names)) + "|")
    for kind, r in res["ops"].items():
        took = " | ".join(f"{v['by_category_s'].get(kind, 0) * 1e3:.0f} ms, "
                          f"{v['speed_of_bound'].get(kind, 0):.0%}" for v in res["variants"].values())
        print(f"| {kind} | {r['calls']} | {r['gflop']:.1f} | {r['gb_moved']:.2f} | "
              f"{r['bound_s'] * 1e3:.0f} ms | {took} |")
    kinds = sorted({k for v in res["variants"].values() for k in v["by_category_s"]})
    print("| variant | step | share of peak | " + " | ".join(kinds)
          + " | ceiling: matmuls at their bound | ceiling: and the rest free |")
    print("|---" * (len(kinds) + 5) + "|")
    for name, v in res["variants"].items():
        cells = " | ".join(f"{v['by_category_s'].get(k, 0) * 1e3:.0f} ms" for k in kinds)
        print(f"| {name} | {v['seconds']:.3f} s | {v['share_of_peak']:.0%} | {cells} | "
              f"{v['ceiling_share']:.0%} | {v['ceiling_share_rest_free']:.0%} |")


if __name__ == "__main__":
    sys.exit(main())
