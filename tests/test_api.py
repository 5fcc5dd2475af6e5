"""Tests for the Python entry (evaluate.load, Segmenter.segment / draw) on real photographs from
skimage.data, for --dtype, and for photos as people have them (common.load_rgb and evaluate.py --images
on every kind of file a folder of photos holds)."""
import io
import json
import os
import re

import numpy as np
import pytest
import skimage.data as skdata  # real photographs (a test dependency: requirements-test.txt)
import torch
from PIL import Image, ImageOps

import common
import evaluate
import model
from common import UserError
from test_evaluate import cli_error, run_main, tiny_ckpt  # noqa: F401 (a fixture)
from test_model import tiny_official_sd

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python_blocks():
    """The ```python blocks that call evaluate.load in the README and docs/evaluate.md: they run as written."""
    blocks = []
    for doc in ("README.md", "docs/evaluate.md"):
        text = open(os.path.join(HERE, doc), encoding="utf-8").read()
        blocks += [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "evaluate.load(" in b]
    return blocks


def test_python_entry_as_documented(tiny_clip_path, tmp_path, monkeypatch):
    """The documented five lines, verbatim, with official:coco_vit_b_16 served from a local tiny file (its
    download replaced as in test_model) on a real photograph."""
    blocks = python_blocks()
    assert blocks and all(b == blocks[0] for b in blocks)  # README and docs show the same lines
    path = tmp_path / "tiny_official.pt"
    torch.save(tiny_official_sd(), path)
    monkeypatch.setattr(model.downloads, "download", lambda url, root, **kw: str(path))
    monkeypatch.setitem(model.OFFICIAL, "coco_vit_b_16", ("https://example.invalid/x.pt", round(path.stat().st_size / 1e6, 1),
                                                      tiny_clip_path, "coco"))
    Image.fromarray(skdata.chelsea()).save(tmp_path / "photo.jpg", quality=95)  # a real cat, 300 x 451
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(blocks[0], scope)
    out, seg = scope["out"], scope["seg"]
    assert out["names"] == ["background", "cat", "dog", "red bicycle"] and seg.categories == out["names"]
    assert out["semantic"].shape == (300, 451) and out["semantic"].dtype == torch.long and out["semantic"].max() <= 3
    n = len(out["labels"])
    assert out["masks"].shape == (n, 300, 451) and out["masks"].dtype == torch.bool and out["scores"].shape == (n,)
    assert all(1 <= lab <= 3 for lab in out["labels"].tolist())
    assert torch.equal(out["scores"], out["scores"].sort(descending=True).values)
    drawn = Image.open(tmp_path / "overlay.png")
    assert drawn.mode == "RGB" and drawn.height > 300 and drawn.width == 3 * (451 + 4)  # three panels, 4 px apart


def test_python_entry_maskclip_and_inputs(tiny_clip_path, tiny_ckpt):  # noqa: F811
    seg = evaluate.load(f"maskclip:{tiny_clip_path}", classes="person,coffee cup", device="cpu")
    photo = skdata.coffee()[::2, ::2].copy()  # 200 x 300 uint8
    a, b = seg.segment(photo), seg.segment(Image.fromarray(photo))
    assert a["names"] == ["background", "person", "coffee cup"] and torch.equal(a["semantic"], b["semantic"])
    assert a["semantic"].shape == (200, 300) and torch.equal(a["masks"], b["masks"])
    gray = seg.segment(photo[..., 0])  # a uint8 [H, W] array is grayscale
    assert gray["semantic"].shape == (200, 300)
    assert isinstance(seg.draw(photo, a), Image.Image)
    seg.set_categories(["background", "cup"])
    assert seg.segment(photo, instances=False)["names"] == ["background", "cup"]
    with pytest.raises(ValueError, match="uint8"):
        seg.segment(photo.astype(np.float32))
    with pytest.raises(TypeError, match="not temperature"):
        evaluate.load(tiny_ckpt, device="cpu", temperature=2)
    with pytest.raises(UserError, match="--nms must be one of"):
        evaluate.load(tiny_ckpt, device="cpu", nms="soft")
    z = evaluate.load(tiny_ckpt, device="cpu", nms="none", max_size=128)
    assert z.kw["nms"] == "none" and z.max_size == 128 and z.categories == ["background", "person", "dog"]
    assert z.segment(photo)["semantic"].shape == (200, 300)  # resized to 128 for the network, labels at full size


# ----------------------------------------------------------------------------- --dtype

def test_bfloat16_runs_the_networks_only_and_agrees(tiny_ckpt, tiny_clip_path, monkeypatch, capsys):  # noqa: F811
    photo = skdata.astronaut()[::4, ::4].copy()  # 128 x 128
    f32, b16 = evaluate.load(tiny_ckpt, device="cpu"), evaluate.load(tiny_ckpt, device="cpu", dtype="bfloat16")
    seen = []
    for part in (b16.model.encoder.conv1, b16.model.ffn1):  # the encoder's patch conv, the decoder's input MLP
        part.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    p32, p16 = f32.segment(photo), b16.segment(photo)
    assert seen == [torch.bfloat16] * 2  # the networks ran in bf16 ...
    assert p16["semantic"].dtype == torch.long and p16["scores"].dtype == torch.float32  # ... the rules in fp32
    assert (p16["semantic"] == p32["semantic"]).float().mean() > 0.8  # loosely; bench.py measures the real figures
    m32, m16 = (evaluate.load(f"maskclip:{tiny_clip_path}", classes="person,rocket", device="cpu", dtype=d) for d in ("float32", "bfloat16"))
    assert (m16.segment(photo)["semantic"] == m32.segment(photo)["semantic"]).float().mean() > 0.8
    with pytest.raises(UserError, match="CUDA only"):
        evaluate.load(tiny_ckpt, device="cpu", dtype="float16")
    assert "--dtype must be one of float32, bfloat16, float16" in cli_error(monkeypatch, capsys, "--dtype", "half")
    assert "float16 runs on CUDA only" in cli_error(monkeypatch, capsys, "--dtype", "float16", "--images", HERE)


# ----------------------------------------------------------------------------- photos as people have them

def exif_rotated_jpeg(path, raw):
    """A JPEG storing `raw` [H, W, 3] with EXIF orientation 6: viewers show it turned 90 degrees clockwise."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(raw).save(path, exif=exif.tobytes(), quality=95)


def test_load_rgb_every_mode(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)
    g8 = rgb[..., 0]
    Image.fromarray((g8.astype(np.uint16) * 257)).save(tmp_path / "g16.png")  # 8-bit values widened to 16 bits
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    assert (np.asarray(common.load_rgb(tmp_path / "g16.png")) == g8[..., None]).all()  # not white: x / 257
    Image.fromarray(g8.astype(np.int32) * 257).save(tmp_path / "g32.tif")  # mode I, taken as 16-bit
    assert Image.open(tmp_path / "g32.tif").mode == "I" and (np.asarray(common.load_rgb(tmp_path / "g32.tif")) == g8[..., None]).all()
    Image.fromarray(g8.astype(np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(ValueError, match="float"):
        common.load_rgb(tmp_path / "f.tif")
    # ordinary 8-bit files read exactly as Pillow's convert("RGB"), displayed or not (no EXIF, no alpha)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(g8).save(tmp_path / "l.png")
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "p.png")
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg")
    for f in ("rgb.png", "l.png", "p.png", "cmyk.jpg"):
        ref = np.asarray(Image.open(tmp_path / f).convert("RGB"))
        assert all((np.asarray(common.load_rgb(tmp_path / f, displayed=d)) == ref).all() for d in (False, True)), f
    rgba = np.concatenate([rgb, np.full((24, 40, 1), 255, np.uint8)], -1)
    rgba[:, :20, 3] = 0  # left half transparent
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    assert (np.asarray(common.load_rgb(tmp_path / "rgba.png")) == rgb).all()  # the stages: stored colours
    shown = np.asarray(common.load_rgb(tmp_path / "rgba.png", displayed=True))
    assert (shown[:, :20] == 255).all() and (shown[:, 20:] == rgb[:, 20:]).all()  # as a viewer: over white
    frames = [Image.new("RGB", (40, 24), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    assert tuple(np.asarray(common.load_rgb(tmp_path / "anim.gif"))[5, 5]) == (255, 0, 0)  # the first frame
    exif_rotated_jpeg(tmp_path / "rot.jpg", rgb)
    assert common.load_rgb(tmp_path / "rot.jpg").size == (40, 24)  # benchmarks: the stored pixels
    assert common.load_rgb(tmp_path / "rot.jpg", displayed=True).size == (24, 40)  # --images: as shown
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(OSError, match="empty file"):
        common.load_rgb(tmp_path / "empty.jpg")


def write_photo_folder(src):
    """One file of every kind a folder of photos holds -> {file: reason it is skipped, or None}."""
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)
    os.makedirs(src / "sub" / ".thumbs")
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(src / "gray16.png")
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(src / "palette.png")
    Image.fromarray(rgb).convert("CMYK").save(src / "cmyk.jpg")
    Image.fromarray(rgb).convert("CMYK").save(src / "sub" / "cmyk.tif")
    Image.fromarray(rgb).convert("LA").save(src / "la.png")
    Image.fromarray(rgb).convert("RGBA").save(src / "rgba.png")
    Image.fromarray(rgb[..., 1]).save(src / "gray.png")
    frames = [Image.fromarray(rgb).convert("P"), Image.fromarray(rgb[::-1].copy()).convert("P")]
    frames[0].save(src / "anim.gif", save_all=True, append_images=frames[1:])
    Image.fromarray(rgb).save(src / "photo.bmp")
    Image.fromarray(rgb).save(src / "photo.webp")
    exif_rotated_jpeg(src / "rotated.jpg", rgb)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG")
    (src / "truncated.jpg").write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])
    (src / "empty.png").write_bytes(b"")
    (src / "notes.txt").write_text("shot on holiday\n")
    (src / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (src / "sub" / ".thumbs" / "a.jpg").write_bytes(buf.getvalue())
    return {"gray16.png": None, "palette.png": None, "cmyk.jpg": None, "sub/cmyk.tif": None, "la.png": None,
            "rgba.png": None, "gray.png": None, "anim.gif": None, "photo.bmp": None, "photo.webp": None, "rotated.jpg": None,
            "truncated.jpg": "OSError: image file is truncated", "empty.png": "UnidentifiedImageError: an empty file (0 bytes)",
            "notes.txt": "UnidentifiedImageError: not an image Pillow can read", ".DS_Store": "a hidden file", "sub/.thumbs/": "a hidden folder, not searched"}


def test_images_folder_as_people_have_it(tiny_ckpt, tmp_path, monkeypatch, capsys):  # noqa: F811
    """Every file of the folder is either segmented or in skipped.txt with its reason; the EXIF-rotated
    photo is segmented and drawn as a viewer shows it."""
    src = tmp_path / "photos"
    expect = write_photo_folder(src)
    seen, orig = [], evaluate.infer

    def recording(seg, img, *a, **k):
        seen.append(img)
        return orig(seg, img, *a, **k)
    monkeypatch.setattr(evaluate, "infer", recording)
    run_main(monkeypatch, "--images", str(src), "--classes", "cat,dog", "--ckpt", tiny_ckpt, "--out_dir", str(src / "out"))
    coco = json.load(open(src / "out" / "predictions.json"))
    segmented = sorted(im["file_name"] for im in coco["images"])
    assert segmented == sorted(f for f, why in expect.items() if why is None)
    lines = dict(line.split("\t") for line in open(src / "out" / "skipped.txt").read().splitlines())
    assert set(lines) == {f for f, why in expect.items() if why is not None}
    assert all(lines[f].startswith(why) for f, why in expect.items() if why is not None), lines
    assert "skipped notes.txt: UnidentifiedImageError: not an image Pillow can read" in capsys.readouterr().out
    rot = next(im for im in coco["images"] if im["file_name"] == "rotated.jpg")
    assert (rot["height"], rot["width"]) == (40, 24)  # displayed: 40 high, 24 wide (stored 24 x 40)
    assert np.array(Image.open(src / "out" / "rotated_labels.png")).shape == (40, 24)
    given = {im["file_name"]: img for im, img in zip(coco["images"], seen)}  # the images the network was given
    shown = np.asarray(ImageOps.exif_transpose(Image.open(src / "rotated.jpg")).convert("RGB"))
    assert torch.equal(given["rotated.jpg"].permute(1, 2, 0), torch.from_numpy(shown.copy()))
    overlay = np.asarray(Image.open(src / "out" / "rotated_semantic.png"))
    assert overlay.shape[1] == 24 * 8  # zoomed x8 to 192 px wide (stored orientation: 40 x 5 = 200)
    g8 = np.asarray(Image.open(src / "gray.png"))  # gray16.png holds the red channel x 257, gray.png the green
    assert abs(given["gray16.png"].float().mean() - float(np.asarray(Image.open(src / "gray16.png")).mean()) / 257) < 0.5
    assert given["gray16.png"].float().mean() < 200 and g8.shape == (24, 40)  # not read as white
    run_main(monkeypatch, "--images", str(src), "--classes", "cat,dog", "--ckpt", tiny_ckpt, "--out_dir", str(src / "out"))
    assert "out/\tthe output folder, not searched" in open(src / "out" / "skipped.txt").read()  # a rerun skips its outputs


def test_proposals_for_a_rotated_photo_are_in_its_displayed_orientation(tiny_ckpt, tmp_path, monkeypatch, capsys):  # noqa: F811
    """Proposers read photos as displayed (detectron2's read_image, OpenCV's imread): so do --images' checks."""
    import benchmarks
    exif_rotated_jpeg(tmp_path / "rot.jpg", np.random.default_rng(2).integers(0, 256, (24, 40, 3), dtype=np.uint8))
    for (h, w), ok in (((40, 24), True), ((24, 40), False)):
        m = np.zeros((h, w), bool)
        m[4:20, 4:20] = True
        (tmp_path / "p.json").write_text(json.dumps([{"file_name": "rot.jpg", "segmentation": benchmarks.mask_to_rle(m), "score": 0.9}]))
        args = ("--images", str(tmp_path / "rot.jpg"), "--classes", "cat", "--ckpt", tiny_ckpt, "--proposals",
                str(tmp_path / "p.json"), "--out_dir", str(tmp_path / "o"))
        if ok:
            run_main(monkeypatch, *args)
            assert "proposals: 1 matched" in capsys.readouterr().out
        else:
            assert "is 24x40, the image 40x24" in cli_error(monkeypatch, capsys, *args)
