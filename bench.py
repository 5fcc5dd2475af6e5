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
import clip_model
import common

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



# ----------------------------------------------------------------------------- training
# (dataset.py, model.py, train.py)



# ----------------------------------------------------------------------------- inference
# (evaluate.py)



# ----------------------------------------------------------------------------- command line

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", choices=sorted(COMMANDS), help="what to time")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--json", default=None, help="also write the results here (default out/bench_<name>.json)")
    args, rest = p.parse_known_args(argv)
    fn, _ = COMMANDS[args.name]
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cpu":
        common.set_cpu_threads()
    results = fn(device, rest)
    path = args.json or os.path.join("out", f"bench_{args.name}.json")
    common.save_json({"name": args.name, "device": device, "torch": torch.__version__, "results": results}, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    common.run_main(lambda: main(sys.argv[1:]))
