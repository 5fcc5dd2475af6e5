"""toy/report.py: toy.py's report: metrics from the generator's hidden labels, the results table, the
picture grid. Library file, no side effects at import; nothing here feeds a training stage. The toy
corner sits above every stage, so it uses evaluate.py's segmenters the way a user's script would.

    python toy.py            # writes toy_out/results.md, results.json and grid.png through these functions
"""
if __name__ == "__main__":  # a library file: say what it is rather than fail on the imports below
    raise SystemExit(print(__doc__))
import json
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import clip_model
import common
import evaluate
import model
import visualize
from toy.world import CATEGORIES, eval_scene_names

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


def proposal_recall(ckpt, world_dir, grid=8, device="cpu"):
    """Where instance AP is lost (reporting only): the share of ground-truth instances that some
    decoder proposal (last layer, P > 0.5, before NMS) covers at IoU >= 0.5 ("recall"), and that the
    best such proposal also gets the right class by the official rule (mean unit token, argmax over the
    text embeddings, background included: "classed"), split by whether the instance's class is unique in
    its scene or shared with another instance. Next to two oracles: the best mask drawable on the
    encoder's grid x grid patch grid (majority vote per patch), and the class that the semantic argmax
    gives most pixels inside the true mask ("semantic")."""
    net = model.load_checkpoint(ckpt, categories=["background"] + CATEGORIES, device=device).eval()
    norm = evaluate.checkpoint_config(ckpt).get("norm", "imagenet")
    voc = os.path.join(world_dir, "VOC2012")
    keys = ("instances", "recall", "classed", "oracle", "semantic")
    hits = {"unique": dict.fromkeys(keys, 0), "repeated": dict.fromkeys(keys, 0)}
    for name in eval_scene_names(world_dir):
        pil = common.load_rgb(os.path.join(voc, "JPEGImages", name + ".jpg"))
        inst = np.asarray(Image.open(os.path.join(voc, "SegmentationObject", name + ".png")))
        sem = np.asarray(Image.open(os.path.join(voc, "SegmentationClass", name + ".png")))
        with torch.no_grad():
            out = net(evaluate.to_input(evaluate.image_tensor(pil), norm, device))
            probs = out["mask_logits"][0, -1].float().sigmoid()  # [Q, 2h, 2w]
            props = (F.interpolate(probs[None], size=inst.shape, mode="bilinear", align_corners=False)[0] > 0.5).cpu().numpy()
            tokens = out["patch_tokens"][0].float().flatten(0, 1)  # [2h, 2w, C_t] -> [2h*2w, C_t]
            binary = (probs > 0.5).flatten(1).float()  # [Q, 2h*2w]
            prop_cls = model.mean_token_cos(binary, tokens, out["text_emb"].float()).argmax(-1).cpu().numpy()  # [Q]
            sem_pred = model.semantic_from_outputs(out, inst.shape).cpu().numpy()  # [H, W]
        ids = sorted(set(np.unique(inst).tolist()) - {0, 255})
        cls = [sem[inst == i][0] for i in ids]
        H, W = inst.shape
        for i, c in zip(ids, cls):
            g = inst == i
            cell = g.reshape(grid, H // grid, grid, W // grid).mean((1, 3)) > 0.5  # [S, S] -> [grid, grid]
            oracle = np.kron(cell, np.ones((H // grid, W // grid), bool))  # [grid, grid] -> [S, S]
            iou = (props & g).sum((1, 2)) / np.maximum((props | g).sum((1, 2)), 1)  # [Q]
            h = hits["repeated" if cls.count(c) > 1 else "unique"]
            h["instances"] += 1
            h["recall"] += bool(iou.max() >= 0.5)
            h["classed"] += bool(iou.max() >= 0.5 and prop_cls[iou.argmax()] == c)
            h["oracle"] += bool((oracle & g).sum() >= 0.5 * max((oracle | g).sum(), 1))
            h["semantic"] += bool(np.bincount(sem_pred[g], minlength=c + 1).argmax() == c)
    return {f"{k}_{m}": (v[m] if m == "instances" else 100.0 * v[m] / max(v["instances"], 1))
            for k, v in hits.items() for m in keys}


def picture_grid(path, world_dir, clip_path, ckpt, n=6, device="cpu"):
    """Rows of evaluation scenes: image | ground truth | MaskCLIP | ZUTIS semantic | ZUTIS instances."""
    names = ["background"] + CATEGORIES
    zutis = evaluate.ZutisSegmenter(model.load_checkpoint(ckpt, categories=names, device=device),
                             evaluate.checkpoint_config(ckpt).get("norm", "imagenet"))
    maskclip = evaluate.MaskCLIPSegmenter(clip_model.load(clip_path, device=device)[0], names)
    voc = os.path.join(world_dir, "VOC2012")
    ids = eval_scene_names(world_dir)[:n]
    pal, f, rows = visualize.palette(256), 3, []
    for name in ids:
        pil = common.load_rgb(os.path.join(voc, "JPEGImages", name + ".jpg"))
        img = np.asarray(pil)
        gt = np.asarray(Image.open(os.path.join(voc, "SegmentationClass", name + ".png")))
        with torch.no_grad():
            pm, pz = (evaluate.infer(s, evaluate.image_tensor(pil)) for s in (maskclip, zutis))
        inst = np.zeros(img.shape[:2], np.int64)
        for i in np.argsort(pz["scores"].numpy()):
            if pz["scores"][i] > 0.1:  # below that the instance view is noise
                inst[pz["masks"][i].numpy()] = i + 1
        cells = [img, visualize.overlay(img, gt, pal, ignore=255), visualize.overlay(img, pm["semantic"].numpy(), pal),
                 visualize.overlay(img, pz["semantic"].numpy(), pal),
                 visualize.overlay(img, inst, visualize.palette(64)[1:][::-1])]
        rows.append(np.concatenate([np.pad(visualize.zoom(c, f), ((2, 2), (2, 2), (0, 0)), constant_values=255)
                                    for c in cells], 1))
    grid = np.concatenate(rows, 0)
    titles = ["image", "ground truth", "MaskCLIP", "ZUTIS semantic", "ZUTIS instances (score > 0.1)"]
    header = visualize.with_legend(np.zeros((0, grid.shape[1], 3), np.uint8), [(None, t) for t in titles],
                                   cols=len(titles))
    legend = visualize.with_legend(np.full((1, grid.shape[1], 3), 255, np.uint8),
                           [(pal[c], names[c]) for c in range(1, len(names))]
                           + [(None, "background: no overlay"), (None, "instances: a colour each")], cols=len(titles))
    common.save_image(np.concatenate([header, grid, legend], 0), path)


def results_table(res, times, cfg):
    """results.md: the metrics, then each stage's {"wall", "cpu", "resumed"} from `times`."""
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
    named = [(f"{who} naming {what} proposals", res.get(f"{key}_{kind}_proposals", {})) for kind, what in
             (("oracle", "the true instance masks as"), ("boundary", "boundary-saliency"))
             for key, who in (("zutis", "ZUTIS"), ("maskclip", "MaskCLIP"))]
    for label, m in (("MaskCLIP (training-free baseline)", mc), ("ZUTIS (class-wise NMS 0.3)", z),
                     ("ZUTIS, no NMS", zn), ("ZUTIS, no stop-gradient (NMS)", zs), *named):
        if m:
            lines.append(f"| {label} | {pct(m['mIoU'])} | {pct(m['AP'])} | {pct(m['AP50'])} | {pct(m['AP_agn'])} | {pct(m['AP50_agn'])} |")
    pr = res.get("proposals")
    if pr:
        lines += ["", "| where instance AP is lost (% of instances) | covered by a ZUTIS proposal at IoU >= 0.5 | "
                      "... and it has the right class | covered by the best 8x8 patch-grid mask | "
                      "right class by the semantic majority in the true mask |", "|---|---|---|---|---|"]
        lines += [f"| class {k} in its scene ({pr[k + '_instances']} instances) | {pct(pr[k + '_recall'])} | "
                  f"{pct(pr[k + '_classed'])} | {pct(pr[k + '_oracle'])} | {pct(pr[k + '_semantic'])} |"
                  for k in ("unique", "repeated")]
    lines += ["", "| stage | wall time (s) | CPU time (s) |", "|---|---|---|"]
    tag = lambda t: " (continued a killed run: the part after the interruption only)" if t["resumed"] else ""
    lines += [f"| {k} | {t['wall']:.0f}{tag(t)} | {t['cpu']:.0f} |" for k, t in times.items()]
    lines += [f"| total | {sum(t['wall'] for t in times.values()):.0f} | {sum(t['cpu'] for t in times.values()):.0f} |", "",
              "All numbers in percent. Ground truth and hidden labels are read only here, never by a training stage."]
    return "\n".join(lines) + "\n"


def flat_results(res):
    """The metrics the floors refer to, as one flat dict (percent)."""
    out = {k: res[k] for k in ("clip_zero_shot", "clip_precision@50", "archive_precision", "pseudo_mask_iou")}
    for run in ("zutis", "zutis_no_nms", "zutis_no_stop_grad", "maskclip", "zutis_oracle_proposals",
                "maskclip_oracle_proposals", "zutis_boundary_proposals", "maskclip_boundary_proposals"):
        for k, v in res.get(run, {}).items():
            out[f"{run}_{k}"] = v
    for k, v in res.get("proposals", {}).items():
        out[f"proposals_{k}"] = v
    if res.get("zutis") and res.get("maskclip"):
        out["zutis_minus_maskclip_mIoU"] = res["zutis"]["mIoU"] - res["maskclip"]["mIoU"]
    return out
