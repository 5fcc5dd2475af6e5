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



# ----------------------------------------------------------------------------- SelfMask pseudo-labels
# (selfmask.py, pseudo_label.py)



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
