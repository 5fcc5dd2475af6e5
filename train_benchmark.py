"""
Training-step speed of train.py: it/s, peak memory and the share of each step's wall time spent in data
loading, the CLIP encoder, the decoder, the Hungarian matcher, the loss and backward+optimiser step, for
float32 vs bfloat16 (and float16 on CUDA), with the real loader, model, matcher and loss.

Driven by `python train.py --benchmark` (it takes all of train.py's flags, plus --bench_iters); this file
is not a script. `--arch random:ViT-B/16` times a randomly initialised CLIP of that shape and
`--archive fake` generated images, so no weights and no data are needed:
  1 GPU:     python train.py --benchmark --arch random:ViT-B/16 --archive fake [--compile] [--tf32]
  CPU tiny:  OMP_NUM_THREADS=1 python train.py --benchmark --device cpu --arch random:ViT-B/16 --archive fake \
                 --batch_size 1 --crop 64 --num_workers 0 --bench_iters 1
"""
import os
import tempfile
import threading
import time

import torch

import common


class PhaseTimer:
    """Seconds per phase. On CUDA every boundary synchronises, so the shares are honest (and the
    benchmark runs a little slower than training does)."""

    def __init__(self, device):
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.t, self.t0 = {}, {}

    def start(self, k):
        self.sync()
        self.t0[k] = time.perf_counter()

    def stop(self, k):
        self.sync()
        self.t[k] = self.t.get(k, 0.0) + time.perf_counter() - self.t0.pop(k)


def instrument(raw_model, timer):
    """Hooks time the whole forward and the CLIP encoder inside it (conv1 .. ln_post); wrapping
    criterion.py's HungarianMatcher.assign times the matching (device->host copy + scipy; the matched
    costs are the loss itself). Returns a function that removes it all."""
    import criterion as CR
    enc = raw_model.encoder
    hooks = [raw_model.register_forward_pre_hook(lambda m, a: timer.start("forward")),
             raw_model.register_forward_hook(lambda m, a, o: timer.stop("forward")),
             enc.conv1.register_forward_pre_hook(lambda m, a: timer.start("encoder")),
             enc.ln_post.register_forward_hook(lambda m, a, o: timer.stop("encoder"))]
    orig = CR.HungarianMatcher.assign

    def timed(cost):
        timer.start("matcher")
        out = orig(cost)
        timer.stop("matcher")
        return out
    CR.HungarianMatcher.assign = staticmethod(timed)

    def undo():
        CR.HungarianMatcher.assign = staticmethod(orig)
        for h in hooks:
            h.remove()
    return undo


class PeakMemory:
    """Peak memory of a phase: the CUDA allocator's peak, or on CPU the process RSS polled every 5 ms."""

    def __init__(self, device):
        self.cuda, self.peak, self.running = device.type == "cuda", 0, True

    def _poll(self):
        while self.running:
            with open("/proc/self/statm") as f:
                self.peak = max(self.peak, int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))
            time.sleep(0.005)

    def __enter__(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            self.thread = threading.Thread(target=self._poll, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc):
        self.running = False
        if self.cuda:
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.thread.join()


def bench_dtype(model, raw_model, optimizer, batches, args, dtype, device):
    """2 warm-up + --bench_iters timed training steps in `dtype`; shares of the wall time per phase."""
    import train as T  # not at the top: train.py imports this file (lazily, for --benchmark)
    timer, ctx = PhaseTimer(device), T.autocast_ctx(device, dtype)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == "float16")
    undo = instrument(raw_model, timer) if not args.compile else (lambda: None)  # hooks would break graphs
    try:
        with PeakMemory(device) as mem:
            for i in range(2 + args.bench_iters):
                if i == 2:  # warm-up done: allocator, compile, worker start-up
                    timer.t.clear()
                    t0 = time.perf_counter()
                timer.start("data")
                batch = T.to_device(next(batches), device)
                timer.stop("data")
                timer.start("forward+loss")
                losses = T.compute_losses(model, batch, ctx, args)
                timer.stop("forward+loss")
                timer.start("backward+step")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(losses["loss"]).backward()
                scaler.step(optimizer)
                scaler.update()
                timer.stop("backward+step")
            total = time.perf_counter() - t0
    finally:
        undo()
    t = {k: timer.t.get(k, 0.0) for k in ("data", "forward", "encoder", "matcher", "forward+loss", "backward+step")}
    parts = {"data": t["data"], "encoder": t["encoder"], "decoder": t["forward"] - t["encoder"],
             "matcher": t["matcher"], "loss": t["forward+loss"] - t["forward"] - t["matcher"],
             "backward+step": t["backward+step"]}
    return {"dtype": dtype, "it_s": args.bench_iters / total, "peak_mem_mib": mem.peak / 2 ** 20,
            "share": {k: v / total for k, v in parts.items()}}


def benchmark(args):
    """Train-step speed for float32 vs bfloat16 (and float16 on CUDA) on the current device, with the
    real loader, model, matcher and loss. `--arch random:ViT-B/16` times a randomly initialised CLIP
    of that shape and `--archive fake` generated 500x375 JPEGs (speed only: no weights or data needed)."""
    # the random ViT-B/16 alone is ~570 MB: everything made for the run is deleted when it ends, even on error
    with tempfile.TemporaryDirectory(prefix="zutis_bench_") as tmp:
        return _benchmark(args, tmp)


def _benchmark(args, tmp):
    import clip_model
    import train as T  # not at the top: train.py imports this file (lazily, for --benchmark)
    dist = common.Dist(args.device)
    device = dist.device
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if args.arch.startswith("random:"):
        name = args.arch.split(":", 1)[1]
        print(f"WARNING: --arch {args.arch}: a RANDOMLY INITIALISED CLIP {name}, for timing only")
        args.arch = os.path.join(tmp, name.replace("/", "-") + ".pt")
        torch.save(clip_model.random_model(name).state_dict(), args.arch)
    if args.archive == "fake":
        import dataset
        args.archive, args.masks_dir = dataset.make_fake_archive(os.path.join(tmp, "archive"))
    categories = T.resolve_categories(args)
    T.seed_all(args.seed)
    raw_model = T.build_model(T.model_config(args, categories), args.init, device, print).train()
    optimizer = T.make_optimizer(raw_model, args)
    model = torch.compile(raw_model) if args.compile else raw_model
    batches = iter(T.make_loader(args, categories, dist, 0, args.batch_size))
    print(f"benchmark: {device} ({torch.get_num_threads()} threads), arch {args.arch}, crop {args.crop}, "
          f"batch {args.batch_size}, {len(categories)} classes, decoder {args.n_layers} layers x {args.n_queries} "
          f"queries, workers {args.num_workers}, compile {args.compile}; {args.bench_iters} timed steps after 2 warm-up")
    dtypes = ["float32", "bfloat16"] + (["float16"] if device.type == "cuda" else [])
    rows = [bench_dtype(model, raw_model, optimizer, batches, args, dt, device) for dt in dtypes]
    for r in rows:
        shares = "  ".join(f"{k} {100 * v:4.1f}%" for k, v in r["share"].items())
        print(f"{r['dtype']:>9}: {r['it_s']:7.3f} it/s  peak {r['peak_mem_mib']:7.0f} MiB  | {shares}")
    print(f"bfloat16 / float32 speed: {rows[1]['it_s'] / rows[0]['it_s']:.2f}x; peak = "
          + ("torch CUDA allocator" if device.type == "cuda" else "whole-process RSS"))
    return rows
