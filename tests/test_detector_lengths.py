"""tools/detector_lengths.py: the rule that picks the detector's training length from training
losses alone, on hand-made loss curves, and the command end to end with evaluate faked."""
import importlib.util
import json
import sys
from pathlib import Path

SPEC = importlib.util.spec_from_file_location(
    "detector_lengths", Path(__file__).resolve().parents[1] / "tools" / "detector_lengths.py")
lengths = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(lengths)


def test_final_loss_is_the_mean_of_the_last_fifth():
    curve = [5.0] * 40 + [1.0, 2.0, 3.0, 4.0, 5.0, 1.0, 2.0, 3.0, 4.0, 5.0]  # 50 spans
    assert lengths.final_loss({"loss_curve": curve}) == 3.0
    assert lengths.final_loss({"loss_curve": [2.0, 4.0]}) == 4.0  # fewer than 5 spans: the last


def test_rule_takes_the_shortest_length_every_method_agrees_on():
    L = [400, 1000, 2000, 4000]
    # a: flat from 1000 on (1000 -> 2000 gains 2 %); b: flat only from 2000 on (gains 1 %).
    finals = {"a": {400: 1.0, 1000: 0.8, 2000: 0.784, 4000: 0.78},
              "b": {400: 1.0, 1000: 0.9, 2000: 0.7, 4000: 0.693}}
    assert lengths.choose(finals, L) == (2000, True)
    assert lengths.choose({"a": finals["a"]}, L) == (1000, True)
    # exactly 5 % lower is not "less than 5 %"
    assert lengths.choose({"c": {400: 1.0, 1000: 0.95, 2000: 0.9025, 4000: 0.857}}, L) == (4000, False)
    # a loss that rises with length is long enough
    assert lengths.choose({"d": {400: 1.0, 1000: 1.1, 2000: 1.2, 4000: 1.3}}, L) == (400, True)


def test_command_resumes_and_writes_table_and_curves(tmp_path, monkeypatch):
    data = tmp_path / "cat"
    (data / "train" / "good").mkdir(parents=True)
    calls = []

    def fake_call(cmd, stdout=None):  # evaluate: a loss that halves up to 1000 steps, then flat
        calls.append(cmd)
        steps = int(cmd[cmd.index("--detector-steps") + 1])
        final = 1.0 if steps < 1000 else 0.5
        keys = ("pixel_auroc", "pixel_ap", "pixel_aupro", "pixel_f1_max", "image_auroc",
                "image_ap")
        result = {"loss_curve": [1.0] * 40 + [final] * 10,
                  "per_type": {"crack": {k: 0.25 for k in keys}, "hole": {k: 0.75 for k in keys}},
                  "mean": {k: 0.5 for k in keys}}
        Path(cmd[cmd.index("--out") + 1]).write_text(json.dumps(result))
        return 0
    monkeypatch.setattr(lengths.subprocess, "call", fake_call)
    argv = ["--data", str(data), "--work", str(tmp_path / "w"), "--lengths", "400", "1000", "2000"]
    assert lengths.main(argv) == 0
    assert len(calls) == 6 and all(c[0] == sys.executable for c in calls)
    text = (tmp_path / "w" / "lengths.md").read_text()
    assert "The rule chooses 1000 steps." in text
    walls = json.loads((tmp_path / "w" / "wall_seconds.json").read_text())
    assert sorted(walls) == sorted(f"{m}_{L}" for m in ("real-only", "crop-paste")
                                   for L in (400, 1000, 2000))
    assert "| crop-paste | 2000 | 0.5000 | 50.0 | 50.0 | 50.0 | 50.0 | 50.0 | 50.0 | 0 |" in text
    assert "| method | steps | crack | hole |" in text and "| crop-paste | 1000 | 25.0 | 75.0 |" in text
    assert (tmp_path / "w" / "losses.png").stat().st_size > 0
    assert lengths.main(argv) == 0 and len(calls) == 6  # every run is there: nothing runs again
    (tmp_path / "w" / "wall_seconds.json").unlink()  # results this tool did not time
    assert lengths.main(argv) == 0 and len(calls) == 6
    text = (tmp_path / "w" / "lengths.md").read_text()
    assert "| real-only | 400 | 1.0000 | 50.0 | 50.0 | 50.0 | 50.0 | 50.0 | 50.0 | – |" in text
    assert lengths.main(argv[:4] + ["--lengths", "400"]) == 2  # one length cannot be compared
