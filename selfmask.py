"""SelfMask saliency (Shin, Albanie, Xie 2022), the way ZUTIS uses it to pseudo-label archive images
(its training-free fallbacks are in saliency.py).

What is here (library only; importing it does no work):
- `SelfMask`: DINO ViT-S/8 encoder + 6-layer post-norm DETR decoder with 20 learned queries; a mask is
  sigmoid(query . patch features upsampled x2), a 3-layer MLP scores each query's objectness.
  Parameter names and shapes equal the released `selfmask_nq20.pt`, so it loads with strict=True.
- `load_selfmask(name_or_path)`: a released name (downloaded once into ~/.cache/selfmask) or a path.
- `predict_saliency(model, image) -> bool [H, W]`: ZUTIS's protocol (shorter side 512, ImageNet
  norm, zero-pad to x8, masks x4 bilinear then cropped, argmax objectness, > 0.5, bilateral solver,
  > 0.5, nearest resize to the original size). `prepare` / `coarse_masks` / `finish_mask` are the same
  steps split so pseudo_label.py can decode in workers and batch same-shaped images on the GPU.
- The bilateral solver (`bilateral_solve`) and the two training-free fallbacks (`boundary_saliency`,
  `spectral_saliency`) live in saliency.py.

References: ZUTIS paper section 3.2; selfmask_facts.md sections 1-3 (behaviour of NoelShin/selfmask
networks/* and zutis datasets/index_dataset.py `generate_pseudo_masks`).
"""
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import IMAGENET_MEAN, IMAGENET_STD, UserError
from saliency import bilateral_solve

_SM = "https://www.robots.ox.ac.uk/~vgg/research/selfmask/shared_files"
_GH = "https://github.com/NoelShin/selfmask/releases/download/v1.0.0"
# name -> (url, file name in the cache). No SHA256 has been published for any of these files;
# clip_model.download prints the hash of every fresh download so it can be recorded in the README.
SELFMASK_MODELS = {
    "selfmask_nq20": (f"{_SM}/selfmask_nq20.pt", "selfmask_nq20.pt"),
    "selfmask_nq10": (f"{_SM}/selfmask_nq10.pt", "selfmask_nq10.pt"),
    # the first release ({"model": ...} trainer files); same basename, so cached under another name
    "selfmask_nq20_v1": (f"{_GH}/selfmask_nq20.pt", "selfmask_nq20_v1.0.0.pt"),
    "selfmask_nq10_v1": (f"{_GH}/selfmask_nq10.pt", "selfmask_nq10_v1.0.0.pt"),
}


# ----------------------------------------------------------------------------- network

class Attention(nn.Module):
    """timm/DINO multi-head self-attention (fused qkv), computed with SDPA (flash/mem-efficient
    kernels on GPU, a fused kernel on CPU): same maths as softmax(q k^T / sqrt(d)) v."""

    def __init__(self, dim, n_heads):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.n_heads, C // self.n_heads)  # [B, N, 3C] -> [B, N, 3, nh, hd]
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, nh, N, hd]
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))  # [B, nh, N, hd] -> [B, N, C]


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm ViT block; LayerNorm eps 1e-6 as in DINO."""

    def __init__(self, dim, n_heads, mlp_ratio=4):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, n_heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), Mlp(dim, dim * mlp_ratio)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x)  # [B, 3, H, W] -> [B, C, H/p, W/p]


class ViT(nn.Module):
    """DINO's ViT (timm names). Always built for 224 px (a 28x28 table at patch 8), bicubically
    resized to the actual token grid; the input is zero-padded right/bottom to a patch multiple."""

    def __init__(self, patch_size=8, dim=384, depth=12, n_heads=6, img_size=224):
        super().__init__()
        self.patch_size, self.grid = patch_size, img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid ** 2 + 1, dim))
        self.blocks = nn.ModuleList([Block(dim, n_heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def pos_for(self, h, w):
        # Compare the grid (h, w), not the token count: the official check compares counts and would
        # reuse the 28x28 table for e.g. a 14x56 grid (selfmask_facts.md 1.1).
        if (h, w) == (self.grid, self.grid):
            return self.pos_embed
        g, C = self.grid, self.pos_embed.shape[-1]
        grid = self.pos_embed[:, 1:].reshape(1, g, g, C).permute(0, 3, 1, 2)  # [1, g*g, C] -> [1, C, g, g]
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        grid = grid.permute(0, 2, 3, 1).reshape(1, h * w, C)  # [1, C, h, w] -> [1, h*w, C]
        return torch.cat([self.pos_embed[:, :1], grid], dim=1)

    def forward(self, x):
        """Normalised image [B, 3, H, W] -> last-layer patch tokens after the final norm [B, h*w, C], (h, w)."""
        p = self.patch_size
        x = F.pad(x, (0, -x.shape[-1] % p, 0, -x.shape[-2] % p))  # zero = the mean colour after normalisation
        x = self.patch_embed(x)
        B, C, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)  # [B, C, h, w] -> [B, h*w, C]
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1) + self.pos_for(h, w)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)[:, 1:], (h, w)


class DecoderLayer(nn.Module):
    """DETR decoder layer, post-norm, ReLU FFN, dropout 0. The queries' embedding is added to q and k
    of self-attention and to q of cross-attention; the memory gets no positional encoding."""

    def __init__(self, dim, n_heads, dim_ffn):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, n_heads, batch_first=True)
        self.multihead_attn = nn.MultiheadAttention(dim, n_heads, batch_first=True)
        self.linear1, self.linear2 = nn.Linear(dim, dim_ffn), nn.Linear(dim_ffn, dim)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, tgt, memory, query_pos):
        q = tgt + query_pos
        tgt = self.norm1(tgt + self.self_attn(q, q, tgt, need_weights=False)[0])
        tgt = self.norm2(tgt + self.multihead_attn(tgt + query_pos, memory, memory, need_weights=False)[0])
        return self.norm3(tgt + self.linear2(F.relu(self.linear1(tgt))))


class Decoder(nn.Module):
    def __init__(self, dim, n_heads, dim_ffn, n_layers):
        super().__init__()
        self.layers = nn.ModuleList([DecoderLayer(dim, n_heads, dim_ffn) for _ in range(n_layers)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, tgt, memory, query_pos):
        for layer in self.layers:
            tgt = layer(tgt, memory, query_pos)
        return self.norm(tgt)


class MLP(nn.Module):
    def __init__(self, dims):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:])])

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class SelfMask(nn.Module):
    """The released SelfMask. Defaults = selfmask_nq20.pt (36,174,337 parameters)."""

    def __init__(self, n_queries=20, patch_size=8, dim=384, depth=12, n_heads=6, n_dec_layers=6, dim_ffn=1536):
        super().__init__()
        self.encoder = ViT(patch_size, dim, depth, n_heads)
        self.decoder = Decoder(dim, n_heads, dim_ffn, n_dec_layers)
        self.query_embed = nn.Parameter(torch.randn(n_queries, dim))  # an nn.Embedding weight upstream
        self.ffn = MLP([dim, dim, dim, 1])

    def forward(self, x):
        """Normalised images [B, 3, H, W] -> {"mask_probs": [B, Q, h*2, w*2] (stride 4 of the padded
        input), "objectness": [B, Q] logits}."""
        tokens, (h, w) = self.encoder(x)  # [B, h*w, C]
        B, N, C = tokens.shape
        pos = self.query_embed[None].expand(B, -1, -1)  # [Q, C] -> [B, Q, C]
        queries = self.decoder(torch.zeros_like(pos), tokens, pos)  # [B, Q, C]
        feats = tokens.transpose(1, 2).reshape(B, C, h, w)  # [B, h*w, C] -> [B, C, h, w]
        feats = F.interpolate(feats, scale_factor=2, mode="bilinear", align_corners=False)
        logits = torch.einsum("bqc,bchw->bqhw", queries, feats)  # plain dot product, no temperature
        return {"mask_probs": logits.sigmoid(), "objectness": self.ffn(queries).squeeze(-1)}


# ----------------------------------------------------------------------------- loading

def load_state_dict_strict(model, state_dict, source="checkpoint"):
    """Strict load with one clear error: unwraps {"model": ...}; names missing/unexpected keys and
    the first key whose shape differs."""
    if isinstance(state_dict, dict) and isinstance(state_dict.get("model"), dict):
        state_dict = state_dict["model"]
    if not isinstance(state_dict, dict):
        raise UserError(f"{source} does not hold a SelfMask state dict")
    own = model.state_dict()
    state_dict = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in state_dict.items()}
    missing, unexpected = sorted(set(own) - set(state_dict)), sorted(set(state_dict) - set(own))
    if missing or unexpected:
        raise UserError(f"{source} is not a SelfMask checkpoint: {len(missing)} missing keys "
                        f"{missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}")
    for k, v in own.items():
        if tuple(state_dict[k].shape) != tuple(v.shape):
            raise UserError(f"{source}: key {k!r} has shape {list(state_dict[k].shape)}, "
                            f"SelfMask expects {list(v.shape)}")
    model.load_state_dict(state_dict, strict=True, assign=True)  # assign: works for a meta-device model
    return model


def _read(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle/zip errors come in many types; the message is what matters
        raise UserError(f"cannot read {path!r} as a SelfMask checkpoint: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else e}. If it is "
                        "a trainer file you trust, extract the weights: python -c \"import torch; torch.save("
                        f"torch.load('{path}', weights_only=False)['model'], 'selfmask_weights.pt')\"") from None


def selfmask_hint(name="selfmask_nq20"):
    url = SELFMASK_MODELS.get(name, SELFMASK_MODELS["selfmask_nq20"])[0]
    return (f"download {url} and pass its path with --selfmask PATH, or use the training-free "
            "fallback --saliency boundary")


def load_selfmask(name_or_path="selfmask_nq20", device="cpu", download_root=None):
    """A released name (SELFMASK_MODELS) or a local file (bare state dict or {"model": ...}) ->
    SelfMask in eval mode. The query count is read from `query_embed` (nq20 or nq10)."""
    if os.path.isfile(str(name_or_path)):
        path = str(name_or_path)
    elif name_or_path in SELFMASK_MODELS:
        import clip_model
        url, fname = SELFMASK_MODELS[name_or_path]
        root = download_root or os.path.expanduser("~/.cache/selfmask")
        try:
            path = clip_model.download(url, root, sha256=None, filename=fname)
        except UserError as e:
            raise UserError(f"{e}; {selfmask_hint(name_or_path)}") from None
    else:
        raise UserError(f"SelfMask checkpoint {name_or_path!r} not found (names: "
                        f"{sorted(SELFMASK_MODELS)}); {selfmask_hint()}")
    sd = _read(path)
    inner = sd.get("model", sd) if isinstance(sd, dict) else sd
    q = inner.get("query_embed") if isinstance(inner, dict) else None
    with torch.device("meta"):  # no random init of 36 M parameters that are overwritten anyway
        model = SelfMask(n_queries=q.shape[0] if torch.is_tensor(q) and q.ndim == 2 else 20)
    return load_state_dict_strict(model, sd, source=path).to(device).eval()


# ----------------------------------------------------------------------------- inference protocol

def to_rgb(image):
    """PIL image (any mode) or uint8 array [H, W], [H, W, 1|3|4] -> uint8 RGB array [H, W, 3]."""
    if hasattr(image, "convert"):
        return np.asarray(image.convert("RGB"))
    a = np.asarray(image)
    if a.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {a.dtype}")
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected an image [H, W(, 1|3|4)], got shape {a.shape}")
    return np.ascontiguousarray(np.repeat(a, 3, -1) if a.shape[-1] == 1 else a[..., :3])


def resize_shorter(rgb, short_side=512, max_side=2048, resample=None):
    """torchvision's int-size Resize on a PIL image (shorter side -> short_side, longer side
    int(short_side * long / short), PIL bilinear). `max_side` caps the longer side (None = no cap,
    the official behaviour): only images more elongated than max_side/short_side are affected."""
    from PIL import Image
    H, W = rgb.shape[:2]
    short, long = min(H, W), max(H, W)
    new_short, new_long = short_side, int(short_side * long / short)
    if max_side is not None and new_long > max_side:
        new_short, new_long = max(1, int(max_side * new_short / new_long)), max_side
    h, w = (new_short, new_long) if H <= W else (new_long, new_short)
    if (h, w) == (H, W):
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((w, h), resample or Image.BILINEAR))


def prepare(image, short_side=512, max_side=2048):
    """Image -> (normalised float tensor [3, h, w] at the working scale, the same image as uint8
    [h, w, 3] for the bilateral solver, original (H, W))."""
    rgb = to_rgb(image)
    ref = resize_shorter(rgb, short_side, max_side)
    x = torch.tensor(ref).permute(2, 0, 1).float().div_(255)  # [h, w, 3] -> [3, h, w]
    x = (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    return x, ref, rgb.shape[:2]


@torch.no_grad()
def coarse_masks(model, x):
    """Same-sized normalised images [B, 3, h, w] -> the top-objectness query's mask > 0.5, bool [B, h, w]
    (on the model's device). Only the chosen query is upsampled x4: bilinear interpolation is per
    channel, so this equals upsampling all 20 and picking one, at 1/20 of the cost."""
    B, _, h, w = x.shape
    out = model(x)
    best = out["objectness"].argmax(dim=1)  # [B]
    probs = out["mask_probs"][torch.arange(B, device=x.device), best].float()  # [B, Q, h', w'] -> [B, h', w']
    probs = F.interpolate(probs[:, None], scale_factor=4, mode="bilinear", align_corners=False)[:, 0]
    return probs[:, :h, :w] > 0.5  # crop the padding after upsampling, as the official code does


def finish_mask(mask, ref=None, orig_size=None, bilateral=True):
    """Coarse bool mask [h, w] at the working scale -> (bilateral solver on `ref`, > 0.5) -> nearest
    resize to orig_size (H, W) -> bool numpy [H, W]."""
    mask = mask.cpu().numpy() if torch.is_tensor(mask) else np.asarray(mask)
    if bilateral:
        mask = bilateral_solve(ref, mask.astype(np.float64)) > 0.5
    if orig_size is not None and tuple(orig_size) != mask.shape:
        m = torch.from_numpy(mask.astype(np.uint8))[None, None]
        mask = F.interpolate(m, size=tuple(orig_size), mode="nearest")[0, 0].numpy()
    return mask.astype(bool)


def predict_saliency(model, image, bilateral=True, short_side=512, max_side=2048):
    """One image (PIL or uint8 array) -> bool saliency mask [H, W] at its original size."""
    device = next(model.parameters()).device
    x, ref, size = prepare(image, short_side, max_side)
    return finish_mask(coarse_masks(model, x[None].to(device))[0], ref, size, bilateral)


def predict_saliency_batch(model, images, bilateral=True, short_side=512, max_side=2048):
    """Several images: those whose working size matches run as one batch on the model's device."""
    device = next(model.parameters()).device
    prepped = [prepare(im, short_side, max_side) for im in images]
    groups = {}
    for i, (x, _, _) in enumerate(prepped):
        groups.setdefault(tuple(x.shape), []).append(i)
    out = [None] * len(images)
    for idx in groups.values():
        coarse = coarse_masks(model, torch.stack([prepped[i][0] for i in idx]).to(device))
        for j, i in enumerate(idx):
            out[i] = finish_mask(coarse[j], prepped[i][1], prepped[i][2], bilateral)
    return out
