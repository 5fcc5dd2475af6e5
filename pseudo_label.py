"""pseudo_label.py: stage 2 of ZUTIS (paper section 3.2). It writes one class-agnostic saliency mask
per image of the archive, the only supervision the segmenter gets.

It reads --archive (from build_archive.py) and its images, and writes one PNG per unique image (0 =
background, 255 = salient, at the image's size) to --out_dir/<dir index>_<index dir name>/<image path
without extension>.png, plus config.json, summary.json, skipped.txt (unreadable images) and
contact_sheet.jpg. Files are written atomically and valid masks on disk are kept, so a rerun resumes.

The default is ZUTIS's protocol: the released SelfMask network and the bilateral solver. Without its
checkpoint, --saliency boundary is a training-free fallback that needs no weights but gives worse masks
(colour contrast to the image border). Reference: docs/pseudo_label.md.

Examples:
  python pseudo_label.py --archive out/archive.json --out_dir out/masks --post_workers 8
  torchrun --nproc_per_node 8 pseudo_label.py --archive out/archive.json --out_dir out/masks
  python pseudo_label.py --archive out/archive.json --out_dir out/masks --saliency boundary
"""
import argparse
import concurrent.futures as cf
import ctypes
import functools
import multiprocessing as mp
import os
import signal
import sys
import time

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

import common
import selfmask


def get_args_parser():
    p = common.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archive", default="out/archive.json", help="The archive JSON written by build_archive.py.")
    p.add_argument("--index_dirs", nargs="+", help="The index image folders, if they moved since the archive was built.")
    p.add_argument("--out_dir", default="out/masks", help="Where the masks, summary and contact sheet go.")
    p.add_argument("--saliency", default="selfmask", choices=["selfmask", "boundary"],
                   help="SelfMask (ZUTIS) or the training-free boundary-prior fallback.")
    p.add_argument("--selfmask", default="selfmask_nq20", help="The SelfMask checkpoint: a released name "
                   f"{sorted(selfmask.SELFMASK_MODELS)} (downloaded into ~/.cache/selfmask) or a local file.")
    p.add_argument("--bilateral", action=argparse.BooleanOptionalAction, default=True,
                   help="Refine each mask with the bilateral solver (ZUTIS: on; it helps the fallbacks too).")
    p.add_argument("--short_side", type=common.number(int, 8, what="--short_side"), default=selfmask.SHORT_SIDE,
                   help="SelfMask's working shorter side in pixels.")
    p.add_argument("--batch_size", type=common.number(int, 1, what="--batch_size"), default=8,
                   help="SelfMask images per forward pass.")
    p.add_argument("--num_workers", type=common.number(int, 0, what="--num_workers"), default=4,
                   help="DataLoader processes decoding images.")
    p.add_argument("--post_workers", type=common.number(int, 0, what="--post_workers"), default=0,
                   help="Processes running the bilateral solver and the "
                   "PNG writes, so that a GPU does not wait on them (0 = the main process; about 8 suit one GPU).")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda.")
    p.add_argument("--dtype", default="float32", choices=common.DTYPES, help=f"SelfMask's {common.DTYPE_HELP}; the "
                   "upsampling, the 0.5 threshold and the bilateral solver stay in float32/float64 (default %(default)s).")
    p.add_argument("--contact_sheet", type=common.number(int, 0, what="--contact_sheet"), default=32,
                   help="Random images shown on the contact sheet (0 = none).")
    return p


# ----------------------------------------------------------------------------- training-free fallbacks

def rgb_to_lab(rgb):
    """uint8 sRGB [..., 3] -> CIE L*a*b* (D65) float32 [..., 3]: Euclidean distances there roughly
    follow perceived colour differences, unlike RGB."""
    c = rgb.astype(np.float32) / 255
    c = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    xyz = c @ np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]],
                       np.float32).T / np.array([0.9505, 1.0, 1.089], np.float32)
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def kmeans(x, k, iters=10, seed=0):
    """Lloyd's k-means on rows of x [N, D], farthest-point init -> (centres [k', D], each cluster's
    share of the points [k'])."""
    x = x.astype(np.float32)
    first = int(np.random.default_rng(seed).integers(len(x)))
    chosen, d = [first], ((x - x[first]) ** 2).sum(1)
    for _ in range(1, min(k, len(x))):
        chosen.append(int(d.argmax()))
        d = np.minimum(d, ((x - x[chosen[-1]]) ** 2).sum(1))
    c = x[chosen]
    for it in range(iters + 1):
        assign = ((c * c).sum(1) - 2 * x @ c.T).argmin(1)  # ||x - c||^2 up to the constant ||x||^2
        count = np.bincount(assign, minlength=len(c))
        if it == iters:
            return c, count / len(x)
        sums = np.eye(len(c), dtype=np.float32)[assign].T @ x  # [k, N] @ [N, D] -> [k, D]
        c = np.where(count[:, None] > 0, sums / np.maximum(count, 1)[:, None], c)


def otsu_threshold(v, bins=256):
    """Otsu's threshold of the values v: maximises the between-class variance."""
    hist, edges = np.histogram(v, bins=bins)
    p = hist / max(hist.sum(), 1)
    w0, mu = np.cumsum(p), np.cumsum(p * (edges[:-1] + edges[1:]) / 2)
    between = (mu[-1] * w0 - mu) ** 2 / np.maximum(w0 * (1 - w0), 1e-12)
    return edges[int(np.argmax(between[:-1])) + 1]


def largest_component(mask):
    """The largest connected component with its holes filled."""
    lab, n = ndimage.label(mask)
    if n == 0:
        return mask
    return ndimage.binary_fill_holes(lab == 1 + int(np.bincount(lab.ravel())[1:].argmax()))


def boundary_saliency(image, bilateral=False, k=4, border=0.05, min_cluster=0.2, work_side=160):
    """Training-free fallback from the boundary prior: the image border is mostly background, so a pixel
    is salient when its smoothed colour and texture are far from every dominant border colour cluster.
    Otsu threshold, largest component, holes filled. Image -> bool [H, W]."""
    rgb = selfmask.to_rgb(image)
    H, W = rgb.shape[:2]
    small = selfmask.resize_shorter(rgb, min(H, W, work_side), max_side=None) if max(H, W) > work_side else rgb
    h, w = small.shape[:2]
    s = max(1.0, min(h, w) / 48)  # smoothing scale: averages over a fine texture period
    lab = rgb_to_lab(small)
    mean = ndimage.gaussian_filter(lab, (s, s, 0))
    # Texture energy (local standard deviation of lightness), so stripes and a flat patch of the same
    # mean colour still differ.
    energy = np.sqrt(np.maximum(ndimage.gaussian_filter((lab[..., 0] - mean[..., 0]) ** 2, s), 0))
    feats = np.concatenate([mean, energy[..., None]], -1)  # [h, w, 4]
    b = max(1, int(round(border * min(h, w))))
    ring = np.ones((h, w), bool)
    ring[b:-b, b:-b] = False
    centres, weight = kmeans(feats[ring][:: max(1, ring.sum() // 2000)], k)
    # Clusters holding little of the border are more likely object parts touching the edge.
    centres = centres[weight >= min(min_cluster, weight.max())]
    dist = np.sqrt(((feats[:, :, None] - centres[None, None]) ** 2).sum(-1)).min(-1)  # [h, w]
    dist = ndimage.gaussian_filter(dist, s)
    if dist.max() - dist.min() < 1.0:  # under one Lab unit everywhere: nothing stands out, no object
        return np.zeros((H, W), bool)
    fg = dist > otsu_threshold(dist)
    if bilateral:
        fg = selfmask.bilateral_solve(small, fg.astype(np.float64)) > 0.5
    return selfmask.finish_mask(largest_component(fg), orig_size=(H, W), bilateral=False)


# ----------------------------------------------------------------------------- workers

def die_with_parent(parent_pid, *_):
    """Initialiser of every worker process: the kernel kills it when the stage dies (Linux), so a killed
    run leaves no worker behind blocked on a full pipe. Its own work is single-threaded."""
    torch.set_num_threads(1)
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:  # the parent died before prctl
        os._exit(1)


def valid_mask_fraction(mask_path, size):
    """Foreground fraction of a finished mask (decodes completely, 8-bit, (W, H) == size), else None."""
    try:
        with Image.open(mask_path) as m:
            m.load()  # a truncated PNG fails here
            return float((np.asarray(m) > 127).mean()) if m.mode == "L" and m.size == size else None
    except (OSError, ValueError, SyntaxError):
        return None


def write_mask(mask, path, ref=None, size=None, bilateral=False):
    """(Bilateral solver and resize of a coarse SelfMask mask, then) PNG 0/255, atomically -> foreground fraction."""
    if size is not None:
        mask = selfmask.finish_mask(mask, ref, size, bilateral)
    common.save_image(mask.astype(np.uint8) * 255, path)
    return float(mask.mean())


class Jobs(torch.utils.data.Dataset):
    """Item i, in a DataLoader worker: check the existing mask, else decode the image and do the CPU
    side of the method (SelfMask: resize + normalise; boundary: all of it). Arrays go back as tensors,
    which travel through shared memory instead of the pipe."""

    def __init__(self, jobs, args):
        self.jobs, self.args = jobs, args

    def __len__(self):
        return len(self.jobs)

    def __getitem__(self, i):
        img_path, mask_path = self.jobs[i]
        out = {"path": img_path, "mask_path": mask_path, "status": "todo"}
        try:
            with Image.open(img_path) as im:
                size = im.size  # header only
            fg = valid_mask_fraction(mask_path, size) if os.path.exists(mask_path) else None
            if fg is not None:
                return {**out, "status": "done", "fg": fg}
            rgb = np.asarray(common.load_rgb(img_path))
        except (OSError, ValueError, SyntaxError) as e:
            return {**out, "status": "bad", "error": f"{type(e).__name__}: {e}"}
        a = self.args
        if a.saliency == "boundary":
            return {**out, "status": "mask", "mask": torch.from_numpy(boundary_saliency(rgb, a.bilateral))}
        x, ref, size = selfmask.prepare(rgb, a.short_side)
        return {**out, "x": x, "ref": torch.from_numpy(ref.copy()), "size": tuple(size)}


# ----------------------------------------------------------------------------- labelling

def run_coarse(model, xs, dtype=None):
    """coarse_masks on a same-sized batch, the network under autocast(dtype) (None: float32); on CUDA
    out-of-memory one by one, then on the CPU in float32 (the official code also moves a failing image
    to the CPU)."""
    dev = next(model.parameters()).device
    try:
        with common.autocast(dev, dtype):
            return list(selfmask.coarse_masks(model, torch.stack(xs).to(dev)).cpu().numpy())
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        if len(xs) > 1:
            return sum((run_coarse(model, [x], dtype) for x in xs), [])
        print("CUDA out of memory on one image: running it on the CPU")
        out = list(selfmask.coarse_masks(model.cpu(), xs[0][None]).numpy())
        model.to(dev)
        return out


def load_saliency_model(args, device, say):
    if args.saliency == "selfmask":
        say(f"saliency: SelfMask {args.selfmask!r}, bilateral solver {'on' if args.bilateral else 'OFF'}")
        return selfmask.load_selfmask(args.selfmask, device)
    say("WARNING: saliency: the training-free boundary FALLBACK, not SelfMask: the masks will be worse than "
        "ZUTIS's (docs/pseudo_label.md)")


def label_shard(jobs, args, model, dist):
    """This rank's jobs -> {"done": [fg], "written": [fg], "skipped": [(path, error)]}: foreground fractions
    of the masks found on disk and written. The bilateral solver and the PNG writes run in --post_workers
    processes (spawned: forking a process that holds CUDA can deadlock), a few jobs each in flight."""
    pool = args.post_workers and cf.ProcessPoolExecutor(args.post_workers, mp.get_context("spawn"),
                                                        die_with_parent, (os.getpid(),))
    res, pending, buckets = {"done": [], "written": [], "skipped": []}, [], {}
    dtype = common.resolve_dtype(args.dtype, dist.device, quiet=True)  # main has warned already
    loader = torch.utils.data.DataLoader(Jobs(jobs, args), batch_size=None, num_workers=args.num_workers,
                                         worker_init_fn=functools.partial(die_with_parent, os.getpid()))

    def submit(*a):
        if not pool:
            return res["written"].append(write_mask(*a))
        pending.append(pool.submit(write_mask, *a))
        while len(pending) > 4 * args.post_workers:
            res["written"].append(pending.pop(0).result())

    def flush(key):
        items = buckets.pop(key)
        for it, coarse in zip(items, run_coarse(model, [it["x"] for it in items], dtype)):
            submit(coarse, it["mask_path"], it["ref"].numpy(), it["size"], args.bilateral)

    t0 = time.time()
    for n, it in enumerate(loader, 1):
        if it["status"] == "done":
            res["done"].append(it["fg"])
        elif it["status"] == "bad":
            res["skipped"].append((it["path"], it["error"]))
        elif it["status"] == "mask":
            submit(it["mask"].numpy(), it["mask_path"])
        else:
            key = tuple(it["x"].shape)
            buckets.setdefault(key, []).append(it)
            if len(buckets[key]) >= args.batch_size:
                flush(key)
            elif sum(map(len, buckets.values())) > 2 * args.batch_size:  # bound memory: many distinct sizes
                flush(max(buckets, key=lambda k: len(buckets[k])))
        if dist.is_main and n % 500 == 0:
            print(f"  {n}/{len(jobs)} images ({n / (time.time() - t0):.1f} img/s on rank 0)", flush=True)
    for key in list(buckets):
        flush(key)
    res["written"] += [f.result() for f in pending]
    if pool:
        pool.shutdown()
    return res


# ----------------------------------------------------------------------------- outputs

def contact_sheet(pairs, path, n=32, tile=128, cols=8):
    """`n` random (image, mask) pairs, each image with its mask tinted red, on one JPEG."""
    pick = [pairs[i] for i in sorted(np.random.default_rng(0).choice(len(pairs), min(n, len(pairs)), replace=False))]
    sheet = Image.new("RGB", (cols * tile, -(-len(pick) // cols) * tile), "white")
    for k, (img_path, mask_path) in enumerate(pick):
        try:
            img = common.load_rgb(img_path)
            img.thumbnail((tile, tile), Image.BILINEAR)
            with Image.open(mask_path) as m:
                mask = np.asarray(m.convert("L").resize(img.size, Image.NEAREST))[..., None] > 127
        except (OSError, ValueError, SyntaxError):
            continue
        a = np.asarray(img, np.float32)
        a = np.where(mask, 0.55 * a + 0.45 * np.array([255, 0, 0]), 0.6 * a)  # red object, dimmed background
        sheet.paste(Image.fromarray(a.astype(np.uint8)), (k % cols * tile, k // cols * tile))
    common.save_image(sheet, path, quality=90)


def summarise(results, seconds, args):
    done, written = sum((r["done"] for r in results), []), sum((r["written"] for r in results), [])
    skipped, fgs = sum((r["skipped"] for r in results), []), done + written
    with common.atomic_path(os.path.join(args.out_dir, "skipped.txt")) as tmp, open(tmp, "w") as f:
        f.writelines(f"{p}\t{e}\n" for p, e in skipped)
    summary = {"masks_written": len(written), "already_done": len(done), "unreadable_skipped": len(skipped),
               "empty_masks": sum(fg == 0 for fg in fgs), "mean_foreground": round(float(np.mean(fgs or [0])), 4),
               "seconds": round(seconds, 1), "images_per_s": round(len(written) / max(seconds, 1e-9), 2),
               "saliency": args.saliency, "bilateral": args.bilateral}
    common.save_json(summary, os.path.join(args.out_dir, "summary.json"))
    print(f"summary: {len(written):,} masks written, {len(done):,} already done, {len(skipped):,} unreadable "
          f"(listed in {args.out_dir}/skipped.txt), {summary['empty_masks']:,} empty, mean foreground "
          f"{summary['mean_foreground']:.2f}, {seconds:.1f} s, {summary['images_per_s']:.2f} img/s")


def check_args(args, given):
    """Every flag checked before any work (files, folders, conflicts); returns args."""
    if os.path.isdir(args.archive):
        raise common.UserError(f"--archive {args.archive!r} is a folder: give the archive JSON, such as "
                               "out/archive.json")
    for d in args.index_dirs or []:
        if not os.path.isdir(d):
            raise common.UserError(f"--index_dirs {d!r} is not a folder")
    common.check_out_dir(args.out_dir)
    common.check_device(args.device)
    if args.saliency == "boundary":
        common.refuse_unused(given, ("selfmask", "short_side", "batch_size"), "with --saliency boundary (no SelfMask)")
    return args


MASK_SETTINGS = ("saliency", "selfmask", "bilateral", "short_side", "dtype")  # what a finished mask depends on


def check_rerun(args, defaults):
    """A rerun continues the masks in --out_dir; one whose mask settings differ from theirs is refused,
    naming each difference, so that no folder holds masks of two settings."""
    path = os.path.join(args.out_dir, "config.json")
    if not os.path.isfile(path):
        return
    old = common.load_json(path, "pseudo-mask settings")
    changed = [f"--{k} {getattr(args, k)} (masks: {old.get(k, defaults[k])})" for k in MASK_SETTINGS
               if old.get(k, defaults[k]) != getattr(args, k)]
    if changed:
        raise common.UserError(f"{args.out_dir} holds masks made with other settings: {'; '.join(changed)}. Rerun "
                               "with their settings to continue, or choose another --out_dir")


def main():
    parser = get_args_parser()
    args = check_args(*common.parse_args(parser))
    check_rerun(args, vars(parser.parse_args([])))
    dist = common.Dist(args.device)
    if dist.device.type == "cpu":
        common.set_cpu_threads()
    common.resolve_dtype(args.dtype, dist.device, quiet=not dist.is_main)  # float16 on a CPU: refused here
    arc = common.load_archive(args.archive, args.index_dirs)
    jobs = [(common.image_path(arc, e), os.path.join(args.out_dir, common.mask_relpath(arc, e)))
            for e in common.unique_entries(arc)]
    dist.print0(f"pseudo_label: {len(jobs):,} unique images from {args.archive}")
    model = load_saliency_model(args, dist.device, dist.print0)  # fails before anything is written
    if dist.is_main:
        common.remove_stale_tmp(args.out_dir)  # left by the atomic writes of a killed run
        common.save_json({**vars(args), "device": str(dist.device), "world": dist.world, "n_images": len(jobs),
                          **common.git_info()}, os.path.join(args.out_dir, "config.json"))
    dist.barrier()
    t0 = time.time()
    results = dist.gather(label_shard(jobs[dist.rank::dist.world], args, model, dist))  # entry i -> rank i % world
    if dist.is_main:
        summarise(results, time.time() - t0, args)
        done = [j for j in jobs if os.path.exists(j[1])]
        if args.contact_sheet and done:
            contact_sheet(done, os.path.join(args.out_dir, "contact_sheet.jpg"), args.contact_sheet)
    dist.close()


if __name__ == "__main__":
    common.run_main(main)
