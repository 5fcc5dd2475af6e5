"""pseudo_label.py: stage 2 of ZUTIS (paper section 3.2): one class-agnostic saliency mask per
archive image. The segmenter learns only from these masks.

Reads  --archive (build_archive.py's archive.json; format at the top of common.py) and its images.
Writes --out_dir/<dir index>_<index dir name>/<image path without extension>.png (common.mask_relpath):
       one single-channel PNG, 0 = background, 255 = salient, at the image's original size; an image
       retrieved for several categories gets one mask. Also --out_dir/{config.json, summary.json,
       skipped.txt (unreadable images), contact_sheet.jpg (random images with their masks)}.

Saliency (--saliency):
  selfmask  (default) the released SelfMask network with ZUTIS's protocol and bilateral solver
            (selfmask.py). --selfmask takes a released name (downloaded once) or a local file.
  boundary  training-free FALLBACK: colour contrast to the image border's colour clusters (ms/img, CPU)
  spectral  training-free FALLBACK: normalised cut of a CLIP ViT's patch tokens (--arch)
            (both fallbacks and the bilateral solver: saliency.py)
Resumable: valid masks already on disk are kept (a truncated PNG or one of the wrong size is
redone), every file is written atomically, unreadable images are skipped and listed.

Commands:
  CPU:      python pseudo_label.py --archive out/archive.json --out_dir out/masks --device cpu
  1 GPU:    python pseudo_label.py --archive out/archive.json --out_dir out/masks --post_workers 8
  N GPUs:   torchrun --nproc_per_node 8 pseudo_label.py --archive out/archive.json --out_dir out/masks
  no checkpoint: python pseudo_label.py --saliency boundary
  timing:   python pseudo_label.py --benchmark [--selfmask PATH] [--device cuda]
Expected end of the output (numbers vary):
  summary: 9,871 masks written, 0 already done, 2 unreadable, 41 empty, mean foreground 0.31, ...
"""
import argparse
import concurrent.futures as cf
import multiprocessing as mp
import os
import time

import numpy as np
import torch

import common
import saliency
import selfmask


# ----------------------------------------------------------------------------- CLI

def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archive", default="out/archive.json", help="archive JSON from build_archive.py")
    p.add_argument("--index_dirs", nargs="+", default=None, help="override the archive's index dirs (data moved)")
    p.add_argument("--out_dir", default="out/masks", help="where the mask PNGs, summary and contact sheet go")
    p.add_argument("--saliency", default="selfmask", choices=["selfmask", "boundary", "spectral"],
                   help="selfmask = the released network (ZUTIS); boundary/spectral = training-free fallbacks")
    p.add_argument("--selfmask", default="selfmask_nq20",
                   help=f"SelfMask checkpoint: a name {sorted(selfmask.SELFMASK_MODELS)} or a local .pt path")
    p.add_argument("--arch", default="ViT-B/16", help="CLIP name or checkpoint path for --saliency spectral")
    p.add_argument("--bilateral", action=argparse.BooleanOptionalAction, default=True,
                   help="refine masks with the bilateral solver (ZUTIS: on; also improves the fallbacks)")
    p.add_argument("--short_side", type=int, default=None,
                   help="working resolution, shorter side in px (default: 512 selfmask, 224 spectral)")
    p.add_argument("--max_side", type=int, default=2048,
                   help="cap on the longer working side in px (0 = none, the official behaviour); only "
                        "images more elongated than 4:1 are affected")
    p.add_argument("--batch_size", type=int, default=8, help="SelfMask batch (images of equal working size)")
    p.add_argument("--num_workers", type=int, default=4, help="DataLoader workers decoding images per process")
    p.add_argument("--post_workers", type=int, default=0,
                   help="processes running the bilateral solver + PNG writes (0 = inline; use ~8 on a GPU box)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--amp", action="store_true",
                   help="run the network under bf16 autocast (faster on GPUs; default fp32 as upstream)")
    p.add_argument("--limit", type=int, default=0, help="only the first N unique images (0 = all)")
    p.add_argument("--contact_sheet", type=int, default=32, help="images on the contact sheet (0 = none)")
    p.add_argument("--seed", type=int, default=0, help="seed for the contact sheet's random pick")
    p.add_argument("--benchmark", action="store_true",
                   help="time the network, bilateral solver and fallbacks at --short_side on synthetic images, then exit")
    p.add_argument("--benchmark_images", type=int, default=3, help="images per timing in --benchmark")
    return p


# ----------------------------------------------------------------------------- helpers

def mask_is_valid(mask_path, size):
    """A finished mask: decodes completely, single channel, (W, H) == size. Returns its foreground
    fraction, or None when it has to be (re)done."""
    from PIL import Image
    try:
        with Image.open(mask_path) as m:
            m.load()  # a truncated PNG from a crash fails here
            if m.mode != "L" or m.size != size:  # we write 8-bit 0/255 PNGs
                return None
            return float((np.asarray(m) > 127).mean())
    except (OSError, ValueError, SyntaxError):
        return None


def write_mask(mask, path):
    """bool [H, W] -> PNG 0/255, atomically. Returns the foreground fraction."""
    common.save_image(mask.astype(np.uint8) * 255, path)
    return float(mask.mean())


def finish_and_write(coarse, ref, size, bilateral, path):
    """Runs in a post-processing process (or inline): bilateral solver, resize, PNG."""
    return write_mask(selfmask.finish_mask(coarse, ref, size, bilateral), path)


class Jobs(torch.utils.data.Dataset):
    """Item i: check the existing mask, else decode the image and do the CPU-side work of the chosen
    method (SelfMask: resize + normalise; boundary: the whole saliency). Runs in DataLoader workers."""

    def __init__(self, jobs, args):
        self.jobs, self.args = jobs, args

    def __len__(self):
        return len(self.jobs)

    def __getitem__(self, i):
        from PIL import Image
        img_path, mask_path = self.jobs[i]
        out = {"i": i, "path": img_path, "mask_path": mask_path}
        try:
            with Image.open(img_path) as im:
                size = im.size  # header only: cheap
            if os.path.exists(mask_path):
                fg = mask_is_valid(mask_path, size)
                if fg is not None:
                    return {**out, "status": "done", "fg": fg}
            rgb = np.asarray(common.load_rgb(img_path))
        except (OSError, ValueError, SyntaxError) as e:
            return {**out, "status": "bad", "error": f"{type(e).__name__}: {e}"}
        a = self.args
        if a.saliency == "boundary":
            return {**out, "status": "mask", "mask": saliency.boundary_saliency(rgb, bilateral=a.bilateral)}
        if a.saliency == "spectral":
            return {**out, "status": "todo", "rgb": rgb}
        x, ref, size = selfmask.prepare(rgb, a.short_side, a.max_side or None)
        return {**out, "status": "todo", "x": x, "ref": ref, "size": size}


def _identity(x):
    return x


# ----------------------------------------------------------------------------- SelfMask batches

def run_coarse(model, xs, amp=False):
    """coarse_masks on a same-size batch; on CUDA out-of-memory retry one by one, then on the CPU
    (the official code also moves a failing image to the CPU)."""
    dev = next(model.parameters()).device
    try:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            return list(selfmask.coarse_masks(model, torch.stack(xs).to(dev)).cpu().numpy())
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        if len(xs) > 1:
            return sum((run_coarse(model, [x], amp) for x in xs), [])
        print("CUDA out of memory on one image: running it on the CPU")
        model.cpu()
        try:
            return list(selfmask.coarse_masks(model, xs[0][None]).numpy())
        finally:
            model.to(dev)


class Writer:
    """Bilateral solver + PNG writes, inline or in a process pool (the solver is CPU work that would
    otherwise leave the GPU idle). Keeps at most a few jobs per process in flight."""

    def __init__(self, n_procs):
        # spawn, not fork: forking a process that holds CUDA and OpenMP thread pools can deadlock.
        self.pool = cf.ProcessPoolExecutor(n_procs, mp_context=mp.get_context("spawn"),
                                           initializer=torch.set_num_threads, initargs=(1,)) if n_procs > 0 else None
        self.limit, self.inflight, self.results = 4 * max(n_procs, 1), [], []

    def submit(self, fn, *a):
        if self.pool is None:
            self.results.append(fn(*a))
            return
        self.inflight.append(self.pool.submit(fn, *a))
        if len(self.inflight) >= self.limit:
            self.results.append(self.inflight.pop(0).result())

    def close(self):
        self.results += [f.result() for f in self.inflight]
        if self.pool is not None:
            self.pool.shutdown()
        return self.results


def load_saliency_model(args, device, say=print):
    if args.saliency == "selfmask":
        say(f"saliency: SelfMask {args.selfmask!r} (ZUTIS protocol, bilateral solver {'on' if args.bilateral else 'OFF'})")
        return selfmask.load_selfmask(args.selfmask, device)
    if args.saliency == "spectral":
        import clip_model
        say(f"saliency: spectral FALLBACK on CLIP {args.arch!r} patch tokens (not SelfMask)")
        return clip_model.load(args.arch, device)[0].visual
    say("saliency: boundary-prior FALLBACK (not SelfMask)")
    return None


def label_shard(jobs, args, model, dist):
    """Process this rank's jobs; returns stats and the skipped (path, error) list."""
    st = {"written": 0, "done": 0, "bad": 0, "empty": 0, "fg_sum": 0.0}
    skipped, buckets = [], {}
    writer = Writer(args.post_workers)
    loader = torch.utils.data.DataLoader(Jobs(jobs, args), batch_size=None, shuffle=False,
                                         num_workers=args.num_workers, collate_fn=_identity)

    def flush(key):
        items = buckets.pop(key)
        for it, coarse in zip(items, run_coarse(model, [it["x"] for it in items], args.amp)):
            writer.submit(finish_and_write, coarse, it["ref"], it["size"], args.bilateral, it["mask_path"])

    t0, n_seen = time.time(), 0
    for it in loader:
        n_seen += 1
        if it["status"] == "done":
            st["done"] += 1
            st["fg_sum"] += it["fg"]
            st["empty"] += it["fg"] == 0
        elif it["status"] == "bad":
            st["bad"] += 1
            skipped.append((it["path"], it["error"]))
        elif it["status"] == "mask":
            writer.submit(write_mask, it["mask"], it["mask_path"])
        elif args.saliency == "spectral":
            m = saliency.spectral_saliency(it["rgb"], model, args.short_side, args.bilateral)
            writer.submit(write_mask, m, it["mask_path"])
        else:
            key = tuple(it["x"].shape)
            buckets.setdefault(key, []).append(it)
            if len(buckets[key]) >= args.batch_size:
                flush(key)
            elif sum(map(len, buckets.values())) > 2 * args.batch_size:  # bound memory: many distinct sizes
                flush(max(buckets, key=lambda k: len(buckets[k])))
        if dist.is_main and n_seen % 500 == 0:
            print(f"  {n_seen}/{len(jobs)} images ({n_seen / (time.time() - t0):.1f} img/s on rank 0)", flush=True)
    for key in list(buckets):
        flush(key)
    for fg in writer.close():
        st["written"] += 1
        st["fg_sum"] += fg
        st["empty"] += fg == 0
    return st, skipped


# ----------------------------------------------------------------------------- outputs

def contact_sheet(pairs, path, n=32, seed=0, tile=128, cols=8):
    """`n` random (image, mask) pairs, each image with its mask tinted red, on one JPEG."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    pick = [pairs[i] for i in sorted(rng.choice(len(pairs), min(n, len(pairs)), replace=False))]
    rows = max(1, -(-len(pick) // cols))
    sheet = np.full((rows * tile, cols * tile, 3), 255, np.uint8)
    for k, (img_path, mask_path) in enumerate(pick):
        try:
            img = common.load_rgb(img_path)
            with Image.open(mask_path) as m:
                mask = m.convert("L").resize(img.size, Image.NEAREST)
        except (OSError, ValueError, SyntaxError):
            continue
        scale = tile / max(img.size)
        size = (max(1, int(img.width * scale)), max(1, int(img.height * scale)))
        a = np.asarray(img.resize(size, Image.BILINEAR)).astype(np.float32)
        m = (np.asarray(mask.resize(size, Image.NEAREST)) > 127)[..., None]
        a = np.where(m, 0.55 * a + 0.45 * np.array([255, 0, 0]), 0.6 * a)  # red object, dimmed background
        r, c = divmod(k, cols)
        sheet[r * tile:r * tile + size[1], c * tile:c * tile + size[0]] = a.astype(np.uint8)
    common.save_image(sheet, path, quality=90)


def summarise(stats, skipped, seconds, args):
    tot = {k: sum(s[k] for s in stats) for k in stats[0]}
    n_masks = tot["written"] + tot["done"]
    summary = {"masks_written": tot["written"], "already_done": tot["done"], "unreadable_skipped": tot["bad"],
               "empty_masks": int(tot["empty"]), "mean_foreground": round(tot["fg_sum"] / max(n_masks, 1), 4),
               "seconds": round(seconds, 1), "images_per_s": round(tot["written"] / max(seconds, 1e-9), 2),
               "saliency": args.saliency, "bilateral": args.bilateral}
    with common.atomic_path(os.path.join(args.out_dir, "skipped.txt")) as tmp, open(tmp, "w") as f:
        f.writelines(f"{p}\t{e}\n" for p, e in skipped)
    common.save_json(summary, os.path.join(args.out_dir, "summary.json"))
    print(f"summary: {summary['masks_written']:,} masks written, {summary['already_done']:,} already done, "
          f"{summary['unreadable_skipped']:,} unreadable (listed in {args.out_dir}/skipped.txt), "
          f"{summary['empty_masks']:,} empty, mean foreground {summary['mean_foreground']:.2f}, "
          f"{summary['seconds']:.1f} s, {summary['images_per_s']:.2f} img/s")
    return summary


# ----------------------------------------------------------------------------- main

def main():
    args = get_args_parser().parse_args()
    if args.short_side is None:
        args.short_side = 224 if args.saliency == "spectral" else 512
    if args.benchmark:
        return benchmark(args)
    dist = common.Dist(args.device)
    arc = common.load_archive(args.archive, args.index_dirs)
    entries = common.unique_entries(arc)
    if args.limit:
        entries = entries[:args.limit]
    jobs = [(common.image_path(arc, e), os.path.join(args.out_dir, common.mask_relpath(arc, e))) for e in entries]
    config = {**vars(args), "device": str(dist.device), "world": dist.world, "n_images": len(jobs), **common.git_info()}
    if dist.is_main:
        print(f"pseudo_label: {len(jobs):,} unique images from {args.archive}")
        common.print_config(config)
    model = load_saliency_model(args, dist.device, dist.print0)  # fails before anything is written
    if dist.is_main:
        common.save_json(config, os.path.join(args.out_dir, "config.json"))
    t0 = time.time()
    st, skipped = label_shard(jobs[dist.rank::dist.world], args, model, dist)  # entry i -> rank i % world
    stats, skipped = dist.gather(st), sum(dist.gather(skipped), [])
    dist.barrier()
    if dist.is_main:
        summarise(stats, skipped, time.time() - t0, args)
        done = [j for j in jobs if os.path.exists(j[1])]
        if args.contact_sheet and done:
            contact_sheet(done, os.path.join(args.out_dir, "contact_sheet.jpg"), args.contact_sheet, args.seed)
    dist.close()


def benchmark(args):
    """Per-image cost at --short_side: network, bilateral solver, fallbacks (synthetic 375x500 photos-
    like images: smooth shapes, texture and noise). Timing needs no trained weights; without a
    checkpoint the network is random and says so."""
    dev = common.Dist(args.device).device
    rng = np.random.default_rng(0)
    H, W = 375, 500
    yy, xx = np.mgrid[:H, :W]
    imgs = []
    for _ in range(args.benchmark_images):
        obj = ((yy - rng.uniform(120, 250)) ** 2 / 90 ** 2 + (xx - rng.uniform(150, 350)) ** 2 / 130 ** 2) < 1
        img = np.where(obj[..., None], rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)) + rng.normal(0, 12, (H, W, 3))
        imgs.append(np.clip(img + 25 * np.sin(xx / rng.uniform(4, 12))[..., None], 0, 255).astype(np.uint8))
    try:
        model = selfmask.load_selfmask(args.selfmask, dev)
    except common.UserError as e:
        print(f"WARNING: no SelfMask checkpoint ({e}); timing a RANDOMLY INITIALISED SelfMask")
        model = selfmask.SelfMask().to(dev).eval()
    prepped = [selfmask.prepare(im, args.short_side, args.max_side or None) for im in imgs]
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    selfmask.coarse_masks(model, prepped[0][0][None].to(dev))  # warm-up
    sync()
    t = time.perf_counter()
    for x, _, _ in prepped:
        selfmask.coarse_masks(model, x[None].to(dev)).cpu()
    sync()
    res = {"device": str(dev), "threads": torch.get_num_threads(), "working_size": list(prepped[0][0].shape[1:]),
           "network_ms": 1000 * (time.perf_counter() - t) / len(imgs)}
    if dev.type == "cuda":
        xb = torch.stack([p[0] for p in prepped] * max(1, args.batch_size // len(prepped))).to(dev)
        for amp in (False, True):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                selfmask.coarse_masks(model, xb)
                sync()
                t = time.perf_counter()
                selfmask.coarse_masks(model, xb)
                sync()
            res[f"network_img_per_s_batch{len(xb)}{'_bf16' if amp else ''}"] = len(xb) / (time.perf_counter() - t)
    targets = [saliency.boundary_saliency(ref, bilateral=False) for _, ref, _ in prepped]
    t = time.process_time()
    for (_, ref, _), m in zip(prepped, targets):
        saliency.bilateral_solve(ref, m.astype(np.float64))
    res["bilateral_cpu_ms"] = 1000 * (time.process_time() - t) / len(imgs)
    t = time.process_time()
    for im in imgs:
        saliency.boundary_saliency(im, bilateral=False)
    res["boundary_cpu_ms_375x500"] = 1000 * (time.process_time() - t) / len(imgs)
    print({k: round(v, 2) if isinstance(v, float) else v for k, v in res.items()})
    return res


if __name__ == "__main__":
    common.run_main(main)
