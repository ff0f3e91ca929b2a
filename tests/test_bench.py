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
