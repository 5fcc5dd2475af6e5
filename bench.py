"""Every timing of zutis in one place: the stages carry no benchmark code. Each subcommand times one
part on the real code paths, prints a table and writes JSON, so speed claims in docs/ are regenerated
from here, never typed in.

    python bench.py --help              # the subcommands
    python bench.py smoke --device cpu  # every accelerator path once, reduced sizes (CI runs this)
"""
import argparse
import concurrent.futures as cf
import copy
import dataclasses
import multiprocessing as mp
import os
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

import build_archive
import categories
import clip_model
import common
import dataset
import evaluate
import model
import pseudo_label
import selfmask
import topk
import train

COMMANDS = {}  # name -> (function, argparse setup), filled by @command below


def command(name, help):
    def register(fn):
        COMMANDS[name] = (fn, help)
        return fn
    return register


def int_flag(parser, flag, lo, **kw):
    """A whole-number flag >= lo, range-checked by common.number under the flag's own name."""
    parser.add_argument(flag, type=common.number(int, lo, what=flag), **kw)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, warmup=1, iters=3):
    """Seconds per call of fn() after `warmup` calls, with the accelerator drained before each clock read."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / max(iters, 1)


def clock(device):
    """The clock of the interleaved dtype comparisons: this process's CPU-seconds on a CPU (on a shared
    machine, its own work rather than the neighbours'), wall seconds on a GPU."""
    return time.process_time if torch.device(device).type == "cpu" else time.perf_counter


def peak_memory_mb(device):
    return torch.cuda.max_memory_allocated(device) / 2**20 if torch.device(device).type == "cuda" else float("nan")


def print_table(rows, title=""):
    """rows: list of dicts with the same keys."""
    if title:
        print(title)
    if not rows:
        return
    keys = list(rows[0])
    cells = [[f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in keys] for r in rows]
    w = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    print("  ".join(k.ljust(w[i]) for i, k in enumerate(keys)))
    for c in cells:
        print("  ".join(v.ljust(w[i]) for i, v in enumerate(c)), flush=True)


# ----------------------------------------------------------------------------- CLIP and retrieval
# (clip_model.py, build_archive.py)

def _clip(arch):
    """Random weights of a released shape, or 'tiny' for a quick CPU run."""
    if arch == "tiny":
        return clip_model.CLIP(32, 32, 2, 64, 8, 77, 49408, 64, 1, 2).eval()
    return clip_model.random_model(arch)


def topk_overlap(model, files, names, k, device, image_dtype, text_dtype, batch=64):
    """Per category, the top-k images by cosine in (image_dtype, text_dtype) -> their sets, as build_archive."""
    pre = clip_model.preprocess_for(model.visual.input_resolution)
    with torch.no_grad(), common.autocast(device, text_dtype):
        text = clip_model.text_embeddings(model, names, categories.TEMPLATES)
    emb = []
    for i in range(0, len(files), batch):
        x = torch.stack([pre(common.load_rgb(f)) for f in files[i:i + batch]]).to(device)
        with torch.no_grad(), common.autocast(device, image_dtype):
            emb.append(torch.nn.functional.normalize(model.encode_image(x).float(), dim=-1).half().float())
    idx = (text.to(device) @ torch.cat(emb).t()).topk(min(k, len(files)), dim=1).indices
    return [set(r.tolist()) for r in idx]


@command("clip", "CLIP encode_image img/s in fp32, bf16 autocast and the official fp16 (GPU), their deviation from "
         "fp32, forward_dense; with --index_dir, the retrieval top-k overlap of bf16 with fp32")
def bench_clip(device, argv):
    p = common.ArgumentParser(prog="bench.py clip", description=COMMANDS["clip"][1])
    p.add_argument("--archs", default="ViT-B/16,ViT-L/14@336px", help="Comma-separated CLIP names or files, or tiny.")
    int_flag(p, "--batch", 1, default=16, help="Images per forward pass.")
    int_flag(p, "--iters", 1, default=3, help="Timed forward passes per measurement, fp32 and bf16 in turn.")
    int_flag(p, "--dense_res", 1, default=448, help="Input size of forward_dense (the segmenter's crop).")
    p.add_argument("--index_dir", default=None, help="Images to retrieve from (e.g. the toy world's index), for the "
                   "top-k overlap of bf16 with fp32; needs a trained CLIP file in --archs.")
    p.add_argument("--classes", default=None, help="With --index_dir: the category list (a file, name or 'a,b').")
    int_flag(p, "--k", 1, default=50, help="With --index_dir: images per category.")
    args = p.parse_args(argv)
    rows, bf16, clk = [], common.resolve_dtype("bfloat16", device, quiet=True), clock(device)
    for arch in args.archs.split(","):
        model = (_clip(arch) if arch == "tiny" or arch in clip_model.MODELS else clip_model.load(arch)[0]).to(device)
        res = model.visual.input_resolution
        pics = photographs((res, res), args.batch)
        x = (torch.stack([clip_model.preprocess_for(res)(Image.fromarray(im)) for im in pics]) if pics
             else torch.randn(args.batch, 3, res, res)).to(device)
        sec, out = {"fp32": 0.0, "bf16": 0.0}, {}
        with torch.no_grad():
            for i in range(args.iters + 1):  # the first pass of each is the warm-up
                for name, dt in (("fp32", None), ("bf16", bf16)):
                    t0 = clk()
                    with common.autocast(device, dt):
                        out[name] = torch.nn.functional.normalize(model.encode_image(x).float(), dim=-1)
                    sync(device)
                    sec[name] += (clk() - t0) * (i > 0)
            cos = (out["fp32"] * out["bf16"]).sum(-1)
            row = {"arch": os.path.basename(arch) if os.path.isfile(arch) else arch, "res": res, "fp32_img_s": args.batch * args.iters / sec["fp32"],
                   "bf16_img_s": args.batch * args.iters / sec["bf16"], "bf16_speedup": sec["fp32"] / sec["bf16"],
                   "bf16_min_cos": cos.min().item(), "inputs": "photographs" if pics else "noise"}
            xd = torch.randn(args.batch, 3, args.dense_res, args.dense_res, device=device)
            row[f"dense{args.dense_res}_img_s"] = args.batch / timed(lambda: model.visual.forward_dense(xd), device, 1, args.iters)
            if args.index_dir:
                files = [os.path.join(args.index_dir, f) for f in common.list_images(args.index_dir)]
                names = categories.get_categories(args.classes)[1:]
                ref = topk_overlap(model, files, names, args.k, device, None, None)
                for tag, img_dt, txt_dt in (("img", bf16, None), ("img+text", bf16, bf16)):
                    got = topk_overlap(model, files, names, args.k, device, img_dt, txt_dt)
                    row[f"top{args.k}_overlap_bf16_{tag}"] = np.mean([len(a & b) / len(a) for a, b in zip(ref, got)])
            if torch.device(device).type == "cuda":
                clip_model.official_fp16(model)
                row["fp16_img_s"] = args.batch / timed(lambda: model.encode_image(x), device, 1, args.iters)
                row["fp16_min_cos"] = (torch.nn.functional.normalize(model.encode_image(x).float(), dim=-1)
                                       * out["fp32"]).sum(-1).min().item()
            else:
                print("fp16 skipped: float16 runs on CUDA only")
        rows.append(row)
        del model
    print_table(rows, f"CLIP encode_image on {device}, {torch.get_num_threads()} threads, batch {args.batch}, "
                f"{'interleaved ' if args.iters else ''}fp32/bf16")
    return rows


def _topk_merge(text_emb, emb, k, block_size, exact=False):
    """The plain top-k (a float32 product per block, torch.topk, a stable merge), kept here only as
    the A/B baseline of `bench.py retrieval`; with exact=True each block's scores are float64 products
    rounded to float32, which makes it the brute-force definition that topk.topk_stream must equal."""
    T, best_s, best_i = text_emb.float(), torch.empty(len(text_emb), 0), torch.empty(len(text_emb), 0, dtype=torch.long)
    for start in range(0, len(emb), block_size):
        E = torch.as_tensor(np.asarray(emb[start:start + block_size]))
        S = (T.double() @ E.double().t()).float() if exact else T @ E.float().t()
        kk = min(k, S.shape[1])
        s, i = torch.topk(S, kk, dim=1)
        tie = (S >= s[:, -1:]).sum(1) > kk  # the kept subset of a tie at the cut is arbitrary: sort stably
        if tie.any():
            s[tie], i[tie] = (x[:, :kk] for x in torch.sort(S[tie], dim=1, descending=True, stable=True))
        s, i = torch.cat([best_s, s], 1), torch.cat([best_i, i + start], 1)
        o = torch.argsort(i, dim=1)  # index ascending, then a stable sort by score descending
        s, i = s.gather(1, o), i.gather(1, o)
        o = torch.argsort(s, dim=1, descending=True, stable=True)[:, :k]
        best_s, best_i = s.gather(1, o), i.gather(1, o)
    return best_s, best_i


def _cpu_clock(fn):
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


@command("retrieval", "build_archive: embedding img/s (decode, preprocess, CLIP) and the exact top-k's seconds, "
         "CPU-seconds and memory per prefilter and thread count, with an A/B against a plain top-k")
def bench_retrieval(device, argv):
    p = common.ArgumentParser(prog="bench.py retrieval", description=COMMANDS["retrieval"][1])
    p.add_argument("--arch", default="ViT-L/14@336px", help="CLIP for the embedding part (random weights), or tiny.")
    int_flag(p, "--images", 0, default=256, help="Generated 500x375 JPEGs to embed; 0 skips this part.")
    int_flag(p, "--batch_size", 1, default=128, help="Images per forward pass.")
    int_flag(p, "--workers", 0, default=min(8, os.cpu_count() or 1), help="DataLoader workers.")
    int_flag(p, "--n", 1, default=2_700_000, help="Index size for top-k (ImageNet train + PASS).")
    int_flag(p, "--dim", 1, default=768, help="Embedding size.")
    int_flag(p, "--categories", 1, default=919, help="Categories (ImageNet-S919 without background).")
    int_flag(p, "--k", 1, default=500, help="Images per category.")
    int_flag(p, "--block_size", 1, default=16384, help="Embeddings per retrieval block.")
    p.add_argument("--prefilters", default="float32,bfloat16", help="Prefilter dtypes to time, comma-separated.")
    p.add_argument("--threads", default="1,2", help="CPU thread counts to time at --n, comma-separated.")
    int_flag(p, "--ab_n", 0, default=262144, help="Index size of the A/B (plain top-k, "
                   "each prefilter, interleaved, one thread) and of the check against the brute force; 0 skips it.")
    int_flag(p, "--ab_reps", 1, default=2, help="Rounds of the interleaved A/B.")
    args = p.parse_args(argv)
    dev, rows, ab = torch.device(device), [], []
    print(f"load average (1, 5, 15 min): {os.getloadavg()}; CPU bf16 instructions: {common.cpu_bf16_flags()}")
    with tempfile.TemporaryDirectory(prefix="zutis_bench_") as tmp:
        if args.images:
            embed = {"part": "embed", "arch": args.arch, "img_s": args.images / _bench_embed(args, dev, tmp)}
            print_table([embed], f"embedding on {device}")
        path = os.path.join(tmp, "embeddings.npy")
        pieces = (np.random.default_rng([0, s]).standard_normal((min(65536, args.n - s), args.dim), np.float32)
                  for s in range(0, args.n, 65536))
        build_archive.write_complete(tmp, [], [], (x / np.linalg.norm(x, axis=1, keepdims=True) for x in pieces),
                                     args.n, args.dim)
        text = torch.nn.functional.normalize(torch.randn(args.categories, args.dim, generator=torch.Generator().manual_seed(0)), dim=-1)
        threads0, prefilters = torch.get_num_threads(), args.prefilters.split(",")
        if args.ab_n and dev.type == "cpu":
            ab = _retrieval_ab(args, text, np.array(np.load(path, mmap_mode="r")[:min(args.ab_n, args.n)]), prefilters)
            print_table(ab, "A/B, one thread, interleaved (seconds and CPU-seconds per round); entries that differ "
                        "from the brute-force definition")
        for n_threads in [int(t) for t in args.threads.split(",")] if dev.type == "cpu" else [threads0]:
            torch.set_num_threads(n_threads)
            for pf in prefilters:
                stats = {}
                _, wall, cpu = _cpu_clock(lambda: topk.topk_stream(text, path, args.k, dev, args.block_size, pf, stats))
                sync(dev)
                rows.append({"part": f"top-k n={args.n}", "prefilter": pf, "threads": n_threads, "seconds": wall,
                             "cpu_s": cpu, "pairs": stats["pairs"], "rescored": stats["rescored"],
                             "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                             "peak_cuda_mb": peak_memory_mb(dev)})
        torch.set_num_threads(threads0)
    print(f"load average after: {os.getloadavg()}")
    print_table(rows, f"retrieval on {device}: {args.categories} categories x {args.n} x {args.dim}, k {args.k}, "
                f"block {args.block_size}")
    return ([embed] if args.images else []) + ab + rows


def _bench_embed(args, dev, tmp):
    """Seconds to embed --images generated JPEGs with build_archive's own loop."""
    rng = np.random.default_rng(0)
    files = [os.path.join(tmp, f"{i}.jpg") for i in range(args.images)]
    for f in files:
        Image.fromarray(rng.integers(0, 255, (375, 500, 3), dtype=np.uint8)).save(f, quality=90)
    model = _clip(args.arch).to(dev)
    if dev.type == "cuda":
        clip_model.official_fp16(model)
    run = SimpleNamespace(chunk_size=args.images, batch_size=args.batch_size, workers=args.workers, is_main=False)
    pre = clip_model.preprocess_for(model.visual.input_resolution)
    return timed(lambda: build_archive.embed_chunks(model, pre, files, [0], tmp, run, dev, nullcontext()), dev, 0, 1)


def _retrieval_ab(args, text, emb, prefilters):
    """One thread, interleaved rounds: the plain top-k, then each prefilter; every result is checked
    against the brute-force definition, and the plain one's differences are counted."""
    torch.set_num_threads(1)
    ref_s, ref_i = _topk_merge(text, emb, args.k, args.block_size, exact=True)
    rows, name = {}, f"A/B n={len(emb)}"
    for _ in range(args.ab_reps):
        for pf in ["before"] + prefilters:
            fn = (lambda: _topk_merge(text, emb, args.k, args.block_size)) if pf == "before" else \
                (lambda: topk.topk_stream(text, emb, args.k, "cpu", args.block_size, pf))
            (s, i), wall, cpu = _cpu_clock(fn)
            r = rows.setdefault(pf, {"part": name, "prefilter": pf, "threads": 1, "seconds": [], "cpu_s": []})
            r["seconds"].append(round(wall, 2))
            r["cpu_s"].append(round(cpu, 2))
            r["index_differs"], r["score_differs"] = int((i != ref_i).sum()), int((s != ref_s).sum())
            if pf != "before" and (r["index_differs"] or r["score_differs"]):
                raise RuntimeError(f"the {pf} top-k differs from the brute force in {r['index_differs']} entries")
    return list(rows.values())


# ----------------------------------------------------------------------------- SelfMask pseudo-labels
# (selfmask.py, pseudo_label.py)


def photo_like(rng, H, W):
    """An object (ellipse) on a background, two random colours, stripes and pixel noise: uint8 [H, W, 3]."""
    yy, xx = np.mgrid[:H, :W]
    obj = ((yy - rng.uniform(0.3, 0.7) * H) / (0.25 * H)) ** 2 + ((xx - rng.uniform(0.3, 0.7) * W) / (0.25 * W)) ** 2 < 1
    img = np.where(obj[..., None], rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)) + rng.normal(0, 12, (H, W, 3))
    return np.clip(img + 25 * np.sin(xx / rng.uniform(4, 12))[..., None], 0, 255).astype(np.uint8)


def mask_iou(a, b):
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    union = (a | b).sum()
    return 1.0 if union == 0 else (a & b).sum() / union


@command("selfmask", "SelfMask batches at the working size per dtype (with the pseudo-mask IoU against the first), "
         "the bilateral solver, and pseudo_label.py's pipeline with solver processes")
def bench_selfmask(device, argv):
    p = common.ArgumentParser(prog="bench.py selfmask", description="Random weights of the released shapes, "
                                "generated images or photographs; the pipeline is pseudo_label.py's (network, then "
                                "solver pool). The dtypes run in turn on each batch (interleaved), same weights.")
    int_flag(p, "--images", 1, default=64, help="Generated images per timing.")
    p.add_argument("--photos", action="store_true", help="scikit-image's real photographs instead of generated images.")
    int_flag(p, "--size", 1, nargs=2, default=[375, 500], help="Their height and width.")
    int_flag(p, "--short_side", 1, default=selfmask.SHORT_SIDE, help="The working shorter side.")
    int_flag(p, "--batch_size", 1, default=8, help="Images per forward pass.")
    int_flag(p, "--post_workers", 0, default=8, help="Bilateral solver processes.")
    p.add_argument("--dtypes", default="float32,bfloat16", help="pseudo_label.py --dtype values; the first is the "
                   "reference of the IoU and the last runs the pipeline.")
    p.add_argument("--ckpt", default=None, help="A SelfMask checkpoint instead of random weights.")
    a = p.parse_args(argv)
    rng, dtypes, clk = np.random.default_rng(0), a.dtypes.split(","), clock(device)
    rgbs = (a.photos and photographs(tuple(a.size), a.images)) or [photo_like(rng, *a.size) for _ in range(a.images)]
    prepped = [selfmask.prepare(rgb, a.short_side) for rgb in rgbs]
    model = (selfmask.load_selfmask(a.ckpt, device) if a.ckpt else selfmask.SelfMask()).to(device).eval()
    batches = [[x for x, _, _ in prepped[i:i + a.batch_size]] for i in range(0, a.images, a.batch_size)]
    torch_dt = {d: common.resolve_dtype(d, device) for d in dtypes}
    secs, coarse = {d: 0.0 for d in dtypes}, {d: [] for d in dtypes}
    [pseudo_label.run_coarse(model, batches[0], torch_dt[d]) for d in dtypes]  # warm-up
    for b in batches:
        for d in dtypes:
            t0 = clk()
            coarse[d] += pseudo_label.run_coarse(model, b, torch_dt[d])
            sync(device)
            secs[d] += clk() - t0
    finals = {d: [selfmask.finish_mask(c, ref, size) for c, (_, ref, size) in zip(coarse[d], prepped)] for d in dtypes}
    ref, n = dtypes[0], a.images
    rows = [{"part": f"network, batch {a.batch_size}, {d}", "images/s": n / secs[d], "speedup": secs[ref] / secs[d],
             "coarse_iou": np.mean([mask_iou(x, y) for x, y in zip(coarse[ref], coarse[d])]),
             "mask_iou": np.mean([mask_iou(x, y) for x, y in zip(finals[ref], finals[d])]),
             "min_mask_iou": min(mask_iou(x, y) for x, y in zip(finals[ref], finals[d]))} for d in dtypes]
    solver = timed(lambda: [selfmask.finish_mask(c, r, size) for c, (_, r, size) in zip(coarse[ref], prepped)],
                   "cpu", warmup=0, iters=1)
    with tempfile.TemporaryDirectory() as tmp, cf.ProcessPoolExecutor(
            a.post_workers, mp.get_context("spawn"), pseudo_label.die_with_parent, (os.getpid(),)) as pool:
        list(pool.map(abs, range(4 * a.post_workers)))  # start every process before the clock
        pending, waited, t0 = [], 0.0, time.perf_counter()
        for i, b in enumerate(batches):  # the loop of pseudo_label.label_shard
            for j, c in enumerate(pseudo_label.run_coarse(model, b, torch_dt[dtypes[-1]])):
                _, r, size = prepped[i * a.batch_size + j]
                pending.append(pool.submit(pseudo_label.write_mask, c, f"{tmp}/{i}_{j}.png", r, size, True))
                while len(pending) > 4 * a.post_workers:
                    t = time.perf_counter()
                    pending.pop(0).result()
                    waited += time.perf_counter() - t
        [f.result() for f in pending]
        pipeline = time.perf_counter() - t0
    rows += [{"part": "bilateral solver + resize, 1 process", "images/s": n / solver},
             {"part": f"pipeline, {a.post_workers} solver process(es), {dtypes[-1]}", "images/s": n / pipeline}]
    rows = [{k: r.get(k, float("nan")) for k in rows[0]} for r in rows]
    work = tuple(prepped[0][0].shape[1:])
    print_table(rows, f"SelfMask pseudo-labels on {device}: {n} {'photographs' if a.photos else 'images'} "
                f"{a.size[0]}x{a.size[1]} -> working size {work}; IoU against {ref}")
    waits = waited / pipeline
    print(f"the network waits on the solver for {100 * waits:.0f}% of the pipeline's time"
          f"{' (add --post_workers)' if waits > 0.1 else ''}")
    return {"rows": rows, "working_size": list(work), "network_waits_on_solver": waits, "args": vars(a)}


# ----------------------------------------------------------------------------- training
# (dataset.py, model.py, train.py)

def fake_archive(root, n_categories=3, per_category=20, size=(500, 375), seed=0):
    """A generated archive: smooth random JPEGs with elliptic 0/255 pseudo-masks -> (archive_json, masks_dir)."""
    rng, (w, h) = np.random.default_rng(seed), size
    arc = {"arch": "fake", "k": per_category, "index_dirs": ["images"], "archive": {},
           "categories": ["background"] + [f"thing{k}" for k in range(n_categories)]}
    yy, xx = np.mgrid[0:h, 0:w]
    for k, name in enumerate(arc["categories"][1:]):
        arc["archive"][name] = [{"path": f"c{k}/img{j}.jpg", "dir": 0, "score": 0.3} for j in range(per_category)]
        for e in arc["archive"][name]:
            low = rng.integers(0, 256, (h // 25 + 1, w // 25 + 1, 3), dtype=np.uint8)  # blocky-smooth content
            common.save_image(Image.fromarray(low).resize((w, h), Image.BILINEAR),
                              os.path.join(root, "images", e["path"]), quality=90)
            cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
            mask = (((yy - cy) / (h / 4)) ** 2 + ((xx - cx) / (w / 4)) ** 2 < 1).astype(np.uint8) * 255
            rel = common.mask_relpath({"index_dirs": [os.path.join(root, "images")]}, e)
            common.save_image(mask, os.path.join(root, "masks", rel))
    common.save_json(arc, os.path.join(root, "archive.json"))
    return os.path.join(root, "archive.json"), os.path.join(root, "masks")


@command("loader", "copy-paste scenes per second of dataset.py on generated 500x375 JPEGs, in one process")
def bench_loader(device, argv):
    p = common.ArgumentParser(prog="bench.py loader", description=COMMANDS["loader"][1])
    int_flag(p, "--crop", 1, default=384, help="Scene size in pixels (default %(default)s).")
    int_flag(p, "--scenes", 1, default=50, help="Scenes to time (default %(default)s).")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="zutis_bench_") as tmp:
        ds = dataset.ArchiveDataset(*fake_archive(tmp), crop=a.crop)
        ds[0]  # imports and caches warm
        c0, n = time.process_time(), []
        s = timed(lambda: n.append(sum(len(ds[i]["instance_masks"]) for i in range(1, a.scenes + 1))), "cpu", 0, 1)
        cpu = time.process_time() - c0
    # CPU seconds too: on a shared machine wall time also measures the neighbours
    rows = [{"crop": a.crop, "scenes_s": a.scenes / s, "scenes_per_cpu_s": a.scenes / cpu,
             "images_per_scene": n[0] / a.scenes, "torch_threads": torch.get_num_threads()}]
    print_table(rows, "dataset.ArchiveDataset, one process")
    return rows


@command("train", "training steps of train.py on random weights of a released CLIP shape: it/s, peak memory "
         "and time per phase for each dtype and torch.compile setting, and their loss curves against fp32 eager")
def bench_train(device, argv):
    p = common.ArgumentParser(prog="bench.py train", description=COMMANDS["train"][1])
    p.add_argument("--arch", default="ViT-B/16", help="Released CLIP shape (random weights) or a CLIP file, e.g. the "
                   "toy world's tiny_clip.pt (default %(default)s).")
    p.add_argument("--archive", default=None, help="A real archive (with --masks_dir), e.g. the toy world's, instead "
                   "of a generated one.")
    p.add_argument("--masks_dir", default=None, help="The pseudo-masks of --archive.")
    int_flag(p, "--crop", 1, default=384, help="Training crop (default %(default)s).")
    int_flag(p, "--batch_size", 1, default=8, help="Images per step (default %(default)s).")
    int_flag(p, "--iters", 1, default=10, help="Timed steps per setting, after --warmup (default %(default)s).")
    int_flag(p, "--warmup", 0, default=2, help="Untimed first steps (default %(default)s).")
    p.add_argument("--dtypes", default="float32,bfloat16", help="Comma list of train.py --dtype values.")
    p.add_argument("--compile", default="both", choices=["off", "on", "both"], help="torch.compile settings to run.")
    p.add_argument("--model", nargs="*", default=[], help="ModelConfig KEY=VALUE (e.g. n_layers=1 on a CPU).")
    int_flag(p, "--num_workers", 0, default=4, help="DataLoader workers (default %(default)s).")
    p.add_argument("--lr", type=common.number(float, 0, what="--lr"), nargs=2, default=[5e-5, 5e-6], help="Learning rates of the head and the "
                   "encoder (default %(default)s: train.py's).")
    p.add_argument("--tol", type=common.number(float, 0, what="--tol"), default=0.05, help="Allowed relative loss difference to fp32 eager.")
    int_flag(p, "--window", 1, default=1, help="Compare the loss curves as means over windows of this many "
                   "steps (1: step by step; long runs drift apart step by step while training alike).")
    a = p.parse_args(argv)
    if a.compile != "off" and compiler_note():
        a.compile = "off"
    dist = common.Dist(device)
    with tempfile.TemporaryDirectory(prefix="zutis_bench_") as tmp:
        archive, masks = (a.archive, a.masks_dir) if a.archive else fake_archive(tmp)
        cfg = {**dataset.AUG, "archive": archive, "masks_dir": masks, "categories": None, "crop": a.crop,
               "ignore_index": 255, "norm": "imagenet", "seed": 0, "iters": a.warmup + a.iters, "lambda_mask": 1.0,
               "batch_size": a.batch_size, "index_dirs": None, "num_workers": a.num_workers}
        cats = dataset.ArchiveDataset(archive, masks).categories
        torch.manual_seed(0)
        clip = clip_model.load(a.arch)[0] if os.path.isfile(a.arch) else clip_model.random_model(a.arch)
        model0 = model.ZUTIS(a.arch, cats, clip=clip,
                         **train.parse_kv(a.model, dataclasses.asdict(model.ModelConfig()), "--model"))
        settings = [(dt, c) for c in {"off": [False], "on": [True], "both": [False, True]}[a.compile]
                    for dt in a.dtypes.split(",")]
        rows, ref, clk = [], None, clock(device)
        for dtype, compiled in settings:
            net = copy.deepcopy(model0).to(device).train()  # every setting starts from the same weights and data
            opt = train.make_optimizer(net, {"lr": a.lr[0], "lr_encoder": a.lr[1], "weight_decay": 0.05})
            scaler = torch.amp.GradScaler(torch.device(device).type, enabled=dtype == "float16")
            ctx, fwd = train.autocast_ctx(torch.device(device), dtype), train.compile_model(net, device) if compiled else net
            batches, phases, losses = iter(train.make_loader({**cfg, "categories": cats}, dist, 0)), {}, []

            def phase(name, fn, timed_step):
                sync(device)
                t0 = clk()
                out = fn()
                sync(device)
                if timed_step:
                    phases[name] = phases.get(name, 0.0) + clk() - t0
                return out

            for i in range(a.warmup + a.iters):
                if i == a.warmup and torch.device(device).type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                batch = phase("data", lambda: train.to_device(next(batches), dist.device), i >= a.warmup)
                out = phase("forward+loss", lambda: train.compute_losses(fwd, batch, ctx, cfg), i >= a.warmup)
                phase("backward+step", lambda: (opt.zero_grad(set_to_none=True), scaler.scale(out["loss"]).backward(),
                                                scaler.step(opt), scaler.update()), i >= a.warmup)
                losses.append(out["loss"].item())
            curve = [float(np.mean(losses[i:i + a.window])) for i in range(0, len(losses), a.window)]
            ref = ref or curve
            diff = max(abs(x - y) / max(abs(y), 1e-8) for x, y in zip(curve, ref))
            total = sum(phases.values())
            rows.append({"dtype": dtype, "compile": compiled, "it_s": a.iters / total,
                         "peak_MiB": peak_memory_mb(device), **{f"{k}_%": 100 * v / total for k, v in phases.items()},
                         "first_loss": losses[0], "last_loss": losses[-1], "max_rel_diff": diff, "agrees": diff <= a.tol})
            del net, fwd, opt
    print_table(rows, f"{os.path.basename(a.arch)}, crop {a.crop}, batch {a.batch_size}, {device}; {a.iters} timed "
                f"steps after {a.warmup}; loss curves (means over {a.window} steps) vs the first row, tolerance {a.tol}")
    return rows


# ----------------------------------------------------------------------------- inference
# (evaluate.py)

PAPER_IMG_PER_S = {"ViT-B/16": 43.5, "ViT-B/32": 76.9}  # paper Table 5


def photographs(size, n):
    """Real photographs from scikit-image (a test-only dependency), resized to `size` (H, W) and cycled
    to n: a list of uint8 [H, W, 3], or [] with a printed note when scikit-image is missing."""
    try:
        import skimage.data
    except ImportError:
        print("real photographs: scikit-image is not installed, so generated images only")
        return []
    names = ["astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field"]
    pics = [Image.fromarray(getattr(skimage.data, k)()[..., :3]).resize(size[::-1], Image.BILINEAR) for k in names]
    return [np.asarray(pics[i % len(pics)]) for i in range(n)]


def compiler_note():
    """None when torch.compile can run on a CPU here, else the one-line reason, printed."""
    try:
        train.compile_model(torch.nn.Identity(), "cpu")
    except common.UserError as e:
        print(f"torch.compile skipped: {e}")
        return str(e)


class _EncoderIn(torch.nn.Module):
    """A CLIP visual encoder whose dense forward runs under autocast and returns float32, so that the
    decoder, the projections and the mask logits after it stay float32."""
    def __init__(self, encoder, dtype):
        super().__init__()
        self.inner, self.dtype, self.proj, self.patch_size = encoder, dtype, encoder.proj, encoder.patch_size

    def forward_dense(self, x, **kw):
        with common.autocast(x.device, self.dtype):
            return self.inner.forward_dense(x, **kw).float()


class _Autocast:
    """A ZUTIS model whose forward runs under autocast; the post-processing after it stays float32, as
    evaluate.py's segmenters do with a dtype. Every other attribute is the model's."""
    def __init__(self, model, dtype):
        self.model, self.dtype = model, dtype

    def __call__(self, x):
        with common.autocast(x.device, self.dtype):
            return self.model(x)

    def __getattr__(self, name):
        return getattr(self.model, name)


def segmenter(model, setting, device):
    """evaluate.ZutisSegmenter for a setting 'DTYPE[:encoder][:compile]': the whole network in DTYPE,
    or (':encoder') only the CLIP encoder; ':compile' wraps it in torch.compile."""
    dtype, parts = common.resolve_dtype(setting.split(":")[0], device, quiet=True), setting.split(":")[1:]
    net = model
    if "encoder" in parts:
        net = copy.deepcopy(model)
        net.encoder, dtype = _EncoderIn(net.encoder, dtype), None
    seg = evaluate.ZutisSegmenter(net)
    seg.model = _Autocast(train.compile_model(net, device) if "compile" in parts else net, dtype)
    return seg


def agreement(ref, out, iou=0.9):
    """(share of semantic pixels equal, share of ref's instances that out has too: same label, mask IoU >= iou)."""
    sem = (ref["semantic"] == out["semantic"]).double().mean().item()
    a, b = ref["masks"].flatten(1).float(), out["masks"].flatten(1).float()
    if len(a) == 0:
        return sem, 1.0 if len(b) == 0 else 0.0
    inter = a @ b.t()
    ious = inter / (a.sum(1)[:, None] + b.sum(1)[None] - inter).clamp(min=1)
    same = ref["labels"][:, None] == out["labels"][None]
    return sem, ((ious >= iou) & same).any(1).double().mean().item()


@command("infer", "Full inference img/s at batch 1 (evaluate.infer: encoder, decoder, argmax, instances with NMS) "
         "per dtype and torch.compile setting, with each setting's agreement with the first")
def bench_infer(device, argv):
    """The protocol: batch 1, each image at its native size (resized only above --max_size, as for
    ImageNet-S), decoded in memory beforehand; timed per image from the host uint8 tensor to the results back
    on the host, normalisation, semantic argmax at full size and instance post-processing with NMS included,
    the accelerator synchronised after each image. The settings run in turn on each image (interleaved), on
    the same weights: random ones of the real shapes (speed; agreement on untrained weights) or --ckpt.
    Agreement with the first setting: semantic pixels equal, and instances matched (same label, IoU >= 0.9)."""
    p = common.ArgumentParser(prog="bench.py infer", description=bench_infer.__doc__)
    p.add_argument("--archs", default="ViT-B/16,ViT-B/32", help="CLIP shapes (random weights) or CLIP files, comma-separated.")
    p.add_argument("--ckpt", default=None, help="A trained checkpoint (e.g. the toy world's ckpt.pt) instead of --archs.")
    p.add_argument("--sizes", default="375x500,500x375", help="Image sizes HxW, used in turn.")
    p.add_argument("--classes", default="imagenet_s919", help="The category list; its length sets the post-processing cost.")
    int_flag(p, "--images", 1, default=50, help="Timed images per arch.")
    p.add_argument("--image_dir", default=None, help="Images to use (at their own size) instead of generated ones.")
    p.add_argument("--photos", action="store_true", help="scikit-image's real photographs instead of generated images.")
    int_flag(p, "--warmup", 0, default=10, help="Untimed images before the clock starts.")
    int_flag(p, "--max_size", 1, default=1024, help="Longer side above which an image is resized.")
    p.add_argument("--settings", default="float32", help="Comma list of DTYPE[:encoder][:compile] (':encoder': only the "
                   "CLIP encoder in DTYPE; ':compile': torch.compile); the first is the reference.")
    a = p.parse_args(argv)
    names = categories.get_categories(a.classes)
    sizes = [tuple(int(v) for v in s.split("x")) for s in a.sizes.split(",")]
    settings = a.settings.split(",")
    note = compiler_note() if any(":compile" in s for s in settings) else None
    if note:
        settings = [s for s in settings if ":compile" not in s]
    gen, rows, clk = torch.Generator().manual_seed(0), [], clock(device)
    photos = {hw: photographs(hw, a.images) for hw in sizes} if a.photos else {}
    for arch in [a.ckpt] if a.ckpt else a.archs.split(","):
        if a.ckpt:
            net = model.load_checkpoint(a.ckpt, device=device)
        else:
            clip = (clip_model.random_model(arch) if arch in PAPER_IMG_PER_S else clip_model.load(arch)[0]).to(device)
            net = model.ZUTIS(arch, names, clip=clip).to(device).eval()
        segs = {s: segmenter(net, s, device) for s in settings}
        if a.image_dir:
            files = common.list_images(a.image_dir)[:a.images]
            imgs = [evaluate.image_tensor(common.load_rgb(os.path.join(a.image_dir, f))) for f in files]
        elif photos.get(sizes[0]):
            imgs = [torch.from_numpy(photos[sizes[i % len(sizes)]][i].copy()).permute(2, 0, 1) for i in range(a.images)]
        else:
            imgs = [torch.randint(0, 256, (3, *sizes[i % len(sizes)]), dtype=torch.uint8, generator=gen)
                    for i in range(a.images)]
        lat, agree = {s: [] for s in settings}, {s: [] for s in settings}
        with torch.no_grad():
            for i in range(a.warmup):
                [evaluate.infer(seg, imgs[i % len(imgs)], a.max_size) for seg in segs.values()]
            sync(device)
            for im in imgs:
                outs = {}
                for s, seg in segs.items():
                    t0 = clk()
                    outs[s] = evaluate.infer(seg, im, a.max_size)
                    sync(device)
                    lat[s].append(clk() - t0)
                    agree[s].append(agreement(outs[settings[0]], outs[s]))
        for s in settings:
            sem, inst = np.mean(agree[s], 0)
            rows.append({"arch": a.ckpt or (os.path.basename(arch) if os.path.isfile(arch) else arch), "setting": s, "img_per_s": len(imgs) / sum(lat[s]),
                         "median_ms": sorted(lat[s])[len(lat[s]) // 2] * 1e3,
                         "speedup": sum(lat[settings[0]]) / sum(lat[s]), "sem_equal_%": 100 * sem,
                         "inst_matched_%": 100 * inst, "min_sem_equal_%": 100 * min(x for x, _ in agree[s]),
                         "paper_img_per_s": PAPER_IMG_PER_S.get(arch, float("nan")), "classes": len(net.categories),
                         "images": len(imgs), "peak_mb": peak_memory_mb(device)})
    cuda = torch.device(device).type == "cuda"
    device_name = torch.cuda.get_device_name(device) if cuda else f"cpu, {torch.get_num_threads()} threads"
    print_table(rows, f"full inference at batch 1 on {device_name}; agreement with {settings[0]}")
    return {"device": device_name, "protocol": bench_infer.__doc__, "rows": rows, "compile_note": note}


# ----------------------------------------------------------------------------- smoke: every accelerator path once

@command("ddp", "train.py and evaluate.py under torchrun (one process per device): the multi-process code paths")
def bench_ddp(device, argv):
    p = common.ArgumentParser(prog="bench.py ddp", description=COMMANDS["ddp"][1])
    p.add_argument("--arch", default="ViT-B/16", help="Released CLIP shape (random weights), or tiny.")
    int_flag(p, "--nproc", 1, default=1, help="Processes (each takes one GPU on CUDA).")
    int_flag(p, "--iters", 1, default=5, help="Training steps.")
    int_flag(p, "--crop", 1, default=384, help="Training crop.")
    int_flag(p, "--images", 1, default=4, help="Generated images to segment.")
    a = p.parse_args(argv)
    here = os.path.dirname(os.path.abspath(__file__))
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(a.nproc)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    dev = "cuda" if torch.device(device).type == "cuda" else "cpu"
    rows = []
    with tempfile.TemporaryDirectory(prefix="zutis_ddp_") as tmp:
        clip = os.path.join(tmp, "clip.pt")
        torch.save(_clip(a.arch).state_dict(), clip)
        archive, masks = fake_archive(os.path.join(tmp, "data"), size=(160, 120))
        for i in range(a.images):
            common.save_image(np.random.default_rng(i).integers(0, 256, (120, 160, 3), dtype=np.uint8),
                              os.path.join(tmp, "images", f"{i}.jpg"))
        steps = [("train", [os.path.join(here, "train.py"), "--arch", clip, "--archive", archive, "--masks_dir", masks,
                            "--iters", str(a.iters), "--batch_size", str(2 * a.nproc), "--crop", str(a.crop),
                            "--num_workers", "0", "--log_every", "1", "--device", dev, "--out_dir", os.path.join(tmp, "run")]),
                 ("evaluate", [os.path.join(here, "evaluate.py"), "--images", os.path.join(tmp, "images"),
                               "--classes", "thing0,thing1,thing2", "--ckpt", os.path.join(tmp, "run", "ckpt.pt"),
                               "--device", dev, "--out_dir", os.path.join(tmp, "eval")])]
        for name, cmd in steps:
            t0 = time.perf_counter()
            r = subprocess.run(run + cmd, env=env, capture_output=True, text=True)
            if r.returncode != 0:
                raise common.UserError(f"torchrun {name} failed (exit {r.returncode}): "
                                       + " | ".join((r.stderr or r.stdout).strip().splitlines()[-3:]))
            rows.append({"step": f"torchrun x{a.nproc} {name}", "seconds": time.perf_counter() - t0})
    print_table(rows, f"multi-process runs on {dev}")
    return rows


# (subcommand, arguments on a GPU: the real shapes, arguments on a CPU: reduced sizes).
SMOKE = [
    ("clip", ["--archs", "ViT-B/16,ViT-L/14@336px", "--batch", "16", "--dense_res", "448"],
     ["--archs", "tiny", "--batch", "2", "--iters", "1", "--dense_res", "64"]),
    ("retrieval", ["--arch", "ViT-L/14@336px", "--images", "256", "--n", "1000000"],
     ["--arch", "tiny", "--images", "8", "--n", "20000", "--workers", "0", "--threads", "1", "--ab_n", "4096",
      "--ab_reps", "1"]),
    ("selfmask", ["--images", "32", "--post_workers", "8", "--dtypes", "float32,bfloat16,float16"],
     ["--images", "2", "--size", "48", "64", "--short_side", "48", "--batch_size", "2", "--post_workers", "1"]),
    ("loader", ["--scenes", "50"], ["--crop", "64", "--scenes", "4"]),
    ("train", ["--arch", "ViT-B/16", "--crop", "384", "--batch_size", "8", "--iters", "50", "--compile", "both",
               "--dtypes", "float32,bfloat16,float16"],
     ["--arch", "ViT-B/32", "--crop", "64", "--batch_size", "2", "--iters", "2", "--warmup", "1", "--compile", "off",
      "--num_workers", "0", "--model", "n_layers=1", "n_queries=10"]),
    ("infer", ["--archs", "ViT-B/16,ViT-B/32", "--images", "50", "--settings", "float32,bfloat16,float16,bfloat16:compile"],
     ["--archs", "ViT-B/32", "--sizes", "64x96", "--classes", "voc", "--images", "2", "--warmup", "1",
      "--settings", "float32,bfloat16"]),
    ("ddp", ["--arch", "ViT-B/16", "--iters", "5"], ["--arch", "tiny", "--iters", "2", "--crop", "64", "--images", "2"]),
]


def smoke_parts(device):
    """[(part name, argv for `python bench.py`)] for one smoke run on `device`."""
    gpu = torch.device(device).type == "cuda"
    return [(name, [name, *(g if gpu else c)]) for name, g, c in SMOKE]


@command("smoke", "every accelerator code path once, timed (reduced sizes on a CPU); one table + JSON")
def smoke(device, argv):
    p = common.ArgumentParser(prog="bench.py smoke", description=COMMANDS["smoke"][1])
    p.add_argument("--only", nargs="+", default=None, help="run only these parts")
    p.add_argument("--timeout", type=common.number(float, 0, lo_open=True, what="--timeout"), default=600,
                   help="seconds allowed per part")
    a = p.parse_args(argv)
    rows, results = [], {}
    with tempfile.TemporaryDirectory(prefix="zutis_smoke_") as tmp:
        for part, args in smoke_parts(device):
            if a.only and part not in a.only:
                continue
            out = os.path.join(tmp, part + ".json")
            cmd = [sys.executable, os.path.abspath(__file__), *args[:1], "--device", device, "--json", out, *args[1:]]
            print(f"[smoke] {part}: {' '.join(cmd[2:])}", flush=True)
            t0 = time.perf_counter()
            try:
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
                ok, tail = r.returncode == 0, (r.stderr.strip().splitlines() or [""])[-1]
                print(r.stdout, end="", flush=True)
            except subprocess.TimeoutExpired:
                ok, tail = False, f"timed out after {a.timeout:.0f} s"
            sec = time.perf_counter() - t0
            results[part] = {"seconds": sec, "ok": ok, "error": None if ok else tail,
                             "results": common.load_json(out)["results"] if ok and os.path.isfile(out) else None}
            rows.append({"part": part, "seconds": sec, "status": "ok" if ok else "FAILED: " + tail[:80]})
    print_table(rows, f"\nsmoke on {device}: {sum(r['seconds'] for r in rows):.0f} s in all")
    failed = [r["part"] for r in rows if r["status"] != "ok"]
    if failed:
        common.save_json({"name": "smoke", "device": device, "results": results}, os.path.join("out", "bench_smoke.json"))
        raise common.UserError(f"smoke parts failed: {', '.join(failed)} (details above and in out/bench_smoke.json)")
    return results


# ----------------------------------------------------------------------------- command line

def main(argv=None):
    listing = "\n".join(f"  {n:<10} {h}" for n, (_, h) in sorted(COMMANDS.items()))
    p = common.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False, epilog="subcommands:\n" + listing
                                + "\n\n`python bench.py NAME --help` lists a subcommand's own flags.",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", nargs="?", choices=sorted(COMMANDS), help="What to time.")
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda or cuda:N.")
    p.add_argument("--json", default=None, help="Where the results go (default out/bench_<name>.json).")
    args, rest = p.parse_known_args(argv)
    if args.name is None:  # no subcommand, or --help before one: the overview
        p.print_help()
        return
    fn, _ = COMMANDS[args.name]
    device = (("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto"
              else str(common.check_device(args.device)))
    if args.json is not None and os.path.isdir(args.json):
        raise common.UserError(f"--json {args.json!r} is a folder: give a file path such as out/bench.json")
    if device == "cpu":
        common.set_cpu_threads()
        flags = common.cpu_bf16_flags()
        print(f"CPU bfloat16 instructions: {', '.join(sorted(flags)) or 'none (bfloat16 is emulated: slow)'}"
              if flags is not None else "CPU bfloat16 instructions: unknown (no /proc/cpuinfo)")
    results = fn(device, rest)  # a subcommand's own --help prints its flags and exits here
    path = args.json or os.path.join("out", f"bench_{args.name}.json")
    common.save_json({"name": args.name, "device": device, "torch": torch.__version__, "results": results}, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    common.run_main(lambda: main(sys.argv[1:]))
