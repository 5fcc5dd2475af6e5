"""Stage 4: evaluate a ZUTIS checkpoint (or the training-free MaskCLIP baseline) on the paper's
benchmarks, time it, or segment your own images with your own class names.

Reads a benchmark tree (benchmarks.py lists the layouts) and a checkpoint (train.py's ckpt.pt, an
official ZUTIS file, or official:<name>). Writes to --out_dir (default out/eval_<bench>_<model>):
    metrics.json    mIoU, pixel accuracy (percent), mask AP/AP50/AP75 class-aware and class-agnostic
                    (`_agn`), ImageNet-S size buckets S/MS/ML/L, CUB foreground IoU, config, git sha
    instances.json  COCO results format (image_id, category_id, segmentation RLE, score)
    vis/            the first --save_vis images: image | ground truth | semantic | instances
    skipped.txt     unreadable images, if any

    python evaluate.py --bench voc                                     # after train.py: newest out/**/ckpt.pt
    python evaluate.py --bench coco2017 --ckpt official:coco_vit_b_16 --data_root data/coco2017
    python evaluate.py --bench voc --model maskclip --arch ViT-B/16    # the MaskCLIP baseline row
    python evaluate.py --bench imagenet_s919 --split test --ckpt CKPT   # server-format PNGs in OUT/test/
    python evaluate.py --images photos/ --classes "cat,dog,red bicycle" --ckpt CKPT   # your images
    python evaluate.py --bench voc --throughput --ckpt CKPT             # img/s, protocol printed
    python evaluate.py --bench voc --device cpu --max_images 20         # tiny CPU run
    torchrun --nproc_per_node 4 evaluate.py --bench coco2017 --ckpt CKPT  # images sharded by rank

References: paper section 4 and Tables 1-7; zutis_facts.md sections 8-10 (inference rules, per-benchmark
protocols, throughput); official trainer.py `evaluate`, utils/running_score.py, coco20k_eval.py
(behaviour); MaskCLIP (Zhou et al. 2022) for the baseline; pycocotools COCOeval for AP.
"""
import argparse
import glob
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

import benchmarks as B
import metrics
import categories as C
import common
from common import UserError
# build_segmenter and run_benchmark construct these; re-exported too, because toy.py and the tests
# call E.ZutisSegmenter, E.MaskCLIPSegmenter and E.component_instances.
from segmenters import MaskCLIPSegmenter, ZutisSegmenter, component_instances  # noqa: F401
from visualize import render_instances, render_semantic, save_vis
# Re-exported: toy.py still calls E.palette, E.overlay, E.zoom, E.with_legend.
from visualize import overlay, palette, with_legend, zoom  # noqa: F401

# ----------------------------------------------------------------------------- CLI


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench", default="voc", help=f"benchmark: {', '.join(B.BENCHES)}")
    p.add_argument("--data_root", default=None, help="benchmark folder or a parent with its standard tree (default data/<standard folder>)")
    p.add_argument("--split", default=None, help="voc: trainval|train|val; imagenet_s919: val|test; cub: test|train")
    p.add_argument("--model", default="zutis", help="zutis (a checkpoint) or maskclip (training-free baseline)")
    p.add_argument("--ckpt", default=None, help="train.py ckpt.pt, an official ZUTIS file, or official:<name> (default: newest out/**/ckpt.pt)")
    p.add_argument("--arch", default=None, help="zutis: must match the checkpoint if given; maskclip: CLIP name or path (default ViT-B/16)")
    p.add_argument("--classes", default=None, help="class names replacing the benchmark's: 'a,b,c' or a text file (background is added)")
    p.add_argument("--images", default=None, help="segment these images (a folder or a file) instead of a benchmark")
    p.add_argument("--out_dir", default=None, help="output folder (default out/eval_<bench>_<model>, or out/demo with --images)")
    p.add_argument("--max_images", type=int, default=None, help="evaluate the first N images only")
    p.add_argument("--save_vis", type=int, default=8, help="write overlays of the first N images (0: none)")
    p.add_argument("--nms", default="hard", help="hard (class-wise mask NMS, official) or none")
    p.add_argument("--nms_iou", type=float, default=0.3, help="mask IoU above which a lower-scored mask of the same class is dropped")
    p.add_argument("--t", type=float, default=0.5, help="mask proposal threshold (official 0.5)")
    p.add_argument("--class_prob", default="sigmoid", help="instance class probability: sigmoid (official, sigmoid(5*cos)) or softmax")
    p.add_argument("--coco_gt", default="stuffthings", help="coco2017 semantic GT: stuffthings (COCO-Stuff maps, official) or instances")
    p.add_argument("--coco20k_list", default=None, help="LOST's coco_20k_filenames.txt (default: in the data root)")
    p.add_argument("--unseen", action="store_true", help="coco20k: evaluate the 15 unseen classes of the 65/15 split (Table 7)")
    p.add_argument("--cub_text", default="bird", help="cub: the text 'bird' or each image's breed name ('breed')")
    p.add_argument("--max_size", type=int, default=None, help="cap the longer side of the model input (default 1024 for imagenet_s919 and --images)")
    p.add_argument("--maskclip_proposals", default="components", help="maskclip instances: components (connected components per class) or classes (one mask per class)")
    p.add_argument("--norm", default="auto", help="input normalisation: auto (checkpoint's, else imagenet; clip for maskclip), imagenet, clip")
    p.add_argument("--throughput", action="store_true", help="measure img/s of full inference at batch 1 instead of evaluating")
    p.add_argument("--throughput_images", type=int, default=50, help="images timed by --throughput")
    p.add_argument("--warmup", type=int, default=10, help="untimed warm-up iterations of --throughput")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    return p


# ----------------------------------------------------------------------------- models
# The segmenter classes themselves live in segmenters.py; here: finding and loading checkpoints.

def newest_checkpoint(root="out"):
    found = glob.glob(os.path.join(root, "**", "ckpt.pt"), recursive=True)
    if not found:
        raise UserError(f"no checkpoint found under {root}/ (train one with train.py, or pass --ckpt FILE "
                        "or --ckpt official:<name>)")
    return max(found, key=os.path.getmtime)


def checkpoint_info(spec):
    """(kind, arch or None, train config) of --ckpt without building a model: kind is "train" (a
    train.py checkpoint), "official" (official:<name> or a file in the official key layout), or "?"."""
    import model as M
    if spec.startswith("official:"):
        name = spec.split(":", 1)[1]
        return "official", M.OFFICIAL[name][2] if name in M.OFFICIAL else None, {}
    ck = None
    for safe in (True, False):  # our checkpoints carry numpy RNG states, which weights_only refuses
        try:
            ck = torch.load(spec, map_location="cpu", mmap=True, weights_only=safe)
            break
        except Exception:
            continue
    if isinstance(ck, dict) and isinstance(ck.get("config"), dict) and "model" in ck:
        return "train", ck["config"].get("arch"), ck["config"]
    if isinstance(ck, dict) and "encoder.conv1.weight" in ck:
        w = ck["encoder.conv1.weight"].shape  # [width, 3, p, p]: the released ZUTIS files are ViT-B
        return "official", f"ViT-B/{w[-1]}" if w[0] == 768 and w[-1] in (16, 32) else None, {}
    return "?", None, {}


def checkpoint_config(spec):
    """The `config` dict of a train.py checkpoint ({} for official files and names)."""
    return checkpoint_info(spec)[2]


def build_segmenter(args, categories, device):
    """--model zutis|maskclip -> a segmenter with `categories` (None: the checkpoint's own)."""
    import clip_model
    if args.model == "maskclip":
        clip, _ = clip_model.load(args.arch or "ViT-B/16", device=device)
        return MaskCLIPSegmenter(clip, categories or list(C.VOC), norm="clip" if args.norm == "auto" else args.norm,
                                 proposals=args.maskclip_proposals)
    import model as M
    spec = args.ckpt or newest_checkpoint()
    if not spec.startswith("official:") and not os.path.isfile(spec):
        raise UserError(f"checkpoint not found: {spec!r}")
    kind, arch, cfg = checkpoint_info(spec)
    if args.arch and arch and arch != args.arch and clip_model.arch_tag(arch) != clip_model.arch_tag(args.arch):
        raise UserError(f"{spec} is a {arch} checkpoint, not --arch {args.arch}")  # before any download
    # an official-layout file stores no arch name: --arch may name its CLIP (e.g. a local file)
    extra = {"arch": args.arch} if kind == "official" and args.arch and not spec.startswith("official:") else {}
    net = M.load_checkpoint(spec, categories=categories, device=device, **extra)
    norm = cfg.get("norm", "imagenet") if args.norm == "auto" else args.norm
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"loaded {spec} ({getattr(net, 'arch', arch)}, {kind} checkpoint, input norm {norm})")
    return ZutisSegmenter(net, norm, t=args.t, nms=args.nms, nms_iou=args.nms_iou, class_prob=args.class_prob)


# ----------------------------------------------------------------------------- inference

def to_input(img_u8, norm, device, max_size=None):
    """uint8 [3, H, W] -> normalised float [1, 3, h, w] on `device`, the longer side capped at
    max_size (bilinear, aspect kept; ImageNet-S protocol)."""
    mean, std = common.NORMS[norm]
    x = img_u8.to(device, non_blocking=True).float().div_(255)
    x = ((x - torch.tensor(mean, device=device)[:, None, None]) / torch.tensor(std, device=device)[:, None, None])[None]
    H, W = x.shape[-2:]
    if max_size and max(H, W) > max_size:
        s = max_size / max(H, W)
        x = F.interpolate(x, size=(max(1, round(H * s)), max(1, round(W * s))), mode="bilinear", align_corners=False)
    return x


def infer(seg, img_u8, max_size=None, instances=True):
    """Full inference on one image: uint8 [3, H, W] -> prediction dict at (H, W)."""
    return seg(to_input(img_u8, seg.norm, seg.device, max_size), tuple(img_u8.shape[-2:]), instances=instances)


def image_tensor(pil):
    return torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1)  # [H, W, 3] -> [3, H, W]


# ----------------------------------------------------------------------------- benchmark loop

class _Single:
    """Stands in for common.Dist when a caller passes no dist (one process, no process group)."""
    rank, world, is_main, ddp = 0, 1, True, False

    @staticmethod
    def gather(obj):
        return [obj]


def bench_categories(classes, bench):
    """--classes (names, a file or a list) replacing the benchmark's names. Label ids stay positional,
    so the count must match, except on VOC-layout data whose ids are just indices into the list."""
    if classes is None:
        return list(bench.categories)
    try:
        names = C.get_categories(classes)
    except ValueError as e:
        raise UserError(str(e)) from None
    if len(names) != len(bench.categories) and bench.name != "voc":
        raise UserError(f"--classes has {len(names)} names with background; {bench.name} needs {len(bench.categories)} "
                        "(label ids are positional: --classes renames the benchmark's classes)")
    return names


def _all_reduce(dist, arr):
    import torch.distributed as tdist
    if not dist.ddp:
        return arr
    t = torch.from_numpy(arr).to(getattr(dist, "device", "cpu"))
    tdist.all_reduce(t)
    return t.cpu().numpy()


def _resume_state(path, key, K, buckets):
    """Per-rank partial results of an interrupted run with the same settings, else a fresh state."""
    fresh = {"key": key, "next": 0, "conf": torch.zeros(K, K, dtype=torch.long),
             "buckets": torch.zeros(4, K, K, dtype=torch.long) if buckets else None,
             "dets": [], "gt_imgs": [], "gt_anns": [], "done": [], "skipped": [], "fg_ious": []}
    if path and os.path.isfile(path):
        try:
            st = torch.load(path, map_location="cpu", weights_only=True)
            if st.get("key") == key:
                print(f"resuming from {path}: {st['next']} images of this rank already done")
                return st
        except Exception as e:  # a partial file we cannot read is just recomputed
            print(f"ignoring unreadable {path}: {e}")
    return fresh


def _run_key(bench, n, names, seg, max_size, config):
    """What must match for partial results to be reused: data, classes, model, checkpoint, rules."""
    config = config or {}
    ck = config.get("ckpt") or ""
    rules = {k: v for k, v in config.items() if k in ("ckpt", "arch", "nms", "nms_iou", "t", "class_prob", "norm",
                                                       "coco_gt", "unseen", "cub_text", "split")}
    return json.dumps([bench.name, n, names, getattr(seg, "kind", ""), max_size,
                       os.path.getmtime(ck) if os.path.isfile(ck) else None, rules], sort_keys=True, default=str)


def _accumulate(st, bench, s, size, gt, objs, p, K, cat_ids):
    """Add one image's prediction `p` to the running state: confusion (and size buckets, CUB IoU)
    against `gt`, COCO-format detections, and VOC-style GT instances `objs`."""
    pred = p["semantic"].numpy()
    st["done"].append(s["id"])
    if gt is not None:
        st["conf"] += torch.from_numpy(metrics.confusion(gt, pred, K))
        if st["buckets"] is not None:
            bk = np.zeros((4, K, K), np.int64)
            metrics.size_bucket_update(bk, gt, pred, K)
            st["buckets"] += torch.from_numpy(bk)
        if bench.name == "cub":
            u = ((gt == 1) | (pred > 0)).sum()
            st["fg_ious"].append(float(((gt == 1) & (pred > 0)).sum() / u) if u else 1.0)
    if "masks" in p:
        st["dets"] += metrics.detections(p, s["id"], cat_ids)
    if objs is not None:
        st["gt_imgs"].append({"id": s["id"], "height": size[0], "width": size[1], "file_name": s["name"]})
        st["gt_anns"] += [B.gt_annotation(m, cat_ids[l], s["id"], 0) for m, l in objs if l < K]


def evaluate_bench(seg, bench, out_dir=None, dist=None, max_images=None, n_vis=8, max_size=None, config=None,
                   save_every=500):
    """Run `seg` over the benchmark's images (sharded by rank), accumulate confusion matrices and
    detections, gather them, and on rank 0 compute and write the metrics. Returns the metrics dict.
    Every `save_every` images each rank saves its partial results (atomically) under out_dir, so an
    interrupted run with the same settings resumes where it stopped."""
    from tqdm import tqdm
    dist = dist or _Single()
    samples = bench.samples[:max_images] if max_images else bench.samples
    names, cat_ids = list(seg.categories), bench.cat_ids or list(range(len(seg.categories)))
    K, max_size = len(names), max_size or bench.max_size
    need_inst = bench.load_instances is not None or bench.coco_gt is not None
    write_test = bench.load_semantic is None and bench.name == "imagenet_s919"
    mine = samples[dist.rank::dist.world]
    part = os.path.join(out_dir, f".partial_rank{dist.rank}of{dist.world}.pt") if out_dir else None
    st = _resume_state(part, _run_key(bench, len(samples), names, seg, max_size, config), K, bench.size_buckets)
    t0 = time.time()
    for i in tqdm(range(st["next"], len(mine)), disable=not dist.is_main, desc=bench.name, initial=st["next"], total=len(mine)):
        s = mine[i]
        try:
            pil = common.load_rgb(s["image"])
            gt = bench.load_semantic(s) if bench.load_semantic else None
            if gt is not None and gt.shape != (pil.height, pil.width):
                raise ValueError(f"ground truth {gt.shape} does not match image {(pil.height, pil.width)}")
            objs = bench.load_instances(s, gt) if bench.load_instances is not None else None
        except (OSError, ValueError) as e:
            st["skipped"].append(f"{s['image']}\t{type(e).__name__}: {e}")
            continue
        if bench.per_image_text:  # CUB breed mode: this image's own breed name is the only class
            seg.set_categories(["background", s["text"]])
        p = infer(seg, image_tensor(pil), max_size, instances=need_inst)
        _accumulate(st, bench, s, (pil.height, pil.width), gt, objs, p, K, cat_ids)
        if write_test:  # ImageNet-S server format: class I as RGB (I % 256, I // 256, 0), one PNG per image
            pred = p["semantic"].numpy()
            rgb = np.stack([pred % 256, pred // 256, np.zeros_like(pred)], -1).astype(np.uint8)
            common.save_image(rgb, os.path.join(out_dir, "test", s["name"] + ".png"))
        if dist.is_main and out_dir and i < n_vis:
            save_vis(os.path.join(out_dir, "vis", s["name"].replace("/", "__") + ".png"), np.asarray(pil), gt, p,
                     list(seg.categories), bench.ignore_index)
        if part and (i + 1) % save_every == 0 and i + 1 < len(mine):
            common.save_torch({**st, "next": i + 1}, part)
    conf = _all_reduce(dist, st["conf"].numpy())
    buckets = _all_reduce(dist, st["buckets"].numpy()) if st["buckets"] is not None else None
    parts = dist.gather([st[k] for k in ("dets", "gt_imgs", "gt_anns", "done", "skipped", "fg_ious")])
    if not dist.is_main:
        return {}
    lists = [sum((q[k] for q in parts), []) for k in range(6)]
    m = _finalize(bench, names, cat_ids, conf, buckets, *lists, need_inst=need_inst, wall=time.time() - t0)
    if out_dir:
        common.save_json({**m, "config": config or {}, **common.git_info()}, os.path.join(out_dir, "metrics.json"))
        if need_inst:
            common.save_json(lists[0], os.path.join(out_dir, "instances.json"), indent=None)
        if lists[4]:
            with common.atomic_path(os.path.join(out_dir, "skipped.txt")) as tmp, open(tmp, "w") as f:
                f.write("\n".join(lists[4]) + "\n")
        for f in glob.glob(os.path.join(out_dir, f".partial_rank*of{dist.world}.pt")):  # results are safe now
            os.remove(f)
    if lists[4]:
        print(f"skipped {len(lists[4])} unreadable images" + (f" (list in {out_dir}/skipped.txt)" if out_dir else ""))
    return m


def _finalize(bench, names, cat_ids, conf, buckets, dets, gt_imgs, gt_anns, done, skipped, fg_ious, need_inst, wall):
    """The metrics dict from the gathered state (rank 0)."""
    m = {"bench": bench.name, "n_images": len(done), "n_skipped": len(skipped), "wall_s": round(wall, 1)}
    if bench.load_semantic is not None:
        m.update(metrics.semantic_metrics(conf, names if not bench.per_image_text else ["background", "bird"]))
    if buckets is not None:
        m.update({k: metrics.bucket_miou(buckets[b]) for b, k in enumerate(("S", "MS", "ML", "L"))})
    if bench.name == "cub":  # foreground IoU: dataset-level (headline) and the mean over images
        m["fg_iou"] = float(metrics.iou_per_class(conf)[1] * 100)
        m["fg_iou_per_image"] = float(np.mean(fg_ious) * 100) if fg_ious else None
    if need_inst:
        m.update(metrics.instance_metrics(bench, names, cat_ids, dets, gt_imgs, gt_anns, done))
    m["notes"] = bench.notes
    return m


def run_benchmark(model, bench, data_root, out_dir=None, split=None, max_images=None, dist=None, **kw):
    """For train.py --eval_bench: evaluate `model` (a ZUTIS module or a segmenter) on `bench`.
    kw: classes (default: the model's own categories), norm, t, nms, nms_iou, class_prob, coco_gt,
    unseen, cub_text, coco20k_list, max_size, save_vis. Returns the metrics dict (empty off rank 0)."""
    b = B.read_bench(bench, data_root, split, coco_gt=kw.get("coco_gt", "stuffthings"), unseen=kw.get("unseen", False),
                     cub_text=kw.get("cub_text", "bird"), coco20k_list=kw.get("coco20k_list"), cache_dir=out_dir)
    seg = model if hasattr(model, "kind") else ZutisSegmenter(
        model, kw.get("norm", "imagenet"), t=kw.get("t", 0.5), nms=kw.get("nms", "hard"),
        nms_iou=kw.get("nms_iou", 0.3), class_prob=kw.get("class_prob", "sigmoid"))
    seg.set_categories(bench_categories(kw.get("classes") or seg.categories, b))
    if b.per_image_text:
        seg.set_categories(["background", "bird"])
    with torch.no_grad():
        return evaluate_bench(seg, b, out_dir, dist, max_images, kw.get("save_vis", 4), kw.get("max_size"), kw)


# ----------------------------------------------------------------------------- throughput and demo

def measure_throughput(seg, pils, max_size=None, warmup=10, instances=True):
    """img/s of full inference at batch 1 on decoded images (disk I/O excluded), after warm-up,
    with a device synchronisation after every image."""
    imgs = [image_tensor(p) for p in pils]
    dev = seg.device
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    for i in range(warmup):
        infer(seg, imgs[i % len(imgs)], max_size, instances)
    sync()
    lat, t0 = [], time.perf_counter()
    for im in imgs:
        t = time.perf_counter()
        infer(seg, im, max_size, instances)
        sync()
        lat.append(time.perf_counter() - t)
    total = time.perf_counter() - t0
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    return {"img_per_s": len(imgs) / total, "median_ms": float(np.median(lat) * 1e3), "n_images": len(imgs),
            "warmup": warmup, "device": name, "batch": 1, "dtype": "fp32", "max_size": max_size,
            "mean_hw": [float(np.mean([p.height for p in pils])), float(np.mean([p.width for p in pils]))],
            "protocol": "batch 1, fp32, original resolution (longer side capped at max_size), images decoded in "
                        "memory beforehand (no disk I/O or JPEG decoding timed); timed per image: host-to-device "
                        "copy, normalisation, encoder, decoder, semantic argmax at full resolution, instance "
                        "post-processing incl. NMS, results copied back; synchronised after each image; "
                        f"{warmup} untimed warm-up runs first"}


def run_images(seg, src, out_dir, max_size=1024):
    """--images: per image <stem>_semantic.png, <stem>_instances.png (overlays with a legend) and
    <stem>_labels.png (label ids), plus predictions.json (COCO format, category id = label id)."""
    if os.path.isfile(src):
        base, rels = os.path.dirname(src), [os.path.basename(src)]
    elif os.path.isdir(src):
        base, rels = src, common.list_images(src)
    else:
        raise UserError(f"--images not found: {src!r}")
    if not rels:
        raise UserError(f"no images in {src!r}")
    names = list(seg.categories)
    coco = {"images": [], "annotations": [], "categories": [{"id": i, "name": n} for i, n in enumerate(names) if i > 0]}
    skipped = []
    for i, rel in enumerate(rels):
        try:
            pil = common.load_rgb(os.path.join(base, rel))
        except (OSError, ValueError) as e:
            skipped.append(f"{rel}\t{e}")
            continue
        p = infer(seg, image_tensor(pil), max_size, instances=True)
        img, stem = np.asarray(pil), os.path.join(out_dir, os.path.splitext(rel)[0])
        sem = p["semantic"].numpy()
        common.save_image(render_semantic(img, sem, names), stem + "_semantic.png")
        common.save_image(render_instances(img, p, names), stem + "_instances.png")
        common.save_image(sem.astype(np.uint8 if len(names) <= 256 else np.uint16), stem + "_labels.png")
        coco["images"].append({"id": i, "file_name": rel, "height": pil.height, "width": pil.width})
        for d in metrics.detections(p, i, list(range(len(names)))):
            from pycocotools import mask as mask_util
            coco["annotations"].append({**d, "id": len(coco["annotations"]) + 1, "area": float(mask_util.area(d["segmentation"])),
                                        "bbox": [float(v) for v in mask_util.toBbox(d["segmentation"])], "iscrowd": 0})
    common.save_json(coco, os.path.join(out_dir, "predictions.json"))
    print(f"segmented {len(coco['images'])} images ({len(coco['annotations'])} instances) -> {out_dir}"
          + (f"; skipped {len(skipped)} unreadable" if skipped else ""))
    return coco


# ----------------------------------------------------------------------------- main

def main():
    # A context manager, not set_grad_enabled(False): callers that run main() in-process (tests,
    # notebooks) keep their autograd state.
    with torch.no_grad():
        _main()


def _main():
    args = get_args_parser().parse_args()
    for flag, ok in (("nms", ("hard", "none")), ("maskclip_proposals", ("components", "classes")), ("model", ("zutis", "maskclip")), ("norm", ("auto", "imagenet", "clip")),
                     ("class_prob", ("sigmoid", "softmax"))):
        if getattr(args, flag) not in ok:
            raise UserError(f"--{flag} must be one of {', '.join(ok)}, got {getattr(args, flag)!r}")
    if args.images is None and args.bench not in B.BENCHES:
        raise UserError(f"unknown benchmark {args.bench!r}: use one of {', '.join(B.BENCHES)}")
    dist = common.Dist(args.device)
    config = {**vars(args), **common.git_info()}
    dist.print0("config:")
    if dist.is_main:
        common.print_config(config)
    if args.images is not None:
        try:
            names = C.get_categories(args.classes) if args.classes else None
        except ValueError as e:
            raise UserError(str(e)) from None
        if names is None and args.model == "maskclip":
            raise UserError("--images with --model maskclip needs --classes")
        if not os.path.exists(args.images):
            raise UserError(f"--images not found: {args.images!r}")
        seg = build_segmenter(args, names, dist.device)
        run_images(seg, args.images, args.out_dir or "out/demo", args.max_size or 1024)
        return dist.close()
    out_dir = args.out_dir or f"out/eval_{args.bench}_{args.model}"
    bench = B.read_bench(args.bench, args.data_root, args.split, coco_gt=args.coco_gt, unseen=args.unseen,
                         cub_text=args.cub_text, coco20k_list=args.coco20k_list, cache_dir=out_dir,
                         **({"max_size": args.max_size} if args.bench == "imagenet_s919" and args.max_size else {}))
    names = bench_categories(args.classes, bench)
    seg = build_segmenter(args, names, dist.device)
    seg.set_categories(["background", "bird"] if bench.per_image_text else names)
    max_size = args.max_size or bench.max_size
    dist.print0(f"{bench.name}: {len(bench.samples)} images, {len(names)} classes" + "".join(f"; {n}" for n in bench.notes))
    if args.throughput:
        pils = [common.load_rgb(s["image"]) for s in bench.samples[:args.throughput_images]]
        r = measure_throughput(seg, pils, max_size, args.warmup, instances=True)
        print(f"throughput: {r['img_per_s']:.1f} img/s (median {r['median_ms']:.1f} ms) on {r['device']}, "
              f"{r['n_images']} {bench.name} images\nprotocol: {r['protocol']}")
        if dist.is_main:
            common.save_json({**r, "config": config}, os.path.join(out_dir, "throughput.json"))
        return dist.close()
    m = evaluate_bench(seg, bench, out_dir, dist, args.max_images, args.save_vis, max_size, config)
    if dist.is_main:
        keys = ("mIoU", "pixel_acc", "S", "MS", "ML", "L", "fg_iou", "fg_iou_per_image", "AP", "AP50", "AP75",
                "AP_agn", "AP50_agn", "AP75_agn")
        print(" ".join(f"{k} {m[k]:.2f}" for k in keys if m.get(k) is not None) + f" ({m['n_images']} images) -> {out_dir}")
    dist.close()


if __name__ == "__main__":
    common.run_main(main)
