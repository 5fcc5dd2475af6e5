"""toy/run.py: the toy run that toy.py starts: the world, the tiny CLIP, then every real stage through its
real command line, then the report. Library file; `python toy.py --help` lists the flags.

A rerun of the same command continues where the last one stopped: a stage whose own final output
exists is done; any other stage runs its command again, and the stage continues its own partial work
(tiny-CLIP pre-training from its last 50-step save, build_archive.py from its embedded chunks,
pseudo_label.py from the masks on disk, train.py from its last ckpt.pt, evaluate.py from its
partial results). One --out_dir holds one run: a command with other settings refuses with one line.
"""
if __name__ == "__main__":  # a library file: say what it is rather than fail on the imports below
    raise SystemExit(print(__doc__))
import argparse
import os
import subprocess
import sys
import time

import numpy as np
from PIL import Image

import common
from benchmarks import mask_to_rle
from pseudo_label import boundary_saliency
from toy.pictures import how_it_works
from toy.report import archive_precision, eval_metrics, flat_results, picture_grid, proposal_recall, \
    pseudo_mask_iou, results_table
from toy.tiny_clip import clip_report, pretrain_clip
from toy.world import CATEGORIES, eval_scene_names, write_world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where the stage scripts live


def write_proposals(world_dir, out):
    """Two COCO results files of class-agnostic masks for the evaluation scenes: the true instance masks
    (oracle) and each scene's boundary-saliency mask, one per scene, as pseudo_label.py's fallback gives
    (a realistic, weak proposer). -> {kind: path}."""
    voc = os.path.join(world_dir, "VOC2012")
    oracle, boundary = [], []
    for name in eval_scene_names(world_dir):
        inst = np.asarray(Image.open(os.path.join(voc, "SegmentationObject", name + ".png")))
        for i in sorted(set(np.unique(inst).tolist()) - {0, 255}):
            oracle.append({"file_name": name, "segmentation": mask_to_rle(inst == i), "score": 1.0})
        sal = boundary_saliency(np.asarray(common.load_rgb(os.path.join(voc, "JPEGImages", name + ".jpg"))))
        if sal.any():
            boundary.append({"file_name": name, "segmentation": mask_to_rle(sal), "score": 1.0})
    paths = {"oracle": os.path.join(out, "proposals", "oracle.json"), "boundary": os.path.join(out, "proposals", "boundary.json")}
    common.save_json(oracle, paths["oracle"])
    common.save_json(boundary, paths["boundary"])
    return paths


# ----------------------------------------------------------------------------- floors

def read_floors(path):
    """Floors {metric: lowest acceptable value} from a JSON file such as toy/floors.json."""
    floors = common.load_json(path, "floors file")
    if not isinstance(floors, dict) or not floors or not all(isinstance(v, (int, float)) for v in floors.values()):
        raise common.UserError(f"{path} must be a JSON object {{metric: number}}")
    return {k: float(v) for k, v in floors.items()}


def check_floors(results, floors):
    """Lines describing every metric below its floor (or missing); empty when all pass."""
    bad = []
    for k, floor in floors.items():
        v = results.get(k)
        if v is None:
            bad.append(f"{k}: missing from the results (floor {floor})")
        elif v < floor:
            bad.append(f"{k}: {v:.2f} < floor {floor}")
    return bad


# ----------------------------------------------------------------------------- running the stages

PRESETS = {
    "full": dict(n_index=5000, n_eval=300, clip_steps=200, k=200, iters=1800, batch_size=8),
    "quick": dict(n_index=3000, n_eval=150, clip_steps=120, k=150, iters=800, batch_size=8),
}
# The segmenter for a 64 px world (docs/toy.md has the measurements behind each choice): a decoder sized
# for a CPU budget; logit scale 10, because the official temperature 1 collapses to all-background on a
# tiny CLIP; a higher encoder lr than the official one, since the tiny encoder starts far from useful
# features; scenes of up to 10 images as the official recipe; photometric jitter without hue shifts or
# grayscale, which erase colour, and colour is most of what names a category in this world.
TRAIN_FLAGS = ["--crop", "64", "--lr", "1e-3", "--lr_encoder", "3e-4", "--aug", "jitter=0.4,0.4,0.4,0", "p_gray=0",
               "--model", "logit_scale=10", "n_queries=20", "n_layers=2", "n_heads=4", "dim_ffn=256", "mlp_hidden=128",
               "--num_workers", "0", "--log_every", "50"]
SAVE_EVERY = 200  # a small ckpt.pt every 200 iterations: a killed toy run resumes from there
SETTINGS = ("seed", "n_index", "n_eval", "clip_steps", "k", "iters", "batch_size")  # what the results depend on


def check_same_settings(out, cfg):
    """One out_dir holds one run: the first command's settings go to OUT/toy_settings.json; a later
    command with the same settings continues that run, one with other settings refuses, naming them."""
    now = {**{k: cfg[k] for k in SETTINGS}, "train_flags": TRAIN_FLAGS}
    path = os.path.join(out, "toy_settings.json")
    if not os.path.isfile(path):
        common.save_json(now, path)
        return
    old = common.load_json(path, "toy settings file")
    diff = [f"{k} {old.get(k)} -> {v}" for k, v in now.items() if old.get(k) != v]
    if diff:
        raise common.UserError(f"{out} holds a toy run with other settings ({'; '.join(diff)}): rerun that "
                               "command to continue it, or give another --out_dir")


class Clock:
    """Wall and CPU seconds of each stage, kept in OUT/times.json so that a rerun which finds a stage
    done still reports what it cost. A stage whose partial output was already there when it started
    continued a killed run: its time covers only the part after the interruption, and is marked so."""

    def __init__(self, out):
        self.path = os.path.join(out, "times.json")
        self.times = common.load_json(self.path, "times file") if os.path.isfile(self.path) else {}

    def stage(self, name, done, fn, partial=None):
        """Run fn() unless `done`; `partial`: a path that exists only if an earlier run of it was cut short."""
        if done:
            print(f"[{name}] done earlier", flush=True)
            return
        resumed = bool(partial and os.path.exists(partial))
        print(f"[{name}] " + ("continuing a killed run" if resumed else "running"), flush=True)
        t0, c0 = time.time(), cpu_seconds()
        fn()
        self.times[name] = {"wall": time.time() - t0, "cpu": cpu_seconds() - c0, "resumed": resumed}
        common.save_json(self.times, self.path)
        print(f"[{name}] done in {self.times[name]['wall']:.0f} s", flush=True)


def cpu_seconds():
    """CPU time of this process and its finished children: on a shared machine this says more
    about a stage's cost than wall time does."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def stage_command(script, args):
    return [sys.executable, os.path.join(ROOT, script), *map(str, args)]


def run_script(script, *args):
    """A stage through its real command line; a failure stops the toy run with one line."""
    cmd = stage_command(script, args)
    print("  $ " + " ".join(cmd[1:]), flush=True)
    r = subprocess.run(cmd, cwd=ROOT)
    if r.returncode != 0:
        raise common.UserError(f"{script} failed with exit code {r.returncode}: {' '.join(cmd[1:])}")


def run_side_by_side(jobs, log_dir, echo_every=30.0):
    """Stage commands {name: [script, *args]} at the same time, one thread each, each appending to
    log_dir/<name>.log (its last "step" line is echoed every `echo_every` s). Side by side on one thread
    each beats one after the other with two threads: tiny ops gain little from a second thread, and
    each run's data loading is single-threaded anyway. A failure stops the others with one line."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    os.makedirs(log_dir, exist_ok=True)
    procs, last = {}, time.time()
    try:
        for name, (script, *args) in jobs.items():
            cmd, log = stage_command(script, args), os.path.join(log_dir, name + ".log")
            print(f"  $ {' '.join(cmd[1:])} >> {log}", flush=True)
            with open(log, "a") as f:
                procs[name] = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        while True:
            codes = {n: p.poll() for n, p in procs.items()}
            bad = next((n for n, c in codes.items() if c), None)
            if bad:
                raise common.UserError(f"{bad} failed with exit code {codes[bad]}; its log: {os.path.join(log_dir, bad + '.log')}")
            if None not in codes.values():
                return
            time.sleep(0.5)
            if time.time() - last > echo_every:
                last = time.time()
                for name in (n for n, c in codes.items() if c is None):
                    lines = [ln for ln in open(os.path.join(log_dir, name + ".log"), errors="replace") if ln.startswith("step")]
                    print(f"  [{name}] {lines[-1].strip() if lines else 'starting'}", flush=True)
    finally:
        for p in procs.values():  # a failure or Ctrl-C: stop the other runs too
            if p.poll() is None:
                p.kill()
                p.wait()


def training_done(run_dir, iters):
    ckpt = os.path.join(run_dir, "ckpt.pt")
    return os.path.isfile(ckpt) and common.torch_load(ckpt, "toy checkpoint")["step"] >= iters


# ----------------------------------------------------------------------------- the pipeline

def get_args_parser(description):
    # --- CLI ---
    p = common.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default="toy_out", help="everything goes here; rerun the same command to continue")
    p.add_argument("--quick", action="store_true", help="the CI run: fewer images and steps")
    p.add_argument("--seed", type=common.number(int, 0, what="--seed"), default=0, help="seed of the world and of every stage")
    p.add_argument("--device", default="cpu", help="device for the stages: cpu, cuda or auto")
    p.add_argument("--clip_steps", type=common.number(int, 1, what="--clip_steps"), default=None, help="tiny-CLIP pre-training steps (default: preset)")
    p.add_argument("--iters", type=common.number(int, 1, what="--iters"), default=None, help="segmenter training iterations (default: preset)")
    p.add_argument("--n_index", type=common.number(int, 1, what="--n_index"), default=None, help="index pool size (default: preset)")
    p.add_argument("--n_eval", type=common.number(int, 1, what="--n_eval"), default=None, help="evaluation scenes (default: preset)")
    p.add_argument("--no_ablation", action="store_true", help="skip the no-stop-gradient training run")
    p.add_argument("--check_floors", default=None, help="a JSON file {metric: floor} such as toy/floors.json: "
                                                          "exit 1 if a metric is below its floor")
    return p


def check_args(args):
    """Every flag is checked before any work: a bad value fails now, not half an hour in."""
    if args.n_index is not None and args.n_index < 10 * len(CATEGORIES):
        raise common.UserError(f"--n_index must be at least {10 * len(CATEGORIES)} (ten images per category)")
    common.check_device(args.device)
    common.check_out_dir(args.out_dir)
    return read_floors(args.check_floors) if args.check_floors else None


def run_stages(cfg, out, args, clock):
    """Every stage in order, each through its real command line (the world and the tiny CLIP in-process)."""
    world, clip_path = os.path.join(out, "world"), os.path.join(out, "tiny_clip.pt")
    archive, masks = os.path.join(out, "archive"), os.path.join(out, "masks")
    cats, voc, arc_json = os.path.join(world, "categories.txt"), os.path.join(world, "VOC2012"), os.path.join(archive, "archive.json")
    seed, dev = cfg["seed"], ["--device", args.device]
    clock.stage("world", os.path.isfile(os.path.join(voc, "ImageSets", "Segmentation", "trainval.txt")),  # its last file
                lambda: print(f"  world: {write_world(world, seed, cfg['n_index'], cfg['n_eval'])}"))
    clock.stage("tiny_clip", os.path.isfile(clip_path), lambda: pretrain_clip(clip_path, seed, cfg["clip_steps"]),
                partial=clip_path + ".resume.pt")
    clock.stage("build_archive", os.path.isfile(os.path.join(archive, "build_archive_config.json")), lambda: run_script(
        "build_archive.py", "--index_dirs", os.path.join(world, "index"), "--categories", cats, "--arch", clip_path,
        "--k", cfg["k"], "--out_dir", archive, *dev), partial=archive)
    clock.stage("pseudo_label", os.path.isfile(os.path.join(masks, "summary.json")), lambda: run_script(
        "pseudo_label.py", "--archive", arc_json, "--out_dir", masks, "--saliency", "boundary", "--num_workers", 0,
        *dev), partial=masks)

    runs = {"train": []} if args.no_ablation else {"train": [], "train_no_stop_grad": ["--no_stop_grad"]}
    todo = {name: ["train.py", "--arch", clip_path, "--archive", arc_json, "--masks_dir", masks, "--iters", cfg["iters"],
                   "--batch_size", cfg["batch_size"], "--seed", seed, "--out_dir", os.path.join(out, name),
                   "--save_every", SAVE_EVERY, *TRAIN_FLAGS, *extra, *dev]
            for name, extra in runs.items() if not training_done(os.path.join(out, name), cfg["iters"])}
    clock.stage(" + ".join(todo) or "train", not todo, lambda: run_side_by_side(todo, os.path.join(out, "logs")),
                partial=next((os.path.join(out, n) for n in todo if os.path.exists(os.path.join(out, n))), None))

    ckpt = os.path.join(out, "train", "ckpt.pt")
    evals = [("zutis", ["--ckpt", ckpt]), ("zutis_no_nms", ["--ckpt", ckpt, "--nms", "none"]),
             ("maskclip", ["--model", "maskclip", "--arch", clip_path])]
    if not args.no_ablation:
        evals.append(("zutis_no_stop_grad", ["--ckpt", os.path.join(out, "train_no_stop_grad", "ckpt.pt")]))
    # Naming external masks (evaluate.py --proposals): the true instance masks tell how much instance AP
    # is lost to naming alone; boundary-saliency components stand in for a class-agnostic proposer.
    props = {kind: os.path.join(out, "proposals", kind + ".json") for kind in ("oracle", "boundary")}
    clock.stage("proposals", all(map(os.path.isfile, props.values())), lambda: write_proposals(world, out))
    for kind, path in props.items():
        evals += [(f"zutis_{kind}_proposals", ["--ckpt", ckpt, "--proposals", path]),
                  (f"maskclip_{kind}_proposals", ["--model", "maskclip", "--arch", clip_path, "--proposals", path])]
    for name, extra in evals:
        d = os.path.join(out, "eval_" + name)
        clock.stage("eval_" + name, os.path.isfile(os.path.join(d, "metrics.json")), lambda d=d, extra=extra: run_script(
            "evaluate.py", "--bench", "voc", "--data_root", voc, "--classes", cats, "--out_dir", d, "--save_vis", 4,
            *extra, *dev), partial=d)
    return [name for name, _ in evals]


def report(out, evals, clock):
    """Metrics from the hidden labels and the evaluations, the picture grid and the how-it-works figures."""
    world, clip_path = os.path.join(out, "world"), os.path.join(out, "tiny_clip.pt")
    arc_json, masks, ckpt = os.path.join(out, "archive", "archive.json"), os.path.join(out, "masks"), os.path.join(out, "train", "ckpt.pt")
    t0, c0 = time.time(), cpu_seconds()
    res = clip_report(clip_path, world)
    res.update({name: eval_metrics(os.path.join(out, "eval_" + name)) for name in evals})
    res["archive_precision"], res["archive_k"] = archive_precision(arc_json, world)
    res["archive_precision"] *= 100
    iou, res["pseudo_masks"], missing = pseudo_mask_iou(arc_json, masks, world)
    res["pseudo_mask_iou"] = iou * 100
    for k in ("clip_zero_shot", "clip_precision@50"):
        res[k] = res[k] * 100
    if missing:
        print(f"  warning: {missing} archive images have no pseudo-mask")
    picture_grid(os.path.join(out, "grid.png"), world, clip_path, ckpt)
    how_it_works(os.path.join(out, "how_it_works"), out)
    res["proposals"] = proposal_recall(ckpt, world)
    clock.times["report"] = {"wall": time.time() - t0, "cpu": cpu_seconds() - c0, "resumed": False}
    return res


def main(description):
    args = get_args_parser(description).parse_args()
    floors = check_args(args)
    common.set_cpu_threads()  # the idle cores, for the tiny-CLIP pre-training and the report
    cfg = {**PRESETS["quick" if args.quick else "full"], **{k: v for k, v in vars(args).items() if v is not None}}
    print("toy.py config:")
    common.print_config(cfg)
    out = os.path.abspath(args.out_dir)
    t_start = time.time()
    check_same_settings(out, cfg)
    clock = Clock(out)
    res = report(out, run_stages(cfg, out, args, clock), clock)
    table, flat = results_table(res, clock.times, cfg), flat_results(res)
    with common.atomic_path(os.path.join(out, "results.md")) as tmp, open(tmp, "w") as f:
        f.write(table)
    common.save_json({"config": cfg, "metrics": flat, "seconds": {k: v["wall"] for k, v in clock.times.items()},
                      "cpu_seconds": {k: v["cpu"] for k, v in clock.times.items()},
                      "wall_s_this_run": time.time() - t_start, **common.git_info()}, os.path.join(out, "results.json"))
    print("\n" + table + f"\nwrote {out}/results.md, results.json, grid.png, how_it_works/ "
          f"({time.time() - t_start:.0f} s this run)")
    if floors is not None:
        bad = check_floors(flat, floors)
        print(f"floors ({args.check_floors}): " + ("all passed" if not bad else "FAILED:\n  " + "\n  ".join(bad)))
        if bad:
            sys.exit(1)
