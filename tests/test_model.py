"""Tests of model.py on CPU with tiny random models (and one full-size key/shape check):
python -m pytest -q tests/test_model.py"""
import itertools
import math
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

import clip_model
import evaluate
import model
from common import UserError

CATS = ["background", "cat", "dog", "bird"]
TINY = dict(n_queries=10, n_layers=2, n_heads=8, dim_ffn=64, mlp_hidden=32)


def official_shapes(width=768, patch=16, n_pos=197, enc_layers=12, embed=512, queries=100, dec_layers=6,
                    dim_ffn=2048, hidden=256):
    """The official key layout, in the official file's order."""
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
    return model.ZUTIS(tiny_clip_path, CATS, **TINY)


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
    m = model.load_official(sd, CATS, arch=tiny_clip_path)
    assert (m.config.pos_interp, m.config.logit_scale, m.config.text_templates) == ("official", 1.0, "none")
    back = model.to_official(m)
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
    m = model.load_official(sd, CATS, clip=clip)  # arch inferred from the shapes
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
        model.load_official(sd, CATS, arch=tiny_clip_path)


def test_official_arch_needs_known_shapes(tiny_clip_path):
    with pytest.raises(UserError, match="pass arch"):
        model.load_official(tiny_official_sd(), CATS)
    sd = tiny_official_sd()
    del sd["encoder.conv1.weight"]
    with pytest.raises(UserError, match=r"encoder\.conv1\.weight"):
        model.load_official(sd, CATS)


def test_load_checkpoint_files(tiny_clip_path, tmp_path):
    sd = tiny_official_sd()
    torch.save(sd, tmp_path / "official.pt")
    with pytest.raises(UserError, match="categories"):
        model.load_checkpoint(str(tmp_path / "official.pt"))
    with pytest.raises(UserError, match="pass arch"):  # a tiny official-layout file has no known arch
        model.load_checkpoint(str(tmp_path / "official.pt"), categories="voc")
    m = model.load_checkpoint(str(tmp_path / "official.pt"), categories=CATS, arch=tiny_clip_path)
    assert m.config.pos_interp == "official" and not m.training
    # a train.py checkpoint: our state dict + a config with the arch, categories and hyper-parameters
    cfg = {"arch": tiny_clip_path, "categories": CATS, "logit_scale": 10.0, "stop_grad": False, **TINY}
    torch.save({"model": m.state_dict(), "optimizer": {}, "scaler": None, "step": 2, "config": cfg,
                "rng": []}, tmp_path / "ckpt.pt")
    m2 = model.load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert m2.config.logit_scale == 10.0 and m2.config.stop_grad is False and m2.categories == CATS
    assert model.load_checkpoint(str(tmp_path / "ckpt.pt"), categories="a,b", arch=tiny_clip_path).categories == \
        ["background", "a", "b"]  # the CLIP may be named anew (moved file); categories replaced
    x = torch.randn(1, 3, 40, 48)
    with torch.no_grad():
        # our checkpoint config did not name pos_interp: the default is the official form
        assert torch.allclose(m(x)["mask_logits"], m2(x)["mask_logits"])
        m2.config.pos_interp = "bicubic"  # the variant resizes to size: it differs off the native grid
        assert not torch.allclose(m(x)["mask_logits"], m2(x)["mask_logits"])
    torch.save({"weights": 1}, tmp_path / "bad.pt")
    (tmp_path / "random.pt").write_bytes(bytes(range(256)) * 8)
    for bad in (str(tmp_path / "bad.pt"), str(tmp_path / "missing.pt"), str(tmp_path / "random.pt"), "official:nope"):
        with pytest.raises(UserError):
            model.load_checkpoint(bad)


# ----------------------------------------------------------------------------- forward

def test_forward_shapes_and_semantic_normalisation(tiny_model):
    x = torch.randn(2, 3, 43, 70)  # not multiples of the patch (8): floored to 5 x 8 patches
    out = tiny_model(x)
    assert out["mask_logits"].shape == (2, 2, 10, 10, 16)
    tok = out["patch_tokens"]
    assert tok.shape == (2, 10, 16, 32)
    assert torch.allclose(tok.norm(dim=-1), torch.ones(2, 10, 16), atol=1e-5)
    # the official normalisation: proj, per-image LayerNorm over (2h, 2w, C_t) without affine, then L2
    feat = F.interpolate(tiny_model.encoder.forward_dense(x, pos_interp="official").permute(0, 3, 1, 2), scale_factor=2, mode="bilinear")
    y = feat.permute(0, 2, 3, 1) @ tiny_model.encoder.proj
    y = (y - y.mean(dim=(1, 2, 3), keepdim=True)) / (y.var(dim=(1, 2, 3), unbiased=False, keepdim=True) + 1e-5).sqrt()
    assert torch.allclose(tok, y / y.norm(dim=-1, keepdim=True), atol=1e-5)
    # official init: the decoder layers are copies of one layer (the queries are N(0, 1))
    a, b = tiny_model.decoder.layers
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_sine_positions_values():
    pos = model.sine_positions(2, 3, 8, "cpu")  # [6, 8]: y in the first 4 channels, x in the last 4
    y = torch.tensor([1, 2.]) / (2 + 1e-6) * 2 * math.pi
    x = torch.tensor([1, 2, 3.]) / (3 + 1e-6) * 2 * math.pi
    f1 = 10000 ** (2 / 4)
    row = lambda v: torch.stack([v.sin(), v.cos(), (v / f1).sin(), (v / f1).cos()], -1)  # noqa: E731
    expect = torch.cat([row(y)[:, None].expand(2, 3, 4), row(x)[None].expand(2, 3, 4)], -1).reshape(6, 8)
    assert torch.allclose(pos, expect, atol=1e-6)


def test_text_templates_and_set_categories(tiny_clip_path, tiny_model):
    m = model.ZUTIS(tiny_clip_path, CATS, text_templates="85", **TINY)
    assert m.text_emb.shape == tiny_model.text_emb.shape and not torch.allclose(m.text_emb, tiny_model.text_emb)
    m.set_categories(["background", "zebra"])
    assert m.text_emb.shape == (2, 32) and m.categories == ["background", "zebra"]
    assert "text_emb" not in m.state_dict()
    with pytest.raises(UserError):
        model.ZUTIS(tiny_clip_path, CATS, text_templates="80", **TINY)


# ----------------------------------------------------------------------------- losses and matching

def test_dice_bce_hand_values():
    p = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.9, 0.2, 0.0, 1.0], [0.0, 1.0, 0.5, 0.5]])
    g = torch.tensor([[1., 1, 0, 0], [1, 0, 0, 1]])
    costs = model.pairwise_costs(p, g)
    assert list(costs) == ["dice", "bce"]  # the official terms, in MASK_TERMS
    dice, bce = costs["dice"], costs["bce"]
    assert dice.shape == bce.shape == (3, 2)
    assert dice[0, 0].item() == pytest.approx(1 - 3 / 5, abs=1e-6)
    assert dice[1, 1].item() == pytest.approx(1 - (2 * 1.9 + 1) / (2.1 + 2 + 1), abs=1e-6)
    assert bce[0, 0].item() == pytest.approx(math.log(2), abs=1e-6)
    assert bce[1, 1].item() == pytest.approx(-(math.log(0.9) + math.log(0.8)) / 4, abs=1e-6)
    assert bce[2, 0].item() == pytest.approx((100 + 0 + 2 * math.log(2)) / 4, abs=1e-5)  # log(0) clamped at -100
    ref = torch.stack([torch.stack([F.binary_cross_entropy(pi, gi) for gi in g]) for pi in p])
    assert torch.allclose(bce, ref, atol=1e-6)


def brute_force(cost):
    Q, N = len(cost), len(cost[0])
    if Q >= N:
        return min(sum(cost[q][t] for t, q in enumerate(perm)) for perm in itertools.permutations(range(Q), N))
    return min(sum(cost[q][t] for q, t in enumerate(perm)) for perm in itertools.permutations(range(N), Q))


@pytest.mark.parametrize("Q,N", [(5, 3), (4, 4), (2, 5), (1, 3), (6, 1)])
def test_matcher_is_optimal(Q, N):
    g = torch.Generator().manual_seed(Q * 10 + N)
    for _ in range(3):
        probs = torch.rand(Q, 50, generator=g)
        gt = (torch.rand(N, 50, generator=g) > 0.6).float()
        matcher = model.HungarianMatcher()
        (qi, ti), = matcher(probs, gt)
        cost = matcher.cost(probs, gt)[0]
        assert qi.dtype == ti.dtype == torch.int64 and len(qi) == min(Q, N)
        assert len(set(qi.tolist())) == len(qi) and len(set(ti.tolist())) == len(ti)
        assert cost[qi, ti].sum().item() == pytest.approx(brute_force(cost.tolist()), abs=1e-5)
    with pytest.raises(AssertionError, match="non-finite"):
        model.HungarianMatcher.assign(torch.tensor([[float("nan"), 1.0]]))


def naive_official_mask_loss(mask_logits, instance_masks):
    """The official loop: per image, per layer, repeated-tensor BCE and dice, scipy on [n, Q]."""
    total = 0.0
    for probs, gt in zip(mask_logits.sigmoid(), instance_masks):
        g = gt.float().flatten(1)
        if g.sum() == 0:
            continue
        p = F.interpolate(probs, size=gt.shape[-2:], mode="bilinear").flatten(2)
        for pl in p:
            dice = torch.zeros(len(g), len(pl))
            bce = torch.zeros(len(g), len(pl))
            for i, gi in enumerate(g):
                for q, pq in enumerate(pl):
                    dice[i, q] = 1 - (2 * (pq * gi).sum() + 1) / (pq.sum() + gi.sum() + 1)
                    bce[i, q] = F.binary_cross_entropy(pq, gi)
            cost = dice + bce
            r, c = linear_sum_assignment(cost.numpy())
            total += cost[r, c].sum().item()
    return total / len(instance_masks)


def test_mask_loss_matches_naive_official_loop():
    g = torch.Generator().manual_seed(0)
    mask_logits = torch.randn(3, 2, 6, 5, 7, generator=g) * 4  # [B, L, Q, 2h, 2w]
    mask_logits[0, :, 0, 0, 0] = 200.0  # saturated: sigmoid == 1 exactly, log(1 - p) clamped
    inst = [torch.rand(4, 20, 28, generator=g) > 0.5, torch.zeros(2, 20, 28, dtype=torch.bool),
            torch.rand(2, 20, 28, generator=g) > 0.3]
    inst[0][3] = False  # an empty target is still matched (official)
    out = {"mask_logits": mask_logits.requires_grad_(), "patch_tokens": torch.randn(3, 5, 7, 8),
           "text_emb": F.normalize(torch.randn(3, 8), dim=-1)}
    batch = {"semantic": torch.randint(0, 3, (3, 20, 28)), "instance_masks": inst}
    losses = model.criterion(out, batch)
    assert losses["loss_mask"].item() == pytest.approx(naive_official_mask_loss(mask_logits.detach(), inst), rel=1e-5)
    assert sum(losses[f"loss_mask_{l}"] for l in range(2)).item() == pytest.approx(losses["loss_mask"].item(), rel=1e-6)
    assert (losses["loss_dice"] + losses["loss_bce"]).item() == pytest.approx(losses["loss_mask"].item(), rel=1e-5)
    # CE equals the official order (upsample the tokens, then dot with the texts)
    tok = F.interpolate(out["patch_tokens"].permute(0, 3, 1, 2), size=(20, 28), mode="bilinear")
    ref = F.cross_entropy(torch.einsum("kc,bchw->bkhw", out["text_emb"], tok), batch["semantic"])
    assert losses["loss_ce"].item() == pytest.approx(ref.item(), rel=1e-5)
    losses["loss"].backward()
    assert torch.isfinite(mask_logits.grad).all()
    assert all(v.dtype == torch.float32 and v.dim() == 0 for v in losses.values())


def test_zero_instance_images(tiny_model):
    x, batch = make_batch()
    batch["instance_masks"] = [torch.zeros(0, 64, 64, dtype=torch.bool), torch.zeros(3, 64, 64, dtype=torch.bool)]
    tiny_model.zero_grad()
    losses = model.criterion(tiny_model(x), batch)
    assert losses["loss_mask"].item() == 0 and torch.isfinite(losses["loss"])
    losses["loss"].backward()  # the decoder stays in the graph (zero gradient), as DDP needs
    assert tiny_model.decoder.norm.weight.grad is not None


def test_bfloat16_autocast_losses_are_fp32(tiny_model):
    x, batch = make_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tiny_model(x)
        losses = model.criterion(out, batch)  # computes in fp32 inside (autocast disabled there)
    assert out["mask_logits"].dtype == torch.bfloat16
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    ref = model.criterion({k: v.float() if torch.is_tensor(v) else v for k, v in out.items()}, batch)
    assert losses["loss"].item() == pytest.approx(ref["loss"].item(), rel=1e-6)


def grads(net, loss):
    net.zero_grad(set_to_none=True)
    loss.backward(retain_graph=True)
    enc = [p.grad for p in net.encoder.parameters()]
    rest = [p.grad for n, p in net.named_parameters() if not n.startswith("encoder.")]
    nonzero = lambda gs: [g is not None and g.abs().sum().item() > 0 for g in gs]  # noqa: E731
    return nonzero(enc), nonzero(rest)


@pytest.mark.parametrize("stop_grad", [True, False])
def test_stop_gradient(tiny_clip_path, stop_grad):
    torch.manual_seed(0)
    m = model.ZUTIS(tiny_clip_path, CATS, stop_grad=stop_grad, **TINY)
    x, batch = make_batch()
    losses = model.criterion(m(x), batch)
    enc, rest = grads(m, losses["loss_mask"])
    # At init the first layer's self-attention sees tgt = 0, so its output is the (zero) value bias
    # whatever q, k are: those three tensors get no gradient by construction (as in DETR).
    names = [n for n, _ in m.named_parameters() if not n.startswith("encoder.")]
    dead = {"decoder.layers.0.self_attn.in_proj_weight", "decoder.layers.0.self_attn.out_proj.weight",
            "decoder.layers.0.norm1.weight"}
    assert all(r for n, r in zip(names, rest) if n not in dead)
    assert not any(enc) if stop_grad else any(enc)
    enc, rest = grads(m, losses["loss_ce"])
    assert not any(rest)  # CE never reaches ffn1, the decoder, the queries or ffn2
    assert any(enc) and enc[[n for n, _ in m.encoder.named_parameters()].index("proj")]


def test_overfit_one_batch(tiny_clip_path):
    torch.manual_seed(0)
    m = model.ZUTIS(tiny_clip_path, CATS, logit_scale=10.0, **TINY)  # raw cosines (scale 1) cannot drop CE by 80%
    sem = torch.zeros(2, 32, 32, dtype=torch.long)
    inst = []
    for b in range(2):
        masks = torch.zeros(2, 32, 32, dtype=torch.bool)
        masks[0, :16, :16], masks[1, 16:, 8:] = True, True
        masks = masks.flip(-1) if b else masks
        sem[b][masks[0]], sem[b][masks[1]] = 1 + b, 3 - b
        inst.append(masks)
    x, batch = torch.randn(2, 3, 32, 32), {"semantic": sem, "instance_masks": inst}
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.0)
    first, threads = None, torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only add contention on a shared machine
    try:
        for _ in range(150):
            losses = model.criterion(m(x), batch)
            opt.zero_grad()
            losses["loss"].backward()
            opt.step()
            first = first or {k: losses[k].item() for k in ("loss_ce", "loss_mask")}
    finally:
        torch.set_num_threads(threads)
    last = {k: losses[k].item() for k in ("loss_ce", "loss_mask")}
    assert all(last[k] < 0.2 * first[k] for k in first), (first, last)


# ----------------------------------------------------------------------------- inference

def test_mask_nms_classwise():
    masks = torch.zeros(6, 10, 10, dtype=torch.bool)
    masks[[0, 1, 2], :5, :5] = True  # A, its duplicate B (same class), C (same pixels, another class)
    masks[1, 5, 0] = True
    masks[3, 6:, 6:] = True  # D: disjoint from A, same class
    masks[4, 6:, :3] = True  # E: disjoint, same class, score below the floor
    masks[5, 6:, :3] = True  # F: alone in its class, score below the floor: kept (the top always is)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.0005, 0.0005])
    labels = torch.tensor([1, 1, 2, 1, 1, 3])
    assert model.mask_nms(masks, scores, labels, iou=0.3).tolist() == [0, 2, 3, 5]
    masks[1, :5, 2:] = False  # B then has IoU 11/25 = 0.44 with A: still removed at 0.3, kept at 0.5
    assert model.mask_nms(masks, scores, labels, iou=0.3).tolist() == [0, 2, 3, 5]
    assert model.mask_nms(masks, scores, labels, iou=0.5).tolist() == [0, 1, 2, 3, 5]


def synthetic_outputs():
    """One image, 8 x 8 feature grid, texts = the 4 basis vectors; tokens: cols 0-3 -> class 1,
    cols 4-7 -> class 2, rows 6-7 -> background."""
    tok = torch.zeros(1, 8, 8, 4)
    tok[0, :, :4, 1], tok[0, :, 4:, 2] = 1, 1
    tok[0, 6:] = torch.tensor([1.0, 0, 0, 0])
    logits = torch.full((1, 1, 6, 8, 8), -10.0)
    logits[0, 0, 0, :4, :4] = 5  # q0: class 1
    logits[0, 0, 1, :4, :3] = 3  # q1: class 1, IoU 0.75 with q0 -> suppressed
    logits[0, 0, 2, :4, 1:] = 4  # q2: 3 cols of class 1, 4 of class 2 -> class 2, IoU 0.375 with q0 -> kept
    logits[0, 0, 3, 6:, :] = 5  # q3: background -> dropped
    logits[0, 0, 4, 5, 5] = 0.4  # q4: class 2, one low-res pixel at p = 0.6 -> empty at full size -> dropped
    return {"mask_logits": logits, "patch_tokens": tok, "text_emb": torch.eye(4), "logit_scale": 1.0}


def test_instances_follow_official_rules():
    out, size = synthetic_outputs(), (21, 19)
    res = model.instances_from_outputs(out, size)
    assert res["labels"].tolist() == [1, 2] and res["masks"].shape == (2, 21, 19) and res["masks"].dtype == torch.bool
    s5 = torch.sigmoid(torch.tensor(5.0))
    assert res["scores"][0].item() == pytest.approx((s5 * s5).item(), rel=1e-5)  # mean prob x sigmoid(5 cos)
    up = F.interpolate(out["mask_logits"][0, -1, :1][None].sigmoid(), size=size, mode="bilinear")[0, 0]
    assert torch.equal(res["masks"][0], up > 0.5)  # probabilities upsampled, then thresholded at 0.5
    none = model.instances_from_outputs(out, size, nms="none")
    assert sorted(none["labels"].tolist()) == [1, 1, 2]  # no NMS: the duplicate stays; bg and empty still go
    soft = model.instances_from_outputs(out, size, class_prob="softmax")
    e = math.e
    assert soft["scores"][0].item() == pytest.approx(s5.item() * e / (e + 3), rel=1e-5)


def test_predict_odd_size_official_layout(tiny_clip_path, tiny_model):
    # official-layout random weights (the module defaults; N(0, 1) everywhere would give no mask > 0.5)
    m = model.load_official(model.to_official(tiny_model), CATS, arch=tiny_clip_path).eval()
    image = torch.randn(1, 3, 333, 517)  # 41 x 64 patches of 8; the 5 right / 5 bottom pixels are dropped
    res = evaluate.ZutisSegmenter(m)(image, (333, 517))  # the one inference path
    with torch.no_grad():
        out = m(image)
    logits = torch.einsum("kc,hwc->khw", m.text_emb, out["patch_tokens"][0])
    ref = F.interpolate(logits[None], size=(333, 517), mode="bilinear")[0].argmax(0)
    assert res["semantic"].dtype == torch.long and torch.equal(res["semantic"], ref)
    assert torch.equal(model.semantic_from_outputs(out, (333, 517), chunk=3), ref)  # class chunks: same argmax
    none = model.instances_from_outputs(out, (333, 517), nms="none")
    assert len(none["labels"]) > len(res["labels"]) > 0  # NMS removed within-class duplicates
    masks, labels, scores = res["masks"], res["labels"], res["scores"]
    assert masks.shape[1:] == (333, 517) and masks.dtype == torch.bool and (labels > 0).all()
    assert masks.flatten(1).any(1).all() and torch.equal(scores, scores.sort(descending=True).values)
    up = F.interpolate(out["mask_logits"][0, -1:].sigmoid(), size=(333, 517), mode="bilinear")[0] > 0.5
    assert all(any(torch.equal(mk, u) for u in up) for mk in masks)  # each mask is a thresholded proposal
    f = masks.flatten(1).float()
    iou = (f @ f.t()) / (f.sum(1)[:, None] + f.sum(1)[None] - f @ f.t())
    same = labels[:, None] == labels[None]
    assert (iou[same & ~torch.eye(len(labels), dtype=torch.bool)] <= 0.3).all()


def test_official_name_download_path(tiny_clip_path, tmp_path, monkeypatch, capsys):
    """official:<name> end to end without network: the download is replaced by a local file."""
    path = tmp_path / "tiny_official.pt"
    torch.save(tiny_official_sd(), path)
    calls = []
    monkeypatch.setattr(model.downloads, "download", lambda url, root, **kw: calls.append((url, root)) or str(path))
    mb = round(path.stat().st_size / 1e6, 1)
    monkeypatch.setitem(model.OFFICIAL, "tiny", ("https://example.invalid/tiny.pt", mb, tiny_clip_path, "voc"))
    m = model.load_checkpoint("official:tiny")
    assert calls[0][1].endswith(".cache/zutis") and m.categories[:2] == ["background", "aeroplane"]
    assert "sha256" in capsys.readouterr().out and m.config.pos_interp == "official"
    monkeypatch.setitem(model.OFFICIAL, "tiny", ("https://example.invalid/tiny.pt", mb + 0.2, tiny_clip_path, "voc"))
    with pytest.raises(UserError, match="README says"):
        model.load_checkpoint("official:tiny")


# ----------------------------------------------------------------------------- ignore id, checkpoints that travel

def test_920_classes_class_255_is_a_target_and_padding_is_ignored():
    """ImageNet-S919: 920 classes, so 255 is a real class ("pug") and the ignore id is 1000."""
    K, ign = 920, 1000
    assert __import__("categories").recipe("imagenet_s919")["ignore_index"] == ign
    g = torch.Generator().manual_seed(0)
    tokens = F.normalize(torch.randn(1, 4, 4, 16, generator=g), dim=-1)
    sem = torch.zeros(1, 8, 8, dtype=torch.long)
    sem[0, :4, :4] = 255  # an object of class 255
    sem[0, :, 6:] = ign  # padding

    def ce(text_emb, semantic=sem):
        return model.semantic_ce(tokens, semantic, text_emb, ignore_index=ign)

    text = F.normalize(torch.randn(K, 16, generator=g), dim=-1).requires_grad_()
    ce(text).backward()
    assert text.grad[255].abs().sum() > 0  # class 255 gets a target (a positive gradient pull)
    moved = text.detach().clone()
    moved[255] = -moved[255]
    assert ce(moved).item() != pytest.approx(ce(text.detach()).item())  # its logit changes the loss
    repadded = sem.clone()
    repadded[0, :, 6:] = 3  # padding pixels relabelled: the loss must differ, so they were ignored before
    assert ce(text.detach(), repadded).item() != pytest.approx(ce(text.detach()).item())
    ref = F.cross_entropy(F.interpolate(torch.einsum("kc,bhwc->bkhw", text.detach(), tokens), size=(8, 8),
                                        mode="bilinear"), sem, ignore_index=ign)
    assert ce(text.detach()).item() == pytest.approx(ref.item(), rel=1e-6)
    with pytest.raises(UserError, match="ignore_index 255 is a label id"):
        model.semantic_ce(tokens, sem, text.detach(), ignore_index=255)


def test_checkpoint_travels_without_its_clip_file(tiny_clip_path, tiny_model, tmp_path, monkeypatch):
    """A train.py checkpoint stores the encoder weights and the text embeddings: it loads from another
    directory with the CLIP file gone; new categories need a CLIP, named by arch= or the stored path."""
    clip_copy = tmp_path / "run" / "clip.pt"
    clip_copy.parent.mkdir()
    clip_copy.write_bytes(open(tiny_clip_path, "rb").read())
    cfg = {**tiny_model.hparams, "arch": "clip.pt", "arch_path": str(clip_copy), "categories": CATS}
    ck = {"model": tiny_model.state_dict(), "config": cfg, "text_emb": tiny_model.text_emb}
    torch.save(ck, tmp_path / "run" / "ckpt.pt")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # "clip.pt" (relative, as given at training time) does not resolve here
    x = torch.randn(1, 3, 32, 40)
    m = model.load_checkpoint(str(tmp_path / "run" / "ckpt.pt"))  # via the stored absolute path or nothing at all
    with torch.no_grad():
        assert torch.equal(m(x)["mask_logits"], tiny_model.eval()(x)["mask_logits"])
    assert m.set_categories(["background", "zebra"]) is None and m.text_emb.shape == (2, 32)  # arch_path
    clip_copy.unlink()
    m = model.load_checkpoint(str(tmp_path / "run" / "ckpt.pt"))  # the CLIP file is gone: still loads
    assert torch.equal(m.text_emb, tiny_model.text_emb)
    with pytest.raises(UserError, match="not found"):  # new categories need a text tower
        model.load_checkpoint(str(tmp_path / "run" / "ckpt.pt"), categories="a,b")
    m = model.load_checkpoint(str(tmp_path / "run" / "ckpt.pt"), categories="a,b", arch=tiny_clip_path)
    assert m.categories == ["background", "a", "b"] and m.arch == tiny_clip_path


def test_text_embeddings_precision(tiny_clip, monkeypatch):
    """CPU: fp32, no conversion. CUDA (mocked): a copy converted by clip_model.official_fp16, unless text_fp32."""
    calls = []
    monkeypatch.setattr(clip_model, "official_fp16", lambda m: calls.append(m) or m, raising=False)
    emb = model.text_embeddings(tiny_clip, CATS, model.ModelConfig())
    assert emb.dtype == torch.float32 and not calls
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.nn.Module, "cuda", lambda self, *a: self)
    model.text_embeddings(tiny_clip, CATS, model.ModelConfig())
    assert len(calls) == 1 and calls[0] is not tiny_clip  # a copy: the caller's CLIP stays fp32
    model.text_embeddings(tiny_clip, CATS, model.ModelConfig(text_fp32=True))
    assert len(calls) == 1
