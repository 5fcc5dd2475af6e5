"""The ZUTIS segmenter (paper sections 3.2-3.3): a CLIP ViT encoder, a class-agnostic query decoder behind
a stop-gradient, the Hungarian-matched loss, the official inference rules, and checkpoint loading.

    model = ZUTIS("ViT-B/16", categories.get_categories("voc"))   # CLIP weights from ~/.cache/clip
    out = model(images)              # {"mask_logits": [B, L, Q, 2h, 2w], "patch_tokens": [B, 2h, 2w, C_t], ...}
    losses = criterion(out, batch)   # {"loss", "loss_ce", "loss_mask", ...}
    inst = instances_from_outputs(out, (H, W))   # the official inference rules (evaluate.py runs them)
    model = load_checkpoint("official:coco_vit_b_16")   # or a train.py ckpt.pt

Hyper-parameters: `ModelConfig`, saved by train.py and read by load_checkpoint. Behaviour follows the
official code (github.com/NoelShin/zutis: networks/zutis.py, networks/transformer.py, criterion.py) and
DETR (sine positions, post-norm decoder, matcher). Reference: docs/train.md.
"""
import copy
import dataclasses
import math
import os
from collections import OrderedDict

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

from categories import TEMPLATES, get_categories
import clip_model
import common
import downloads
from common import UserError


@dataclasses.dataclass
class ModelConfig:
    """Everything that defines a ZUTIS network besides its categories; defaults = the official model."""
    arch: str = "ViT-B/16"           # CLIP name or path: the encoder's shape and init, and the text tower
    n_queries: int = 100             # learned instance queries
    n_layers: int = 6                # decoder layers (each one supervised)
    n_heads: int = 8                 # decoder attention heads
    dim_ffn: int = 2048              # decoder feed-forward width
    mlp_hidden: int = 256            # hidden width of ffn1 / ffn2
    logit_scale: float = 1.0         # semantic logits = scale x cosine (official: raw cosines)
    text_templates: str = "none"     # "none": bare class names (official); "85": the paper's template ensemble
    pos_interp: str = "official"     # position-table resize: "official" (DINO's scale-factor form) or "bicubic"
    stop_grad: bool = True           # the paper's stop-gradient between encoder and instance branch
    text_fp32: bool = False          # text embeddings in fp32 on CUDA (official: fp16 on CUDA, fp32 on CPU)

    @classmethod
    def from_dict(cls, d, **overrides):
        """The fields of `d` (a checkpoint config may hold more keys) with `overrides` on top, checked."""
        names = [f.name for f in dataclasses.fields(cls)]
        if set(overrides) - set(names):
            raise UserError(f"unknown model setting(s) {sorted(set(overrides) - set(names))}: use {names}")
        cfg = cls(**{**{k: v for k, v in d.items() if k in names}, **overrides})
        if cfg.text_templates not in ("none", "85") or cfg.pos_interp not in ("bicubic", "official"):
            raise UserError(f"text_templates must be none|85 and pos_interp bicubic|official, got "
                            f"{cfg.text_templates!r}, {cfg.pos_interp!r}")
        return cfg


_URL = "https://www.robots.ox.ac.uk/~vgg/research/zutis/shared_files"
# name: (url, size in MB as the official README gives it, CLIP arch, built-in category list)
OFFICIAL = {
    "coco_vit_b_16": (f"{_URL}/coco2017/coco_vit_b_16.pt", 537.9, "ViT-B/16", "coco"),
    "coca_vit_b_16": (f"{_URL}/coca/coca_vit_b_16.pt", 537.9, "ViT-B/16", "coca"),
    "imagenet_s919_vit_b_16": (f"{_URL}/imagenet-s919/imagenet_s919_vit_b_16.pt", 537.9, "ViT-B/16", "imagenet_s919"),
    "imagenet_s919_vit_b_32": (f"{_URL}/imagenet-s919/imagenet_s919_vit_b_32.pt", 544.6, "ViT-B/32", "imagenet_s919"),
}

# ----------------------------------------------------------------------------- the network


class MLP(nn.Module):
    """dim -> hidden -> hidden -> dim with ReLU between (ffn1/ffn2; keys `layers.N.{weight,bias}`)."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(dim, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, dim)])

    def forward(self, x):
        a, b, c = self.layers
        return c(F.relu(b(F.relu(a(x)))))


def sine_positions(h, w, dim, device, temperature=10000.0):
    """DETR's normalised sine positions for an unpadded h x w grid -> [h*w, dim]: the first dim/2
    channels encode y, the rest x, each as interleaved (sin, cos) pairs. Stateless, so no key."""
    half, scale, eps = dim // 2, 2 * math.pi, 1e-6
    y = torch.arange(1, h + 1, device=device, dtype=torch.float32) / (h + eps) * scale
    x = torch.arange(1, w + 1, device=device, dtype=torch.float32) / (w + eps) * scale
    i = torch.arange(half, device=device, dtype=torch.float32)
    freq = temperature ** (2 * torch.div(i, 2, rounding_mode="floor") / half)  # [half]

    def enc(v):  # [n] -> [n, half], channels (sin f0, cos f0, sin f1, cos f1, ...)
        a = v[:, None] / freq
        return torch.stack([a[:, 0::2].sin(), a[:, 1::2].cos()], dim=2).flatten(1)

    py, px = enc(y), enc(x)  # [h, half], [w, half]
    pos = torch.cat([py[:, None].expand(h, w, half), px[None].expand(h, w, half)], dim=2)  # [h, w, dim]
    return pos.reshape(h * w, dim)


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
        layer = DecoderLayer(dim, heads, dim_ffn)  # the official decoder deep-copies one layer: all start equal
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(n_layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, memory, pos, query_pos):
        query_pos = query_pos[None].expand(memory.shape[0], -1, -1)  # [Q, C] -> [B, Q, C]
        tgt, outs = torch.zeros_like(query_pos), []  # the target starts at zeros; queries are positions
        for layer in self.layers:
            tgt = layer(tgt, memory, pos, query_pos)
            outs.append(self.norm(tgt))
        return torch.stack(outs)  # [L, B, Q, C]


def text_embeddings(clip, names, config):
    """Class-name embeddings of the CLIP text tower -> unit-norm fp32 [K, C_t] on the CPU. On CUDA in fp16
    as the official `clip.load(..., device="cuda")` (unless text_fp32), on a copy: `clip` stays fp32."""
    templates = TEMPLATES if config.text_templates == "85" else None
    if torch.cuda.is_available():
        clip = copy.deepcopy(clip).cuda()
        if not config.text_fp32:
            clip_model.official_fp16(clip)
    return clip_model.text_embeddings(clip, list(names), templates=templates).float().cpu()


def resolve_arch(arch, arch_path=None):
    """A CLIP name or an existing file for clip_model.load: `arch` as given, else the absolute path
    recorded at training time (so a checkpoint loads from any working directory)."""
    if arch in clip_model.MODELS or os.path.isfile(str(arch)):
        return arch
    if arch_path and os.path.isfile(arch_path):
        return arch_path
    raise UserError(f"CLIP weights {arch!r} not found" + (f" (nor {arch_path!r})" if arch_path else "") +
                    ": pass the CLIP name or file (--arch / arch=)")


class ZUTIS(nn.Module):
    """ZUTIS (paper Fig. 2). `arch`: a ModelConfig, or a CLIP name/file with ModelConfig fields in `hparams`.
    `clip` passes a built clip_model.CLIP (its visual tower becomes the encoder); `encoder` and `text_emb`
    pass those parts, so a checkpoint that stores them needs no CLIP file. Parameter names equal the
    official checkpoint's (`query_embed`, `encoder.*`, `ffn1.*`, `ffn2.*`, `decoder.*`); the text
    embeddings are a non-persistent buffer [K, C_t] and the text tower is never kept."""

    def __init__(self, arch, categories, clip=None, encoder=None, text_emb=None, arch_path=None, **hparams):
        super().__init__()
        self.config = cfg = arch if isinstance(arch, ModelConfig) else ModelConfig.from_dict({}, arch=str(arch), **hparams)
        self.arch_path = arch_path  # the CLIP file by absolute path, for re-embedding new categories
        if clip is None and (encoder is None or text_emb is None):
            clip = clip_model.load(resolve_arch(cfg.arch, arch_path))[0]
        if text_emb is None:
            text_emb = text_embeddings(clip, categories, cfg)
        self.register_buffer("text_emb", text_emb.float(), persistent=False)
        self.categories = list(categories)
        # Registration order = key order: query_embed, encoder, ffn1, ffn2, decoder (as in the official file).
        encoder = encoder if encoder is not None else clip.visual
        dim = encoder.width
        self.query_embed = nn.Parameter(torch.randn(cfg.n_queries, dim))  # nn.Embedding's N(0, 1) init
        self.encoder = encoder.float()
        self.ffn1, self.ffn2 = MLP(dim, cfg.mlp_hidden), MLP(dim, cfg.mlp_hidden)
        self.decoder = Decoder(dim, cfg.n_heads, cfg.dim_ffn, cfg.n_layers)

    arch = property(lambda self: self.config.arch)
    hparams = property(lambda self: dataclasses.asdict(self.config))
    patch_size = property(lambda self: self.encoder.patch_size)

    def set_categories(self, names):
        """Re-embed a new category list (open vocabulary); label id = index, "background" should be 0."""
        clip = clip_model.load(resolve_arch(self.config.arch, self.arch_path))[0]
        self.text_emb = text_embeddings(clip, names, self.config).to(self.text_emb.device)
        self.categories = list(names)

    def forward(self, images):
        """images [B, 3, H, W] (normalised; H, W floored to the patch grid by the patch conv)
        -> {"mask_logits": [B, L, Q, 2h, 2w] (sigmoid = the mask proposals of every decoder layer),
            "patch_tokens": [B, 2h, 2w, C_t] (unit norm), "text_emb": [K, C_t], "logit_scale": float}."""
        tok = self.encoder.forward_dense(images, pos_interp=self.config.pos_interp)  # [B, h, w, C_v]
        B, h, w, C = tok.shape
        feat = F.interpolate(tok.permute(0, 3, 1, 2), scale_factor=2, mode="bilinear", align_corners=False)
        feat = feat.permute(0, 2, 3, 1)  # [B, C_v, 2h, 2w] -> [B, 2h, 2w, C_v]
        # The stop-gradient (paper section 3.3): the instance branch reads detached features, so the
        # encoder learns only from the semantic loss and the decoder only from the mask loss.
        memory = self.ffn1(feat.detach() if self.config.stop_grad else feat).flatten(1, 2)  # [B, 4hw, C_v]
        pos = sine_positions(2 * h, 2 * w, C, memory.device).to(memory.dtype)  # [4hw, C_v]
        hs = self.ffn2(self.decoder(memory, pos, self.query_embed))  # [L, B, Q, C_v]
        hs = hs / hs.norm(dim=-1, keepdim=True)  # unit mask embeddings; the memory is not normalised
        mask_logits = torch.einsum("lbqc,bnc->blqn", hs, memory).unflatten(-1, (2 * h, 2 * w))
        return {"mask_logits": mask_logits, "patch_tokens": self.semantic_tokens(feat),
                "text_emb": self.text_emb, "logit_scale": self.config.logit_scale}

    def semantic_tokens(self, feat):
        """[B, 2h, 2w, C_v] -> [B, 2h, 2w, C_t]: W = CLIP's visual.proj, then the official per-image
        LayerNorm over the whole (2h, 2w, C_t) map without affine, then per-token L2 norm (+1e-7)."""
        x = feat @ self.encoder.proj
        x = F.layer_norm(x, x.shape[1:])
        return x / (x.norm(dim=-1, keepdim=True) + 1e-7)


# ----------------------------------------------------------------------------- matcher and losses

class _BCELogs(torch.autograd.Function):
    """(log p, log(1 - p)), each clamped at -100 as F.binary_cross_entropy does. The gradient uses
    1 / max(x, 1e-12) (torch's BCE epsilon), so saturated probabilities give no inf * 0 = NaN."""

    @staticmethod
    def forward(ctx, p):
        ctx.save_for_backward(p)
        return torch.log(p).clamp(min=-100), torch.log(1 - p).clamp(min=-100)

    @staticmethod
    def backward(ctx, g_log_p, g_log_1mp):
        p, = ctx.saved_tensors
        return g_log_p / p.clamp(min=1e-12) - g_log_1mp / (1 - p).clamp(min=1e-12)


def dice_cost(p, gT):
    """p [..., Q, P] probabilities, gT [P, N] in {0, 1} -> [..., Q, N]: 1 - (2 p.g + 1) / (sum p + sum g + 1)."""
    return 1 - (2 * (p @ gT) + 1) / (p.sum(-1, keepdim=True) + gT.sum(0) + 1)


def bce_cost(p, gT):
    """Binary cross-entropy, mean over the P pixels (= F.binary_cross_entropy per pair): -(log p . g +
    log(1 - p) . (1 - g)) / P, by two matrix products instead of a Q x N x P tensor."""
    log_p, log_1mp = _BCELogs.apply(p)
    return -(log_p @ gT + log_1mp @ (1 - gT)) / p.shape[-1]


# The mask loss, which is also the matching cost (official: dice + BCE, weight 1 each): name -> (pairwise
# cost function, weight). The matcher minimises the weighted sum, the criterion sums it over matched pairs
# and logs each term as loss_<name>. To change it: docs/train.md, "Changing the mask loss".
MASK_TERMS = {"dice": (dice_cost, 1.0), "bce": (bce_cost, 1.0)}


def pairwise_costs(probs, gt, terms=None):
    """Every term of `terms` (default MASK_TERMS) between every predicted and every target mask, unweighted.
    probs [..., Q, P] in [0, 1]; gt [N, P] in {0, 1} -> {name: [..., Q, N] fp32}, differentiable."""
    with torch.autocast(probs.device.type, enabled=False):
        p, gT = probs.float(), gt.float().t()  # gT: [P, N]
        return {name: fn(p, gT) for name, (fn, _) in (MASK_TERMS if terms is None else terms).items()}


class HungarianMatcher:
    """One-to-one assignment of class-agnostic queries to target masks (DETR's matcher with the official
    costs: the weighted MASK_TERMS, no class term), solved by scipy's linear_sum_assignment.

    __call__(probs, gt):
        probs: float [Q, P] or [L, Q, P], mask probabilities of Q queries over P pixels (per layer L)
        gt:    {0, 1} [N, P], the N target masks at the same P pixels
    returns: a list with one (query_idx, target_idx) pair per layer (one pair for 2-D probs); each an
        int64 tensor of length min(Q, N), so that query_idx[i] is matched to target target_idx[i]."""

    def __init__(self, terms=None):
        self.terms = MASK_TERMS if terms is None else terms

    def cost(self, probs, gt):
        """probs [..., Q, P], gt [N, P] -> (sum of the weighted terms, {name: weighted term}), [..., Q, N] fp32."""
        parts = {k: self.terms[k][1] * c for k, c in pairwise_costs(probs, gt, self.terms).items()}
        return sum(parts.values()), parts

    @staticmethod
    def assign(cost):
        """cost [..., Q, N] -> one (query_idx, target_idx) pair per leading index; one host copy for all."""
        c = cost.detach().float().cpu()
        assert torch.isfinite(c).all(), f"non-finite matching cost (min {c.min()}, max {c.max()})"
        out = []
        for m in c.reshape(-1, *c.shape[-2:]).numpy():
            q, t = linear_sum_assignment(m)
            out.append((torch.as_tensor(q, dtype=torch.int64), torch.as_tensor(t, dtype=torch.int64)))
        return out

    @torch.no_grad()
    def __call__(self, probs, gt):
        return self.assign(self.cost(probs, gt)[0])


def check_ignore_index(ignore_index, n_categories):
    """The ignore id must never be a label id (0 .. K-1): with 920 classes 255 is the class "pug"."""
    if 0 <= ignore_index < n_categories:
        raise UserError(f"ignore_index {ignore_index} is a label id of the {n_categories} categories: use one "
                        f">= {n_categories} (categories.recipe gives 255, or 1000 above 255 classes)")


def semantic_ce(tokens, semantic, text_emb, logit_scale=1.0, ignore_index=255):
    """Cross-entropy of logit_scale * cos(text, token) at the label size. The official code upsamples
    the tokens then takes dot products; upsampling the K logits instead is the same linear map, cheaper."""
    K = text_emb.shape[0]
    check_ignore_index(ignore_index, K)
    logits = logit_scale * torch.einsum("kc,bhwc->bkhw", text_emb.float(), tokens.float())  # [B, K, 2h, 2w]
    logits = F.interpolate(logits, size=semantic.shape[-2:], mode="bilinear", align_corners=False)
    target = semantic.to(logits.device).long()
    valid = target != ignore_index
    if ((target[valid] < 0) | (target[valid] >= K)).any():
        raise ValueError(f"semantic labels outside [0, {K}) and != ignore_index {ignore_index}")
    if not valid.any():
        return logits.sum() * 0  # F.cross_entropy would return NaN on an all-ignored batch
    return F.cross_entropy(logits, target, ignore_index=ignore_index)


def mask_losses(mask_logits, instance_masks, terms=None):
    """Official mask loss: per image with any target pixel, per decoder layer, sigmoid proposals are
    upsampled (bilinear, as probabilities) to the target size, matched, and the matched costs summed.
    Returns (per-layer sums [L], {term name: detached sum of that weighted term})."""
    matcher = HungarianMatcher(terms)
    zero = mask_logits.float().sum() * 0  # keeps the decoder in the graph when nothing is matched (DDP)
    layers, sums = [zero] * mask_logits.shape[1], {k: zero.detach() for k in matcher.terms}
    for b, gt in enumerate(instance_masks):
        if gt.numel() == 0 or not gt.any():
            continue  # the official code skips images whose instance masks are all empty
        g = gt.to(mask_logits.device, torch.float32).flatten(1)  # [N, H*W]
        p = F.interpolate(mask_logits[b].float().sigmoid(), size=gt.shape[-2:], mode="bilinear",
                          align_corners=False).flatten(2)  # [L, Q, 2h, 2w] -> [L, Q, H*W]
        cost, parts = matcher.cost(p, g)  # [L, Q, N]
        for l, (qi, ti) in enumerate(matcher.assign(cost)):
            qi, ti = qi.to(cost.device), ti.to(cost.device)
            layers[l] = layers[l] + cost[l, qi, ti].sum()  # the matched cost itself is the loss (official)
            sums = {k: s + parts[k][l, qi, ti].detach().sum() for k, s in sums.items()}
    return layers, sums


def criterion(outputs, batch, ignore_index=255, lambda_mask=1.0, terms=None):
    """ZUTIS loss = CE(semantic) + lambda_mask * sum over decoder layers of the matched mask terms
    (`terms`, default MASK_TERMS: dice + BCE).

    outputs: ZUTIS.forward's dict. batch: {"semantic": long [B, H, W] (label ids or ignore_index),
    "instance_masks": list of bool [n_b, H, W]}. As the official criterion, the mask loss is summed
    over matched pairs and layers and divided by the batch size. Computed in fp32 whatever the autocast.
    Returns fp32 scalars: loss, loss_ce, loss_mask (with grad), and detached loss_<term> for each mask
    term (weighted; they add up to loss_mask) and loss_mask_<l> for each decoder layer."""
    mask_logits = outputs["mask_logits"]
    with torch.autocast(mask_logits.device.type, enabled=False):
        loss_ce = semantic_ce(outputs["patch_tokens"], batch["semantic"], outputs["text_emb"],
                              outputs.get("logit_scale", 1.0), ignore_index)
        layers, sums = mask_losses(mask_logits, batch["instance_masks"], terms)
        denom = float(mask_logits.shape[0])  # the batch size
        layers = [x / denom for x in layers]
        loss_mask = torch.stack(layers).sum()
        out = {"loss": loss_ce + lambda_mask * loss_mask, "loss_ce": loss_ce, "loss_mask": loss_mask}
        out.update({f"loss_{k}": (s / denom).float() for k, s in sums.items()})
        out.update({f"loss_mask_{l}": x.detach() for l, x in enumerate(layers)})
    return out


# ----------------------------------------------------------------------------- inference (official rules)

@torch.no_grad()
def semantic_from_outputs(outputs, size, chunk=64):
    """argmax over classes (background included, no threshold) of the raw-cosine logits upsampled
    bilinearly to `size` (H, W) -> long [H, W]. Chunked over classes so 920 classes at 1024^2 fit."""
    logits = torch.einsum("kc,hwc->khw", outputs["text_emb"].float(), outputs["patch_tokens"][0].float())  # [K, 2h, 2w]
    best_v = torch.full(tuple(size), -math.inf, device=logits.device)
    best_i = torch.zeros(tuple(size), dtype=torch.long, device=logits.device)
    for k0 in range(0, logits.shape[0], chunk):
        up = F.interpolate(logits[None, k0:k0 + chunk], size=tuple(size), mode="bilinear", align_corners=False)[0]
        v, i = up.max(0)  # [H, W]; the first maximum wins, as torch.argmax
        better = v > best_v
        best_v, best_i = torch.where(better, v, best_v), torch.where(better, i + k0, best_i)
    return best_i


def mask_nms(masks, scores, labels, iou=0.3, score_floor=0.001):
    """Class-wise greedy NMS on mask IoU (official "hard" NMS). masks bool [N, H, W], scores [N],
    labels [N] -> kept indices (long, by descending score). Within a class the best mask is always kept;
    another survives if its IoU with every kept mask is <= iou and its score > score_floor."""
    keep, flat = [], masks.flatten(1).float()  # [N, H*W]
    for c in labels.unique():
        idx = (labels == c).nonzero()[:, 0]
        order = idx[torch.sort(scores[idx], descending=True, stable=True).indices]
        m = flat[order]
        inter, area = m @ m.t(), m.sum(1)  # [n, n] pixel counts (exact in fp32 below 2^24 pixels)
        ious = (inter / (area[:, None] + area[None] - inter + 1e-7)).cpu()
        alive = (scores[order] > score_floor).cpu()
        alive[0] = True
        for i in range(len(order)):
            if alive[i]:
                keep.append(int(order[i]))
                alive &= ~(ious[i] > iou)
    keep = torch.tensor(keep, dtype=torch.long, device=scores.device)
    return keep[torch.sort(scores[keep], descending=True, stable=True).indices]


def class_probability(cos, rule="sigmoid", logit_scale=1.0, temperature=5.0):
    """A mask's class probabilities from its cosines [Q, K] with the text embeddings: the official
    sigmoid(5 cos) per class, or "softmax" (the paper's Eq. 4) softmax(logit_scale cos) over classes."""
    return torch.sigmoid(temperature * cos) if rule == "sigmoid" else torch.softmax(logit_scale * cos, dim=-1)


def mean_token_cos(binary, tokens, text_emb):
    """The official instance class rule: binary masks [Q, N], unit tokens [N, C_t], text [K, C_t] -> cos [Q, K]
    between each mask's L2-normalised mean token and each text embedding."""
    mean = (binary @ tokens) / (binary.sum(1, keepdim=True) + 1e-7)  # [Q, C_t]
    return (mean / (mean.norm(dim=-1, keepdim=True) + 1e-7)) @ text_emb.t()


@torch.no_grad()
def instances_from_outputs(outputs, size, t=0.5, nms="hard", nms_iou=0.3, class_prob="sigmoid",
                           temperature=5.0, score_floor=0.001):
    """Official instance rules on the last decoder layer: low-res binary masks P > t, confidence = mean
    P inside, class from the mean unit token inside (sigmoid(5 cos), or "softmax" = the paper's
    softmax(logit_scale cos)), score = confidence x max class probability; masks upsampled (bilinear, as
    probabilities) to `size` and binarised at t; background and empty masks dropped; class-wise NMS.
    -> {"masks": bool [N, H, W], "labels": long [N], "scores": float [N]} by descending score."""
    if nms not in ("hard", "none") or class_prob not in ("sigmoid", "softmax"):
        raise UserError(f"nms must be hard|none and class_prob sigmoid|softmax, got {nms!r}, {class_prob!r}")
    probs = outputs["mask_logits"][0, -1].float().sigmoid()  # [Q, 2h, 2w]
    tokens = outputs["patch_tokens"][0].float().flatten(0, 1)  # [2h, 2w, C_t] -> [4hw, C_t]
    binary = (probs > t).flatten(1).float()  # [Q, 4hw]
    conf = (probs.flatten(1) * binary).sum(1) / (binary.sum(1) + 1e-7)
    cos = mean_token_cos(binary, tokens, outputs["text_emb"].float())  # [Q, K]
    max_prob, labels = class_probability(cos, class_prob, outputs.get("logit_scale", 1.0), temperature).max(-1)
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


# ----------------------------------------------------------------------------- checkpoints

def encoder_from_state_dict(sd):
    """An untrained CLIP visual tower shaped like the `encoder.*` tensors of `sd` (loaded afterwards)."""
    width, _, patch, _ = sd["encoder.conv1.weight"].shape
    grid = round((sd["encoder.positional_embedding"].shape[0] - 1) ** 0.5)
    layers = len({k.split(".")[3] for k in sd if k.startswith("encoder.transformer.resblocks.")})
    return clip_model.VisionTransformer(patch * grid, patch, width, layers, max(1, width // 64),
                                        sd["encoder.proj"].shape[1])


def load_official(path_or_state_dict, categories, arch=None, clip=None, **overrides):
    """An official ZUTIS file (a bare state dict of 275 fp32 tensors in our key layout) -> ZUTIS, loaded
    strictly, with the official behaviour (pos_interp "official", logit_scale 1, bare-name texts). The
    file holds no category names and no text tower: the text embeddings come from `categories` and the
    released CLIP of the same arch (ViT-B/16 or ViT-B/32, told by the patch size) or `arch`."""
    sd = path_or_state_dict
    sd = common.torch_load(sd, "official ZUTIS checkpoint") if isinstance(sd, (str, os.PathLike)) else sd
    if not isinstance(sd, dict) or "encoder.conv1.weight" not in sd or "config" in sd:
        raise UserError("not an official ZUTIS state dict (no encoder.conv1.weight; train.py checkpoints "
                        "load with load_checkpoint)")
    width, patch = sd["encoder.conv1.weight"].shape[::3]
    if arch is None and (width != 768 or patch not in (16, 32)):
        raise UserError(f"cannot tell the CLIP arch of encoder.conv1.weight (width {width}, patch {patch}): "
                        "pass arch= (a CLIP name or path)")
    keys = {"n_queries": "query_embed", "dim_ffn": "decoder.layers.0.linear1.weight", "mlp_hidden": "ffn1.layers.0.weight"}
    hp = {name: sd[k].shape[0] for name, k in keys.items() if k in sd}  # heads cannot be read: 8, as official
    layers = {int(k.split(".")[2]) for k in sd if k.startswith("decoder.layers.")}
    hp.update({"n_layers": max(layers) + 1} if layers else {})
    hp.update(pos_interp="official", logit_scale=1.0, text_templates="none", **overrides)
    return common.load_strict(ZUTIS(arch or f"ViT-B/{patch}", categories, clip=clip, **hp), sd, "official checkpoint")


def to_official(model):
    """Our model -> the official layout (same names; the official key order): an OrderedDict of CPU
    tensors that `torch.save` writes as a file the official code loads with strict=True."""
    sd = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in model.state_dict().items()}
    group = {"query_embed": 0, "encoder": 1, "ffn1": 2, "ffn2": 3, "decoder": 4}
    # within encoder the official file lists its own parameters before its submodules
    rank = lambda k: (group.get(k.split(".")[0], 5), k.startswith("encoder.") and k.count(".") > 1)  # noqa: E731
    return OrderedDict((k, sd[k].detach().cpu().clone()) for k in sorted(sd, key=rank))


def download_official(name, root=None):
    """Fetch a published checkpoint into ~/.cache/zutis (a cached copy is reused; $ZUTIS_MIRROR first,
    docs/weights.md), print its size and sha256, and check the size against the official README's (to its
    0.1 MB precision); a file of another size is deleted."""
    if name not in OFFICIAL:
        raise UserError(f"unknown official checkpoint {name!r}: use one of {sorted(OFFICIAL)}")
    url, mb = OFFICIAL[name][:2]
    path = downloads.download(url, root or os.path.expanduser("~/.cache/zutis"))
    size = os.path.getsize(path)
    print(f"{name}: {path} ({size} bytes, sha256 {downloads.sha256_of(path)})", flush=True)
    if round(size / 1e6, 1) != mb:
        os.remove(path)
        raise UserError(f"{path} had {size} bytes but the official README says ~{mb} MB, so it was deleted: retry")
    return path


def from_train_checkpoint(ck, categories=None, arch=None, **overrides):
    """A train.py checkpoint dict -> ZUTIS. The encoder is shaped from the state dict and the trained
    categories' text embeddings are stored, so no CLIP file is read unless other `categories` (or a
    text setting in `overrides`) need new embeddings; then `arch`, else the stored CLIP name or path."""
    cfg, sd = ck["config"], ck["model"]
    if "encoder.conv1.weight" not in sd or "categories" not in cfg:
        raise UserError("checkpoint lacks encoder weights or the category list: not a zutis train.py checkpoint")
    mcfg = ModelConfig.from_dict(cfg, **overrides, **({"arch": arch} if arch else {}))
    same_text = (categories is None or list(categories) == cfg["categories"]) and \
        not {"text_templates", "text_fp32"} & set(overrides)
    model = ZUTIS(mcfg, categories or cfg["categories"], encoder=encoder_from_state_dict(sd),
                  text_emb=ck.get("text_emb") if same_text else None, arch_path=None if arch else cfg.get("arch_path"))
    return common.load_strict(model, sd, "checkpoint")


def load_checkpoint(spec, categories=None, device="cpu", arch=None, **overrides):
    """A zutis train.py checkpoint ({"model", "config", "text_emb", ...}), an official ZUTIS file, or
    "official:<name>" (see OFFICIAL; downloaded on first use) -> ZUTIS in eval mode on `device`.
    `categories` (a built-in name, file, comma list or list) replaces the stored / default list;
    `arch` (a CLIP name or file) replaces the stored one; `overrides` are ModelConfig fields."""
    cats = None if categories is None else get_categories(categories)
    spec = str(spec)
    if spec.startswith("official:"):
        name = spec.split(":", 1)[1]
        model = load_official(download_official(name), cats or get_categories(OFFICIAL[name][3]),
                              arch=arch or OFFICIAL[name][2], **overrides)
    else:
        obj = common.torch_load(spec, f"checkpoint (a file, or official:<name> with a name in {sorted(OFFICIAL)})")
        if isinstance(obj, dict) and "model" in obj and "config" in obj:
            model = from_train_checkpoint(obj, cats, arch, **overrides)
        elif isinstance(obj, dict) and "query_embed" in obj:
            if cats is None:
                raise UserError("official ZUTIS files store no category names: pass categories (e.g. 'coco')")
            model = load_official(obj, cats, arch=arch, **overrides)
        elif isinstance(obj, dict) and "visual.conv1.weight" in obj:
            raise UserError(f"{spec!r} holds CLIP weights, not a ZUTIS segmenter: give it to --arch, and --ckpt "
                            "a train.py ckpt.pt or an official ZUTIS file")
        else:
            raise UserError(f"{spec!r} is neither a zutis train.py checkpoint nor an official ZUTIS state dict")
    return model.to(device).eval()


if __name__ == "__main__":
    common.library_main(__doc__, "train.py trains it and evaluate.py runs it (python train.py --help, python "
                                 "evaluate.py --help).")
