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
