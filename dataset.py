"""Copy-paste training scenes from a retrieval archive and its pseudo-masks (paper sections 3.3, 4.1;
official datasets/index_dataset.py and datasets/augmentations/). Reference: docs/train.md.

    ds = ArchiveDataset("out/archive.json", "out/masks", crop=384)   # item i -> one scene, a pure function of i
    python dataset.py --archive out/archive.json --masks_dir out/masks --preview out/scenes.jpg   # look at some

One scene: n ~ randint(1, max_n) images, the canvas included (with probability p_same all of one
category). Each is scaled by U(scale_range), padded with its mean colour (label: ignore_index), randomly
cropped, flipped, jittered, greyed and blurred; image 1 is the canvas and the objects of images 2..n are
pasted on it at random offsets, later ones on top. Every random number of item i comes from one numpy Generator seeded with
(seed, rank, epoch, i), so a scene never depends on the worker count and train.py resumes exactly.
"""
import collections
import os

import numpy as np
import torch
from PIL import Image, ImageStat

import categories
import common

# The copy-paste settings (train.py --aug KEY=VALUE): the official recipe, and what each key accepts.
AUG = {"max_n": 10, "scale_range": (0.1, 1.0), "p_same": 0.5, "jitter": (0.8, 0.8, 0.8, 0.2), "p_gray": 0.2}
AUG_FORMS = {
    "max_n": ("a whole number >= 1: images per scene, the canvas included (max_n=1 pastes nothing)",
              lambda v: v == int(v) and v >= 1),
    "scale_range": ("two numbers 0 < lo <= hi, e.g. 0.1,1.0", lambda v: len(v) == 2 and 0 < v[0] <= v[1]),
    "p_same": ("a probability in [0, 1]", lambda v: 0 <= v <= 1),
    "jitter": ("four numbers >= 0 (brightness, contrast, saturation, hue), hue at most 0.5, e.g. 0.8,0.8,0.8,0.2",
               lambda v: len(v) == 4 and min(v) >= 0 and v[3] <= 0.5),
    "p_gray": ("a probability in [0, 1]", lambda v: 0 <= v <= 1),
}

# Probability of padding (left+top, left+bottom, right+top, right+bottom) when the scaled image is smaller
# than the crop. The official random_crop draws random() anew in each elif, which skews the sides to
# 1/4, 3/16, 9/64, 27/64; we keep that. For uniform sides change this line to (0.25, 0.25, 0.25, 0.25).
PAD_SIDE_PROBS = (0.25, 0.1875, 0.140625, 0.421875)

MAX_REDRAWS = 100  # unreadable images in a row before we give up on the archive
PIL_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def check_aug(aug):
    """Copy-paste settings (a dict with keys of AUG) -> the same dict, or a UserError naming the first
    unknown key or bad value and the form that key accepts."""
    for k, v in aug.items():
        if k not in AUG_FORMS:
            raise common.UserError(f"unknown augmentation setting {k!r}: use one of {sorted(AUG)}")
        form, ok = AUG_FORMS[k]
        try:
            good = ok(v)
        except (TypeError, ValueError):
            good = False
        if not good:
            shown = ",".join(map(str, v)) if isinstance(v, (tuple, list)) else v
            raise common.UserError(f"augmentation setting {k}={shown} is not allowed: {k} must be {form}")
    return aug


# ----------------------------------------------------------------------------- photometric ops

# The ops that map each pixel on its own: photometric() runs them on a window plus one padding pixel.
# contrast, the one op with a whole-image statistic (the mean grey), is handled apart there.
PIXEL_OPS = ("brightness", "saturation", "hue", "gray")

def jitter_params(rng, strength=AUG["jitter"]):
    """torchvision ColorJitter(b, c, s, h)'s random parameters, drawn from `rng`: factors in
    [1 - x, 1 + x] (hue in [-h, h]) and the four ops in a random order. Returns (order, factors)."""
    b, c, s, h = strength
    factors = {"brightness": rng.uniform(max(0.0, 1 - b), 1 + b), "contrast": rng.uniform(max(0.0, 1 - c), 1 + c),
               "saturation": rng.uniform(max(0.0, 1 - s), 1 + s), "hue": rng.uniform(-h, h)}
    order = [("brightness", "contrast", "saturation", "hue")[k] for k in rng.permutation(4)]
    return order, factors


def apply_op(img, op, factor=None):
    """One torchvision PIL op: adjust_{brightness, contrast, saturation, hue}, or "gray"."""
    import torchvision.transforms.v2.functional as TF  # lazy: keeps `import dataset` cheap
    if op == "gray":
        return TF.rgb_to_grayscale(img, num_output_channels=3)
    return getattr(TF, f"adjust_{op}")(img, factor)


def photometric_params(rng, crop, jitter=AUG["jitter"], p_gray=AUG["p_gray"]):
    """The official photometric draws: ColorJitter(0.8, 0.8, 0.8, 0.2) p=0.8, grayscale p=0.2, Gaussian blur
    p=0.5 with sigma ~ U(0.1, 2) and kernel int(0.1 * crop) // 2 * 2 + 1. `jitter` and `p_gray` change
    only the amounts (the random draws stay the same).
    Returns (ops, sigma or None, ksize) with ops a list of (name, factor) in application order."""
    ops = []
    if rng.random() < 0.8:
        order, factors = jitter_params(rng, jitter)
        # a zero-strength op draws its identity factor (hue 0, others 1): skip it, a PIL pass saved
        ops += [(op, factors[op]) for op in order if factors[op] != (0.0 if op == "hue" else 1.0)]
    if rng.random() < p_gray:
        ops.append(("gray", None))
    sigma = rng.uniform(0.1, 2.0) if rng.random() < 0.5 else None
    return ops, sigma, int(0.1 * crop) // 2 * 2 + 1


def photometric(img, params, window=None, fill=(0, 0, 0), box=None):
    """Apply photometric_params to a PIL RGB image -> uint8 [H, W, 3], the same pixels as running the ops
    on the whole image (tested against the plain torchvision path), only cheaper:
      * outside `window` (y0, y1, x0, x1) the image is the constant padding colour `fill`, so every
        per-pixel op runs on the window plus ONE pad pixel; contrast (the only op that needs a whole-image
        statistic, the mean grey) gets that mean exactly from the window's sum and the pad count;
      * with `box` (a pasted image: only its paste box is ever read) the ops after the last contrast
        run on the box plus the blur radius only. Outside the box the returned pixels are then garbage."""
    ops, sigma, ksize = params
    w, h = img.size
    y0, y1, x0, x1 = window or (0, h, 0, w)
    n_pad = w * h - (y1 - y0) * (x1 - x0)
    r = blur_radius(sigma, ksize) if sigma is not None else 0
    sub, pad = img.crop((x0, y0, x1, y1)), Image.new("RGB", (1, 1), tuple(fill))
    assert all(op in PIXEL_OPS or op == "contrast" for op, _ in ops), f"not a per-pixel op or contrast: {ops}"
    cut_at = 1 + max([k for k, (op, _) in enumerate(ops) if op == "contrast"], default=-1)
    for k in range(len(ops) + 1):
        if k == cut_at and box is not None:  # whole-image statistics are done: keep box + radius only
            cy0, cy1 = max(y0, box[0] - r), min(y1, box[1] + r)
            cx0, cx1 = max(x0, box[2] - r), min(x1, box[3] + r)
            sub, (y0, y1, x0, x1) = sub.crop((cx0 - x0, cy0 - y0, cx1 - x0, cy1 - y0)), (cy0, cy1, cx0, cx1)
        if k == len(ops):
            break
        op, f = ops[k]
        if op == "contrast":  # PIL's ImageEnhance.Contrast: blend towards the mean grey, rounded
            total = ImageStat.Stat(sub.convert("L")).sum[0] + n_pad * pad.convert("L").getpixel((0, 0))
            grey = (int(total / (w * h) + 0.5),) * 3
            sub, pad = (Image.blend(Image.new("RGB", im.size, grey), im, f) for im in (sub, pad))
        else:
            sub, pad = apply_op(sub, op, f), apply_op(pad, op, f)
    out = Image.new("RGB", (w, h), pad.getpixel((0, 0)))
    out.paste(sub, (x0, y0))
    arr = np.asarray(out)
    if sigma is None:
        return arr
    if box is None:
        return gaussian_blur(arr, sigma, ksize)
    by0, by1, bx0, bx1 = max(0, box[0] - r), min(h, box[1] + r), max(0, box[2] - r), min(w, box[3] + r)
    arr = arr.copy()  # the blur of box + radius is exact inside the box (mirror only at true borders)
    arr[by0:by1, bx0:bx1] = gaussian_blur(arr[by0:by1, bx0:bx1], sigma, ksize)
    return arr


def blur_radius(sigma, ksize):
    return max(1, min(ksize // 2, int(4.0 * sigma + 0.5)))


def gaussian_blur(arr, sigma, ksize):
    """Exact Gaussian blur of a uint8 [H, W, 3] array, rounded like cv2.GaussianBlur. The official kernel
    (39 taps at 384) is wider than the 4-sigma support for sigma <= 2, so the taps beyond 4 sigma
    (< 1e-3 of the mass) are dropped; at small crops the official kernel size is the tighter bound."""
    from scipy import ndimage
    radius = blur_radius(sigma, ksize)
    out = ndimage.gaussian_filter(arr.astype(np.float32), (sigma, sigma, 0), mode="mirror",
                                  radius=(radius, radius, 0))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- the dataset

class ArchiveDataset(torch.utils.data.Dataset):
    """Copy-paste scenes. Item: {"image": float [3, crop, crop] (normalised), "semantic": long [crop, crop]
    (0 bg, label id, ignore_index), "instance_masks": bool [n, crop, crop], "category_ids": long [n]}.

    categories: None (the archive's), a list, or a categories.get_categories spec; label id = index.
    ignore_index: the semantic label of padding; never a label id. `aug`: AUG keys (the official values
    by default). rank: mixed into the seed; leave 0 when ranks read disjoint indices (train.py does).
    `stats` counts images, scenes, missing/empty/unreadable masks and unreadable images (per process:
    with DataLoader workers each worker counts its own; `check_masks()` lists missing masks up front)."""

    def __init__(self, archive_json, masks_dir, categories=None, crop=384, ignore_index=255, norm="imagenet",
                 seed=0, length=None, index_dirs=None, rank=0, **aug):
        if norm not in common.NORMS:
            raise common.UserError(f"norm must be one of {sorted(common.NORMS)}, got {norm!r}")
        if int(crop) != crop or crop < 1:
            raise common.UserError(f"crop must be a whole number of pixels >= 1, got {crop}")
        aug = check_aug({**AUG, **aug})
        (lo, hi), p_gray, p_same = (float(v) for v in aug["scale_range"]), aug["p_gray"], aug["p_same"]
        jitter = tuple(float(v) for v in aug["jitter"])
        self.archive = common.load_archive(archive_json, index_dirs)
        self.masks_dir = common.require_dir(masks_dir, "masks dir", "<masks_dir>/<dir>_<basename>/<path>.png")
        self.categories = self._resolve_categories(categories)
        if 0 <= ignore_index < len(self.categories):
            raise common.UserError(f"ignore_index {ignore_index} is a label id of the {len(self.categories)} "
                                   "categories: the padding would become that class")
        self.crop, self.scale_range, self.max_n, self.p_same = int(crop), (lo, hi), int(aug["max_n"]), float(p_same)
        self.ignore_index, self.seed, self.rank, self.epoch = int(ignore_index), int(seed), int(rank), 0
        self.jitter, self.p_gray = jitter, float(p_gray)
        self.mean, self.std = common.NORMS[norm]
        self._build_pools()
        self.length = int(length) if length is not None else len(self.flat)
        self.stats = collections.Counter()
        self.unreadable = set()  # image paths that failed to decode (per process)

    def _resolve_categories(self, spec):
        names = categories.get_categories(self.archive["categories"] if spec is None else spec)
        missing = [c for c in names[1:] if c not in self.archive["archive"]]
        if missing:
            raise common.UserError(f"{len(missing)} categories have no archive entry (e.g. {missing[:3]}); "
                                   "rebuild the archive with these categories or pass --categories")
        return names

    def _build_pools(self):
        """Each entry a single time; per-category pools and the flat pool as indices into them (duplicates kept,
        as official: an image retrieved for 2 categories is twice as likely to be drawn). Label of an
        entry = the LAST category (in `categories` order) whose archive holds it (the official dict overwrite)."""
        self.entries, self.labels, key_to_idx = [], [], {}
        self.pools = []  # one list of entry indices per non-background category (may be empty)
        for label, name in enumerate(self.categories[1:], start=1):
            pool = []
            for e in self.archive["archive"][name]:
                key = (int(e["dir"]), e["path"])
                if key not in key_to_idx:
                    key_to_idx[key] = len(self.entries)
                    self.entries.append({"dir": key[0], "path": key[1]})
                    self.labels.append(label)
                self.labels[key_to_idx[key]] = label  # later category overwrites
                pool.append(key_to_idx[key])
            self.pools.append(pool)
        self.flat = [i for pool in self.pools for i in pool]
        self.nonempty = [k for k, pool in enumerate(self.pools) if pool]
        if not self.flat:
            raise common.UserError("the archive has no entries for the chosen categories")

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def __len__(self):
        return self.length

    def check_masks(self):
        """Entries whose pseudo-mask file is missing (one stat per entry: call it in the main process)."""
        return [e for e in self.entries if not os.path.isfile(self._mask_path(e))]

    def _mask_path(self, entry):
        return os.path.join(self.masks_dir, common.mask_relpath(self.archive, entry))

    def rng(self, index):
        # SeedSequence of the 4 numbers: independent streams per item, same scene for any worker layout
        return np.random.default_rng([self.seed, self.rank, self.epoch, int(index)])

    # ------------------------------------------------------------------------- one scene

    def __getitem__(self, index):
        rng = self.rng(index)
        n = int(rng.integers(1, self.max_n + 1))
        pool = self.flat
        if rng.random() < self.p_same:  # all images from one category: several instances of a class
            pool = self.pools[self.nonempty[rng.integers(len(self.nonempty))]]
        layers = [self._draw(pool, rng, is_canvas=(i == 0)) for i in range(n)]
        self.stats["scenes"] += 1
        return self._compose(layers, rng)

    def _draw(self, pool, rng, is_canvas):
        """One augmented image; an unreadable image is counted and replaced by a new draw from `pool`."""
        for _ in range(MAX_REDRAWS):
            idx = pool[rng.integers(len(pool))]
            layer = self._augment(idx, rng, is_canvas)
            if layer is not None:
                self.stats["images"] += 1
                return layer
        raise common.UserError(f"{MAX_REDRAWS} unreadable images in a row (e.g. {sorted(self.unreadable)[:2]}); "
                               "check the archive's index_dirs")

    def _augment(self, idx, rng, is_canvas):
        """Scale, pad/crop, flip and photometric ops of entry `idx`. Returns a dict with "rgb" uint8
        [c, c, 3] (None for a pasted image with nothing to paste), "obj" bool [c, c] (object pixels),
        "box" (its paste box, None for the canvas), "valid" (y0, y1, x0, x1) (the non-pad window) and
        "label"; or None if the image cannot be decoded."""
        c, entry = self.crop, self.entries[idx]
        path = common.image_path(self.archive, entry)
        s = rng.uniform(*self.scale_range)
        pad_side = rng.choice(4, p=PAD_SIDE_PROBS)  # 0 left+top, 1 left+bottom, 2 right+top, 3 right+bottom
        try:
            rgb, geom = self._load_scaled_crop(path, s, pad_side, rng)
        except PIL_ERRORS:
            self.stats["unreadable_image"] += 1
            self.unreadable.add(path)
            return None
        obj = self._load_mask_crop(entry, geom)
        y0, x0, lh, lw = geom["dst"]
        if rng.random() < 0.5:  # horizontal flip of image, mask and non-pad window together
            rgb, obj, x0 = rgb.transpose(Image.FLIP_LEFT_RIGHT), obj[:, ::-1], c - x0 - lw
        box = None if is_canvas else paste_box(obj)
        window = (y0, y0 + lh, x0, x0 + lw)
        # a pasted image with nothing to paste skips the photometric work (it would never be seen)
        rgb = (photometric(rgb, photometric_params(rng, c, self.jitter, self.p_gray), window, geom["fill"], box)
               if is_canvas or box else None)
        return {"rgb": rgb, "obj": obj, "box": box, "valid": window, "label": self.labels[idx]}

    def _load_scaled_crop(self, path, s, pad_side, rng):
        """Decode, scale by s, pad with the mean colour and crop to c x c. Returns (PIL RGB c x c, geometry):
        "orig" (h0, w0) original size, "size" (th, tw) scaled size, "src" (sy, sx) crop origin in the scaled
        image, "dst" (dy, dx, lh, lw) where that window lands in the crop, "fill" the padding colour."""
        c = self.crop
        # Decoded at full size and converted to RGB before the resize, as the official loader does (a JPEG
        # decoded at reduced scale with Image.draft is faster but gives other pixels).
        with Image.open(path) as im:
            im.load()
            im = im if im.mode == "RGB" else im.convert("RGB")
        w0, h0 = im.size
        tw, th = max(1, int(w0 * s)), max(1, int(h0 * s))
        (sy, dy, lh), (sx, dx, lw) = (crop_window(th, c, pad_side in (0, 2), rng),
                                      crop_window(tw, c, pad_side in (0, 1), rng))
        geom = {"orig": (h0, w0), "size": (th, tw), "src": (sy, sx), "dst": (dy, dx, lh, lw), "fill": (0, 0, 0)}
        # the whole image is resized, then cropped: resizing only the crop window (PIL's box=) is faster for
        # large images but rounds some pixels differently
        im = im.resize((tw, th), Image.BILINEAR)
        if tw >= c and th >= c:
            return im.crop((sx, sy, sx + c, sy + c)), geom
        geom["fill"] = tuple(int(v) for v in ImageStat.Stat(im).mean)  # mean colour (histograms), truncated
        out = Image.new("RGB", (c, c), geom["fill"])
        out.paste(im.crop((sx, sy, sx + lw, sy + lh)), (dx, dy))
        return out, geom

    def _load_mask_crop(self, entry, geom):
        """Object pixels (bool [c, c]) of the pseudo-mask inside the crop window; a missing, unreadable or
        empty mask is an empty mask (as official), counted in stats."""
        c = self.crop
        obj = np.zeros((c, c), dtype=bool)
        path = self._mask_path(entry)
        try:
            with Image.open(path) as m:
                m = np.asarray(m if m.mode == "L" else m.convert("L")) > 127  # [H0, W0] bool
        except FileNotFoundError:
            self.stats["missing_mask"] += 1
            return obj
        except PIL_ERRORS:
            self.stats["unreadable_mask"] += 1
            return obj
        if not m.any():
            self.stats["empty_mask"] += 1
            return obj
        if m.shape != geom.get("orig", m.shape):  # still usable: it is resampled to the scaled size
            self.stats["mask_size_mismatch"] += 1
        (th, tw), (sy, sx), (dy, dx, lh, lw) = geom["size"], geom["src"], geom["dst"]
        rows, cols = nearest_index(sy, lh, m.shape[0], th), nearest_index(sx, lw, m.shape[1], tw)
        obj[dy:dy + lh, dx:dx + lw] = m[rows[:, None], cols[None, :]]
        return obj

    def _compose(self, layers, rng):
        """Copy-paste: layer 0 is the canvas (kept whole, pad = ignore); each later layer's object pixels
        inside its paste box go to a uniform random offset, overwriting what is there."""
        c, ign = self.crop, self.ignore_index
        rgb = layers[0]["rgb"].copy()  # [c, c, 3] uint8
        sem = np.full((c, c), ign, dtype=np.int64)
        inst = np.full((c, c), -1, dtype=np.int64)  # -1: padding, never an instance id
        y0, y1, x0, x1 = layers[0]["valid"]
        sem[y0:y1, x0:x1] = layers[0]["obj"][y0:y1, x0:x1] * layers[0]["label"]
        inst[y0:y1, x0:x1] = layers[0]["obj"][y0:y1, x0:x1]
        for i, layer in enumerate(layers[1:], start=2):
            if layer["box"] is None:
                continue
            by0, by1, bx0, bx1 = layer["box"]
            bh, bw = by1 - by0, bx1 - bx0
            oy, ox = int(rng.integers(0, c - bh + 1)), int(rng.integers(0, c - bw + 1))
            sel = layer["obj"][by0:by1, bx0:bx1]  # [bh, bw] bool
            rgb[oy:oy + bh, ox:ox + bw][sel] = layer["rgb"][by0:by1, bx0:bx1][sel]
            sem[oy:oy + bh, ox:ox + bw][sel] = layer["label"]
            inst[oy:oy + bh, ox:ox + bw][sel] = i
        image = torch.from_numpy(rgb).permute(2, 0, 1).float().div_(255)  # [c, c, 3] -> [3, c, c]
        mean, std = torch.tensor(self.mean).view(3, 1, 1), torch.tensor(self.std).view(3, 1, 1)
        masks = torch.from_numpy(inst)[None] == torch.arange(1, len(layers) + 1)[:, None, None]  # [n, c, c]
        return {"image": image.sub_(mean).div_(std), "semantic": torch.from_numpy(sem), "instance_masks": masks,
                "category_ids": torch.tensor([layer["label"] for layer in layers], dtype=torch.long)}


def nearest_index(start, n, size_in, size_out):
    """Source indices of output pixels start .. start+n-1 of a nearest resize from size_in to size_out, by
    the official rule (TF.resize(..., NEAREST) on a tensor = torch's "nearest" interpolation): floor(dst *
    (in / out)) in float32, at most in - 1; only the rows or columns of the crop window are computed."""
    dst = np.arange(start, start + n)
    if size_in == size_out:
        return dst
    if size_out == 2 * size_in:  # torch's exact shortcut for a factor of 2
        return dst >> 1
    scale = np.float32(size_in) / np.float32(size_out)
    return np.minimum(np.floor(dst.astype(np.float32) * scale).astype(np.int64), size_in - 1)


def crop_window(t, c, pad_before, rng):
    """One axis of pad-then-random-crop: a scaled length t into a crop of length c. Returns (src, dst, len):
    pixels [src, src+len) of the scaled image land at [dst, dst+len) of the crop. If t < c the axis is
    padded (before or after the image) and the crop offset is 0; else the offset is uniform."""
    if t < c:
        return 0, (c - t) if pad_before else 0, t
    return int(rng.integers(0, t - c + 1)), 0, c


def paste_box(obj):
    """(y0, y1, x0, x1) of the object's box with the official EXCLUSIVE max (ymin:ymax, xmin:xmax), so
    the last object row and column are never pasted and 1-pixel-thin objects not at all. None when
    nothing would be pasted."""
    rows, cols = np.flatnonzero(obj.any(1)), np.flatnonzero(obj.any(0))
    if rows.size == 0 or rows[-1] == rows[0] or cols[-1] == cols[0]:
        return None
    return int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])


def collate_fn(items):
    """Batch items: {"image": [B, 3, H, W], "semantic": [B, H, W], "instance_masks": list of bool
    [n_b, H, W], "category_ids": list of long [n_b]} (instance counts vary per scene)."""
    return {"image": torch.stack([it["image"] for it in items]),
            "semantic": torch.stack([it["semantic"] for it in items]),
            "instance_masks": [it["instance_masks"] for it in items],
            "category_ids": [it["category_ids"] for it in items]}


# ----------------------------------------------------------------------------- preview sheet

def preview(args):
    """A sheet of scenes: images on top, their instances below (grey = ignore, i.e. padding)."""
    ds = ArchiveDataset(args.archive, args.masks_dir, crop=args.crop, seed=args.seed, norm=args.norm,
                        index_dirs=args.index_dirs)
    mean, std = torch.tensor(ds.mean).view(3, 1, 1), torch.tensor(ds.std).view(3, 1, 1)
    tiles = []
    for i in range(args.n_scenes):
        item = ds[i]
        img = (item["image"] * std + mean).clamp(0, 1).mul(255).byte().permute(1, 2, 0).numpy()  # [c, c, 3]
        ids = item["instance_masks"].float().argmax(0) + 1  # [c, c] instance id, 0 where none
        ids[~item["instance_masks"].any(0)] = 0
        colours = np.random.default_rng(0).integers(0, 256, (ds.max_n + 1, 3))
        colours[0] = 0
        overlay = colours[ids.numpy()].astype(np.uint8)
        overlay[item["semantic"].numpy() == ds.ignore_index] = 128  # grey: ignore (padding)
        tiles.append(np.concatenate([img, overlay], 0))
    common.save_image(np.concatenate(tiles, 1), args.preview, quality=90)
    print(f"wrote {args.preview} ({args.n_scenes} scenes; stats {dict(ds.stats)})")


def get_args_parser():
    p = common.ArgumentParser(description="Save a sheet of copy-paste training scenes (top: image, bottom: "
                              "instances, grey = padding) to look at what train.py will see.")
    p.add_argument("--archive", default="out/archive.json", help="Archive JSON (default %(default)s).")
    p.add_argument("--masks_dir", default="out/masks", help="Pseudo-mask folder (default %(default)s).")
    p.add_argument("--index_dirs", nargs="*", default=None, help="Where the archive's images live, if they moved.")
    p.add_argument("--preview", default="out/scenes.jpg", help="Where to save the sheet (default %(default)s).")
    p.add_argument("--crop", type=common.number(int, 32, what="--crop"), default=384,
                   help="Scene size in pixels (default %(default)s).")
    p.add_argument("--norm", default="imagenet", choices=sorted(common.NORMS), help="Image normalisation.")
    p.add_argument("--n_scenes", type=common.number(int, 1, what="--n_scenes"), default=50,
                   help="Number of scenes to show (default %(default)s).")
    p.add_argument("--seed", type=int, default=0, help="Dataset seed (default %(default)s).")
    return p


def check_args(args):
    """Every flag checked before any work; returns args."""
    for flag, want_dir in (("archive", False), ("masks_dir", True), ("preview", False)):
        path = getattr(args, flag)
        if os.path.exists(path) and os.path.isdir(path) != want_dir:
            raise common.UserError(f"--{flag} {path!r} is {'a file, not a folder' if want_dir else 'a folder, not a file'}")
    for d in args.index_dirs or []:
        if not os.path.isdir(d):
            raise common.UserError(f"--index_dirs {d!r} is not a folder")
    if not args.preview.lower().endswith((".jpg", ".jpeg", ".png")):
        raise common.UserError(f"--preview {args.preview!r} is not an image name: end it in .jpg or .png")
    return args


def main():
    args = check_args(get_args_parser().parse_args())
    common.print_config(vars(args))
    preview(args)


if __name__ == "__main__":
    common.run_main(main)
