"""toy.py: the whole ZUTIS pipeline learns, end to end, on a laptop CPU in minutes.

A procedurally generated world (toy_world.py: 64x64 images of ten shape categories on cluttered
backgrounds) stands in for the web, ImageNet/PASS and VOC. A tiny CLIP is pre-trained from scratch on a
captioned stream of it, then the real stages run through their real entry points:

    world     -> toy_out/world/{index/, VOC2012/, categories.txt, hidden/}
    tiny CLIP -> toy_out/tiny_clip.pt (a plain CLIP state dict: clip_model.load reads it)
    build_archive.py --arch toy_out/tiny_clip.pt --k 200          -> toy_out/archive/archive.json
    pseudo_label.py --saliency boundary                            -> toy_out/masks/
    train.py --crop 64 ... (and --no_stop_grad for the ablation)   -> toy_out/train*/ckpt.pt
    evaluate.py --bench voc (--nms hard / none; --model maskclip)  -> toy_out/eval_*/metrics.json
    -> toy_out/results.md (table), toy_out/results.json, toy_out/grid.png (GT | MaskCLIP | ZUTIS)

Nothing the generator knows (labels, masks) reaches a training stage: the index pool is a folder
of anonymous JPEGs, the labels live in toy_out/world/hidden/ and are read only to report
zero-shot accuracy, retrieval precision and pseudo-mask IoU. The tiny CLIP is mostly a colour
detector: each category has a typical hue 70% of the time (a tiny ViT learns shape too slowly
for a minutes budget).

Commands (CPU only; a GPU is used by the stages when present):
    python toy.py                                        # full run
    python toy.py --quick                                # the CI run: fewer images and steps
    python toy.py --quick --check_floors toy_floors.json # exit 1 if a metric is below its floor
Stages are cached under --out_dir (a stage reruns only when its settings change); a killed run
resumes when rerun (tiny CLIP from its last 50-step save, the trainings from their last ckpt.pt).
Each stage uses the idle cores (common.cpu_threads); the two trainings run side by side with one thread
each, since a second thread buys little for such small models. docs/toy.md explains the results.
The report lives in toy_report.py, the world generator in toy_world.py.
"""
import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import clip_model
import common
from benchmarks import mask_to_rle
from categories import TEMPLATES
from pseudo_label import boundary_saliency
from toy_report import archive_precision, eval_metrics, flat_results, picture_grid, proposal_recall, \
    pseudo_mask_iou, results_table
from toy_world import CATEGORIES, SIZE, caption_batch, eval_scene_names, write_world

HERE = os.path.dirname(os.path.abspath(__file__))
# ----------------------------------------------------------------------------- tiny CLIP

def tiny_clip(context_length=16):
    """A CLIP small enough to pre-train on 2 CPU cores in minutes. The text context is 16 tokens
    (our captions are short); clip_model.build_model reads it back from the tensor shapes."""
    return clip_model.CLIP(embed_dim=128, image_resolution=SIZE, vision_layers=4, vision_width=128,
                           vision_patch_size=8, context_length=context_length, vocab_size=49408,
                           transformer_width=128, transformer_heads=2, transformer_layers=3)


def to_clip_input(imgs):
    """uint8 [B, S, S, 3] -> CLIP-normalised float [B, 3, S, S] (CLIP's own preprocess at 64 px)."""
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255  # [B, S, S, 3] -> [B, 3, S, S]
    mean, std = torch.tensor(common.CLIP_MEAN), torch.tensor(common.CLIP_STD)
    return (x - mean[:, None, None]) / std[:, None, None]


def pretrain_clip(path, seed, steps, batch_size=128, lr=1e-3, warmup=30, log_seconds=20.0, save_every=50):
    """Contrastive pre-training (symmetric InfoNCE, learned temperature) on freshly generated
    captioned images, like CLIP's web data; saved as a plain state dict (clip_model.load reads it).
    Every `save_every` steps the whole state (weights, optimizer, both RNGs) goes to PATH.resume.pt,
    so a killed run continues exactly where it stopped when rerun with the same arguments."""
    torch.manual_seed(seed)
    model = tiny_clip().train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98), eps=1e-6)
    rng = np.random.default_rng([seed, 1])  # stream (a)
    resume, args = path + ".resume.pt", dict(seed=seed, steps=steps, batch_size=batch_size, lr=lr, warmup=warmup)
    start = _load_clip_state(resume, args, model, opt, rng)
    labels = torch.arange(batch_size)
    t0 = last = time.time()
    for step in range(start, steps):
        # linear warm-up then cosine decay to zero
        # (a Python float, not numpy's: it goes into the optimizer state that the resume file saves)
        f = (step + 1) / warmup if step < warmup else \
            0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
        for g in opt.param_groups:
            g["lr"] = lr * f
        imgs, caps = caption_batch(rng, batch_size)
        tokens = clip_model.tokenize(caps, context_length=model.context_length, truncate=True)
        logits_i, logits_t = model(to_clip_input(imgs), tokens)
        loss = (F.cross_entropy(logits_i, labels) + F.cross_entropy(logits_t, labels)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, np.log(100))  # CLIP's cap on the temperature
        if step == start or step == steps - 1 or time.time() - last > log_seconds:  # by time: steps vary 10x with load
            last, el, done = time.time(), time.time() - t0, step + 1 - start
            print(f"  clip step {step:4d}/{steps} loss {loss.item():.3f} scale {model.logit_scale.exp().item():5.1f} "
                  f"{el / done:.2f} s/step, ETA {el / done * (steps - step - 1):.0f} s", flush=True)
        if (step + 1) % save_every == 0 and step + 1 < steps:
            common.save_torch({"args": args, "step": step + 1, "model": model.state_dict(), "opt": opt.state_dict(),
                               "rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state()}, resume)
    common.save_torch(model.state_dict(), path)
    if os.path.exists(resume):
        os.remove(resume)


def _load_clip_state(resume, args, model, opt, rng):
    """Restore an interrupted pre-training saved with the same arguments; returns the step to start
    from (0 when there is none, or it was made with other arguments)."""
    if not os.path.isfile(resume):
        return 0
    ck = common.torch_load(resume, "tiny-CLIP resume file")
    if ck.get("args") != args:
        print(f"  {resume} was made with other settings: starting over")
        return 0
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["opt"])
    rng.bit_generator.state = ck["rng"]
    torch.set_rng_state(ck["torch_rng"])
    print(f"  resumed tiny-CLIP pre-training at step {ck['step']} from {resume}")
    return ck["step"]


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


def load_index(world_dir):
    """The index pool as uint8 [N, S, S, 3] with its hidden labels (reporting only)."""
    hidden = json.load(open(os.path.join(world_dir, "hidden", "index_labels.json")))
    imgs = np.stack([np.asarray(common.load_rgb(os.path.join(world_dir, "index", f))) for f in hidden["files"]])
    return imgs, np.array(hidden["labels"]), hidden["files"]


def clip_report(path, world_dir, k=50):
    """Zero-shot accuracy over the ten categories (85-template prompts, as the retrieval stage uses)
    and retrieval precision@k on the index pool, both from the hidden labels."""
    model, _ = clip_model.load(path)  # the same loader every stage uses
    imgs, labels, _ = load_index(world_dir)
    with torch.no_grad():
        emb = torch.cat([model.encode_image(to_clip_input(imgs[i:i + 256])) for i in range(0, len(imgs), 256)])
        emb = torch.nn.functional.normalize(emb, dim=-1)
        txt = clip_model.text_embeddings(model, CATEGORIES, templates=TEMPLATES)
        bg = clip_model.text_embeddings(model, ["background"] + CATEGORIES, templates=None)
    sim = (emb @ txt.T).numpy()  # [N, K]
    acc = float((sim.argmax(1) == labels).mean())
    top = np.argsort(-sim, axis=0, kind="stable")[:k]  # [k, K]
    prec = float(np.mean([(labels[top[:, c]] == c).mean() for c in range(len(CATEGORIES))]))
    # how distinct "background" is from the categories (the MaskCLIP baseline needs it)
    bg_cos = float((bg[0] @ bg[1:].T).max())
    return {"clip_zero_shot": acc, f"clip_precision@{k}": prec, "clip_background_max_cos": bg_cos}


# ----------------------------------------------------------------------------- floors

def read_floors(path):
    """Floors {metric: lowest acceptable value} from a JSON file such as toy_floors.json."""
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


# ----------------------------------------------------------------------------- the pipeline

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


def get_args_parser():
    # --- CLI ---
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default="toy_out", help="everything goes here; finished stages are reused")
    p.add_argument("--quick", action="store_true", help="the CI run: fewer images and steps")
    p.add_argument("--seed", type=int, default=0, help="seed of the world and of every stage")
    p.add_argument("--device", default="cpu", help="device for the stages: cpu, cuda or auto")
    p.add_argument("--clip_steps", type=int, default=None, help="tiny-CLIP pre-training steps (default: preset)")
    p.add_argument("--iters", type=int, default=None, help="segmenter training iterations (default: preset)")
    p.add_argument("--n_index", type=int, default=None, help="index pool size (default: preset)")
    p.add_argument("--n_eval", type=int, default=None, help="evaluation scenes (default: preset)")
    p.add_argument("--no_ablation", action="store_true", help="skip the no-stop-gradient training run")
    p.add_argument("--check_floors", default=None, help="a JSON file {metric: floor} such as toy_floors.json: "
                                                          "exit 1 if a metric is below its floor")
    return p


class Stages:
    """Run named stages once: a stage whose settings (and upstream settings) match its marker
    file under OUT/stages/ is skipped; otherwise its outputs are removed and it runs again.
    A resumable stage (one that continues its own interrupted work: tiny-CLIP pre-training,
    build_archive.py, pseudo_label.py, train.py --resume) that was killed keeps its outputs when rerun with
    the same settings, so a killed toy run loses at most the work since the stage's last save."""

    def __init__(self, out_dir):
        self.out_dir, self.seconds, self.cpu = out_dir, {}, {}
        self.group = {}  # stage -> name of the side-by-side run it was part of (wall time counts once per group)
        self.resuming = set()  # stages continuing an interrupted run of the same settings
        self.resumed = set()  # stages whose recorded time covers only the part after an interruption

    def _marker(self, name, suffix=""):
        return os.path.join(self.out_dir, "stages", name + suffix + ".json")

    def cached(self, name, settings, outputs, resumable=False):
        """(result, True) if the stage's marker matches `settings` and its outputs exist; else
        remove its stale outputs (kept if `resumable` and an interrupted run had the same
        settings) and return (None, False)."""
        marker = self._marker(name)
        if os.path.isfile(marker):
            m = json.load(open(marker))
            if m["settings"] == settings and all(os.path.exists(o) for o in outputs):
                print(f"[{name}] cached ({m['seconds']:.0f} s when it ran); delete {marker} to redo it")
                self.seconds[name], self.cpu[name] = m["seconds"], m.get("cpu_seconds", 0.0)
                if m.get("group"):
                    self.group[name] = m["group"]
                if m.get("resumed"):
                    self.resumed.add(name)
                return m["result"], True
        started = self._marker(name, ".started")
        if resumable and not os.path.isfile(marker) and os.path.isfile(started) \
                and json.load(open(started))["settings"] == settings:
            print(f"[{name}] was interrupted: continuing it (delete {started} to start it over)")
            self.resuming.add(name)
            return None, False
        for o in outputs:  # stale outputs of other settings: start clean
            shutil.rmtree(o) if os.path.isdir(o) else os.remove(o) if os.path.exists(o) else None
        return None, False

    def start(self, name, settings):
        if os.path.isfile(self._marker(name)):
            os.remove(self._marker(name))  # a done-marker of other settings must not outlive this run
        common.save_json({"settings": settings}, self._marker(name, ".started"))

    def done(self, name, settings, seconds, cpu, result=None, group=None):
        self.seconds[name], self.cpu[name] = seconds, cpu
        if group:
            self.group[name] = group
        if name in self.resuming:
            self.resumed.add(name)
        common.save_json({"settings": settings, "seconds": seconds, "cpu_seconds": cpu, "group": group,
                          "resumed": name in self.resumed, "result": result}, self._marker(name))
        if os.path.isfile(self._marker(name, ".started")):
            os.remove(self._marker(name, ".started"))
        print(f"[{name}] done in {seconds:.0f} s", flush=True)

    def run(self, name, settings, outputs, fn, resumable=False):
        result, hit = self.cached(name, settings, outputs, resumable)
        return result if hit else self._timed(name, settings, fn)

    def _timed(self, name, settings, fn):
        print(f"[{name}] running", flush=True)
        self.start(name, settings)
        t0, c0 = time.time(), cpu_seconds()
        result = fn()
        self.done(name, settings, time.time() - t0, cpu_seconds() - c0, result)
        return result

    def run_scripts(self, jobs, settings, resume_args=()):
        """Script stages {name: (outputs, [script, *args])} that are not cached run at the same time,
        one CPU thread each (run_parallel); a single one runs alone with every thread. They are
        resumable: one continuing an interrupted run gets `resume_args` added to its command."""
        todo = {n: cmd for n, (outs, cmd) in jobs.items() if not self.cached(n, settings, outs, resumable=True)[1]}
        todo = {n: [*cmd, *resume_args] if n in self.resuming else cmd for n, cmd in todo.items()}
        if len(todo) == 1:
            (name, cmd), = todo.items()
            self._timed(name, settings, lambda: run_script(*cmd))
        elif todo:
            print(f"[{', '.join(todo)}] running at the same time, one thread each", flush=True)
            group = "+".join(todo)
            for name in todo:
                self.start(name, settings)
            for name, (wall, cpu) in run_parallel(todo, os.path.join(self.out_dir, "logs")).items():
                self.done(name, settings, wall, cpu, group=group)


def cpu_seconds():
    """CPU time of this process and its finished children: on a shared machine this says more
    about a stage's cost than wall time does."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def stage_command(script, args):
    return [sys.executable, os.path.join(HERE, script), *map(str, args)]


def run_script(script, *args):
    """A stage through its real command line; a failure stops the toy run with one line."""
    cmd = stage_command(script, args)
    print("  $ " + " ".join(cmd[1:]), flush=True)
    r = subprocess.run(cmd, cwd=HERE)
    if r.returncode != 0:
        raise common.UserError(f"{script} failed with exit code {r.returncode}: {' '.join(cmd[1:])}")


def run_parallel(jobs, log_dir, echo_every=30.0):
    """Run stage scripts {name: [script, *args]} at the same time, one thread each, each writing to
    log_dir/<name>.log (its last progress line is echoed every `echo_every` s). Side by side on one
    thread each beats one after the other with two threads: tiny ops gain little from a second thread,
    and each run's data loading is single-threaded anyway. Returns {name: (wall s, CPU s)}; a failure
    kills the others and stops the toy run with one line."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    os.makedirs(log_dir, exist_ok=True)
    procs, out, t0, last = {}, {}, time.time(), time.time()
    try:
        for name, (script, *args) in jobs.items():
            cmd = stage_command(script, args)
            log = os.path.join(log_dir, name + ".log")
            print(f"  $ {' '.join(cmd[1:])} > {log}", flush=True)
            with open(log, "w") as f:
                procs[name] = (subprocess.Popen(cmd, cwd=HERE, env=env, stdout=f, stderr=subprocess.STDOUT), log)
        while procs:
            time.sleep(0.5)
            for name, (p, log) in list(procs.items()):
                pid, status, usage = os.wait4(p.pid, os.WNOHANG)  # wait4: this child's own CPU time
                if not pid:
                    continue
                p.returncode = os.waitstatus_to_exitcode(status)
                del procs[name]
                if p.returncode != 0:
                    raise common.UserError(f"{name} failed with exit code {p.returncode}; its log: {log}")
                out[name] = (time.time() - t0, usage.ru_utime + usage.ru_stime)
                print(f"  [{name}] finished after {out[name][0]:.0f} s", flush=True)
            if time.time() - last > echo_every:
                last = time.time()
                for name, (_, log) in procs.items():
                    lines = [ln for ln in open(log, errors="replace").read().splitlines() if ln.startswith("step")]
                    print(f"  [{name}] {lines[-1] if lines else 'starting'}", flush=True)
    finally:
        for p, _ in procs.values():  # a failure or Ctrl-C: stop the other runs too
            p.kill()
            p.wait()
    return out


def check_args(args):
    """Every flag is checked before any work: a bad value fails now, not half an hour in."""
    for k in ("clip_steps", "iters", "n_index", "n_eval"):
        v = getattr(args, k)
        if v is not None and v < 1:
            raise common.UserError(f"--{k} must be a positive number, got {v}")
    if args.n_index is not None and args.n_index < 10 * len(CATEGORIES):
        raise common.UserError(f"--n_index must be at least {10 * len(CATEGORIES)} (ten images per category)")
    if args.device not in ("cpu", "cuda", "auto") and not args.device.startswith("cuda:"):
        raise common.UserError(f"--device must be cpu, cuda, cuda:N or auto, got {args.device!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise common.UserError("--device cuda asked for, but torch sees no CUDA device")
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        raise common.UserError(f"--out_dir {args.out_dir!r} is a file")
    return read_floors(args.check_floors) if args.check_floors else None


def main():
    args = get_args_parser().parse_args()
    floors = check_args(args)
    common.set_cpu_threads()  # the idle cores, for the tiny-CLIP pre-training and the report
    cfg = {**PRESETS["quick" if args.quick else "full"], **{k: v for k, v in vars(args).items() if v is not None}}
    print("toy.py config:")
    common.print_config(cfg)
    out = os.path.abspath(args.out_dir)
    world, clip_path = os.path.join(out, "world"), os.path.join(out, "tiny_clip.pt")
    archive, masks = os.path.join(out, "archive"), os.path.join(out, "masks")
    cats, voc = os.path.join(world, "categories.txt"), os.path.join(world, "VOC2012")
    st, seed, dev = Stages(out), cfg["seed"], ["--device", args.device]
    t_start = time.time()

    # settings of each stage include those upstream, so a change reruns everything after it
    s_world = {"seed": seed, "n_index": cfg["n_index"], "n_eval": cfg["n_eval"]}
    info = st.run("world", s_world, [world], lambda: write_world(world, seed, cfg["n_index"], cfg["n_eval"]))
    print(f"  world: {info}")
    s_clip = {**s_world, "clip_steps": cfg["clip_steps"]}
    res = st.run("tiny_clip", s_clip, [clip_path], lambda: (pretrain_clip(clip_path, seed, cfg["clip_steps"]),
                                                             clip_report(clip_path, world))[1], resumable=True)
    print(f"  tiny CLIP: {res}")
    s_arc = {**s_clip, "k": cfg["k"]}
    st.run("build_archive", s_arc, [archive], lambda: run_script(
        "build_archive.py", "--index_dirs", os.path.join(world, "index"), "--categories", cats, "--arch", clip_path,
        "--k", cfg["k"], "--out_dir", archive, *dev), resumable=True)
    arc_json = os.path.join(archive, "archive.json")
    st.run("pseudo_label", s_arc, [masks], lambda: run_script(
        "pseudo_label.py", "--archive", arc_json, "--out_dir", masks, "--saliency", "boundary", "--num_workers", 0,
        *dev), resumable=True)

    s_train = {**s_arc, "iters": cfg["iters"], "batch_size": cfg["batch_size"], "flags": TRAIN_FLAGS}
    runs = {"train": []} if args.no_ablation else {"train": [], "train_no_stop_grad": ["--no_stop_grad"]}
    st.run_scripts({name: ([os.path.join(out, name)], [
        "train.py", "--arch", clip_path, "--archive", arc_json, "--masks_dir", masks, "--iters", cfg["iters"],
        "--batch_size", cfg["batch_size"], "--seed", seed, "--out_dir", os.path.join(out, name),
        "--save_every", SAVE_EVERY, *TRAIN_FLAGS, *extra, *dev]) for name, extra in runs.items()}, s_train,
        resume_args=["--resume"])

    evals = [("zutis", ["--ckpt", os.path.join(out, "train", "ckpt.pt")]),
             ("zutis_no_nms", ["--ckpt", os.path.join(out, "train", "ckpt.pt"), "--nms", "none"]),
             ("maskclip", ["--model", "maskclip", "--arch", clip_path])]
    if not args.no_ablation:
        evals.append(("zutis_no_stop_grad", ["--ckpt", os.path.join(out, "train_no_stop_grad", "ckpt.pt")]))
    # Naming external masks (evaluate.py --proposals): the true instance masks tell how much instance AP
    # is lost to naming alone; boundary-saliency components stand in for a class-agnostic proposer.
    props = st.run("proposals", s_world, [os.path.join(out, "proposals")], lambda: write_proposals(world, out))
    for kind, path in props.items():
        evals += [(f"zutis_{kind}_proposals", ["--ckpt", os.path.join(out, "train", "ckpt.pt"), "--proposals", path]),
                  (f"maskclip_{kind}_proposals", ["--model", "maskclip", "--arch", clip_path, "--proposals", path])]
    for name, extra in evals:
        d = os.path.join(out, "eval_" + name)
        res[name] = st.run("eval_" + name, s_train, [d], lambda d=d, extra=extra: (run_script(
            "evaluate.py", "--bench", "voc", "--data_root", voc, "--classes", cats, "--out_dir", d,
            "--save_vis", 4, *extra, *dev), eval_metrics(d))[1])

    t0, c0 = time.time(), cpu_seconds()
    res["archive_precision"], res["archive_k"] = archive_precision(arc_json, world)
    res["archive_precision"] *= 100
    iou, res["pseudo_masks"], missing = pseudo_mask_iou(arc_json, masks, world)
    res["pseudo_mask_iou"] = iou * 100
    for k in ("clip_zero_shot", "clip_precision@50"):
        res[k] = res[k] * 100
    if missing:
        print(f"  warning: {missing} archive images have no pseudo-mask")
    picture_grid(os.path.join(out, "grid.png"), world, clip_path, os.path.join(out, "train", "ckpt.pt"))
    res["proposals"] = proposal_recall(os.path.join(out, "train", "ckpt.pt"), world)
    st.seconds["report"], st.cpu["report"] = time.time() - t0, cpu_seconds() - c0
    table = results_table(res, st.seconds, st.cpu, cfg, st.group, st.resumed)
    flat = flat_results(res)
    with common.atomic_path(os.path.join(out, "results.md")) as tmp, open(tmp, "w") as f:
        f.write(table)
    common.save_json({"config": cfg, "metrics": flat, "seconds": st.seconds, "cpu_seconds": st.cpu,
                      "wall_s_this_run": time.time() - t_start, **common.git_info()}, os.path.join(out, "results.json"))
    print("\n" + table + f"\nwrote {out}/results.md, results.json, grid.png ({time.time() - t_start:.0f} s this run)")
    if floors is not None:
        bad = check_floors(flat, floors)
        print(f"floors ({args.check_floors}): " + ("all passed" if not bad else "FAILED:\n  " + "\n  ".join(bad)))
        if bad:
            sys.exit(1)


if __name__ == "__main__":
    common.run_main(main)
