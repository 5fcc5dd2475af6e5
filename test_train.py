"""Tests of train.py on CPU with a tiny random CLIP and a generated archive + pseudo-masks.

    cd /work/main && .venv/bin/python -m pytest -q test_train.py

Covered: the poly schedule, the deterministic data stream, exact resume (4 steps straight == 2 steps,
interruption, --resume, 2 steps), the script as a subprocess writing a checkpoint that
model.load_checkpoint reloads (and the two AdamW groups), a non-finite loss stopping the run, strict
--init, a 2-process torchrun (gloo) run, and --eval_bench during training.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import common
import train

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module", autouse=True)
def one_thread_with_grad():
    """Tiny ops on a shared 2-core machine: one intra-op thread avoids OpenMP barrier stalls (measured
    40x slower with 2 threads at load 6). Restored afterwards; subprocesses get OMP_NUM_THREADS=1."""
    n, grad = torch.get_num_threads(), torch.is_grad_enabled()
    torch.set_num_threads(1)
    torch.set_grad_enabled(True)  # an earlier in-process main() may have disabled it (evaluate.py once did)
    yield
    torch.set_num_threads(n)
    torch.set_grad_enabled(grad)


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    import dataset
    return dataset.make_fake_archive(str(tmp_path_factory.mktemp("arc")), n_categories=2, per_category=4,
                                     size=(48, 40))


def tiny_argv(clip_path, data, out_dir, iters, *extra):
    archive, masks = data
    return ["--arch", clip_path, "--archive", archive, "--masks_dir", masks, "--out_dir", str(out_dir),
            "--device", "cpu", "--iters", str(iters), "--batch_size", "2", "--crop", "32", "--max_n", "3",
            "--n_queries", "5", "--n_layers", "2", "--n_heads", "2", "--dim_ffn", "32", "--mlp_hidden", "16",
            "--num_workers", "0", "--log_every", "1", "--save_every", "2", "--lr", "1e-3",
            "--lr_encoder", "1e-3", *extra]


def test_poly_schedule():
    assert train.poly_lr(5e-5, 0, 100) == 5e-5
    assert train.poly_lr(5e-5, 50, 100) == pytest.approx(5e-5 * 0.5 ** 0.9)
    assert train.poly_lr(5e-5, 99, 100) == 1e-6  # 5e-5 * 0.01^0.9 = 7.9e-7 is below the floor
    assert train.poly_lr(5e-6, 50, 100) == pytest.approx(5e-6 * 0.5 ** 0.9)  # 2.68e-6
    assert train.poly_lr(5e-6, 90, 100) == 1e-6  # the floor applies to the encoder group too
    # set_lr drives both groups from their own base lr
    args = train.parse_args(["--iters", "100"])
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [a], "base_lr": 5e-6}, {"params": [b], "base_lr": 5e-5}])
    train.set_lr(opt, 50, args)
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


def test_resume_is_exact(tiny_clip_path, data, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    train.main(tiny_argv(tiny_clip_path, data, straight, 4))

    # the same run, killed after the step-2 checkpoint (while fetching step 3's batch), then resumed
    resumed = tmp_path / "resumed"
    calls = {"n": 0}
    real = train.to_device

    def dying(batch, device):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(batch, device)
    monkeypatch.setattr(train, "to_device", dying)
    with pytest.raises(SystemExit, match="130"):  # Ctrl-C: exit 130 with a hint to add --resume
        train.main(tiny_argv(tiny_clip_path, data, resumed, 4))
    monkeypatch.setattr(train, "to_device", real)
    assert torch.load(resumed / "ckpt.pt", weights_only=False)["step"] == 2
    with pytest.raises(common.UserError, match="--resume"):  # never overwrite a run silently
        train.main(tiny_argv(tiny_clip_path, data, resumed, 4))
    train.main(tiny_argv(tiny_clip_path, data, resumed, 4, "--resume", "--num_workers", "1"))  # any worker count

    a = torch.load(straight / "ckpt.pt", weights_only=False)
    b = torch.load(resumed / "ckpt.pt", weights_only=False)
    assert a["step"] == b["step"] == 4
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert not torch.equal(a["model"]["encoder.proj"], torch.load(tiny_clip_path)["visual.proj"])  # it trained
    ma = [json.loads(ln) for ln in open(straight / "metrics.jsonl")]
    mb = [json.loads(ln) for ln in open(resumed / "metrics.jsonl")]
    assert [r["step"] for r in mb] == [r["step"] for r in ma] == [1, 2, 3, 4]
    assert [r["loss"] for r in mb] == [r["loss"] for r in ma]
    # a finished run resumed again has nothing to do
    assert train.main(tiny_argv(tiny_clip_path, data, resumed, 4, "--resume")) is None


def test_script_writes_a_checkpoint_model_reloads(tiny_clip_path, data, tmp_path):
    import model as M
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, os.path.join(HERE, "train.py"),
                        *tiny_argv(tiny_clip_path, data, out, 2, "--dtype", "bfloat16")],
                       capture_output=True, text=True, cwd=HERE, env=ENV, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "step      2/2 | loss" in r.stdout and "it/s" in r.stdout and "ETA" in r.stdout
    ck = torch.load(out / "ckpt.pt", weights_only=False)
    assert set(ck) == {"model", "optimizer", "scaler", "step", "config", "rng"}
    assert ck["step"] == 2 and ck["config"]["categories"] == ["background", "thing0", "thing1"]
    net = M.load_checkpoint(str(out / "ckpt.pt"))
    sd = net.state_dict()
    assert sd.keys() == ck["model"].keys() and all(torch.equal(sd[k], ck["model"][k]) for k in sd)
    enc, rest = ck["optimizer"]["param_groups"]  # the CLIP visual tower (proj included) and the rest
    assert (enc["name"], rest["name"]) == ("encoder", "rest") and enc["weight_decay"] == rest["weight_decay"] == 0.05
    n_enc = sum(k.startswith("encoder.") for k in ck["model"])
    assert len(enc["params"]) == n_enc and len(rest["params"]) == len(ck["model"]) - n_enc
    cfg = json.load(open(out / "config.json"))
    assert cfg["git_sha"] and cfg["n_queries"] == 5 and cfg["stop_grad"] is True
    assert len(open(out / "metrics.jsonl").readlines()) == 2


def test_non_finite_loss_stops_the_run(tiny_clip_path, data, tmp_path, monkeypatch):
    import criterion as CR
    real = CR.criterion

    def poisoned(outputs, batch, **kw):  # as if the forward pass overflowed at the second step
        losses = real(outputs, batch, **kw)
        if poisoned.calls == 1:
            losses = {k: v * float("nan") for k, v in losses.items()}
        poisoned.calls += 1
        return losses
    poisoned.calls = 0
    monkeypatch.setattr(CR, "criterion", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(common.UserError, match=r"non-finite loss at step 1: .*loss=nan"):
        train.main(tiny_argv(tiny_clip_path, data, out, 4, "--save_every", "1"))
    # the step-1 checkpoint is intact and the bad step never touched it
    assert torch.load(out / "ckpt.pt", weights_only=False)["step"] == 1
    poisoned.calls = 0
    with pytest.raises(SystemExit) as e:  # as a script: one line on stderr, non-zero exit
        common.run_main(lambda: train.main(tiny_argv(tiny_clip_path, data, tmp_path / "nan2", 4)))
    assert e.value.code == 2


def test_init_loads_weights_strictly(tiny_clip_path, data, tmp_path):
    src = tmp_path / "src"
    train.main(tiny_argv(tiny_clip_path, data, src, 1))
    # zero learning rate and decay: after one step the weights are still exactly the --init file's
    frozen = ("--lr", "0", "--lr_encoder", "0", "--min_lr", "0", "--weight_decay", "0")
    net = train.main(tiny_argv(tiny_clip_path, data, tmp_path / "dst", 1, "--init", str(src / "ckpt.pt"), *frozen))
    a, b = torch.load(src / "ckpt.pt", weights_only=False)["model"], net.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(common.UserError):  # a different architecture is an error, not a partial load
        train.main(tiny_argv(tiny_clip_path, data, tmp_path / "bad", 1, "--init", str(src / "ckpt.pt"),
                             "--n_queries", "7"))


def test_torchrun_two_processes(tiny_clip_path, data, tmp_path):
    """DDP on CPU (gloo): 2 ranks share the global batch, rank 0 writes one checkpoint with both RNGs."""
    out = tmp_path / "ddp"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        os.path.join(HERE, "train.py"), *tiny_argv(tiny_clip_path, data, out, 2)],
                       capture_output=True, text=True, cwd=HERE, env=ENV, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert r.stdout.count("step      2/2 | loss") == 1  # rank 0 logs, rank 1 does not
    ck = torch.load(out / "ckpt.pt", weights_only=False)
    assert ck["step"] == 2 and ck["config"]["world_size"] == 2 and ck["config"]["local_batch_size"] == 1
    assert len(ck["rng"]) == 2 and not torch.equal(ck["rng"][0]["torch"], ck["rng"][1]["torch"])


def test_eval_bench_during_training(tiny_clip_path, data, tmp_path):
    from test_evaluate import write_voc  # the VOC2012 on-disk layout evaluate.py reads
    voc = tmp_path / "VOC2012"
    write_voc(str(voc))
    out = tmp_path / "ev"
    net = train.main(tiny_argv(tiny_clip_path, data, out, 2, "--eval_bench", "voc", "--eval_data_root", str(voc),
                               "--eval_every", "1", "--eval_max_images", "2"))
    evals = [r for r in map(json.loads, open(out / "metrics.jsonl")) if "eval" in r]
    assert [r["step"] for r in evals] == [1, 2] and all("mIoU" in r for r in evals)
    assert os.path.isfile(out / "eval_voc_000002" / "metrics.json")
    assert net.training and net.categories == ["background", "thing0", "thing1"]


@pytest.mark.parametrize("argv, msg", [
    (["--iters", "0"], "--iters must be positive"),
    (["--eval_bench", "vocc", "--eval_data_root", "."], "unknown --eval_bench"),
    (["--eval_bench", "voc"], "needs --eval_data_root"),
    (["--archive", "no/such/archive.json", "--out_dir", "unused"], "archive not found"),
])
def test_bad_input_is_a_user_error(argv, msg):
    with pytest.raises(common.UserError, match=msg):
        train.main(["--device", "cpu", *argv])


def test_benchmark_runs_and_cleans_up(tmp_path, monkeypatch, capsys):
    """--benchmark with a random ViT-B/32 and a fake archive: one row per dtype with a positive speed,
    and the ~600 MB of temporary weights and images it wrote are gone afterwards."""
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    rows = train.main(["--benchmark", "--arch", "random:ViT-B/32", "--archive", "fake", "--crop", "64",
                       "--batch_size", "1", "--bench_iters", "1", "--n_layers", "1", "--device", "cpu",
                       "--num_workers", "0"])
    assert [r["dtype"] for r in rows] == ["float32", "bfloat16"]
    assert all(r["it_s"] > 0 and abs(sum(r["share"].values()) - 1) < 0.05 for r in rows)
    assert "RANDOMLY INITIALISED" in capsys.readouterr().out
    assert not [p for p in os.listdir(tmp_path) if p.startswith("zutis_bench_")]
