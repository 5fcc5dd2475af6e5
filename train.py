"""
Train the ZUTIS segmenter on copy-paste scenes made from the retrieval archive and its pseudo-masks
(paper sections 3.2-3.3, 4.1; official trainer.py). One flat loop; defaults = the official recipe.

Reads --archive (build_archive.py), --masks_dir (pseudo_label.py) and the CLIP named by --arch. Writes to
--out_dir: ckpt.pt (weights, optimiser, step, config, text embeddings, RNG states; atomically, every
--save_every steps and at the end), config.json (the same config) and metrics.jsonl (one line per log).

  1 GPU:    python train.py --archive out/archive.json --masks_dir out/masks
  N GPUs:   torchrun --standalone --nproc_per_node 8 train.py ...   (--batch_size is the global batch)
  tiny CPU: python train.py --device cpu --arch toy_out/tiny_clip.pt --archive toy_out/archive/archive.json
                --masks_dir toy_out/masks --crop 64 --iters 200 --num_workers 0 --lr 1e-3 --lr_encoder 3e-4
                --model n_queries=20 n_layers=2 dim_ffn=256 logit_scale=10
  resume:   rerun the same command (the same weights and RNG states as an uninterrupted run); a command
            whose settings differ from <out_dir>/ckpt.pt's is refused, naming them
Then: python evaluate.py --bench voc --ckpt <out_dir>/ckpt.pt. Speed: python bench.py train. Docs: docs/train.md.
"""
import argparse
import dataclasses
import itertools
import json
import math
import os
import random
import shutil
import time

import numpy as np
import torch

import categories
import clip_model
import common
import dataset
import model
from common import UserError

POLY_POWER = 0.9  # official PolyLR power
MODEL_DEFAULTS = {k: v for k, v in dataclasses.asdict(model.ModelConfig()).items()  # the --model keys
                  if k not in ("arch", "stop_grad", "text_fp32")}

# ----------------------------------------------------------------------------- CLI


def parse_args(argv=None):
    p = common.ArgumentParser(description=__doc__.split("\n\n")[0].strip(), usage="%(prog)s [options]",
                                formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(prog, max_help_position=30, width=120))
    a = p.add_argument
    a("--arch", default="ViT-B/16", help="CLIP name or path to CLIP weights (default %(default)s).")
    a("--archive", default="out/archive.json", help="Archive JSON written by build_archive.py (default %(default)s).")
    a("--masks_dir", default="out/masks", help="Pseudo-masks written by pseudo_label.py (default %(default)s).")
    a("--index_dirs", nargs="+", default=None, help="Where the archive's images live, if they moved.")
    a("--categories", default=None, help="Built-in name, text file or comma list; default: the archive's list.")
    a("--ignore_index", type=int, default=None, help="Label id of padding, ignored by the loss; default 255, or "
      "1000 above 255 categories (ImageNet-S919), as categories.recipe gives.")
    a("--crop", type=common.number(int, 1, what="--crop"), default=384, help="Training crop in pixels (default %(default)s).")
    a("--norm", default="imagenet", choices=sorted(common.NORMS), help="Input normalisation (default %(default)s).")
    a("--aug", nargs="+", default=[], metavar="KEY=VALUE", help="Copy-paste settings, e.g. max_n=3 "
      f"jitter=0.4,0.4,0.4,0 p_gray=0 (max_n counts the canvas image: max_n=3 pastes up to 2 images on it); "
      f"defaults: {fmt_kv(dataset.AUG)}.")
    a("--model", nargs="+", default=[], metavar="KEY=VALUE", help="Model settings (model.ModelConfig), e.g. "
      f"n_queries=20 n_layers=2; defaults: {fmt_kv(MODEL_DEFAULTS)}.")
    a("--no_stop_grad", action="store_true", help="Ablation: let the mask loss reach the encoder.")
    a("--text_fp32", action="store_true", help="Class-name embeddings in fp32 on CUDA (official: fp16 there).")
    a("--lambda_mask", type=common.number(float, 0, what="--lambda_mask"), default=1.0, help="Weight of the mask loss; CE has weight 1 (default %(default)s).")
    a("--iters", type=common.number(int, 1, what="--iters"), default=None, help="Training iterations; default 80000 for imagenet_s919, else 20000.")
    a("--batch_size", type=common.number(int, 1, what="--batch_size"), default=8, help="Global batch, split over torchrun ranks (default %(default)s).")
    lr = common.number(float, 0, what="a learning rate")  # 0 freezes a group (with --min_lr 0)
    a("--lr", type=lr, default=5e-5, help="Learning rate of queries, ffn1, ffn2, decoder (default %(default)s).")
    a("--lr_encoder", type=lr, default=5e-6, help="Learning rate of the CLIP visual encoder (default %(default)s).")
    a("--weight_decay", type=common.number(float, 0, what="--weight_decay"), default=0.05,
      help="AdamW weight decay on every parameter (default %(default)s).")
    a("--min_lr", type=common.number(float, 0, what="--min_lr"), default=1e-6,
      help="Floor of the poly schedule, both groups; at most --lr and --lr_encoder (default %(default)s).")
    a("--dtype", default="float32", choices=common.DTYPES, help=f"The model's {common.DTYPE_HELP}; float16 is "
      "loss-scaled; the losses and the matcher stay float32 (default %(default)s).")
    a("--compile", action="store_true", help="torch.compile the model (inductor; on a CPU it needs a C++ compiler). "
      "Off by default: measured in docs/speed.md.")
    a("--device", default="auto", help="auto, cpu or cuda (default %(default)s).")
    a("--num_workers", type=common.number(int, 0, what="--num_workers"), default=8, help="DataLoader workers per rank; 0: none (default %(default)s).")
    a("--seed", type=common.number(int, 0, what="--seed"), default=0, help="Seed of the model init and of the data stream (default %(default)s).")
    a("--out_dir", default=None, help="Output folder; default out/train_<CLIP name>, e.g. out/train_ViT-B-16.")
    a("--save_every", type=common.number(int, 1, what="--save_every"), default=1000, help="Save ckpt.pt every N iterations and at the end (default %(default)s).")
    a("--log_every", type=common.number(int, 1, what="--log_every"), default=50, help="Print and log the losses every N iterations (default %(default)s).")
    a("--init", default=None, help="Start from these weights: a ckpt.pt, an official file, or official:<name>.")
    return p.parse_args(argv)


def fmt_kv(d):
    return " ".join(f"{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in d.items())


def parse_kv(pairs, defaults, flag):
    """["k=v", ...] -> {k: v} typed like `defaults[k]` (tuples as comma lists of as many numbers, booleans
    as true/false); an unknown key or a bad value is an error naming it and the accepted form."""
    out = {}
    for pair in pairs:
        k, sep, v = pair.partition("=")
        if not sep or k not in defaults:
            what = f"unknown key {k!r}" if sep else f"{pair!r} has no '='"
            raise UserError(f"{flag}: expected KEY=VALUE with KEY in {sorted(defaults)}; {what}")
        d = defaults[k]
        form = (f"{len(d)} comma-separated numbers" if isinstance(d, tuple) else "true or false" if isinstance(d, bool)
                else "a whole number" if isinstance(d, int) else "a number" if isinstance(d, float) else "text")
        try:
            if isinstance(d, bool):
                out[k] = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}[v.lower()]
            elif isinstance(d, tuple):
                out[k] = tuple(float(x) for x in v.split(","))
                if len(out[k]) != len(d):
                    raise ValueError
            else:
                out[k] = type(d)(v)
        except (ValueError, KeyError):
            raise UserError(f"{flag} {k}={v!r} is not {form} (e.g. {fmt_kv({k: d})}, the default)") from None
    return out


def check_args(args):
    """Checks that need more than one flag, or the file system, before any work."""
    if args.min_lr > min(args.lr, args.lr_encoder):
        raise UserError(f"--min_lr {args.min_lr} is above --lr {args.lr} or --lr_encoder {args.lr_encoder}: the "
                        "schedule's floor must not exceed a base learning rate (lower --min_lr)")
    if args.categories is not None and not args.categories.strip():
        raise UserError("--categories is empty: give a built-in name, a file or a comma list, or leave the flag "
                        "out to train on the archive's categories")
    if args.out_dir is not None:
        common.check_out_dir(args.out_dir)
    common.load_json(args.archive, "archive (--archive)")  # a missing or non-JSON file fails here, in one line
    common.require_dir(args.masks_dir, "pseudo-mask folder (--masks_dir)")
    for d in args.index_dirs or []:
        common.require_dir(d, "image folder (--index_dirs)")


# ----------------------------------------------------------------------------- schedule, optimiser

def poly_lr(base_lr, step, iters, min_lr=1e-6):
    """Official PolyLR, stepped every iteration: max(base * (1 - step/iters)^0.9, min_lr).
    The floor applies to every group, so the encoder (base 5e-6) ends at 1e-6 too."""
    return max(base_lr * (1 - step / iters) ** POLY_POWER, min_lr)


def make_optimizer(model, cfg):
    """AdamW, two groups: the CLIP visual encoder (incl. proj) and the rest (ffn1, decoder, queries,
    ffn2). Weight decay on everything, biases and norms included (official)."""
    enc, rest = list(model.encoder.parameters()), [p for n, p in model.named_parameters() if not n.startswith("encoder.")]
    groups = [{"params": enc, "lr": cfg["lr_encoder"], "base_lr": cfg["lr_encoder"], "name": "encoder"},
              {"params": rest, "lr": cfg["lr"], "base_lr": cfg["lr"], "name": "rest"}]
    # fused: one kernel for the whole update on a GPU, the same maths as the default
    return torch.optim.AdamW(groups, weight_decay=cfg["weight_decay"], betas=(0.9, 0.999), eps=1e-8, fused=enc[0].is_cuda)


def set_lr(optimizer, step, iters, min_lr):
    for g in optimizer.param_groups:
        g["lr"] = poly_lr(g["base_lr"], step, iters, min_lr)


# ----------------------------------------------------------------------------- data

class StepBatches(torch.utils.data.Sampler):
    """Index batches as a pure function of (step, rank, position): item = (step * world + rank) * b + i.
    A scene depends only on its index, so resuming at step s replays what an uninterrupted run saw."""

    def __init__(self, b, rank, world, start_step=0):
        self.b, self.rank, self.world, self.start = b, rank, world, start_step

    def __iter__(self):
        for step in itertools.count(self.start):
            first = (step * self.world + self.rank) * self.b
            yield list(range(first, first + self.b))


def make_loader(cfg, dist, start_step):
    local_batch = cfg["batch_size"] // dist.world
    data = dataset.ArchiveDataset(cfg["archive"], cfg["masks_dir"], categories=cfg["categories"], crop=cfg["crop"],
                                  ignore_index=cfg["ignore_index"], norm=cfg["norm"], seed=cfg["seed"],
                                  length=(cfg["iters"] + 1) * cfg["batch_size"], index_dirs=cfg["index_dirs"],
                                  **{k: cfg[k] for k in dataset.AUG})
    sampler = StepBatches(local_batch, dist.rank, dist.world, start_step)
    return torch.utils.data.DataLoader(data, batch_sampler=sampler, collate_fn=dataset.collate_fn,
                                       num_workers=cfg["num_workers"], pin_memory=dist.device.type == "cuda")


def to_device(batch, device):
    nb = device.type == "cuda"  # pinned memory -> asynchronous copies
    return {k: [t.to(device, non_blocking=nb) for t in v] if isinstance(v, list) else v.to(device, non_blocking=nb)
            for k, v in batch.items()}


def check_masks(data, out_dir, is_main):
    """Archive entries without a pseudo-mask are empty masks, as in the official code; all missing
    means pseudo_label.py has not run."""
    missing = data.check_masks()
    if missing and len(missing) == len(data.entries):  # on every rank, so all ranks stop
        raise UserError(f"none of the {len(missing)} archive images has a pseudo-mask in {data.masks_dir!r} "
                        "(run pseudo_label.py first, or pass --masks_dir)")
    if missing and is_main:
        path = os.path.join(out_dir, "missing_masks.txt")
        with common.atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.writelines(f"{e['dir']}\t{e['path']}\n" for e in missing)
        print(f"warning: {len(missing)} of {len(data.entries)} archive images have no pseudo-mask "
              f"(used as empty masks); list in {path}")


# ----------------------------------------------------------------------------- config, model

def make_config(args):
    """The one run config: model fields, data, recipe and optimisation settings (plain types). It goes
    into config.json and ckpt.pt; evaluation reads categories, ignore_index and norm from it."""
    cats = categories.get_categories(args.categories) if args.categories is not None else \
        common.load_archive(args.archive, args.index_dirs)["categories"]
    recipe = categories.recipe(cats)  # from the list's content, as build_archive.py decides it
    ignore = recipe["ignore_index"] if args.ignore_index is None else args.ignore_index
    model.check_ignore_index(ignore, len(cats))
    mcfg = model.ModelConfig.from_dict({}, arch=args.arch, stop_grad=not args.no_stop_grad, text_fp32=args.text_fp32,
                                   **parse_kv(args.model, MODEL_DEFAULTS, "--model"))
    aug = dataset.check_aug({**dataset.AUG, **parse_kv(args.aug, dataset.AUG, "--aug")})
    arch_path = os.path.abspath(args.arch) if os.path.isfile(args.arch) else args.arch
    flags = {k: v for k, v in vars(args).items() if k not in ("aug", "model", "no_stop_grad", "text_fp32", "arch")}
    return {**dataclasses.asdict(mcfg), "arch_path": arch_path, **flags, "categories": cats, "recipe": recipe["name"],
            "ignore_index": ignore, "iters": args.iters or recipe["iters"],
            **{k: list(v) if isinstance(v, tuple) else v for k, v in aug.items()}}


def build_model(cfg, init, device, print0, ck=None):
    """ZUTIS from the config; with --init the file's weights go into a model of our config, so a shape
    mismatch is a clear error, never a partial load. A resumed run's model is ckpt.pt's (`ck`): its
    weights and text embeddings, no CLIP file needed."""
    if ck is not None:
        return model.from_train_checkpoint(ck).to(device)
    mcfg = model.ModelConfig.from_dict(cfg)
    if not init:
        return model.ZUTIS(mcfg, cfg["categories"], arch_path=cfg["arch_path"]).to(device)
    fields = {k: v for k, v in dataclasses.asdict(mcfg).items() if k != "arch"}
    net = model.load_checkpoint(init, categories=cfg["categories"], **fields)
    if net.arch != cfg["arch"]:
        print0(f"note: --init {init} is a {net.arch} model; using that instead of --arch {cfg['arch']}")
        cfg["arch"] = net.arch
    print0(f"initialised all weights from {init}")
    return net.train().to(device)


def autocast_ctx(device, dtype):
    """The forward's autocast for a --dtype name (float32: none); float16 on a CPU is refused."""
    return common.autocast(device, common.resolve_dtype(dtype, device))


def compile_model(model, device):
    """torch.compile with inductor, which builds C++ on a CPU: a missing compiler is one clear line
    instead of an error deep inside the first forward."""
    if torch.device(device).type == "cpu":
        import torch._inductor.config as inductor
        cxx = inductor.cpp.cxx if isinstance(inductor.cpp.cxx, (list, tuple)) else (inductor.cpp.cxx,)
        names = [c for c in cxx if c]
        if not any(shutil.which(c) for c in names):
            raise UserError(f"--compile on a CPU needs the C++ compiler inductor uses ({' or '.join(names)}; set CXX "
                            "to choose another) and none is on PATH: install one or run without --compile")
    return torch.compile(model)


def compute_losses(net, batch, ctx, cfg):
    """Forward under autocast, losses in fp32 outside it (the matcher and BCE want fp32)."""
    with ctx:
        out = net(batch["image"])
    out = {k: v.float() if torch.is_tensor(v) else v for k, v in out.items()}
    return model.criterion(out, batch, ignore_index=cfg["ignore_index"], lambda_mask=cfg["lambda_mask"])


def reduce_losses(losses, dist):
    """Mean of every loss term over ranks, as python floats."""
    names = sorted(losses)
    vec = torch.stack([losses[k].detach().float() for k in names])
    if dist.ddp:
        torch.distributed.all_reduce(vec)
        vec /= dist.world
    return dict(zip(names, vec.tolist()))


def rng_state():
    """The python, numpy, torch (and CUDA) RNG states as tensors and plain types, so that a checkpoint
    holding them loads with weights_only=True."""
    version, py_state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    st = {"python": torch.tensor(py_state, dtype=torch.int64), "python_gauss": gauss,
          "numpy": torch.from_numpy(keys.astype(np.int64)), "numpy_rest": [int(pos), int(has_gauss), float(cached)],
          "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st):
    random.setstate((3, tuple(st["python"].tolist()), st["python_gauss"]))
    pos, has_gauss, cached = st["numpy_rest"]
    np.random.set_state(("MT19937", st["numpy"].numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def seed_all(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- checkpoints

# Settings that leave a resumed run's numbers unchanged: where the data and the CLIP file lie (the categories
# are compared; weights and text embeddings come from ckpt.pt), how often to log and save, the worker count,
# the device (a note is printed when its kind changes) and provenance.
RESUME_FREE = {"archive", "masks_dir", "index_dirs", "arch", "arch_path", "init", "resume", "out_dir", "num_workers",
               "log_every", "save_every", "device", "world_size", "torch", "git_sha", "git_dirty"}


def flag_of(key):
    """The command-line spelling of a config key, for messages."""
    if key in MODEL_DEFAULTS:
        return f"--model {key}="
    if key in dataset.AUG:
        return f"--aug {key}="
    return f"--{key} "


def describe_change(key, new, old):
    """'--lr 0.001 (checkpoint: 5e-05)'; a category list by its first difference."""
    if key == "categories" and isinstance(old, list):
        i = next((i for i, (a, b) in enumerate(zip(new, old)) if a != b), min(len(new), len(old)))
        at = lambda v: repr(v[i]) if i < len(v) else "none"  # noqa: E731
        return f"--categories: {len(new)} names (checkpoint: {len(old)}), id {i} {at(new)} (checkpoint: {at(old)})"
    if key in ("stop_grad", "text_fp32", "compile"):  # switches: on / off, as typed
        on = lambda v: "on" if bool(v) != (key == "stop_grad") else "off"  # noqa: E731
        return f"--{'no_stop_grad' if key == 'stop_grad' else key} {on(new)} (checkpoint: {on(old)})"
    show = lambda v: ",".join(map(str, v)) if isinstance(v, list) else v  # noqa: E731
    return f"{flag_of(key)}{show(new)} (checkpoint: {show(old)})"


def load_resume(path, cfg, dist):
    """<out_dir>/ckpt.pt of an earlier run of this command, to resume exactly. A command whose settings
    differ from the checkpoint's in anything that changes the numbers is refused, naming every one."""
    ck = common.torch_load(path, "checkpoint")
    if not isinstance(ck, dict) or any(k not in ck for k in ("model", "optimizer", "step", "config", "rng", "text_emb")):
        raise UserError(f"{path} is not a train.py checkpoint: choose another --out_dir (use --init to start "
                        "from its weights)")
    old = ck["config"]
    diff = [k for k in cfg if k not in RESUME_FREE and old.get(k) != cfg[k]]
    if diff:
        what = "; ".join(describe_change(k, cfg[k], old.get(k)) for k in diff)
        raise UserError(f"{path} was trained with other settings: {what}. Rerun with the checkpoint's settings to "
                        "continue it; to start over choose another --out_dir or delete that folder (--init "
                        f"{path} starts a new run from its weights)")
    if torch.device(old.get("device", "cpu")).type != dist.device.type:
        dist.print0(f"note: {path} was trained on {old.get('device')}; continuing on {dist.device} changes the "
                    "floating-point rounding, so the numbers will not equal an uninterrupted run's exactly")
    cfg.update(arch=old["arch"], arch_path=old.get("arch_path"))  # the checkpoint's model, whatever --arch says
    return ck


def save_checkpoint(path, raw_model, optimizer, scaler, step, cfg, dist):
    """One file, written atomically by rank 0 from the unwrapped, uncompiled model (no prefixes). Every
    rank's RNG state goes in (a list indexed by rank) so a rerun restores each rank exactly; the text
    embeddings go in so the checkpoint loads without the CLIP file."""
    rngs = dist.gather(rng_state())
    if dist.is_main:
        common.save_torch({"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                           "scaler": scaler.state_dict(), "step": step, "config": cfg,
                           "text_emb": raw_model.text_emb.cpu(), "rng": rngs}, path)


def log_jsonl(path, rec):
    """Append one JSON object as a line (metrics.jsonl)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(rec) + "\n")


def fmt_time(s):
    """Seconds -> '4m05s' or '2h13m'."""
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def trim_metrics(path, step):
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            lines = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= step]
        with common.atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.writelines(lines)


# ----------------------------------------------------------------------------- training

def train(args, dist):
    out_dir = common.check_out_dir(args.out_dir or os.path.join("out", f"train_{clip_model.arch_tag(args.arch)}"))
    ckpt_path, metrics_path = os.path.join(out_dir, "ckpt.pt"), os.path.join(out_dir, "metrics.jsonl")
    if dist.is_main:
        common.remove_stale_tmp(out_dir, recursive=False)  # temp files of a killed checkpoint write
    ck, cfg = None, make_config(args)
    if os.path.exists(ckpt_path):  # an earlier run of this command: continue it
        ck = load_resume(ckpt_path, cfg, dist)
    elif not args.init:
        model.resolve_arch(args.arch)  # an unknown CLIP name or a missing file stops here, before any work
    cfg.update(out_dir=out_dir, world_size=dist.world, device=str(dist.device), torch=str(torch.__version__),
               **common.git_info())
    if cfg["batch_size"] % dist.world:
        raise UserError(f"--batch_size {cfg['batch_size']} (global) must be divisible by the {dist.world} ranks")
    start, iters = (ck["step"] if ck else 0), cfg["iters"]
    if start >= iters:
        dist.print0(f"{ckpt_path} is already at step {start} >= {iters} iterations: nothing to do")
        return None
    device = dist.device
    seed_all(cfg["seed"])  # the same init on every rank (DDP also broadcasts rank 0's weights)
    raw_model = build_model(cfg, None if ck else args.init, device, dist.print0, ck).train()
    optimizer = make_optimizer(raw_model, cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg["dtype"] == "float16")
    if dist.is_main:
        print(f"config ({iters} iterations; default from categories.recipe unless --iters):")
        common.print_config(cfg)
        common.save_json(cfg, os.path.join(out_dir, "config.json"))
    seed_all(cfg["seed"] + dist.rank)  # ranks differ in anything random below
    loader = make_loader(cfg, dist, start)
    check_masks(loader.dataset, out_dir, dist.is_main)
    # The iterator draws its base seed from torch's RNG: created before the checkpoint's RNG state is
    # restored, so a resumed run continues from exactly the state an uninterrupted one saved.
    batches = iter(loader)
    if ck:
        raw_model.load_state_dict(ck["model"], strict=True)
        optimizer.load_state_dict(ck["optimizer"])
        scaler.load_state_dict(ck["scaler"])
        if len(ck["rng"]) == dist.world:
            set_rng_state(ck["rng"][dist.rank])
        else:
            dist.print0(f"note: RNG states saved for {len(ck['rng'])} ranks, this run has {dist.world}: not restored")
        if dist.is_main:  # log lines after the saved step are logged again
            trim_metrics(metrics_path, start)
        dist.print0(f"resumed from {ckpt_path} at step {start}")
        del ck
    n_enc, n_all = sum(p.numel() for p in raw_model.encoder.parameters()), sum(p.numel() for p in raw_model.parameters())
    dist.print0(f"parameters: {n_all / 1e6:.2f}M ({n_enc / 1e6:.2f}M CLIP visual encoder)")
    net = compile_model(raw_model, device) if cfg["compile"] else raw_model
    if dist.ddp:
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    ctx = autocast_ctx(device, cfg["dtype"])

    sums, n_sum, t_data = {}, 0, 0.0
    t_log = t_run = time.time()
    for step in range(start, iters):
        set_lr(optimizer, step, iters, cfg["min_lr"])
        t0 = time.time()
        batch = to_device(next(batches), device)
        t_data += time.time() - t0
        losses = compute_losses(net, batch, ctx, cfg)
        vals = reduce_losses(losses, dist)
        if not all(math.isfinite(v) for v in vals.values()):  # before any update: the weights stay good
            shown = ", ".join(f"{k}={v:.4g}" for k, v in vals.items())
            raise UserError(f"non-finite loss at step {step}: {shown}; no weight is updated at this step, the last "
                            f"good checkpoint is {ckpt_path} (try a lower --lr, --dtype float32 or another --seed)")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(losses["loss"]).backward()
        scaler.step(optimizer)
        scaler.update()
        done = step + 1
        for k, v in vals.items():
            sums[k] = sums.get(k, 0.0) + v
        n_sum += 1

        if done % cfg["log_every"] == 0 or done == iters or done == start + 1:
            dt = time.time() - t_log
            rec = {"step": done, **{k: v / n_sum for k, v in sums.items()},
                   "lr": optimizer.param_groups[1]["lr"], "lr_encoder": optimizer.param_groups[0]["lr"],
                   "it_s": n_sum / dt, "data_frac": t_data / dt, "time": time.time() - t_run}
            terms = " ".join(f"{k.removeprefix('loss_')} {v / n_sum:.4f}" for k, v in sums.items()
                             if k != "loss" and not k[-1].isdigit())  # per-layer terms: metrics.jsonl only
            dist.print0(f"step {done:>6}/{iters} | loss {rec['loss']:.4f} ({terms}) | lr {rec['lr']:.2e} "
                        f"enc {rec['lr_encoder']:.2e} | {rec['it_s']:.2f} it/s | data {100 * rec['data_frac']:.0f}% "
                        f"| ETA {fmt_time((iters - done) / rec['it_s'])}")
            if dist.is_main:
                log_jsonl(metrics_path, rec)
            sums, n_sum, t_data, t_log = {}, 0, 0.0, time.time()
        if done % cfg["save_every"] == 0 or done == iters:
            t_save = time.time()
            save_checkpoint(ckpt_path, raw_model, optimizer, scaler, done, cfg, dist)
            t_log += time.time() - t_save  # saving is not training speed
    dist.print0(f"done: {iters} iterations in {fmt_time(time.time() - t_run)}; checkpoint {ckpt_path}\n"
                f"evaluate it with: python evaluate.py --bench <benchmark> --ckpt {ckpt_path}")
    return raw_model


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    dist = common.Dist(args.device)
    if dist.device.type == "cpu":
        common.set_cpu_threads()
    try:
        return train(args, dist)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM through common.run_main
        dist.print0("interrupted: the last checkpoint is on disk; rerun the same command to continue exactly "
                    "where it was saved")
        raise SystemExit(130)
    finally:
        dist.close()


if __name__ == "__main__":
    common.run_main(main)
