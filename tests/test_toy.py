"""Tests of the toy world generator (toy_world.py), its VOC-layout writer, the stage cache, the floors check, and
the boundary saliency on generated images.

    python -m pytest -q tests/test_toy.py
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import toy
import toy_world


@pytest.fixture
def black_world(monkeypatch):
    """Objects on a black, noise-free background, so every lit pixel belongs to an object."""
    monkeypatch.setattr(toy_world, "render_backgrounds", lambda rng, n: np.zeros((n, toy_world.SIZE, toy_world.SIZE, 3)))
    monkeypatch.setattr(toy_world, "finish", lambda img, rng: (img.clip(0, 1) * 255 + 0.5).astype(np.uint8))


def test_masks_match_pixels(black_world):
    rng = np.random.default_rng(0)
    imgs, inst, labels = toy_world.index_pool(rng, 60)
    lit = imgs.max(-1) > 0
    assert (lit == (inst > 0)).all()  # object pixels are exactly the mask pixels
    assert set(labels.tolist()) <= set(range(len(toy_world.CATEGORIES)))
    assert (inst == 1).reshape(60, -1).sum(1).min() > 30  # the main object is always visible


def test_eval_scene_instances(black_world):
    imgs, inst, sem = toy_world.eval_scenes(np.random.default_rng(1), 40)
    lit = imgs.max(-1) > 0
    assert lit[inst > 0].all()  # instance (and void sliver) pixels are object pixels
    assert not lit[inst == 0].any()  # no object pixel is labelled background
    assert ((inst == 255) == (sem == 255)).all() and ((inst == 0) == (sem == 0)).all()
    for i in range(40):
        ids = sorted(set(np.unique(inst[i]).tolist()) - {0, 255})
        assert 2 <= len(ids) <= 6 and ids == list(range(1, len(ids) + 1))  # unique, consecutive ids
        for k in ids:
            classes = np.unique(sem[i][inst[i] == k])
            assert len(classes) == 1 and 1 <= classes[0] <= len(toy_world.CATEGORIES)  # one class per instance
            assert (inst[i] == k).sum() >= 12
        assert len(set(np.unique(sem[i]).tolist()) - {0, 255}) <= 3  # 1-3 categories per scene


def test_generator_is_seeded():
    a = toy_world.eval_scenes(np.random.default_rng(5), 4)
    b = toy_world.eval_scenes(np.random.default_rng(5), 4)
    assert all((x == y).all() for x, y in zip(a, b))
    imgs, caps = toy_world.caption_batch(np.random.default_rng(2), 64, p_background=0.5)
    assert imgs.shape == (64, 64, 64, 3) and imgs.dtype == np.uint8
    assert any(c in toy_world.BACKGROUND_CAPTIONS for c in caps)
    assert all(c in toy_world.BACKGROUND_CAPTIONS or any(n in c for n in toy_world.CATEGORIES) for c in caps)


def test_voc_layout_readable(tmp_path):
    import benchmarks as B
    info = toy_world.write_world(str(tmp_path), seed=0, n_index=20, n_eval=12, chunk=8)
    voc = tmp_path / "VOC2012"
    for sub in ("SegmentationClass", "SegmentationObject"):
        im = Image.open(voc / sub / "2026_000000.png")
        assert im.mode == "P" and im.getpalette()[:9] == [0, 0, 0, 128, 0, 0, 0, 128, 0]  # VOC colour map
    assert len(open(voc / "ImageSets/Segmentation/trainval.txt").read().split()) == 12
    bench = B.read_bench("voc", str(voc))
    assert len(bench.samples) == 12
    n = 0
    for s in bench.samples:
        sem = bench.load_semantic(s)
        assert sem.shape == (64, 64) and set(np.unique(sem).tolist()) <= set(range(11)) | {255}
        objs = bench.load_instances(s, sem)
        assert len(objs) >= 2 and all(1 <= c <= 10 for _, c in objs)
        n += len(objs)
    assert n == info["eval_instances"]
    # the index pool: anonymous files, labels only in hidden/
    files = sorted(os.listdir(tmp_path / "index"))
    assert len(files) == 20 and not any(c in f for f in files for c in toy_world.CATEGORIES)
    hidden = json.load(open(tmp_path / "hidden" / "index_labels.json"))
    assert hidden["files"] == files and len(hidden["labels"]) == 20
    assert np.load(tmp_path / "hidden" / "index_instances.npy").shape == (20, 64, 64)
    assert open(tmp_path / "categories.txt").read().split("\n")[:2] == ["background", "circle"]


def test_boundary_saliency_on_generated_images():
    import pseudo_label  # toy.py runs pseudo_label.py --saliency boundary: never skipped
    imgs, inst, _ = toy_world.index_pool(np.random.default_rng(3), 40)
    ious = []
    for img, m in zip(imgs, inst > 0):
        pred = pseudo_label.boundary_saliency(img)
        ious.append((pred & m).sum() / max(1, (pred | m).sum()))
    assert np.mean(ious) > 0.6, np.mean(ious)


def test_stage_cache(tmp_path):
    st, calls = toy.Stages(str(tmp_path)), []
    out = tmp_path / "a.txt"

    def work():
        calls.append(1)
        out.write_text("x")
        return {"v": len(calls)}
    assert st.run("a", {"s": 1}, [str(out)], work) == {"v": 1}
    assert st.run("a", {"s": 1}, [str(out)], work) == {"v": 1} and len(calls) == 1  # cached
    assert st.run("a", {"s": 2}, [str(out)], work) == {"v": 2}  # settings changed: rerun
    out.unlink()
    assert st.run("a", {"s": 2}, [str(out)], work) == {"v": 3}  # output gone: rerun


def test_interrupted_stage_resumes_or_starts_over(tmp_path):
    """A killed resumable stage keeps its partial outputs when rerun with the same settings (the
    script continues them; script stages get `resume_args`); with other settings, or when it is not
    resumable, its outputs are removed first."""
    out, part = tmp_path / "out", tmp_path / "part"

    def killed():
        part.mkdir(exist_ok=True)
        (part / "half").write_text("x")
        raise KeyboardInterrupt
    for resumable, settings, kept in ((True, {"s": 1}, True), (True, {"s": 2}, False), (False, {"s": 1}, False)):
        with pytest.raises(KeyboardInterrupt):
            toy.Stages(str(out)).run("a", {"s": 1}, [str(part)], killed, resumable=True)
        st = toy.Stages(str(out))
        assert st.run("a", settings, [str(part)], lambda: sorted(os.listdir(part)) if part.exists() else [],
                      resumable=resumable) == (["half"] if kept else [])
        assert ("a" in st.resuming) == kept and not (out / "stages" / "a.started.json").exists()
        (out / "stages" / "a.json").unlink()  # the next round starts from no finished run

    echo = _script(tmp_path / "echo.py", "os.makedirs(os.path.dirname(sys.argv[1]), exist_ok=True)\n"
                                         "open(sys.argv[1], 'a').write(' '.join(sys.argv[2:]) + ';')\n")
    log = tmp_path / "t" / "argv.txt"
    log.parent.mkdir()
    jobs = {"t": ([str(log.parent)], [echo, log, "--iters", "5"])}
    toy.Stages(str(out)).start("t", {"s": 1})  # as if a train stage had been killed mid-run
    log.write_text("first run;")
    toy.Stages(str(out)).run_scripts(jobs, {"s": 1}, resume_args=["--resume"])
    assert log.read_text() == "first run;--iters 5 --resume;"
    st = toy.Stages(str(out))
    st.run_scripts(jobs, {"s": 1}, resume_args=["--resume"])  # finished: cached, its time still partial
    assert st.resumed == {"t"} and "| t | 0 (resumed: after the interruption only) |" in toy.results_table(
        {"clip_zero_shot": 1, "clip_precision@50": 1, "archive_k": 5, "archive_precision": 1,
         "clip_background_max_cos": 0.5, "pseudo_masks": 3, "pseudo_mask_iou": 1},
        st.seconds, st.cpu, {"seed": 0, "quick": True}, st.group, st.resumed)
    st = toy.Stages(str(out))
    st.run_scripts(jobs, {"s": 2}, resume_args=["--resume"])  # new settings: from scratch
    assert log.read_text() == "--iters 5;" and not st.resumed


@pytest.mark.slow
def test_tiny_clip_pretraining_resumes_exactly(tmp_path, monkeypatch):
    """Killed after step 3 of 5 and rerun, pre-training ends with the same weights as a run never
    interrupted (weights, optimizer and both RNGs come back), and leaves no resume file behind."""
    import torch
    kw = dict(seed=0, steps=5, batch_size=6, warmup=2, save_every=1)
    toy.pretrain_clip(str(tmp_path / "straight.pt"), **kw)
    calls, real = [], toy.caption_batch

    def dies_on_the_fourth(rng, n):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(rng, n)
    monkeypatch.setattr(toy, "caption_batch", dies_on_the_fourth)
    with pytest.raises(KeyboardInterrupt):
        toy.pretrain_clip(str(tmp_path / "killed.pt"), **kw)
    assert torch.load(tmp_path / "killed.pt.resume.pt")["step"] == 3
    monkeypatch.setattr(toy, "caption_batch", real)
    toy.pretrain_clip(str(tmp_path / "killed.pt"), **kw)
    a, b = torch.load(tmp_path / "straight.pt"), torch.load(tmp_path / "killed.pt")
    assert all(torch.equal(a[k], b[k]) for k in a) and sorted(os.listdir(tmp_path)) == ["killed.pt", "straight.pt"]
    # a resume file left by a run of other settings is not used: the run starts over
    torch.save({"args": {"seed": 9}, "step": 4}, tmp_path / "fresh.pt.resume.pt")
    toy.pretrain_clip(str(tmp_path / "fresh.pt"), **kw)
    c = torch.load(tmp_path / "fresh.pt")
    assert all(torch.equal(a[k], c[k]) for k in a) and not (tmp_path / "fresh.pt.resume.pt").exists()


def test_floors(tmp_path):
    floors = toy.read_floors(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "toy_floors.json"))
    assert floors["zutis_mIoU"] > 0 and "zutis_AP50" in floors  # the file CI checks is readable
    f = tmp_path / "floors.json"
    f.write_text('{"zutis_mIoU": 20.5, "clip_zero_shot": 32}')
    floors = toy.read_floors(str(f))
    assert floors == {"zutis_mIoU": 20.5, "clip_zero_shot": 32.0}
    assert toy.check_floors({"zutis_mIoU": 25.0, "clip_zero_shot": 40.0}, floors) == []
    bad = toy.check_floors({"zutis_mIoU": 19.0}, floors)
    assert len(bad) == 2 and "zutis_mIoU" in bad[0] and "missing" in bad[1]
    for text in ("no json", "[1, 2]", '{"a": "x"}'):
        f.write_text(text)
        with pytest.raises(toy.common.UserError):
            toy.read_floors(str(f))


@pytest.mark.parametrize("flags, says", [(["--iters", "-5"], "--iters must be a positive"),
                                         (["--n_index", "20"], "--n_index must be at least"),
                                         (["--device", "tpu"], "--device must be"),
                                         (["--check_floors", "nope.json"], "floors file not found")])
def test_bad_flags_fail_before_any_work(tmp_path, flags, says):
    r = subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "toy.py"),
                        "--out_dir", str(tmp_path / "o"), *flags], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and says in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def _script(path, body):
    path.write_text("import os, sys, time\n" + body)
    return str(path)  # absolute: run_parallel's join with the repo folder keeps it


def test_parallel_stages(tmp_path):
    """Script stages run side by side with one thread each, log to files, are cached like any stage,
    and a failing one stops the others with one line."""
    out = tmp_path / "out"
    ok = _script(tmp_path / "ok.py", "print('step 1', os.environ.get('OMP_NUM_THREADS', 'unset')); time.sleep(0.3)\n"
                                     "open(sys.argv[1], 'w').write('done')\n")
    st = toy.Stages(str(out))
    jobs = {n: ([str(tmp_path / f"{n}.txt")], [ok, tmp_path / f"{n}.txt"]) for n in ("a", "b")}
    st.run_scripts(jobs, {"s": 1})
    assert (tmp_path / "a.txt").read_text() == "done" and (tmp_path / "b.txt").read_text() == "done"
    assert "step 1 1" in (out / "logs" / "a.log").read_text()  # one thread each
    assert st.group == {"a": "a+b", "b": "a+b"}
    sec = {"world": 10.0, "a": 100.0, "b": 110.0}  # the report counts a side-by-side group's wall once
    table = toy.results_table({"clip_zero_shot": 1, "clip_precision@50": 1, "archive_k": 5, "archive_precision": 1,
                               "clip_background_max_cos": 0.5, "pseudo_masks": 3, "pseudo_mask_iou": 1},
                              sec, {}, {"seed": 0, "quick": True}, st.group)
    assert "| total | 120 |" in table and "| a | 100 (side by side) |" in table
    (tmp_path / "a.txt").unlink()
    st2 = toy.Stages(str(out))
    st2.run_scripts(jobs, {"s": 1})  # b is cached; a alone reruns
    assert (tmp_path / "a.txt").exists() and st2.group == {"b": "a+b"}

    slow = _script(tmp_path / "slow.py", "time.sleep(60)\n")
    bad = _script(tmp_path / "bad.py", "sys.exit(3)\n")
    t0 = toy.time.time()
    with pytest.raises(toy.common.UserError, match="exit code 3"):
        toy.run_parallel({"slow": [slow], "bad": [bad]}, str(tmp_path / "logs"))
    assert toy.time.time() - t0 < 30  # the slow one was killed, not waited for


def test_proposal_recall_with_an_oracle_network(tmp_path, monkeypatch):
    """toy_report.proposal_recall on a stand-in network that proposes each true instance and encodes each
    pixel's true class as its token: every instance the 16 x 16 proposal grid can draw is covered and
    classed; with every object class shifted by one, none is classed, by proposal or semantic majority."""
    import torch
    import evaluate
    import model
    import toy_report
    toy_world.write_world(str(tmp_path), seed=0, n_index=8, n_eval=10, chunk=8)
    voc = tmp_path / "VOC2012"
    names = open(voc / "ImageSets/Segmentation/trainval.txt").read().split()
    K = len(toy_world.CATEGORIES) + 1

    def outputs(shift):
        for n in names:  # proposal_recall reads the scenes in this order
            inst = torch.from_numpy(np.array(Image.open(voc / "SegmentationObject" / f"{n}.png")).astype(np.int64))
            sem = torch.from_numpy(np.array(Image.open(voc / "SegmentationClass" / f"{n}.png")).astype(np.int64))
            inst16, sem16 = inst[2::4, 2::4], sem[2::4, 2::4].clone()  # [64, 64] -> [16, 16], block centres
            obj = (sem16 > 0) & (sem16 < K)
            sem16[obj] = (sem16[obj] - 1 + shift) % (K - 1) + 1
            sem16[~obj] = 0
            masks = torch.stack([inst16 == i for i in range(1, 8)]).float()  # [Q=7, 16, 16]
            yield {"mask_logits": (masks * 20 - 10)[None, None], "patch_tokens": torch.eye(K)[sem16][None],
                   "text_emb": torch.eye(K)}

    for shift in (0, 1):
        stream = outputs(shift)
        monkeypatch.setattr(model, "load_checkpoint", lambda *a, **k: type("Net", (), {
            "eval": lambda self: self, "__call__": lambda self, x: next(stream)})())
        monkeypatch.setattr(evaluate, "checkpoint_config", lambda spec: {})
        pr = toy_report.proposal_recall("unused.pt", str(tmp_path))
        assert pr["unique_instances"] + pr["repeated_instances"] > 20
        for k in ("unique", "repeated"):
            if shift == 0:
                assert pr[f"{k}_recall"] >= 70 and pr[f"{k}_classed"] == pr[f"{k}_recall"], pr
                assert pr[f"{k}_semantic"] >= 70, pr
            else:
                assert pr[f"{k}_recall"] >= 70 and pr[f"{k}_classed"] == 0 and pr[f"{k}_semantic"] == 0, pr
