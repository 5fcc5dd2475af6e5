"""The evaluation benchmarks of the paper (section 4): one `Benchmark` entry each (reader, default root,
layout, category list, metrics, background, input size rule) in BENCHES, the readers of their on-disk trees
(like DETR's datasets/), and their scoring rules as scorers. evaluate.py runs the model and loops over a
benchmark's scorers; docs/evaluate.md lists the layouts, the evaluator each metric equals, and how to add one.

    bench = read_bench("voc", "data/VOCdevkit/VOC2012", split="val")   # samples, categories, ignore value
    sem = bench.load_semantic(bench.samples[0])                        # int64 [H, W]
    semantic_metrics(confusion(sem, pred, K, bench.ignore_index), bench.categories)

References: official datasets/{coco2017,coca,imagenet_s,coco20k}.py, trainer.py `evaluate` and
utils/running_score.py; LUSSeg/ImageNet-S evaluation/evaluator.py and metric.py; COCO-Stuff stuffthingmaps
(value = COCO id - 1, 255 unlabeled); LOST's coco_20k_filenames.txt; pycocotools COCOeval.
"""
import contextlib
import io
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

import categories
from common import UserError, list_images, load_json, save_image, save_json


@dataclass(frozen=True)
class Benchmark:
    """One benchmark: everything evaluate.py needs to know about it. A new benchmark is a reader, an entry
    here (register) and its category list in categories.BUILTIN."""
    name: str
    read: Callable            # (data_root, split=None, **options) -> Bench
    root: str                 # the default data root
    layout: str               # the expected tree, named in errors
    classes: str              # its categories.BUILTIN list: label id -> name, "background" first
    metrics: tuple            # SCORERS names, in metrics.json order; read_bench keeps those the data can feed
    background: bool = True   # label 0 is a class of the ground truth; else ground-truth 0 is void and a
    #                           predicted 0 (the model's background text) is a miss, never averaged in
    max_size: Optional[int] = None  # a longer input side above this is resized; outputs stay at full size
    any_classes: bool = False  # ground-truth values index any --classes list (the VOC layout), else the
    #                            list renames the benchmark's classes and must have their count


@dataclass
class Bench:
    """What a reader found; read_bench adds the Benchmark's name, metrics and rules."""
    samples: list                         # dicts: id, name, image, (gt, obj, label, text)
    load_semantic: Optional[Callable] = None    # sample -> int64 [H, W]
    load_instances: Optional[Callable] = None   # (sample, semantic) -> [(bool mask, label)]
    ignore_index: int = 255               # the ground truth's void value
    categories: Optional[list] = None     # default: the Benchmark's list
    coco_gt: Optional[dict] = None        # COCO-format instance ground truth (coco2017, coco20k)
    cat_ids: Optional[list] = None        # label id -> COCO category_id of predictions and ground truth
    eval_cat_ids: Optional[list] = None   # restrict AP to these category ids (COCO-20K --unseen)
    sample_categories: Optional[Callable] = None  # sample -> the classes of that image alone (CUB breed mode)
    notes: list = field(default_factory=list)
    name: str = ""
    metrics: tuple = ()
    background: bool = True
    max_size: Optional[int] = None
    any_classes: bool = False


BENCHES = {}  # name -> Benchmark, filled by register() at the end of this file


def register(spec):
    BENCHES[spec.name] = spec
    return spec


def read_bench(name, data_root=None, split=None, **options):
    """A benchmark name and its data root (default: the entry's root) -> Bench. options: the readers'
    own (unseen, cub_text); a reader ignores those it does not know."""
    if name not in BENCHES:
        raise UserError(f"unknown benchmark {name!r}: use one of {', '.join(BENCHES)}")
    spec = BENCHES[name]
    data_root = data_root or spec.root
    if not os.path.isdir(data_root):
        raise UserError(f"data root not found: {data_root!r}. Expected layout for {name}: {spec.layout}")
    bench = spec.read(data_root, split=split, **options)
    bench.name, bench.background, bench.max_size, bench.any_classes = name, spec.background, spec.max_size, spec.any_classes
    bench.categories = bench.categories or list(categories.BUILTIN[spec.classes])
    has = {"semantic": bench.load_semantic is not None, "none": bench.load_semantic is None,
           "instances": bench.load_instances is not None or bench.coco_gt is not None}
    bench.metrics = tuple(m for m in spec.metrics if has[SCORERS[m].ground_truth])
    return bench


# ----------------------------------------------------------------------------- semantic metrics

def confusion(gt, pred, K, ignore=255):
    """Counts [K + 1, K], rows ground truth, columns prediction. Row K holds the predictions on ignored
    pixels (the ignore value or any label outside [0, K)): official running_score drops them, the
    ImageNet-S evaluator counts them in the predicted area."""
    gt, pred = np.asarray(gt).ravel(), np.asarray(pred).ravel()
    return np.bincount(K * np.where((gt >= 0) & (gt < K) & (gt != ignore), gt, K) + pred, minlength=(K + 1) * K).reshape(K + 1, K)


def semantic_metrics(conf, names, official_imagenet_s=False, background=True):
    """Dataset-level mIoU and pixel accuracy (percent) from summed `confusion` counts.
    Default (official utils/running_score.py): ignored pixels dropped on both sides, mean over the classes
    present in ground truth or prediction. official_imagenet_s (LUSSeg/ImageNet-S evaluator.py): predictions
    on ignored pixels count in the predicted area, IoU = TP / (T + P - TP + 1e-10), mean over all classes.
    background=False: class 0 (which the ground truth of such a benchmark never holds) is left out of the
    mean; its predictions still count as misses of the true class."""
    K = conf.shape[1]
    valid = conf[:K].astype(np.float64)
    tp, gt_area = np.diag(valid), valid.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):  # 0 / 0: a class absent on both sides
        iou = tp / (conf.sum(0) + gt_area - tp + 1e-10) if official_imagenet_s else tp / (valid.sum(0) + gt_area - tp)
    if not background:
        iou[0] = np.nan
    miou = np.nanmean(iou) if np.isfinite(iou).any() else None
    return {"mIoU": None if miou is None else float(miou * 100),
            "pixel_acc": float(tp.sum() / max(valid.sum(), 1) * 100),
            "per_class_iou": {n: (None if np.isnan(v) else float(v) * 100) for n, v in zip(names, iou)}}


def size_buckets(gt, pred, K, ignore):
    """ImageNet-S S/MS/ML/L counts [4, K + 1, K] of one image, as evaluation/metric.py `IoUDifferentSizeGPU`:
    every non-zero ground-truth value, the ignore value included, is sized ceil(100 * its pixels / all
    pixels) in float32; S <= 5 < MS <= 25 < ML <= 50 < L. A bucket holding any value takes the background
    pixels plus the pixels of its values (predictions on ignored pixels count in its predicted area)."""
    out = np.zeros((4, K + 1, K), np.int64)
    members = [[] for _ in range(4)]
    total = np.float32(gt.size)
    for v, n in zip(*np.unique(gt, return_counts=True)):
        if v != 0:
            pct = math.ceil(float(np.float32(np.float32(n) * np.float32(100.0)) / total))
            members[0 if pct <= 5 else 1 if pct <= 25 else 2 if pct <= 50 else 3].append(v)
    for b, vals in enumerate(members):
        if vals:
            sel = np.isin(gt, [0] + vals)
            out[b] = confusion(gt[sel], pred[sel], K, ignore)
    return out


def bucket_miou(conf):
    """Mean IoU of one size bucket over the classes with ground-truth pixels in it (evaluator.py `[Ps > 0]`)."""
    K = conf.shape[1]
    tp, gt_area = np.diag(conf[:K]).astype(np.float64), conf[:K].sum(1)
    iou = tp / (conf.sum(0) + gt_area - tp + 1e-10)
    return float(iou[gt_area > 0].mean() * 100) if (gt_area > 0).any() else None


def image_scores(gt, pred, K):
    """ImageNet-S evaluator.py per image: accuracy (is the largest predicted foreground class in the ground
    truth) and the F-measure (beta^2 = 0.3) of non-zero = foreground, the ignore value included."""
    out_area = np.bincount(pred.ravel(), minlength=K)
    g = gt.ravel()
    gt_area, c = np.bincount(g[(g >= 0) & (g < K)], minlength=K), int(np.argmax(out_area[1:])) + 1
    t, p = gt > 0, pred > 0
    acc, tp = float(gt_area[c] > 0 and out_area[c] > 0), float((t & p).sum())
    recall, precision = tp / (t.sum() + 1e-20), tp / (p.sum() + 1e-20)
    return acc, 1.3 * precision * recall / (0.3 * precision + recall + 1e-20)


# ----------------------------------------------------------------------------- COCO masks and AP

def mask_to_rle(mask):
    """bool [H, W] -> COCO RLE with a str 'counts' (JSON-serialisable)."""
    from pycocotools import mask as mask_util
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def gt_annotation(mask, category_id, image_id, ann_id):
    from pycocotools import mask as mask_util
    rle = mask_to_rle(mask)
    return {"id": ann_id, "image_id": image_id, "category_id": int(category_id), "segmentation": rle,
            "area": float(mask_util.area(rle)), "bbox": [float(v) for v in mask_util.toBbox(rle)], "iscrowd": 0}


def detections(p, image_id, cat_ids):
    """Prediction dict -> COCO results (category_id = cat_ids[label]), scores as predicted: rounding would
    create ties that COCOeval breaks by image order. Background, unmapped labels and empty masks dropped."""
    out = []
    for m, lab, sc in zip(p["masks"].numpy(), p["labels"].tolist(), p["scores"].tolist()):
        if 0 < lab < len(cat_ids) and m.any():
            out.append({"image_id": image_id, "category_id": int(cat_ids[lab]), "segmentation": mask_to_rle(m),
                        "score": float(sc)})
    return out


def coco_segm_ap(gt_dict, dets, img_ids, use_cats=True, cat_ids=None):
    """[AP, AP50, AP75] in percent from COCOeval(iouType='segm'); use_cats=False is class-agnostic.
    None where the ground truth has no instance to score."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = gt_dict
        gt.createIndex()
        if not dets:
            has_gt = any(a["image_id"] in set(img_ids) for a in gt_dict["annotations"])
            return [0.0] * 3 if has_gt else [None] * 3
        ev = COCOeval(gt, gt.loadRes([dict(d) for d in dets]), "segm")
        ev.params.imgIds = sorted(img_ids)
        ev.params.useCats = int(use_cats)
        if cat_ids is not None:
            ev.params.catIds = list(cat_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [None if s < 0 else float(s) * 100 for s in ev.stats[:3]]


# ----------------------------------------------------------------------------- scorers
# A scorer is one family of metrics, made per run for a benchmark and its class names. start() gives its
# per-rank state (tensors, lists and numbers only: evaluate.py saves it for resume and gathers it over
# ranks), add() scores one image, summary() turns the states of all ranks into metrics.json entries.
# `item` is {"sample", "size": (H, W), "gt": int64 [H, W] or None, "objs": [(mask, label)] or None}.
# `ground_truth` is what it scores against: semantic, instances, or none (a split without any).

def _joined(states, key):
    return sum((s[key] for s in states), [])


class Scorer:
    headline, ground_truth, needs_instances = (), "semantic", False  # headline: the keys evaluate.py prints

    def __init__(self, bench, names, out_dir=None):
        self.bench, self.names, self.K, self.out_dir = bench, list(names), len(names), out_dir

    def gt(self, item):  # without a background class, ground-truth 0 is void
        gt = item["gt"]
        return gt if self.bench.background else np.where(gt == 0, self.bench.ignore_index, gt)


class MeanIoU(Scorer):
    """mIoU, pixel accuracy and per-class IoU by the official utils/running_score.py rule (semantic_metrics)."""
    headline = ("mIoU", "pixel_acc")

    def start(self):
        return {"conf": torch.zeros(self.K + 1, self.K, dtype=torch.long)}

    def add(self, st, item, pred):
        st["conf"] += torch.from_numpy(confusion(self.gt(item), pred["semantic"].numpy(), self.K, self.bench.ignore_index))

    def summary(self, states):
        return semantic_metrics(sum(s["conf"] for s in states).numpy(), self.names, background=self.bench.background)


class ImageNetS(MeanIoU):
    """The benchmark's own evaluator (LUSSeg/ImageNet-S evaluation/evaluator.py, the test server's): mIoU over
    all classes, S/MS/ML/L, Acc and FMeasure; and, as mIoU_official_trainer, the rule the official ZUTIS
    `main.py --p_state_dict` scores its val split with (trainer.py `evaluate`: utils/running_score.py, ground
    truth >= K dropped with its predictions, mean over the classes present)."""
    headline = ("mIoU", "pixel_acc", "S", "MS", "ML", "L", "Acc", "FMeasure", "mIoU_official_trainer")

    def start(self):
        return {**super().start(), "buckets": torch.zeros(4, self.K + 1, self.K, dtype=torch.long), "per_image": []}

    def add(self, st, item, pred):
        super().add(st, item, pred)
        gt, pred = self.gt(item), pred["semantic"].numpy()
        st["buckets"] += torch.from_numpy(size_buckets(gt, pred, self.K, self.bench.ignore_index))
        st["per_image"].append(image_scores(gt, pred, self.K))

    def summary(self, states):
        conf, buckets = (sum(s[k] for s in states).numpy() for k in ("conf", "buckets"))
        m = semantic_metrics(conf, self.names, official_imagenet_s=True, background=self.bench.background)
        m["mIoU_official_trainer"] = super().summary(states)["mIoU"]
        m.update({k: bucket_miou(buckets[b]) for b, k in enumerate(("S", "MS", "ML", "L"))})
        if _joined(states, "per_image"):
            m["Acc"], m["FMeasure"] = (float(v) for v in np.mean(_joined(states, "per_image"), 0) * 100)
        return m


class ForegroundIoU(Scorer):
    """CUB: IoU of the foreground (ground truth 1, any class predicted) over the dataset (the headline,
    fg_iou) and its mean over images (fg_iou_per_image; an image empty on both sides counts 1)."""
    headline = ("fg_iou", "fg_iou_per_image")

    def start(self):
        return {"inter": [], "union": []}

    def add(self, st, item, pred):
        t, p = item["gt"] == 1, pred["semantic"].numpy() > 0
        st["inter"].append(int((t & p).sum()))
        st["union"].append(int((t | p).sum()))

    def summary(self, states):
        inter, union = _joined(states, "inter"), _joined(states, "union")
        per_image = [i / u if u else 1.0 for i, u in zip(inter, union)]
        return {"fg_iou": sum(inter) / sum(union) * 100 if sum(union) else None,
                "fg_iou_per_image": float(np.mean(per_image) * 100) if per_image else None}


class InstanceAP(Scorer):
    """Mask AP/AP50/AP75 with COCOeval, class-aware and class-agnostic (useCats=0, key suffix `_agn`), against
    the benchmark's COCO ground truth or the VOC-style instances read per image; writes OUT/instances.json."""
    headline = ("AP", "AP50", "AP75", "AP_agn", "AP50_agn", "AP75_agn")
    ground_truth, needs_instances = "instances", True

    def start(self):
        return {"dets": [], "gt_imgs": [], "gt_anns": [], "img_ids": []}

    def add(self, st, item, pred):
        s, (h, w), cat_ids = item["sample"], item["size"], self.bench.cat_ids or range(self.K)
        st["img_ids"].append(s["id"])
        if "masks" in pred:
            st["dets"] += detections(pred, s["id"], cat_ids)
        if item["objs"] is not None:
            st["gt_imgs"].append({"id": s["id"], "height": h, "width": w, "file_name": s["name"]})
            st["gt_anns"] += [gt_annotation(m, cat_ids[lab], s["id"], 0) for m, lab in item["objs"] if lab < self.K]

    def summary(self, states):
        dets, img_ids, b = _joined(states, "dets"), _joined(states, "img_ids"), self.bench
        if self.out_dir:
            save_json(dets, os.path.join(self.out_dir, "instances.json"), indent=None)
        if b.coco_gt is not None:
            gt = {**b.coco_gt, "images": [im for im in b.coco_gt["images"] if im["id"] in set(img_ids)],
                  "annotations": [a for a in b.coco_gt["annotations"] if a["image_id"] in set(img_ids)]}
        else:
            cat_ids = b.cat_ids or range(self.K)
            gt = {"images": _joined(states, "gt_imgs"), "categories": [{"id": cat_ids[c], "name": self.names[c]}
                                                                      for c in range(1, self.K)],
                  "annotations": [{**a, "id": k + 1} for k, a in enumerate(_joined(states, "gt_anns"))]}
        if b.eval_cat_ids is not None:  # --unseen: only these classes' ground truth and predictions count
            gt["annotations"] = [a for a in gt["annotations"] if a["category_id"] in b.eval_cat_ids]
            dets = [d for d in dets if d["category_id"] in b.eval_cat_ids]
        out = {"n_detections": len(dets), "n_gt_instances": len(gt["annotations"])}
        for agn in (False, True):
            stats = coco_segm_ap(gt, dets, img_ids, use_cats=not agn, cat_ids=b.eval_cat_ids)
            out.update({k + ("_agn" if agn else ""): v for k, v in zip(("AP", "AP50", "AP75"), stats)})
        return out


class ServerPNGs(Scorer):
    """A split without ground truth (ImageNet-S test): OUT/test/<name>.png in the test server's format,
    class I stored as RGB (I % 256, I // 256, 0)."""
    ground_truth = "none"

    def start(self):
        if self.out_dir is None:
            raise UserError(f"{self.bench.name} without ground truth writes PNGs for its test server: give an output folder")
        return {}

    def add(self, st, item, pred):
        p = pred["semantic"].numpy()
        save_image(np.stack([p % 256, p // 256, np.zeros_like(p)], -1).astype(np.uint8),
                   os.path.join(self.out_dir, "test", item["sample"]["name"] + ".png"))

    def summary(self, states):
        return {"server_pngs": os.path.join(self.out_dir, "test")}


SCORERS = {"miou": MeanIoU, "imagenet_s": ImageNetS, "fg_iou": ForegroundIoU, "instances": InstanceAP,
           "server_pngs": ServerPNGs}


def scorers(bench, names, out_dir=None):
    """The scorers of a benchmark read by read_bench, for the class list `names`."""
    return [SCORERS[m](bench, names, out_dir) for m in bench.metrics]


# ----------------------------------------------------------------------------- readers: helpers

def find_root(data_root, bench, subdirs, must):
    """The first of `data_root` joined with each of `subdirs` that contains every path in `must`."""
    for sub in subdirs:
        cand = os.path.join(data_root, sub) if sub else data_root
        if all(os.path.exists(os.path.join(cand, m)) for m in must):
            return cand
    raise UserError(f"{bench} data not found under {data_root!r}. Expected layout: {BENCHES[bench].layout}")


def read_png(path):
    """A PNG as int64: palette and grayscale images give [H, W] of stored indices, others [H, W, 3] RGB."""
    from PIL import Image
    with Image.open(path) as im:
        return np.array(im if im.mode in ("P", "L", "I", "I;16") else im.convert("RGB")).astype(np.int64)


def _split_lines(path):  # the words of each non-empty line
    with open(path, encoding="utf-8") as f:
        return [line.split() for line in f if line.strip()]


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
            raise UserError(f"missing {p}. Expected layout: {BENCHES['voc'].layout}")
        names.update(words[0] for words in _split_lines(p))
    has_obj = os.path.isdir(os.path.join(root, "SegmentationObject"))
    samples = [{"id": i, "name": n, "image": os.path.join(root, "JPEGImages", n + ".jpg"),
                "gt": os.path.join(root, "SegmentationClass", n + ".png"),
                "obj": os.path.join(root, "SegmentationObject", n + ".png") if has_obj else None}
               for i, n in enumerate(sorted(names))]
    return Bench(samples, load_semantic=lambda s: read_png(s["gt"]), load_instances=voc_instances if has_obj else None)


def voc_instances(sample, semantic):
    """Objects of SegmentationObject (ids 1..N; 0 background, 255 void); each object's class is the most
    frequent SegmentationClass label under it (VOC draws both from the same polygons)."""
    obj, out = read_png(sample["obj"]), []
    for k in sorted(set(np.unique(obj).tolist()) - {0, 255}):
        labels = semantic[obj == k]
        labels = labels[(labels > 0) & (labels < 255)]
        if labels.size:
            out.append((obj == k, int(np.bincount(labels).argmax())))
    return out


# ----------------------------------------------------------------------------- COCO2017 val and COCO-20K

def coco_stuff_lut():
    """COCO-Stuff stuffthingmaps value (COCO id - 1; 255 unlabeled) -> our label: the 80 things ->
    contiguous 1..80 (categories.COCO_IDS), stuff -> 0, unlabeled -> 255."""
    lut = np.zeros(256, np.int64)
    for label, coco_id in enumerate(categories.COCO_IDS[1:], start=1):
        lut[coco_id - 1] = label
    lut[255] = 255
    return lut


def read_coco2017(data_root, split=None, **_):
    """Semantic ground truth from COCO-Stuff-164k's stuffthingmaps (the author's answer to how the official
    masks were made: things kept, stuff = background); instance AP from instances_val2017.json if present."""
    if split not in (None, "val"):
        raise UserError(f"coco2017 evaluates the val split only, got {split!r}")
    root = find_root(data_root, "coco2017", ["", "coco2017", "coco"], ["val2017"])
    maps = next((os.path.join(root, d, "val2017") for d in ("stuffthingmaps_trainval2017",
                 "annotations/stuffthingmaps_trainval2017", "stuffthingmaps")
                 if os.path.isdir(os.path.join(root, d, "val2017"))), None)
    if maps is None:
        raise UserError(f"COCO-Stuff maps not found under {root!r} (expected stuffthingmaps_trainval2017/"
                        "val2017/*.png from github.com/nightrome/cocostuff)")
    inst = os.path.join(root, "annotations", "instances_val2017.json")
    gt = load_json(inst, "COCO annotations") if os.path.isfile(inst) else None
    lut = coco_stuff_lut()
    bench = Bench([], coco_gt=gt, cat_ids=list(categories.COCO_IDS), load_semantic=lambda s: lut[np.clip(read_png(s["gt"]), 0, 255)])
    if gt is not None:
        files = [(im["id"], im["file_name"]) for im in sorted(gt["images"], key=lambda im: im["file_name"])]
    else:  # semantic only: ids from the zero-padded file names
        files = [(int(os.path.splitext(f)[0]), f) for f in list_images(os.path.join(root, "val2017"))]
        bench.notes.append(f"{inst} not found: no instance AP")
    bench.samples = [{"id": i, "name": os.path.splitext(f)[0], "image": os.path.join(root, "val2017", f),
                      "gt": os.path.join(maps, os.path.splitext(f)[0] + ".png")} for i, f in files]
    return bench


def coco20k_ids(list_path):
    """LOST's list has lines like 'train2014/COCO_train2014_000000000009.jpg' -> image id 9."""
    return [int(os.path.splitext(os.path.basename(n))[0].split("_")[-1]) for n, *_ in _split_lines(list_path)]


def build_sel20k(all_json, ids, out_path):
    """instances_train2014.json restricted to the COCO-20K images (all categories kept), written
    atomically (official datasets/coco20k.py `select_coco_20k`, one pass with a set)."""
    gt, keep = load_json(all_json, "COCO annotations"), set(ids)
    sel = {k: v for k, v in gt.items() if k not in ("images", "annotations")}
    sel["images"] = [im for im in gt["images"] if im["id"] in keep]
    sel["annotations"] = [a for a in gt["annotations"] if a["image_id"] in keep]
    save_json(sel, out_path, indent=None)
    return sel


def read_coco20k(data_root, split=None, unseen=False, **_):
    root = find_root(data_root, "coco20k", ["", "coco", "COCO"], ["train2014"])
    ann_dir = os.path.join(root, "annotations")
    sel_path = os.path.join(ann_dir, "instances_train2014_sel20k.json")
    if os.path.isfile(sel_path):
        gt = load_json(sel_path, "COCO-20K annotations")
    else:
        lst = next((p for p in (os.path.join(root, "coco_20k_filenames.txt"), os.path.join(ann_dir, "coco_20k_filenames.txt"))
                    if os.path.isfile(p)), None)
        all_json = os.path.join(ann_dir, "instances_train2014.json")
        if lst is None or not os.path.isfile(all_json):
            raise UserError(f"COCO-20K needs {all_json} and coco_20k_filenames.txt (github.com/valeoai/LOST, datasets/) "
                            f"in {root!r} or {ann_dir!r}")
        print(f"building {sel_path} from {all_json}")
        gt = build_sel20k(all_json, coco20k_ids(lst), sel_path)
    cats, ids = list(categories.COCO), list(categories.COCO_IDS)
    images = sorted(gt["images"], key=lambda im: im["file_name"])
    bench = Bench([], coco_gt=gt, cat_ids=ids)
    if unseen:  # zero-shot setting: only the 15 unseen classes are named and scored (paper Table 7)
        keep = [i for i, n in enumerate(cats) if n in categories.COCO_UNSEEN]
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

def coca_semantic(path, label):
    """Official datasets/coca.py: value 255 -> the folder's category, every other value kept as it is
    (a value outside [0, K) is then ignored by the metric); a warning names a mask that is not 0/255."""
    m = read_png(path)
    m = m.max(-1) if m.ndim == 3 else m
    if not np.isin(m, (0, 255)).all():
        print(f"warning: {path} has values other than 0 and 255; they are kept as label ids", file=sys.stderr)
    return np.where(m == 255, label, m)


def read_coca(data_root, split=None, **_):
    root = find_root(data_root, "coca", ["", "coca", "CoCA"], ["image", "binary"])
    label_of = {n: i for i, n in enumerate(categories.COCA)}
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
    return Bench(samples, load_semantic=lambda s: coca_semantic(s["gt"], s["label"]))


# ----------------------------------------------------------------------------- ImageNet-S919

def read_imagenet_s(data_root, split=None, **_):
    split = {None: "validation", "val": "validation", "validation": "validation", "test": "test"}.get(split)
    if split is None:
        raise UserError("imagenet_s919 split must be 'val' or 'test'")
    root = find_root(data_root, "imagenet_s919", ["", "ImageNetS919", "ImageNet-S/ImageNetS919"], [split])
    gt_dir = os.path.join(root, split + "-segmentation")
    if split == "validation" and not os.path.isdir(gt_dir):
        raise UserError(f"missing {gt_dir}. Expected layout: {BENCHES['imagenet_s919'].layout}")
    samples = [{"id": i, "name": os.path.splitext(r)[0], "image": os.path.join(root, split, r),
                "gt": os.path.join(gt_dir, os.path.splitext(r)[0] + ".png") if split == "validation" else None}
               for i, r in enumerate(list_images(os.path.join(root, split)))]

    def load(s):  # RGB PNG: class id = R + 256 * G; 1000 = ignore (ImageNet-S README)
        rgb = read_png(s["gt"])
        return rgb[..., 0] + 256 * rgb[..., 1]
    return Bench(samples, load_semantic=load if split == "validation" else None, ignore_index=1000)


# ----------------------------------------------------------------------------- CUB-200-2011

def read_cub(data_root, split=None, cub_text="bird", **_):
    split = split or "test"
    if split not in ("test", "train"):
        raise UserError(f"cub split must be 'test' or 'train', got {split!r}")
    root = find_root(data_root, "cub", ["", "CUB_200_2011"], ["images.txt", "train_test_split.txt", "images"])
    segs = next((d for d in (os.path.join(root, "segmentations"), os.path.join(os.path.dirname(root), "segmentations"))
                 if os.path.isdir(d)), None)
    if segs is None:
        raise UserError(f"CUB segmentations/ not found in or beside {root!r} (segmentations.tgz of CUB-200-2011)")
    paths = dict(_split_lines(os.path.join(root, "images.txt")))
    is_train = dict(_split_lines(os.path.join(root, "train_test_split.txt")))
    want = "0" if split == "test" else "1"
    samples = [{"id": int(k), "name": os.path.splitext(paths[k])[0], "image": os.path.join(root, "images", paths[k]),
                "gt": os.path.join(segs, os.path.splitext(paths[k])[0] + ".png"),
                "text": paths[k].split("/")[0].split(".", 1)[-1].replace("_", " ")}  # '001.Black_footed_Albatross'
               for k in sorted(paths, key=int) if is_train.get(k) == want]

    def load(s):  # soft masks averaged over annotators (0..255): foreground where more than half agree
        m = read_png(s["gt"])
        return ((m.max(-1) if m.ndim == 3 else m) > 127).astype(np.int64)
    breed = (lambda s: ["background", s["text"]]) if cub_text == "breed" else None  # each image's breed its only class
    return Bench(samples, load_semantic=load, sample_categories=breed)


# ----------------------------------------------------------------------------- the benchmarks

register(Benchmark("voc", read_voc, "data/VOCdevkit/VOC2012", "<root>/{JPEGImages,SegmentationClass,SegmentationObject,"
                   "ImageSets/Segmentation/{train,val}.txt}", "voc", ("miou", "instances"), any_classes=True))
register(Benchmark("coco2017", read_coco2017, "data/coco2017", "<root>/{val2017, stuffthingmaps_trainval2017/val2017, "
                   "annotations/instances_val2017.json}", "coco2017", ("miou", "instances")))
register(Benchmark("coco20k", read_coco20k, "data/coco", "<root>/{train2014, annotations/instances_train2014.json, "
                   "coco_20k_filenames.txt (from LOST)}", "coco20k", ("instances",)))
register(Benchmark("coca", read_coca, "data/coca", "<root>/image/<category>/*.jpg and <root>/binary/<category>/*.png",
                   "coca", ("miou",)))
register(Benchmark("imagenet_s919", read_imagenet_s, "data/ImageNet-S/ImageNetS919",
                   "<root>/{validation,validation-segmentation,test}/<wnid>/*", "imagenet_s919",
                   ("imagenet_s", "server_pngs"), max_size=1024))
register(Benchmark("cub", read_cub, "data/CUB_200_2011", "<root>/{images/,images.txt,train_test_split.txt} and "
                   "segmentations/<class>/*.png in <root> or beside it", "cub", ("miou", "fg_iou")))


if __name__ == "__main__":
    import common
    common.library_main(__doc__, "evaluate.py --bench reads and scores the benchmarks with it (python "
                                 "evaluate.py --help).")
