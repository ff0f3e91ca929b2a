"""minibldm.masks: trimap, morphology, foreground estimate and cache, defect mask sampling and
crop-and-paste pairs, checked against hand-made shapes and PIL's rotation."""
import numpy as np
import pytest
import torch
from PIL import Image

from minibldm import foreground, masks
from minibldm.images import DataError


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def l_shape() -> torch.Tensor:
    """An asymmetric mask: a 10x40 bar with a 15x10 foot at its right end, in a 60x80 frame."""
    m = torch.zeros(60, 80)
    m[20:30, 10:50] = 1
    m[30:45, 40:50] = 1
    return m


def disk_foreground(H: int = 96, W: int = 112) -> torch.Tensor:
    """An irregular F: a disk with a square notch cut out of it."""
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    f = (((yy - 50) ** 2 + (xx - 55) ** 2) < 40 ** 2).float()
    f[30:60, 40:70] = 0
    return f


def best_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two binary crops, maximised over shifts of up to 1 pixel (crops may differ by one
    row or column from rounding at the bounding box)."""
    H, W = max(a.shape[0], b.shape[0]) + 2, max(a.shape[1], b.shape[1]) + 2
    best = 0.0
    A = np.zeros((H, W), bool)
    A[1:1 + a.shape[0], 1:1 + a.shape[1]] = a
    for dy in range(3):
        for dx in range(3):
            B = np.zeros((H, W), bool)
            B[dy:dy + b.shape[0], dx:dx + b.shape[1]] = b[:H - dy, :W - dx]
            best = max(best, (A & B).sum() / (A | B).sum())
    return best


# ---- trimap and morphology --------------------------------------------------------------------

def test_trimap_values():
    fg = torch.zeros(8, 8)
    fg[2:7, 2:7] = 1
    d = torch.zeros(8, 8)
    d[3:5, 3:5] = 1
    d[0, 0] = 1  # a defect pixel off F is still 1
    g = masks.trimap(d, fg)
    assert g.shape == (3, 8, 8) and g.dtype == torch.float32
    assert torch.equal(g[0], g[1]) and torch.equal(g[0], g[2])
    assert g[0, 3, 3] == 1 and g[0, 0, 0] == 1 and g[0, 2, 2] == 0.5 and g[0, 6, 6] == 0.5
    assert g[0, 7, 7] == 0 and g[0, 1, 5] == 0
    assert set(g.unique().tolist()) == {0.0, 0.5, 1.0}
    assert int((g[0] == 0.5).sum()) == 25 - 4


def test_dilate_erode_match_a_direct_loop():
    m = (torch.rand(12, 15, generator=gen(1)) > 0.8).float()
    d = masks.dilate(m, 5)
    for y in range(12):
        for x in range(15):
            assert d[y, x] == m[max(0, y - 2):y + 3, max(0, x - 2):x + 3].max()
    e = masks.erode(m, 3)
    for y in range(12):
        for x in range(15):
            assert e[y, x] == m[max(0, y - 1):y + 2, max(0, x - 1):x + 2].min()
    assert masks.dilate(m[None, None], 3).shape == (1, 1, 12, 15)
    with pytest.raises(ValueError):
        masks.dilate(m, 4)


def test_components_fill_holes_largest_component():
    m = torch.zeros(40, 40)
    # a long spiral-ish snake (one component) that min-label propagation must cross end to end
    m[2, 2:38] = 1
    m[2:38, 37] = 1
    m[37, 5:38] = 1
    m[8:38, 5] = 1
    m[8, 5:30] = 1
    lab = masks.components(m)
    assert (lab[m > 0] == lab[2, 2]).all() and (lab[m == 0] == -1).all()
    m2 = m.clone()
    m2[20:24, 20:24] = 1  # a second, smaller component
    assert masks.count_components(m2) == 2 and masks.count_components(m) == 1
    assert torch.equal(masks.largest_component(m2), m)
    ring = torch.zeros(20, 20)
    ring[4:15, 4:15] = 1
    ring[7:12, 7:12] = 0
    filled = masks.fill_holes(ring)
    assert filled[4:15, 4:15].all() and filled.sum() == 121
    edge = torch.zeros(20, 20)  # a background region touching the border is not a hole
    edge[:, 5] = 1
    assert torch.equal(masks.fill_holes(edge), edge)


# ---- foreground -------------------------------------------------------------------------------

def object_on_background(seed: int = 0, H: int = 150, W: int = 180):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:H, :W]
    truth = ((yy - H * 0.55) / (H * 0.3)) ** 2 + ((xx - W * 0.45) / (W * 0.28)) ** 2 < 1
    im = np.where(truth[..., None], np.array([170, 140, 90]), 30) + rng.normal(0, 15, (H, W, 3))
    return np.clip(im, 0, 255).astype(np.uint8), truth


def test_estimate_foreground_object_on_dark_background():
    im, truth = object_on_background()
    f = foreground.estimate_foreground(im).numpy() > 0.5
    assert f.shape == truth.shape
    assert (f & truth).sum() / (f | truth).sum() > 0.9
    f2 = foreground.estimate_foreground(torch.from_numpy(im)).numpy() > 0.5  # tensors too
    assert (f2 == f).all()


def test_estimate_foreground_drops_specks_and_fills_holes():
    im, truth = object_on_background(1)
    im[10:20, 150:160] = [170, 140, 90]  # a speck of object colour on the background
    im[75:85, 70:80] = 30  # a hole of background colour in the object
    f = foreground.estimate_foreground(im).numpy() > 0.5
    assert not f[10:20, 150:160].any() and f[75:85, 70:80].all()
    assert (f & truth).sum() / (f | truth).sum() > 0.9


def test_estimate_foreground_keeps_a_large_hole():
    rng = np.random.default_rng(2)
    yy, xx = np.mgrid[:160, :160]
    r2 = (yy - 80) ** 2 + (xx - 80) ** 2
    truth = (r2 < 55 ** 2) & (r2 >= 25 ** 2)  # a washer: its hole is background
    im = np.where(truth[..., None], np.array([150, 150, 160]), 25)
    im = im + rng.normal(0, 10, (160, 160, 3))
    f = foreground.estimate_foreground(np.clip(im, 0, 255).astype(np.uint8)).numpy() > 0.5
    assert (f & truth).sum() / (f | truth).sum() > 0.9 and not f[70:90, 70:90].any()


def test_estimate_foreground_ignores_faint_colour_noise_on_grey():
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:150, :180]
    truth = ((yy - 80) / 45) ** 2 + ((xx - 85) / 50) ** 2 < 1
    lum = np.where(truth, 150.0, 60.0) + rng.normal(0, 25, (150, 180))
    im = lum[..., None] + rng.normal(0, 5, (150, 180, 3))  # chroma is noise only: keep it small
    f = foreground.estimate_foreground(np.clip(im, 0, 255).astype(np.uint8)).numpy() > 0.5
    assert (f & truth).sum() / (f | truth).sum() > 0.965


def test_estimate_foreground_mixed_border_is_all_foreground():
    yy, xx = np.mgrid[:150, :180]
    im = np.zeros((150, 180, 3)) + [40, 60, 150]
    im[(yy - 150) ** 2 + (xx - 180) ** 2 < 135 ** 2] = [200, 160, 40]  # half the border each
    im += np.random.default_rng(0).normal(0, 15, im.shape)
    im = np.clip(im, 0, 255).astype(np.uint8)
    assert foreground.estimate_foreground(im).all()  # no single background: a surface
    assert not foreground.estimate_foreground(im, min_border_purity=0.0).all()  # the rule decides


def test_estimate_foreground_texture_is_all_foreground():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:128, :128]
    noise = rng.normal(128, 30, (128, 128, 3))
    lit_stripes = (128 + 50 * np.sin(xx / 3.0))[..., None] * (0.6 + 0.4 * np.exp(
        -((xx - 64) ** 2 + (yy - 64) ** 2) / 3000))[..., None] + rng.normal(0, 8, (128, 128, 3))
    for t in (noise, lit_stripes):
        f = foreground.estimate_foreground(np.clip(t, 0, 255).astype(np.uint8))
        assert f.mean() > 0.95


def test_foreground_for_caches_the_estimate(tmp_path, monkeypatch):
    im, truth = object_on_background()
    path = tmp_path / "a.png"
    Image.fromarray(im).save(path)
    cache = tmp_path / "cache"
    f1 = foreground.foreground_for(path, im, cache_dir=cache)
    assert torch.equal(f1, foreground.estimate_foreground(im))
    (entry,) = cache.glob("*.png")
    assert not list(cache.glob("*.tmp"))
    marked = np.zeros(im.shape[:2], np.uint8)
    marked[:5] = 255  # a cache entry no estimate would give: read back, not recomputed
    Image.fromarray(marked).save(entry)
    assert torch.equal(foreground.foreground_for(path, None, cache_dir=cache),
                       torch.from_numpy(marked > 127).float())
    other = tmp_path / "b.png"  # other bytes, other key
    Image.fromarray(255 - im).save(other)
    foreground.foreground_for(other, None, cache_dir=cache)
    assert len(list(cache.glob("*.png"))) == 2
    entry.write_bytes(b"damaged")  # a damaged entry is recomputed and rewritten
    assert torch.equal(foreground.foreground_for(path, im, cache_dir=cache), f1)
    assert torch.equal(torch.from_numpy(np.asarray(Image.open(entry)) > 127).float(), f1)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert foreground.default_cache_dir() == tmp_path / "xdg" / "minibldm" / "foreground"
    assert foreground.foreground_for(path, im, texture=True).all()
    assert not (tmp_path / "xdg").exists()  # a texture needs no estimate and no cache


def test_foreground_for_reads_the_users_folder(tmp_path):
    im, _ = object_on_background()
    fg = np.zeros(im.shape[:2], np.uint8)
    fg[10:50, 20:90] = 255
    (tmp_path / "fg" / "train" / "good").mkdir(parents=True)
    Image.fromarray(fg).save(tmp_path / "fg" / "train" / "good" / "007.png")
    Image.fromarray(255 - fg).save(tmp_path / "fg" / "008_mask.png")
    got = foreground.foreground_for(tmp_path / "x" / "007.jpg", im, fg_dir=tmp_path / "fg",
                               rel="train/good/007.jpg")
    assert torch.equal(got, torch.from_numpy(fg > 0).float())
    got = foreground.foreground_for(tmp_path / "x" / "008.jpg", im, fg_dir=tmp_path / "fg")
    assert torch.equal(got, torch.from_numpy(fg == 0).float())
    with pytest.raises(DataError, match="009.jpg"):
        foreground.foreground_for(tmp_path / "x" / "009.jpg", im, fg_dir=tmp_path / "fg")
    with pytest.raises(DataError, match="007.png.*px"):  # a mask of another size
        foreground.foreground_for(tmp_path / "x" / "007.jpg", im[:-1], fg_dir=tmp_path / "fg",
                             rel="train/good/007.jpg")


# ---- affine -----------------------------------------------------------------------------------

def test_affine_identity_and_quarter_turns_are_exact():
    m = l_shape()
    img = torch.randn(3, 60, 80, generator=gen(0))
    crop, pix = masks.affine_crop(m, 0.0, 1.0, img)
    assert torch.equal(crop, m[20:45, 10:50])
    assert torch.allclose(pix, img[:, 20:45, 10:50], atol=1e-6)
    for k in (1, 2, 3):  # counter-clockwise quarter turns, as torch.rot90 on (y, x)
        crop, pix = masks.affine_crop(m, 90.0 * k, 1.0, img)
        assert torch.equal(crop, torch.rot90(m[20:45, 10:50], k))
        assert torch.allclose(pix, torch.rot90(img[:, 20:45, 10:50], k, (1, 2)), atol=1e-5)


@pytest.mark.parametrize("angle", [30.0, 90.0, 137.0, 200.0, 301.0])
def test_affine_rotation_matches_pil(angle):
    m = l_shape()
    crop, _ = masks.affine_crop(m, angle, 1.0)
    pil = Image.fromarray((m.numpy() * 255).astype(np.uint8))
    ref = np.asarray(pil.rotate(angle, Image.BILINEAR, expand=True)) > 127
    ys, xs = np.nonzero(ref)
    ref = ref[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    assert best_iou(crop.numpy() > 0.5, ref) > 0.9
    # the mirror image (rotating the other way) does not match: the direction is checked
    wrong, _ = masks.affine_crop(m, -angle, 1.0)
    assert best_iou(wrong.numpy() > 0.5, ref) < 0.75


def random_affine(mask, g, rotation=masks.ROTATION, scale=masks.SCALE):
    """The paper's random affine of a mask: draw_affine's parameters applied by affine_crop."""
    angle, s = masks.draw_affine(g, rotation, scale)
    return masks.affine_crop(mask, angle, s)[0], {"angle": angle, "scale": s}


def test_random_affine_ranges_and_area():
    m = l_shape()
    area = m.sum().item()
    angles = []
    for seed in range(40):
        crop, p = random_affine(m, gen(seed))
        assert 0.0 <= p["angle"] < 360.0 and 0.85 <= p["scale"] < 1.15
        ratio = crop.sum().item() / area
        assert 0.85 ** 2 * 0.93 < ratio < 1.15 ** 2 * 1.07, (p, ratio)
        assert abs(ratio - p["scale"] ** 2) < 0.08
        assert torch.equal(crop, masks.affine_crop(m, p["angle"], p["scale"])[0])
        assert crop[0].any() and crop[-1].any() and crop[:, 0].any() and crop[:, -1].any()
        angles.append(p["angle"])
    assert max(angles) - min(angles) > 270  # the whole circle is drawn from
    crop, p = random_affine(m, gen(0), rotation=(10.0, 20.0), scale=(2.0, 2.0))
    assert 10 <= p["angle"] < 20 and p["scale"] == 2.0
    assert abs(crop.sum().item() / area - 4.0) < 0.2


def test_affine_keeps_tiny_and_thin_masks_whole():
    dot = torch.zeros(20, 20)
    dot[7, 11] = 1
    line = torch.zeros(60, 60)
    line[30, 5:55] = 1  # one pixel wide: a 0.5 threshold would break it at most angles
    wiggle = torch.zeros(60, 60)
    for x in range(5, 55):
        wiggle[30 + round(5 * np.sin(x / 5)), x] = 1  # 8-connected, with diagonal steps
    disk = (torch.cdist(torch.cartesian_prod(torch.arange(40.), torch.arange(40.)),
                        torch.tensor([[20., 20.]])) < 8).float().reshape(40, 40)
    for angle in (0.0, 3.0, 91.0, 180.0):  # a one-pixel mask stays one pixel near quarter turns
        assert masks.affine_crop(dot, angle, 1.0)[0].sum() == 1
    broken = 0
    for seed in range(30):
        crop, p = random_affine(dot, gen(seed))
        assert crop.sum() >= 1, p
        crop, p = random_affine(line, gen(seed), scale=(0.7, 1.15))
        assert masks.count_components(crop) == 1, p
        crop, p = random_affine(wiggle, gen(seed), scale=(0.7, 1.15))
        broken += masks.count_components(crop) > 1
        crop, p = random_affine(disk, gen(seed))  # thick masks keep the 0.5 threshold
        assert abs(crop.sum().item() / disk.sum().item() / p["scale"] ** 2 - 1) < 0.06, p
    assert broken <= 2


# ---- placement --------------------------------------------------------------------------------

def test_sampled_masks_lie_inside_the_foreground():
    fg = disk_foreground()
    few = [l_shape()[15:50, 5:55], torch.ones(6, 9), torch.zeros(30, 30)]
    few[2][5:25, 12:16] = 1
    positions, sources = set(), set()
    for seed in range(60):
        m, info = masks.sample_defect_mask(few, fg, gen(seed))
        assert m.shape == fg.shape and m.sum() > 0
        assert (m * (1 - fg)).sum() == 0, (seed, info)
        crop, _ = masks.affine_crop(few[info["source"]], info["angle"],
                                    info["scale"] * info["shrink"])
        y, x = info["y"], info["x"]
        assert torch.equal(m[y:y + crop.shape[0], x:x + crop.shape[1]], crop)
        assert m.sum() == crop.sum()
        positions.add((y, x))
        sources.add(info["source"])
        assert set(info) == {"source", "angle", "scale", "shrink", "y", "x"}
        assert all(isinstance(v, (int, float)) for v in info.values())
    assert len(positions) > 40 and sources == {0, 1, 2}
    a, ia = masks.sample_defect_mask(few, fg, gen(5))
    b, ib = masks.sample_defect_mask(few, fg, gen(5))
    assert torch.equal(a, b) and ia == ib


def test_translate_only_keeps_the_shape():
    fg = torch.ones(64, 64)
    src = l_shape()
    crop = src[20:45, 10:50]
    for seed in range(10):
        m, info = masks.sample_defect_mask([src], fg, gen(seed), translate_only=True)
        assert info["angle"] == 0.0 and info["scale"] == 1.0 and info["shrink"] == 1.0
        y, x = info["y"], info["x"]
        assert torch.equal(m[y:y + 25, x:x + 40], crop) and m.sum() == crop.sum()


def test_placement_shrinks_then_fails():
    fg = torch.zeros(50, 50)
    fg[10:28, 10:28] = 1  # 18x18
    sq = torch.ones(20, 20)
    m, info = masks.sample_defect_mask([sq], fg, gen(0), translate_only=True)
    assert info["shrink"] < 1.0 and (m * (1 - fg)).sum() == 0 and m.sum() > 0
    m, info = masks.sample_defect_mask([torch.ones(10, 10)], fg, gen(0), translate_only=True)
    assert info["shrink"] == 1.0 and m.sum() == 100 and (m * (1 - fg)).sum() == 0
    with pytest.raises(masks.PlacementError, match="does not fit"):
        masks.sample_defect_mask([torch.ones(40, 40)], fg, gen(0), translate_only=True,
                                 max_shrinks=2)
    with pytest.raises(masks.PlacementError):
        masks.sample_defect_mask([sq], torch.zeros(50, 50), gen(0))


def test_valid_positions_matches_a_direct_check():
    fg = disk_foreground(40, 44)
    crop = torch.zeros(7, 9)
    crop[1:6, 2:8] = 1
    crop[0, 0] = 1
    ok = masks.valid_positions(crop, fg)
    assert ok.shape == (34, 36)
    for y in range(34):
        for x in range(36):
            inside = bool(((1 - fg[y:y + 7, x:x + 9]) * crop).sum() == 0)
            assert ok[y, x].item() == inside


# ---- crop and paste ---------------------------------------------------------------------------

def test_paste_defect():
    fg = disk_foreground()
    good = torch.rand(3, *fg.shape, generator=gen(0)) * 2 - 1
    defect_img = torch.rand(3, 60, 80, generator=gen(1)) * 2 - 1
    defect_mask = l_shape()
    for seed in range(8):
        comp, m, info = masks.paste_defect(good, defect_img, defect_mask, fg, gen(seed))
        assert comp.shape == good.shape and m.shape == fg.shape
        assert (m * (1 - fg)).sum() == 0
        assert torch.equal(comp[:, m == 0], good[:, m == 0])
        crop, pix = masks.affine_crop(defect_mask, info["angle"], info["scale"] * info["shrink"],
                                      defect_img)
        y, x = info["y"], info["x"]
        window = comp[:, y:y + crop.shape[0], x:x + crop.shape[1]]
        assert torch.equal(m[y:y + crop.shape[0], x:x + crop.shape[1]], crop)
        assert torch.equal(window[:, crop > 0], pix[:, crop > 0])
        assert not torch.equal(comp, good)
        g = masks.trimap(m, fg)
        assert torch.equal(g[0] == 1, m > 0) and torch.equal(g[0] == 0, (fg == 0) & (m == 0))
    # translate_only pastes the original pixels
    comp, m, info = masks.paste_defect(good, defect_img, defect_mask, torch.ones_like(fg), gen(3),
                                       translate_only=True)
    assert info["shrink"] == 1.0
    y, x = info["y"], info["x"]
    src = defect_mask[20:45, 10:50] > 0
    assert torch.allclose(comp[:, y:y + 25, x:x + 40][:, src], defect_img[:, 20:45, 10:50][:, src],
                          atol=1e-6)
