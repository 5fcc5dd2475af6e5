"""Every timing of zutis in one place: the stages carry no benchmark code. Each subcommand times one
part on the real code paths, prints a table and writes JSON, so speed claims in docs/ are regenerated
from here, never typed in.

    python bench.py --help              # the subcommands
    python bench.py smoke --device cpu  # every accelerator path once, reduced sizes (CI runs this)
"""
import argparse
import json
import os
import sys
import time

import torch

import build_archive
import categories
import clip_model
import common
import evaluate
import model

COMMANDS = {}  # name -> (function, argparse setup), filled by @command below


def command(name, help):
    def register(fn):
        COMMANDS[name] = (fn, help)
        return fn
    return register


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


@command("clip", "CLIP encode_image img/s in fp32, official fp16 and bf16 autocast (deviation from fp32), forward_dense")
def bench_clip(device, argv):
    p = argparse.ArgumentParser(prog="bench.py clip")
    p.add_argument("--archs", default="ViT-B/16,ViT-L/14@336px", help="Comma-separated CLIP names, or tiny.")
    p.add_argument("--batch", type=int, default=16, help="Images per forward pass.")
    p.add_argument("--iters", type=int, default=3, help="Timed forward passes per measurement.")
    p.add_argument("--dense_res", type=int, default=448, help="Input size of forward_dense (the segmenter's crop).")
    args = p.parse_args(argv)
    rows = []
    for arch in args.archs.split(","):
        model = _clip(arch).to(device)
        res = model.visual.input_resolution
        x = torch.randn(args.batch, 3, res, res, device=device)
        with torch.no_grad():
            ref = model.encode_image(x).float()
            row = {"arch": arch, "res": res, "fp32_img_s": args.batch / timed(lambda: model.encode_image(x), device, 1, args.iters)}
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
                row["bf16_img_s"] = args.batch / timed(lambda: model.encode_image(x), device, 1, args.iters)
                row["bf16_max_dev"] = (model.encode_image(x).float() - ref).abs().max().item()
            xd = torch.randn(args.batch, 3, args.dense_res, args.dense_res, device=device)
            row[f"dense{args.dense_res}_img_s"] = args.batch / timed(lambda: model.visual.forward_dense(xd), device, 1, args.iters)
            clip_model.official_fp16(model)
            row["fp16_img_s"] = args.batch / timed(lambda: model.encode_image(x), device, 1, args.iters)
            row["fp16_max_dev"] = (model.encode_image(x).float() - ref).abs().max().item()
        rows.append(row)
        del model
    print_table(rows, f"CLIP encode_image on {device}, {torch.get_num_threads()} threads, batch {args.batch}, random weights")
    return rows


@command("retrieval", "build_archive: embedding img/s (decode, preprocess, CLIP) and exact streaming top-k time and memory")
def bench_retrieval(device, argv):
    import resource
    import tempfile
    from contextlib import nullcontext
    from types import SimpleNamespace
    import numpy as np
    from PIL import Image
    p = argparse.ArgumentParser(prog="bench.py retrieval")
    p.add_argument("--arch", default="ViT-L/14@336px", help="CLIP for the embedding part (random weights), or tiny.")
    p.add_argument("--images", type=int, default=256, help="Generated 500x375 JPEGs to embed.")
    p.add_argument("--batch_size", type=int, default=128, help="Images per forward pass.")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="DataLoader workers.")
    p.add_argument("--n", type=int, default=2_700_000, help="Index size for top-k (ImageNet train + PASS).")
    p.add_argument("--dim", type=int, default=768, help="Embedding size.")
    p.add_argument("--categories", type=int, default=919, help="Categories (ImageNet-S919 without background).")
    p.add_argument("--k", type=int, default=500, help="Images per category.")
    p.add_argument("--block_size", type=int, default=65536, help="Embeddings per retrieval block.")
    args = p.parse_args(argv)
    dev = torch.device(device)
    with tempfile.TemporaryDirectory(prefix="zutis_bench_") as tmp:
        rng = np.random.default_rng(0)
        files = [os.path.join(tmp, f"{i}.jpg") for i in range(args.images)]
        for f in files:
            Image.fromarray(rng.integers(0, 255, (375, 500, 3), dtype=np.uint8)).save(f, quality=90)
        model = _clip(args.arch).to(dev)
        if dev.type == "cuda":
            clip_model.official_fp16(model)
        run = SimpleNamespace(chunk_size=args.images, batch_size=args.batch_size, workers=args.workers, is_main=False)
        pre = clip_model.preprocess_for(model.visual.input_resolution)
        t_embed = timed(lambda: build_archive.embed_chunks(model, pre, files, [0], tmp, run, dev, nullcontext()),
                        dev, 0, 1)
        path = os.path.join(tmp, "embeddings.npy")
        pieces = (np.random.default_rng([0, s]).standard_normal((min(65536, args.n - s), args.dim), np.float32)
                  for s in range(0, args.n, 65536))
        build_archive.write_complete(tmp, [], [], (x / np.linalg.norm(x, axis=1, keepdims=True) for x in pieces),
                                     args.n, args.dim)
        text = torch.nn.functional.normalize(torch.randn(args.categories, args.dim), dim=-1)
        t0, cpu0 = time.perf_counter(), time.process_time()
        build_archive.topk_stream(text, build_archive.iter_blocks(path, args.block_size), args.k, dev)
        sync(dev)
        t_ret, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    row = {"arch": args.arch, "embed_img_s": args.images / t_embed, "n": args.n, "categories": args.categories,
           "topk_s": t_ret, "topk_cpu_s": cpu, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "peak_cuda_mb": peak_memory_mb(dev)}
    print_table([row], f"retrieval on {device}, {torch.get_num_threads()} threads, block {args.block_size}, k {args.k}")
    return row


# ----------------------------------------------------------------------------- SelfMask pseudo-labels
# (selfmask.py, pseudo_label.py)

import concurrent.futures as cf  # noqa: E402
import multiprocessing as mp  # noqa: E402
import tempfile  # noqa: E402

import numpy as np  # noqa: E402

import pseudo_label  # noqa: E402
import selfmask  # noqa: E402


def photo_like(rng, H, W):
    """An object (ellipse) on a background, two random colours, stripes and pixel noise: uint8 [H, W, 3]."""
    yy, xx = np.mgrid[:H, :W]
    obj = ((yy - rng.uniform(0.3, 0.7) * H) / (0.25 * H)) ** 2 + ((xx - rng.uniform(0.3, 0.7) * W) / (0.25 * W)) ** 2 < 1
    img = np.where(obj[..., None], rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)) + rng.normal(0, 12, (H, W, 3))
    return np.clip(img + 25 * np.sin(xx / rng.uniform(4, 12))[..., None], 0, 255).astype(np.uint8)


@command("selfmask", "SelfMask batches at the working size and the bilateral solver in worker processes")
def bench_selfmask(device, argv):
    p = argparse.ArgumentParser(prog="bench.py selfmask", description="Random weights of the released shapes, "
                                "generated images; the pipeline is pseudo_label.py's (network, then solver pool).")
    p.add_argument("--images", type=int, default=64, help="Generated images per timing.")
    p.add_argument("--size", type=int, nargs=2, default=[375, 500], help="Their height and width.")
    p.add_argument("--short_side", type=int, default=selfmask.SHORT_SIDE, help="The working shorter side.")
    p.add_argument("--batch_size", type=int, default=8, help="Images per forward pass.")
    p.add_argument("--post_workers", type=int, default=8, help="Bilateral solver processes.")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast.")
    a = p.parse_args(argv)
    rng = np.random.default_rng(0)
    prepped = [selfmask.prepare(photo_like(rng, *a.size), a.short_side) for _ in range(a.images)]
    model = selfmask.SelfMask().to(device).eval()
    batches = [[x for x, _, _ in prepped[i:i + a.batch_size]] for i in range(0, a.images, a.batch_size)]
    network = timed(lambda: [pseudo_label.run_coarse(model, b, a.amp) for b in batches], device, warmup=1, iters=1)
    coarse = sum((pseudo_label.run_coarse(model, b, a.amp) for b in batches), [])
    solver = timed(lambda: [selfmask.finish_mask(c, ref, size) for c, (_, ref, size) in zip(coarse, prepped)],
                   "cpu", warmup=0, iters=1)
    with tempfile.TemporaryDirectory() as tmp, cf.ProcessPoolExecutor(
            a.post_workers, mp.get_context("spawn"), pseudo_label.die_with_parent, (os.getpid(),)) as pool:
        list(pool.map(abs, range(4 * a.post_workers)))  # start every process before the clock
        pending, waited, t0 = [], 0.0, time.perf_counter()
        for i, b in enumerate(batches):  # the loop of pseudo_label.label_shard
            for j, c in enumerate(pseudo_label.run_coarse(model, b, a.amp)):
                _, ref, size = prepped[i * a.batch_size + j]
                pending.append(pool.submit(pseudo_label.write_mask, c, f"{tmp}/{i}_{j}.png", ref, size, True))
                while len(pending) > 4 * a.post_workers:
                    t = time.perf_counter()
                    pending.pop(0).result()
                    waited += time.perf_counter() - t
        [f.result() for f in pending]
        pipeline = time.perf_counter() - t0
    n = a.images
    rows = [{"part": f"network, batch {a.batch_size}{', bf16' if a.amp else ''}", "images/s": n / network},
            {"part": "bilateral solver + resize, 1 process", "images/s": n / solver},
            {"part": f"pipeline, {a.post_workers} solver process(es)", "images/s": n / pipeline}]
    work = tuple(prepped[0][0].shape[1:])
    print_table(rows, f"SelfMask pseudo-labels on {device}: {n} images {a.size[0]}x{a.size[1]} -> working size {work}")
    waits = waited / pipeline
    print(f"the network waits on the solver for {100 * waits:.0f}% of the pipeline's time"
          f"{' (add --post_workers)' if waits > 0.1 else ''}")
    return {"rows": rows, "working_size": list(work), "network_waits_on_solver": waits, "args": vars(a)}


# ----------------------------------------------------------------------------- training
# (dataset.py, model.py, train.py)



# ----------------------------------------------------------------------------- inference
# (evaluate.py)

PAPER_IMG_PER_S = {"ViT-B/16": 43.5, "ViT-B/32": 76.9}  # paper Table 5


@command("infer", "Full inference img/s at batch 1 (evaluate.infer: encoder, decoder, argmax, instances with NMS).")
def bench_infer(device, argv):
    """The protocol: batch 1, fp32, each image at its native size (resized only above --max_size, as for
    ImageNet-S), decoded in memory beforehand; timed per image from the host uint8 tensor to the results back
    on the host, normalisation, semantic argmax at full size and instance post-processing with NMS included,
    the accelerator synchronised after each image. Random weights of the real shapes: speed, not accuracy."""
    p = argparse.ArgumentParser(prog="bench.py infer", description=bench_infer.__doc__)
    p.add_argument("--archs", default="ViT-B/16,ViT-B/32", help="CLIP shapes (random weights) or CLIP files, comma-separated.")
    p.add_argument("--sizes", default="375x500,500x375", help="Image sizes HxW, used in turn.")
    p.add_argument("--classes", default="imagenet_s919", help="The category list; its length sets the post-processing cost.")
    p.add_argument("--images", type=int, default=50, help="Timed images per arch.")
    p.add_argument("--warmup", type=int, default=10, help="Untimed images before the clock starts.")
    p.add_argument("--max_size", type=int, default=1024, help="Longer side above which an image is resized.")
    a = p.parse_args(argv)
    names = categories.get_categories(a.classes)
    sizes = [tuple(int(v) for v in s.split("x")) for s in a.sizes.split(",")]
    rows = []
    for arch in a.archs.split(","):
        clip = (clip_model.random_model(arch) if arch in PAPER_IMG_PER_S else clip_model.load(arch)[0]).to(device)
        seg = evaluate.ZutisSegmenter(model.ZUTIS(arch, names, clip=clip).to(device).eval())
        gen = torch.Generator().manual_seed(0)
        imgs = [torch.randint(0, 256, (3, *sizes[i % len(sizes)]), dtype=torch.uint8, generator=gen)
                for i in range(a.images)]
        with torch.no_grad():
            for i in range(a.warmup):
                evaluate.infer(seg, imgs[i % len(imgs)], a.max_size)
            sync(device)
            lat = []
            for im in imgs:
                t0 = time.perf_counter()
                evaluate.infer(seg, im, a.max_size)
                sync(device)
                lat.append(time.perf_counter() - t0)
        lat = sorted(lat)
        rows.append({"arch": os.path.basename(arch), "img_per_s": len(lat) / sum(lat), "median_ms": lat[len(lat) // 2] * 1e3,
                     "paper_img_per_s": PAPER_IMG_PER_S.get(arch, float("nan")), "classes": len(names),
                     "sizes": a.sizes, "images": len(lat), "peak_mb": peak_memory_mb(device)})
    cuda = torch.device(device).type == "cuda"
    device_name = torch.cuda.get_device_name(device) if cuda else f"cpu, {torch.get_num_threads()} threads"
    print_table(rows, f"full inference at batch 1, fp32, on {device_name}")
    return {"device": device_name, "protocol": bench_infer.__doc__, "rows": rows}




# ----------------------------------------------------------------------------- smoke: every accelerator path once

# (subcommand, arguments on a GPU: the real shapes, arguments on a CPU: reduced sizes); the torchrun
# rows exercise the multi-process code paths on one device.
SMOKE = []


def smoke_parts(device):
    """[(part name, argv for `python bench.py`)] for one smoke run on `device`."""
    gpu = torch.device(device).type == "cuda"
    return [(name, [name, *(g if gpu else c)]) for name, g, c in SMOKE]


@command("smoke", "every accelerator code path once, timed (reduced sizes on a CPU); one table + JSON")
def smoke(device, argv):
    p = argparse.ArgumentParser(prog="bench.py smoke")
    p.add_argument("--only", nargs="+", default=None, help="run only these parts")
    p.add_argument("--timeout", type=float, default=600, help="seconds allowed per part")
    a = p.parse_args(argv)
    import subprocess
    import tempfile
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
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False, epilog="subcommands:\n" + listing
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
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cpu":
        common.set_cpu_threads()
    results = fn(device, rest)  # a subcommand's own --help prints its flags and exits here
    path = args.json or os.path.join("out", f"bench_{args.name}.json")
    common.save_json({"name": args.name, "device": device, "torch": torch.__version__, "results": results}, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    common.run_main(lambda: main(sys.argv[1:]))
