"""Tests of build_archive.py and import_official.py (CPU, tiny random CLIP, generated images).

    python -m pytest -q tests/test_archive.py
"""
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import build_archive
import categories
import clip_model
import common
import import_official
import topk
from topk import iter_blocks, topk_stream

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- helpers

def brute_topk(T, E, k):
    """Reference: full score matrix, per row a lexsort on (score desc, index asc)."""
    S = (T.double() @ E.double().t()).float().numpy()  # exact for the small integers used below
    order = [np.lexsort((np.arange(S.shape[1]), -row))[:k] for row in S]
    return np.stack([S[r, o] for r, o in enumerate(order)]), np.stack(order)


def make_images(root, n=12, seed=0):
    """n small random images in a nested tree, two byte-identical copies (tied scores), and three
    broken files: a truncated JPEG, a zero-byte file and a text file with an image extension."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        sub = os.path.join(root, "a" if i % 2 else "b/c")
        os.makedirs(sub, exist_ok=True)
        arr = rng.integers(0, 255, (24 + 3 * i, 40, 3), dtype=np.uint8)
        Image.fromarray(arr).save(os.path.join(sub, f"im{i:02d}.{'JPG' if i % 3 else 'png'}"))
    good = open(os.path.join(root, "a", "im01.JPG"), "rb").read()
    open(os.path.join(root, "a", "copy_of_im01.jpg"), "wb").write(good)
    open(os.path.join(root, "a", "truncated.jpeg"), "wb").write(good[:200])
    open(os.path.join(root, "a", "zero.jpg"), "wb").close()
    open(os.path.join(root, "b", "notes.png"), "w").write("not an image")


def run_build(tiny_clip_path, imgs, out, *extra):
    build_archive.main(["--arch", tiny_clip_path, "--index_dirs", str(imgs), "--categories", "cat,dog,red car",
                        "--k", "4", "--out_dir", str(out), "--device", "cpu", "--chunk_size", "5",
                        "--batch_size", "3", "--workers", "0", "--sheet_size", "4", *extra])


# ----------------------------------------------------------------------------- top-k

PREFILTERS = ["float32", "bfloat16"]  # bfloat16 runs everywhere: emulated where the CPU lacks it


@pytest.mark.parametrize("prefilter", PREFILTERS)
@pytest.mark.parametrize("N,K,k,B", [(50, 3, 7, 8), (50, 3, 60, 8), (97, 5, 10, 13), (300, 4, 5, 150),
                                     (300, 4, 20, 300), (260, 3, 9, 1), (1000, 6, 30, 256), (5, 2, 5, 2)])
def test_topk_matches_bruteforce(N, K, k, B, prefilter):
    rng = np.random.default_rng(N * 7 + B)
    # small integer vectors: many exactly equal scores, so the tie rule is exercised everywhere
    E = rng.integers(-2, 3, (N, 4)).astype(np.float16)
    T = torch.from_numpy(rng.integers(-2, 3, (K, 4)).astype(np.float32))
    s, i = topk_stream(T, E, k, block_size=B, prefilter=prefilter)
    bs, bi = brute_topk(T, torch.from_numpy(E.astype(np.float32)), k)
    assert s.shape == (K, min(k, N)) and i.dtype == torch.long and s.dtype == torch.float32
    np.testing.assert_array_equal(i.numpy(), bi)
    np.testing.assert_array_equal(s.numpy(), bs)


@pytest.mark.parametrize("prefilter", PREFILTERS)
def test_topk_continuous_scores_and_block_reader(tmp_path, prefilter):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((777, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    path = str(tmp_path / "e.npy")
    common.save_npy(x.astype(np.float16), path)
    blocks = list(iter_blocks(path, 100))
    assert [b[0] for b in blocks] == list(range(0, 777, 100))
    np.testing.assert_array_equal(np.concatenate([b[1] for b in blocks]), np.load(path))
    T = torch.nn.functional.normalize(torch.randn(9, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    bs, bi = brute_topk(T, torch.from_numpy(np.load(path).astype(np.float32)), 50)
    for block in (64, 777, 1000):
        s, i = topk_stream(T, path, 50, block_size=block, prefilter=prefilter)
        np.testing.assert_array_equal(i.numpy(), bi)
        np.testing.assert_array_equal(s.numpy(), bs)


@pytest.mark.parametrize("prefilter", PREFILTERS)
def test_topk_adversarial_near_ties(prefilter):
    """Scores packed far closer than bf16 can tell apart around the k-th: copies of the k-th vector in
    other blocks (exact ties, decided by index), and vectors a few float16 steps away from it (scores
    within bf16 rounding of the threshold, ordered only by the exact sum)."""
    rng = np.random.default_rng(3)
    D, N, k = 64, 600, 40
    base = rng.standard_normal(D).astype(np.float32)
    base /= np.linalg.norm(base)
    E = np.tile(base, (N, 1))
    E[:, :8] += rng.integers(-3, 4, (N, 8)) * 2.0 ** -11  # a few float16 steps apart: near-ties
    E[rng.random(N) < 0.3] = E[17]  # duplicates of one row in every block
    E[::7] = rng.standard_normal((len(E[::7]), D)) * 0.1  # clearly below
    E = E.astype(np.float16)
    T = torch.from_numpy(np.stack([base, -base, base + 0.01]).astype(np.float32))
    bs, bi = brute_topk(T, torch.from_numpy(E.astype(np.float32)), k)
    full = (T.double() @ torch.from_numpy(E).double().t()).float().numpy()
    for c in (0, 2):  # adversarial: the cut splits a group of exact ties, all within bf16 rounding of each other
        assert (full[c] == bs[c, -1]).sum() > (bs[c] == bs[c, -1]).sum() > 1 and bs[c, 0] - bs[c, -1] < 2.0 ** -8
    for block in (1, 37, 64, 600):
        s, i = topk_stream(T, E, k, block_size=block, prefilter=prefilter)
        np.testing.assert_array_equal(i.numpy(), bi)
        np.testing.assert_array_equal(s.numpy(), bs)


@pytest.mark.parametrize("prefilter", PREFILTERS)
def test_topk_scores_are_rounded_once(prefilter):
    """The exact sum 1 + 2^-24 + 2^-60 rounds to 1 + 2^-23 in float32; a float64 sum first loses 2^-60,
    lands on the float32 midpoint and rounds to 1.0 (ties to even). Rows: 1.0, 1 + 2^-23, that sum."""
    T = torch.tensor([[1.0, 2.0 ** -24, 2.0 ** -60]])
    E = np.array([[1, 0, 0], [1, 2, 0], [1, 1, 1]], np.float16)
    s, i = topk_stream(T, E, 2, prefilter=prefilter)
    assert i.tolist() == [[1, 2]] and s.tolist() == [[1 + 2.0 ** -23] * 2]
    assert float((T.double() @ torch.from_numpy(E).double().t()).float()[0, 2]) == 1.0  # the double rounding
    assert topk.exact_f32([1.0, 2.0 ** -24, -2.0 ** -60], [1.0, 1.0, 1.0]) == np.float32(1.0)


def test_topk_checks_its_bound(monkeypatch):
    """With the error bound of the float32 product set to zero, the exact rescoring notices."""
    monkeypatch.setattr(topk, "gamma", lambda n, u: 0.0)
    E = np.random.default_rng(0).standard_normal((300, 32)).astype(np.float16)
    with pytest.raises(RuntimeError, match="outside its proven error bound"):
        topk_stream(torch.randn(4, 32), E, 10, prefilter="float32")


def test_prefilter_choice(monkeypatch):
    monkeypatch.setattr(common, "cpu_bf16_flags", lambda: {"avx512_bf16"})
    assert topk.prefilter_dtype("cpu") == torch.bfloat16 and topk.prefilter_dtype("cuda") == torch.bfloat16
    monkeypatch.setattr(common, "cpu_bf16_flags", lambda: set())
    assert topk.prefilter_dtype("cpu") == torch.float32 and topk.prefilter_dtype("cpu", "bfloat16") == torch.bfloat16
    s, i = topk_stream(torch.randn(2, 8), np.zeros((0, 8), np.float16), 5)
    assert s.shape == i.shape == (2, 0)


# ----------------------------------------------------------------------------- end to end

def test_build_skip_and_kill_resume(tiny_clip_path, tmp_path, capsys, monkeypatch):
    imgs = tmp_path / "imgs"
    make_images(str(imgs))
    run_build(tiny_clip_path, imgs, tmp_path / "out_a")
    out = capsys.readouterr().out
    assert "3 skipped" in out and "16 images listed, 13 embedded" in out

    # the same build, killed while writing its second chunk (the atomic write's temp file stays behind), then rerun
    out_b, st = tmp_path / "out_b", tmp_path / "out_b" / "embeddings" / "tiny_clip"
    save_chunk = build_archive.save_chunk

    def killed_after_one(store, c, *a):
        if c > 0:
            (st / f"{common.TMP_PREFIX}half_written.npz").write_bytes(b"half")
            raise KeyboardInterrupt
        save_chunk(store, c, *a)
    monkeypatch.setattr(build_archive, "save_chunk", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        run_build(tiny_clip_path, imgs, out_b)
    monkeypatch.setattr(build_archive, "save_chunk", save_chunk)
    assert (st / "chunk_000000.npz").exists() and not (st / "chunk_000001.npz").exists()
    assert not (st / "embeddings.npy").exists() and not (out_b / "archive.json").exists()
    mtime = os.stat(st / "chunk_000000.npz").st_mtime_ns
    run_build(tiny_clip_path, imgs, out_b)
    assert "11 images to embed (1 of 4 chunks on disk" in capsys.readouterr().out
    assert os.stat(st / "chunk_000000.npz").st_mtime_ns == mtime  # resumed, not recomputed
    assert not [f for _, _, fs in os.walk(out_b) for f in fs if f.startswith(common.TMP_PREFIX)]
    a, b = (open(p / "archive.json", "rb").read() for p in (tmp_path / "out_a", out_b))
    assert a == b
    assert (np.load(st / "embeddings.npy") == np.load(tmp_path / "out_a/embeddings/tiny_clip/embeddings.npy")).all()

    # the three broken files are reported, the run succeeded
    skipped = (out_b / "skipped.txt").read_text().splitlines()
    assert sorted(os.path.basename(line.split("\t")[0]) for line in skipped) == ["notes.png", "truncated.jpeg", "zero.jpg"]
    arc = common.load_archive(str(out_b / "archive.json"))
    assert arc["categories"] == ["background", "cat", "dog", "red car"] and list(arc["archive"]) == ["cat", "dog", "red car"]
    assert arc["index_dirs"] == [str(imgs)] and json.loads(a)["index_dirs"] == ["../imgs"]
    assert json.loads(a)["recipe"] == "zero-shot"
    paths = common.list_images(str(imgs))
    for name, entries in arc["archive"].items():
        assert len(entries) == 4
        assert all(os.path.isfile(common.image_path(arc, e)) for e in entries)
        key = [(-e["score"], paths.index(e["path"])) for e in entries]
        assert key == sorted(key)  # descending score, ties by lower index (the two identical images)
        assert (out_b / "contact_sheets" / f"{build_archive.safe_name(name)}.jpg").exists()
    # a second run reuses the finished store; another dtype does not mix into it
    run_build(tiny_clip_path, imgs, out_b)
    assert "already embedded" in capsys.readouterr().out
    assert open(out_b / "archive.json", "rb").read() == a
    with pytest.raises(common.UserError, match="another image list or dtype"):
        run_build(tiny_clip_path, imgs, out_b, "--dtype", "bfloat16")


def test_scores_match_clip(tiny_clip_path, tmp_path):
    """The archive's scores are CLIP cosines of the preprocessed image and the prompt ensemble."""
    imgs = tmp_path / "imgs"
    make_images(str(imgs), n=6)
    run_build(tiny_clip_path, imgs, tmp_path / "out", "--workers", "2")
    arc = common.load_archive(str(tmp_path / "out" / "archive.json"))
    model, pre = clip_model.load(tiny_clip_path)
    e = arc["archive"]["dog"][0]
    with torch.no_grad():
        img = torch.nn.functional.normalize(model.encode_image(pre(common.load_rgb(common.image_path(arc, e)))[None]), dim=-1)
    txt = clip_model.text_embeddings(model, ["dog"], categories.TEMPLATES)
    assert abs(float(img @ txt.t()) - e["score"]) < 2e-3  # float16 storage of the image embedding


def test_dtype_bfloat16_agrees_and_float16_is_cuda_only(tiny_clip_path, tmp_path):
    """--dtype bfloat16 embeds under autocast and records its dtype; its archive is nearly the fp32 one
    (loosely here: bench.py measures the agreement at real sizes). float16 on a CPU is a one-line error."""
    imgs = tmp_path / "imgs"
    make_images(str(imgs), n=12)
    run_build(tiny_clip_path, imgs, tmp_path / "f32")
    run_build(tiny_clip_path, imgs, tmp_path / "bf16", "--dtype", "bfloat16")
    assert json.load(open(tmp_path / "bf16/embeddings/tiny_clip/paths.json"))["dtype"] == "bfloat16"
    a, b = (common.load_archive(str(tmp_path / d / "archive.json"))["archive"] for d in ("f32", "bf16"))
    for name in a:
        sa, sb = ({e["path"]: e["score"] for e in x[name]} for x in (a, b))
        assert len(sa.keys() & sb.keys()) >= 3  # of 4
        assert all(abs(sa[p] - sb[p]) < 0.02 for p in sa.keys() & sb.keys())
    with pytest.raises(common.UserError, match="float16 runs on CUDA only"):
        run_build(tiny_clip_path, imgs, tmp_path / "f16", "--dtype", "float16")


@pytest.mark.slow
def test_torchrun_two_ranks_match_one_process(tiny_clip_path, tmp_path):
    """Under torchrun each rank embeds chunks rank, rank + world, ...; rank 0 merges and retrieves.
    The archive must equal the single-process one."""
    imgs = tmp_path / "imgs"
    make_images(str(imgs), n=8)
    run_build(tiny_clip_path, imgs, tmp_path / "one")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(HERE, "build_archive.py"), "--arch", tiny_clip_path, "--index_dirs", str(imgs),
           "--categories", "cat,dog,red car", "--k", "4", "--out_dir", str(tmp_path / "two"), "--device", "cpu",
           "--chunk_size", "5", "--batch_size", "3", "--workers", "0", "--sheet_size", "4"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "two/embeddings/tiny_clip/chunk_000001.npz").exists()  # rank 1's chunk
    assert (tmp_path / "one/archive.json").read_bytes() == (tmp_path / "two/archive.json").read_bytes()


# ----------------------------------------------------------------------------- pickles

class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_restricted_unpickler(tmp_path):
    table = {"n01440764_1.JPEG": torch.randn(8), "pass_img.jpg": torch.randn(8).half(),
             "a_view.jpg": torch.randn(3, 8)[1]}  # a view: storage offset 8
    for name, dump in [("plain.pkl", lambda obj, f: pickle.dump(obj, f)), ("saved.pt", torch.save)]:
        with open(tmp_path / name, "wb") as f:
            dump(table, f)
        got = import_official.load_embedding_pickle(str(tmp_path / name))
        assert sorted(got) == sorted(table) and all(torch.equal(got[n], table[n].float()) for n in table)
    marker = tmp_path / "pwned"
    for name, dump in [("evil.pkl", lambda obj, f: pickle.dump(obj, f)), ("evil.pt", torch.save)]:
        with open(tmp_path / name, "wb") as f:
            dump({"a.jpg": torch.randn(8), "b.jpg": Evil(marker)}, f)
        with pytest.raises(common.UserError, match="system"):
            import_official.load_embedding_pickle(str(tmp_path / name))
        assert not marker.exists()
    with pytest.raises(common.UserError, match="posix.system|os.system"):
        import_official.TensorOnlyUnpickler(open(tmp_path / "evil.pkl", "rb"), "evil.pkl").load()


def test_import_embeddings(tiny_clip_path, tmp_path, capsys):
    imnet, pas = tmp_path / "ImageNet2012" / "train", tmp_path / "pass" / "images"
    rng = np.random.default_rng(0)
    files = [imnet / "n01440764" / "n01440764_1.JPEG", imnet / "n01443537" / "n01443537_2.JPEG", pas / "p1.jpg", pas / "p2.jpg"]
    for f in files:
        os.makedirs(f.parent, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(f)
    emb = torch.nn.functional.normalize(torch.randn(5, 32), dim=-1)  # tiny CLIP: embed_dim 32
    with open(tmp_path / "imnet.pkl", "wb") as f:
        pickle.dump({"n01440764_1.JPEG": emb[0], "n01443537_2.JPEG": emb[1], "n09999999_3.JPEG": emb[4]}, f)
    with open(tmp_path / "pass.pkl", "wb") as f:
        pickle.dump({"p1.jpg": emb[2], "p2.jpg": emb[3]}, f)
    build_archive.main(["--arch", tiny_clip_path, "--index_dirs", str(imnet), str(pas), "--categories", "cat,dog",
                        "--k", "3", "--out_dir", str(tmp_path / "out"), "--device", "cpu", "--sheet_size", "0",
                        "--import_embeddings", str(tmp_path / "imnet.pkl"), str(tmp_path / "pass.pkl")])
    assert "1 missing" in capsys.readouterr().out
    arc = common.load_archive(str(tmp_path / "out" / "archive.json"))
    got = {(e["dir"], e["path"]) for e in arc["archive"]["cat"]} | {(e["dir"], e["path"]) for e in arc["archive"]["dog"]}
    assert got <= {(0, "n01440764/n01440764_1.JPEG"), (0, "n01443537/n01443537_2.JPEG"), (1, "p1.jpg"), (1, "p2.jpg")}
    assert "n09999999_3.JPEG" in (tmp_path / "out" / "skipped.txt").read_text()


def test_import_archive(tmp_path, capsys):
    new = tmp_path / "data" / "ImageNet2012" / "train"
    for rel in ["n01440764/n01440764_1.JPEG", "n01440764/n01440764_2.JPEG"]:
        os.makedirs(new / os.path.dirname(rel), exist_ok=True)
        Image.new("RGB", (8, 8)).save(new / rel)
    old = "/users/someone/datasets/ImageNet2012/train"
    official = {"tench": [f"{old}/n01440764/n01440764_2.JPEG", f"{old}/n01440764/n01440764_1.JPEG"],
                "goldfish": [f"{old}/n01440764/n01440764_1.JPEG", f"{old}/n01443537/n01443537_9.JPEG"]}
    (tmp_path / "official.json").write_text(json.dumps(official))
    out = tmp_path / "out"
    build_archive.main(["--import_archive", str(tmp_path / "official.json"), "--remap", f"{old}={new}",
                        "--out_dir", str(out), "--sheet_size", "2"])
    assert "3 of 4 paths found, 1 missing" in capsys.readouterr().out
    arc = common.load_archive(str(out / "archive.json"))
    assert arc["categories"] == ["background", "tench", "goldfish"] and arc["index_dirs"] == [str(new)]
    assert [e["path"] for e in arc["archive"]["tench"]] == ["n01440764/n01440764_2.JPEG", "n01440764/n01440764_1.JPEG"]
    assert "n01443537_9.JPEG" in (out / "skipped.txt").read_text()
    with pytest.raises(common.UserError, match="--remap"):
        build_archive.main(["--import_archive", str(tmp_path / "official.json"), "--out_dir", str(out)])


# ----------------------------------------------------------------------------- user errors

CASES = {  # case: (arguments, what stderr says)
    "missing_dir": (["--index_dirs", "nope"], "Expected layout"),
    "empty_dir": (["--index_dirs", "empty", "--arch", "unused.pt"], "holds no images"),
    "unknown_categories": (["--index_dirs", "empty", "--categories", "vocc"], "unknown category list"),
    "no_pass_for_voc": ([], "the official index of the zero-shot recipe is data/ImageNet2012/train + data/pass/images"),
    "not_json": (["--import_archive", "empty/readme.txt"], "not valid JSON"),
    "training_ckpt_as_arch": (["--index_dirs", "data/ImageNet2012/train", "--arch", "ckpt.pt"], "evaluate.py --ckpt"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_user_errors_are_one_line(case, tmp_path):
    os.makedirs(tmp_path / "empty" / "sub")
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    os.makedirs(tmp_path / "data" / "ImageNet2012" / "train" / "n01440764")
    Image.new("RGB", (8, 8)).save(tmp_path / "data" / "ImageNet2012" / "train" / "n01440764" / "n01440764_1.JPEG")
    torch.save({"model": {}, "config": {"arch": "ViT-B/16"}}, tmp_path / "ckpt.pt")
    args, says = CASES[case]
    r = subprocess.run([sys.executable, os.path.join(HERE, "build_archive.py"), *args, "--out_dir", "o"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "Traceback" not in r.stderr and says in r.stderr, r.stderr


@pytest.mark.parametrize("given", ["name", "file", "archive"])
def test_one_recipe_rule(tmp_path, monkeypatch, capsys, given):
    """ImageNet-S919 by its built-in name, as a file (shuffled, no background line) or as an archive's list:
    build_archive.py and train.py take the recipe from the content alike (ImageNet train only, 80k
    iterations, ignore id 1000), print it and record it."""
    import train
    monkeypatch.chdir(tmp_path)
    os.makedirs("data/ImageNet2012/train/n01440764")
    Image.new("RGB", (8, 8)).save("data/ImageNet2012/train/n01440764/n01440764_1.JPEG")
    names = categories.get_categories("imagenet_s919")
    shuffled = list(np.random.default_rng(0).permutation(names[1:]))
    common.save_json({"index_dirs": [], "categories": names, "archive": {}}, "arc.json")
    open("s919.txt", "w").write("\n".join(shuffled) + "\n")
    spec = {"name": "imagenet_s919", "file": "s919.txt", "archive": None}[given]
    with pytest.raises(common.UserError, match="missing_clip.pt"):  # stops at the model, after choosing the folders
        build_archive.main(["--categories", spec or "s919.txt", "--arch", "missing_clip.pt", "--device", "cpu"])
    assert "recipe: imagenet_s919 (from the category list's content); index dirs: the recipe's, " \
           "data/ImageNet2012/train\n" in capsys.readouterr().out
    cfg = train.make_config(train.parse_args(["--archive", "arc.json"] + (["--categories", spec] if spec else [])))
    assert (cfg["recipe"], cfg["iters"], cfg["ignore_index"]) == ("imagenet_s919", 80000, 1000)
    assert categories.recipe(shuffled) == categories.recipe("imagenet_s919") == \
        {"name": "imagenet_s919", "index_dirs": ["data/ImageNet2012/train"], "iters": 80000, "ignore_index": 1000}


def test_recipe_of_other_lists():
    """Any other list is zero-shot transfer, a subset of ImageNet-S919 included; more than 255 classes
    move the ignore id off the label ids."""
    zero = {"name": "zero-shot", "index_dirs": ["data/ImageNet2012/train", "data/pass/images"], "iters": 20000,
            "ignore_index": 255}
    assert categories.recipe("voc") == categories.recipe(categories.VOC[1:]) == zero
    assert categories.recipe(categories.IMAGENET_S919[:50]) == zero
    assert categories.recipe(categories.IMAGENET_S919[:-1])["name"] == "zero-shot"
    assert [categories.recipe([f"c{i}" for i in range(n)])["ignore_index"] for n in (254, 255, 999, 1000)] == \
        [255, 1000, 1000, 1001]
