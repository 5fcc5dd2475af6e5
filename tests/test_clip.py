"""Tests of the foundation: clip_model.py (parity with OpenAI's reference implementation on identical
random weights in fp32 and the official fp16, both checkpoint formats, the tokenizer, checksummed
downloads, dense features), categories.py and common.py. Run: python -m pytest -q tests/test_clip.py

The reference is the `openai-clip` package (a test-only dependency, see README); its build_model
rounds weights to fp16, so every parity test loads the reference's rounded weights back into ours.
"""
import hashlib
import os
import random
import stat
import warnings

import pytest
import torch

import categories
import clip_model
import common
from conftest import make_tiny_clip

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # pkg_resources deprecation inside the reference package
    import clip as reference


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def paired(ours):
    """(ours, reference) with identical weights."""
    ref = reference.model.build_model(ours.state_dict()).float().eval()
    return clip_model.build_model(ref.state_dict()), ref


# ----------------------------------------------------------------------------- parity

@pytest.mark.parametrize("name", ["tiny", "ViT-B/16"])
@torch.no_grad()
def test_parity_with_reference(name):
    torch.manual_seed(0)
    ours, ref = paired(make_tiny_clip() if name == "tiny" else clip_model.random_model(name))
    res = ours.visual.input_resolution
    x = torch.randn(2, 3, res, res)
    text = clip_model.tokenize(["a photo of a cat.", "a diagram", "itap of my tv/monitor."])
    assert rel_err(ours.encode_image(x), ref.encode_image(x)) < 1e-5
    assert rel_err(ours.encode_text(text), ref.encode_text(text)) < 1e-5
    li, lt = ours(x, text)
    ri, rt = ref(x, text)
    assert rel_err(li, ri) < 1e-5 and rel_err(lt, rt) < 1e-5
    # state dicts travel both ways with strict loading
    assert set(ours.state_dict()) == set(ref.state_dict())
    ref.load_state_dict(ours.state_dict(), strict=True)


def test_build_model_reads_architecture_from_shapes():
    m = make_tiny_clip()
    rebuilt = clip_model.build_model(m.state_dict())
    v = rebuilt.visual
    assert (v.patch_size, v.input_resolution, v.width, v.output_dim) == (8, 32, 64, 32)
    assert len(v.transformer.resblocks) == 2 and rebuilt.context_length == 77
    assert all(p.dtype == torch.float32 for p in rebuilt.parameters()) and not rebuilt.training


def test_build_model_names_bad_keys():
    sd = make_tiny_clip().state_dict()
    sd["visual.extra_thing"] = torch.zeros(1)
    with pytest.raises(common.UserError, match="visual.extra_thing"):
        clip_model.build_model(sd)
    sd.pop("visual.extra_thing")
    sd.pop("ln_final.bias")
    with pytest.raises(common.UserError, match="ln_final.bias"):
        clip_model.build_model(sd)


# ----------------------------------------------------------------------------- file formats

def test_torchscript_and_plain_state_dict_load_identically(tmp_path):
    m = make_tiny_clip(seed=3)
    plain = tmp_path / "plain.pt"
    torch.save(m.state_dict(), plain)
    # OpenAI releases TorchScript archives; trace the reference model to write one.
    _, ref = paired(m)
    x, t = torch.randn(1, 3, 32, 32), clip_model.tokenize(["a cat"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(ref, (x, t), check_trace=False)
    scripted = tmp_path / "scripted.pt"
    traced.save(str(scripted))
    a, pre_a = clip_model.load(str(plain))
    b, _ = clip_model.load(str(scripted))
    with torch.no_grad():
        assert torch.allclose(a.encode_image(x), b.encode_image(x), atol=1e-3)  # b holds fp16-rounded weights
        ours_rounded, _ = paired(m)
        assert torch.equal(b.encode_image(x), ours_rounded.encode_image(x))
    assert pre_a.transforms[0].size == 32


@torch.no_grad()
def test_official_fp16_matches_reference():
    """official_fp16 leaves the dtypes OpenAI's clip.load(device="cuda") leaves, and our fp16 towers compute
    the reference's fp16 values bit for bit (CPU fp16 kernels; the reference's build_model converts to fp16)."""
    for m in (make_tiny_clip(seed=4), clip_model.random_model("ViT-B/16")):
        ref = reference.model.build_model({k: v.clone() for k, v in m.state_dict().items()}).eval()
        ours = clip_model.official_fp16(clip_model.build_model(m.state_dict()))
        assert {k: v.dtype for k, v in ours.state_dict().items()} == {k: v.dtype for k, v in ref.state_dict().items()}
        res = ours.visual.input_resolution
        x = torch.randn(2, 3, res, res)
        text = clip_model.tokenize(["a photo of a cat.", "a diagram", "itap of my tv/monitor."])
        assert ours.encode_image(x).dtype == torch.float16
        assert torch.equal(ours.encode_image(x), ref.encode_image(x))
        assert torch.equal(ours.encode_text(text), ref.encode_text(text))


def test_load_rejects_unknown_corrupt_and_training_checkpoints(tmp_path):
    with pytest.raises(common.UserError, match="not found"):
        clip_model.load("ViT-Z/99")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(common.UserError, match="cannot be read"):
        clip_model.load(str(bad))
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "config": {"arch": "ViT-B/16"}}, ckpt)
    with pytest.raises(common.UserError, match="ZUTIS training checkpoint.*evaluate.py --ckpt"):
        clip_model.load(str(ckpt))


def test_offline_download_says_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setitem(clip_model.MODELS, "ViT-B/16", (tmp_path / "nowhere" / ("0" * 64) / "ViT-B-16.pt").as_uri())
    monkeypatch.setenv("HF_ENDPOINT", (tmp_path / "no_hub").as_uri())  # no network: the hub is tried too
    with pytest.raises(common.UserError) as e:
        clip_model.load("ViT-B/16", download_root=str(tmp_path / "cache"))
    assert str(tmp_path / "cache" / "ViT-B-16.pt") in str(e.value) and "--arch" in str(e.value)


# ----------------------------------------------------------------------------- tokenizer

def tokenizer_corpus():
    names = sorted(set(categories.VOC + categories.COCO + categories.COCA + categories.IMAGENET_S919))
    corpus = [t.format(n) for n in names for t in categories.TEMPLATES[::4]]  # 22 of the 85 templates
    corpus += [t.format(n) for n in names[:60] for t in categories.TEMPLATES]  # every template
    rng = random.Random(0)
    odd = ["Café crème brûlée", "naïve façade", "東京タワーの写真", "猫と犬", "한국어 문장", "emoji 🐱🐶🚲 time",
           "&amp; &lt;b&gt;bold&lt;/b&gt; &quot;q&quot; &#39;x&#39;", "Ã©tÃ© mojibake Ã¼ber", "tabs\tand\nnew  lines   ",
           "ALL CAPS SHOUTING", "numbers 1234567890 and 3.14159", "it's they're we've I'm you'll he'd",
           "<|startoftext|>special<|endoftext|>", "", "   ", "ﬁ ligature and Ｆｕｌｌｗｉｄｔｈ", "a" * 200,
           "über-straße", "Ω≈ç√∫˜µ≤≥÷", "\u200bzero\u200bwidth", "日本語 and english mixed 123"]
    corpus += odd
    pieces = [w for s in odd for w in s.split()] + ["the", "a", "photo", "Dog", "CAT!", "?!", "--", "x2"]
    corpus += [" ".join(rng.choice(pieces) for _ in range(rng.randint(1, 12))) for _ in range(1500)]
    return corpus


def test_tokenizer_matches_reference():
    corpus = tokenizer_corpus()
    assert len(corpus) >= 5000
    ours = clip_model.tokenize(corpus, truncate=True)
    ref = reference.tokenize(corpus, truncate=True)
    assert ours.dtype == torch.long and ours.shape == (len(corpus), 77)
    mismatch = [corpus[i] for i in range(len(corpus)) if not torch.equal(ours[i], ref[i])]
    assert not mismatch, mismatch[:5]


def test_tokenizer_long_text_and_specials():
    long = "word " * 100
    with pytest.raises(RuntimeError):
        clip_model.tokenize(long)
    with pytest.raises(RuntimeError):
        reference.tokenize(long)
    t = clip_model.tokenize([long], truncate=True)[0]
    assert t[0] == 49406 and t[-1] == 49407
    t = clip_model.tokenize("a photo of a cat")[0]
    n = int((t > 0).sum())
    assert t[0] == 49406 and t[n - 1] == 49407 and t[n:].eq(0).all()
    tok = clip_model._tokenizer()
    assert len(tok.encoder) == 49408
    assert tok.decode(tok.encode("a photo of a cat")).strip() == "a photo of a cat"


# ----------------------------------------------------------------------------- downloads

def test_load_by_name_uses_cache(tmp_path, monkeypatch):
    """A name resolves to OpenAI's URL and sha256; with the file already cached, no network is used."""
    m = make_tiny_clip()
    path = tmp_path / "ViT-B-16.pt"
    torch.save(m.state_dict(), path)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    monkeypatch.setitem(clip_model.MODELS, "ViT-B/16", f"https://example.invalid/x/{sha}/ViT-B-16.pt")
    model, _ = clip_model.load("ViT-B/16", download_root=str(tmp_path))
    assert model.visual.width == 64


# ----------------------------------------------------------------------------- dense features

@torch.no_grad()
def test_forward_dense_matches_encode_image_path():
    m = make_tiny_clip(seed=1)
    v = m.visual
    x = torch.randn(2, 3, 32, 32)
    dense = v.forward_dense(x)
    assert dense.shape == (2, 4, 4, 64)
    tokens, _ = v.embed(x)
    full = v.ln_post(v.transformer(tokens))
    assert torch.allclose(dense.reshape(2, 16, 64), full[:, 1:], atol=0, rtol=0)
    assert torch.allclose(v.ln_post(full[:, 0]) @ v.proj, m.encode_image(x))
    pos = v.positional_embedding
    assert torch.equal(clip_model.interpolate_pos_embed(pos, 4, 4, "bicubic"), pos)  # native: exact identity
    # the official form resamples slightly even at the native grid (scale (g+0.1)/g), as the released code does
    official = clip_model.interpolate_pos_embed(pos, 4, 4, "official")
    assert torch.equal(official[0], pos[0]) and not torch.equal(official, pos)
    assert torch.allclose(official, pos, atol=0.5 * pos.abs().max().item())
    for mode in ("bicubic", "official"):  # other sizes and aspect ratios run and interpolate
        out = v.forward_dense(torch.randn(1, 3, 48, 72), pos_interp=mode)
        assert out.shape == (1, 6, 9, 64) and torch.isfinite(out).all()
    assert m.encode_image(torch.randn(1, 3, 64, 40)).shape == (1, 32)


@torch.no_grad()
def test_forward_maskclip_is_value_path():
    m = make_tiny_clip(seed=2)
    v = m.visual
    x = torch.randn(1, 3, 32, 32)
    out = v.forward_maskclip(x)
    assert out.shape == (1, 4, 4, 32)
    # by hand: run all but the last block, then the value-only last block
    t, _ = v.embed(x)
    for blk in v.transformer.resblocks[:-1]:
        t = blk(t)
    blk = v.transformer.resblocks[-1]
    C = t.shape[-1]
    y = blk.ln_1(t) @ blk.attn.in_proj_weight[2 * C:].T + blk.attn.in_proj_bias[2 * C:]
    y = t + blk.attn.out_proj(y)
    y = y + blk.mlp(blk.ln_2(y))
    want = (v.ln_post(y[:, 1:]) @ v.proj).reshape(1, 4, 4, 32)
    assert torch.allclose(out, want, atol=1e-6)


def test_text_embeddings_template_ensemble():
    m = make_tiny_clip()
    e = clip_model.text_embeddings(m, ["cat", "dog"], categories.TEMPLATES)
    assert e.shape == (2, 32) and torch.allclose(e.norm(dim=-1), torch.ones(2), atol=1e-5)
    with torch.no_grad():
        by_hand = torch.nn.functional.normalize(m.encode_text(clip_model.tokenize(
            [t.format("cat") for t in categories.TEMPLATES])), dim=-1).mean(0)
    assert torch.allclose(e[0], by_hand / by_hand.norm(), atol=1e-5)
    bare = clip_model.text_embeddings(m, ["cat"], None)
    with torch.no_grad():
        want = torch.nn.functional.normalize(m.encode_text(clip_model.tokenize(["cat"])), dim=-1)
    assert torch.allclose(bare, want, atol=1e-6)


# ----------------------------------------------------------------------------- common / categories

def test_categories_and_common(tmp_path):
    assert len(categories.VOC) == 21 and len(categories.COCO) == 81 and len(categories.IMAGENET_S919) == 920
    assert categories.get_categories("coca")[3] == "Yellow duck"
    f = tmp_path / "names.txt"
    f.write_text("red bicycle\n\nbackground\ncat\n")
    assert categories.get_categories(str(f)) == ["background", "red bicycle", "cat"]
    assert categories.get_categories("bird") == ["background", "bird"]  # one class name
    for bad, says in [("cocoo", "did you mean 'coco'"), ("a,b,a", "'a' more than once"), ("", "empty"),
                      (str(tmp_path / "missing.txt"), "not found")]:
        with pytest.raises(common.UserError, match=says):
            categories.get_categories(bad)
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    for name in ["a.JPG", "sub/b.png", "sub/c.txt", ".hidden.jpg"]:
        (tmp_path / "imgs" / name).write_bytes(b"x")
    assert common.list_images(tmp_path / "imgs") == ["a.JPG", os.path.join("sub", "b.png")]
    with pytest.raises(OSError):
        common.load_rgb(tmp_path / "imgs" / "a.JPG")
    out = tmp_path / "o.json"
    with pytest.raises(RuntimeError):
        with common.atomic_path(str(out)) as tmp:
            open(tmp, "w").write("half")
            raise RuntimeError("killed")
    assert not out.exists() and os.listdir(tmp_path).count("o.json") == 0
    common.save_json({"a": 1}, str(out))
    assert out.read_text().strip().startswith("{")
    # mkstemp makes 0600 temp files; the output gets the umask's permissions like any other file
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o666 & ~common._umask()
    assert common._umask() == os.umask(common._umask())


def test_cpu_threads_use_the_idle_cores(monkeypatch):
    assert 0 <= common._busy_cores(0.05) <= os.cpu_count() + 1e-6  # measured on this machine
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("ZUTIS_THREADS", "3")
    assert common.cpu_threads() == 3  # an explicit choice wins
    monkeypatch.delenv("ZUTIS_THREADS")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    for busy, want in [(0.0, 8), (2.4, 6), (7.9, 1), (30.0, 1)]:
        monkeypatch.setattr(common, "_busy_cores", lambda busy=busy: busy)
        assert common.cpu_threads() == want
