"""Tests of train.py on CPU with a tiny random CLIP and a generated archive + pseudo-masks:
python -m pytest -q tests/test_train.py

Covered: the poly schedule, the deterministic data stream, the per-benchmark recipe (iterations, ignore
id), exact resume (weights, logs and saved RNG states), the script as a subprocess writing a checkpoint
that model.load_checkpoint reloads, a SIGKILLed run resumed without leftovers, bad input as one-line
errors, a non-finite loss stopping the run, strict --init, and a 2-process torchrun (gloo) run.
"""
import contextlib
import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import categories
import common
import model
import train
from conftest import write_archive

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module", autouse=True)
def one_thread_with_grad():
    """Tiny ops on a shared machine: one intra-op thread; restored afterwards."""
    n, grad = torch.get_num_threads(), torch.is_grad_enabled()
    torch.set_num_threads(1)
    torch.set_grad_enabled(True)
    yield
    torch.set_num_threads(n)
    torch.set_grad_enabled(grad)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    spec = {c: [(f"i{j}", "ok") for j in range(4)] for c in ("thing0", "thing1")}
    return write_archive(str(tmp_path_factory.mktemp("arc")), spec, size=(48, 40))


def tiny_argv(clip_path, data, out_dir, iters, *extra):
    archive, masks = data
    return ["--arch", clip_path, "--archive", archive, "--masks_dir", masks, "--out_dir", str(out_dir),
            "--device", "cpu", "--iters", str(iters), "--batch_size", "2", "--crop", "32", "--aug", "max_n=3",
            "--model", "n_queries=5", "n_layers=2", "n_heads=2", "dim_ffn=32", "mlp_hidden=16",
            "--num_workers", "0", "--log_every", "1", "--save_every", "2", "--lr", "1e-3", "--lr_encoder", "1e-3",
            *extra]


def run_script(argv, **kw):
    return subprocess.run([sys.executable, os.path.join(HERE, "train.py"), *argv], capture_output=True, text=True,
                          cwd=HERE, env=ENV, timeout=300, **kw)


def test_poly_schedule():
    assert train.poly_lr(5e-5, 0, 100) == 5e-5
    assert train.poly_lr(5e-5, 50, 100) == pytest.approx(5e-5 * 0.5 ** 0.9)
    assert train.poly_lr(5e-5, 99, 100) == 1e-6  # 5e-5 * 0.01^0.9 = 7.9e-7 is below the floor
    assert train.poly_lr(5e-6, 90, 100) == 1e-6  # the floor applies to the encoder group too
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [a], "base_lr": 5e-6}, {"params": [b], "base_lr": 5e-5}])
    train.set_lr(opt, 50, 100, 1e-6)  # each group from its own base lr
    assert [g["lr"] for g in opt.param_groups] == [train.poly_lr(5e-6, 50, 100), train.poly_lr(5e-5, 50, 100)]


def test_data_stream_is_a_function_of_step_and_rank():
    def take(sampler, n):
        it = iter(sampler)
        return [next(it) for _ in range(n)]
    full = take(train.StepBatches(3, 0, 1), 5)
    assert take(train.StepBatches(3, 0, 1, start_step=2), 3) == full[2:]  # resume replays the stream
    ranks = [take(train.StepBatches(2, r, 3), 4) for r in range(3)]
    flat = [i for rk in ranks for b in rk for i in b]
    assert len(flat) == len(set(flat)) == 24  # every (step, rank, position) gets its own scene


@pytest.mark.parametrize("cats, iters, ignore", [("imagenet_s919", 80000, 1000), ("voc", 20000, 255)])
def test_recipe_defaults(data, cats, iters, ignore):
    cfg = train.make_config(train.parse_args(["--archive", data[0], "--categories", cats]))
    assert (cfg["iters"], cfg["ignore_index"]) == (iters, ignore)
    assert cfg["max_n"] == 10 and cfg["stop_grad"] is True and cfg["n_queries"] == 100
    with pytest.raises(common.UserError, match="is a label id"):
        train.make_config(train.parse_args(["--archive", data[0], "--categories", cats, "--ignore_index", "5"]))


def test_resume_is_exact(tiny_clip_path, data, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    train.main(tiny_argv(tiny_clip_path, data, straight, 4))

    # the same run, interrupted after the step-2 checkpoint (while fetching step 3's batch), then resumed
    resumed = tmp_path / "resumed"
    calls = {"n": 0}
    real = train.to_device

    def dying(batch, device):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(batch, device)
    monkeypatch.setattr(train, "to_device", dying)
    with pytest.raises(SystemExit, match="130"):  # Ctrl-C: exit 130 with a hint to rerun the command
        train.main(tiny_argv(tiny_clip_path, data, resumed, 4))
    monkeypatch.setattr(train, "to_device", real)
    assert common.torch_load(str(resumed / "ckpt.pt"))["step"] == 2
    # a changed command never overwrites or silently continues the run: it is refused, naming each change
    changed = tiny_argv(tiny_clip_path, data, resumed, 5, "--lr", "2e-3", "--no_stop_grad")
    changed[changed.index("max_n=3")] = "max_n=2"
    with pytest.raises(common.UserError, match=r"settings: --no_stop_grad on \(checkpoint: off\); --iters 5 \(checkpoint: "
                                               r"4\); --lr 0.002 \(checkpoint: 0.001\); --aug max_n=2 \(checkpoint: 3\)\."):
        train.main(changed)
    with pytest.raises(common.UserError, match=r"--categories: 3 names \(checkpoint: 3\), id 1 'thing1' "
                                               r"\(checkpoint: 'thing0'\)"):
        train.main(tiny_argv(tiny_clip_path, data, resumed, 4, "--categories", "thing1,thing0"))
    assert common.torch_load(str(resumed / "ckpt.pt"))["step"] == 2
    train.main(tiny_argv(tiny_clip_path, data, resumed, 4, "--num_workers", "1"))  # the same command resumes

    a, b = common.torch_load(str(straight / "ckpt.pt")), common.torch_load(str(resumed / "ckpt.pt"))
    assert a["step"] == b["step"] == 4 and a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert not torch.equal(a["model"]["encoder.proj"], torch.load(tiny_clip_path)["visual.proj"])  # it trained
    ra, rb = a["rng"][0], b["rng"][0]  # the saved RNG states too: torch, numpy and python
    assert ra.keys() == rb.keys() and all(torch.equal(ra[k], rb[k]) if torch.is_tensor(ra[k]) else ra[k] == rb[k]
                                          for k in ra)
    ma = [json.loads(ln) for ln in open(straight / "metrics.jsonl")]
    mb = [json.loads(ln) for ln in open(resumed / "metrics.jsonl")]
    assert [r["step"] for r in mb] == [r["step"] for r in ma] == [1, 2, 3, 4]
    assert [r["loss"] for r in mb] == [r["loss"] for r in ma]
    assert train.main(tiny_argv(tiny_clip_path, data, resumed, 4)) is None  # nothing left to do


def test_bfloat16_loss_curve_follows_float32_and_float16_is_cuda_only(tiny_clip_path, data, tmp_path, monkeypatch):
    """Same weights and data: the bf16 autocast losses follow the fp32 ones (loosely at this size; bench.py
    train --tol measures it at real ones). float16 on a CPU and --compile without a compiler are one line."""
    curves = []
    for dtype in ("float32", "bfloat16"):
        train.main(tiny_argv(tiny_clip_path, data, tmp_path / dtype, 3, "--dtype", dtype))
        curves.append([json.loads(ln)["loss"] for ln in open(tmp_path / dtype / "metrics.jsonl")])
    assert len(curves[0]) == 3 and curves[0] != curves[1]  # bf16 really ran
    assert all(abs(a - b) <= 0.1 * abs(a) for a, b in zip(*curves)), curves
    with pytest.raises(common.UserError, match="float16 runs on CUDA only"):
        train.main(tiny_argv(tiny_clip_path, data, tmp_path / "f16", 1, "--dtype", "float16"))
    monkeypatch.setattr(train.shutil, "which", lambda name: None)
    with pytest.raises(common.UserError, match="needs the C.. compiler inductor uses"):
        train.compile_model(torch.nn.Linear(2, 2), torch.device("cpu"))


def test_script_writes_a_checkpoint_model_reloads(tiny_clip_path, data, tmp_path):
    out = tmp_path / "run"
    r = run_script(tiny_argv(tiny_clip_path, data, out, 2, "--dtype", "bfloat16"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "step      2/2 | loss" in r.stdout and "it/s" in r.stdout and "ETA" in r.stdout
    ck = common.torch_load(str(out / "ckpt.pt"))  # weights_only: tensors and plain types only
    assert set(ck) == {"model", "optimizer", "scaler", "step", "config", "text_emb", "rng"}
    cfg = ck["config"]
    assert ck["step"] == 2 and cfg["categories"] == ["background", "thing0", "thing1"] and cfg["ignore_index"] == 255
    assert cfg["arch"] == tiny_clip_path and cfg["arch_path"] == os.path.abspath(tiny_clip_path)
    net = model.load_checkpoint(str(out / "ckpt.pt"))
    sd = net.state_dict()
    assert sd.keys() == ck["model"].keys() and all(torch.equal(sd[k], ck["model"][k]) for k in sd)
    assert net.config.n_queries == 5 and net.config.stop_grad is True
    enc, rest = ck["optimizer"]["param_groups"]  # the CLIP visual tower (proj included) and the rest
    assert (enc["name"], rest["name"]) == ("encoder", "rest") and enc["weight_decay"] == rest["weight_decay"] == 0.05
    n_enc = sum(k.startswith("encoder.") for k in ck["model"])
    assert len(enc["params"]) == n_enc and len(rest["params"]) == len(ck["model"]) - n_enc
    assert json.load(open(out / "config.json"))["git_sha"] and len(open(out / "metrics.jsonl").readlines()) == 2


def alive_with(marker):
    """Pids of live processes whose command line contains `marker` (the run's out_dir)."""
    pids = []
    for d in glob.glob("/proc/[0-9]*"):
        try:
            with open(f"{d}/cmdline", "rb") as f:
                cmd = f.read().decode(errors="replace")
            with open(f"{d}/stat") as f:
                zombie = f.read().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            continue
        if marker in cmd and not zombie:
            pids.append(int(d.split("/")[-1]))
    return pids


@pytest.mark.slow
def test_sigkill_then_resume_leaves_nothing_behind(tiny_clip_path, data, tmp_path):
    """kill -9 during the run (a checkpoint is written every step, workers are running), plus the temp
    file of an interrupted checkpoint write; rerunning the same command finishes it, and nothing is left over."""
    out = tmp_path / "killed"
    argv = tiny_argv(tiny_clip_path, data, out, 6, "--save_every", "1", "--num_workers", "1")
    p = subprocess.Popen([sys.executable, os.path.join(HERE, "train.py"), *argv], cwd=HERE, env=ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "ckpt.pt").exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    (out / ".tmp_interrupted.pt").write_bytes(b"half a checkpoint")
    for _ in range(100):  # the DataLoader worker notices its parent is gone and exits
        if not alive_with(str(out)):
            break
        time.sleep(0.1)
    assert not alive_with(str(out))
    r = run_script(argv)
    assert r.returncode == 0, r.stderr[-2000:]
    assert common.torch_load(str(out / "ckpt.pt"))["step"] == 6
    assert not glob.glob(str(out / ".tmp_*")) and not alive_with(str(out))


@pytest.mark.slow
def test_sigterm_prints_the_resume_hint(tiny_clip_path, data, tmp_path):
    out = tmp_path / "term"
    p = subprocess.Popen([sys.executable, os.path.join(HERE, "train.py"),
                          *tiny_argv(tiny_clip_path, data, out, 1000, "--save_every", "1")],
                         cwd=HERE, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "ckpt.pt").exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 130 and "rerun the same command" in stdout + stderr and "Traceback" not in stderr


@pytest.mark.parametrize("extra, msg", [
    (["--model", "n_querys=5"], "--model: expected KEY=VALUE .*unknown key 'n_querys'"),
    (["--aug", "max_n=x"], r"--aug max_n='x' is not a whole number \(e.g. max_n=10, the default\)"),
    (["--aug", "jitter=0.8,0.8"], r"--aug jitter='0.8,0.8' is not 4 comma-separated numbers"),
    (["--aug", "max_n=0"], r"max_n=0 is not allowed: max_n must be a whole number >= 1: images per scene, the canvas"),
    (["--aug", "p_gray=1.5"], r"p_gray=1.5 is not allowed: p_gray must be a probability in \[0, 1\]"),
    (["--model", "n_queries=2.5"], "--model n_queries=.2.5. is not a whole number"),
    (["--lr", "1e-7"], r"--min_lr 1e-06 is above --lr 1e-07"),
    (["--categories", " "], "--categories is empty")])
def test_bad_flags_are_user_errors(tiny_clip_path, data, tmp_path, extra, msg):
    with pytest.raises(common.UserError, match=msg):
        train.main([*tiny_argv(tiny_clip_path, data, tmp_path / "bad", 2), *extra])
    assert not (tmp_path / "bad").exists()  # refused before any work


@pytest.mark.parametrize("flag, value", [("--lr", "-1"), ("--lr_encoder", "-1e-5"), ("--weight_decay", "-0.1"),
                                         ("--min_lr", "-1"), ("--iters", "0"), ("--batch_size", "0"), ("--crop", "0"),
                                         ("--save_every", "0"), ("--log_every", "0"), ("--num_workers", "-1"),
                                         ("--lambda_mask", "-1"), ("--seed", "-1"), ("--iters", "1.5"),
                                         ("--lr", "nan"), ("--out_dir", "README.md"), ("--categories", ""),
                                         ("--masks_dir", "no/such/dir"), ("--index_dirs", "no/such/dir"),
                                         ("--arch", "ViT-X/99")])
def test_every_flag_is_checked_before_work(tiny_clip_path, data, tmp_path, monkeypatch, capsys, flag, value):
    """A value out of range is one `error:` line naming the flag and exit 2 (as the script's entry point
    gives it), before any file is written."""
    monkeypatch.chdir(HERE)  # README.md: an existing file
    with pytest.raises(SystemExit) as e:
        common.run_main(lambda: train.main([*tiny_argv(tiny_clip_path, data, tmp_path / "bad", 2), flag, value]))
    errors = [ln for ln in capsys.readouterr().err.splitlines() if "error:" in ln]
    assert e.value.code == 2 and len(errors) == 1 and flag in errors[0], errors
    assert not (tmp_path / "bad").exists()


def test_negative_learning_rate_script(tiny_clip_path, data, tmp_path):
    """The script itself: `train.py --lr -1` stops at once with one error line and no traceback."""
    r = run_script([*tiny_argv(tiny_clip_path, data, tmp_path / "bad", 2), "--lr", "-1"])
    errors = [ln for ln in r.stderr.splitlines() if "error:" in ln]
    assert r.returncode == 2 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "--lr: -1 is out of range" in errors[0] and not (tmp_path / "bad").exists()


@pytest.mark.parametrize("what", ["init", "archive"])
def test_bad_files_are_one_line_errors(tiny_clip_path, data, tmp_path, what):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(os.urandom(4096))
    r = run_script([*tiny_argv(tiny_clip_path, data, tmp_path / "bad", 2), f"--{what}", str(junk)])
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr


def test_non_finite_loss_stops_the_run(tiny_clip_path, data, tmp_path, monkeypatch):
    real = model.criterion

    def poisoned(outputs, batch, **kw):  # as if the forward pass overflowed at the second step
        losses = real(outputs, batch, **kw)
        if poisoned.calls == 1:
            losses = {k: v * float("nan") for k, v in losses.items()}
        poisoned.calls += 1
        return losses
    poisoned.calls = 0
    monkeypatch.setattr(model, "criterion", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(common.UserError, match=r"non-finite loss at step 1: .*loss=nan"):
        train.main(tiny_argv(tiny_clip_path, data, out, 4, "--save_every", "1"))
    assert common.torch_load(str(out / "ckpt.pt"))["step"] == 1  # the bad step never touched the checkpoint


def test_init_loads_weights_strictly(tiny_clip_path, data, tmp_path):
    src = tmp_path / "src"
    train.main(tiny_argv(tiny_clip_path, data, src, 1))
    # zero learning rate and decay: after one step the weights are still exactly the --init file's
    frozen = ("--lr", "0", "--lr_encoder", "0", "--min_lr", "0", "--weight_decay", "0")
    net = train.main(tiny_argv(tiny_clip_path, data, tmp_path / "dst", 1, "--init", str(src / "ckpt.pt"), *frozen))
    a, b = common.torch_load(str(src / "ckpt.pt"))["model"], net.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(common.UserError):  # a different architecture is an error, not a partial load
        train.main(tiny_argv(tiny_clip_path, data, tmp_path / "bad", 1, "--init", str(src / "ckpt.pt"),
                             "--model", "n_queries=7"))


@pytest.mark.slow
def test_torchrun_two_processes(tiny_clip_path, data, tmp_path):
    """DDP on CPU (gloo): 2 ranks share the global batch, rank 0 writes one checkpoint with both RNGs."""
    out = tmp_path / "ddp"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        os.path.join(HERE, "train.py"), *tiny_argv(tiny_clip_path, data, out, 2)],
                       capture_output=True, text=True, cwd=HERE, env=ENV, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert r.stdout.count("step      2/2 | loss") == 1  # rank 0 logs, rank 1 does not
    ck = common.torch_load(str(out / "ckpt.pt"))
    assert ck["step"] == 2 and ck["config"]["world_size"] == 2
    assert len(ck["rng"]) == 2 and not torch.equal(ck["rng"][0]["torch"], ck["rng"][1]["torch"])


@pytest.mark.slow
def test_bench_train_and_loader_run_tiny(tmp_path):
    """bench.py's training timings at a CPU size: one row per dtype, loss curves that agree."""
    import bench
    rows = bench.COMMANDS["train"][0]("cpu", ["--arch", "ViT-B/32", "--crop", "64", "--batch_size", "1", "--iters", "1",
                                              "--warmup", "1", "--model", "n_layers=1", "--compile", "off",
                                              "--num_workers", "0"])
    assert [r["dtype"] for r in rows] == ["float32", "bfloat16"] and all(r["it_s"] > 0 and r["agrees"] for r in rows)
    assert bench.COMMANDS["loader"][0]("cpu", ["--crop", "32", "--scenes", "2"])[0]["scenes_s"] > 0


def test_imagenet_s_class_255_is_trained_and_padding_ignored(tiny_clip_path, tmp_path):
    """ImageNet-S919 has 920 classes, so label id 255 ("pug") is a real class and the ignore id is 1000.
    A training step (train.py's config, model and loss) on a scene holding pug gives its pixels a
    cross-entropy target (ignoring them changes the loss), and the padding none (labelling it changes it). (The dataset's padding with 1000: test_dataset.py.)"""
    names = categories.get_categories("imagenet_s919")
    arc, masks = write_archive(str(tmp_path), {names[255]: [("i0", "ok")]}, size=(48, 40))
    cfg = train.make_config(train.parse_args(tiny_argv(tiny_clip_path, (arc, masks), tmp_path / "o", 1,
                                                       "--categories", "imagenet_s919")))
    assert cfg["ignore_index"] == 1000 and cfg["categories"][255] == "pug"
    sem = torch.zeros(1, 32, 32, dtype=torch.long)
    sem[:, 8:24, 8:24], sem[:, :, 28:] = 255, 1000  # a pug, then padding
    batch = {"image": torch.randn(1, 3, 32, 32), "semantic": sem, "instance_masks": [sem[None, 0] == 255],
             "category_ids": [torch.tensor([255])]}
    net = train.build_model(cfg, None, torch.device("cpu"), print)
    ce = lambda b: train.compute_losses(net, b, contextlib.nullcontext(), cfg)["loss_ce"].item()  # noqa: E731
    before = ce(batch)
    assert abs(ce({**batch, "semantic": torch.where(sem == 255, torch.full_like(sem, 1000), sem)}) - before) > 1e-4
    assert abs(ce({**batch, "semantic": torch.where(sem == 1000, torch.zeros_like(sem), sem)}) - before) > 1e-4
    with torch.no_grad():
        net.text_emb[255] = -net.text_emb[255]  # class 255's logit changes: so does the loss
    assert abs(ce(batch) - before) > 1e-4


def focal_cost(p, gT, gamma=2.0):
    """Focal loss (Lin et al. 2017) on mask probabilities, mean over pixels, for every (query, target) pair:
    -((1 - p)^gamma log p . g + p^gamma log(1 - p) . (1 - g)) / P, by two matrix products."""
    log_p, log_1mp = model._BCELogs.apply(p)
    return -(((1 - p) ** gamma * log_p) @ gT + (p ** gamma * log_1mp) @ (1 - gT)) / p.shape[-1]


def test_a_new_mask_term_is_one_function_and_one_line(tiny_clip_path, data, tmp_path, monkeypatch):
    """docs/train.md, "Changing the mask loss": a focal term replaces BCE by the one changed line; the
    matcher and the loss use it, it is logged as loss_focal, and training runs."""
    monkeypatch.setattr(model, "MASK_TERMS", {"dice": (model.dice_cost, 1.0), "focal": (focal_cost, 20.0)})
    g = torch.Generator().manual_seed(0)
    p, gt = torch.rand(3, 40, generator=g), (torch.rand(2, 40, generator=g) > 0.5).float()
    ref = torch.tensor([[-(gi * (1 - pi) ** 2 * pi.log() + (1 - gi) * pi ** 2 * (1 - pi).log()).mean().item()
                         for gi in gt] for pi in p])
    costs = model.pairwise_costs(p, gt)
    assert list(costs) == ["dice", "focal"] and torch.allclose(costs["focal"], ref, atol=1e-6)
    assert torch.allclose(model.HungarianMatcher().cost(p, gt)[0], costs["dice"] + 20 * costs["focal"])
    out = tmp_path / "focal"
    train.main(tiny_argv(tiny_clip_path, data, out, 2))
    recs = [json.loads(ln) for ln in open(out / "metrics.jsonl")]
    assert all("loss_focal" in r and "loss_bce" not in r for r in recs)
    assert all(r["loss_dice"] + r["loss_focal"] == pytest.approx(r["loss_mask"], rel=1e-5) for r in recs)
    assert common.torch_load(str(out / "ckpt.pt"))["step"] == 2
