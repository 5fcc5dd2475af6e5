"""toy/world.py: the procedurally generated world of toy.py (64x64 images of ten shape categories).

Library file, no side effects at import. Three disjoint, seeded streams (numpy, vectorised):
  (a) caption_batch  captioned images for pre-training the tiny CLIP, the way CLIP's web data is
  (b) index_pool     the unlabelled index pool (one large object per image; labels go to a hidden file)
  (c) eval_scenes    2-6 instances from 1-3 categories, repeats and occlusion, VOC2012 layout on disk
write_world() writes (b) and (c) under a folder; toy.py drives everything. Each category has a typical
hue 70% of the time, so the tiny CLIP learns mostly colour (a tiny ViT learns shape too slowly for a
minutes budget).

    python -c "from toy import world; print(world.write_world('w', seed=0, n_index=100, n_eval=10))"
"""
if __name__ == "__main__":  # a library file: say what it is rather than fail on the imports below
    raise SystemExit(print(__doc__))
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import common
import visualize
from categories import TEMPLATES
SIZE = 64
CATEGORIES = ["circle", "square", "triangle", "star", "ring", "cross", "moon", "heart", "bar", "arrow"]
HUES = np.arange(len(CATEGORIES)) / len(CATEGORIES)  # each category's typical hue, 36 degrees apart
P_TYPICAL_HUE = 0.7
COLOUR_WORDS = ["red", "orange", "yellow", "lime", "green", "mint", "cyan", "azure", "blue", "violet",
                "magenta", "pink"]  # one per 30 degrees of hue
TEXTURES = ["plain", "striped", "dotted", "checkered", "shaded"]
BACKGROUND_CAPTIONS = ["a photo of the background.", "a photo of a background.", "background",
                       "the background.", "an empty background.", "a photo of nothing."]


# ----------------------------------------------------------------------------- colour and shapes

def hsv_to_rgb(h, s, v):
    """Vectorised HSV -> RGB; h, s, v are same-shape arrays in [0, 1]. Returns [..., 3]."""
    i = np.floor(h * 6.0) % 6
    f = h * 6.0 - np.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    r = np.choose(i.astype(int), [v, q, p, p, t, v])
    g = np.choose(i.astype(int), [t, v, v, q, p, p])
    b = np.choose(i.astype(int), [p, p, t, v, v, q])
    return np.stack([r, g, b], -1)


def shape_inside(cat, u, v):
    """Which points (u, v) of an object's own frame (unit ~ its radius) lie inside the shape of
    category `cat` ([N] ints); u, v: [N, H, W]. Returns bool [N, H, W]."""
    out = np.zeros(u.shape, bool)
    r, phi = np.hypot(u, v), np.arctan2(v, u)
    tests = {
        "circle": lambda u, v, r, a: r < 1.0,
        "square": lambda u, v, r, a: np.maximum(np.abs(u), np.abs(v)) < 0.78,
        "triangle": lambda u, v, r, a: (v < 0.5) & (np.sqrt(3) * u - v < 1.0) & (-np.sqrt(3) * u - v < 1.0),
        "star": lambda u, v, r, a: r < 0.42 + 0.58 * np.abs(np.cos(2.5 * a)) ** 3,
        "ring": lambda u, v, r, a: (r < 1.0) & (r > 0.58),
        "cross": lambda u, v, r, a: ((np.abs(u) < 0.3) & (np.abs(v) < 1.0)) | ((np.abs(v) < 0.3) & (np.abs(u) < 1.0)),
        "moon": lambda u, v, r, a: (r < 1.0) & (np.hypot(u - 0.55, v) > 0.8),
        "heart": lambda u, v, r, a: ((1.1 * u) ** 2 + (1.1 * v) ** 2 - 1) ** 3 + (1.1 * u) ** 2 * (1.1 * v) ** 3 < 0,
        "bar": lambda u, v, r, a: (np.abs(u) < 1.0) & (np.abs(v) < 0.32),
        "arrow": lambda u, v, r, a: ((u > -1.0) & (u < 0.15) & (np.abs(v) < 0.2))
        | ((u >= 0.15) & (u < 1.0) & (np.abs(v) < 0.7 * (1.0 - u))),
    }
    for c, name in enumerate(CATEGORIES):
        idx = cat == c
        if idx.any():
            out[idx] = tests[name](u[idx], v[idx], r[idx], phi[idx])
    return out


def object_frame(n, cx, cy, radius, theta, aspect):
    """Pixel grid -> each object's own rotated, scaled frame. All args [n]; returns u, v [n, S, S]."""
    ys, xs = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    dx, dy = xs[None] - cx[:, None, None], ys[None] - cy[:, None, None]
    c, s = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
    u = (c * dx + s * dy) / (radius * aspect)[:, None, None]
    v = (-s * dx + c * dy) / (radius / aspect)[:, None, None]
    return u, v


def sample_objects(rng, cat, radius_range, margin=0.6):
    """Random pose and appearance for objects of the given categories ([n] ints)."""
    n = len(cat)
    radius = rng.uniform(*radius_range, n)
    lo, hi = margin * radius, SIZE - margin * radius
    typical = rng.random(n) < P_TYPICAL_HUE
    hue = np.where(typical, HUES[cat] + rng.uniform(-0.025, 0.025, n), rng.random(n)) % 1.0
    return {"cat": cat, "radius": radius, "cx": rng.uniform(lo, hi), "cy": rng.uniform(lo, hi),
            "theta": rng.uniform(0, 2 * np.pi, n), "aspect": rng.uniform(0.85, 1.18, n),
            "hue": hue, "sat": rng.uniform(0.65, 1.0, n), "val": rng.uniform(0.7, 1.0, n),
            "texture": rng.integers(0, len(TEXTURES), n), "freq": rng.uniform(2.5, 5.0, n)}


def render_objects(rng, obj):
    """Masks bool [n, S, S] and colours float [n, S, S, 3] of sampled objects (fill textures in
    the object's own frame, so stripes rotate with it)."""
    n = len(obj["cat"])
    u, v = object_frame(n, obj["cx"], obj["cy"], obj["radius"], obj["theta"], obj["aspect"])
    mask = shape_inside(obj["cat"], u, v)
    f = obj["freq"][:, None, None]
    tex = obj["texture"][:, None, None]
    pattern = np.select(
        [tex == 1, tex == 2, tex == 3, tex == 4],
        [np.sin(f * u * 3) > 0, (np.sin(f * u * 3) * np.sin(f * v * 3)) > 0.4,
         (np.sin(f * u * 2) * np.sin(f * v * 2)) > 0, np.zeros_like(u, bool)], False)
    shade = np.where(pattern, 0.55, 1.0)
    shade = np.where(tex == 4, 0.6 + 0.4 * np.clip((u + 1) / 2, 0, 1), shade)  # "shaded": a ramp
    # HSV colours are linear in V, so the texture scales one colour per object
    col = hsv_to_rgb(obj["hue"], obj["sat"], obj["val"])  # [n, 3]
    return mask, col[:, None, None, :] * shade[..., None]


def render_backgrounds(rng, n):
    """Cluttered, mostly desaturated backgrounds float [n, S, S, 3]: colour clouds, gradients,
    stripes/checker, distractor blobs, noise."""
    g = int(rng.integers(3, 7))
    cloud = hsv_to_rgb(rng.random((n, g, g)), rng.uniform(0, 0.35, (n, g, g)), rng.uniform(0.25, 0.9, (n, g, g)))
    cloud = F.interpolate(torch.from_numpy(cloud).permute(0, 3, 1, 2).float(), size=(SIZE, SIZE),
                          mode="bicubic", align_corners=False)  # [n, g, g, 3] -> [n, 3, S, S]
    img = cloud.permute(0, 2, 3, 1).numpy().clip(0, 1)  # [n, 3, S, S] -> [n, S, S, 3]
    ys, xs = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    a = rng.uniform(0, 2 * np.pi, n)[:, None, None]
    ramp = np.cos(a) * xs[None] + np.sin(a) * ys[None]  # [n, S, S]
    img = img * (1 + rng.uniform(-0.4, 0.4, n)[:, None, None, None] * (ramp[..., None] - 0.5))
    f = rng.uniform(6, 20, n)[:, None, None]
    kind = rng.integers(0, 3, n)[:, None, None]  # 0 none, 1 stripes, 2 checker
    pat = np.where(kind == 1, np.sin(f * (np.cos(a) * xs + np.sin(a) * ys)) > 0,
                   (np.sin(f * xs) * np.sin(f * ys)) > 0)
    img = img * np.where((kind > 0) & pat, 0.85, 1.0)[..., None]
    for _ in range(4):  # distractor blobs: small, weakly saturated ellipses
        on = rng.random(n) < 0.5
        blob = {"cat": np.zeros(n, int), "radius": rng.uniform(1.5, 5, n), "cx": rng.uniform(0, SIZE, n),
                "cy": rng.uniform(0, SIZE, n), "theta": rng.uniform(0, np.pi, n), "aspect": rng.uniform(0.6, 1.6, n)}
        u, v = object_frame(n, blob["cx"], blob["cy"], blob["radius"], blob["theta"], blob["aspect"])
        m = (np.hypot(u, v) < 1) & on[:, None, None]
        col = hsv_to_rgb(rng.random(n), rng.uniform(0, 0.45, n), rng.uniform(0.2, 0.95, n))  # [n, 3]
        img = np.where(m[..., None], col[:, None, None, :], img)
    return img


def finish(img, rng):
    """Add sensor noise and quantise float [n, S, S, 3] -> uint8."""
    img = img + rng.normal(0, rng.uniform(0.01, 0.04), img.shape[:1])[:, None, None, None] * rng.standard_normal(img.shape)
    return (img.clip(0, 1) * 255 + 0.5).astype(np.uint8)


def render_scenes(rng, cats, radius_range, margin=0.6):
    """Paint objects in slot order (later slots occlude earlier ones).
    cats: int [n, m] with -1 for an empty slot. Returns images uint8 [n, S, S, 3], instance map
    uint8 [n, S, S] (slot j -> id j + 1, 0 = background) and the objects' attributes per slot."""
    n, m = cats.shape
    img = render_backgrounds(rng, n)
    inst = np.zeros((n, SIZE, SIZE), np.uint8)
    attrs = []
    for j in range(m):
        on = cats[:, j] >= 0
        obj = sample_objects(rng, np.where(on, cats[:, j], 0), radius_range, margin)
        mask, rgb = render_objects(rng, obj)
        mask &= on[:, None, None]
        img = np.where(mask[..., None], rgb, img)
        inst[mask] = j + 1
        attrs.append(obj)
    return finish(img, rng), inst, attrs


# ----------------------------------------------------------------------------- the three streams

def caption_batch(rng, n, p_background=0.1):
    """Stream (a): captioned images for CLIP pre-training, like web alt-text: a template with the
    category name, sometimes with colour and texture words; some object-free images captioned
    as background so that the word means something to the tiny CLIP."""
    bg = rng.random(n) < p_background
    cats = rng.integers(0, len(CATEGORIES), n)
    cats = np.where(bg, -1, cats)[:, None]
    imgs, _, attrs = render_scenes(rng, cats, (10, 24))
    caps = []
    for i in range(n):
        if bg[i]:
            caps.append(BACKGROUND_CAPTIONS[rng.integers(len(BACKGROUND_CAPTIONS))])
            continue
        words = [CATEGORIES[cats[i, 0]]]
        if rng.random() < 0.5:
            t = TEXTURES[attrs[0]["texture"][i]]
            if rng.random() < 0.5 and t != "plain":
                words.insert(0, t)
            words.insert(0, COLOUR_WORDS[int(round(attrs[0]["hue"][i] * 12)) % 12])
        phrase = " ".join(words)
        r = rng.random()
        caps.append(f"a photo of a {phrase}." if r < 0.4 else phrase if r < 0.6
                    else TEMPLATES[rng.integers(len(TEMPLATES))].format(phrase))
    return imgs, caps


def index_pool(rng, n):
    """Stream (b): the unlabelled index pool: one large object per image, 10% with a second,
    smaller object of another category. Returns images, instance maps and the (hidden) label of
    each image's main object."""
    main = rng.integers(0, len(CATEGORIES), n)
    second = (main + rng.integers(1, len(CATEGORIES), n)) % len(CATEGORIES)
    cats = np.stack([main, np.where(rng.random(n) < 0.1, second, -1)], 1)
    imgs, inst, _ = render_scenes(rng, cats, (12, 24))
    return imgs, inst, main


def eval_scenes(rng, n, min_area=12):
    """Stream (c): scenes with 2-6 instances from 1-3 categories, repeats and occlusion.
    An instance occluded down to fewer than `min_area` pixels leaves the ground truth; scenes
    left with fewer than two instances are redrawn; the pixels of a dropped sliver are void (255)
    as in VOC. Returns images, instance maps (ids 1..k, consecutive) and class maps (category
    index + 1)."""
    imgs = np.zeros((n, SIZE, SIZE, 3), np.uint8)
    inst = np.zeros((n, SIZE, SIZE), np.uint8)
    sem = np.zeros((n, SIZE, SIZE), np.uint8)
    todo = np.arange(n)
    while len(todo):
        k = len(todo)
        n_inst = rng.integers(2, 7, k)
        pool = np.stack([rng.permutation(len(CATEGORIES))[:3] for _ in range(k)])  # [k, 3]
        n_cat = rng.integers(1, 4, k)
        pick = (rng.random((k, 6)) * n_cat[:, None]).astype(int)  # which of the scene's categories
        cats = np.where(np.arange(6)[None] < n_inst[:, None], np.take_along_axis(pool, pick, 1), -1)
        im, ins, _ = render_scenes(rng, cats, (5, 13), margin=0.2)
        ok = np.zeros(k, bool)
        for i in range(k):
            new_inst, new_sem, next_id = np.zeros_like(ins[i]), np.zeros_like(ins[i]), 1
            for j in range(6):
                m = ins[i] == j + 1
                if m.sum() >= min_area:
                    new_inst[m], new_sem[m], next_id = next_id, cats[i, j] + 1, next_id + 1
                else:  # a sliver of an occluded object: VOC's "void" (255), ignored by the metrics
                    new_inst[m], new_sem[m] = 255, 255
            ok[i] = next_id - 1 >= 2
            imgs[todo[i]], inst[todo[i]], sem[todo[i]] = im[i], new_inst, new_sem
        todo = todo[~ok]
    return imgs, inst, sem


# ----------------------------------------------------------------------------- writing the world

def save_palette_png(arr, path):
    im = Image.fromarray(arr.astype(np.uint8), mode="P")
    im.putpalette(visualize.palette(256).reshape(-1).tolist())  # the VOC colour map
    common.save_image(im, path)


def eval_scene_names(world_dir):
    """The evaluation scenes' names, in order (the VOC2012 layout's trainval list that write_world writes)."""
    with open(os.path.join(world_dir, "VOC2012", "ImageSets", "Segmentation", "trainval.txt")) as f:
        return f.read().split()


def write_world(world_dir, seed, n_index, n_eval, chunk=500):
    """Write the index pool (anonymous JPEGs; labels and masks to hidden/) and the evaluation
    scenes in the VOC2012 layout; returns a summary dict."""
    names = ["background"] + CATEGORIES
    with common.atomic_path(os.path.join(world_dir, "categories.txt")) as tmp, open(tmp, "w") as f:
        f.write("\n".join(names) + "\n")
    rng = np.random.default_rng([seed, 2])  # stream (b); (a) uses [seed, 1], (c) [seed, 3]
    files, labels, insts = [], [], []
    for start in range(0, n_index, chunk):
        imgs, inst, lab = index_pool(rng, min(chunk, n_index - start))
        for i in range(len(imgs)):
            files.append(f"img_{start + i:05d}.jpg")  # names carry no label
            common.save_image(imgs[i], os.path.join(world_dir, "index", files[-1]), quality=95)
        labels += lab.tolist()
        insts.append(inst)
    hidden = os.path.join(world_dir, "hidden")
    common.save_json({"categories": CATEGORIES, "files": files, "labels": labels},
                     os.path.join(hidden, "index_labels.json"), indent=None)
    common.save_npy(np.concatenate(insts), os.path.join(hidden, "index_instances.npy"))

    voc = os.path.join(world_dir, "VOC2012")
    imgs, inst, sem = eval_scenes(np.random.default_rng([seed, 3]), n_eval)
    ids = [f"2026_{i:06d}" for i in range(n_eval)]
    for i, name in enumerate(ids):
        common.save_image(imgs[i], os.path.join(voc, "JPEGImages", name + ".jpg"), quality=95)
        save_palette_png(sem[i], os.path.join(voc, "SegmentationClass", name + ".png"))
        save_palette_png(inst[i], os.path.join(voc, "SegmentationObject", name + ".png"))
    half = n_eval // 2  # nothing trains on these; the split only mirrors VOC's files
    for split, part in (("train", ids[:half]), ("val", ids[half:]), ("trainval", ids)):
        with common.atomic_path(os.path.join(voc, "ImageSets", "Segmentation", split + ".txt")) as tmp:
            with open(tmp, "w") as f:
                f.write("\n".join(part) + "\n")
    n_inst = [len(set(np.unique(x).tolist()) - {0, 255}) for x in inst]
    return {"index_images": n_index, "eval_scenes": n_eval, "eval_instances": int(sum(n_inst)),
            "instances_per_scene": round(float(np.mean(n_inst)), 2)}
