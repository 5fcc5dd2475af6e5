"""
Train the ZUTIS segmenter on copy-paste scenes made from the retrieval archive and its pseudo-masks
(paper sections 3.2-3.3 and 4.1; zutis_facts.md sections 4-7). nanoGPT-style: one flat script, one loop.

Reads:  --archive (build_archive.py), --masks_dir (pseudo_label.py), the CLIP weights named by --arch.
Writes: <out_dir>/ckpt.pt      {model, optimizer, scaler, step, config, rng}, atomically, every
                               --save_every steps and at the end (model.load_checkpoint reads it)
        <out_dir>/config.json  every flag, the categories, the model hyper-parameters, git sha, world size
        <out_dir>/metrics.jsonl one JSON object per log line (and per evaluation with --eval_bench)
        (default out_dir: out/train_<arch tag>, e.g. out/train_ViT-B-16)

Commands (defaults = the official recipe: ViT-B/16, crop 384, batch 8, 20k iterations, fp32):
  1 GPU:     python train.py
  N GPUs:    torchrun --standalone --nproc_per_node 8 train.py        (--batch_size is the global batch)
  2 nodes:   torchrun --nnodes 2 --node_rank 0 --master_addr HOST --master_port 29500 --nproc_per_node 8 train.py
  CPU tiny:  python train.py --device cpu --arch toy_out/tiny_clip.pt --archive toy_out/archive/archive.json \
                 --masks_dir toy_out/masks --crop 64 --iters 200 --n_queries 20 --n_layers 2 --dim_ffn 256 \
                 --num_workers 0 --logit_scale 10 --lr 1e-3 --lr_encoder 3e-4     (after python toy.py;
                 on a busy CPU prefix OMP_NUM_THREADS=1: tiny ops stall on OpenMP barriers, measured 30x)
  faster:    python train.py --dtype bfloat16 --compile
  resume:    the same command plus --resume (exact: same weights as an uninterrupted run)
  fine-tune: python train.py --init official:<name>   (or --init path/to/ckpt.pt)
  speed:     python train.py --benchmark [--arch random:ViT-B/16 --archive fake]   (it/s, peak memory and
                 time shares, float32 vs bfloat16; the bracket needs no weights and no data;
                 the code is in train_benchmark.py)
  tests:     python -m pytest -q test_train.py

References: official trainer.py (loop, evaluation every 1000 iterations), utils/utils.py
(get_optimiser: AdamW, two groups, weight decay 0.05 everywhere), utils/scheduler.py (PolyLR 0.9, floor 1e-6).
"""
import argparse
import itertools
import json
import math
import os
import random
import time
from contextlib import nullcontext

import numpy as np
import torch

import common
import dataset
from common import UserError

# ----------------------------------------------------------------------------- CLI

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # data
    p.add_argument("--arch", default="ViT-B/16", help="CLIP name (clip_model.available_models()) or a path to CLIP weights")
    p.add_argument("--archive", default="out/archive.json", help="archive JSON written by build_archive.py")
    p.add_argument("--masks_dir", default="out/masks", help="pseudo-masks written by pseudo_label.py")
    p.add_argument("--index_dirs", nargs="+", default=None, help="where the archive's images live now, if they moved")
    p.add_argument("--categories", default=None, help="builtin name, text file or comma list; default: the archive's")
    p.add_argument("--crop", type=int, default=384, help="training crop size in pixels (official 384)")
    p.add_argument("--max_n", type=int, default=10, help="max images pasted into one scene (official 10)")
    p.add_argument("--scale_min", type=float, default=0.1, help="each image is scaled by U(scale_min, 1) (official 0.1)")
    p.add_argument("--jitter", type=float, nargs=4, default=list(dataset.JITTER), metavar=("B", "C", "S", "H"),
                   help="ColorJitter brightness, contrast, saturation, hue strengths (official 0.8 0.8 0.8 0.2)")
    p.add_argument("--p_gray", type=float, default=dataset.P_GRAY, help="probability of grayscale (official 0.2)")
    p.add_argument("--norm", default="imagenet", choices=["imagenet", "clip"], help="input normalisation (official: imagenet)")
    # model
    p.add_argument("--n_queries", type=int, default=100, help="number of learned instance queries")
    p.add_argument("--n_layers", type=int, default=6, help="transformer decoder layers")
    p.add_argument("--n_heads", type=int, default=8, help="decoder attention heads")
    p.add_argument("--dim_ffn", type=int, default=2048, help="decoder feed-forward width")
    p.add_argument("--mlp_hidden", type=int, default=256, help="hidden width of the ffn1/ffn2 MLPs")
    p.add_argument("--logit_scale", type=float, default=1.0, help="semantic logits = scale x cosine (official 1 = raw cosines)")
    p.add_argument("--text_templates", default="none", choices=["none", "85"], help="bare names (official) or the paper's 85 templates")
    p.add_argument("--pos_interp", default="bicubic", choices=["bicubic", "official"], help="position-embedding interpolation (official = DINO's scale-factor form)")
    p.add_argument("--no_stop_grad", action="store_true", help="ablation: let the mask loss reach the encoder")
    # loss
    p.add_argument("--loss_norm", default="official", choices=["official", "num_masks"], help="mask loss: sum over instances / B (official) or / number of masks (Mask2Former)")
    p.add_argument("--lambda_mask", type=float, default=1.0, help="weight of the mask loss (CE weight is 1)")
    # optimisation
    p.add_argument("--iters", type=int, default=20000, help="training iterations (official 20k COCO/CoCA, 80k ImageNet-S)")
    p.add_argument("--batch_size", type=int, default=8, help="GLOBAL batch size, split over torchrun ranks (official 8)")
    p.add_argument("--lr", type=float, default=5e-5, help="learning rate of decoder, queries, ffn1, ffn2")
    p.add_argument("--lr_encoder", type=float, default=5e-6, help="learning rate of the CLIP visual encoder incl. its proj")
    p.add_argument("--weight_decay", type=float, default=0.05, help="AdamW weight decay, on every parameter (official)")
    p.add_argument("--poly_power", type=float, default=0.9, help="poly schedule power")
    p.add_argument("--min_lr", type=float, default=1e-6, help="lr floor of both groups (official 1e-6)")
    # system
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="autocast dtype (losses stay fp32); official float32")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--tf32", action="store_true", help="allow TF32 matmuls in float32 on Ampere+ GPUs (faster, not the official numerics)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--num_workers", type=int, default=8, help="DataLoader workers per rank (0 = load in the main process)")
    p.add_argument("--seed", type=int, default=0, help="seed of model init and of the data stream")
    # I/O
    p.add_argument("--out_dir", default=None, help="output folder (default out/train_<arch tag>)")
    p.add_argument("--save_every", type=int, default=1000, help="save ckpt.pt every N iterations (and at the end)")
    p.add_argument("--log_every", type=int, default=50, help="print and log losses every N iterations")
    p.add_argument("--resume", action="store_true", help="continue from <out_dir>/ckpt.pt if it exists (exactly)")
    p.add_argument("--init", default=None, help="start from these weights: our ckpt.pt, an official file, or official:<name>")
    p.add_argument("--eval_bench", default=None, help="evaluate on this benchmark every --eval_every iterations and at the end (voc, coco2017, coco20k, coca, imagenet_s919, cub); off by default")
    p.add_argument("--eval_data_root", default=None, help="data root of --eval_bench")
    p.add_argument("--eval_every", type=int, default=1000, help="evaluation period in iterations (and at the end)")
    p.add_argument("--eval_max_images", type=int, default=None, help="evaluate on the first N images only (quick checks)")
    p.add_argument("--benchmark", action="store_true", help="measure speed (float32 vs bfloat16) instead of training")
    p.add_argument("--bench_iters", type=int, default=10, help="timed iterations per dtype in --benchmark (after 2 warm-up)")
    return p.parse_args(argv)


# the ZUTIS constructor arguments: saved in the checkpoint config, taken from it on --resume
MODEL_KEYS = ("arch", "categories", "n_queries", "n_layers", "n_heads", "dim_ffn", "mlp_hidden",
              "logit_scale", "text_templates", "stop_grad", "pos_interp")

# ----------------------------------------------------------------------------- schedule, optimiser


def poly_lr(base_lr, step, iters, power=0.9, min_lr=1e-6):
    """Official PolyLR, stepped every iteration: max(base * (1 - step/iters)^power, min_lr).
    The floor applies to every group, so the encoder (base 5e-6) ends at 1e-6 too."""
    return max(base_lr * (1 - step / iters) ** power, min_lr)


def make_optimizer(model, args):
    """AdamW, two groups: the CLIP visual encoder (incl. proj, pos-emb, ln_post) and the rest
    (ffn1, decoder, queries, ffn2). Weight decay on everything, biases and norms included (official)."""
    enc, rest = [], []
    for name, prm in model.named_parameters():
        if prm.requires_grad:
            (enc if name.startswith("encoder.") else rest).append(prm)
    if not enc:
        raise RuntimeError("model has no encoder.* parameters: the two-group optimiser needs them")
    groups = [{"params": enc, "lr": args.lr_encoder, "base_lr": args.lr_encoder, "name": "encoder"},
              {"params": rest, "lr": args.lr, "base_lr": args.lr, "name": "rest"}]
    fused = enc[0].is_cuda  # one kernel for the whole update on GPU (nanoGPT); same maths as the default
    return torch.optim.AdamW(groups, weight_decay=args.weight_decay, betas=(0.9, 0.999), eps=1e-8, fused=fused)


def set_lr(optimizer, step, args):
    for g in optimizer.param_groups:
        g["lr"] = poly_lr(g["base_lr"], step, args.iters, args.poly_power, args.min_lr)


# ----------------------------------------------------------------------------- data

class StepBatches(torch.utils.data.Sampler):
    """An infinite stream of index batches that is a pure function of (step, rank, position):
    item index = (step * world + rank) * b + i. The dataset derives each scene's randomness from
    (seed, index), so the stream is the same whatever the worker count, and resuming at step s
    replays exactly what an uninterrupted run would have seen."""

    def __init__(self, b, rank, world, start_step=0):
        self.b, self.rank, self.world, self.start = b, rank, world, start_step

    def __iter__(self):
        for step in itertools.count(self.start):
            first = (step * self.world + self.rank) * self.b
            yield list(range(first, first + self.b))


def make_loader(args, categories, dist, start_step, local_batch):
    n_items = (args.iters + 1) * args.batch_size  # every (step, rank, i) gets its own index
    data = dataset.ArchiveDataset(args.archive, args.masks_dir, categories=categories, crop=args.crop,
                                  scale_range=(args.scale_min, 1.0), max_n=args.max_n, norm=args.norm,
                                  seed=args.seed, length=max(n_items, 1), index_dirs=args.index_dirs,
                                  jitter=args.jitter, p_gray=args.p_gray)
    sampler = StepBatches(local_batch, dist.rank, dist.world, start_step)
    return torch.utils.data.DataLoader(
        data, batch_sampler=sampler, collate_fn=dataset.collate_fn, num_workers=args.num_workers,
        pin_memory=dist.device.type == "cuda")


def to_device(batch, device):
    nb = device.type == "cuda"  # pinned memory -> asynchronous copies
    return {k: [t.to(device, non_blocking=nb) for t in v] if isinstance(v, list) else v.to(device, non_blocking=nb)
            for k, v in batch.items()}


# ----------------------------------------------------------------------------- model, losses

def model_config(args, categories):
    """Everything model.ZUTIS needs, with the constructor's names (stored in the checkpoint)."""
    return {"arch": args.arch, "categories": list(categories), "n_queries": args.n_queries,
            "n_layers": args.n_layers, "n_heads": args.n_heads, "dim_ffn": args.dim_ffn,
            "mlp_hidden": args.mlp_hidden, "logit_scale": args.logit_scale,
            "text_templates": args.text_templates, "stop_grad": not args.no_stop_grad,
            "pos_interp": args.pos_interp}


def build_model(mcfg, init, device, print0):
    """ZUTIS from the flags; with --init the file's weights go into a model built with our flags, so a
    shape mismatch is a clear error, never a partial load. Updates mcfg["arch"] to the loaded one."""
    import model as M
    cfg = {k: v for k, v in mcfg.items() if k not in ("arch", "categories")}
    if not init:
        return M.ZUTIS(mcfg["arch"], mcfg["categories"], **cfg).to(device)
    net = M.load_checkpoint(init, categories=mcfg["categories"], device="cpu", **cfg)
    if net.arch != mcfg["arch"]:
        print0(f"note: --init {init} is a {net.arch} model; using that instead of --arch {mcfg['arch']}")
        mcfg["arch"] = net.arch
    print0(f"initialised all weights from {init}")
    return net.train().to(device)


def compute_losses(net, batch, ctx, args):
    """Forward under autocast, losses in fp32 outside it (the matcher and BCE want fp32)."""
    import criterion as CR
    with ctx:
        out = net(batch["image"])
    out = {k: v.float() if torch.is_tensor(v) else v for k, v in out.items()}
    with torch.autocast(batch["image"].device.type, enabled=False):
        losses = CR.criterion(out, batch, lambda_mask=args.lambda_mask, loss_norm=args.loss_norm)
    return losses


def reduce_losses(losses, dist):
    """Mean of every loss term over ranks as python floats. One tiny all-reduce per step; the
    matcher syncs with the CPU every step anyway, so checking finiteness each step is free."""
    names = sorted(losses)
    vec = torch.stack([losses[k].detach().float() for k in names])
    if dist.ddp:
        import torch.distributed as tdist
        tdist.all_reduce(vec)
        vec /= dist.world
    return dict(zip(names, vec.tolist()))


def check_finite(vals, step, ckpt_path):
    if not all(math.isfinite(v) for v in vals.values()):
        shown = ", ".join(f"{k}={v:.4g}" for k, v in vals.items())
        raise UserError(f"non-finite loss at step {step}: {shown}; nothing was updated at this step, the last "
                        f"good checkpoint is {ckpt_path} (try a lower --lr, --dtype float32 or another --seed)")


# ----------------------------------------------------------------------------- checkpoints, logs

def load_resume(path, args, dist):
    """Read <out_dir>/ckpt.pt; the model-defining config comes from it (as nanoGPT's resume)."""
    ck = torch.load(path, map_location="cpu", weights_only=False)
    for k in ("model", "optimizer", "step", "config"):
        if k not in ck:
            raise UserError(f"{path} is not a train.py checkpoint (no {k!r}); use --init to start from its weights")
    saved = ck["config"]
    for k in ("iters", "batch_size", "lr", "lr_encoder", "seed", "crop", "dtype"):
        if k in saved and saved[k] != getattr(args, k):
            dist.print0(f"note: --{k} {getattr(args, k)} differs from the checkpoint's {saved[k]}: "
                        "the resumed run will not match an uninterrupted one")
    return ck


def restore(ck, raw_model, optimizer, scaler, dist, metrics_path):
    """Weights, optimiser and scaler state, this rank's RNG state; drop log lines after the step."""
    raw_model.load_state_dict(ck["model"], strict=True)
    optimizer.load_state_dict(ck["optimizer"])
    scaler.load_state_dict(ck["scaler"])
    rngs = ck.get("rng") or []
    if len(rngs) == dist.world:
        common.set_rng_state(rngs[dist.rank])
    else:
        dist.print0(f"note: the checkpoint has RNG states for {len(rngs)} ranks, this run has {dist.world}: "
                    "RNG not restored (the data stream still is exact)")
    if dist.is_main:
        trim_metrics(metrics_path, ck["step"])


def trim_metrics(path, step):
    """Drop log lines written after the checkpoint we resume from (they will be re-logged)."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= step]
    with common.atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.writelines(lines)


def run_eval(raw_model, args, step, dist, out_dir):
    """evaluate.run_benchmark on every rank (it shards the images), then put the training categories
    back without re-embedding (the benchmark may embed its own class names into the model)."""
    import evaluate
    cats, text_emb, was_training = list(raw_model.categories), raw_model.text_emb, raw_model.training
    try:
        return evaluate.run_benchmark(raw_model, args.eval_bench, args.eval_data_root,
                                      out_dir=os.path.join(out_dir, f"eval_{args.eval_bench}_{step:06d}"),
                                      max_images=args.eval_max_images, dist=dist, norm=args.norm)
    finally:
        raw_model.text_emb, raw_model.categories = text_emb, cats
        raw_model.train(was_training)


def save_checkpoint(path, raw_model, optimizer, scaler, step, config, dist):
    """One file, written atomically by rank 0 from the unwrapped, uncompiled model (no prefixes).
    Every rank's RNG state goes in (a list indexed by rank) so --resume restores each rank exactly."""
    rngs = dist.gather(common.rng_state())  # [state of rank 0, rank 1, ...]
    if dist.is_main:
        common.save_torch({"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                           "scaler": scaler.state_dict(), "step": step, "config": config, "rng": rngs}, path)


def check_masks(data, out_dir, is_main):
    """Count (and list) archive entries without a pseudo-mask: the dataset treats them as empty masks,
    as the official code does; all missing means pseudo_label.py has not run."""
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


def resolve_categories(args):
    import categories as C
    if args.categories:
        try:
            return C.get_categories(args.categories)
        except ValueError as e:
            raise UserError(str(e))
    return common.load_archive(args.archive, args.index_dirs)["categories"]


def check_args(args):
    for k in ("iters", "batch_size", "crop", "save_every", "log_every", "eval_every", "bench_iters", "max_n"):
        if getattr(args, k) <= 0:
            raise UserError(f"--{k} must be positive, got {getattr(args, k)}")
    if args.num_workers < 0 or not 0 < args.scale_min <= 1:
        raise UserError(f"need --num_workers >= 0 and 0 < --scale_min <= 1, got {args.num_workers}, {args.scale_min}")
    if args.eval_bench:  # fail now, not after the first 1000 iterations
        import benchmarks
        if args.eval_bench not in benchmarks.BENCHES:
            raise UserError(f"unknown --eval_bench {args.eval_bench!r}: use one of {', '.join(benchmarks.BENCHES)}")
        if not args.eval_data_root:
            raise UserError("--eval_bench needs --eval_data_root (the benchmark's data folder)")
        common.require_dir(args.eval_data_root, f"--eval_data_root of {args.eval_bench}")


def seed_all(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocast_ctx(device, dtype):
    if dtype == "float32":
        return nullcontext()
    if dtype == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("this GPU has no bfloat16: use --dtype float16 (loss-scaled) or float32")
    return torch.autocast(device.type, dtype={"bfloat16": torch.bfloat16, "float16": torch.float16}[dtype])


# ----------------------------------------------------------------------------- training


def setup_run(args, dist):
    """Resolve out_dir, the checkpoint to resume and the model config."""
    import clip_model
    out_dir = args.out_dir or os.path.join("out", f"train_{clip_model.arch_tag(args.arch)}")
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    ck = None
    if os.path.exists(ckpt_path):
        if not args.resume:
            raise UserError(f"{ckpt_path} exists: pass --resume to continue that run, or choose another --out_dir")
        ck = load_resume(ckpt_path, args, dist)
    elif args.resume:
        dist.print0(f"--resume: no {ckpt_path} yet, starting from scratch")
    if ck is not None:
        lacking = [k for k in MODEL_KEYS if k not in ck["config"]]
        if lacking:
            raise UserError(f"{ckpt_path} config lacks {lacking}: not a train.py checkpoint of this version")
        mcfg = {k: ck["config"][k] for k in MODEL_KEYS}  # the architecture is the checkpoint's
        if args.init:
            dist.print0(f"--resume: ignoring --init {args.init} (the checkpoint already holds the weights)")
    else:
        mcfg = model_config(args, resolve_categories(args))
    return out_dir, ckpt_path, ck, mcfg


def write_config(args, mcfg, out_dir, dist):
    """Every flag, the model hyper-parameters and categories, the run's world and git state."""
    config = {**vars(args), **mcfg, "out_dir": out_dir, "world_size": dist.world,
              "local_batch_size": args.batch_size // dist.world, "device": str(dist.device),
              "torch": torch.__version__, **common.git_info()}
    config.pop("no_stop_grad")  # stored as stop_grad (the ZUTIS argument)
    if dist.is_main:
        print("config:")
        common.print_config(config)
        os.makedirs(out_dir, exist_ok=True)
        common.save_json(config, os.path.join(out_dir, "config.json"))
    return config


def train(args, dist):
    if args.batch_size % dist.world:
        raise UserError(f"--batch_size {args.batch_size} (global) must be divisible by the {dist.world} ranks")
    out_dir, ckpt_path, ck, mcfg = setup_run(args, dist)
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    start = ck["step"] if ck is not None else 0
    if start >= args.iters:
        dist.print0(f"{ckpt_path} is already at step {start} >= --iters {args.iters}: nothing to do")
        return
    device = dist.device
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    # model: the same init on every rank (DDP also broadcasts rank 0's weights)
    seed_all(args.seed)
    raw_model = build_model(mcfg, None if ck is not None else args.init, device, dist.print0)
    raw_model.train()
    config = write_config(args, mcfg, out_dir, dist)
    optimizer = make_optimizer(raw_model, args)
    scaler = torch.amp.GradScaler(device.type, enabled=args.dtype == "float16")
    seed_all(args.seed + dist.rank)  # nanoGPT's seed offset: ranks differ in anything random below
    if ck is not None:
        restore(ck, raw_model, optimizer, scaler, dist, metrics_path)
        dist.print0(f"resumed from {ckpt_path} at step {start}")
        del ck
    n_enc = sum(p.numel() for n, p in raw_model.named_parameters() if n.startswith("encoder."))
    n_all = sum(p.numel() for p in raw_model.parameters())
    dist.print0(f"parameters: {n_all / 1e6:.2f}M ({n_enc / 1e6:.2f}M CLIP visual encoder)")
    model = torch.compile(raw_model) if args.compile else raw_model
    if dist.ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    ctx = autocast_ctx(device, args.dtype)
    loader = make_loader(args, mcfg["categories"], dist, start, args.batch_size // dist.world)
    check_masks(loader.dataset, out_dir, dist.is_main)
    batches = iter(loader)

    # the loop, top to bottom
    sums, n_sum, t_data = {}, 0, 0.0
    t_log = t_run = time.time()
    for step in range(start, args.iters):
        set_lr(optimizer, step, args)
        t0 = time.time()
        batch = to_device(next(batches), device)
        t_data += time.time() - t0
        losses = compute_losses(model, batch, ctx, args)
        vals = reduce_losses(losses, dist)
        check_finite(vals, step, ckpt_path)  # before any update: the weights stay the last good ones
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(losses["loss"]).backward()
        scaler.step(optimizer)
        scaler.update()
        done = step + 1
        for k, v in vals.items():
            sums[k] = sums.get(k, 0.0) + v
        n_sum += 1

        if done % args.log_every == 0 or done == args.iters or done == start + 1:
            dt = time.time() - t_log
            rec = {"step": done, **{k: v / n_sum for k, v in sums.items()},
                   "lr": optimizer.param_groups[1]["lr"], "lr_encoder": optimizer.param_groups[0]["lr"],
                   "it_s": n_sum / dt, "data_frac": t_data / dt, "time": time.time() - t_run}
            terms = " ".join(f"{k.removeprefix('loss_')} {v / n_sum:.4f}" for k, v in sums.items()
                             if k != "loss" and not k[-1].isdigit())  # per-layer terms: metrics.jsonl only
            dist.print0(f"step {done:>6}/{args.iters} | loss {rec['loss']:.4f} ({terms}) | lr {rec['lr']:.2e} "
                        f"enc {rec['lr_encoder']:.2e} | {rec['it_s']:.2f} it/s | data {100 * rec['data_frac']:.0f}% "
                        f"| ETA {common.fmt_time((args.iters - done) / rec['it_s'])}")
            if dist.is_main:
                common.log_jsonl(metrics_path, rec)
            sums, n_sum, t_data, t_log = {}, 0, 0.0, time.time()
        t_save = time.time()
        if done % args.save_every == 0 or done == args.iters:
            save_checkpoint(ckpt_path, raw_model, optimizer, scaler, done, config, dist)
            t_log += time.time() - t_save  # saving is not training speed
        if args.eval_bench and (done % args.eval_every == 0 or done == args.iters):
            res = run_eval(raw_model, args, done, dist, out_dir)
            dist.print0(f"eval {args.eval_bench} at step {done}: " + json.dumps(res)[:500])
            if dist.is_main:
                common.log_jsonl(metrics_path, {"step": done, "eval": args.eval_bench, **res})
            t_log = time.time()  # evaluation time is not training speed
    dist.print0(f"done: {args.iters} iterations in {common.fmt_time(time.time() - t_run)}; checkpoint {ckpt_path}")
    return raw_model


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    if args.benchmark:
        import train_benchmark  # only here: normal training imports none of the timing code
        return train_benchmark.benchmark(args)
    dist = common.Dist(args.device)
    try:
        return train(args, dist)
    except KeyboardInterrupt:
        dist.print0("interrupted: the last checkpoint is on disk; add --resume to the same command to continue "
                    "exactly where it was saved")
        raise SystemExit(130)
    finally:
        dist.close()


if __name__ == "__main__":
    common.run_main(main)
