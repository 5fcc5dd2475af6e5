"""Scoring rules of the evaluation benchmarks (zutis_facts.md section 9): the dataset-level semantic
confusion matrix and mIoU (official utils/running_score.py), ImageNet-S size buckets (LUSSeg's
evaluation/metric.py), and COCO-style mask AP with pycocotools' COCOeval, class-aware and class-agnostic.
benchmarks.py reads the data and re-exports these names; evaluate.py runs the model.

    conf = confusion(gt, pred, K); semantic_metrics(conf, names)   # dataset-level mIoU, pixel acc
    coco_segm_ap(gt_dict, detections, img_ids, use_cats=False)     # COCOeval segm, class-agnostic
"""
import contextlib
import io

import numpy as np


def mask_to_rle(mask):
    """bool [H, W] -> COCO RLE with a str 'counts' (JSON-serialisable)."""
    from pycocotools import mask as mask_util
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


# ----------------------------------------------------------------------------- metrics (protocol)

def confusion(gt, pred, K):
    """Dataset-level confusion matrix increment [K, K] (rows GT, columns prediction); GT labels
    outside [0, K) (255, 1000) are ignored, as in the official running_score."""
    gt, pred = np.asarray(gt).ravel(), np.asarray(pred).ravel()
    ok = (gt >= 0) & (gt < K)
    return np.bincount(K * gt[ok] + pred[ok], minlength=K * K).reshape(K, K)


def iou_per_class(conf):
    """IoU per class; NaN for classes absent from both GT and prediction."""
    conf = conf.astype(np.float64)
    tp = np.diag(conf)
    with np.errstate(invalid="ignore", divide="ignore"):
        return tp / (conf.sum(0) + conf.sum(1) - tp)


def semantic_metrics(conf, names):
    iou = iou_per_class(conf)
    return {"mIoU": float(np.nanmean(iou) * 100) if np.isfinite(iou).any() else None,
            "pixel_acc": float(np.trace(conf) / max(conf.sum(), 1) * 100),
            "per_class_iou": {n: (None if np.isnan(v) else round(float(v) * 100, 2)) for n, v in zip(names, iou)}}


def size_bucket_update(confs, gt, pred, K):
    """ImageNet-S S/MS/ML/L (LUSSeg/ImageNet-S evaluation/metric.py): a GT class's size in an image is
    ceil(100 * its pixels / all pixels); S <= 5 < MS <= 25 < ML <= 50 < L. Each bucket's confusion
    takes the background pixels plus the pixels of that image's classes in the bucket."""
    classes, counts = np.unique(gt, return_counts=True)
    sel = [np.zeros(gt.shape, bool) for _ in range(4)]
    for c, n in zip(classes, counts):
        if c == 0 or c >= K:
            continue
        pct = -(-100 * int(n) // gt.size)  # integer ceil
        sel[0 if pct <= 5 else 1 if pct <= 25 else 2 if pct <= 50 else 3] |= gt == c
    for b in range(4):
        if sel[b].any():
            m = sel[b] | (gt == 0)
            confs[b] += confusion(gt[m], pred[m], K)


def bucket_miou(conf):
    """Mean IoU over the classes that have GT pixels in this bucket (LUSSeg's `[Ps > 0]`)."""
    iou = np.nan_to_num(iou_per_class(conf))
    present = conf.sum(1) > 0
    return float(iou[present].mean() * 100) if present.any() else None


def coco_segm_ap(gt_dict, dets, img_ids, use_cats=True, cat_ids=None):
    """[AP, AP50, AP75] in percent from COCOeval(iouType='segm'); useCats=0 is class-agnostic.
    None where the GT has no instance to score."""
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


def detections(p, image_id, cat_ids):
    """Prediction dict -> COCO results (category_id via cat_ids[label]); background/unmapped dropped."""
    out = []
    for m, lab, sc in zip(p["masks"].numpy(), p["labels"].tolist(), p["scores"].tolist()):
        if lab <= 0 or lab >= len(cat_ids) or not m.any():
            continue
        out.append({"image_id": image_id, "category_id": int(cat_ids[lab]), "segmentation": mask_to_rle(m),
                    "score": round(float(sc), 5)})
    return out


def instance_metrics(bench, names, cat_ids, dets, gt_imgs, gt_anns, img_ids):
    """Class-aware and class-agnostic (useCats=0) mask AP/AP50/AP75 with COCOeval."""
    if bench.coco_gt is not None:
        keep = set(img_ids)
        gt = {**bench.coco_gt, "images": [im for im in bench.coco_gt["images"] if im["id"] in keep],
              "annotations": [a for a in bench.coco_gt["annotations"] if a["image_id"] in keep]}
    else:
        gt = {"images": gt_imgs, "annotations": [{**a, "id": k + 1} for k, a in enumerate(gt_anns)],
              "categories": [{"id": cat_ids[c], "name": names[c]} for c in range(1, len(names))]}
    if bench.eval_cat_ids is not None:  # --unseen: only these classes' GT and predictions count
        ok = set(bench.eval_cat_ids)
        gt["annotations"] = [a for a in gt["annotations"] if a["category_id"] in ok]
        dets = [d for d in dets if d["category_id"] in ok]
    out = {}
    for agn in (False, True):
        stats = coco_segm_ap(gt, dets, img_ids, use_cats=not agn, cat_ids=bench.eval_cat_ids)
        for k, v in zip(("AP", "AP50", "AP75"), stats):
            out[k + ("_agn" if agn else "")] = v
    out["n_detections"], out["n_gt_instances"] = len(dets), len(gt["annotations"])
    return out
