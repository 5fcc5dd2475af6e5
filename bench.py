"""Every timing of zutis in one place: the stages carry no benchmark code. Each subcommand times one
part on the real code paths, prints a table and writes JSON, so speed claims in docs/ are regenerated
from here, never typed in.

    python bench.py --help              # the subcommands
    python bench.py smoke --device cpu  # every accelerator path once, reduced sizes (CI runs this)
"""
import argparse
import copy
import dataclasses
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

import clip_model
import common
import dataset
import model as M
import train

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

def fake_archive(root, n_categories=3, per_category=20, size=(500, 375), seed=0):
    """A generated archive: smooth random JPEGs with elliptic 0/255 pseudo-masks -> (archive_json, masks_dir)."""
    from PIL import Image
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
    p = argparse.ArgumentParser(prog="bench.py loader")
    p.add_argument("--crop", type=int, default=384, help="Scene size in pixels (default %(default)s).")
    p.add_argument("--scenes", type=int, default=50, help="Scenes to time (default %(default)s).")
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
    p = argparse.ArgumentParser(prog="bench.py train")
    p.add_argument("--arch", default="ViT-B/16", help="Released CLIP shape, random weights (default %(default)s).")
    p.add_argument("--crop", type=int, default=384, help="Training crop (default %(default)s).")
    p.add_argument("--batch_size", type=int, default=8, help="Images per step (default %(default)s).")
    p.add_argument("--iters", type=int, default=10, help="Timed steps per setting, after --warmup (default %(default)s).")
    p.add_argument("--warmup", type=int, default=2, help="Untimed first steps (default %(default)s).")
    p.add_argument("--dtypes", default="float32,bfloat16", help="Comma list of train.py --dtype values.")
    p.add_argument("--compile", default="both", choices=["off", "on", "both"], help="torch.compile settings to run.")
    p.add_argument("--model", nargs="*", default=[], help="ModelConfig KEY=VALUE (e.g. n_layers=1 on a CPU).")
    p.add_argument("--num_workers", type=int, default=4, help="DataLoader workers (default %(default)s).")
    p.add_argument("--tol", type=float, default=0.05, help="Allowed relative loss difference to fp32 eager.")
    a = p.parse_args(argv)
    dist = common.Dist(device)
    with tempfile.TemporaryDirectory(prefix="zutis_bench_") as tmp:
        archive, masks = fake_archive(tmp)
        cfg = {**dataset.AUG, "archive": archive, "masks_dir": masks, "categories": None, "crop": a.crop,
               "ignore_index": 255, "norm": "imagenet", "seed": 0, "iters": a.warmup + a.iters, "lambda_mask": 1.0,
               "batch_size": a.batch_size, "index_dirs": None, "num_workers": a.num_workers}
        cats = dataset.ArchiveDataset(archive, masks).categories
        torch.manual_seed(0)
        model0 = M.ZUTIS(a.arch, cats, clip=clip_model.random_model(a.arch),
                         **train.parse_kv(a.model, dataclasses.asdict(M.ModelConfig()), "--model"))
        settings = [(dt, c) for c in {"off": [False], "on": [True], "both": [False, True]}[a.compile]
                    for dt in a.dtypes.split(",")]
        rows, ref = [], None
        for dtype, compiled in settings:
            net = copy.deepcopy(model0).to(device).train()  # every setting starts from the same weights and data
            opt = train.make_optimizer(net, {"lr": 5e-5, "lr_encoder": 5e-6, "weight_decay": 0.05})
            scaler = torch.amp.GradScaler(torch.device(device).type, enabled=dtype == "float16")
            ctx, fwd = train.autocast_ctx(torch.device(device), dtype), torch.compile(net) if compiled else net
            batches, phases, losses = iter(train.make_loader({**cfg, "categories": cats}, dist, 0)), {}, []

            def phase(name, fn, timed_step):
                sync(device)
                t0 = time.perf_counter()
                out = fn()
                sync(device)
                if timed_step:
                    phases[name] = phases.get(name, 0.0) + time.perf_counter() - t0
                return out

            for i in range(a.warmup + a.iters):
                if i == a.warmup and torch.device(device).type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                batch = phase("data", lambda: train.to_device(next(batches), dist.device), i >= a.warmup)
                out = phase("forward+loss", lambda: train.compute_losses(fwd, batch, ctx, cfg), i >= a.warmup)
                phase("backward+step", lambda: (opt.zero_grad(set_to_none=True), scaler.scale(out["loss"]).backward(),
                                                scaler.step(opt), scaler.update()), i >= a.warmup)
                losses.append(out["loss"].item())
            ref = ref or losses
            diff = max(abs(x - y) / max(abs(y), 1e-8) for x, y in zip(losses, ref))
            total = sum(phases.values())
            rows.append({"dtype": dtype, "compile": compiled, "it_s": a.iters / total,
                         "peak_MiB": peak_memory_mb(device), **{f"{k}_%": 100 * v / total for k, v in phases.items()},
                         "first_loss": losses[0], "last_loss": losses[-1], "max_rel_diff": diff, "agrees": diff <= a.tol})
            del net, fwd, opt
    print_table(rows, f"{a.arch} random weights, crop {a.crop}, batch {a.batch_size}, {device}; {a.iters} timed "
                f"steps after {a.warmup}; loss curves vs the first row, tolerance {a.tol}")
    return rows


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
