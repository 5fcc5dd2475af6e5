"""Stage 4: evaluate a ZUTIS checkpoint (or the training-free MaskCLIP baseline) on the paper's benchmarks,
segment your own images with your own class names, or name someone else's mask proposals.

Writes to --out_dir: metrics.json (mIoU, pixel accuracy, mask AP class-aware and class-agnostic `_agn`, the
ImageNet-S evaluator's S/MS/ML/L, Acc and FMeasure, CUB foreground IoU, the config), instances.json (COCO
results), vis/ (image | ground truth | semantic | instances) and skipped.txt; docs/evaluate.md has the rest.

    python evaluate.py --bench coco2017 --ckpt official:coco_vit_b_16  # default: the newest out/**/ckpt.pt
    python evaluate.py --bench voc --model maskclip --arch ViT-B/16    # the MaskCLIP baseline row
    python evaluate.py --bench imagenet_s919 --split test --ckpt CKPT   # server-format PNGs in OUT/test/
    python evaluate.py --images photos/ --classes "cat,dog,red bicycle" --ckpt CKPT
    python evaluate.py --bench coco20k --proposals cutler_coco20k.json --ckpt official:coco_vit_b_16
    torchrun --nproc_per_node 4 evaluate.py --bench coco2017 --ckpt CKPT  # images sharded by rank

From Python: evaluate.load (its docstring), seg.segment and seg.draw.

References: paper section 4; official networks/zutis.py `predict`, trainer.py `evaluate`; MaskCLIP (Zhou et al. 2022).
"""
import argparse
import contextlib
import functools
import glob
import json
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import benchmarks
import categories
import clip_model
import common
import model
from common import UserError
from visualize import panels, render_instances, render_semantic, save_vis

CHOICES = {"model": ("zutis", "maskclip"), "nms": ("hard", "none"), "class_prob": ("sigmoid", "softmax"),
           "proposal_score": ("product", "class", "proposal"), "cub_text": ("bird", "breed")}


def get_args_parser():
    p = common.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench", default="voc", help=f"The benchmark: {', '.join(benchmarks.BENCHES)}.")
    p.add_argument("--data_root", default=None, help="Its folder, or a parent of its standard tree (default data/<folder>).")
    p.add_argument("--split", default=None, help="voc: trainval, train or val; imagenet_s919: val or test; cub: test or train.")
    p.add_argument("--model", default="zutis", help="zutis (a checkpoint) or maskclip (the training-free baseline).")
    p.add_argument("--ckpt", default=None, help="A train.py ckpt.pt, an official ZUTIS file or official:<name> (default: "
                   "the newest out/**/ckpt.pt).")
    p.add_argument("--arch", default=None, help="A CLIP name or file, overriding the checkpoint's (maskclip: ViT-B/16).")
    p.add_argument("--classes", default=None, help="Names replacing the benchmark's: a list name, 'a,b,c', one name or a file.")
    p.add_argument("--images", default=None, help="Segment these images (a folder or a file) instead of a benchmark.")
    p.add_argument("--proposals", default=None, help="Name the RLE masks of this COCO results JSON (CutLER, SAM) instead "
                   "of the model's own.")
    p.add_argument("--out_dir", default=None, help="The output folder (default out/eval_<bench>_<model>, or out/demo).")
    p.add_argument("--max_images", type=common.number(int, 1, what="--max_images"), default=None,
                   help="Evaluate the first N images only.")
    p.add_argument("--save_vis", type=common.number(int, 0, what="--save_vis"), default=8,
                   help="Draw the first N images into vis/ (0: none).")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda.")
    p.add_argument("--dtype", default="float32", help=common.DTYPE_HELP + "; the inference rules run in float32.")
    g = p.add_argument_group("inference rules (defaults: the official code)")
    g.add_argument("--nms", default="hard", help="hard (class-wise mask NMS) or none.")
    g.add_argument("--nms_iou", type=common.number(float, 0, 1, what="an IoU"), default=0.3,
                   help="Mask IoU above which NMS drops the lower-scored mask.")
    g.add_argument("--t", type=common.number(float, 0, 1, what="a probability threshold"), default=0.5,
                   help="The threshold of the decoder's mask probabilities.")
    g.add_argument("--class_prob", default="sigmoid", help="sigmoid (sigmoid(5 cos), official) or softmax (paper Eq. 4).")
    g.add_argument("--max_size", type=common.number(int, 1, what="a side in pixels"), default=None,
                   help="Resize a longer side above this (default 1024 for imagenet_s919 and --images).")
    g.add_argument("--proposal_score", default="product", help="A named proposal's score: product (its score x class "
                   "probability), class or proposal.")
    g.add_argument("--with_decoder", action="store_true", help="With --proposals, keep the model's own masks too.")
    g = p.add_argument_group("benchmark options")
    g.add_argument("--unseen", action="store_true", help="coco20k: score the 15 unseen classes of the 65/15 split.")
    g.add_argument("--cub_text", default="bird", help="cub: the text 'bird', or each image's breed name ('breed').")
    return p


# ----------------------------------------------------------------------------- segmenters
# A segmenter maps one normalised image x [1, 3, h, w] and the original (H, W) to {"semantic": [H, W]} plus,
# with instances, "masks" [N, H, W], "labels" [N], "scores" [N], all on the CPU. It has `kind`, `norm` (the
# input normalisation), `device`, `categories` and `set_categories(names)`. Under --dtype bfloat16/float16
# only the networks run in autocast: their outputs are cast to fp32 before the text cosines, upsampling,
# thresholds and NMS, which decide labels and masks.

class Segmenter:
    """The Python entry both segmenters share (made by `load`): segment an image, draw the result."""
    max_size = 1024  # a longer side above this is resized first, as --images does

    def segment(self, image, instances=True):
        """A path (read as a viewer shows it: EXIF orientation applied), a PIL image or a uint8 array
        [H, W(, 3|4)] (both taken as given) -> {"semantic": long [H, W], "masks": bool [N, H, W], "labels":
        long [N], "scores": float [N], "names": the class names (label id = index)}, on the CPU."""
        return {**infer(self, image_tensor(as_rgb(image)), self.max_size, instances=instances), "names": list(self.categories)}

    def draw(self, image, out):
        """image | semantic map | instances, titled, with legends -> a PIL image (.save("overlay.png"))."""
        return Image.fromarray(panels(np.asarray(as_rgb(image)), None, out, out["names"]))


def as_rgb(image):
    """A path, a PIL image or a uint8 array -> 8-bit RGB PIL image (common.to_rgb's conversions)."""
    if isinstance(image, Image.Image):
        return common.to_rgb(image)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or not (image.ndim == 2 or image.ndim == 3 and image.shape[2] in (3, 4)):
            raise ValueError(f"an image array is uint8 [H, W], [H, W, 3] or [H, W, 4], not {image.dtype} {list(image.shape)}")
        return common.to_rgb(Image.fromarray(image))
    return common.load_rgb(image, displayed=True)


def name_proposals(seg, proposals, tokens, text, class_prob, own=None):
    """The official instance class rule for external masks -> the instance dict. proposals = (bool masks
    [N, H, W], scores [N]), unit tokens [gh, gw, C], text [K, C], class_prob(cos [N, K]) -> probabilities;
    `own` (the segmenter's own instances) joins before NMS. A mask's token weights are the transpose of the
    bilinear upsampling from the token grid to (H, W) that the semantic map uses: the mean token is the
    mean of the upsampled tokens inside the mask. Background and empty masks are dropped, then NMS."""
    (masks, scores), (gh, gw), dev = proposals, tokens.shape[:2], tokens.device
    ay, ax = (F.interpolate(torch.eye(n, device=dev)[None], size=size, mode="linear", align_corners=False)[0]
              for n, size in ((gh, masks.shape[-2]), (gw, masks.shape[-1])))  # [gh, H], [gw, W]
    w = torch.cat([ay @ m.to(dev).float() @ ax.t() for m in masks.split(16)]) if len(masks) else ay.new_zeros(0, gh, gw)
    prob, labels = class_prob(model.mean_token_cos(w.flatten(1), tokens.flatten(0, 1).float(), text.float())).max(-1)
    scores = {"product": scores.to(dev) * prob, "class": prob, "proposal": scores.to(dev).float()}[seg.proposal_score]
    parts = [{"masks": masks.to(dev), "labels": labels, "scores": scores}] + ([own] if seg.with_decoder else [])
    masks, labels, scores = (torch.cat([q[k].to(dev) for q in parts]) for k in ("masks", "labels", "scores"))
    ok = (labels != 0) & masks.flatten(1).any(1)
    masks, labels, scores = masks[ok], labels[ok], scores[ok]
    keep = model.mask_nms(masks, scores, labels, seg.nms_iou) if seg.nms == "hard" else \
        torch.argsort(scores, descending=True, stable=True)
    return {"masks": masks[keep].cpu(), "labels": labels[keep].cpu(), "scores": scores[keep].cpu()}


class ZutisSegmenter(Segmenter):
    """model.py's ZUTIS with the official inference rules; logits and mask probabilities are upsampled to
    the original size. With proposals, the masks are named from the model's tokens (name_proposals)."""
    kind = "zutis"

    def __init__(self, model, norm="imagenet", t=0.5, nms="hard", nms_iou=0.3, class_prob="sigmoid",
                 proposal_score="product", with_decoder=False, dtype="float32"):
        self.model, self.norm, self.device = model.eval(), norm, next(model.parameters()).device
        self.dtype = common.resolve_dtype(dtype, self.device)  # None: float32, no autocast
        self.kw = dict(t=t, nms=nms, nms_iou=nms_iou, class_prob=class_prob)
        self.nms, self.nms_iou, self.proposal_score, self.with_decoder = nms, nms_iou, proposal_score, with_decoder
        self._cache = {}

    @property
    def categories(self):
        return list(self.model.categories)

    def set_categories(self, names):
        """Re-embed only on a new list; CUB's breed mode revisits lists, so embeddings are cached."""
        names, key = list(names), tuple(names)
        if names == self.categories:
            return
        if key in self._cache:
            self.model.text_emb, self.model.categories = self._cache[key].to(self.device), names
        else:
            self.model.set_categories(names)
            self._cache[key] = self.model.text_emb.detach().cpu()

    @torch.no_grad()
    def __call__(self, x, out_size, instances=True, proposals=None):
        if min(x.shape[-2:]) < self.model.patch_size:
            raise ValueError(f"the image {tuple(x.shape[-2:])} is smaller than one {self.model.patch_size}-pixel patch")
        with common.autocast(self.device, self.dtype):
            out = self.model(x)
        out = {k: v.float() if torch.is_tensor(v) else v for k, v in out.items()}
        res = {"semantic": model.semantic_from_outputs(out, out_size).cpu()}
        if not instances:
            return res
        own = model.instances_from_outputs(out, out_size, **self.kw) if proposals is None or self.with_decoder else None
        if proposals is None:
            return {**res, **{k: v.cpu() for k, v in own.items()}}
        prob = functools.partial(model.class_probability, rule=self.kw["class_prob"], logit_scale=out["logit_scale"])
        return {**res, **name_proposals(self, proposals, out["patch_tokens"][0], out["text_emb"], prob, own)}


class MaskCLIPSegmenter(Segmenter):
    """Training-free MaskCLIP (Zhou et al. 2022): value-path dense CLIP features, cosine with the 85-template
    text embeddings, "background" a text class like any other. Instances (the paper's Table 3 baseline) are
    the connected components of each predicted class, scored by the mean softmax probability (CLIP's own
    temperature) of that class inside; proposals are named with that probability."""
    kind = "maskclip"

    def __init__(self, clip, categories, norm="clip", max_instances=100, nms="hard", nms_iou=0.3,
                 proposal_score="product", with_decoder=False, dtype="float32"):
        self.clip, self.norm, self.max_instances = clip.eval(), norm, max_instances
        self.scale, self.device = clip.logit_scale.detach().exp().item(), next(clip.parameters()).device
        self.dtype = common.resolve_dtype(dtype, self.device)
        self.nms, self.nms_iou, self.proposal_score, self.with_decoder = nms, nms_iou, proposal_score, with_decoder
        self._cache, self.categories = {}, []
        self.set_categories(categories)

    def set_categories(self, names):
        key = tuple(names)
        if key not in self._cache:  # CUB breed mode switches names per image: each list is embedded a single time
            self._cache[key] = clip_model.text_embeddings(self.clip, list(names), categories.TEMPLATES)
        self.text, self.categories = self._cache[key], list(names)

    @torch.no_grad()
    def __call__(self, x, out_size, instances=True, proposals=None):
        p, (H, W) = self.clip.visual.patch_size, x.shape[-2:]
        size = (max(1, round(H / p)) * p, max(1, round(W / p)) * p)
        if size != (H, W):  # forward_maskclip needs multiples of the patch size
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        with common.autocast(self.device, self.dtype):
            f = self.clip.visual.forward_maskclip(x)
        f = F.normalize(f.float(), dim=-1)[0]  # [h, w, D]
        logits = torch.einsum("hwd,kd->khw", f, self.text.to(f))[None]  # cosines [1, K, h, w]
        logits = F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)[0]  # [K, H, W]
        sem = logits.argmax(0)
        out = {"semantic": sem.cpu()}
        if not instances:
            return out
        lse = torch.logsumexp(logits * self.scale, dim=0)  # p(c | pixel) = exp(s l_c - logsumexp_k s l_k)
        comps = component_instances(sem, lambda c: torch.exp(logits[c] * self.scale - lse).cpu().numpy(), self.max_instances)
        if proposals is None:
            return {**out, **comps}
        prob = functools.partial(model.class_probability, rule="softmax", logit_scale=self.scale)
        return {**out, **name_proposals(self, proposals, f, self.text.to(f), prob, comps)}


def component_instances(sem, prob_of, max_n=100):
    """Connected components (8-connectivity) of every non-background class of `sem` [H, W], scored by the
    mean of prob_of(c) [H, W] inside, the best max_n kept."""
    from scipy import ndimage
    s, cand = sem.cpu().numpy(), []  # (score, class, component labels, component index)
    for c in np.unique(s):
        if c == 0:
            continue
        lab, n = ndimage.label(s == c, structure=np.ones((3, 3)))
        scores = ndimage.mean(prob_of(int(c)), labels=lab, index=np.arange(1, n + 1))
        cand += [(float(sc), int(c), lab, i + 1) for i, sc in enumerate(np.atleast_1d(scores))]
    cand = sorted(cand, key=lambda z: -z[0])[:max_n]
    masks = torch.from_numpy(np.stack([lab == i for _, _, lab, i in cand])) if cand else torch.zeros((0, *s.shape), dtype=torch.bool)
    return {"masks": masks, "labels": torch.tensor([c for _, c, _, _ in cand], dtype=torch.long),
            "scores": torch.tensor([sc for sc, _, _, _ in cand], dtype=torch.float)}


# ----------------------------------------------------------------------------- checkpoints and inputs

def newest_checkpoint(root="out"):
    found = glob.glob(os.path.join(root, "**", "ckpt.pt"), recursive=True)
    if not found:
        raise UserError(f"no checkpoint under {root}/: train one with train.py, or pass --ckpt FILE or official:<name>")
    return max(found, key=os.path.getmtime)


def checkpoint_config(spec):
    """The `config` dict of a train.py checkpoint; {} for official files and official:<name>."""
    if str(spec).startswith("official:"):
        return {}
    ck = common.torch_load(spec)
    return dict(ck["config"]) if isinstance(ck, dict) and isinstance(ck.get("config"), dict) else {}


def build_segmenter(args, classes, device):
    """--model zutis|maskclip -> a segmenter with `classes` (None: the checkpoint's own)."""
    kw = dict(nms=args.nms, nms_iou=args.nms_iou, proposal_score=args.proposal_score, with_decoder=args.with_decoder,
              dtype=args.dtype)
    if args.model == "maskclip":
        clip, _ = clip_model.load(args.arch or "ViT-B/16", device=device)
        return MaskCLIPSegmenter(clip, classes or list(categories.VOC), **kw)
    spec = args.ckpt or newest_checkpoint()
    cfg = checkpoint_config(spec)  # also turns a missing or unreadable file into a one-line error
    names = list(clip_model.MODELS)
    if args.arch in names and cfg.get("arch") in names and args.arch != cfg["arch"]:  # before any download
        raise UserError(f"{spec} is a {cfg['arch']} checkpoint, not --arch {args.arch}")
    net = model.load_checkpoint(spec, categories=classes, device=device, arch=args.arch)
    norm = cfg.get("norm", "imagenet")
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"loaded {spec} ({getattr(net, 'arch', '?')}, input norm {norm})")
    return ZutisSegmenter(net, norm, t=args.t, class_prob=args.class_prob, **kw)


RULES = ("t", "nms", "nms_iou", "class_prob", "max_size", "proposal_score", "with_decoder", "arch")


def load(spec, classes=None, device="auto", dtype="float32", **rules):
    """The Python entry, as clip.load: a segmenter for `spec` = a train.py ckpt.pt, an official ZUTIS file,
    "official:<name>", or "maskclip" / "maskclip:<CLIP name or file>" (default ViT-B/16) for the baseline.
    classes: a list, "a,b,c", a built-in list name or a file, background added (None: the checkpoint's
    own; VOC's for MaskCLIP). dtype as --dtype; rules: evaluate.py's flags of the same names and defaults.

        seg = evaluate.load("official:coco_vit_b_16", classes=["cat", "dog", "red bicycle"])
        out = seg.segment("photo.jpg")   # out["semantic"], out["masks"], out["labels"], out["scores"], out["names"]
        seg.draw("photo.jpg", out).save("overlay.png")
    """
    if set(rules) - set(RULES):
        raise TypeError(f"load() takes the rules {', '.join(RULES)}, not {', '.join(sorted(set(rules) - set(RULES)))}")
    args, spec = get_args_parser().parse_args([]), str(spec)
    maskclip = spec == "maskclip" or spec.startswith("maskclip:")
    vars(args).update({"model": "maskclip" if maskclip else "zutis", "ckpt": None if maskclip else spec, "dtype": dtype,
                       "arch": spec.partition(":")[2] or None if maskclip else None, **rules})
    check_choices(args)
    names = None if classes is None else categories.get_categories(classes)
    seg = build_segmenter(args, names, common.check_device(device))
    seg.max_size = args.max_size or Segmenter.max_size
    return seg


def to_input(img_u8, norm, device, max_size=None):
    """uint8 [3, H, W] -> normalised float [1, 3, h, w] on `device`. A longer side above max_size is resized
    as official datasets/imagenet_s.py does: the uint8 image with PIL bilinear (antialiased), the longer side
    to max_size, the shorter to int(short / long * max_size), then normalised."""
    H, W = img_u8.shape[-2:]
    if max_size and max(H, W) > max_size:
        h, w = (int(H / W * max_size), max_size) if W > H else (max_size, int(W / H * max_size))
        pil = Image.fromarray(img_u8.permute(1, 2, 0).numpy()).resize((w, h), Image.BILINEAR)
        img_u8 = image_tensor(pil)
    mean, std = _norm_tensors(norm, str(device))
    return ((img_u8.to(device, non_blocking=True).float().div_(255) - mean) / std)[None]


@functools.lru_cache(maxsize=None)
def _norm_tensors(norm, device):
    """Mean and std [3, 1, 1] on `device`, made once: the per-image path would copy them every time."""
    return tuple(torch.tensor(v, device=device)[:, None, None] for v in common.NORMS[norm])


def image_tensor(pil):
    return torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1)  # [H, W, 3] -> [3, H, W]


def infer(seg, img_u8, max_size=None, instances=True, proposals=None):
    """Full inference on one image: uint8 [3, H, W] -> prediction dict at (H, W)."""
    x = to_input(img_u8, seg.norm, seg.device, max_size)
    return seg(x, tuple(img_u8.shape[-2:]), instances=instances, **({"proposals": proposals} if proposals else {}))


# ----------------------------------------------------------------------------- external proposals

def read_proposals(path, samples, displayed=False):
    """A COCO results list of RLE masks -> ({sample id: [entries]}, count of unmatched entries), matched by
    file_name (path, base name or stem; an ambiguous base name needs the path), else by image_id. Mask sizes
    are checked against the stored image size, or with `displayed` (--images) the EXIF-oriented one, which
    detectron2's read_image and OpenCV's imread (the proposers' readers) give."""
    data = common.load_json(path, "proposals file")
    if not isinstance(data, list) or not data or not all(isinstance(d, dict) and isinstance(d.get("segmentation"), dict)
                                                         and {"size", "counts"} <= set(d["segmentation"]) for d in data):
        raise UserError(f"{path!r} is not a COCO results list of RLE masks (entries with image_id or file_name, "
                        "segmentation {size, counts} and score)")
    by_name = {}
    for s in samples:
        rel = os.path.basename(s["image"])
        for key in {s["name"], s["name"] + os.path.splitext(rel)[1], rel, os.path.splitext(rel)[0]}:
            by_name[key] = s["id"] if by_name.get(key, s["id"]) == s["id"] else None  # None: ambiguous
    ids, out, unmatched = {s["id"] for s in samples}, {}, 0
    for d in data:
        fn = str(d.get("file_name") or "")
        sid = next((by_name[k] for k in (fn, os.path.basename(fn), os.path.splitext(os.path.basename(fn))[0])
                    if by_name.get(k) is not None), None) if fn else None
        sid = sid if sid is not None else (d.get("image_id") if d.get("image_id") in ids else None)
        if sid is None:
            unmatched += 1
        else:
            out.setdefault(sid, []).append(d)
    if not out:
        raise UserError(f"none of the {len(data)} proposals in {path!r} matches an image by file_name or image_id "
                        f"(first: {data[0].get('file_name') or data[0].get('image_id')!r})")
    for s in (s for s in samples if s["id"] in out):  # mask sizes against the image headers, before any work
        with contextlib.suppress(OSError), Image.open(s["image"]) as im:  # an unreadable image is skipped later
            h, w = (im.width, im.height) if displayed and im.getexif().get(0x0112) in (5, 6, 7, 8) else (im.height, im.width)
            for size in {tuple(d["segmentation"]["size"]) for d in out[s["id"]]} - {(h, w)}:
                raise UserError(f"a proposal for {s['name']} in {path!r} is {size[0]}x{size[1]}, the image {h}x{w}")
    return out, unmatched


def decode_proposals(entries, hw):
    """Entries of one image (sizes checked by read_proposals) -> (bool masks [N, H, W], scores [N])."""
    from pycocotools import mask as mask_util
    if not entries:
        return torch.zeros(0, *hw, dtype=torch.bool), torch.zeros(0)
    rles = [mask_util.frPyObjects(d["segmentation"], *hw) if isinstance(d["segmentation"]["counts"], list)
            else d["segmentation"] for d in entries]
    masks = torch.from_numpy(mask_util.decode(rles)).permute(2, 0, 1).bool()
    return masks, torch.tensor([float(d.get("score", 1.0)) for d in entries])


# ----------------------------------------------------------------------------- benchmark loop

def bench_categories(classes, bench):
    """--classes replacing the benchmark's names. Label ids stay positional, so the count must match, except
    where the ground truth's values index any list (bench.any_classes); no id may equal its ignore value."""
    names = list(bench.categories) if classes is None else categories.get_categories(classes)
    if len(names) != len(bench.categories) and not bench.any_classes:
        raise UserError(f"--classes has {len(names)} names with background; {bench.name} needs {len(bench.categories)} "
                        "(label ids are positional: --classes renames the benchmark's classes)")
    if len(names) > bench.ignore_index:
        raise UserError(f"{len(names)} classes: label id {bench.ignore_index} would be {bench.name}'s ignore value")
    return names


def _resume_state(path, key, scorers):
    """Per-rank partial results of an interrupted run with the same settings, else a fresh state."""
    fresh = {"key": key, "next": 0, "done": [], "skipped": [], "scores": [sc.start() for sc in scorers]}
    if path and os.path.isfile(path):
        try:
            state = common.torch_load(path, "partial results")
            if state.get("key") == key:
                print(f"resuming from {path}: {state['next']} images of this rank already done")
                return state
        except UserError as e:  # a partial file we cannot read is recomputed
            print(f"ignoring {e}")
    return fresh


def _load(bench, sample):
    """One benchmark image -> (PIL image, the scorers' item: sample, size, semantic and instance ground truth)."""
    image = common.load_rgb(sample["image"])
    size = (image.height, image.width)
    gt = bench.load_semantic(sample) if bench.load_semantic else None
    if gt is not None and gt.shape != size:
        raise ValueError(f"ground truth {gt.shape} does not match the image {size}")
    objs = bench.load_instances(sample, gt) if bench.load_instances is not None else None
    return image, {"sample": sample, "size": size, "gt": gt, "objs": objs}


def evaluate_bench(seg, bench, out_dir=None, dist=None, max_images=None, n_vis=8, max_size=None, config=None,
                   save_every=500, proposals=None):
    """Run `seg` over the benchmark's images (sharded by rank), score them with the benchmark's scorers, gather,
    and on rank 0 compute and write the metrics; returns them ({} off rank 0). Every `save_every` images each
    rank saves its partial results under out_dir, so an interrupted run with the same settings resumes."""
    from tqdm import tqdm
    dist = dist or common.Dist(seg.device.type)
    samples = bench.samples[:max_images] if max_images else bench.samples
    names = list(bench.categories if bench.sample_categories else seg.categories)
    max_size = max_size or bench.max_size
    scorers = benchmarks.scorers(bench, names, out_dir)
    with_instances = proposals is not None or any(scorer.needs_instances for scorer in scorers)
    found, unmatched = read_proposals(proposals, samples) if proposals else ({}, 0)
    mine = samples[dist.rank::dist.world]
    state_file = os.path.join(out_dir, f".partial_rank{dist.rank}of{dist.world}.pt") if out_dir else None
    # partial results are reused only for the same data, classes, model, checkpoint (and its time) and rules
    ckpt = (config or {}).get("ckpt") or ""
    rules = {k: v for k, v in (config or {}).items() if k not in ("max_images", "save_vis")}
    key = json.dumps([bench.name, bench.metrics, len(samples), names, seg.kind, max_size,
                      os.path.isfile(ckpt) and os.path.getmtime(ckpt), rules], sort_keys=True, default=str)
    state = _resume_state(state_file, key, scorers)
    for i in tqdm(range(state["next"], len(mine)), disable=not dist.is_main, desc=bench.name, initial=state["next"],
                  total=len(mine)):
        sample = mine[i]
        try:
            image, item = _load(bench, sample)
        except (OSError, ValueError) as e:
            state["skipped"].append(f"{sample['image']}\t{type(e).__name__}: {e}")
            continue
        if bench.sample_categories:  # e.g. CUB breed mode: the image's own class list
            seg.set_categories(bench.sample_categories(sample))
        masks = decode_proposals(found.get(sample["id"], []), item["size"]) if proposals else None
        pred = infer(seg, image_tensor(image), max_size, instances=with_instances, proposals=masks)
        state["done"].append(sample["id"])
        for scorer, scores in zip(scorers, state["scores"]):
            scorer.add(scores, item, pred)
        if dist.is_main and out_dir and i < n_vis:
            save_vis(os.path.join(out_dir, "vis", sample["name"].replace("/", "__") + ".png"), np.asarray(image),
                     item["gt"], pred, list(seg.categories), bench.ignore_index)
        if state_file and (i + 1) % save_every == 0 and i + 1 < len(mine):
            common.save_torch({**state, "next": i + 1}, state_file)
    states = dist.gather(state)
    if not dist.is_main:
        return {}
    used = {"file": proposals, "matched": sum(map(len, found.values())), "unmatched": unmatched} if proposals else None
    return _summary(states, bench, scorers, out_dir, config, dist.world, used)


def _summary(states, bench, scorers, out_dir, config, world, proposals):
    """Rank 0: the metrics of every scorer over the states of all ranks; writes metrics.json and skipped.txt
    and removes the partial results, which the written metrics supersede."""
    done, skipped = (sum((state[k] for state in states), []) for k in ("done", "skipped"))
    metrics = {"bench": bench.name, "n_images": len(done), "n_skipped": len(skipped)}
    for n, scorer in enumerate(scorers):
        metrics.update(scorer.summary([state["scores"][n] for state in states]))
    metrics.update({"proposals": proposals} if proposals else {}, notes=bench.notes)
    if out_dir:
        common.save_json({**metrics, "config": config or {}, **common.git_info()}, os.path.join(out_dir, "metrics.json"))
        write_skipped(skipped, out_dir)
        for f in glob.glob(os.path.join(out_dir, f".partial_rank*of{world}.pt")):
            os.remove(f)
    return metrics


def write_skipped(skipped, out_dir):
    """Print every skipped image with its reason and list them in out_dir/skipped.txt."""
    for line in skipped:
        print("skipped " + line.replace("\t", ": "))
    if skipped and out_dir:
        with common.atomic_path(os.path.join(out_dir, "skipped.txt")) as tmp, open(tmp, "w") as f:
            f.write("\n".join(skipped) + "\n")


def run_benchmark(model, bench, data_root, out_dir=None, split=None, max_images=None, dist=None, **kw):
    """The Python entry point (a script, a notebook): evaluate `model` (a ZUTIS module or a segmenter) on `bench`.
    kw: classes (default: the model's own), norm, t, nms, nms_iou, class_prob, unseen, cub_text, max_size,
    save_vis. Returns the metrics dict (empty off rank 0)."""
    b = benchmarks.read_bench(bench, data_root, split, unseen=kw.get("unseen", False),
                              cub_text=kw.get("cub_text", "bird"))
    rules = {k: kw[k] for k in ("t", "nms", "nms_iou", "class_prob") if k in kw}
    seg = model if hasattr(model, "kind") else ZutisSegmenter(model, kw.get("norm", "imagenet"), **rules)
    seg.set_categories(b.categories if b.sample_categories else bench_categories(kw.get("classes") or seg.categories, b))
    with torch.no_grad():
        return evaluate_bench(seg, b, out_dir, dist, max_images, kw.get("save_vis", 4), kw.get("max_size"), kw)


# ----------------------------------------------------------------------------- your own images

def run_images(seg, src, out_dir, max_size=1024, proposals=None):
    """--images: per image <stem>_semantic.png, <stem>_instances.png (overlays with a legend) and
    <stem>_labels.png (label ids), plus predictions.json (COCO format: image ids = positions in the sorted
    file list, category id = label id, names in "categories" and in each annotation's category_name). Every
    file is read as displayed (EXIF orientation); one that is not segmented is listed in skipped.txt."""
    base = os.path.dirname(src) if os.path.isfile(src) else src
    rels, skipped = common.list_files(src, out_dir)
    if not rels:
        raise UserError(f"no files in {src!r}" + (f" besides {len(skipped)} hidden ones" if skipped else ""))
    samples = [{"id": i, "name": os.path.splitext(r)[0], "image": os.path.join(base, r)} for i, r in enumerate(rels)]
    props, unmatched = read_proposals(proposals, samples, displayed=True) if proposals else ({}, 0)
    names = list(seg.categories)
    coco = {"images": [], "annotations": [], "categories": [{"id": i, "name": n} for i, n in enumerate(names) if i > 0]}
    for s, rel in zip(samples, rels):
        try:
            pil = common.load_rgb(s["image"], displayed=True)
            hw = (pil.height, pil.width)
            pr = decode_proposals(props.get(s["id"], []), hw) if proposals else None
            p = infer(seg, image_tensor(pil), max_size, proposals=pr)
        except (OSError, ValueError) as e:
            skipped.append(f"{rel}\t{type(e).__name__}: {e}")
            continue
        img, stem, sem = np.asarray(pil), os.path.join(out_dir, s["name"]), p["semantic"].numpy()
        common.save_image(render_semantic(img, sem, names), stem + "_semantic.png")
        common.save_image(render_instances(img, p, names), stem + "_instances.png")
        common.save_image(sem.astype(np.uint8 if len(names) <= 256 else np.uint16), stem + "_labels.png")
        coco["images"].append({"id": s["id"], "file_name": rel, "height": hw[0], "width": hw[1]})
        for m, lab, sc in zip(p["masks"].numpy(), p["labels"].tolist(), p["scores"].tolist()):  # background already dropped
            ann = benchmarks.gt_annotation(m, lab, s["id"], len(coco["annotations"]) + 1)
            coco["annotations"].append({**ann, "score": sc, "category_name": names[lab]})
    write_skipped(skipped, out_dir)
    if not coco["images"]:
        raise UserError(f"none of the {len(rels)} images could be segmented (reasons above and in {out_dir}/skipped.txt)")
    common.save_json(coco, os.path.join(out_dir, "predictions.json"))
    extra = f"; proposals: {sum(map(len, props.values()))} matched, {unmatched} unmatched" if proposals else ""
    print(f"segmented {len(coco['images'])} images ({len(coco['annotations'])} instances, {len(skipped)} skipped{extra}) -> {out_dir}")
    return coco


# ----------------------------------------------------------------------------- main

def check_choices(args):
    for flag, ok in {**CHOICES, "dtype": common.DTYPES}.items():
        if getattr(args, flag) not in ok:
            raise UserError(f"--{flag} must be one of {', '.join(ok)}, got {getattr(args, flag)!r}")


def check_args(args, given):
    """Every flag checked before any work (files, names, conflicts); returns args."""
    check_choices(args)
    if args.images is None and args.bench not in benchmarks.BENCHES:
        raise UserError(f"unknown benchmark {args.bench!r}: use one of {', '.join(benchmarks.BENCHES)}")
    if args.images is not None and not os.path.exists(args.images):
        raise UserError(f"--images not found: {args.images!r}")
    if args.images is not None:
        common.refuse_unused(given, ("bench", "data_root", "split", "max_images", "save_vis", "unseen", "cub_text"),
                             "with --images (it segments your images; every one is drawn)")
    if args.model == "maskclip":
        common.refuse_unused(given, ("ckpt", "t", "class_prob"), "with --model maskclip (no checkpoint, no decoder)")
    if args.proposals is None:
        common.refuse_unused(given, ("proposal_score", "with_decoder"), "without --proposals")
    if args.nms == "none":
        common.refuse_unused(given, ("nms_iou",), "with --nms none")
    for flag in ("proposals", "ckpt"):
        path = getattr(args, flag)
        if path is not None and not path.startswith("official:") and not os.path.isfile(path):
            raise UserError(f"--{flag} {path!r} is a folder, not a file" if os.path.isdir(path) else
                            f"--{flag} file not found: {path!r}")
    if args.classes is not None:
        categories.get_categories(args.classes)  # an empty list or a blank name stops here, not after loading a model
    common.check_device(args.device)
    default_out = "out/demo" if args.images else f"out/eval_{args.bench}_{args.model}"
    common.check_out_dir(args.out_dir if args.out_dir is not None else default_out)
    if args.unseen and args.bench != "coco20k":
        raise UserError(f"--unseen is a coco20k option, not one of --bench {args.bench}")
    if "cub_text" in given and args.bench != "cub":
        raise UserError(f"--cub_text is a cub option, not one of --bench {args.bench}")
    return args


@torch.no_grad()  # restores the caller's autograd state on return, unlike set_grad_enabled(False)
def main():
    args = check_args(*common.parse_args(get_args_parser()))
    dist = common.Dist(args.device)
    common.resolve_dtype(args.dtype, dist.device, quiet=True)  # float16 on a CPU: refused before any work
    if dist.device.type == "cpu":
        common.set_cpu_threads()
    out_dir = args.out_dir or ("out/demo" if args.images else f"out/eval_{args.bench}_{args.model}")
    if dist.is_main:
        common.remove_stale_tmp(out_dir)
    if args.images is not None:
        names = categories.get_categories(args.classes) if args.classes else None
        if names is None and args.model == "maskclip":
            raise UserError("--images with --model maskclip needs --classes")
        run_images(build_segmenter(args, names, dist.device), args.images, out_dir, args.max_size or 1024, args.proposals)
        return dist.close()
    bench = benchmarks.read_bench(args.bench, args.data_root, args.split, unseen=args.unseen, cub_text=args.cub_text)
    names = bench_categories(args.classes, bench)
    seg = build_segmenter(args, names, dist.device)
    seg.set_categories(bench.categories if bench.sample_categories else names)
    dist.print0(f"{bench.name}: {len(bench.samples)} images, {len(names)} classes" + "".join(f"; {n}" for n in bench.notes))
    m = evaluate_bench(seg, bench, out_dir, dist, args.max_images, args.save_vis, args.max_size,
                       {**vars(args), **common.git_info()}, proposals=args.proposals)
    keys = [k for name in bench.metrics for k in benchmarks.SCORERS[name].headline]
    dist.print0(" ".join(f"{k} {m[k]:.2f}" for k in keys if m.get(k) is not None) + f" ({m.get('n_images')} images"
                + "".join(f", {n} proposals {k}" for k, n in m.get("proposals", {}).items() if k != "file") + f") -> {out_dir}")
    dist.close()


if __name__ == "__main__":
    common.run_main(main)
