"""Readers of the evaluation benchmarks of the paper (section 4; zutis_facts.md
section 9). evaluate.py runs the model; this file knows the data, metrics.py the scores.

Each reader turns a benchmark's on-disk tree into a `Bench`: an ordered list of samples (dicts with
an integer "id", a "name" used for output files, and the file paths of the image and its ground
truth), a category list (label id = index, background first), the ignore index, and where the
benchmark has instances a COCO-format ground truth. Nothing here runs a model; evaluate.py does.

    bench = read_bench("voc", "data/VOCdevkit/VOC2012", split="val")
    sem = bench.load_semantic(bench.samples[0])         # int64 [H, W], ignore_index where void
    anns = bench.load_instances(bench.samples[0], sem)  # [(bool [H, W] mask, label id), ...]

The scoring rules (mIoU, size buckets, COCOeval mask AP) are in metrics.py.

Layouts (`data_root` may be the benchmark's own folder or a parent holding the standard tree):
    voc            VOCdevkit/VOC2012/{JPEGImages,SegmentationClass,SegmentationObject,ImageSets/Segmentation}
    coco2017       coco2017/{val2017, stuffthingmaps_trainval2017/val2017, annotations/instances_val2017.json}
    coco20k        coco/{train2014, annotations/instances_train2014.json, coco_20k_filenames.txt}
    coca           coca/{image,binary}/<category>/*
    imagenet_s919  ImageNet-S/ImageNetS919/{validation,validation-segmentation,test}/<wnid>/*
    cub            CUB_200_2011/{images,images.txt,classes.txt,train_test_split.txt,image_class_labels.txt}
                   with segmentations/<class folder>/*.png inside or beside CUB_200_2011

References: official datasets/coco2017.py, coca.py, imagenet_s.py, coco20k.py (behaviour only);
COCO-Stuff README (nightrome/cocostuff: stuffthingmaps store indices 0-181 = COCO id - 1, 255 =
unlabeled); LUSSeg/ImageNet-S README (class id = R + 256*G, ignore 1000); LOST's coco_20k_filenames.txt.
"""
import json
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

import categories as C
from common import UserError, list_images, save_json
from metrics import mask_to_rle

BENCHES = ("voc", "coco2017", "coco20k", "coca", "imagenet_s919", "cub")
DEFAULT_ROOTS = {"voc": "data/VOCdevkit/VOC2012", "coco2017": "data/coco2017", "coco20k": "data/coco",
                 "coca": "data/coca", "imagenet_s919": "data/ImageNet-S/ImageNetS919", "cub": "data/CUB_200_2011"}
LAYOUTS = {
    "voc": "<root>/{JPEGImages,SegmentationClass,SegmentationObject,ImageSets/Segmentation/{train,val}.txt}",
    "coco2017": "<root>/val2017/*.jpg with <root>/stuffthingmaps_trainval2017/val2017/*.png (COCO-Stuff-164k) "
                "or <root>/annotations/instances_val2017.json",
    "coco20k": "<root>/train2014/*.jpg, <root>/annotations/instances_train2014.json, "
               "<root>/coco_20k_filenames.txt (from LOST)",
    "coca": "<root>/image/<category>/*.jpg and <root>/binary/<category>/*.png",
    "imagenet_s919": "<root>/validation/<wnid>/*.JPEG, <root>/validation-segmentation/<wnid>/*.png, <root>/test/",
    "cub": "<root>/{images/,images.txt,classes.txt,train_test_split.txt,image_class_labels.txt} and "
           "segmentations/<class>/*.png in <root> or beside it",
}


@dataclass
class Bench:
    name: str
    categories: list                      # label id -> name, "background" first
    samples: list                         # dicts: id, name, image, (gt, obj, label, text)
    ignore_index: int = 255
    load_semantic: Optional[Callable] = None    # sample -> int64 [H, W] or None (no semantic GT)
    load_instances: Optional[Callable] = None   # (sample, semantic) -> [(bool mask, label)]
    coco_gt: Optional[dict] = None        # COCO-format GT from a json file (coco2017/coco20k)
    cat_ids: Optional[list] = None        # label id -> COCO category_id of predictions and GT
    max_size: Optional[int] = None        # longer side cap of the model input (ImageNet-S: 1024)
    per_image_text: bool = False          # CUB breed mode: categories = [background, sample["text"]]
    size_buckets: bool = False            # ImageNet-S S/MS/ML/L mIoU
    eval_cat_ids: Optional[list] = None   # restrict AP to these category ids (COCO-20K --unseen)
    notes: list = field(default_factory=list)


# ----------------------------------------------------------------------------- helpers

def find_root(data_root, bench, subdirs, must):
    """The first of `data_root` joined with each of `subdirs` that contains every path in `must`."""
    for sub in subdirs:
        cand = os.path.join(data_root, sub) if sub else data_root
        if all(os.path.exists(os.path.join(cand, m)) for m in must):
            return cand
    raise UserError(f"{bench} data not found under {data_root!r}. Expected layout: {LAYOUTS[bench]}")


def read_png(path):
    """A PNG as an integer array: palette/grayscale -> [H, W] of indices (palette PNGs keep indices)."""
    from PIL import Image
    with Image.open(path) as im:
        im.load()
        if im.mode in ("P", "L", "I", "I;16"):
            return np.array(im).astype(np.int64)
        return np.array(im.convert("RGB")).astype(np.int64)


def gt_annotation(mask, category_id, image_id, ann_id):
    from pycocotools import mask as mask_util
    rle = mask_to_rle(mask)
    return {"id": ann_id, "image_id": image_id, "category_id": int(category_id), "segmentation": rle,
            "area": float(mask_util.area(rle)), "bbox": [float(v) for v in mask_util.toBbox(rle)], "iscrowd": 0}


def load_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _split_lines(path):
    with open(path, encoding="utf-8") as f:
        return [line.split()[0] for line in f if line.strip()]


# ----------------------------------------------------------------------------- VOC2012

def read_voc(data_root, split=None, **_):
    split = split or "trainval"
    root = find_root(data_root, "voc", ["", "VOC2012", "VOCdevkit/VOC2012"],
                     ["JPEGImages", "SegmentationClass", "ImageSets/Segmentation"])
    sets = {"train": ["train"], "val": ["val"], "trainval": ["train", "val"]}
    if split not in sets:
        raise UserError(f"voc split must be one of {sorted(sets)}, got {split!r}")
    names = set()
    for s in sets[split]:
        p = os.path.join(root, "ImageSets/Segmentation", f"{s}.txt")
        if not os.path.isfile(p):
            raise UserError(f"missing {p}. Expected layout: {LAYOUTS['voc']}")
        names.update(_split_lines(p))
    has_obj = os.path.isdir(os.path.join(root, "SegmentationObject"))
    samples = [{"id": i, "name": n, "image": os.path.join(root, "JPEGImages", n + ".jpg"),
                "gt": os.path.join(root, "SegmentationClass", n + ".png"),
                "obj": os.path.join(root, "SegmentationObject", n + ".png") if has_obj else None}
               for i, n in enumerate(sorted(names))]
    return Bench("voc", list(C.VOC), samples, 255, load_semantic=lambda s: read_png(s["gt"]),
                 load_instances=voc_instances if has_obj else None, cat_ids=list(range(len(C.VOC))))


def voc_instances(sample, semantic):
    """Objects of SegmentationObject (ids 1..N; 0 background, 255 void); each object's class is the
    most frequent SegmentationClass label under it (VOC draws both from the same polygons)."""
    obj = read_png(sample["obj"])
    out = []
    for k in np.unique(obj):
        if k == 0 or k == 255:
            continue
        m = obj == k
        labels = semantic[m]
        labels = labels[(labels > 0) & (labels < 255)]
        if labels.size:
            out.append((m, int(np.bincount(labels).argmax())))
    return out


# ----------------------------------------------------------------------------- COCO2017 val

def coco_stuff_lut():
    """COCO-Stuff-164k stuffthingmaps value (COCO id - 1; 0-181; 255 unlabeled) -> our label:
    the 80 things -> contiguous 1..80 (categories.COCO_IDS), stuff -> 0, unlabeled -> 255."""
    lut = np.zeros(256, np.int64)
    for label, coco_id in enumerate(C.COCO_IDS[1:], start=1):
        lut[coco_id - 1] = label
    lut[255] = 255
    return lut


def semantic_from_coco(anns, h, w, cat_to_label, ignore=255):
    """A semantic map from instance annotations: larger objects first so smaller ones stay visible
    on overlaps; crowd regions not covered by a non-crowd object are ignored."""
    from pycocotools import mask as mask_util
    sem = np.zeros((h, w), np.int64)
    crowd = np.zeros((h, w), bool)
    for a in sorted(anns, key=lambda a: -a.get("area", 0)):
        m = mask_util.decode(ann_to_rle(a, h, w)).astype(bool)
        if a.get("iscrowd", 0):
            crowd |= m
        elif a["category_id"] in cat_to_label:
            sem[m] = cat_to_label[a["category_id"]]
    sem[crowd & (sem == 0)] = ignore
    return sem


def ann_to_rle(ann, h, w):
    from pycocotools import mask as mask_util
    seg = ann["segmentation"]
    if isinstance(seg, list):  # polygons
        return mask_util.merge(mask_util.frPyObjects(seg, h, w))
    if isinstance(seg["counts"], list):  # uncompressed RLE (crowd)
        return mask_util.frPyObjects(seg, h, w)
    return seg


def _coco_index(gt):
    by_img = {}
    for a in gt["annotations"]:
        by_img.setdefault(a["image_id"], []).append(a)
    return by_img


def read_coco2017(data_root, split=None, coco_gt="stuffthings", **_):
    if split not in (None, "val"):
        raise UserError(f"coco2017 evaluates the val split only, got {split!r}")
    root = find_root(data_root, "coco2017", ["", "coco2017", "coco"], ["val2017"])
    inst = os.path.join(root, "annotations", "instances_val2017.json")
    gt = load_json(inst) if os.path.isfile(inst) else None
    cat_to_label = {cid: i for i, cid in enumerate(C.COCO_IDS) if i > 0}
    bench = Bench("coco2017", list(C.COCO), [], 255, coco_gt=gt, cat_ids=list(C.COCO_IDS))
    if coco_gt == "stuffthings":
        maps = next((os.path.join(root, d, "val2017") for d in ("stuffthingmaps_trainval2017",
                     "annotations/stuffthingmaps_trainval2017", "stuffthingmaps") if
                     os.path.isdir(os.path.join(root, d, "val2017"))), None)
        if maps is None:
            raise UserError(f"COCO-Stuff maps not found under {root!r} (expected "
                            "stuffthingmaps_trainval2017/val2017/*.png); download stuffthingmaps_trainval2017.zip "
                            "from github.com/nightrome/cocostuff or use --coco_gt instances")
        lut = coco_stuff_lut()
        bench.load_semantic = lambda s: lut[np.clip(read_png(s["gt"]), 0, 255)]
    elif coco_gt == "instances":
        if gt is None:
            raise UserError(f"--coco_gt instances needs {inst}")
        by_img = _coco_index(gt)
        bench.load_semantic = lambda s: semantic_from_coco(by_img.get(s["id"], []), s["h"], s["w"], cat_to_label)
        maps = None
    else:
        raise UserError(f"--coco_gt must be 'stuffthings' or 'instances', got {coco_gt!r}")
    if gt is not None:
        images = sorted(gt["images"], key=lambda im: im["file_name"])
    else:  # semantic only: ids from the zero-padded file names
        images = [{"id": int(os.path.splitext(f)[0]), "file_name": f, "height": None, "width": None}
                  for f in list_images(os.path.join(root, "val2017"))]
        bench.notes.append(f"{inst} not found: no instance AP")
    for im in images:
        stem = os.path.splitext(im["file_name"])[0]
        s = {"id": im["id"], "name": stem, "image": os.path.join(root, "val2017", im["file_name"]),
             "h": im["height"], "w": im["width"]}
        if maps:
            s["gt"] = os.path.join(maps, stem + ".png")
        bench.samples.append(s)
    return bench


# ----------------------------------------------------------------------------- COCO-20K

def coco20k_ids(list_path):
    """LOST's list has lines like 'train2014/COCO_train2014_000000000009.jpg' -> image id 9."""
    with open(list_path, encoding="utf-8") as f:
        return [int(os.path.splitext(os.path.basename(l.strip()))[0].split("_")[-1]) for l in f if l.strip()]


def build_sel20k(all_json, ids, out_path):
    """instances_train2014.json restricted to the COCO-20K images (all categories kept), written once
    atomically; one pass over the annotations with a set (the official select is O(images x anns))."""
    gt = load_json(all_json)
    keep = set(ids)
    sel = {k: v for k, v in gt.items() if k not in ("images", "annotations")}
    sel["images"] = [im for im in gt["images"] if im["id"] in keep]
    sel["annotations"] = [a for a in gt["annotations"] if a["image_id"] in keep]
    save_json(sel, out_path, indent=None)
    return sel


def read_coco20k(data_root, split=None, coco20k_list=None, unseen=False, cache_dir=None, **_):
    root = find_root(data_root, "coco20k", ["", "coco", "COCO"], ["train2014"])
    ann_dir = os.path.join(root, "annotations")
    sel_path = os.path.join(ann_dir, "instances_train2014_sel20k.json")
    if not os.path.isfile(sel_path) and cache_dir and os.path.isfile(os.path.join(cache_dir, os.path.basename(sel_path))):
        sel_path = os.path.join(cache_dir, os.path.basename(sel_path))
    if os.path.isfile(sel_path):
        gt = load_json(sel_path)
    else:
        lst = coco20k_list or next((p for p in (os.path.join(root, "coco_20k_filenames.txt"),
                                                os.path.join(ann_dir, "coco_20k_filenames.txt")) if os.path.isfile(p)), None)
        if lst is None or not os.path.isfile(lst):
            raise UserError(f"coco_20k_filenames.txt not found in {root!r} or {ann_dir!r}: get it from "
                            "github.com/valeoai/LOST (datasets/) or pass --coco20k_list")
        all_json = os.path.join(ann_dir, "instances_train2014.json")
        if not os.path.isfile(all_json):
            raise UserError(f"missing {all_json}. Expected layout: {LAYOUTS['coco20k']}")
        if not os.access(ann_dir, os.W_OK) and cache_dir:  # read-only dataset: cache beside the outputs
            sel_path = os.path.join(cache_dir, os.path.basename(sel_path))
        print(f"building {sel_path} (once) from {all_json}")
        gt = build_sel20k(all_json, coco20k_ids(lst), sel_path)
    cats, ids = list(C.COCO), list(C.COCO_IDS)
    images = sorted(gt["images"], key=lambda im: im["file_name"])
    bench = Bench("coco20k", cats, [], 255, coco_gt=gt, cat_ids=ids)
    if unseen:  # zero-shot setting: only the 15 unseen classes are named and scored (paper Table 7)
        keep = [i for i, n in enumerate(cats) if n in C.COCO_UNSEEN]
        bench.categories = ["background"] + [cats[i] for i in keep]
        bench.cat_ids = [0] + [ids[i] for i in keep]
        bench.eval_cat_ids = bench.cat_ids[1:]
        has = {a["image_id"] for a in gt["annotations"] if a["category_id"] in set(bench.eval_cat_ids)}
        images = [im for im in images if im["id"] in has]
        bench.notes.append(f"--unseen: {len(keep)} classes, {len(images)} images with an unseen object")
    bench.samples = [{"id": im["id"], "name": os.path.splitext(im["file_name"])[0],
                      "image": os.path.join(root, "train2014", im["file_name"])} for im in images]
    return bench


# ----------------------------------------------------------------------------- CoCA

def read_coca(data_root, split=None, **_):
    root = find_root(data_root, "coca", ["", "coca", "CoCA"], ["image", "binary"])
    label_of = {n: i for i, n in enumerate(C.COCA)}
    samples = []
    for cat in sorted(os.listdir(os.path.join(root, "image"))):
        if not os.path.isdir(os.path.join(root, "image", cat)):
            continue
        if cat not in label_of or cat == "background":
            raise UserError(f"CoCA folder {cat!r} is not a CoCA category (see categories.COCA)")
        imgs = list_images(os.path.join(root, "image", cat))
        bins = list_images(os.path.join(root, "binary", cat)) if os.path.isdir(os.path.join(root, "binary", cat)) else []
        by_stem = {os.path.splitext(b)[0]: b for b in bins}
        if all(os.path.splitext(i)[0] in by_stem for i in imgs):
            pairs = [(i, by_stem[os.path.splitext(i)[0]]) for i in imgs]
        elif len(imgs) == len(bins):  # the official reader pairs the two sorted lists
            pairs = list(zip(imgs, bins))
        else:
            raise UserError(f"CoCA {cat!r}: {len(imgs)} images but {len(bins)} masks in binary/{cat}")
        for i, b in pairs:
            samples.append({"id": len(samples), "name": f"{cat}/{os.path.splitext(i)[0]}", "label": label_of[cat],
                            "image": os.path.join(root, "image", cat, i), "gt": os.path.join(root, "binary", cat, b)})
    if not samples:
        raise UserError(f"no CoCA images under {root}/image/<category>/")

    def load(s):
        m = read_png(s["gt"])
        m = m.max(-1) if m.ndim == 3 else m
        return np.where(m > 127, s["label"], 0).astype(np.int64)
    return Bench("coca", list(C.COCA), samples, 255, load_semantic=load)


# ----------------------------------------------------------------------------- ImageNet-S919

def read_imagenet_s(data_root, split=None, max_size=1024, **_):
    split = {None: "validation", "val": "validation", "validation": "validation", "test": "test"}.get(split)
    if split is None:
        raise UserError("imagenet_s919 split must be 'val' or 'test'")
    root = find_root(data_root, "imagenet_s919", ["", "ImageNetS919", "ImageNet-S/ImageNetS919",
                                                  "imagenet-s/ImageNetS919"], [split])
    gt_dir = os.path.join(root, split + "-segmentation")
    if split == "validation" and not os.path.isdir(gt_dir):
        raise UserError(f"missing {gt_dir}. Expected layout: {LAYOUTS['imagenet_s919']}")
    rels = list_images(os.path.join(root, split))
    samples = [{"id": i, "name": os.path.splitext(r)[0], "image": os.path.join(root, split, r),
                "gt": os.path.join(gt_dir, os.path.splitext(r)[0] + ".png") if split == "validation" else None}
               for i, r in enumerate(rels)]

    def load(s):  # RGB PNG: class id = R + 256 * G; 1000 = ignore (ImageNet-S README)
        rgb = read_png(s["gt"])
        return rgb[..., 0] + 256 * rgb[..., 1]
    return Bench("imagenet_s919", list(C.IMAGENET_S919), samples, 1000,
                 load_semantic=load if split == "validation" else None, max_size=max_size,
                 size_buckets=split == "validation")


# ----------------------------------------------------------------------------- CUB-200-2011

def cub_breed(class_folder):
    """'001.Black_footed_Albatross' -> 'Black footed Albatross'."""
    return class_folder.split(".", 1)[-1].replace("_", " ")


def read_cub(data_root, split=None, cub_text="bird", **_):
    split = split or "test"
    if split not in ("test", "train"):
        raise UserError(f"cub split must be 'test' or 'train', got {split!r}")
    root = find_root(data_root, "cub", ["", "CUB_200_2011"], ["images.txt", "train_test_split.txt", "images"])
    segs = next((d for d in (os.path.join(root, "segmentations"), os.path.join(os.path.dirname(root), "segmentations"))
                 if os.path.isdir(d)), None)
    if segs is None:
        raise UserError(f"CUB segmentations/ not found in or beside {root!r} (segmentations.tgz of CUB-200-2011)")
    with open(os.path.join(root, "images.txt"), encoding="utf-8") as f:
        paths = dict(line.split() for line in f if line.strip())
    with open(os.path.join(root, "train_test_split.txt"), encoding="utf-8") as f:
        is_train = dict(line.split() for line in f if line.strip())
    want = "0" if split == "test" else "1"
    samples = []
    for k in sorted(paths, key=int):
        if is_train.get(k) != want:
            continue
        rel = paths[k]
        samples.append({"id": int(k), "name": os.path.splitext(rel)[0], "image": os.path.join(root, "images", rel),
                        "gt": os.path.join(segs, os.path.splitext(rel)[0] + ".png"),
                        "text": cub_breed(rel.split("/")[0])})
    if cub_text not in ("bird", "breed"):
        raise UserError(f"--cub_text must be 'bird' or 'breed', got {cub_text!r}")

    def load(s):  # soft masks averaged over annotators (0..255): foreground where more than half agree
        m = read_png(s["gt"])
        m = m.max(-1) if m.ndim == 3 else m
        return (m > 127).astype(np.int64)
    return Bench("cub", ["background", "bird"], samples, 255, load_semantic=load,
                 per_image_text=cub_text == "breed")


READERS = {"voc": read_voc, "coco2017": read_coco2017, "coco20k": read_coco20k, "coca": read_coca,
           "imagenet_s919": read_imagenet_s, "cub": read_cub}


def read_bench(name, data_root=None, split=None, **kw):
    """A benchmark name and its data root (default: data/<standard folder>) -> Bench."""
    if name not in READERS:
        raise UserError(f"unknown benchmark {name!r}: use one of {', '.join(BENCHES)}")
    data_root = data_root or DEFAULT_ROOTS[name]
    if not os.path.isdir(data_root):
        raise UserError(f"data root not found: {data_root!r}. Expected layout for {name}: {LAYOUTS[name]}")
    return READERS[name](data_root, split=split, **kw)
