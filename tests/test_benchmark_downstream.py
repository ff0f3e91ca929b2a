"""tools/benchmark_downstream.py's own logic: the sampler sees only the split's training masks,
and the summary is the mean and sample standard deviation over seeds."""
import importlib.util
import json
import statistics
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location(
    "benchmark_downstream", Path(__file__).resolve().parents[1] / "tools" / "benchmark_downstream.py")
bench = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench)


def test_training_masks_links_only_the_split_training_masks(tmp_path):
    data = tmp_path / "cat"
    for stem in ("000", "001", "002"):
        (data / "test" / "crack").mkdir(parents=True, exist_ok=True)
        (data / "ground_truth" / "crack").mkdir(parents=True, exist_ok=True)
        (data / "test" / "crack" / f"{stem}.png").write_bytes(b"img")
        (data / "ground_truth" / "crack" / f"{stem}_mask.png").write_bytes(stem.encode())
    split = {"defects": {"crack": {"train": ["test/crack/000.png", "test/crack/002.png"],
                                   "test": ["test/crack/001.png"]}}}
    folders = bench.training_masks(data, split, tmp_path / "masks")
    linked = sorted(p.name for p in folders["crack"].iterdir())
    assert linked == ["000_mask.png", "002_mask.png"]
    assert (folders["crack"] / "002_mask.png").read_bytes() == b"002"
    bench.training_masks(data, split, tmp_path / "masks")  # a rerun keeps the links
    split["defects"]["crack"]["train"].append("test/crack/009.png")
    with pytest.raises(SystemExit, match="no mask"):
        bench.training_masks(data, split, tmp_path / "masks")


def test_summary_is_mean_and_sample_std_over_seeds():
    values = {0: 0.5, 1: 0.7, 2: 0.9}
    per_seed = {s: {m: {"mean": {"pixel_ap": v + i / 10, "image_auroc": 1 - v}}
                    for i, m in enumerate(bench.METHODS)} for s, v in values.items()}
    summary, table = bench.summarise(per_seed, ["pixel_ap", "image_auroc"])
    for i, m in enumerate(bench.METHODS):
        ap = [v + i / 10 for v in values.values()]
        assert summary[m]["pixel_ap"]["mean"] == pytest.approx(statistics.mean(ap))
        assert summary[m]["pixel_ap"]["std"] == pytest.approx(statistics.stdev(ap))
    assert table.splitlines()[0] == "| method | pixel ap | image auroc |"
    assert "| minibldm | 1.000 ± 0.200 | 0.300 ± 0.200 |" in table
    one, _ = bench.summarise({0: per_seed[0]}, ["pixel_ap"])
    assert one["perlin"]["pixel_ap"]["std"] == 0.0


def test_bad_data_or_init_is_one_line_and_exit_2(tmp_path, capsys):
    assert bench.main(["--data", str(tmp_path / "none"), "--work", str(tmp_path / "w")]) == 2
    assert "--data" in capsys.readouterr().err
    (tmp_path / "cat" / "train" / "good").mkdir(parents=True)
    assert bench.main(["--data", str(tmp_path / "cat"), "--init", str(tmp_path / "nothing"),
                       "--work", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert "--init" in err and "config.json" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "w").exists()


def test_per_type_table_is_mean_and_std_per_defect_type():
    per_seed = {s: {m: {"per_type": {"crack": {"pixel_ap": v}, "hole": {"pixel_ap": 2 * v}}}
                    for m in bench.METHODS} for s, v in {0: 0.1, 1: 0.3}.items()}
    lines = bench.per_type_table(per_seed, "pixel_ap").splitlines()
    assert lines[0] == "| defect | " + " | ".join(bench.METHODS) + " |"
    sd = statistics.stdev([0.1, 0.3])
    n = len(bench.METHODS)
    assert lines[2] == "| crack | " + " | ".join([f"0.200 ± {sd:.3f}"] * n) + " |"
    assert lines[3] == "| hole | " + " | ".join([f"0.400 ± {2 * sd:.3f}"] * n) + " |"


def test_a_variant_runs_the_generated_methods_under_its_own_labels_and_reuses_the_baselines(
        tmp_path, monkeypatch):
    calls = []

    def fake_run(cmd, log):  # stands in for `python -m minibldm.evaluate`: writes its --out file
        cmd = [str(c) for c in cmd]
        calls.append(cmd)
        out = Path(cmd[cmd.index("--out") + 1])
        out.write_text('{"method": "%s"}' % cmd[cmd.index("--method") + 1])
    monkeypatch.setattr(bench, "run", fake_run)
    out = tmp_path / "eval"
    out.mkdir()
    (out / "perlin.json").write_text('{"method": "perlin", "kept": true}')  # an earlier call's
    methods = bench.labels("_dw8_fg100")
    assert list(methods) == ["real-only", "crop-paste", "perlin", "minibldm_dw8_fg100",
                             "minibldm+real_dw8_fg100"]
    results = bench.evaluate(tmp_path, tmp_path / "split.json", [tmp_path / "gen_fg100"], out, 5,
                             0, "cpu", tmp_path / "log", methods)
    assert list(results) == list(methods)
    assert results["perlin"] == {"method": "perlin", "kept": True}  # reused, not run again
    ran = {Path(c[c.index("--out") + 1]).name: c for c in calls}
    assert sorted(ran) == ["crop-paste.json", "minibldm+real_dw8_fg100.json",
                           "minibldm_dw8_fg100.json", "real-only.json"]
    for label in ("minibldm_dw8_fg100", "minibldm+real_dw8_fg100"):
        cmd = ran[label + ".json"]
        assert cmd[cmd.index("--method") + 1] == methods[label]
        assert cmd[cmd.index("--generated") + 1] == str(tmp_path / "gen_fg100")
    assert all("--generated" not in ran[f"{m}.json"] for m in ("real-only", "crop-paste"))
    assert bench.labels() == {m: m for m in bench.METHODS}


@pytest.mark.parametrize("flag", ["--fg-weight", "--defect-weight"])
@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_bad_weight_is_one_line_and_exit_2(tmp_path, capsys, flag, value):
    (tmp_path / "cat" / "train" / "good").mkdir(parents=True)
    assert bench.main(["--data", str(tmp_path / "cat"), flag, value,
                       "--work", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert flag in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "w").exists()


def test_defect_weight_reaches_every_training_stage(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(bench, "run", lambda cmd, log: calls.append([str(c) for c in cmd]))
    last = bench.train_model(tmp_path / "data", tmp_path / "gen", 0, bench.STEPS["quick"],
                             tmp_path / "init", "cpu", tmp_path / "log", defect_weight=8.0)
    stages = [c[c.index("--stage") + 1] for c in calls]
    assert stages == ["autoencoder", "text", "control"]
    assert all(c[c.index("--defect-weight") + 1] == "8.0" for c in calls)
    assert last == tmp_path / "gen" / "control"


@pytest.mark.parametrize("exact", [False, True])
def test_generate_samples_drawn_or_exact_masks(tmp_path, monkeypatch, exact):
    """--exact-masks hands each type's folder of training masks to the sampler's --exact-masks
    (the masks as they are) instead of --defect-masks (masks drawn from them)."""
    calls = []
    monkeypatch.setattr(bench, "run", lambda cmd, log: calls.append([str(c) for c in cmd]))
    masks = {"crack": tmp_path / "m" / "crack", "hole": tmp_path / "m" / "hole"}
    outs = bench.generate(tmp_path / "model", tmp_path / "data", masks, tmp_path / "gen", 0, 3,
                          "cpu", tmp_path / "log", 1.0, exact=exact)
    assert outs == [tmp_path / "gen" / "crack", tmp_path / "gen" / "hole"]
    used, unused = ("--exact-masks", "--defect-masks") if exact else ("--defect-masks", "--exact-masks")
    for cmd, folder in zip(calls, masks.values()):
        assert cmd[cmd.index(used) + 1] == str(folder) and unused not in cmd
        assert ("--resize-masks" in cmd) == exact  # real masks and good images differ in size
        assert cmd[cmd.index("-n") + 1] == "3"
        assert "--bulk" in cmd and "--batch-size" not in cmd  # the dataset-scale shortcut


def test_full_sampler_runs_the_whole_method(tmp_path, monkeypatch):
    """--sampler full: no --bulk, batches of 5, and its own tagged folders."""
    calls = []
    monkeypatch.setattr(bench, "run", lambda cmd, log: calls.append([str(c) for c in cmd]))
    bench.generate(tmp_path / "model", tmp_path / "data", {"crack": tmp_path / "m"},
                   tmp_path / "gen", 0, 20, "cpu", tmp_path / "log", 1.0, full=True)
    assert "--bulk" not in calls[0] and calls[0][calls[0].index("--batch-size") + 1] == "5"
    args = bench.parse_args(["--sampler", "full", "--n", "20"])
    assert bench.tags(args) == ("", "_full_n20")
    assert bench.tags(bench.parse_args(["--n", "200"])) == ("", "")  # the default count


def test_exact_masks_tags_the_variant(tmp_path, monkeypatch):
    """The whole chain with --exact-masks writes generated_dw8_exact and the tagged labels."""
    seen = {}

    def fake_train(data, runs, seed, s, init, device, log, defect_weight):
        (runs / "control").mkdir(parents=True, exist_ok=True)
        (runs / "control" / "split.json").write_text('{"defects": {}}')
        return runs / "control"

    def fake_generate(model, data, masks, out, seed, n, device, log, fg_weight, exact, full):
        seen["generate"] = (out.name, exact)
        return []

    def fake_evaluate(data, split_file, generated, out, steps, seed, device, log, methods):
        seen["methods"] = list(methods)
        return {m: {"mean": {"pixel_ap": 0.1}, "per_type": {"crack": {
            "pixel_ap": 0.1, "pixel_aupro": 0.2, "image_auroc": 0.5}}}
                for m in methods}

    def fake_run(cmd, log):  # genquality
        cmd = [str(c) for c in cmd]
        Path(cmd[cmd.index("--out") + 1]).write_text("{}")
    for name, fn in (("train_model", fake_train), ("generate", fake_generate),
                     ("evaluate", fake_evaluate), ("run", fake_run)):
        monkeypatch.setattr(bench, name, fn)
    (tmp_path / "cat" / "train" / "good").mkdir(parents=True)
    assert bench.main(["--data", str(tmp_path / "cat"), "--work", str(tmp_path / "w"), "--quick",
                       "--defect-weight", "1", "--exact-masks", "--init", "none"]) == 0
    assert seen["generate"] == ("generated_dw1_exact", True)
    assert seen["methods"][3:] == ["minibldm_dw1_exact", "minibldm+real_dw1_exact"]
    info = json.loads((tmp_path / "w" / "quick" / "summary_dw1_exact.json").read_text())["info"]
    assert info["exact_masks"] is True


def tiny_category(root: Path) -> Path:
    import numpy as np
    from PIL import Image
    (root / "train" / "good").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "train" / "good" / "000.png")
    for d in ("crack", "hole"):
        (root / "test" / d).mkdir(parents=True)
        (root / "ground_truth" / d).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "test" / d / f"{i:03d}.png")
            m = np.zeros((8, 8), np.uint8)
            m[2:4, 2:4] = 255
            Image.fromarray(m).save(root / "ground_truth" / d / f"{i:03d}_mask.png")
    return root


def test_baselines_only_needs_no_generator_and_keeps_train_s_split(tmp_path, monkeypatch):
    """--baselines-only writes the seed's split by train's rule (make_split, k = 10) and runs
    the three baselines on it, never the generator; a later full call trains the generator, finds
    the same split in its run, and runs only what is missing."""
    from minibldm.commands.data import make_split, read_category
    data = tiny_category(tmp_path / "cat")
    calls = []

    def fake_run(cmd, log):
        cmd = [str(c) for c in cmd]
        calls.append(cmd)
        out = Path(cmd[cmd.index("--out") + 1])
        out.parent.mkdir(parents=True, exist_ok=True)  # as the commands' atomic writes do
        out.write_text(json.dumps({"mean": {"pixel_ap": 0.5}, "per_type": {
            "crack": {"pixel_ap": 0.5, "pixel_aupro": 0.5, "image_auroc": 0.5}}}
            if "minibldm.evaluate" in cmd else {}))
    monkeypatch.setattr(bench, "run", fake_run)

    def fake_train(data_, runs, seed, s, init, device, log, dw):  # the generator's run folder
        calls.append(["train"])
        runs.joinpath("control").mkdir(parents=True, exist_ok=True)
        split = make_split(read_category(data_, texture=True), k=10, seed=seed)
        (runs / "control" / "split.json").write_text(json.dumps(split))
        return runs / "control"
    monkeypatch.setattr(bench, "train_model", fake_train)
    monkeypatch.setattr(bench, "generate", lambda *a, **k: [tmp_path / "gen"])
    work = tmp_path / "w"
    assert bench.main(["--data", str(data), "--work", str(work), "--seeds", "3",
                       "--baselines-only", "--init", "none"]) == 0
    seed_dir = work / "full" / "seed3"
    expected = make_split(read_category(data, texture=True), k=10, seed=3)
    assert json.loads((seed_dir / "split.json").read_text()) == expected
    assert ["train"] not in calls
    ran = sorted(Path(c[c.index("--out") + 1]).name for c in calls)
    assert ran == ["crop-paste.json", "perlin.json", "real-only.json"]
    calls.clear()
    assert bench.main(["--data", str(data), "--work", str(work), "--seeds", "3",
                       "--init", "none"]) == 0
    evaluated = sorted(Path(c[c.index("--out") + 1]).name for c in calls
                       if "minibldm.evaluate" in c)
    assert ["train"] in calls and evaluated == ["minibldm+real.json", "minibldm.json"]
    assert (work / "full" / "summary.json").is_file()
