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
