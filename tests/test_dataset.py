"""Tests for dataset.py (copy-paste scenes): python -m pytest -q tests/test_dataset.py

Every archive here is generated in a tmp dir by conftest.write_archive: small JPEGs whose object (an ellipse)
is white on black, so image/mask alignment can be checked, plus masks that are missing, empty or belong to
unreadable images.
"""
import itertools
import os

import numpy as np
import pytest
import torch
from PIL import Image

import common
import dataset
from conftest import write_archive
from dataset import ArchiveDataset, collate_fn

CROP = 48


@pytest.fixture(scope="module")
def arc(tmp_path_factory):
    spec = {c: [(f"i{j}", "ok") for j in range(4)] for c in ("cat", "dog", "cow")}
    return write_archive(str(tmp_path_factory.mktemp("arc")), spec)


def make(arc, **kw):
    kw.setdefault("crop", CROP)
    return ArchiveDataset(*arc, **kw)


class ZeroRng:
    """Stands in for the numpy Generator in _compose: every paste offset is 0."""
    def integers(self, lo, hi=None):
        return 0


# ----------------------------------------------------------------------------- item contract

def test_shapes_dtypes_and_labels(arc):
    ds = make(arc, max_n=4)
    assert len(ds) == 12 and ds.categories == ["background", "cat", "dog", "cow"]
    for i in range(6):
        it = ds[i]
        n = it["instance_masks"].shape[0]
        assert 1 <= n <= 4
        assert it["image"].shape == (3, CROP, CROP) and it["image"].dtype == torch.float32
        assert it["semantic"].shape == (CROP, CROP) and it["semantic"].dtype == torch.long
        assert it["instance_masks"].shape == (n, CROP, CROP) and it["instance_masks"].dtype == torch.bool
        assert it["category_ids"].shape == (n,) and it["category_ids"].dtype == torch.long
        assert set(it["category_ids"].tolist()) <= {1, 2, 3}
        assert set(it["semantic"].unique().tolist()) <= {0, 1, 2, 3, 255}


def test_instance_invariants(arc):
    """Ids unique (no pixel in two masks); each mask inside its category's semantic pixels; every object
    pixel of the semantic map belongs to some instance; ignore pixels are in no instance."""
    ds = make(arc, max_n=10, scale_range=(0.3, 1.0))
    n_pasted = 0
    for i in range(12):
        it = ds[i]
        masks, sem, ids = it["instance_masks"], it["semantic"], it["category_ids"]
        assert masks.sum(0).max() <= 1
        for m, c in zip(masks, ids):
            assert (sem[m] == c).all()
        obj = (sem > 0) & (sem < 255)
        assert torch.equal(masks.any(0), obj)
        n_pasted += int(masks[1:].flatten(1).any(1).sum())
    assert n_pasted > 0  # the pastes really happened


def test_later_paste_wins():
    c = 20
    def layer(label, rows, cols, colour):
        obj = np.zeros((c, c), bool)
        obj[:rows, :cols] = True
        rgb = np.full((c, c, 3), colour, np.uint8)
        return {"rgb": rgb, "obj": obj, "box": dataset.paste_box(obj), "valid": (0, c, 0, c), "label": label}
    ds = ArchiveDataset.__new__(ArchiveDataset)
    ds.crop, ds.ignore_index, ds.mean, ds.std = c, 255, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    canvas = {"rgb": np.zeros((c, c, 3), np.uint8), "obj": np.zeros((c, c), bool), "box": None,
              "valid": (0, c, 0, c), "label": 1}
    it = ds._compose([canvas, layer(2, 10, 10, 100), layer(3, 6, 20, 200)], ZeroRng())
    # exclusive boxes: layer 2 covers [0:9, 0:9], layer 3 covers [0:5, 0:19], both at offset 0
    inst = it["instance_masks"]
    assert inst[2, :5, :19].all() and not inst[1, :5].any()
    assert inst[1, 5:9, :9].all() and not inst[1, 9:].any() and not inst[1, :, 9:].any()
    assert (it["semantic"][:5, :19] == 3).all() and (it["semantic"][5:9, :9] == 2).all()
    assert (it["semantic"][9:] == 0).all()
    img = (it["image"] * 255).round()
    assert (img[:, :5, :19] == 200).all() and (img[:, 5:9, :9] == 100).all() and (img[:, 9:] == 0).all()
    assert not inst[0].any() and it["category_ids"].tolist() == [1, 2, 3]


def test_paste_box_off_by_one():
    obj = np.zeros((10, 10), bool)
    obj[2:6, 3:8] = True
    assert dataset.paste_box(obj) == (2, 5, 3, 7)  # last row and column dropped, as official
    thin = np.zeros((10, 10), bool)
    thin[4, 1:9] = True
    assert dataset.paste_box(thin) is None and dataset.paste_box(np.zeros((4, 4), bool)) is None


@pytest.mark.parametrize("ignore", [255, 1000])
def test_padding_is_ignore_never_background(arc, ignore):
    ds = make(arc, max_n=1, scale_range=(0.2, 0.2), ignore_index=ignore)  # 120x90 -> 24x18, padded to 48x48
    for i in range(8):
        sem = ds[i]["semantic"]
        assert set(sem.unique().tolist()) <= {0, 1, 2, 3, ignore}
        valid = sem != ignore
        rows, cols = valid.any(1).nonzero().flatten(), valid.any(0).nonzero().flatten()
        assert valid.sum() == 24 * 18 and len(rows) == 18 and len(cols) == 24  # a solid window
        assert valid[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all()
        assert (sem[valid] == 0).any()  # background exists, but only inside the window


def test_pad_side_skew_default(arc):
    assert dataset.PAD_SIDE_PROBS == (0.25, 0.1875, 0.140625, 0.421875)
    assert abs(sum(dataset.PAD_SIDE_PROBS) - 1) < 1e-12


# ----------------------------------------------------------------------------- geometry is exact

def test_image_and_mask_stay_aligned(arc, monkeypatch):
    """The images are white exactly on their mask: with photometric ops off, the scene's object pixels
    are bright and its background dark (decoding, box resize, flips and pastes included)."""
    monkeypatch.setattr(dataset, "photometric", lambda img, *a, **k: np.array(img))
    ds = make(arc, max_n=6, norm="imagenet")
    mean, std = torch.tensor(ds.mean).view(3, 1, 1), torch.tensor(ds.std).view(3, 1, 1)
    agree = total = 0
    for i in range(10):
        it = ds[i]
        grey = (it["image"] * std + mean).mean(0)  # [c, c] in [0, 1]
        sem = it["semantic"]
        obj, bg = (sem > 0) & (sem < 255), sem == 0
        agree += int((grey[obj] > 0.5).sum() + (grey[bg] < 0.5).sum())
        total += int(obj.sum() + bg.sum())
    assert agree / total > 0.97


def test_photometric_probabilities_and_ranges():
    """Jitter p=0.8 with all four ops in [1-0.8, 1+0.8] (hue [-0.2, 0.2]) in every order, grayscale p=0.2,
    blur p=0.5 with sigma in [0.1, 2] and the official kernel size (39 at 384, 7 at 64)."""
    n, draws = 4000, []
    for seed in range(n):
        draws.append(dataset.photometric_params(np.random.default_rng(seed), 384))
    ops = [[op for op, _ in d[0]] for d in draws]
    assert abs(sum(len(o) >= 4 for o in ops) / n - 0.8) < 0.03
    assert abs(sum("gray" in o for o in ops) / n - 0.2) < 0.03
    assert abs(sum(d[1] is not None for d in draws) / n - 0.5) < 0.03
    assert len({tuple(o[:4]) for o in ops if len(o) >= 4}) == 24  # all orders occur
    factors = np.array([f for d in draws for op, f in d[0] if op in ("brightness", "contrast", "saturation")])
    hues = np.array([f for d in draws for op, f in d[0] if op == "hue"])
    assert 0.2 <= factors.min() < 0.22 and 1.78 < factors.max() <= 1.8
    assert -0.2 <= hues.min() < -0.19 and 0.19 < hues.max() <= 0.2
    sigmas = np.array([d[1] for d in draws if d[1] is not None])
    assert 0.1 <= sigmas.min() < 0.12 and 1.98 < sigmas.max() <= 2.0
    assert {d[2] for d in draws} == {39} and dataset.photometric_params(np.random.default_rng(0), 64)[2] == 7


def test_photometric_strength_overrides(arc):
    """--jitter / --p_gray change only the amounts: hue 0 and p_gray 0 leave no hue or gray op, the other
    ops keep their ranges, and the blur draws are the same as the official ones for the same seed."""
    for seed in range(300):
        off = dataset.photometric_params(np.random.default_rng(seed), 64, (0.4, 0.8, 0.8, 0.0), 0.0)
        ref = dataset.photometric_params(np.random.default_rng(seed), 64)
        names = [op for op, _ in off[0]]
        assert "hue" not in names and "gray" not in names and off[1:] == ref[1:]
        assert all(0.6 <= f <= 1.4 for op, f in off[0] if op == "brightness")
        assert [op for op, _ in ref[0] if op not in ("hue", "gray")] == names
    none = dataset.photometric_params(np.random.default_rng(0), 64, (0, 0, 0, 0), 0.0)
    assert none[0] == []
    with pytest.raises(common.UserError, match="jitter"):
        make(arc, jitter=(0.8, 0.8, 0.8, 0.7))  # torchvision's hue range is [-0.5, 0.5]
    with pytest.raises(common.UserError, match="p_gray"):
        make(arc, p_gray=1.5)


def reference_photometric(img, params):
    """The plain path: every op on the whole image with torchvision's PIL kernels, then the blur."""
    ops, sigma, ksize = params
    for op, f in ops:
        img = dataset.apply_op(img, op, f)
    arr = np.asarray(img)
    return dataset.gaussian_blur(arr, sigma, ksize) if sigma is not None else arr


def test_fast_photometric_equals_whole_image_path():
    """Window + pad pixel + exact contrast mean, and the paste-box cut, give the reference's pixels."""
    rng = np.random.default_rng(3)
    c, window, fill = 48, (6, 30, 0, 41), (90, 140, 200)
    img = Image.new("RGB", (c, c), fill)
    img.paste(Image.fromarray(rng.integers(0, 256, (24, 41, 3), dtype=np.uint8)), (0, 6))
    box = (10, 28, 30, 40)  # near the window's right edge and the image's top-right: blur margins matter
    n_contrast_not_first = 0
    for seed in range(40):  # covers jitter on/off, every op order, gray and blur
        params = dataset.photometric_params(np.random.default_rng(seed), 384)
        ops = [op for op, _ in params[0]]
        n_contrast_not_first += "contrast" in ops[1:] and params[1] is not None
        ref = reference_photometric(img, params)
        assert np.array_equal(dataset.photometric(img, params, window, fill), ref), seed
        cut = dataset.photometric(img, params, window, fill, box)
        assert np.array_equal(cut[10:28, 30:40], ref[10:28, 30:40]), seed
        assert np.array_equal(dataset.photometric(img, params), ref), seed  # no window given
    assert n_contrast_not_first >= 5


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "CMYK"])
def test_decoding_and_scaling_follow_the_official_loader(tmp_path, mode):
    """The scaled image is the official one: full decode, convert("RGB"), then PIL's bilinear resize
    (TF.resize on a PIL image) of the whole image, then the crop; palette and CMYK files included."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (9, 12, 3), dtype=np.uint8)).resize((157, 118), Image.BICUBIC)
    img = rgb.quantize(64) if mode == "P" else rgb.convert(mode)
    path = str(tmp_path / ("im.png" if mode == "P" else "im.jpg"))
    img.save(path, quality=90)
    ds = ArchiveDataset.__new__(ArchiveDataset)
    ds.crop = 96
    for s in (0.15, 0.3, 0.55, 0.61, 0.9):  # reduced-scale decoding would apply to the first four; no padding in the last
        out, geom = ds._load_scaled_crop(path, s, 3, np.random.default_rng(1))
        th, tw = geom["size"]
        ref = Image.open(path).convert("RGB").resize((tw, th), Image.BILINEAR)
        (sy, sx), (dy, dx, lh, lw) = geom["src"], geom["dst"]
        assert np.array_equal(np.asarray(out)[dy:dy + lh, dx:dx + lw], np.asarray(ref)[sy:sy + lh, sx:sx + lw]), s


def test_mask_rescale_is_the_official_nearest_rule(arc):
    """The pseudo-mask is resized as the official TF.resize(mask, NEAREST) on a tensor: source index
    floor(dst * in / out), computed only inside the crop window."""
    import torchvision.transforms.functional as TF
    ds = make(arc)
    entry = ds.entries[0]
    m = np.asarray(Image.open(ds._mask_path(entry))) > 127  # [90, 120]
    for th, tw, sy, sx in [(69, 92, 3, 11), (45, 60, 0, 0), (180, 240, 17, 40), (61, 83, 5, 7), (90, 120, 20, 30)]:
        ref = TF.resize(torch.from_numpy(m)[None].float(), [th, tw], TF.InterpolationMode.NEAREST)[0].bool().numpy()
        lh, lw = min(CROP, th - sy), min(CROP, tw - sx)
        obj = ds._load_mask_crop(entry, {"size": (th, tw), "src": (sy, sx), "dst": (0, 0, lh, lw)})
        assert np.array_equal(obj[:lh, :lw], ref[sy:sy + lh, sx:sx + lw]), (th, tw)
    for n_in, n_out in itertools.product(range(1, 60, 4), range(1, 200, 3)):
        ref = torch.nn.functional.interpolate(torch.arange(n_in, dtype=torch.float32)[None, None], size=n_out)
        assert np.array_equal(dataset.nearest_index(0, n_out, n_in, n_out), ref[0, 0].long().numpy()), (n_in, n_out)


def test_per_pixel_ops_are_per_pixel():
    """photometric()'s window trick holds because every op in PIXEL_OPS maps each pixel on its own (checked
    against torchvision's own kernels: each pixel of the op's output equals the op on that pixel alone),
    and contrast, the one op that is not, is handled apart. An op outside both is refused."""
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (6, 7, 3), dtype=np.uint8))
    for op, f in [("brightness", 1.6), ("saturation", 0.3), ("hue", 0.17), ("gray", None), ("contrast", 1.5)]:
        whole = np.asarray(dataset.apply_op(img, op, f))
        alone = np.stack([np.stack([np.asarray(dataset.apply_op(img.crop((x, y, x + 1, y + 1)), op, f))[0, 0]
                                    for x in range(7)]) for y in range(6)])
        assert np.array_equal(whole, alone) == (op in dataset.PIXEL_OPS), op
    with pytest.raises(AssertionError, match="not a per-pixel op"):
        dataset.photometric(img, ([("sharpness", 2.0)], None, 3))


def test_mask_nearest_identity_at_scale_one(arc):
    ds = make(arc)
    entry = ds.entries[0]
    m = np.asarray(Image.open(ds._mask_path(entry))) > 127  # [90, 120]
    obj = ds._load_mask_crop(entry, {"size": (90, 120), "src": (20, 30), "dst": (0, 0, CROP, CROP)})
    assert np.array_equal(obj, m[20:20 + CROP, 30:30 + CROP])


# ----------------------------------------------------------------------------- seeds

def test_same_seed_same_scene_any_workers(arc):
    a, b = make(arc, seed=3), make(arc, seed=3)
    for i in (0, 5, 11):
        x, y = a[i], b[i]
        for k in x:
            assert torch.equal(x[k], y[k]), k
    c = make(arc, seed=4)
    assert any(not torch.equal(a[i]["image"], c[i]["image"]) for i in range(4))
    a.set_epoch(1)
    assert not torch.equal(a[0]["image"], b[0]["image"])
    a.set_epoch(0)
    loader = torch.utils.data.DataLoader(a, batch_size=2, num_workers=2, collate_fn=collate_fn)
    batches = list(loader)[:2]
    for j, batch in enumerate(batches):
        ref = collate_fn([b[2 * j], b[2 * j + 1]])
        assert torch.equal(batch["image"], ref["image"]) and torch.equal(batch["semantic"], ref["semantic"])


# ----------------------------------------------------------------------------- bad data

def test_empty_missing_unreadable_counted(tmp_path):
    spec = {"cat": [("a", "missing"), ("b", "empty"), ("c", "corrupt"), ("d", "ok")]}
    ds = ArchiveDataset(*write_archive(str(tmp_path), spec), crop=CROP, max_n=5)
    assert [e["path"] for e in ds.check_masks()] == ["cat/a.jpg"]
    for i in range(20):
        it = ds[i]
        assert it["instance_masks"].shape[0] == it["category_ids"].shape[0]
    assert ds.stats["missing_mask"] > 0 and ds.stats["empty_mask"] > 0
    assert ds.stats["unreadable_image"] > 0 and ds.stats["scenes"] == 20
    assert ds.unreadable == {os.path.join(str(tmp_path), "images", "cat", "c.jpg")}


def test_grayscale_image_and_mask_size_mismatch(tmp_path, monkeypatch):
    monkeypatch.setattr(dataset, "photometric", lambda img, *a, **k: np.array(img))
    spec = {"cat": [("g", "gray"), ("s", "small_mask")]}
    ds = ArchiveDataset(*write_archive(str(tmp_path), spec), crop=CROP, max_n=1, scale_range=(1.0, 1.0))
    for i in range(6):
        it = ds[i]
        grey = it["image"] * torch.tensor(ds.std).view(3, 1, 1) + torch.tensor(ds.mean).view(3, 1, 1)
        obj = it["semantic"] == 1
        assert it["image"].shape == (3, CROP, CROP) and obj.any()
        assert (grey[:, obj] > 0.5).float().mean() > 0.85  # the half-size mask is off by <= 1 px at edges
    assert ds.stats["mask_size_mismatch"] > 0 and ds.stats["unreadable_image"] == 0


def test_only_unreadable_images_is_a_user_error(tmp_path):
    ds = ArchiveDataset(*write_archive(str(tmp_path), {"cat": [("c", "corrupt")]}), crop=CROP)
    with pytest.raises(common.UserError, match="unreadable"):
        ds[0]


def test_duplicate_gets_last_category_label(tmp_path):
    spec = {"cat": [("a", "ok")], "dog": [("b", "ok"), ("a2", "dup:cat/a")]}
    ds = ArchiveDataset(*write_archive(str(tmp_path), spec), crop=CROP)
    assert len(ds.entries) == 2 and len(ds.flat) == 3 and len(ds) == 3
    assert ds.labels[ds.entries.index({"dir": 0, "path": "cat/a.jpg"})] == 2  # "dog", the later category
    assert ds.pools == [[0], [1, 0]]
    sub = ArchiveDataset(*write_archive(str(tmp_path), spec), crop=CROP, categories=["dog", "cat"])
    assert sub.categories == ["background", "dog", "cat"] and sub.labels[sub.entries.index(
        {"dir": 0, "path": "cat/a.jpg"})] == 2  # order of `categories` decides


def test_user_errors(arc, tmp_path):
    with pytest.raises(common.UserError):
        make(arc, norm="bgr")
    with pytest.raises(common.UserError):
        make(arc, categories=["cat", "zebra"])
    with pytest.raises(common.UserError):
        ArchiveDataset(arc[0], str(tmp_path / "nope"))
    with pytest.raises(common.UserError):
        make(arc, scale_range=(0.5, 0.1))
    with pytest.raises(common.UserError, match="ignore_index 3 is a label id"):  # 4 categories: 0..3
        make(arc, ignore_index=3)
    with pytest.raises(common.UserError):
        make(arc, max_m=3)  # a misspelt augmentation key


def test_norms_differ(arc):
    a, b = make(arc, norm="imagenet"), make(arc, norm="clip")
    x, y = a[0]["image"], b[0]["image"]
    std, mean = torch.tensor(b.std).view(3, 1, 1), torch.tensor(b.mean).view(3, 1, 1)
    std0, mean0 = torch.tensor(a.std).view(3, 1, 1), torch.tensor(a.mean).view(3, 1, 1)
    assert not torch.allclose(x, y) and torch.allclose(x * std0 + mean0, y * std + mean, atol=1e-5)


# ----------------------------------------------------------------------------- collate

def test_collate_variable_instance_counts(arc):
    ds = make(arc, max_n=10)
    items = [ds[i] for i in range(8)]
    counts = [it["instance_masks"].shape[0] for it in items]
    assert len(set(counts)) > 1  # really variable
    batch = collate_fn(items)
    assert batch["image"].shape == (8, 3, CROP, CROP) and batch["semantic"].shape == (8, CROP, CROP)
    assert [m.shape[0] for m in batch["instance_masks"]] == counts
    assert [c.shape[0] for c in batch["category_ids"]] == counts
