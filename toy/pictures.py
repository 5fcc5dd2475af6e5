"""toy/pictures.py: the figures of docs/how_it_works.md, drawn from a finished toy run's own outputs: one
category followed through the four stages (retrieval, pseudo-masks, a copy-paste training scene with
its targets, the prediction). Library file, no side effects at import; nothing here feeds a stage.

    python toy.py            # writes toy_out/how_it_works/*.jpg through how_it_works()
"""
if __name__ == "__main__":  # a library file: say what it is rather than fail on the imports below
    raise SystemExit(print(__doc__))
import json
import os

import numpy as np
import torch
from PIL import Image

import common
import dataset
import evaluate
import model
import visualize
from toy.world import CATEGORIES, eval_scene_names

CATEGORY = "star"  # the category the figures follow
ZOOM = 2  # 64 px tiles drawn at 128 px


def _pad(a, px=2):
    return np.pad(a, ((px, px), (px, px), (0, 0)), constant_values=255)


def _framed(a, rgb, px=3):
    out = np.empty((a.shape[0] + 2 * px, a.shape[1] + 2 * px, 3), np.uint8)
    out[:] = rgb
    out[px:-px, px:-px] = a
    return out


def _titled(rows, title):
    """Rows of equal width stacked under a one-line title."""
    body = np.concatenate(rows, 0)
    return np.concatenate([visualize.with_legend(np.zeros((0, body.shape[1], 3), np.uint8), [(None, title)]), body], 0)


def _row(tiles, label):
    """Tiles side by side after a label column."""
    h = tiles[0].shape[0]
    name = visualize.with_legend(np.zeros((0, 120, 3), np.uint8), [(None, label)])
    name = np.pad(name, ((0, max(0, h - name.shape[0])), (0, 0), (0, 0)), constant_values=255)[:h]
    return np.concatenate([name, *tiles], 1)


def retrieval_figures(out, path_retrieval, path_masks, n=8):
    """The category's archive, best first (build_archive.py, topk_stream), framed green where the hidden
    label agrees and red where it does not; then the same images with their pseudo-masks in red
    (pseudo_label.py, boundary_saliency then write_mask)."""
    arc = common.load_archive(os.path.join(out, "archive", "archive.json"))
    hidden = json.load(open(os.path.join(out, "world", "hidden", "index_labels.json")))
    label = dict(zip(hidden["files"], hidden["labels"]))
    entries = arc["archive"][CATEGORY]
    picks = [("ranks 1-%d" % n, entries[:n]), (f"ranks {len(entries) - n + 1}-{len(entries)}", entries[-n:])]
    retrieved, masked = [], []
    for name, part in picks:
        tiles, over = [], []
        for e in part:
            img = np.asarray(common.load_rgb(common.image_path(arc, e)))
            ok = label.get(e["path"]) == CATEGORIES.index(CATEGORY)
            tiles.append(_framed(visualize.zoom(img, ZOOM), (0, 170, 0) if ok else (220, 0, 0)))
            mask = np.asarray(Image.open(os.path.join(out, "masks", common.mask_relpath(arc, e)))) > 127
            over.append(_pad(visualize.zoom(visualize.overlay(img, mask.astype(np.int64), np.array([[0, 0, 0], [255, 0, 0]])), ZOOM), 3))
        retrieved.append(_row(tiles, name))
        masked.append(_row(over, name))
    common.save_image(_titled(retrieved, f"1. retrieval: the archive of '{CATEGORY}' (green: right, red: wrong)"),
                      path_retrieval, quality=85)
    common.save_image(_titled(masked, "2. pseudo-masks of the same images (red: foreground)"), path_masks, quality=85)


def training_scene_figure(out, path, n=4):
    """Copy-paste scenes that contain the category, as train.py draws them (dataset.ArchiveDataset, the
    toy's --aug), with their targets: the semantic map (black: background, grey: padding, ignored) and
one colour per instance."""
    ds = dataset.ArchiveDataset(os.path.join(out, "archive", "archive.json"), os.path.join(out, "masks"), crop=64,
                                jitter=(0.4, 0.4, 0.4, 0.0), p_gray=0.0)
    k = ds.categories.index(CATEGORY)
    mean, std = torch.tensor(ds.mean).view(3, 1, 1), torch.tensor(ds.std).view(3, 1, 1)
    pal, cols = visualize.palette(256), {"image": [], "semantic target": [], "instance targets": []}
    for i in range(len(ds)):
        item = ds[i]
        if k not in item["category_ids"].tolist() or len(item["category_ids"]) < 2:
            continue
        img = (item["image"] * std + mean).clamp(0, 1).mul(255).byte().permute(1, 2, 0).numpy()  # [c, c, 3]
        sem = item["semantic"].numpy()
        inst = np.zeros(sem.shape, np.int64)
        for j, m in enumerate(item["instance_masks"].numpy()):  # later instances lie on top
            inst[m] = j + 1
        pad = (sem == ds.ignore_index)[..., None]
        cols["image"].append(img)
        cols["semantic target"].append(np.where(pad, np.uint8(128), pal[np.where(pad[..., 0], 0, sem)]))
        cols["instance targets"].append(np.where(pad, np.uint8(128), visualize.palette(64)[1:][::-1][inst] * (inst > 0)[..., None]))
        if len(cols["image"]) == n:
            break
    rows = [_row([_pad(visualize.zoom(t, ZOOM)) for t in tiles], name) for name, tiles in cols.items()]
    legend = visualize.with_legend(np.full((1, rows[0].shape[1], 3), 255, np.uint8),
                                   [(pal[c], ds.categories[c]) for c in range(1, len(ds.categories))], cols=6)
    common.save_image(np.concatenate([_titled(rows, "3. training scenes with the category and their targets"), legend]),
                      path, quality=85)


def prediction_figure(out, path, n=4):
    """Evaluation scenes with the category: ground truth, the semantic map (model.semantic_from_outputs)
    and the instances (model.instances_from_outputs), through evaluate.ZutisSegmenter like evaluate.py."""
    ckpt, names = os.path.join(out, "train", "ckpt.pt"), ["background"] + CATEGORIES
    seg = evaluate.ZutisSegmenter(model.load_checkpoint(ckpt, categories=names, device="cpu"),
                                  evaluate.checkpoint_config(ckpt).get("norm", "imagenet"))
    voc, k = os.path.join(out, "world", "VOC2012"), names.index(CATEGORY)
    pal, cols = visualize.palette(256), {"image": [], "ground truth": [], "semantic map": [], "instances": []}
    for name in eval_scene_names(os.path.join(out, "world")):
        gt = np.asarray(Image.open(os.path.join(voc, "SegmentationClass", name + ".png")))
        if not (gt == k).any():
            continue
        pil = common.load_rgb(os.path.join(voc, "JPEGImages", name + ".jpg"))
        img = np.asarray(pil)
        with torch.no_grad():
            p = evaluate.infer(seg, evaluate.image_tensor(pil))
        inst = np.zeros(img.shape[:2], np.int64)
        for i in np.argsort(p["scores"].numpy()):  # best last, drawn on top
            if p["scores"][i] > 0.1:  # below that the instance view is noise
                inst[p["masks"][i].numpy()] = i + 1
        cols["image"].append(img)
        cols["ground truth"].append(visualize.overlay(img, gt, pal, ignore=255))
        cols["semantic map"].append(visualize.overlay(img, p["semantic"].numpy(), pal))
        cols["instances"].append(visualize.overlay(img, inst, visualize.palette(64)[1:][::-1]))
        if len(cols["image"]) == n:
            break
    rows = [_row([_pad(visualize.zoom(t, ZOOM)) for t in tiles], name) for name, tiles in cols.items()]
    legend = visualize.with_legend(np.full((1, rows[0].shape[1], 3), 255, np.uint8),
                                   [(pal[c], names[c]) for c in range(1, len(names))], cols=6)
    common.save_image(np.concatenate([_titled(rows, "4. evaluation scenes with the category: prediction"), legend]),
                      path, quality=85)


def how_it_works(fig_dir, out):
    """The four figures of docs/how_it_works.md from the toy run in `out`."""
    retrieval_figures(out, os.path.join(fig_dir, "1_retrieval.jpg"), os.path.join(fig_dir, "2_pseudo_masks.jpg"))
    training_scene_figure(out, os.path.join(fig_dir, "3_training_scenes.jpg"))
    prediction_figure(out, os.path.join(fig_dir, "4_prediction.jpg"))
