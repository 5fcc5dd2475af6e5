"""Tests of the toy world generator (toy/world.py), its VOC-layout writer, the toy run's rerun rule and
side-by-side trainings (toy/run.py), the floors check, the how-it-works figures (toy/pictures.py), and the
boundary saliency on generated images.

    python -m pytest -q tests/test_toy.py
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import common
from toy import pictures, run, tiny_clip
from toy import world as toy_world


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    import benchmarks
    info = toy_world.write_world(str(tmp_path), seed=0, n_index=20, n_eval=12, chunk=8)
    voc = tmp_path / "VOC2012"
    for sub in ("SegmentationClass", "SegmentationObject"):
        im = Image.open(voc / sub / "2026_000000.png")
        assert im.mode == "P" and im.getpalette()[:9] == [0, 0, 0, 128, 0, 0, 0, 128, 0]  # VOC colour map
    assert len(open(voc / "ImageSets/Segmentation/trainval.txt").read().split()) == 12
    bench = benchmarks.read_bench("voc", str(voc))
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


def test_rerun_continues_or_refuses(tmp_path):
    """One out_dir holds one run: the same settings continue it, other settings refuse with one line
    naming what differs. A stage whose own final output exists is skipped and keeps its recorded time;
    one that finds its partial output is marked as continuing a killed run."""
    cfg = {**run.PRESETS["quick"], "seed": 0}
    run.check_same_settings(str(tmp_path), cfg)
    run.check_same_settings(str(tmp_path), cfg)  # the same command: fine
    with pytest.raises(common.UserError, match=r"iters 800 -> 900"):
        run.check_same_settings(str(tmp_path), {**cfg, "iters": 900})

    calls, part = [], tmp_path / "part"
    clock = run.Clock(str(tmp_path))
    clock.stage("a", False, lambda: calls.append("a"), partial=str(part))
    part.mkdir()  # as if a killed run of stage b had left its output folder
    clock.stage("b", False, lambda: calls.append("b"), partial=str(part))
    clock.stage("c", True, lambda: calls.append("c"))
    assert calls == ["a", "b"]
    again = run.Clock(str(tmp_path))  # a rerun reads the recorded times back
    assert again.times.keys() == {"a", "b"} and again.times["b"]["resumed"] and not again.times["a"]["resumed"]
    with pytest.raises(KeyboardInterrupt):  # a stage that dies records nothing
        again.stage("d", False, lambda: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert "d" not in run.Clock(str(tmp_path)).times
    table = run.results_table({"clip_zero_shot": 1, "clip_precision@50": 1, "archive_k": 5, "archive_precision": 1,
                               "clip_background_max_cos": 0.5, "pseudo_masks": 3, "pseudo_mask_iou": 1},
                              {"a": {"wall": 10.0, "cpu": 20.0, "resumed": False},
                               "b": {"wall": 5.0, "cpu": 4.0, "resumed": True}}, {"seed": 0, "quick": True})
    assert "| b | 5 (continued a killed run" in table and "| total | 15 | 24 |" in table


@pytest.mark.slow
def test_tiny_clip_pretraining_resumes_exactly(tmp_path, monkeypatch):
    """Killed after step 3 of 5 and rerun, pre-training ends with the same weights as a run never
    interrupted (weights, optimizer and both RNGs come back), and leaves no resume file behind."""
    import torch
    kw = dict(seed=0, steps=5, batch_size=6, warmup=2, save_every=1)
    tiny_clip.pretrain_clip(str(tmp_path / "straight.pt"), **kw)
    calls, real = [], tiny_clip.caption_batch

    def dies_on_the_fourth(rng, n):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(rng, n)
    monkeypatch.setattr(tiny_clip, "caption_batch", dies_on_the_fourth)
    with pytest.raises(KeyboardInterrupt):
        tiny_clip.pretrain_clip(str(tmp_path / "killed.pt"), **kw)
    assert torch.load(tmp_path / "killed.pt.resume.pt")["step"] == 3
    monkeypatch.setattr(tiny_clip, "caption_batch", real)
    tiny_clip.pretrain_clip(str(tmp_path / "killed.pt"), **kw)
    a, b = torch.load(tmp_path / "straight.pt"), torch.load(tmp_path / "killed.pt")
    assert all(torch.equal(a[k], b[k]) for k in a) and sorted(os.listdir(tmp_path)) == ["killed.pt", "straight.pt"]
    # a resume file left by a run of other settings is not used: the run starts over
    torch.save({"args": {"seed": 9}, "step": 4}, tmp_path / "fresh.pt.resume.pt")
    tiny_clip.pretrain_clip(str(tmp_path / "fresh.pt"), **kw)
    c = torch.load(tmp_path / "fresh.pt")
    assert all(torch.equal(a[k], c[k]) for k in a) and not (tmp_path / "fresh.pt.resume.pt").exists()


def test_floors(tmp_path):
    floors = run.read_floors(os.path.join(ROOT, "toy", "floors.json"))
    assert floors["zutis_mIoU"] > 0 and "zutis_AP50" in floors  # the file CI checks is readable
    f = tmp_path / "floors.json"
    f.write_text('{"zutis_mIoU": 20.5, "clip_zero_shot": 32}')
    floors = run.read_floors(str(f))
    assert floors == {"zutis_mIoU": 20.5, "clip_zero_shot": 32.0}
    assert run.check_floors({"zutis_mIoU": 25.0, "clip_zero_shot": 40.0}, floors) == []
    bad = run.check_floors({"zutis_mIoU": 19.0}, floors)
    assert len(bad) == 2 and "zutis_mIoU" in bad[0] and "missing" in bad[1]
    for text in ("no json", "[1, 2]", '{"a": "x"}'):
        f.write_text(text)
        with pytest.raises(common.UserError):
            run.read_floors(str(f))


@pytest.mark.parametrize("flags, says", [(["--iters", "-5"], "--iters must be >= 1"),
                                         (["--n_index", "20"], "--n_index must be at least"),
                                         (["--device", "tpu"], "is not a device"),
                                         (["--check_floors", "nope.json"], "floors file not found")])
def test_bad_flags_fail_before_any_work(tmp_path, flags, says):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "toy.py"),
                        "--out_dir", str(tmp_path / "o"), *flags], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and says in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def _script(path, body):
    path.write_text("import os, sys, time\n" + body)
    return str(path)  # absolute: stage_command's join with the repo folder keeps it


def test_side_by_side(tmp_path):
    """Trainings run side by side with one thread each and append to their logs; a failing one stops
    the others at once, with one line naming its log."""
    ok = _script(tmp_path / "ok.py", "print('step 1', os.environ.get('OMP_NUM_THREADS', 'unset')); time.sleep(0.3)\n"
                                     "open(sys.argv[1], 'w').write('done')\n")
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "a.log").write_text("step 0 of a killed run\n")
    run.run_side_by_side({n: [ok, tmp_path / f"{n}.txt"] for n in ("a", "b")}, str(logs))
    assert (tmp_path / "a.txt").read_text() == "done" and (tmp_path / "b.txt").read_text() == "done"
    assert (logs / "a.log").read_text() == "step 0 of a killed run\nstep 1 1\n"  # appended, one thread

    slow = _script(tmp_path / "slow.py", "time.sleep(60)\n")
    bad = _script(tmp_path / "bad.py", "sys.exit(3)\n")
    t0 = run.time.time()
    with pytest.raises(common.UserError, match=r"bad failed with exit code 3; its log: .*bad.log"):
        run.run_side_by_side({"slow": [slow], "bad": [bad]}, str(logs))
    assert run.time.time() - t0 < 30  # the slow one was killed, not waited for


def test_how_it_works_figures(tmp_path):
    """The retrieval, pseudo-mask and training-scene figures from an archive of the world's own images:
    the first entry is right (green frame), the last one of the category's archive is not (red frame)."""
    toy_world.write_world(str(tmp_path / "world"), seed=0, n_index=120, n_eval=4, chunk=60)
    hidden = json.load(open(tmp_path / "world" / "hidden" / "index_labels.json"))
    inst = np.load(tmp_path / "world" / "hidden" / "index_instances.npy")
    star = toy_world.CATEGORIES.index(pictures.CATEGORY)
    by_cat = {c: [f for f, l in zip(hidden["files"], hidden["labels"]) if l == k] for k, c in enumerate(toy_world.CATEGORIES)}
    wrong = next(f for f, l in zip(hidden["files"], hidden["labels"]) if l != star)
    arc = {"arch": "test", "k": 8, "index_dirs": [str(tmp_path / "world" / "index")], "categories": ["background"] + toy_world.CATEGORIES,
           "archive": {c: [{"path": f, "dir": 0, "score": 0.5} for f in (fs * 8)[:8]] for c, fs in by_cat.items()}}
    arc["archive"][pictures.CATEGORY][-1]["path"] = wrong
    common.save_json(arc, str(tmp_path / "archive" / "archive.json"))
    for i, f in enumerate(hidden["files"]):
        common.save_image((inst[i] > 0).astype(np.uint8) * 255, str(tmp_path / "masks" / "0_index" / f.replace(".jpg", ".png")))
    figs = tmp_path / "figs"
    pictures.retrieval_figures(str(tmp_path), str(figs / "1.jpg"), str(figs / "2.jpg"))
    pictures.training_scene_figure(str(tmp_path), str(figs / "3.jpg"))
    a = np.asarray(Image.open(figs / "1.jpg")).astype(int)
    tile = 64 * pictures.ZOOM + 6  # a zoomed image and its frame
    top, bottom = a[-2 * tile:-tile], a[-tile:]  # the rows of the first and of the last ranks
    first, last = top[tile // 2, 121], bottom[tile // 2, 120 + 7 * tile + 1]  # frame pixels
    assert first[1] > 120 and first[0] < 80 and last[0] > 150 and last[1] < 80, (first, last)
    for name in ("2.jpg", "3.jpg"):
        im = Image.open(figs / name)
        assert im.width > 4 * 64 * pictures.ZOOM and im.height > 2 * 64 * pictures.ZOOM


def test_proposal_recall_with_an_oracle_network(tmp_path, monkeypatch):
    """toy_report.proposal_recall on a stand-in network that proposes each true instance and encodes each
    pixel's true class as its token: every instance the 16 x 16 proposal grid can draw is covered and
    classed; with every object class shifted by one, none is classed, by proposal or semantic majority."""
    import torch
    import evaluate
    import model
    from toy import report as toy_report
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
