"""Reading training data: image and mask files (minibldm.images), both category layouts, the
few-shot split and the datasets (minibldm.commands.data), the foreground they use
(minibldm.foreground), on tiny categories written here with PIL (and on magnetic_tile when it is
present)."""
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import MAGNETIC_TILE
from minibldm import foreground, images, masks
from minibldm.commands import data
from minibldm.images import DataError


def rgb(seed: int, H: int = 40, W: int = 48) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


def blob(H: int = 40, W: int = 48, y: int = 12, x: int = 15, h: int = 9, w: int = 14) -> np.ndarray:
    m = np.zeros((H, W), np.uint8)
    m[y:y + h, x:x + w] = 255
    return m


def make_mvtec(root, n_good=6, defects=(("scratch", 5), ("hole_big", 3)), H=40, W=48):
    """A tiny MVTec AD category: train/good, test/good, test/<defect>, ground_truth/<defect>."""
    for sub in ["train/good", "test/good"] + [f"test/{d}" for d, _ in defects] + \
               [f"ground_truth/{d}" for d, _ in defects]:
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n_good):
        Image.fromarray(rgb(i, H, W)).save(root / "train" / "good" / f"{i:03d}.png")
    Image.fromarray(rgb(99, H, W)).save(root / "test" / "good" / "000.png")
    for k, (d, n) in enumerate(defects):
        for i in range(n):
            Image.fromarray(rgb(100 * k + i + 7, H, W)).save(root / "test" / d / f"{i:03d}.png")
            Image.fromarray(blob(H, W, y=5 + i, x=6 + 2 * i)).save(
                root / "ground_truth" / d / f"{i:03d}_mask.png")
    return root


def make_plain(root, n_good=4, H=40, W=48):
    (root / "good").mkdir(parents=True)
    (root / "defects" / "dent").mkdir(parents=True)
    for i in range(n_good):
        Image.fromarray(rgb(i, H, W)).save(root / "good" / f"g{i}.jpg")
    for i in range(3):
        Image.fromarray(rgb(50 + i, H, W)).save(root / "defects" / "dent" / f"d{i}.png")
        Image.fromarray(blob(H, W)).save(root / "defects" / "dent" / f"d{i}_mask.png")
    return root


# ---- reading images and masks -----------------------------------------------------------------

def test_read_image_modes(tmp_path):
    a = rgb(0)
    grey = a[..., 0]
    cases = {}
    Image.fromarray(grey).save(tmp_path / "grey.png")
    cases["grey.png"] = np.repeat(grey[..., None], 3, 2)
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "deep.png")  # I;16
    cases["deep.png"] = np.repeat(grey[..., None], 3, 2)
    Image.fromarray(a).save(tmp_path / "rgb.bmp")
    cases["rgb.bmp"] = a
    Image.fromarray(a).save(tmp_path / "rgb.tif")
    cases["rgb.tif"] = a
    pal = Image.fromarray(a).quantize(16)
    pal.save(tmp_path / "pal.png")
    cases["pal.png"] = np.asarray(pal.convert("RGB"))
    alpha = np.full(a.shape[:2], 255, np.uint8)
    alpha[:, :10] = 0
    alpha[:, 10:20] = 128
    Image.fromarray(np.dstack([a, alpha])).save(tmp_path / "rgba.png")
    over_black = np.round(a.astype(np.float32) * alpha[..., None] / 255).astype(np.uint8)
    cases["rgba.png"] = over_black
    Image.fromarray(np.dstack([grey, alpha])).convert("LA").save(tmp_path / "la.png")
    la = np.round(grey.astype(np.float32) * alpha / 255).astype(np.uint8)
    cases["la.png"] = np.repeat(la[..., None], 3, 2)
    for name, want in cases.items():
        got = images.read_image(tmp_path / name)
        assert got.dtype == np.uint8 and got.shape == (40, 48, 3), name
        assert np.array_equal(got, want), name
    assert (images.read_image(tmp_path / "rgba.png")[:, :10] == 0).all()
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")  # really 16-bit
    assert Image.open(tmp_path / "pal.png").mode == "P"

    smooth = np.repeat(np.linspace(0, 255, 48)[None, :, None], 40, 0).repeat(3, 2).astype(np.uint8)
    Image.fromarray(smooth).save(tmp_path / "s.jpg", quality=95)
    Image.fromarray(smooth).convert("CMYK").save(tmp_path / "s_cmyk.jpg", quality=95)
    for name in ("s.jpg", "s_cmyk.jpg"):
        got = images.read_image(tmp_path / name)
        assert got.shape == (40, 48, 3) and np.abs(got.astype(int) - smooth).mean() < 4, name
    assert Image.open(tmp_path / "s_cmyk.jpg").mode == "CMYK"
    big = np.zeros((3, 517), np.uint8)  # any size
    Image.fromarray(big).save(tmp_path / "odd.png")
    assert images.read_image(tmp_path / "odd.png").shape == (3, 517, 3)


def test_read_image_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="nothere.png"):
        images.read_image(tmp_path / "nothere.png")
    (tmp_path / "bad.png").write_bytes(b"not an image at all")
    with pytest.raises(DataError, match="bad.png") as e:
        images.read_image(tmp_path / "bad.png")
    assert "\n" not in str(e.value)
    Image.fromarray(rgb(0)).save(tmp_path / "cut.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "cut.png").read_bytes()[:200])
    with pytest.raises(DataError, match="cut.png"):
        images.read_image(tmp_path / "cut.png")


def test_read_mask(tmp_path):
    m = np.zeros((10, 12), np.uint8)
    m[2:5, 3:7] = 200
    m[6, 6] = 110  # below the threshold
    m[6, 8] = 127  # at it: still 0
    m[7, 7] = 128  # just above
    Image.fromarray(m).save(tmp_path / "soft.png")
    got, binary = images.read_mask(tmp_path / "soft.png")
    assert got.dtype == torch.float32 and got.shape == (10, 12) and not binary
    want = torch.from_numpy(m > 127).float()
    assert torch.equal(got, want)
    Image.fromarray((m > 127).astype(np.uint8) * 255).save(tmp_path / "hard.png")
    got, binary = images.read_mask(tmp_path / "hard.png")
    assert binary and torch.equal(got, want)
    Image.fromarray((m > 127).astype(np.uint8)).save(tmp_path / "01.png")  # 0/1 file
    got, binary = images.read_mask(tmp_path / "01.png")
    assert binary and torch.equal(got, want)
    red = np.zeros((10, 12, 3), np.uint8)
    red[2:5, 3:7, 0] = 255
    Image.fromarray(red).save(tmp_path / "red.png")
    assert images.read_mask(tmp_path / "red.png")[0].sum() == 12
    Image.fromarray(np.full((10, 12), 90, np.uint8)).save(tmp_path / "empty.png")
    with pytest.raises(DataError, match="empty.png.*empty"):
        images.read_mask(tmp_path / "empty.png")


def test_to_tensor_and_mask_to_tensor():
    a = rgb(0)
    t = images.to_tensor(a, 32)
    assert t.shape == (3, 32, 32) and t.dtype == torch.float32
    assert -1 <= t.min() and t.max() <= 1
    full = images.to_tensor(a)
    assert full.shape == (3, 40, 48)
    assert torch.equal(full, torch.from_numpy(a).permute(2, 0, 1).float() / 127.5 - 1)
    m = torch.zeros(8, 8)
    m[2:4, 4:8] = 1
    up = images.mask_to_tensor(m, 16)
    assert torch.equal(up, m.repeat_interleave(2, 0).repeat_interleave(2, 1))
    assert set(up.unique().tolist()) <= {0.0, 1.0}
    thin = torch.zeros(256, 256)
    thin[:, 101] = 1  # a 1-px crack that nearest downscaling by 8 would miss
    small = images.mask_to_tensor(thin, 32)
    assert small.shape == (32, 32) and small.sum() == 32 and small[:, 12].all()
    diagonal = torch.eye(256).flip(1)  # nearest keeps dashes of it at 100 px
    small = images.mask_to_tensor(diagonal, 100)
    assert masks.count_components(small) == 1 and small.sum() < 300
    blob = torch.zeros(256, 256)
    blob[40:200, 30:90] = 1  # a thick mask keeps plain nearest
    assert torch.equal(images.mask_to_tensor(blob, 64), blob[2::4, 2::4])


# ---- categories -------------------------------------------------------------------------------

def test_read_category_mvtec(tmp_path):
    root = make_mvtec(tmp_path / "metal_plate")
    c = data.read_category(root)
    assert c.layout == "mvtec" and len(c.good) == 6 and c.good == sorted(c.good)
    assert [p.name for p in c.test_good] == ["000.png"]
    assert sorted(c.defects) == ["hole_big", "scratch"] and len(c.defects["scratch"]) == 5
    img, mask = c.defects["scratch"][2]
    assert img.name == "002.png" and mask.name == "002_mask.png" and "ground_truth" in str(mask)
    assert c.object_name == "metal plate" and not c.texture and c.foreground_dir is None
    assert c.defect_names == {"hole_big": "hole big", "scratch": "scratch"}
    assert c.rel(img) == "test/scratch/002.png"

    (root / "meta.json").write_text(json.dumps(
        {"object": "steel plate", "texture": True, "defects": {"hole_big": "large hole"}}))
    (root / "foreground").mkdir()
    c = data.read_category(root)
    assert c.object_name == "steel plate" and c.texture and c.foreground_dir == root / "foreground"
    assert c.defect_names == {"hole_big": "large hole", "scratch": "scratch"}
    c = data.read_category(root, texture=False, object_name="plate")
    assert not c.texture and c.object_name == "plate"


def test_read_category_plain(tmp_path):
    c = data.read_category(make_plain(tmp_path / "wood"))
    assert c.layout == "plain" and [p.name for p in c.good] == ["g0.jpg", "g1.jpg", "g2.jpg",
                                                                  "g3.jpg"]
    assert list(c.defects) == ["dent"] and c.test_good == []
    assert [(i.name, m.name) for i, m in c.defects["dent"]] == [
        ("d0.png", "d0_mask.png"), ("d1.png", "d1_mask.png"), ("d2.png", "d2_mask.png")]


def test_read_category_errors(tmp_path):
    root = make_mvtec(tmp_path / "a")
    (root / "ground_truth" / "scratch" / "003_mask.png").unlink()
    with pytest.raises(DataError, match="003.png.*without a mask"):
        data.read_category(root)
    root = make_mvtec(tmp_path / "b")
    Image.fromarray(blob(41, 48)).save(root / "ground_truth" / "scratch" / "001_mask.png")
    with pytest.raises(DataError, match="001_mask.png"):
        data.read_category(root)
    root = make_mvtec(tmp_path / "c")
    for p in (root / "train" / "good").iterdir():
        p.unlink()
    with pytest.raises(DataError, match="no good images"):
        data.read_category(root)
    with pytest.raises(DataError, match="neither"):
        data.read_category(tmp_path)


# ---- split ------------------------------------------------------------------------------------

def test_split_stable_disjoint_reused(tmp_path):
    c = data.read_category(make_mvtec(tmp_path / "cat", defects=(("scratch", 9), ("dent", 2))))
    with pytest.warns(UserWarning, match="dent"):
        s = data.make_split(c, k=4, seed=3)
    with pytest.warns(UserWarning):
        assert data.make_split(c, k=4, seed=3) == s
    tr, te = s["defects"]["scratch"]["train"], s["defects"]["scratch"]["test"]
    assert len(tr) == 4 and len(te) == 5 and not set(tr) & set(te)
    assert sorted(tr + te) == sorted(c.rel(i) for i, _ in c.defects["scratch"])
    assert s["defects"]["dent"] == {"train": ["test/dent/000.png", "test/dent/001.png"],
                                    "test": []}
    assert s["short"] == {"dent": 2} and s["k"] == 4 and s["seed"] == 3
    with pytest.warns(UserWarning):
        others = {tuple(data.make_split(c, 4, seed)["defects"]["scratch"]["train"])
                  for seed in range(6)}
    assert len(others) > 1  # the seed matters

    path = tmp_path / "run" / "split.json"
    with pytest.warns(UserWarning):
        first = data.load_or_make_split(path, c, k=4, seed=3)
    assert first == s and json.loads(path.read_text()) == s
    stored = json.loads(path.read_text())
    stored["note"] = "kept"  # a reused file is read, not remade
    path.write_text(json.dumps(stored))
    assert data.load_or_make_split(path, c, k=4, seed=3)["note"] == "kept"
    with pytest.raises(DataError, match="k=4"):
        data.load_or_make_split(path, c, k=5, seed=3)
    with pytest.raises(DataError, match="seed=3"):
        data.load_or_make_split(path, c, k=4, seed=0)
    stored["defects"]["scratch"]["train"][0] = "test/scratch/gone.png"
    path.write_text(json.dumps(stored))
    with pytest.raises(DataError, match="gone.png"):
        data.load_or_make_split(path, c, k=4, seed=3)


# ---- datasets ---------------------------------------------------------------------------------

def category_with_foreground(tmp_path):
    """An MVTec category whose foreground folder marks the left 30 columns of each good image."""
    root = make_mvtec(tmp_path / "widget", n_good=4, defects=(("scratch", 5), ("dent_mark", 4)))
    (root / "foreground" / "train" / "good").mkdir(parents=True)
    fg = np.zeros((40, 48), np.uint8)
    fg[2:38, 0:30] = 255
    for p in (root / "train" / "good").iterdir():
        Image.fromarray(fg).save(root / "foreground" / "train" / "good" / p.name)
    c = data.read_category(root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return c, data.make_split(c, k=3, seed=0)


def test_pair_dataset_items_are_reproducible_and_sane(tmp_path):
    c, split = category_with_foreground(tmp_path)
    ds = data.PairDataset(c, split, size=32, seed=7, length=50, p_empty_prompt=0.3,
                          cache_dir=tmp_path / "cache")
    again = data.PairDataset(c, split, size=32, seed=7, length=50, p_empty_prompt=0.3,
                             cache_dir=tmp_path / "cache")
    fg = images.mask_to_tensor(torch.from_numpy(np.asarray(Image.open(
        c.root / "foreground" / "train" / "good" / "000.png")) > 0), 32)
    train = {r for part in split["defects"].values() for r in part["train"]}
    prompts, defects = [], set()
    for i in range(20):
        a, b, a2 = ds[i], again[i], ds[i]
        for x in (b, a2):
            assert torch.equal(a["image"], x["image"]) and torch.equal(a["hint"], x["hint"])
            assert a["prompt"] == x["prompt"] and a["info"] == x["info"]
        assert a["image"].shape == (3, 32, 32) and a["hint"].shape == (3, 32, 32)
        assert a["mask"].shape == (1, 32, 32) and a["mask"].sum() > 0
        assert -1 <= a["image"].min() and a["image"].max() <= 1
        m = a["mask"][0]
        assert (m * (1 - fg)).sum() == 0  # inside F
        assert torch.equal(a["hint"], masks.trimap(m, fg))
        good = images.to_tensor(images.read_image(c.root / a["info"]["good"]), 32)
        assert torch.allclose(a["image"][:, m == 0], good[:, m == 0], atol=1e-6)
        assert a["info"]["source"] in train and a["info"]["source"].startswith(
            f"test/{a['defect']}/")
        prompts.append(a["prompt"])
        defects.add(a["defect"])
    assert not torch.equal(ds[0]["image"], ds[1]["image"])
    assert defects == {"scratch", "dent_mark"}
    assert set(prompts) == {"", "a widget with a scratch", "a widget with a dent mark"}
    other = data.PairDataset(c, split, size=32, seed=8, length=50, p_empty_prompt=0.3)
    assert not all(torch.equal(ds[i]["image"], other[i]["image"]) for i in range(3))
    only = data.PairDataset(c, split, size=32, defects=["dent_mark"], p_empty_prompt=0.0,
                            object_name="gadget")
    assert {only[i]["prompt"] for i in range(5)} == {"a gadget with a dent mark"}
    assert len(ds) == 50 and len(only) == 20_000
    with pytest.raises(DataError, match="rust"):
        data.PairDataset(c, split, defects=["rust"])


def test_decoded_images_are_kept_in_memory(tmp_path):
    """An item made once is made again from memory, its files unread; a cache with room for
    one decoded image has to read them again."""
    c, split = category_with_foreground(tmp_path)
    ds = data.PairDataset(c, split, size=32)
    tiny = data.PairDataset(c, split, size=32, cache_size=1)
    first = ds[0]
    assert torch.equal(tiny[0]["image"], first["image"])
    assert {key[0] for key in ds.decoded.items} == {"image", "mask", "foreground"}
    assert len(tiny.decoded.items) == 1
    for f in [f for f in c.root.rglob("*") if f.is_file()]:  # nothing is left to read
        f.unlink()
    again = ds[0]
    assert torch.equal(again["image"], first["image"]) and torch.equal(again["hint"], first["hint"])
    with pytest.raises(DataError, match="no such file"):
        tiny[0]


def test_pair_dataset_estimates_and_caches_the_foreground(tmp_path):
    """Without a foreground folder F is estimated once per good image and cached on disk as a
    PNG; a new dataset reads the cache instead of estimating again."""
    c, split = category_with_foreground(tmp_path)
    c.foreground_dir = None
    cache = tmp_path / "cache"
    ds = data.PairDataset(c, split, size=32, cache_dir=cache)
    used = {ds[i]["info"]["good"] for i in range(12)}
    assert used == {c.rel(p) for p in c.good}
    cached = [torch.from_numpy(np.asarray(Image.open(p)) > 127).float() for p in cache.iterdir()]
    assert len(cached) == len(used)  # one file per good image: the estimate
    for rel in used:
        estimate = foreground.estimate_foreground(images.read_image(c.root / rel))
        assert any(torch.equal(estimate, k) for k in cached), rel

    planted = np.zeros((40, 48), np.uint8)  # a new dataset takes F from the files, as they are
    planted[2:38, 0:30] = 255
    for p in cache.iterdir():
        Image.fromarray(planted).save(p, format="PNG")
    want = images.mask_to_tensor(torch.from_numpy(planted > 127), 32) > 0.5
    assert not torch.equal(ds[0]["hint"][0] > 0, want)
    assert torch.equal(data.PairDataset(c, split, size=32, cache_dir=cache)[0]["hint"][0] > 0, want)

    c.texture = True  # a texture's F is the whole image, whatever the cache holds
    tex = data.PairDataset(c, split, size=32, cache_dir=cache)
    assert torch.equal(tex[0]["hint"][0] > 0, torch.ones(32, 32, dtype=torch.bool))


def test_good_dataset(tmp_path):
    c, split = category_with_foreground(tmp_path)
    ds = data.GoodDataset(c, size=24, seed=1, split=split, p_empty_prompt=0.0)
    assert len(ds) == 4 + 3 + 3
    items = [ds[i] for i in range(len(ds))]
    assert [x["prompt"] for x in items[:4]] == ["a widget"] * 4
    assert {x["prompt"] for x in items[4:]} == {"a widget with a scratch",
                                                "a widget with a dent mark"}
    assert all(x["image"].shape == (3, 24, 24) for x in items)
    long = data.GoodDataset(c, size=24, seed=1, split=split, length=200,
                            prompt_fn=lambda o, d: f"{o}|{d}")
    assert len(long) == 200 and long[4]["prompt"] in ("widget|scratch", "widget|dent mark", "")
    base = images.to_tensor(images.read_image(c.good[0]), 24)
    seen = set()
    for i in range(0, 200, 10):  # image 0 in twenty epochs
        x = long[i]["image"]
        assert torch.equal(x, long[i]["image"])
        seen.add(next(k for k, f in enumerate([base, base.flip(-1), base.flip(-2),
                                                 base.flip(-1).flip(-2)]) if torch.equal(x, f)))
    assert seen == {0, 1, 2, 3}  # the flips vary between epochs, both axes


def test_good_dataset_defect_repeat(tmp_path):
    c, split = category_with_foreground(tmp_path)
    once = data.GoodDataset(c, size=24, seed=1, split=split, p_empty_prompt=0.0)
    thrice = data.GoodDataset(c, size=24, seed=1, split=split, p_empty_prompt=0.0, defect_repeat=3)
    assert len(thrice) == 4 + 3 * (3 + 3)
    defects = [path for path, d, _ in once.items if d]
    assert sorted(path for path, d, _ in thrice.items if d) == sorted(defects * 3)
    assert [x for x in thrice.items if not x[1]] == [x for x in once.items if not x[1]]
    assert sum(thrice[i]["defect"] != "" for i in range(len(thrice))) == 18


def test_good_dataset_masks_follow_the_flips(tmp_path):
    c, split = category_with_foreground(tmp_path)
    ds = data.GoodDataset(c, size=24, seed=1, split=split, p_empty_prompt=0.0, length=400)
    flips = set()
    for i in range(400):
        item = ds[i]
        path, defect, mask_path = ds.items[i % len(ds.items)]
        assert item["mask"].shape == (1, 24, 24)
        if not defect:
            assert mask_path is None and not item["mask"].any()
            continue
        image = images.to_tensor(images.read_image(path), 24)
        mask = images.mask_to_tensor(images.read_mask(mask_path)[0], 24).float()[None]
        assert mask.any()
        # the item's flips, found from the image, must be the mask's too
        def flipped(x, fy, fx):
            return x.flip([-2] * fy + [-1] * fx) if fy or fx else x
        ways = [(0, 0), (0, 1), (1, 0), (1, 1)]
        k = next(k for k, (fy, fx) in enumerate(ways)
                 if torch.equal(item["image"], flipped(image, fy, fx)))
        want = flipped(mask, *ways[k])
        assert torch.equal(item["mask"], want)
        flips.add(k)
    assert flips == {0, 1, 2, 3}


# ---- real data --------------------------------------------------------------------------------

@pytest.mark.skipif(not MAGNETIC_TILE.is_dir(), reason="magnetic_tile data not present")
def test_magnetic_tile(tmp_path):
    c = data.read_category(MAGNETIC_TILE, texture=True)
    assert c.layout == "mvtec" and len(c.good) >= 100 and c.object_name == "magnetic tile"
    assert set(c.defects) == {"blowhole", "break", "crack", "fray", "uneven"}
    split = data.load_or_make_split(tmp_path / "split.json", c, k=10, seed=0)
    for name, part in split["defects"].items():
        assert len(part["train"]) == 10 and len(part["test"]) == len(c.defects[name]) - 10
        assert not set(part["train"]) & set(part["test"])
    assert split == data.load_or_make_split(tmp_path / "split.json", c, k=10, seed=0)
    ds = data.PairDataset(c, split, size=64, seed=0, length=100, p_empty_prompt=0.0)
    for i in range(4):
        x = ds[i]
        assert x["image"].shape == (3, 64, 64) and x["mask"][0].sum() > 0
        assert x["prompt"] == f"a magnetic tile with a {c.defect_names[x['defect']]}"
        assert (x["hint"][0] > 0).all()  # texture: F is everything
        assert set(x["hint"][0].unique().tolist()) == {0.5, 1.0}
    # the estimate on a close-up tile finds no background, i.e. the whole tile
    fg = foreground.estimate_foreground(images.read_image(c.good[0]))
    assert fg.mean() > 0.95
