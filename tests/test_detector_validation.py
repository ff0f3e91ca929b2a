"""tools/detector_validation.py scores held-out training data and never reads the test set."""
import json
import sys
from pathlib import Path

from minibldm.commands.data import DecodedImages, load_or_make_split, read_category
from minibldm.commands.synth import write_dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import detector_validation  # noqa: E402


def test_validation_never_reads_the_test_set(tmp_path, monkeypatch):
    data = write_dataset(tmp_path, per_class=8, test_good=3, test_per_defect=6, size=64,
                         categories=["washer"], log=None) / "washer"
    category = read_category(data)
    split = load_or_make_split(tmp_path / "split.json", category, 4, 0)
    test = [data / p for part in split["defects"].values() for p in part["test"]]
    test += list(category.test_good)
    assert len(test) > 3
    decoded = []
    for name in ("image", "mask"):  # record every file the run decodes
        def spy(self, path, _read=getattr(DecodedImages, name)):
            decoded.append(Path(path))
            return _read(self, path)
        monkeypatch.setattr(DecodedImages, name, spy)
    out = tmp_path / "r.json"
    code = detector_validation.main(["--data", str(data), "--method", "real-only", "--split",
                                     str(tmp_path / "split.json"), "--detector-steps", "2",
                                     "--size", "64", "--out", str(out)])
    assert code == 0
    assert decoded and not set(decoded) & set(test)
    result = json.loads(out.read_text())
    assert result["split"]["train"] == {t: 2 for t in category.defects}
    assert result["split"]["test"] == {t: 2 for t in category.defects}
    assert result["test_good"] == len(category.good) // 4
    from minibldm.eval import common, evaluate
    assert evaluate.read_data is common.read_data  # the patch is undone
