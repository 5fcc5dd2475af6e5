"""Every command of docs/reproduce.md, run end to end on CPU.

The test writes, in a temporary working directory, every benchmark and index set in exactly the
folder layout the docs and benchmarks.py expect (a few tiny images each), then runs each ```bash
block of docs/reproduce.md command by command, in the order of its sections. Only what cannot work on
a CPU without downloads is changed, by appending flags (argparse keeps the last value):
    every script      --device cpu
    CLIP archs        a tiny random CLIP saved in the released state-dict format (conftest.py)
    pseudo_label.py   a random SelfMask of the released shapes (official file format) at a 32 px working size
    train.py          2 iterations, batch 2, crop 64, a one-layer decoder with 4 queries
    official:<name>   the checkpoint the COCO chain trained with the same architecture name
So on a real machine only the data and the device differ.

    python -m pytest -q -m slow tests/test_reproduce.py
"""
import json
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import categories
import evaluate
import model
import selfmask
import conftest
from conftest import make_tiny_clip

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(HERE, "docs", "reproduce.md")
H, W = 32, 48  # every generated image
TRAIN_TINY = ["--iters", "2", "--batch_size", "2", "--crop", "64", "--num_workers", "0",
              "--model", "n_queries=4", "n_layers=1", "dim_ffn=32", "mlp_hidden=16"]


# ----------------------------------------------------------------------------- the document

def doc_sections(path=DOC):
    """[(heading, [command, ...]), ...] in document order: the lines of the ```bash blocks under each
    heading, comments and blank lines dropped."""
    sections, heading, block = [], None, None
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if block is not None:
                if line.startswith("```"):
                    sections[-1][1].extend(block)
                    block = None
                elif line.strip() and not line.lstrip().startswith("#"):
                    block.append(line.strip())
            elif line.startswith("```bash"):
                if not sections or sections[-1][0] != heading:
                    sections.append((heading, []))
                block = []
            elif line.startswith("#"):
                heading = line.lstrip("#").strip()
    return [(h, cmds) for h, cmds in sections if cmds]


SECTIONS = doc_sections()
TRAINED_FIRST = [s for s in SECTIONS if any("train.py" in c for c in s[1])] + \
                [s for s in SECTIONS if not any("train.py" in c for c in s[1])]  # official rows need a trained stand-in


def flag(argv, name, default=None):
    """The last value of --name in argv (argparse semantics)."""
    vals = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == name]
    return vals[-1] if vals else default


# ----------------------------------------------------------------------------- generated data

def photo(seed, box=True):
    """A tiny photo-like image: a noisy background with one brighter rectangle (something salient)."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 80, (H, W, 3), dtype=np.uint8)
    if box:
        a[6:24, 10:34] = rng.integers(120, 255, 3, dtype=np.uint8)
    return a


def save_img(path, seed, box=True):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(photo(seed, box)).save(path, quality=95)


def save_png(a, path, mode=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(a.astype(np.uint8), mode).save(path)


def box_mask():
    m = np.zeros((H, W), bool)
    m[6:24, 10:34] = True
    return m


def polygon(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def write_index_sets(root):
    for i, wnid in enumerate(("n01440764", "n01443537", "n02084071")):
        for j in range(2):
            save_img(f"{root}/ImageNet2012/train/{wnid}/{wnid}_{j + 1}.JPEG", 10 * i + j)
    for j in range(4):
        save_img(f"{root}/pass/images/{j:08d}.jpg", 100 + j)


def write_voc(root):
    scenes = []
    for k, n in enumerate(["2007_000032", "2007_000039", "2008_000002"]):
        cls, obj = np.zeros((H, W), np.uint8), np.zeros((H, W), np.uint8)
        cls[6:24, 10:34], obj[6:24, 10:34] = categories.VOC.index("person") if k else categories.VOC.index("dog"), 1
        cls[5, 9:35] = obj[5, 9:35] = 255  # VOC's void outline
        scenes.append((n, photo(200 + k), cls, obj))
    conftest.write_voc(root, scenes, n_train=2)


def coco_json(images, cat_of):
    """A COCO instances file: one polygon object (the image's rectangle) per image."""
    return {"images": [{"id": i, "file_name": fn, "height": H, "width": W} for i, fn in images],
            "annotations": [{"id": k + 1, "image_id": i, "category_id": cat_of[i], "iscrowd": 0,
                             "segmentation": polygon(10, 6, 34, 24), "area": 24.0 * 18, "bbox": [10, 6, 24, 18]}
                            for k, (i, _) in enumerate(images)],
            "categories": [{"id": c, "name": n} for c, n in zip(categories.COCO_IDS[1:], categories.COCO[1:])]}


def cat_id(name):
    return categories.COCO_IDS[categories.COCO.index(name)]


def write_coco2017(root):
    images = [(139, "000000000139.jpg"), (285, "000000000285.jpg")]
    cat_of = {139: cat_id("person"), 285: cat_id("bear")}
    for k, (i, fn) in enumerate(images):
        save_img(f"{root}/val2017/{fn}", 300 + k)
        m = np.full((H, W), 120, np.uint8)  # a stuff class: background
        m[box_mask()] = cat_of[i] - 1        # COCO-Stuff stores COCO id - 1
        m[0, :] = 255                        # unlabeled
        save_png(m, f"{root}/stuffthingmaps_trainval2017/val2017/{fn[:-4]}.png")
    os.makedirs(f"{root}/annotations", exist_ok=True)
    with open(f"{root}/annotations/instances_val2017.json", "w") as f:
        json.dump(coco_json(images, cat_of), f)


def write_coco20k(root):
    ids = (9, 25, 30, 34)
    images = [(i, f"COCO_train2014_{i:012d}.jpg") for i in ids]
    cat_of = {9: cat_id("person"), 25: cat_id("cat"), 30: cat_id("dog"), 34: cat_id("airplane")}  # cat, airplane unseen
    for k, (i, fn) in enumerate(images):
        save_img(f"{root}/train2014/{fn}", 400 + k)
    save_img(f"{root}/train2014/COCO_train2014_000000000049.jpg", 499)  # not in COCO-20K
    os.makedirs(f"{root}/annotations", exist_ok=True)
    with open(f"{root}/annotations/instances_train2014.json", "w") as f:
        json.dump(coco_json(images + [(49, "COCO_train2014_000000000049.jpg")], {**cat_of, 49: cat_id("cat")}), f)
    with open(f"{root}/coco_20k_filenames.txt", "w") as f:
        f.write("".join(f"train2014/{fn}\n" for _, fn in images))


def write_coca(root):
    for c, cat in enumerate(("Accordion", "Yellow duck")):
        for j in range(2):
            save_img(f"{root}/image/{cat}/{cat}_{j}.jpg", 500 + 2 * c + j)
            save_png(box_mask() * 255, f"{root}/binary/{cat}/{cat}_{j}.png")


def write_imagenet_s(root):
    for c, (wnid, label) in enumerate((("n01440764", 1), ("n02085620", categories.IMAGENET_S919.index("chihuahua")))):
        for j in range(2):
            name = f"ILSVRC2012_val_{1000 * c + j + 1:08d}"
            save_img(f"{root}/validation/{wnid}/{name}.JPEG", 600 + 2 * c + j)
            save_img(f"{root}/test/{wnid}/ILSVRC2012_test_{1000 * c + j + 1:08d}.JPEG", 650 + 2 * c + j)
            lab = np.where(box_mask(), label, 0)
            lab[0, :] = 1000  # ignore
            save_png(np.stack([lab % 256, lab // 256, np.zeros_like(lab)], -1), f"{root}/validation-segmentation/{wnid}/{name}.png")


def write_cub(root):
    classes = ["001.Black_footed_Albatross", "017.Cardinal"]
    rels = [f"{c}/{c.split('.')[1]}_{j:04d}_{j}.jpg" for c in classes for j in range(2)]
    for k, r in enumerate(rels):
        save_img(f"{root}/images/{r}", 700 + k)
        m = box_mask() * 255
        m[0, 0] = 100  # a pixel only some annotators marked: background
        save_png(m, f"{root}/segmentations/{r[:-4]}.png")
    with open(f"{root}/images.txt", "w") as f:
        f.write("".join(f"{k + 1} {r}\n" for k, r in enumerate(rels)))
    with open(f"{root}/classes.txt", "w") as f:
        f.write("".join(f"{k + 1} {c}\n" for k, c in enumerate(classes)))
    with open(f"{root}/image_class_labels.txt", "w") as f:
        f.write("".join(f"{k + 1} {k // 2 + 1}\n" for k in range(len(rels))))
    with open(f"{root}/train_test_split.txt", "w") as f:
        f.write("".join(f"{k + 1} {int(k == 0)}\n" for k in range(len(rels))))  # image 1 train, the rest test


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The working directory: data/ in the benchmark layouts, and the tiny stand-in weights."""
    root = tmp_path_factory.mktemp("reproduce")
    d = f"{root}/data"
    write_index_sets(d)
    write_voc(f"{d}/VOCdevkit/VOC2012")
    write_coco2017(f"{d}/coco2017")
    write_coco20k(f"{d}/coco")
    write_coca(f"{d}/coca")
    write_imagenet_s(f"{d}/ImageNet-S/ImageNetS919")
    write_cub(f"{d}/CUB_200_2011")
    w = {"root": str(root), "clip": f"{root}/weights/tiny_clip.pt", "selfmask": f"{root}/weights/selfmask_random.pt",
         "trained": {}}
    os.makedirs(f"{root}/weights")
    torch.save(make_tiny_clip(transformer_width=16).state_dict(), w["clip"])  # narrow text tower: 920 x 85 prompts
    torch.manual_seed(0)
    torch.save(selfmask.SelfMask().state_dict(), w["selfmask"])  # the released shapes, random values
    return w


# ----------------------------------------------------------------------------- running a command

def cpu_argv(cmd, world):
    """A documented command line -> the argv that runs it here (see the module docstring)."""
    argv = shlex.split(cmd, comments=True)
    if argv[0] != "python":
        return argv
    script, args = argv[1], argv[2:]
    extra = ["--device", "cpu"]
    if script in ("build_archive.py", "train.py"):
        extra += ["--arch", world["clip"]]
    if script == "pseudo_label.py":
        extra += ["--selfmask", world["selfmask"], "--short_side", "32"]
    if script == "train.py":
        extra += TRAIN_TINY
        world["trained"].setdefault(flag(args, "--arch", "ViT-B/16"), os.path.join(flag(args, "--out_dir"), "ckpt.pt"))
    if script == "bench.py":  # the infer subcommand's sizes
        extra += ["--archs", world["clip"], "--sizes", f"{H}x{W}", "--classes", "voc", "--images", "2", "--warmup", "1"]
    if script == "evaluate.py":
        if flag(args, "--model") == "maskclip":
            extra += ["--arch", world["clip"]]
        ckpt = flag(args, "--ckpt", "")
        if ckpt.startswith("official:"):
            arch = model.OFFICIAL[ckpt.split(":", 1)[1]][2]
            if arch not in world["trained"]:
                pytest.skip(f"{ckpt} stands in for a {arch} checkpoint trained by an earlier section: run the whole file")
            extra += ["--ckpt", world["trained"][arch]]
    return [sys.executable, os.path.join(HERE, script)] + args + extra


def run(cmd, world):
    argv = cpu_argv(cmd, world)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(argv, cwd=world["root"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{cmd}\n-> {' '.join(argv)}\nexit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return argv


def check_result(argv, root):
    """Each evaluation lands where the docs say, with the keys the summary table names."""
    args = argv[2:]
    out = os.path.join(root, flag(args, "--out_dir"))
    if flag(args, "--split") == "test":
        pngs = [f for _, _, fs in os.walk(os.path.join(out, "test")) for f in fs if f.endswith(".png")]
        assert len(pngs) == 4, pngs
        return
    with open(os.path.join(out, "metrics.json")) as f:
        m = json.load(f)
    keys = {"coco20k": ["AP", "AP50", "AP75"], "voc": ["AP", "AP50", "AP75", "AP_agn", "AP50_agn", "AP75_agn"],
            "coco2017": ["mIoU", "pixel_acc"], "coca": ["mIoU", "pixel_acc"],
            "imagenet_s919": ["mIoU", "S", "MS", "ML", "L"], "cub": ["fg_iou"]}[flag(args, "--bench")]
    assert m["n_images"] > 0 and all(k in m for k in keys), (keys, sorted(m))


def check_recipe(argv, root):
    """The per-benchmark defaults (categories.recipe) that the docs rely on instead of flags."""
    args = argv[2:]
    spec = flag(args, "--categories", "voc")
    want = categories.recipe(spec)
    out = os.path.join(root, flag(args, "--out_dir"))
    if argv[1].endswith("build_archive.py"):
        with open(os.path.join(out, "archive.json")) as f:
            got = [os.path.normpath(os.path.join(out, d)) for d in json.load(f)["index_dirs"]]
        wanted = [os.path.normpath(os.path.join(root, d)) for d in want["index_dirs"]]
        return None if got == wanted else f"build_archive.py --categories {spec} retrieves from {got}, recipe: {wanted}"
    if argv[1].endswith("train.py"):
        cfg = evaluate.checkpoint_config(os.path.join(out, "ckpt.pt"))
        if flag(args, "--categories") is None:  # the archive's list
            with open(os.path.join(root, flag(args, "--archive"))) as f:
                spec = json.load(f)["categories"]
        want_ignore = categories.recipe(spec)["ignore_index"]
        if "ignore_index" not in cfg:
            return "train.py's checkpoint config has no ignore_index"
        if cfg["ignore_index"] != want_ignore:
            return f"train.py --categories {spec} trains with ignore id {cfg['ignore_index']}, recipe: {want_ignore}"
    return None


# ----------------------------------------------------------------------------- the test

@pytest.mark.slow
@pytest.mark.parametrize("heading,commands", TRAINED_FIRST, ids=[h for h, _ in TRAINED_FIRST])
def test_section(heading, commands, world):
    """Every command of one section runs, and each result lands where the docs say."""
    for cmd in commands:
        argv = run(cmd, world)
        if argv[1].endswith("evaluate.py"):
            check_result(argv, world["root"])
        if argv[1].endswith(("build_archive.py", "train.py")):
            gap = check_recipe(argv, world["root"])
            assert gap is None, gap  # the docs rely on these defaults instead of flags

