"""toy.py: the whole ZUTIS pipeline learns, end to end, on a laptop CPU in minutes.

A procedurally generated world (64x64 images of ten shape categories on cluttered backgrounds)
stands in for the web, ImageNet/PASS and VOC. A tiny CLIP is pre-trained from scratch on a
captioned stream of it, then the real stages run through their real entry points:

    world     -> toy_out/world/{index/, VOC2012/, categories.txt, hidden/}
    tiny CLIP -> toy_out/tiny_clip.pt (a plain CLIP state dict: clip_model.load reads it)
    build_archive.py --arch toy_out/tiny_clip.pt --k 200          -> toy_out/archive/archive.json
    pseudo_label.py --saliency boundary                            -> toy_out/masks/
    train.py --crop 64 ... (and --no_stop_grad for the ablation)   -> toy_out/train*/ckpt.pt
    evaluate.py --bench voc (--nms hard / none; --model maskclip)  -> toy_out/eval_*/metrics.json
    -> toy_out/results.md (table), toy_out/results.json, toy_out/grid.png (GT | MaskCLIP | ZUTIS)

Nothing the generator knows (labels, masks) reaches a training stage: the index pool is a folder
of anonymous JPEGs, the labels live in toy_out/world/hidden/ and are read only to report
zero-shot accuracy, retrieval precision and pseudo-mask IoU. The tiny CLIP is mostly a colour
detector: each category has a typical hue 70% of the time (a tiny ViT learns shape too slowly
for a minutes budget).

Commands (CPU only; a GPU is used by the stages when present):
    python toy.py                       # full run, <= 10 min on 2 CPU cores
    python toy.py --quick               # CI run, <= 5 min
    python toy.py --quick --check_floors README.md   # exit 1 if a metric is below its floor
Stages are cached under --out_dir (a stage reruns only when its settings change).

Measured (full run, seeds 0/1/2, percent): tiny-CLIP zero-shot 68/70/69, precision@50 77/79/79,
pseudo-mask IoU 84/85/84, ZUTIS mIoU 24.4/28.9/27.7 vs MaskCLIP 5.4/8.3/9.2, AP50 (NMS) 2.3/1.8/2.5;
~760 CPU-seconds of single-thread work per full run, ~420 for --quick (README: the whole table).

References: ZUTIS (Shin, Albanie, Xie 2023) section 4; issue 7 of this repository.
"""
import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np

import common
import visualize

HERE = os.path.dirname(os.path.abspath(__file__))
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
    import torch
    import torch.nn.functional as F
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
    from categories import TEMPLATES
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
    from PIL import Image
    im = Image.fromarray(arr.astype(np.uint8), mode="P")
    im.putpalette(visualize.palette(256).reshape(-1).tolist())  # the VOC colour map
    common.save_image(im, path)


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


# ----------------------------------------------------------------------------- tiny CLIP

def tiny_clip(context_length=16):
    """A CLIP small enough to pre-train on 2 CPU cores in minutes. The text context is 16 tokens
    (our captions are short); clip_model.build_model reads it back from the tensor shapes."""
    import clip_model
    return clip_model.CLIP(embed_dim=128, image_resolution=SIZE, vision_layers=4, vision_width=128,
                           vision_patch_size=8, context_length=context_length, vocab_size=49408,
                           transformer_width=128, transformer_heads=2, transformer_layers=3)


def to_clip_input(imgs):
    """uint8 [B, S, S, 3] -> CLIP-normalised float [B, 3, S, S] (CLIP's own preprocess at 64 px)."""
    import torch
    import clip_model
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255  # [B, S, S, 3] -> [B, 3, S, S]
    mean, std = torch.tensor(clip_model.CLIP_MEAN), torch.tensor(clip_model.CLIP_STD)
    return (x - mean[:, None, None]) / std[:, None, None]


def pretrain_clip(path, seed, steps, batch_size=128, lr=1e-3, warmup=30, log_every=25):
    """Contrastive pre-training (symmetric InfoNCE, learned temperature) on freshly generated
    captioned images, like CLIP's web data; saved as a plain state dict (clip_model.load reads it)."""
    import torch
    import torch.nn.functional as F
    import clip_model
    torch.manual_seed(seed)
    model = tiny_clip().train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98), eps=1e-6)
    rng = np.random.default_rng([seed, 1])  # stream (a)
    labels = torch.arange(batch_size)
    t0 = time.time()
    for step in range(steps):
        # linear warm-up then cosine decay to zero
        f = (step + 1) / warmup if step < warmup else 0.5 * (1 + np.cos(np.pi * (step - warmup) / max(1, steps - warmup)))
        for g in opt.param_groups:
            g["lr"] = lr * f
        imgs, caps = caption_batch(rng, batch_size)
        tokens = clip_model.tokenize(caps, context_length=model.context_length, truncate=True)
        logits_i, logits_t = model(to_clip_input(imgs), tokens)
        loss = (F.cross_entropy(logits_i, labels) + F.cross_entropy(logits_t, labels)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, np.log(100))  # CLIP's cap on the temperature
        if step % log_every == 0 or step == steps - 1:
            el = time.time() - t0
            print(f"  clip step {step:4d}/{steps} loss {loss.item():.3f} scale {model.logit_scale.exp().item():5.1f} "
                  f"{el / (step + 1):.2f} s/step, ETA {el / (step + 1) * (steps - step - 1):.0f} s", flush=True)
    common.save_torch(model.state_dict(), path)


def load_index(world_dir):
    """The index pool as uint8 [N, S, S, 3] with its hidden labels (reporting only)."""
    hidden = json.load(open(os.path.join(world_dir, "hidden", "index_labels.json")))
    imgs = np.stack([np.asarray(common.load_rgb(os.path.join(world_dir, "index", f))) for f in hidden["files"]])
    return imgs, np.array(hidden["labels"]), hidden["files"]


def clip_report(path, world_dir, k=50):
    """Zero-shot accuracy over the ten categories (85-template prompts, as the retrieval stage uses)
    and retrieval precision@k on the index pool, both from the hidden labels."""
    import torch
    import clip_model
    model, _ = clip_model.load(path)  # the same loader every stage uses
    imgs, labels, _ = load_index(world_dir)
    with torch.no_grad():
        emb = torch.cat([model.encode_image(to_clip_input(imgs[i:i + 256])) for i in range(0, len(imgs), 256)])
        emb = torch.nn.functional.normalize(emb, dim=-1)
        txt = clip_model.text_embeddings(model, CATEGORIES)
        bg = clip_model.text_embeddings(model, ["background"] + CATEGORIES, templates=None)
    sim = (emb @ txt.T).numpy()  # [N, K]
    acc = float((sim.argmax(1) == labels).mean())
    top = np.argsort(-sim, axis=0, kind="stable")[:k]  # [k, K]
    prec = float(np.mean([(labels[top[:, c]] == c).mean() for c in range(len(CATEGORIES))]))
    # how distinct "background" is from the categories (the MaskCLIP baseline needs it)
    bg_cos = float((bg[0] @ bg[1:].T).max())
    return {"clip_zero_shot": acc, f"clip_precision@{k}": prec, "clip_background_max_cos": bg_cos}


# ----------------------------------------------------------------------------- reporting (hidden labels)

def archive_precision(archive_path, world_dir):
    """Fraction of each category's archive entries whose hidden main label is that category."""
    arc = common.load_archive(archive_path)
    hidden = json.load(open(os.path.join(world_dir, "hidden", "index_labels.json")))
    label = dict(zip(hidden["files"], hidden["labels"]))
    prec = [np.mean([label.get(e["path"], -1) == CATEGORIES.index(c) for e in arc["archive"][c]])
            for c in CATEGORIES if arc["archive"].get(c)]
    return float(np.mean(prec)), int(arc.get("k", len(arc["archive"][CATEGORIES[0]])))


def pseudo_mask_iou(archive_path, masks_dir, world_dir):
    """Mean IoU of the pseudo-masks with the generator's foreground (all objects) per archive image."""
    from PIL import Image
    arc = common.load_archive(archive_path)
    hidden = json.load(open(os.path.join(world_dir, "hidden", "index_labels.json")))
    row = {f: i for i, f in enumerate(hidden["files"])}
    inst = np.load(os.path.join(world_dir, "hidden", "index_instances.npy"), mmap_mode="r")
    ious, missing = [], 0
    for e in common.unique_entries(arc):
        p = os.path.join(masks_dir, common.mask_relpath(arc, e))
        if not os.path.isfile(p):
            missing += 1
            continue
        pred, gt = np.asarray(Image.open(p)) > 127, inst[row[e["path"]]] > 0
        ious.append((pred & gt).sum() / max(1, (pred | gt).sum()))
    return float(np.mean(ious)) if ious else 0.0, len(ious), missing


def eval_metrics(out_dir):
    m = json.load(open(os.path.join(out_dir, "metrics.json")))
    return {k: m.get(k) for k in ("mIoU", "AP", "AP50", "AP_agn", "AP50_agn", "n_detections")}


def picture_grid(path, world_dir, clip_path, ckpt, n=6, device="cpu"):
    """Rows of evaluation scenes: image | ground truth | MaskCLIP | ZUTIS semantic | ZUTIS instances."""
    import torch
    from PIL import Image
    import clip_model
    import evaluate as E
    import model as M
    names = ["background"] + CATEGORIES
    zutis = E.ZutisSegmenter(M.load_checkpoint(ckpt, categories=names, device=device),
                             E.checkpoint_config(ckpt).get("norm", "imagenet"))
    maskclip = E.MaskCLIPSegmenter(clip_model.load(clip_path, device=device)[0], names)
    voc = os.path.join(world_dir, "VOC2012")
    ids = open(os.path.join(voc, "ImageSets", "Segmentation", "trainval.txt")).read().split()[:n]
    pal, f, rows = E.palette(256), 3, []
    for name in ids:
        pil = common.load_rgb(os.path.join(voc, "JPEGImages", name + ".jpg"))
        img = np.asarray(pil)
        gt = np.asarray(Image.open(os.path.join(voc, "SegmentationClass", name + ".png")))
        with torch.no_grad():
            pm, pz = (E.infer(s, E.image_tensor(pil)) for s in (maskclip, zutis))
        inst = np.zeros(img.shape[:2], np.int64)
        for i in np.argsort(pz["scores"].numpy()):
            if pz["scores"][i] > 0.1:  # below that the instance view is noise
                inst[pz["masks"][i].numpy()] = i + 1
        cells = [img, E.overlay(img, gt, pal, ignore=255), E.overlay(img, pm["semantic"].numpy(), pal),
                 E.overlay(img, pz["semantic"].numpy(), pal), E.overlay(img, inst, E.palette(64)[1:][::-1])]
        rows.append(np.concatenate([np.pad(E.zoom(c, f), ((2, 2), (2, 2), (0, 0)), constant_values=255) for c in cells], 1))
    grid = np.concatenate(rows, 0)
    legend = E.with_legend(np.full((1, grid.shape[1], 3), 255, np.uint8),
                           [((0, 0, 0), "columns: image | ground truth | MaskCLIP | ZUTIS semantic | ZUTIS instances (score > 0.1)")]
                           + [(pal[c], names[c]) for c in range(1, len(names))])
    common.save_image(np.concatenate([grid, legend], 0), path)


# ----------------------------------------------------------------------------- floors

FLOORS_BEGIN, FLOORS_END = "<!-- toy floors -->", "<!-- /toy floors -->"


def read_floors(path):
    """Floors from a JSON file {metric: floor} or from the table rows `| \\`metric\\` | floor |`
    between the markers <!-- toy floors --> and <!-- /toy floors --> of a markdown file."""
    if not os.path.isfile(path):
        raise common.UserError(f"floors file not found: {path!r}")
    text = open(path, encoding="utf-8").read()
    if path.endswith(".json"):
        return {k: float(v) for k, v in json.loads(text).items()}
    if FLOORS_BEGIN not in text or FLOORS_END not in text:
        raise common.UserError(f"{path} has no '{FLOORS_BEGIN}' ... '{FLOORS_END}' block of floors")
    block = text.split(FLOORS_BEGIN, 1)[1].split(FLOORS_END, 1)[0]
    floors = {m.group(1): float(m.group(2)) for m in re.finditer(r"^\|\s*`([^`]+)`\s*\|\s*(-?[\d.]+)\s*\|", block, re.M)}
    if not floors:
        raise common.UserError(f"no floor rows (| `metric` | number |) between the markers in {path}")
    return floors


def check_floors(results, floors):
    """Lines describing every metric below its floor (or missing); empty when all pass."""
    bad = []
    for k, floor in floors.items():
        v = results.get(k)
        if v is None:
            bad.append(f"{k}: missing from the results (floor {floor})")
        elif v < floor:
            bad.append(f"{k}: {v:.2f} < floor {floor}")
    return bad


# ----------------------------------------------------------------------------- the pipeline

# Budgets measured on 2 idle CPU cores (see README): full <= 10 min, quick <= 5 min.
PRESETS = {
    "full": dict(n_index=5000, n_eval=300, clip_steps=200, k=200, iters=1200, batch_size=8),
    "quick": dict(n_index=3000, n_eval=150, clip_steps=120, k=150, iters=600, batch_size=8),
}
# The segmenter for a 64 px world: decoder sized for the budget; logit scale 10 and encoder lr 1e-4
# (the official temperature 1 collapses to all-background here; 1e-5 learns a third as well);
# decoder lr 1e-3 (3e-4 learned masks ~6x slower in 500 iterations). Scenes of up to 10 images as the
# official recipe (max_n 6 gave half the AP50 at 1,500 iterations).
TRAIN_FLAGS = ["--crop", "64", "--lr", "1e-3", "--lr_encoder", "1e-4", "--logit_scale", "10", "--n_queries", "20",
               "--n_layers", "2", "--n_heads", "4", "--dim_ffn", "256", "--mlp_hidden", "128",
               "--num_workers", "0", "--log_every", "50"]


def get_args_parser():
    # --- CLI ---
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default="toy_out", help="everything goes here; finished stages are reused")
    p.add_argument("--quick", action="store_true", help="the CI run (<= 5 min on 2 cores): fewer images and steps")
    p.add_argument("--seed", type=int, default=0, help="seed of the world and of every stage")
    p.add_argument("--device", default="cpu", help="device for the stages: cpu, cuda or auto")
    p.add_argument("--clip_steps", type=int, default=None, help="tiny-CLIP pre-training steps (default: preset)")
    p.add_argument("--iters", type=int, default=None, help="segmenter training iterations (default: preset)")
    p.add_argument("--n_index", type=int, default=None, help="index pool size (default: preset)")
    p.add_argument("--n_eval", type=int, default=None, help="evaluation scenes (default: preset)")
    p.add_argument("--no_ablation", action="store_true", help="skip the no-stop-gradient training run")
    p.add_argument("--check_floors", default=None, help="README.md (rows between <!-- toy floors --> markers) or a "
                                                          "JSON {metric: floor}: exit 1 if a metric is below its floor")
    return p


class Stages:
    """Run named stages once: a stage whose settings (and upstream settings) match its marker
    file under OUT/stages/ is skipped; otherwise its outputs are removed and it runs again."""

    def __init__(self, out_dir):
        self.out_dir, self.seconds, self.cpu = out_dir, {}, {}

    def run(self, name, settings, outputs, fn):
        marker = os.path.join(self.out_dir, "stages", name + ".json")
        if os.path.isfile(marker):
            m = json.load(open(marker))
            if m["settings"] == settings and all(os.path.exists(o) for o in outputs):
                print(f"[{name}] cached ({m['seconds']:.0f} s when it ran); delete {marker} to redo it")
                self.seconds[name], self.cpu[name] = m["seconds"], m.get("cpu_seconds", 0.0)
                return m["result"]
        for o in outputs:  # stale outputs of other settings: start clean
            shutil.rmtree(o) if os.path.isdir(o) else os.remove(o) if os.path.exists(o) else None
        print(f"[{name}] running", flush=True)
        t0, c0 = time.time(), cpu_seconds()
        result = fn()
        self.seconds[name], self.cpu[name] = time.time() - t0, cpu_seconds() - c0
        common.save_json({"settings": settings, "seconds": self.seconds[name], "cpu_seconds": self.cpu[name],
                          "result": result}, marker)
        print(f"[{name}] done in {self.seconds[name]:.0f} s", flush=True)
        return result


def cpu_seconds():
    """CPU time of this process and its finished children: on a shared machine this says more
    about a stage's cost than wall time does."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def run_script(script, *args):
    """A stage through its real command line; a failure stops the toy run with one line."""
    cmd = [sys.executable, os.path.join(HERE, script), *map(str, args)]
    print("  $ " + " ".join(cmd[1:]), flush=True)
    r = subprocess.run(cmd, cwd=HERE)
    if r.returncode != 0:
        raise common.UserError(f"{script} failed with exit code {r.returncode}: {' '.join(cmd[1:])}")


def results_table(res, sec, cpu, cfg):
    pct = lambda v: "-" if v is None else f"{v:.1f}"
    z, zn, zs, mc = (res.get(k, {}) for k in ("zutis", "zutis_no_nms", "zutis_no_stop_grad", "maskclip"))
    lines = [
        f"# toy.py results (seed {cfg['seed']}, {'--quick' if cfg['quick'] else 'full run'})", "",
        "| tiny CLIP | value |", "|---|---|",
        f"| zero-shot accuracy, 10 classes (%) | {pct(res['clip_zero_shot'])} |",
        f"| retrieval precision@50 (%) | {pct(res['clip_precision@50'])} |",
        f"| archive precision@{res['archive_k']} (%) | {pct(res['archive_precision'])} |",
        f"| max cosine of 'background' to a category name | {res['clip_background_max_cos']:.2f} |",
        f"| pseudo-mask IoU vs generator masks (%, {res['pseudo_masks']} images) | {pct(res['pseudo_mask_iou'])} |", "",
        "| segmenter on the VOC-layout scenes | mIoU | AP | AP50 | AP (agn) | AP50 (agn) |", "|---|---|---|---|---|---|"]
    for label, m in (("MaskCLIP (training-free baseline)", mc), ("ZUTIS (class-wise NMS 0.3)", z),
                     ("ZUTIS, no NMS", zn), ("ZUTIS, no stop-gradient (NMS)", zs)):
        if m:
            lines.append(f"| {label} | {pct(m['mIoU'])} | {pct(m['AP'])} | {pct(m['AP50'])} | {pct(m['AP_agn'])} | {pct(m['AP50_agn'])} |")
    lines += ["", "| stage | wall time (s) | CPU time (s) |", "|---|---|---|"]
    lines += [f"| {k} | {v:.0f} | {cpu.get(k, 0):.0f} |" for k, v in sec.items()]
    lines += [f"| total | {sum(sec.values()):.0f} | {sum(cpu.values()):.0f} |", "",
              "All numbers in percent. Ground truth and hidden labels are read only here, never by a training stage."]
    return "\n".join(lines) + "\n"


def flat_results(res):
    """The metrics the floors refer to, as one flat dict (percent)."""
    out = {k: res[k] for k in ("clip_zero_shot", "clip_precision@50", "archive_precision", "pseudo_mask_iou")}
    for run in ("zutis", "zutis_no_nms", "zutis_no_stop_grad", "maskclip"):
        for k, v in res.get(run, {}).items():
            out[f"{run}_{k}"] = v
    if res.get("zutis") and res.get("maskclip"):
        out["zutis_minus_maskclip_mIoU"] = res["zutis"]["mIoU"] - res["maskclip"]["mIoU"]
    return out


def main():
    args = get_args_parser().parse_args()
    cfg = {**PRESETS["quick" if args.quick else "full"], **{k: v for k, v in vars(args).items() if v is not None}}
    floors = read_floors(args.check_floors) if args.check_floors else None  # a bad file fails before the work
    print("toy.py config:")
    common.print_config(cfg)
    out = os.path.abspath(args.out_dir)
    world, clip_path = os.path.join(out, "world"), os.path.join(out, "tiny_clip.pt")
    archive, masks = os.path.join(out, "archive"), os.path.join(out, "masks")
    cats, voc = os.path.join(world, "categories.txt"), os.path.join(world, "VOC2012")
    st, seed, dev = Stages(out), cfg["seed"], ["--device", args.device]
    t_start = time.time()

    # settings of each stage include those upstream, so a change reruns everything after it
    s_world = {"seed": seed, "n_index": cfg["n_index"], "n_eval": cfg["n_eval"]}
    info = st.run("world", s_world, [world], lambda: write_world(world, seed, cfg["n_index"], cfg["n_eval"]))
    print(f"  world: {info}")
    s_clip = {**s_world, "clip_steps": cfg["clip_steps"]}
    res = st.run("tiny_clip", s_clip, [clip_path], lambda: (pretrain_clip(clip_path, seed, cfg["clip_steps"]),
                                                             clip_report(clip_path, world))[1])
    print(f"  tiny CLIP: {res}")
    s_arc = {**s_clip, "k": cfg["k"]}
    st.run("build_archive", s_arc, [archive], lambda: run_script(
        "build_archive.py", "--index_dirs", os.path.join(world, "index"), "--categories", cats, "--arch", clip_path,
        "--k", cfg["k"], "--out_dir", archive, *dev))
    arc_json = os.path.join(archive, "archive.json")
    st.run("pseudo_label", s_arc, [masks], lambda: run_script(
        "pseudo_label.py", "--archive", arc_json, "--out_dir", masks, "--saliency", "boundary", "--num_workers", 0, *dev))

    s_train = {**s_arc, "iters": cfg["iters"], "batch_size": cfg["batch_size"], "flags": TRAIN_FLAGS}
    runs = [("train", [])] + ([] if args.no_ablation else [("train_no_stop_grad", ["--no_stop_grad"])])
    for name, extra in runs:
        st.run(name, s_train, [os.path.join(out, name)], lambda name=name, extra=extra: run_script(
            "train.py", "--arch", clip_path, "--archive", arc_json, "--masks_dir", masks, "--iters", cfg["iters"],
            "--batch_size", cfg["batch_size"], "--seed", seed, "--out_dir", os.path.join(out, name),
            "--save_every", cfg["iters"], *TRAIN_FLAGS, *extra, *dev))

    evals = [("zutis", ["--ckpt", os.path.join(out, "train", "ckpt.pt")]),
             ("zutis_no_nms", ["--ckpt", os.path.join(out, "train", "ckpt.pt"), "--nms", "none"]),
             ("maskclip", ["--model", "maskclip", "--arch", clip_path])]
    if not args.no_ablation:
        evals.append(("zutis_no_stop_grad", ["--ckpt", os.path.join(out, "train_no_stop_grad", "ckpt.pt")]))
    for name, extra in evals:
        d = os.path.join(out, "eval_" + name)
        res[name] = st.run("eval_" + name, s_train, [d], lambda d=d, extra=extra: (run_script(
            "evaluate.py", "--bench", "voc", "--data_root", voc, "--classes", cats, "--out_dir", d,
            "--save_vis", 4, *extra, *dev), eval_metrics(d))[1])

    t0, c0 = time.time(), cpu_seconds()
    res["archive_precision"], res["archive_k"] = archive_precision(arc_json, world)
    res["archive_precision"] *= 100
    iou, res["pseudo_masks"], missing = pseudo_mask_iou(arc_json, masks, world)
    res["pseudo_mask_iou"] = iou * 100
    for k in ("clip_zero_shot", "clip_precision@50"):
        res[k] = res[k] * 100
    if missing:
        print(f"  warning: {missing} archive images have no pseudo-mask")
    picture_grid(os.path.join(out, "grid.png"), world, clip_path, os.path.join(out, "train", "ckpt.pt"))
    st.seconds["report"], st.cpu["report"] = time.time() - t0, cpu_seconds() - c0
    table = results_table(res, st.seconds, st.cpu, cfg)
    flat = flat_results(res)
    with common.atomic_path(os.path.join(out, "results.md")) as tmp, open(tmp, "w") as f:
        f.write(table)
    common.save_json({"config": cfg, "metrics": flat, "seconds": st.seconds, "cpu_seconds": st.cpu,
                      "wall_s_this_run": time.time() - t_start, **common.git_info()}, os.path.join(out, "results.json"))
    print("\n" + table + f"\nwrote {out}/results.md, results.json, grid.png ({time.time() - t_start:.0f} s this run)")
    if floors is not None:
        bad = check_floors(flat, floors)
        print(f"floors ({args.check_floors}): " + ("all passed" if not bad else "FAILED:\n  " + "\n  ".join(bad)))
        if bad:
            sys.exit(1)


def _sigterm(signum, frame):
    # subprocess.run kills its child when interrupted by an exception, so turning SIGTERM into
    # KeyboardInterrupt stops the running stage too instead of leaving it orphaned.
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _sigterm)
    common.run_main(main)
