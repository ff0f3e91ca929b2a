"""tools/bench.py and tools/profile_step.py at the tiny size: the whole-method rows (one per dtype
and batch size, with seconds per image and a peak that counts the weights), the ablation rows,
the FLOP count with attention, and the step's profile against its roofline bounds."""
import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "tools" / "bench.py"
sys.path.insert(0, str(BENCH.parent))  # for the tests that use its functions


def test_memory_part_runs_each_batch_size(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, str(BENCH), "--size", "tiny", "--parts", "memory",
                        "--dtype", "float32", "--batch-size", "1", "2", "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res["memory"]["size"] == "tiny"
    rows = res["memory"]["rows"]
    assert sorted(rows) == ["float32", "float32_batch2"]
    one, two = rows["float32"], rows["float32_batch2"]
    assert (one["batch"], one["images"], two["batch"], two["images"]) == (1, 1, 2, 2)
    assert two["seconds_per_image"] == two["seconds"] / 2 > 0
    for row in (one, two):
        assert row["peak_bytes"] >= row["weights_bytes"] > 0
    assert "memory tiny float32_batch2: peak" in r.stderr


def test_adapt_part_ablation_rows_follow_the_same_losses(tmp_path):
    """--ablate adds the eager adaptation without each speed change (and without all three); they
    compute the same thing, so their loss curves agree with the default's."""
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, str(BENCH), "--size", "tiny", "--parts", "adapt",
                        "--dtype", "float32", "--adapt-steps", "3", "--adapt-res", "64",
                        "--ablate", "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    row = json.loads(out.read_text())["adapt"]
    names = [f"minibldm_float32_without_{k}" for k in
             ("upsample", "channels_last", "fused", "upsample_channels_last_fused")]
    curves = row["loss_curves"]
    for name in names:
        assert row[name]["median_s"] > 0 and row[name]["speedup_vs_diffusers_float32"] > 0
        assert len(curves[name]) == 4 and curves[name][-1] < curves[name][0]
        for a, b in zip(curves[name], curves["minibldm_float32"]):
            assert abs(a / b - 1) <= 1e-4, (name, curves[name], curves["minibldm_float32"])


def test_flop_count_includes_attention_on_a_cpu():
    """torch's counter has no formula for the CPU attention kernel; bench.flops adds one. It must
    count what the same attention written as two batched matmuls counts."""
    import torch
    import torch.nn.functional as F
    from bench import flops
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 10, 8, generator=g), torch.randn(2, 3, 7, 8, generator=g)
    v = torch.randn(2, 3, 7, 8, generator=g)  # as in the networks: the CPU flash kernel runs

    def by_hand():
        return torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, -1) @ v
    assert torch.allclose(F.scaled_dot_product_attention(q, k, v), by_hand(), atol=1e-6)
    assert flops(lambda: F.scaled_dot_product_attention(q, k, v)) == flops(by_hand) > 0


def test_profile_step_accounts_for_the_step(tmp_path):
    """tools/profile_step.py at the tiny size: its per-op FLOPs add up to what the counter finds
    for the whole step, each op kind's roofline bound is at least its FLOPs at the peak, and the
    ceiling with the rest free is above the one with the rest as measured."""
    out = tmp_path / "profile.json"
    r = subprocess.run([sys.executable, str(BENCH.parent / "profile_step.py"), "--size", "tiny",
                        "--repeats", "1", "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    import torch
    from bench import flops
    from minibldm.config import TINY
    from minibldm.control import ControlNet
    from minibldm.sampler import guided_eps
    from minibldm.unet import UNet
    torch.manual_seed(0)
    unet, ctrl = UNet(TINY.unet).eval(), ControlNet(TINY.unet).eval()
    cond, uncond = torch.randn(2, 1, 77, TINY.unet.context_dim)
    step = guided_eps(unet, ctrl, cond, uncond, torch.zeros(1, 3, 128, 128), 9.0)
    with torch.no_grad():
        whole = flops(lambda: step(torch.randn(1, 4, 16, 16), torch.tensor([501]))) / 1e9
    assert abs(res["gflop"] / whole - 1) < 1e-9
    assert {"matmul", "convolution", "attention"} <= set(res["ops"])
    peak = res["matmul_peak_gflops"]
    for row in res["ops"].values():
        assert row["calls"] > 0 and row["bound_s"] >= row["gflop"] / peak * (1 - 1e-9)
    eager = res["variants"]["eager"]
    assert abs(sum(eager["by_category_s"].values()) - eager["profiled_s"]) < 1e-9
    assert 0 < eager["share_of_peak"] and 0 < eager["ceiling_share"] < eager["ceiling_share_rest_free"]
    assert "| eager |" in r.stdout
