"""Tests of model.py on CPU with tiny random models (and one full-size key/shape check).

    cd /work/main && .venv/bin/python -m pytest -q test_model.py
"""
import itertools
import math
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

import clip_model
import model as M
from common import UserError

CATS = ["background", "cat", "dog", "bird"]
TINY = dict(n_queries=10, n_layers=2, n_heads=8, dim_ffn=64, mlp_hidden=32)


def official_shapes(width=768, patch=16, n_pos=197, enc_layers=12, embed=512, queries=100, dec_layers=6,
                    dim_ffn=2048, hidden=256):
    """The official key layout, in file order, written from shared/reference/zutis_checkpoint_keys.md."""
    s = OrderedDict(query_embed=(queries, width))
    e = "encoder."
    s.update({e + "class_embedding": (width,), e + "positional_embedding": (n_pos, width),
              e + "proj": (width, embed), e + "conv1.weight": (width, 3, patch, patch),
              e + "ln_pre.weight": (width,), e + "ln_pre.bias": (width,)})
    for n in range(enc_layers):
        b = f"{e}transformer.resblocks.{n}."
        s.update({b + "attn.in_proj_weight": (3 * width, width), b + "attn.in_proj_bias": (3 * width,),
                  b + "attn.out_proj.weight": (width, width), b + "attn.out_proj.bias": (width,),
                  b + "ln_1.weight": (width,), b + "ln_1.bias": (width,),
                  b + "mlp.c_fc.weight": (4 * width, width), b + "mlp.c_fc.bias": (4 * width,),
                  b + "mlp.c_proj.weight": (width, 4 * width), b + "mlp.c_proj.bias": (width,),
                  b + "ln_2.weight": (width,), b + "ln_2.bias": (width,)})
    s.update({e + "ln_post.weight": (width,), e + "ln_post.bias": (width,)})
    for f in ("ffn1", "ffn2"):
        for i, (o, k) in enumerate([(hidden, width), (hidden, hidden), (width, hidden)]):
            s.update({f"{f}.layers.{i}.weight": (o, k), f"{f}.layers.{i}.bias": (o,)})
    for n in range(dec_layers):
        b = f"decoder.layers.{n}."
        for a in ("self_attn", "multihead_attn"):
            s.update({f"{b}{a}.in_proj_weight": (3 * width, width), f"{b}{a}.in_proj_bias": (3 * width,),
                      f"{b}{a}.out_proj.weight": (width, width), f"{b}{a}.out_proj.bias": (width,)})
        s.update({b + "linear1.weight": (dim_ffn, width), b + "linear1.bias": (dim_ffn,),
                  b + "linear2.weight": (width, dim_ffn), b + "linear2.bias": (width,)})
        for i in (1, 2, 3):
            s.update({f"{b}norm{i}.weight": (width,), f"{b}norm{i}.bias": (width,)})
    s.update({"decoder.norm.weight": (width,), "decoder.norm.bias": (width,)})
    return s


def tiny_official_sd(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = official_shapes(width=64, patch=8, n_pos=17, enc_layers=2, embed=32, queries=10, dec_layers=2,
                             dim_ffn=64, hidden=32)
    return OrderedDict((k, torch.randn(s, generator=g) * 0.2) for k, s in shapes.items())


@pytest.fixture(scope="module")
def tiny_model(tiny_clip_path):
    torch.manual_seed(0)
    return M.ZUTIS(tiny_clip_path, CATS, **TINY)


def make_batch(B=2, H=64, W=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    sem = torch.zeros(B, H, W, dtype=torch.long)
    inst = []
    for b in range(B):
        masks = torch.zeros(2, H, W, dtype=torch.bool)
        masks[0, 8:32, 8:40] = True
        masks[1, 36:60, 24:56] = True
        if b % 2:
            masks = masks.flip(-1)
        for i, c in enumerate(torch.randint(1, len(CATS), (2,), generator=g)):
            sem[b][masks[i]] = c
        inst.append(masks)
    sem[:, :, -4:] = 255  # padding is ignored by CE
    return torch.randn(B, 3, H, W, generator=g), {"semantic": sem, "instance_masks": inst}


# ----------------------------------------------------------------------------- official layout

def test_official_layout_tiny_strict_round_trip(tiny_clip_path):
    sd = tiny_official_sd()
    m = M.load_official(sd, CATS, arch=tiny_clip_path)
    assert (m.pos_interp, m.logit_scale, m.text_templates) == ("official", 1.0, "none")
    back = M.to_official(m)
    assert list(back) == list(sd)  # same keys, same (official) order
    for k in sd:
        assert torch.equal(back[k], sd[k]), k
    assert "text_emb" not in back and m.text_emb.shape == (len(CATS), 32)


@pytest.mark.parametrize("patch,n_pos,arch,n_params", [(16, 197, "ViT-B/16", 134_458_368),
                                                       (32, 50, "ViT-B/32", 136_114_944)])
def test_full_size_official_layout(patch, n_pos, arch, n_params):
    shapes = official_shapes(patch=patch, n_pos=n_pos)
    assert len(shapes) == 275 and sum(math.prod(s) for s in shapes.values()) == n_params
    torch.manual_seed(0)  # full-size vision tower, tiny text tower (only its embed_dim matters here)
    clip = clip_model.CLIP(512, 224, 12, 768, patch, 77, 49408, 32, 1, 1).eval()
    sd = OrderedDict((k, torch.randn(s)) for k, s in shapes.items())
    m = M.load_official(sd, CATS, clip=clip)  # arch inferred from the shapes
    assert m.arch == arch
    own = m.state_dict()
    assert {k: tuple(v.shape) for k, v in own.items()} == dict(shapes)
    for k in ("query_embed", "encoder.conv1.weight", "decoder.layers.5.norm3.bias"):
        assert torch.equal(own[k], sd[k])


@pytest.mark.parametrize("edit,key", [
    ("drop", "decoder.layers.1.norm2.bias"), ("drop", "query_embed"), ("extra", "decoder.pe_layer.weight"),
    ("shape", "query_embed"), ("shape", "encoder.transformer.resblocks.1.mlp.c_fc.weight")])
def test_official_layout_errors_name_the_key(tiny_clip_path, edit, key):
    sd = tiny_official_sd()
    if edit == "drop":
        del sd[key]
    elif edit == "extra":
        sd[key] = torch.zeros(3)
    else:
        sd[key] = torch.zeros(*sd[key].shape[:-1], sd[key].shape[-1] + 1)
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        M.load_official(sd, CATS, arch=tiny_clip_path)


def test_official_arch_needs_known_shapes(tiny_clip_path):
    with pytest.raises(UserError, match="pass arch"):
        M.load_official(tiny_official_sd(), CATS)
    sd = tiny_official_sd()
    del sd["encoder.conv1.weight"]
    with pytest.raises(UserError, match=r"encoder\.conv1\.weight"):
        M.load_official(sd, CATS)


def test_load_checkpoint_files(tiny_clip_path, tmp_path):
    sd = tiny_official_sd()
    torch.save(sd, tmp_path / "official.pt")
    with pytest.raises(UserError, match="categories"):
        M.load_checkpoint(str(tmp_path / "official.pt"))
    with pytest.raises(UserError, match="pass arch"):  # a tiny official-layout file has no known arch
        M.load_checkpoint(str(tmp_path / "official.pt"), categories="voc")
    m = M.load_checkpoint(str(tmp_path / "official.pt"), categories=CATS, arch=tiny_clip_path)
    assert m.pos_interp == "official" and not m.training
    # a train.py checkpoint: our state dict + a config with the arch, categories and hyper-parameters
    cfg = {"arch": tiny_clip_path, "categories": CATS, "logit_scale": 10.0, "no_stop_grad": True, **TINY}
    torch.save({"model": m.state_dict(), "optimizer": {}, "scaler": None, "step": 2, "config": cfg,
                "rng": {"numpy": __import__("numpy").random.get_state()}}, tmp_path / "ckpt.pt")
    m2 = M.load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert m2.logit_scale == 10.0 and m2.stop_grad is False and m2.categories == CATS
    x = torch.randn(1, 3, 40, 48)
    with torch.no_grad():
        # our checkpoint config did not name pos_interp: the default (size-form bicubic) differs off-grid
        assert not torch.allclose(m(x)["mask_logits"], m2(x)["mask_logits"])
        m2.pos_interp = "official"
        assert torch.allclose(m(x)["mask_logits"], m2(x)["mask_logits"])
    torch.save({"weights": 1}, tmp_path / "bad.pt")
    for bad in (str(tmp_path / "bad.pt"), str(tmp_path / "missing.pt"), "official:nope"):
        with pytest.raises(UserError):
            M.load_checkpoint(bad)


# ----------------------------------------------------------------------------- forward

def test_forward_shapes_and_semantic_normalisation(tiny_model):
    x = torch.randn(2, 3, 43, 70)  # not multiples of the patch (8): floored to 5 x 8 patches
    out = tiny_model(x)
    assert out["mask_logits"].shape == (2, 2, 10, 10, 16)
    tok = out["patch_tokens"]
    assert tok.shape == (2, 10, 16, 32)
    assert torch.allclose(tok.norm(dim=-1), torch.ones(2, 10, 16), atol=1e-5)
    # the official normalisation: proj, per-image LayerNorm over (2h, 2w, C_t) without affine, then L2
    feat = F.interpolate(tiny_model.encoder.forward_dense(x).permute(0, 3, 1, 2), scale_factor=2, mode="bilinear")
    y = feat.permute(0, 2, 3, 1) @ tiny_model.encoder.proj
    y = (y - y.mean(dim=(1, 2, 3), keepdim=True)) / (y.var(dim=(1, 2, 3), unbiased=False, keepdim=True) + 1e-5).sqrt()
    assert torch.allclose(tok, y / y.norm(dim=-1, keepdim=True), atol=1e-5)


def test_sine_positions_values():
    pos = M.sine_positions(2, 3, 8, "cpu")  # [6, 8]: y in the first 4 channels, x in the last 4
    y = torch.tensor([1, 2.]) / (2 + 1e-6) * 2 * math.pi
    x = torch.tensor([1, 2, 3.]) / (3 + 1e-6) * 2 * math.pi
    f1 = 10000 ** (2 / 4)
    row = lambda v: torch.stack([v.sin(), v.cos(), (v / f1).sin(), (v / f1).cos()], -1)  # noqa: E731
    expect = torch.cat([row(y)[:, None].expand(2, 3, 4), row(x)[None].expand(2, 3, 4)], -1).reshape(6, 8)
    assert torch.allclose(pos, expect, atol=1e-6)


def test_text_templates_and_set_categories(tiny_clip_path, tiny_model):
    m = M.ZUTIS(tiny_clip_path, CATS, text_templates="85", **TINY)
    assert m.text_emb.shape == tiny_model.text_emb.shape and not torch.allclose(m.text_emb, tiny_model.text_emb)
    m.set_categories(["background", "zebra"])
    assert m.text_emb.shape == (2, 32) and m.categories == ["background", "zebra"]
    assert "text_emb" not in m.state_dict()
    with pytest.raises(UserError):
        M.ZUTIS(tiny_clip_path, CATS, text_templates="80", **TINY)
