"""Shared pytest fixtures: a tiny random CLIP saved in the released state-dict format, so every
stage can be tested on CPU without downloads.

pytest.ini runs the test files in parallel processes (pytest-xdist), so each process and every script a
test starts uses one CPU thread: tiny models gain nothing from more, and extra threads on a shared
machine make them many times slower."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

import clip_model
import common

TINY = dict(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64, vision_patch_size=8,
            context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1, transformer_layers=2)


def make_tiny_clip(seed=0, **overrides):
    torch.manual_seed(seed)
    return clip_model.CLIP(**{**TINY, **overrides}).eval()


@pytest.fixture(scope="session")
def tiny_clip_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "tiny_clip.pt"
    torch.save(make_tiny_clip().state_dict(), path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_clip(tiny_clip_path):
    return clip_model.load(tiny_clip_path)[0]


# ----------------------------------------------------------------------------- generated data on disk
# The one writer of each on-disk format the tests need (import them: `from conftest import write_archive`).

def save_archive(root, archive, images, masks=(), index_dir="images", quality=95):
    """A retrieval archive in common.py's format under `root`: `images` {relative path: uint8 array, or
    bytes written as they are (an unreadable file)} under root/<index_dir>; `masks` {relative path: uint8
    array} as pseudo-masks at common.mask_relpath under root/masks; `archive` {category: [relative path]}
    (a path may appear under several categories); JPEGs at `quality`. -> (archive json path, masks dir)."""
    img_dir, masks_dir = os.path.join(root, index_dir), os.path.join(root, "masks")
    os.makedirs(img_dir, exist_ok=True)
    for rel, content in images.items():
        path = os.path.join(img_dir, rel)
        if isinstance(content, bytes):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(content)
        else:
            common.save_image(content, path, **({"quality": quality} if rel.endswith(".jpg") else {}))
    for rel, mask in dict(masks).items():
        common.save_image(mask, os.path.join(masks_dir, common.mask_relpath({"index_dirs": [img_dir]},
                                                                            {"dir": 0, "path": rel})))
    arc = {"arch": "test", "k": 0, "index_dirs": [index_dir], "categories": ["background"] + list(archive),
           "archive": {c: [{"path": rel, "dir": 0, "score": 0.5} for rel in paths] for c, paths in archive.items()}}
    common.save_json(arc, os.path.join(root, "archive.json"))
    return os.path.join(root, "archive.json"), masks_dir


def write_archive(root, spec, size=(120, 90)):
    """An archive of small JPEGs whose object (an ellipse) is white on black, so that image / mask
    alignment can be checked. spec: {category: [(name, kind)]}, kind "ok", "missing" (no pseudo-mask),
    "empty" (an all-zero mask), "corrupt" (an unreadable image), "gray" (a single-channel JPEG),
    "small_mask" (a pseudo-mask at half the image size) or "dup:<cat>/<name>" (the same image as another
    category's entry). -> (archive json path, masks dir)."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(0)
    archive, images, masks = {}, {}, {}
    for cat, items in spec.items():
        archive[cat] = []
        for name, kind in items:
            rel = kind[4:] + ".jpg" if kind.startswith("dup:") else f"{cat}/{name}.jpg"
            archive[cat].append(rel)
            if kind.startswith("dup:"):
                continue
            cy, cx = rng.uniform(0.35, 0.65) * h, rng.uniform(0.35, 0.65) * w
            mask = (((yy - cy) / (h / 4)) ** 2 + ((xx - cx) / (w / 4)) ** 2 < 1).astype(np.uint8) * 255
            images[rel] = (b"\xff\xd8 not a jpeg" if kind == "corrupt" else mask if kind == "gray"
                           else np.repeat(mask[..., None], 3, 2))
            if kind in ("ok", "corrupt", "gray", "small_mask"):
                masks[rel] = mask[::2, ::2] if kind == "small_mask" else mask
            elif kind == "empty":
                masks[rel] = np.zeros_like(mask)
    return save_archive(root, archive, images, masks)


def write_voc(root, scenes, n_train):
    """A PASCAL VOC 2012 layout under `root` (the VOC2012 folder): scenes [(name, rgb uint8 [H, W, 3],
    class ids uint8 [H, W], instance ids uint8 [H, W])], the first n_train in train.txt, the rest in
    val.txt; JPEGImages/*.jpg and palette PNGs in SegmentationClass/ and SegmentationObject/. -> the names."""
    import visualize
    os.makedirs(f"{root}/ImageSets/Segmentation", exist_ok=True)
    names = [s[0] for s in scenes]
    for split, part in (("train", names[:n_train]), ("val", names[n_train:])):
        with open(f"{root}/ImageSets/Segmentation/{split}.txt", "w") as f:
            f.write("".join(n + "\n" for n in part))
    for name, rgb, cls, obj in scenes:
        common.save_image(rgb, f"{root}/JPEGImages/{name}.jpg", quality=95)
        for a, sub in ((cls, "SegmentationClass"), (obj, "SegmentationObject")):
            im = Image.fromarray(a.astype(np.uint8), mode="P")
            im.putpalette(visualize.palette(256).ravel().tolist())
            common.save_image(im, f"{root}/{sub}/{name}.png")
    return names
