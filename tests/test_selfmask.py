"""Tests for selfmask.py (network, strict loading, protocol, bilateral solver) and pseudo_label.py
(boundary fallback, writing, resuming, a killed run, bad input). CPU, tiny shapes.

    python -m pytest -q tests/test_selfmask.py
"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import common
import pseudo_label
import selfmask
from conftest import save_archive


# ----------------------------------------------------------------------------- helpers

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny ops are latency-bound: extra intra-op threads only wait on busy cores. Restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def iou(a, b):
    return (a & b).sum() / max((a | b).sum(), 1)


def texture(rng, h, w, c1, c2):
    """Two-colour texture: stripes, checker or blotches, plus pixel noise. float [h, w, 3]."""
    from scipy.ndimage import gaussian_filter
    yy, xx = np.mgrid[:h, :w].astype(float)
    kind = rng.integers(3)
    if kind == 0:
        th, per = rng.uniform(0, np.pi), rng.uniform(3, 8)
        t = np.sin((xx * np.cos(th) + yy * np.sin(th)) * 2 * np.pi / per) > 0
    elif kind == 1:
        s = rng.integers(2, 6)
        t = (xx // s + yy // s) % 2 > 0
    else:
        t = gaussian_filter(rng.normal(size=(h, w)), 2) > 0
    return np.where(t[..., None], c2, c1) + rng.normal(0, 8, (h, w, 3))


def textured_scene(rng, h=64, w=64):
    """One textured blob on a differently textured background -> (uint8 [h, w, 3], bool mask [h, w])."""
    def colours(avoid=None):
        while True:
            c1 = rng.uniform(0, 255, 3)
            if avoid is None or min(np.linalg.norm(c1 - a) for a in avoid) > 90:
                return c1, np.clip(c1 + rng.normal(0, 40, 3), 0, 255)
    bg = colours()
    fg = colours(bg)
    yy, xx = np.mgrid[:h, :w].astype(float)
    cy, cx = rng.uniform(0.35, 0.65) * h, rng.uniform(0.35, 0.65) * w
    ry, rx, th = rng.uniform(0.15, 0.3) * h, rng.uniform(0.15, 0.3) * w, rng.uniform(0, np.pi)
    u = ((xx - cx) * np.cos(th) + (yy - cy) * np.sin(th)) / rx
    v = (-(xx - cx) * np.sin(th) + (yy - cy) * np.cos(th)) / ry
    mask = np.hypot(u, v) < 1 + 0.25 * np.sin(rng.integers(2, 6) * np.arctan2(v, u))
    img = np.where(mask[..., None], texture(rng, h, w, *fg), texture(rng, h, w, *bg))
    return np.clip(img, 0, 255).astype(np.uint8), mask


def tiny_selfmask(seed=0):
    torch.manual_seed(seed)
    return selfmask.SelfMask(n_queries=3, dim=32, depth=1, n_heads=2, n_dec_layers=1, dim_ffn=64).eval()


def released_state_dict(n_queries=20):
    """A random state dict with the released nq20 file's keys and shapes, listed here by hand rather than
    taken from our model, so a renamed or reshaped parameter fails the strict load."""
    C, F = 384, 1536
    sd = {"encoder.cls_token": [1, 1, C], "encoder.pos_embed": [1, 785, C],
          "encoder.patch_embed.proj.weight": [C, 3, 8, 8], "encoder.patch_embed.proj.bias": [C],
          "encoder.norm.weight": [C], "encoder.norm.bias": [C], "decoder.norm.weight": [C],
          "decoder.norm.bias": [C], "query_embed": [n_queries, C],
          "ffn.layers.0.weight": [C, C], "ffn.layers.0.bias": [C], "ffn.layers.1.weight": [C, C],
          "ffn.layers.1.bias": [C], "ffn.layers.2.weight": [1, C], "ffn.layers.2.bias": [1]}
    for i in range(12):
        b = f"encoder.blocks.{i}."
        sd.update({b + "norm1.weight": [C], b + "norm1.bias": [C], b + "attn.qkv.weight": [3 * C, C],
                   b + "attn.qkv.bias": [3 * C], b + "attn.proj.weight": [C, C], b + "attn.proj.bias": [C],
                   b + "norm2.weight": [C], b + "norm2.bias": [C], b + "mlp.fc1.weight": [F, C],
                   b + "mlp.fc1.bias": [F], b + "mlp.fc2.weight": [C, F], b + "mlp.fc2.bias": [C]})
    for j in range(6):
        b = f"decoder.layers.{j}."
        for a in ("self_attn", "multihead_attn"):
            sd.update({b + a + ".in_proj_weight": [3 * C, C], b + a + ".in_proj_bias": [3 * C],
                       b + a + ".out_proj.weight": [C, C], b + a + ".out_proj.bias": [C]})
        sd.update({b + "linear1.weight": [F, C], b + "linear1.bias": [F], b + "linear2.weight": [C, F],
                   b + "linear2.bias": [C]})
        sd.update({b + f"norm{k}.{p}": [C] for k in (1, 2, 3) for p in ("weight", "bias")})
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(s, generator=g) * 0.02 for k, s in sd.items()}


@pytest.fixture(scope="module")
def released_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("selfmask")
    sd = released_state_dict()
    torch.save(sd, d / "bare.pt")
    torch.save({"model": sd, "n_iters": 0}, d / "wrapped.pt")
    return sd, str(d / "bare.pt"), str(d / "wrapped.pt")


# ----------------------------------------------------------------------------- network + loading

def test_released_checkpoint_loads_strictly_both_wrappings(released_files):
    sd, bare, wrapped = released_files
    assert sum(v.numel() for v in sd.values()) == 36_174_337  # the released nq20 file's total
    for path in (bare, wrapped):
        model = selfmask.load_selfmask(path)
        assert not model.training
        got = model.state_dict()
        assert set(got) == set(sd)
        assert all(torch.equal(got[k], sd[k]) for k in sd)


def test_wrong_shape_or_key_is_one_clear_error(released_files, tmp_path):
    sd = dict(released_files[0])
    sd["decoder.layers.3.linear1.weight"] = torch.zeros(1535, 384)
    torch.save(sd, tmp_path / "shape.pt")
    with pytest.raises(common.UserError, match=r"wrong shapes: decoder\.layers\.3\.linear1\.weight"):
        selfmask.load_selfmask(str(tmp_path / "shape.pt"))
    sd = dict(released_files[0])
    sd["encoder.head.weight"] = torch.zeros(1000, 384)
    torch.save(sd, tmp_path / "extra.pt")
    with pytest.raises(common.UserError, match="unexpected keys: encoder.head.weight"):
        selfmask.load_selfmask(str(tmp_path / "extra.pt"))


def test_missing_checkpoint_says_how_to_get_it(tmp_path):
    with pytest.raises(common.UserError, match="--saliency boundary"):
        selfmask.load_selfmask(str(tmp_path / "nope.pt"))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(common.UserError, match="cannot be read.*trainer file you trust.*docs"):
        selfmask.load_selfmask(str(bad))


def test_pos_embed_identity_at_native_grid_and_resized_elsewhere():
    vit = selfmask.ViT(dim=16, depth=1, n_heads=2)
    assert vit.pos_for(28, 28) is vit.pos_embed
    # 14 x 56 has 784 tokens like 28 x 28 but is a different grid: it must be resized.
    assert vit.pos_for(14, 56).shape == (1, 1 + 14 * 56, 16)
    assert not torch.equal(vit.pos_for(14, 56), vit.pos_embed)


def test_resize_matches_torchvision_int_resize():
    """ZUTIS resizes with torchvision's Resize(512) on a PIL image: same size rule, same pixels."""
    from torchvision.transforms import functional as TF
    rng = np.random.default_rng(0)
    for h, w in ((375, 500), (333, 517), (640, 427)):
        rgb = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        want = np.asarray(TF.resize(Image.fromarray(rgb), 512))
        got = selfmask.resize_shorter(rgb, 512, max_side=None)
        assert got.shape == want.shape and np.array_equal(got, want)


def test_worked_shapes_of_a_375x500_image():
    """375x500 -> 512x682 working size -> padded 512x688 -> 64x86 tokens -> masks 128x172 -> 375x500."""
    model = tiny_selfmask()
    x, ref, size = selfmask.prepare(np.zeros((375, 500, 3), np.uint8))
    assert x.shape == (3, 512, 682) and ref.shape == (512, 682, 3) and tuple(size) == (375, 500)
    out = model(x[None])
    assert out["mask_probs"].shape == (1, 3, 128, 172) and out["objectness"].shape == (1, 3)
    assert selfmask.coarse_masks(model, x[None]).shape == (1, 512, 682)


def test_coarse_masks_equal_full_upsample_then_argmax():
    """Upsampling only the chosen query must equal the official order (all queries x4, crop, argmax)."""
    model = tiny_selfmask()
    x = torch.randn(2, 3, 45, 61)
    got = selfmask.coarse_masks(model, x)
    out = model(x)
    probs = torch.nn.functional.interpolate(out["mask_probs"], scale_factor=4, mode="bilinear", align_corners=False)
    probs = probs[:, :, :45, :61]
    best = out["objectness"].argmax(1)
    want = torch.stack([probs[b, best[b]] for b in range(2)]) > 0.5
    assert got.shape == (2, 45, 61) and torch.equal(got, want)


def test_protocol_returns_original_size_for_odd_gray_rgba_and_1xN():
    model = tiny_selfmask()
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (333, 517, 3), dtype=np.uint8)
    cases = [rgb, Image.fromarray(rgb).convert("L"), Image.fromarray(rgb).convert("RGBA"),
             np.dstack([rgb, np.full((333, 517), 255, np.uint8)]), rgb[:, :, 0],
             rng.integers(0, 255, (1, 517, 3), dtype=np.uint8), rng.integers(0, 255, (301, 1, 3), dtype=np.uint8)]
    for im in cases:
        H, W = np.asarray(im).shape[:2]
        m = selfmask.predict_saliency(model, im, short_side=64, max_side=256)
        assert m.shape == (H, W) and m.dtype == bool
    with pytest.raises(ValueError):
        selfmask.to_rgb(np.zeros((4, 4, 2), np.uint8))
    gray = rgb[:, :, 0]  # a 16-bit grayscale photo reads as its 8-bit scale, not clipped to white
    sixteen = Image.fromarray(gray.astype(np.uint16) * 257)
    assert sixteen.mode.startswith("I") and np.array_equal(selfmask.to_rgb(sixteen), np.dstack([gray] * 3))


def official_guide(x):
    """The official conversion (zutis utils/utils.py `convert_tensor_to_pil_image`) from its definition,
    in numpy float32: x * std + mean, times 255, clipped, truncated to uint8, channels last."""
    t = x.numpy().astype(np.float32) * np.array(common.IMAGENET_STD, np.float32)[:, None, None]
    t = t + np.array(common.IMAGENET_MEAN, np.float32)[:, None, None]
    t = np.clip(t * np.float32(255), 0, 255)
    return t.astype(np.uint8).transpose(1, 2, 0)


def test_solver_guide_is_the_official_tensor_to_image_conversion():
    rng = np.random.default_rng(3)
    images = [textured_scene(rng, 61, 83)[0], textured_scene(rng, 90, 40)[0],
              rng.integers(0, 256, (37, 53, 3), dtype=np.uint8), np.full((20, 30, 3), 255, np.uint8),
              np.zeros((25, 25, 3), np.uint8), Image.fromarray(textured_scene(rng, 50, 70)[0]).convert("L")]
    below = 0
    for im in images:
        x, guide, _ = selfmask.prepare(im, short_side=48)
        small = selfmask.resize_shorter(selfmask.to_rgb(im), 48)
        assert guide.dtype == np.uint8 and guide.shape == small.shape == (*x.shape[1:], 3)
        assert np.array_equal(guide, official_guide(x))
        diff = small.astype(int) - guide  # truncation: the resized value or one level below it
        assert diff.min() >= 0 and diff.max() <= 1
        below += int(diff.sum())
    assert below > 0  # the guide is not the resized image


def test_mask_is_unchanged_by_padding_and_batching():
    """Working sizes 42x63 and 58x42 (no side a multiple of 8, so the encoder pads): each image's
    end-to-end mask alone equals its mask from a same-size batch, and the coarse masks equal those of
    the input zero-padded by hand to a multiple of 8 and cropped back."""
    model = tiny_selfmask(1)
    rng = np.random.default_rng(4)
    for H, W in [(50, 75), (70, 50)]:
        imgs = [textured_scene(rng, H, W)[0] for _ in range(3)]
        prepped = [selfmask.prepare(im, short_side=42) for im in imgs]
        h, w = prepped[0][0].shape[1:]
        assert h % 8 and w % 8  # padding happens
        single = [selfmask.predict_saliency(model, im, short_side=42) for im in imgs]
        coarse = selfmask.coarse_masks(model, torch.stack([p[0] for p in prepped]))
        padded = torch.nn.functional.pad(torch.stack([p[0] for p in prepped]), (0, -w % 8, 0, -h % 8))
        assert torch.equal(selfmask.coarse_masks(model, padded)[:, :h, :w], coarse)
        for (x, guide, size), c, m in zip(prepped, coarse, single):
            assert np.array_equal(selfmask.finish_mask(c, guide, size), m) and m.shape == (H, W)
        assert 0 < np.mean(single) < 1


# ----------------------------------------------------------------------------- bilateral solver

RGB_TO_YUV = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])


def reference_bilateral_solve(ref, target, confidence=0.999, ss=16, sl=16, sc=8, lam=256.0,
                              A_diag_min=1e-5, tol=1e-5, maxiter=25, bistoch=10):
    """The grid solver written the way the algorithm reads (a pixels x vertices splat matrix S,
    a blur matrix B = 2*dim*I + neighbours, A = lam (Dm - Dn B Dn) + diag(S w)) with a general
    np.unique hash: the oracle and the 'before' timing for selfmask.bilateral_solve."""
    from scipy.sparse import csr_matrix, diags, eye
    from scipy.sparse.linalg import cg
    H, W = target.shape
    # Same summation order as selfmask.py: a pixel sitting exactly on a bucket edge (e.g. grey,
    # U = 128) flips bucket with the last bit of the sum, so a BLAS dot here would differ in a few pixels.
    rgb = ref.astype(np.float64)
    yuv = np.stack([sum(rgb[..., c] * RGB_TO_YUV[k, c] for c in range(3)) for k in range(3)], -1) + [0, 128, 128]
    yy, xx = np.mgrid[:H, :W]
    c = np.dstack([xx // ss, yy // ss, (yuv[..., 0] / sl).astype(int), (yuv[..., 1] / sc).astype(int),
                   (yuv[..., 2] / sc).astype(int)]).reshape(-1, 5)
    c = c - c.min(0)
    stride = np.concatenate([[1], np.cumprod(c.max(0)[:-1] + 2)])
    verts, inv = np.unique((c + 1) @ stride, return_inverse=True)
    nv, npx = len(verts), H * W
    S = csr_matrix((np.ones(npx), (inv, np.arange(npx))), shape=(nv, npx))
    B = 10 * eye(nv, format="csr")
    for s in stride:
        for off in (-s, s):
            j = np.minimum(np.searchsorted(verts, verts + off), nv - 1)
            ok = verts[j] == verts + off
            B = B + csr_matrix((np.ones(ok.sum()), (np.nonzero(ok)[0], j[ok])), shape=(nv, nv))
    m, n = S @ np.ones(npx), np.ones(nv)
    for _ in range(bistoch):
        n = np.sqrt(n * m / (B @ n))
    m = n * (B @ n)
    w = confidence * np.ones(npx)
    A = lam * (diags(m) - diags(n) @ B @ diags(n)) + diags(S @ w)
    b = S @ (target.reshape(-1) * w)
    y, _ = cg(A, b, x0=b / (S @ w), M=diags(1 / np.maximum(A.diagonal(), A_diag_min)), rtol=tol, maxiter=maxiter)
    return (S.T @ y).reshape(H, W)


def edge_scene(H=96, W=128, seed=0):
    """Sharp coloured edge (a disc), textured + noisy; the input mask is blurred and shifted."""
    from scipy.ndimage import gaussian_filter, shift
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:H, :W]
    truth = (yy - H / 2) ** 2 + (xx - W / 2) ** 2 < (H / 3) ** 2
    img = np.where(truth[..., None], [210, 60, 40], [40, 110, 200]) + rng.normal(0, 6, (H, W, 3))
    img = np.clip(img + 15 * np.sin(xx / 5)[..., None], 0, 255).astype(np.uint8)
    rough = shift(gaussian_filter(truth.astype(float), 4), (5, -6), order=1)
    return img, truth, rough


def test_bilateral_solver_snaps_a_blurred_offset_mask_to_the_edge():
    img, truth, rough = edge_scene()
    out = selfmask.bilateral_solve(img, rough)
    assert out.shape == truth.shape
    before, after = iou(rough > 0.5, truth), iou(out > 0.5, truth)
    assert after > before + 0.05, (before, after)


def test_fast_bilateral_solver_equals_the_reference_form():
    img, _, rough = edge_scene(seed=1)
    np.testing.assert_allclose(selfmask.bilateral_solve(img, rough), reference_bilateral_solve(img, rough),
                               atol=1e-8)


# ----------------------------------------------------------------------------- fallbacks

def test_boundary_saliency_on_textured_objects():
    rng = np.random.default_rng(0)
    scores = []
    for i in range(12):
        img, truth = textured_scene(rng, 64, 64 if i % 2 else 96)
        m = pseudo_label.boundary_saliency(img, bilateral=False)
        assert m.shape == truth.shape and m.dtype == bool
        scores.append(iou(m, truth))
    assert np.mean(scores) > 0.8, scores


def test_boundary_fallback_gives_an_empty_mask_on_a_blank_image():
    assert not pseudo_label.boundary_saliency(np.full((40, 50, 3), 128, np.uint8)).any()


# ----------------------------------------------------------------------------- pseudo_label.py

def make_archive(root, n=8, sizes=((48, 64),)):
    """Generated images under root/imgs (PNG and JPEG, a subfolder, one unreadable file), an
    archive listing some images under two categories -> (archive path, {rel path: truth mask})."""
    rng = np.random.default_rng(0)
    images, truths = {}, {}
    for i in range(n):
        img, truth = textured_scene(rng, *sizes[i % len(sizes)])
        rel = f"sub/im{i}.jpg" if i % 2 else f"im{i}.png"
        images[rel], truths[rel] = img, truth
    images["broken.jpg"] = b"\xff\xd8 not really a jpeg"
    rels = list(images)  # overlapping categories: shared images
    arc_path, _ = save_archive(root, {"a": rels[: n // 2 + 2], "b": rels[n // 2:]}, images, index_dir="imgs",
                               quality=75)
    return arc_path, truths


def run_pseudo_label(monkeypatch, *argv):
    monkeypatch.setattr(sys, "argv", ["pseudo_label.py", "--num_workers", "0", "--device", "cpu", *argv])
    pseudo_label.main()


def test_pseudo_label_writes_resumes_and_redoes_broken_masks(tmp_path, monkeypatch, capsys):
    arc_path, truths = make_archive(str(tmp_path))
    out = str(tmp_path / "masks")
    run_pseudo_label(monkeypatch, "--archive", arc_path, "--out_dir", out, "--saliency", "boundary")
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["masks_written"] == len(truths) and summary["unreadable_skipped"] == 1
    assert "broken.jpg" in open(os.path.join(out, "skipped.txt")).read()
    assert os.path.isfile(os.path.join(out, "contact_sheet.jpg"))
    paths = {rel: os.path.join(out, "0_imgs", os.path.splitext(rel)[0] + ".png") for rel in truths}
    for rel, p in paths.items():
        m = np.asarray(Image.open(p))
        assert m.shape == truths[rel].shape and m.dtype == np.uint8 and set(np.unique(m)) <= {0, 255}
    assert np.mean([iou(np.asarray(Image.open(paths[r])) > 0, truths[r]) for r in truths]) > 0.7
    # Simulate a crash: one PNG truncated mid-write, one of the wrong size, one missing.
    names = sorted(paths)
    data = open(paths[names[0]], "rb").read()
    open(paths[names[0]], "wb").write(data[: len(data) // 2])
    Image.new("L", (5, 5)).save(paths[names[1]])
    os.remove(paths[names[2]])
    for p in paths.values():
        if os.path.exists(p):
            os.utime(p, (1, 1))  # mark: a rewritten file gets a fresh mtime
    run_pseudo_label(monkeypatch, "--archive", arc_path, "--out_dir", out, "--saliency", "boundary")
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["masks_written"] == 3 and summary["already_done"] == len(truths) - 3
    redone = {r for r, p in paths.items() if os.path.getmtime(p) > 1}
    assert redone == set(names[:3])
    assert Image.open(paths[names[1]]).size == truths[names[1]].shape[::-1]
    # A rerun with another mask setting would mix two kinds of masks in one folder: refused, nothing written.
    before = {p: os.path.getmtime(p) for p in paths.values()}
    with pytest.raises(common.UserError, match=r"other settings: --bilateral False \(masks: True\)"):
        run_pseudo_label(monkeypatch, "--archive", arc_path, "--out_dir", out, "--saliency", "boundary", "--no-bilateral")
    assert {p: os.path.getmtime(p) for p in paths.values()} == before


def test_pseudo_label_selfmask_path_and_missing_checkpoint(tmp_path, monkeypatch, released_files):
    arc_path, truths = make_archive(str(tmp_path), n=7, sizes=((48, 64), (40, 56), (48, 64), (64, 40)))
    out = str(tmp_path / "masks")
    # The released architecture with random weights, at a tiny working size so it runs in a second.
    for dtype in ("float32", "bfloat16"):  # bf16 autocast runs on the CPU too
        run_pseudo_label(monkeypatch, "--archive", arc_path, "--out_dir", f"{out}_{dtype}", "--selfmask",
                         released_files[1], "--short_side", "24", "--batch_size", "2", "--dtype", dtype)
    ious = []
    for rel, truth in truths.items():
        m32, m16 = (Image.open(os.path.join(f"{out}_{d}", "0_imgs", os.path.splitext(rel)[0] + ".png"))
                    for d in ("float32", "bfloat16"))
        assert m16.mode == "L" and m16.size == truth.shape[::-1]
        a, b = np.asarray(m32) > 127, np.asarray(m16) > 127
        ious.append((a & b).sum() / max((a | b).sum(), 1))
    assert np.mean(ious) > 0.8, ious  # loose: bench.py measures the agreement at the working size
    with pytest.raises(common.UserError, match="float16 runs on CUDA only"):
        run_pseudo_label(monkeypatch, "--archive", arc_path, "--out_dir", out, "--dtype", "float16")
    with pytest.raises(common.UserError, match="--saliency boundary"):
        run_pseudo_label(monkeypatch, "--archive", arc_path, "--out_dir", out + "2", "--selfmask",
                         str(tmp_path / "missing.pt"))


def script(*argv, **kw):
    return subprocess.run([sys.executable, "pseudo_label.py", *argv], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), **kw)


def test_non_json_archive_is_one_error_line(tmp_path):
    bad = tmp_path / "archive.json"
    bad.write_bytes(b"\x00\x01 not json")
    r = script("--archive", str(bad), "--out_dir", str(tmp_path / "m"), "--saliency", "boundary", "--device", "cpu")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and r.stderr.startswith("error: archive"), r.stderr


def descendants(pid):
    """Live (not zombie) descendant processes of `pid`, from /proc."""
    children = {}
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            state, ppid = open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[:2]
        except (OSError, ValueError):
            continue
        if state != "Z":
            children.setdefault(int(ppid), []).append(int(d))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out, todo = out + kids, todo + kids
    return out


def alive(pid):
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def mask_names(out):
    """Finished masks only: a `.tmp_*` file is a write in progress (renamed away at any moment)."""
    return [os.path.relpath(os.path.join(d, f), out) for d, _, files in os.walk(out) for f in files
            if f.endswith(".png") and not f.startswith(".tmp_")]


def masks_of(out):
    return {n: np.asarray(Image.open(os.path.join(out, n))) for n in mask_names(out)}


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads the process tree from /proc")
def test_sigkill_leaves_no_worker_no_temp_file_and_the_rerun_matches(tmp_path, monkeypatch):
    """Kill -9 the main process while DataLoader workers and the solver pool are busy: every worker
    dies with it; the rerun removes the stale temp file and ends with the masks of an uninterrupted run."""
    arc_path, truths = make_archive(str(tmp_path), n=120, sizes=((96, 128),))
    out, ref = str(tmp_path / "masks"), str(tmp_path / "ref")
    argv = ["--archive", arc_path, "--out_dir", out, "--saliency", "boundary", "--device", "cpu", "--contact_sheet", "0"]
    p = subprocess.Popen([sys.executable, "pseudo_label.py", *argv, "--num_workers", "2", "--post_workers", "1"],
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None and len(mask_names(out)) < 3:
        time.sleep(0.05)
    workers = descendants(p.pid)
    assert p.poll() is None and len(mask_names(out)) < len(truths), "the run ended before it could be killed"
    assert len(workers) >= 3, workers  # 2 DataLoader workers + the solver pool
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    deadline = time.time() + 10
    while time.time() < deadline and any(map(alive, workers)):
        time.sleep(0.1)
    assert not any(map(alive, workers)), [w for w in workers if alive(w)]
    stale = os.path.join(out, "0_imgs", ".tmp_killed.png")
    open(stale, "wb").write(b"half a png")  # what a write killed mid-way leaves
    r = script(*argv, "--num_workers", "2")
    assert r.returncode == 0, r.stderr
    assert not [f for _, _, fs in os.walk(out) for f in fs if f.startswith(".tmp_")]
    run_pseudo_label(monkeypatch, "--archive", arc_path, "--out_dir", ref, "--saliency", "boundary")
    got, want = masks_of(out), masks_of(ref)
    assert len(want) == len(truths) and sorted(got) == sorted(want)
    assert all(np.array_equal(got[k], want[k]) for k in want)
