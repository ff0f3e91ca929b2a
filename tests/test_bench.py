"""tools/bench.py's whole-method runs at the tiny size: one row per dtype and batch size, with
seconds per image and a peak that counts the weights."""
import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "tools" / "bench.py"


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
