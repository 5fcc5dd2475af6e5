"""The ZUTIS segmenter: CLIP ViT encoder + class-agnostic query decoder, its inference rules, and
loading of the official released checkpoints. The Hungarian-matched loss (`criterion`,
`HungarianMatcher`) lives in criterion.py.

    model = ZUTIS("ViT-B/16", categories.get_categories("voc"))    # CLIP weights from ~/.cache/clip
    out = model(images)          # {"mask_logits": [B, L, Q, 2h, 2w], "patch_tokens": [B, 2h, 2w, C_t], ...}
    losses = criterion.criterion(out, batch)                        # criterion.py: {"loss", "loss_ce", ...}
    pred = predict(model, image)                                    # semantic map + instances
    model = load_checkpoint("official:coco_vit_b_16")               # published weights, official behaviour

Importing this file does no work. Tests: `python -m pytest -q test_model.py` (CPU, tiny random CLIP).
Timing (random weights, no download): `python model.py --benchmark [--device cuda --dtype bfloat16]`.

References: Shin, Albanie, Xie, "Zero-shot Unsupervised Transfer Instance Segmentation" (CVPRW 2023),
sections 3.2-3.3; behaviour of the official code (github.com/NoelShin/zutis: networks/zutis.py,
networks/transformer.py, networks/positional_embedding.py) as recorded in
shared/reference/zutis_facts.md sections 5, 8 and zutis_checkpoint_keys.md; DETR (sine positions,
post-norm decoder). Written from those descriptions; no code copied.
"""
import copy
import inspect
import math
import os
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

import categories
import clip_model
from common import UserError

# ----------------------------------------------------------------------------- official checkpoints

_URL = "https://www.robots.ox.ac.uk/~vgg/research/zutis/shared_files"
# name: (url, README size in MB (10^6 bytes, one decimal), CLIP arch, built-in category list).
# sha256 of the released files: unknown until first downloaded (printed by load_checkpoint).
OFFICIAL = {
    "coco_vit_b_16": (f"{_URL}/coco2017/coco_vit_b_16.pt", 537.9, "ViT-B/16", "coco"),
    "coca_vit_b_16": (f"{_URL}/coca/coca_vit_b_16.pt", 537.9, "ViT-B/16", "coca"),
    "imagenet_s919_vit_b_16": (f"{_URL}/imagenet-s919/imagenet_s919_vit_b_16.pt", 537.9, "ViT-B/16", "imagenet_s919"),
    "imagenet_s919_vit_b_32": (f"{_URL}/imagenet-s919/imagenet_s919_vit_b_32.pt", 544.6, "ViT-B/32", "imagenet_s919"),
}

# ----------------------------------------------------------------------------- model parts


class MLP(nn.Module):
    """in -> hidden -> hidden -> out with ReLU between (ffn1/ffn2; keys `layers.N.{weight,bias}`)."""

    def __init__(self, dim_in, hidden, dim_out, n_layers=3):
        super().__init__()
        dims = [dim_in] + [hidden] * (n_layers - 1) + [dim_out]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


def sine_positions(h, w, dim, device, temperature=10000.0):
    """DETR's normalised sine positions for an unpadded h x w grid -> [h*w, dim]: the first dim/2
    channels encode y, the rest x, each as interleaved (sin, cos) pairs. Stateless, so no key."""
    half = dim // 2
    scale, eps = 2 * math.pi, 1e-6
    y = torch.arange(1, h + 1, device=device, dtype=torch.float32) / (h + eps) * scale  # cumsum of ones, normalised
    x = torch.arange(1, w + 1, device=device, dtype=torch.float32) / (w + eps) * scale
    i = torch.arange(half, device=device, dtype=torch.float32)
    freq = temperature ** (2 * torch.div(i, 2, rounding_mode="floor") / half)  # [half]

    def enc(v):  # [n] -> [n, half], channels (sin f0, cos f0, sin f1, cos f1, ...)
        a = v[:, None] / freq
        return torch.stack([a[:, 0::2].sin(), a[:, 1::2].cos()], dim=2).flatten(1)

    py, px = enc(y), enc(x)  # [h, half], [w, half]
    pos = torch.cat([py[:, None].expand(h, w, half), px[None].expand(h, w, half)], dim=2)  # [h, w, dim]
    return pos.reshape(h * w, dim)  # [h, w, dim] -> [h*w, dim]


class DecoderLayer(nn.Module):
    """DETR post-norm decoder layer (dropout 0): self-attn, cross-attn (positions on keys only), FFN;
    each followed by add & LayerNorm. Attributes are named as in the official checkpoint."""

    def __init__(self, dim, heads, dim_ffn):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.multihead_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.linear1, self.linear2 = nn.Linear(dim, dim_ffn), nn.Linear(dim_ffn, dim)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, tgt, memory, pos, query_pos):
        # tgt, query_pos: [B, Q, C]; memory: [B, N, C]; pos: [N, C] (broadcast over B)
        q = tgt + query_pos
        tgt = self.norm1(tgt + self.self_attn(q, q, tgt, need_weights=False)[0])
        tgt = self.norm2(tgt + self.multihead_attn(tgt + query_pos, memory + pos, memory, need_weights=False)[0])
        return self.norm3(tgt + self.linear2(F.relu(self.linear1(tgt))))


class Decoder(nn.Module):
    """Stack of post-norm layers; the shared final `norm` is applied to every layer's output (deep
    supervision), while the next layer receives the un-normalised output, as in DETR."""

    def __init__(self, dim, heads, dim_ffn, n_layers):
        super().__init__()
        # The official decoder deep-copies one freshly initialised layer, so all layers start equal.
        layer = DecoderLayer(dim, heads, dim_ffn)
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(n_layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, memory, pos, query_pos):
        B = memory.shape[0]
        query_pos = query_pos[None].expand(B, -1, -1)  # [Q, C] -> [B, Q, C]
        tgt, outs = torch.zeros_like(query_pos), []  # the target starts at zeros; queries are positions
        for layer in self.layers:
            tgt = layer(tgt, memory, pos, query_pos)
            outs.append(self.norm(tgt))
        return torch.stack(outs)  # [L, B, Q, C]


def _templates(text_templates):
    if text_templates in ("none", None):
        return None  # bare names: what the official segmenter embeds
    if text_templates == "85":
        return categories.TEMPLATES  # the paper's 85-template ensemble (section 4.1)
    raise UserError(f"text_templates must be 'none' or '85', got {text_templates!r}")


class ZUTIS(nn.Module):
    """ZUTIS (paper Fig. 2). `arch` is a CLIP name ("ViT-B/16") or a CLIP checkpoint path; `clip`
    optionally passes an already-built clip_model.CLIP (its visual tower becomes our encoder).

    Parameter names equal the official checkpoint's: `encoder.*` (CLIP `visual.*`, trained; includes
    `proj` = W), `ffn1.layers.N`, `ffn2.layers.N`, `decoder.layers.N.*`, `decoder.norm`, `query_embed`.
    The text embeddings are a non-persistent buffer `text_emb` [K, C_t], recomputed from names with the
    CLIP text tower, which is never kept in the state dict (nor in memory after use)."""

    def __init__(self, arch, categories, n_queries=100, n_layers=6, n_heads=8, dim_ffn=2048, mlp_hidden=256,
                 logit_scale=1.0, text_templates="none", stop_grad=True, pos_interp="bicubic", clip=None):
        super().__init__()
        if pos_interp not in ("bicubic", "official"):
            raise UserError(f"pos_interp must be 'bicubic' or 'official', got {pos_interp!r}")
        _templates(text_templates)  # validate early
        self.arch, self.hparams = arch, dict(
            arch=arch, n_queries=n_queries, n_layers=n_layers, n_heads=n_heads, dim_ffn=dim_ffn,
            mlp_hidden=mlp_hidden, logit_scale=logit_scale, text_templates=text_templates,
            stop_grad=stop_grad, pos_interp=pos_interp)
        self.logit_scale, self.text_templates = float(logit_scale), text_templates
        self.stop_grad, self.pos_interp = stop_grad, pos_interp
        own_clip = clip is None
        if own_clip:
            clip = clip_model.load(arch)[0]
        self.register_buffer("text_emb", self._embed(categories, clip, movable=own_clip), persistent=False)
        self.categories = list(categories)
        # Registration order = key order: query_embed, encoder, ffn1, ffn2, decoder (as in the official file).
        dim = clip.visual.width
        self.query_embed = nn.Parameter(torch.randn(n_queries, dim))  # nn.Embedding's N(0, 1) init, no `.weight`
        self.encoder = clip.visual.float()
        self.ffn1 = MLP(dim, mlp_hidden, dim)
        self.ffn2 = MLP(dim, mlp_hidden, dim)
        self.decoder = Decoder(dim, n_heads, dim_ffn, n_layers)

    # --- text side (open vocabulary)
    @torch.no_grad()
    def _embed(self, names, clip, movable=True):
        """Bare-name (official) or 85-template (paper) text embeddings, unit norm, fp32 [K, C_t]. A CLIP
        we loaded ourselves goes to the GPU for this when there is one (920 names x 85 templates)."""
        if not names:
            raise UserError("empty category list")
        if movable and torch.cuda.is_available():
            clip = clip.cuda()
        emb = clip_model.text_embeddings(clip, list(names), templates=_templates(self.text_templates))
        if movable:
            clip.cpu()
        return emb.float().cpu()

    def set_categories(self, names):
        """Re-embed a new category list (open vocabulary); label id = index, "background" should be 0.
        Reloads the CLIP text tower of `self.arch` (the released OpenAI weights, or the given path)."""
        emb = self._embed(names, clip_model.load(self.arch)[0])
        self.text_emb = emb.to(self.text_emb.device)
        self.categories = list(names)

    @property
    def patch_size(self):
        return self.encoder.patch_size

    # --- forward
    def forward(self, images):
        """images [B, 3, H, W] (ImageNet-normalised; H, W floored to the patch grid by the patch conv)
        -> {"mask_logits": [B, L, Q, 2h, 2w] (sigmoid = the official mask proposals),
            "patch_tokens": [B, 2h, 2w, C_t] (unit norm), "text_emb": [K, C_t], "logit_scale": float}."""
        tok = self.encoder.forward_dense(images, pos_interp=self.pos_interp)  # [B, h, w, C_v]
        B, h, w, C = tok.shape
        feat = F.interpolate(tok.permute(0, 3, 1, 2), scale_factor=2, mode="bilinear", align_corners=False)
        feat = feat.permute(0, 2, 3, 1)  # [B, C_v, 2h, 2w] -> [B, 2h, 2w, C_v]
        # Instance branch on detached features: the paper's stop-gradient (section 3.3), so the encoder
        # learns only from the semantic loss and the decoder only from the mask loss.
        memory = self.ffn1(feat.detach() if self.stop_grad else feat).flatten(1, 2)  # [B, 4hw, C_v]
        pos = sine_positions(2 * h, 2 * w, C, memory.device).to(memory.dtype)  # [4hw, C_v]
        hs = self.ffn2(self.decoder(memory, pos, self.query_embed))  # [L, B, Q, C_v]
        hs = hs / hs.norm(dim=-1, keepdim=True)  # unit mask embeddings; the memory is not normalised
        mask_logits = torch.einsum("lbqc,bnc->blqn", hs, memory).unflatten(-1, (2 * h, 2 * w))  # [B, L, Q, 2h, 2w]
        return {"mask_logits": mask_logits, "patch_tokens": self.semantic_tokens(feat),
                "text_emb": self.text_emb, "logit_scale": self.logit_scale}

    def semantic_tokens(self, feat):
        """[B, 2h, 2w, C_v] -> [B, 2h, 2w, C_t]: W = CLIP's visual.proj, then the official per-image
        LayerNorm over the whole (2h, 2w, C_t) map without affine (it subtracts one scalar per image),
        then per-token L2 normalisation (+1e-7)."""
        x = feat @ self.encoder.proj  # [B, 2h, 2w, C_v] @ [C_v, C_t] -> [B, 2h, 2w, C_t]
        x = F.layer_norm(x, x.shape[1:])
        return x / (x.norm(dim=-1, keepdim=True) + 1e-7)


# ----------------------------------------------------------------------------- inference (facts section 8)

@torch.no_grad()
def semantic_from_outputs(outputs, size, text_emb=None, chunk=64):
    """argmax over classes (background included, no threshold) of the raw-cosine logits upsampled
    bilinearly to `size` (H, W) -> long [H, W]. Chunked over classes so 920 classes at 1024^2 fit."""
    te = (outputs["text_emb"] if text_emb is None else text_emb).float()
    logits = torch.einsum("kc,hwc->khw", te, outputs["patch_tokens"][0].float())  # [K, 2h, 2w]
    best_v = best_i = None
    for k0 in range(0, logits.shape[0], chunk):
        up = F.interpolate(logits[None, k0:k0 + chunk], size=tuple(size), mode="bilinear", align_corners=False)[0]
        v, i = up.max(0)  # [H, W]; the first maximum wins, as torch.argmax
        if best_v is None:
            best_v, best_i = v, i
        else:
            better = v > best_v
            best_v, best_i = torch.where(better, v, best_v), torch.where(better, i + k0, best_i)
    return best_i


def mask_nms(masks, scores, labels, iou=0.3, score_floor=0.001):
    """Class-wise greedy NMS on mask IoU (official "hard" NMS). masks bool [N, H, W], scores [N],
    labels [N] -> kept indices (long, by descending score). Within a class the best mask is always kept;
    another survives if its IoU with every kept mask is <= iou and its score > score_floor."""
    keep = []
    flat = masks.flatten(1).float()  # [N, H*W]
    for c in labels.unique():
        idx = (labels == c).nonzero()[:, 0]
        order = idx[torch.sort(scores[idx], descending=True, stable=True).indices]
        m = flat[order]
        inter = m @ m.t()  # [n, n] pixel counts (exact in fp32 below 2^24 pixels)
        area = m.sum(1)
        ious = (inter / (area[:, None] + area[None] - inter + 1e-7)).cpu()
        alive = (scores[order] > score_floor).cpu()
        alive[0] = True
        for i in range(len(order)):
            if alive[i]:
                keep.append(int(order[i]))
                alive &= ~(ious[i] > iou)
    keep = torch.tensor(keep, dtype=torch.long, device=scores.device)
    return keep[torch.sort(scores[keep], descending=True, stable=True).indices]


def mean_token_cos(binary, tokens, text_emb):
    """The official instance class rule: binary masks [Q, N], unit tokens [N, C_t], text [K, C_t] -> cos [Q, K]
    between each mask's L2-normalised mean token and each text embedding."""
    mean = (binary @ tokens) / (binary.sum(1, keepdim=True) + 1e-7)  # [Q, C_t]
    return (mean / (mean.norm(dim=-1, keepdim=True) + 1e-7)) @ text_emb.t()


@torch.no_grad()
def instances_from_outputs(outputs, size, text_emb=None, t=0.5, nms="hard", nms_iou=0.3, class_prob="sigmoid",
                           temperature=5.0, score_floor=0.001):
    """Official instance rules on the last decoder layer: low-res binary masks P > t, confidence = mean
    P inside, class from the mean unit token inside (sigmoid(5 cos), or "softmax" = the paper's
    softmax(logit_scale cos)), score = confidence x max class probability; masks upsampled (bilinear, as
    probabilities) to `size` and binarised at t; background and empty masks dropped; class-wise NMS.
    -> {"masks": bool [N, H, W], "labels": long [N], "scores": float [N]} by descending score."""
    if nms not in ("hard", "none") or class_prob not in ("sigmoid", "softmax"):
        raise UserError(f"nms must be hard|none and class_prob sigmoid|softmax, got {nms!r}, {class_prob!r}")
    te = (outputs["text_emb"] if text_emb is None else text_emb).float()
    probs = outputs["mask_logits"][0, -1].float().sigmoid()  # [Q, 2h, 2w]
    tokens = outputs["patch_tokens"][0].float().flatten(0, 1)  # [2h, 2w, C_t] -> [4hw, C_t]
    binary = (probs > t).flatten(1).float()  # [Q, 4hw]
    area = binary.sum(1)
    conf = (probs.flatten(1) * binary).sum(1) / (area + 1e-7)
    cos = mean_token_cos(binary, tokens, te)  # [Q, K]
    if class_prob == "sigmoid":
        prob = torch.sigmoid(temperature * cos)
    else:
        prob = torch.softmax(outputs.get("logit_scale", 1.0) * cos, dim=-1)
    max_prob, labels = prob.max(-1)
    scores = conf * max_prob
    idx = (labels != 0).nonzero()[:, 0]  # background is just class 0: dropped
    masks = torch.zeros(0, *size, dtype=torch.bool, device=probs.device)
    if len(idx):  # upsample 16 proposals at a time: [n, 2h, 2w] -> bool [n, H, W]
        masks = torch.cat([F.interpolate(probs[None, i], size=tuple(size), mode="bilinear", align_corners=False)[0] > t
                           for i in idx.split(16)])
    labels, scores = labels[idx], scores[idx]
    keep = (mask_nms(masks, scores, labels, nms_iou, score_floor) if nms == "hard"
            else torch.sort(scores, descending=True, stable=True).indices)
    keep = keep[masks[keep].flatten(1).any(1)]  # empty masks dropped (after NMS, as the official code)
    return {"masks": masks[keep], "labels": labels[keep], "scores": scores[keep]}


def _forward1(model, image):
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"expected one image [1, 3, H, W], got {tuple(image.shape)}")
    p = model.patch_size
    if image.shape[-1] < p or image.shape[-2] < p:
        raise UserError(f"image {tuple(image.shape[-2:])} is smaller than one {p}x{p} patch")
    return model(image)


@torch.no_grad()
def predict(model, image, t=0.5, nms="hard", nms_iou=0.3, class_prob="sigmoid", size=None):
    """One normalised image [1, 3, H, W] at its original resolution -> {"semantic": long [H, W],
    "masks": bool [N, H, W], "labels": long [N], "scores": float [N]}; one forward pass for both.
    `size` (H, W) overrides the output size (e.g. the pre-resize size for ImageNet-S)."""
    out = _forward1(model, image)
    size = tuple(size or image.shape[-2:])
    return {"semantic": semantic_from_outputs(out, size),
            **instances_from_outputs(out, size, t=t, nms=nms, nms_iou=nms_iou, class_prob=class_prob)}


@torch.no_grad()
def predict_semantic(model, image, size=None):
    return semantic_from_outputs(_forward1(model, image), tuple(size or image.shape[-2:]))


@torch.no_grad()
def predict_instances(model, image, t=0.5, nms="hard", nms_iou=0.3, class_prob="sigmoid", size=None):
    out = _forward1(model, image)
    return instances_from_outputs(out, tuple(size or image.shape[-2:]), t=t, nms=nms, nms_iou=nms_iou,
                                  class_prob=class_prob)


# ----------------------------------------------------------------------------- checkpoints

def _few(keys, n=6):
    return "none" if not keys else ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def check_state_dict(model, sd, what="state dict"):
    """Strict check with an error that names the offending keys (missing, unexpected, wrong shape)."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shape = [f"{k} {tuple(sd[k].shape)} (model {tuple(own[k].shape)})" for k in own
             if k in sd and (not torch.is_tensor(sd[k]) or sd[k].shape != own[k].shape)]
    if missing or unexpected or shape:
        raise UserError(f"{what} does not match the model: missing keys: {_few(missing)}; "
                        f"unexpected keys: {_few(unexpected)}; wrong shapes: {_few(shape)}")


def _official_arch(sd):
    """ViT-B/16 or ViT-B/32 from encoder.conv1.weight (kernel 16 vs 32) and the positional table (197 vs 50)."""
    for k in ("encoder.conv1.weight", "encoder.positional_embedding"):
        if k not in sd:
            raise UserError(f"not an official ZUTIS state dict: missing key {k}")
    conv, n_pos = sd["encoder.conv1.weight"].shape, sd["encoder.positional_embedding"].shape[0]
    known = {(768, 16, 197): "ViT-B/16", (768, 32, 50): "ViT-B/32"}
    if (conv[0], conv[-1], n_pos) not in known:
        raise UserError(f"cannot tell the CLIP arch from encoder.conv1.weight {tuple(conv)} and "
                        f"encoder.positional_embedding length {n_pos}; pass arch= (a CLIP name or path)")
    return known[(conv[0], conv[-1], n_pos)]


def _hparams_from_shapes(sd):
    """Decoder sizes read from the tensors (heads cannot be: 8, as the official code)."""
    kw = {}
    if "query_embed" in sd:
        kw["n_queries"] = sd["query_embed"].shape[0]
    layers = {int(k.split(".")[2]) for k in sd if k.startswith("decoder.layers.")}
    if layers:
        kw["n_layers"] = max(layers) + 1
    if "decoder.layers.0.linear1.weight" in sd:
        kw["dim_ffn"] = sd["decoder.layers.0.linear1.weight"].shape[0]
    if "ffn1.layers.0.weight" in sd:
        kw["mlp_hidden"] = sd["ffn1.layers.0.weight"].shape[0]
    return kw


def _torch_load(path):
    import pickle
    try:
        return torch.load(path, map_location="cpu", weights_only=True)  # official files: plain tensors
    except pickle.UnpicklingError:
        return torch.load(path, map_location="cpu", weights_only=False)  # our own checkpoints (rng states)
    except Exception as e:
        raise UserError(f"cannot read checkpoint {path!r}: {type(e).__name__}: {e}") from None


def _category_list(categories):
    import categories as cats
    try:
        return cats.get_categories(categories)
    except ValueError as e:
        raise UserError(str(e)) from None


def load_official(path_or_state_dict, categories, arch=None, clip=None, **overrides):
    """An official ZUTIS file (a bare state dict of 275 fp32 tensors) -> ZUTIS, loaded strictly. The
    key layout is ours, so the map is the identity, checked. The file holds no category names and no
    text tower: the text embeddings come from `categories` and the released CLIP of the same arch.
    The official behaviour is selected: pos_interp "official", logit_scale 1, bare-name texts."""
    sd = _torch_load(path_or_state_dict) if isinstance(path_or_state_dict, (str, os.PathLike)) else path_or_state_dict
    if not isinstance(sd, dict) or ("model" in sd and "config" in sd):
        raise UserError("not an official ZUTIS state dict (a zutis train.py checkpoint loads with load_checkpoint)")
    arch = arch or _official_arch(sd)
    hp = {**_hparams_from_shapes(sd), "pos_interp": "official", "logit_scale": 1.0, "text_templates": "none",
          **overrides}
    model = ZUTIS(arch, categories, clip=clip, **hp)
    check_state_dict(model, sd, "official checkpoint")
    model.load_state_dict(sd, strict=True)
    return model


def to_official(model):
    """Our model -> the official layout (same names; the official key order): an OrderedDict of CPU
    tensors that `torch.save` writes as a file the official code loads with strict=True."""
    sd = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in model.state_dict().items()}
    group = {"query_embed": 0, "encoder": 1, "ffn1": 2, "ffn2": 3, "decoder": 4}

    def rank(k):  # within encoder the official file lists its own parameters before submodules
        top, *rest = k.split(".")
        return group.get(top, 5), top == "encoder" and len(rest) > 1

    return OrderedDict((k, sd[k].detach().cpu().clone()) for k in sorted(sd, key=rank))


def download_official(name, root=None):
    """Fetch a published checkpoint into ~/.cache/zutis (progress bar, atomic), print its size and
    sha256, and check the size against the README's (to its 0.1 MB precision)."""
    if name not in OFFICIAL:
        raise UserError(f"unknown official checkpoint {name!r}: use one of {sorted(OFFICIAL)}")
    url, mb = OFFICIAL[name][:2]
    path = clip_model.download(url, root or os.path.expanduser("~/.cache/zutis"))
    size = os.path.getsize(path)
    print(f"{name}: {path} ({size} bytes, sha256 {clip_model.sha256_of(path)})", flush=True)
    if round(size / 1e6, 1) != mb:
        raise UserError(f"{path} has {size} bytes but the README says ~{mb} MB: delete it and retry")
    return path


def _from_train_checkpoint(ckpt, categories, arch=None, **overrides):
    cfg = dict(ckpt["config"])
    if isinstance(cfg.get("model"), dict):
        cfg.update(cfg["model"])
    if "arch" not in cfg or "categories" not in cfg:
        raise UserError("checkpoint config lacks 'arch' or 'categories'")
    if cfg.get("no_stop_grad"):
        cfg["stop_grad"] = False
    names = inspect.signature(ZUTIS).parameters
    kw = {k: cfg[k] for k in names if k in cfg and k not in ("arch", "categories", "clip")}
    model = ZUTIS(arch or cfg["arch"], categories or cfg["categories"], **{**kw, **overrides})
    sd = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in ckpt["model"].items()}
    check_state_dict(model, sd, "checkpoint")
    model.load_state_dict(sd, strict=True)
    return model


def load_checkpoint(spec, categories=None, device="cpu", arch=None, **overrides):
    """A zutis train.py checkpoint ({"model", "config", ...}), an official ZUTIS file, or
    "official:<name>" (see OFFICIAL; downloaded once) -> ZUTIS in eval mode on `device`.
    `categories` (a builtin name, file, comma list or list) replaces the stored / default list;
    `arch` names the CLIP (for the text tower) when the file's own is unknown or has moved;
    `overrides` are ZUTIS keyword arguments (e.g. pos_interp) that replace the stored ones."""
    cats = None if categories is None else _category_list(categories)
    spec = str(spec)
    if spec.startswith("official:"):
        name = spec.split(":", 1)[1]
        path = download_official(name)
        model = load_official(path, cats or _category_list(OFFICIAL[name][3]), arch=arch or OFFICIAL[name][2],
                              **overrides)
    else:
        if not os.path.isfile(spec):
            raise UserError(f"checkpoint not found: {spec!r} (a file, or official:<name>, name in {sorted(OFFICIAL)})")
        obj = _torch_load(spec)
        if isinstance(obj, dict) and "model" in obj and "config" in obj:
            model = _from_train_checkpoint(obj, cats, arch, **overrides)
        elif isinstance(obj, dict) and "query_embed" in obj:
            if cats is None:
                raise UserError("official ZUTIS files store no category names: pass categories (e.g. 'coco')")
            model = load_official(obj, cats, arch=arch, **overrides)
        else:
            raise UserError(f"{spec!r} is neither a zutis train.py checkpoint nor an official ZUTIS state dict")
    return model.to(device).eval()


if __name__ == "__main__":
    import argparse
    from criterion import benchmark  # the timing sits next to the loss it compares against
    # --- CLI ---
    parser = argparse.ArgumentParser(description="time the ZUTIS forward pass and criterion (random weights)")
    parser.add_argument("--benchmark", action="store_true", help="run the timing (otherwise print this help)")
    parser.add_argument("--arch", default="ViT-B/16", help="CLIP shape: ViT-B/16 or ViT-B/32 (random weights)")
    parser.add_argument("--batch_size", type=int, default=8, help="images per step (official: 8)")
    parser.add_argument("--crop", type=int, default=384, help="training crop in pixels (official: 384)")
    parser.add_argument("--n_inst", type=int, default=10, help="instances per image (official max: 10)")
    parser.add_argument("--iters", type=int, default=3, help="timed repetitions after one warm-up")
    parser.add_argument("--device", default="auto", help="auto|cpu|cuda")
    parser.add_argument("--dtype", default="float32", help="float32|bfloat16|float16 autocast")
    args = parser.parse_args()
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if args.benchmark:
        benchmark(args.arch, args.batch_size, args.crop, args.n_inst, args.iters, dev, getattr(torch, args.dtype))
    else:
        parser.print_help()
