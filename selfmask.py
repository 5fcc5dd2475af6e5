"""SelfMask saliency (Shin, Albanie, Xie 2022), the way ZUTIS uses it to pseudo-label archive images,
plus two training-free fallbacks for when no SelfMask checkpoint is at hand.

What is here (library only; importing it does no work):
- `SelfMask`: DINO ViT-S/8 encoder + 6-layer post-norm DETR decoder with 20 learned queries; a mask is
  sigmoid(query . patch features upsampled x2), a 3-layer MLP scores each query's objectness.
  Parameter names and shapes equal the released `selfmask_nq20.pt`, so it loads with strict=True.
- `load_selfmask(name_or_path)`: a released name (downloaded once into ~/.cache/selfmask) or a path.
- `predict_saliency(model, image) -> bool [H, W]`: ZUTIS's protocol (shorter side 512, ImageNet
  norm, zero-pad to x8, masks x4 bilinear then cropped, argmax objectness, > 0.5, bilateral solver,
  > 0.5, nearest resize to the original size). `prepare` / `coarse_masks` / `finish_mask` are the same
  steps split so pseudo_label.py can decode in workers and batch same-shaped images on the GPU.
- `bilateral_solve(reference, target)`: Barron & Poole's fast bilateral solver, grid form (the variant
  TokenCut and SelfMask use), vectorised numpy + scipy.sparse CG.
- Fallbacks, loud in the log: `boundary_saliency(image)` (colour contrast to the border's colour
  clusters) and `spectral_saliency(image, clip_visual)` (normalised cut of ViT patch tokens).

References: ZUTIS paper section 3.2; selfmask_facts.md sections 1-3 (behaviour of NoelShin/selfmask
networks/* and zutis datasets/index_dataset.py `generate_pseudo_masks`); Barron & Poole, "The Fast
Bilateral Solver", ECCV 2016; Shi & Malik, "Normalized Cuts and Image Segmentation", 2000.
"""
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import IMAGENET_MEAN, IMAGENET_STD, UserError

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


# ----------------------------------------------------------------------------- bilateral solver

RGB_TO_YUV = np.array([[0.299, 0.587, 0.114],  # JPEG YCbCr (BT.601, full range), offset 128 on chroma
                       [-0.168736, -0.331264, 0.5],
                       [0.5, -0.418688, -0.081312]])
YUV_OFFSET = np.array([0.0, 128.0, 128.0])


class BilateralGrid:
    """Barron & Poole's simplified bilateral grid over (x, y, Y, U, V). Each pixel falls into one
    vertex (its integer coordinates divided by the sigmas); splat = sum pixels into vertices,
    slice = read the vertex value back, blur = [1 2 1] along each of the 5 axes between occupied
    vertices. Built for speed (it runs on every archive image): splat/slice are a bincount and a
    gather on the pixel -> vertex index instead of an N_pixels-sized sparse matrix, vertices are
    found with two 16-bit radix sorts instead of a general sort, and each neighbour pair is searched
    once (the blur is symmetric)."""

    def __init__(self, ref, sigma_spatial=16, sigma_luma=16, sigma_chroma=8):
        H, W = ref.shape[:2]
        rgb = ref.reshape(-1, 3).astype(np.float64)  # float64 like the original
        # Elementwise, not a BLAS matmul: threaded BLAS on busy cores cost 20x here (measured).
        yuv = [sum(rgb[:, c] * RGB_TO_YUV[k, c] for c in range(3)) + YUV_OFFSET[k] for k in range(3)]
        # Per-axis integer coordinates, shifted by +1 and sized with one spare slot at each end, so a
        # +-1 neighbour of a mixed-radix hash never aliases another vertex.
        col = [(yuv[0] / sigma_luma).astype(np.int32), (yuv[1] / sigma_chroma).astype(np.int32),
               (yuv[2] / sigma_chroma).astype(np.int32)]
        col = [c - c.min() + 1 for c in col]
        col_radix = [int(c.max()) + 2 for c in col]
        colour = (col[0] * col_radix[1] + col[1]) * col_radix[2] + col[2]  # [N] hash of (Y, U, V)
        nx, ny = (W - 1) // sigma_spatial + 3, (H - 1) // sigma_spatial + 3
        spatial = ((np.arange(H) // sigma_spatial + 1)[:, None] * nx
                   + (np.arange(W) // sigma_spatial + 1)[None, :]).reshape(-1)  # [H, W] -> [N] hash of (x, y)
        C = col_radix[0] * col_radix[1] * col_radix[2]
        self.n_pixels, self.dim = H * W, 5
        verts, self.idx = self._unique(spatial, colour, C, nx * ny)
        self.n_vertices = len(verts)
        strides = [1, col_radix[2], col_radix[1] * col_radix[2], C, C * nx]  # V, U, Y, x, y
        rows, cols = [], []
        for s in strides:  # pairs (i, j) with verts[j] == verts[i] + s; the -s direction is (j, i)
            j = np.minimum(np.searchsorted(verts, verts + s), len(verts) - 1)
            ok = verts[j] == verts + s
            rows += [np.flatnonzero(ok), j[ok]]
            cols += [j[ok], np.flatnonzero(ok)]
        from scipy.sparse import csr_matrix
        rows, cols = np.concatenate(rows), np.concatenate(cols)
        self.neighbours = csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(verts),) * 2)

    @staticmethod
    def _unique(spatial, colour, C, S):
        """Sorted unique hashes spatial * C + colour, and each pixel's vertex index. Both parts fit
        16 bits for any image up to ~4000 px a side, so numpy's O(N) radix argsort applies."""
        key = spatial.astype(np.int64) * C + colour
        if C >= 1 << 16 or S >= 1 << 16:
            return np.unique(key, return_inverse=True)
        order = np.argsort(colour.astype(np.uint16), kind="stable")
        order = order[np.argsort(spatial.astype(np.uint16)[order], kind="stable")]
        key = key[order]
        new = np.empty(len(key), bool)
        new[0] = True
        np.not_equal(key[1:], key[:-1], out=new[1:])
        idx = np.empty(len(key), np.int64)
        idx[order] = np.cumsum(new) - 1
        return key[new], idx

    def splat(self, x):
        return np.bincount(self.idx, weights=x, minlength=self.n_vertices)

    def slice(self, y):
        return y[self.idx]

    def blur(self, v):
        return 2 * self.dim * v + self.neighbours @ v


def pcg(matvec, b, x, inv_diag, rtol=1e-5, maxiter=25):
    """Preconditioned conjugate gradients, the iteration of scipy.sparse.linalg.cg (stop when
    ||r|| < rtol * ||b||, at most maxiter steps), with dot products as elementwise sums: scipy's
    BLAS dots spin threads, which on a shared or oversubscribed CPU (e.g. several solver
    processes per GPU) cost 10-20x the arithmetic (measured)."""
    def dot(a, c):
        return float(np.multiply(a, c).sum())
    atol = rtol * np.sqrt(dot(b, b))
    if atol == 0:
        return np.zeros_like(b)
    x = x.copy()
    r = b - matvec(x)
    rho_prev = p = None
    for _ in range(maxiter):
        if np.sqrt(dot(r, r)) < atol:
            break
        z = inv_diag * r
        rho = dot(r, z)
        p = z if p is None else z + (rho / rho_prev) * p
        q = matvec(p)
        alpha = rho / dot(p, q)
        x += alpha * p
        r -= alpha * q
        rho_prev = rho
    return x


def bilateral_solve(ref, target, confidence=0.999, sigma_spatial=16, sigma_luma=16, sigma_chroma=8,
                    lam=256.0, A_diag_min=1e-5, cg_tol=1e-5, cg_maxiter=25, bistoch_iters=10):
    """Edge-aware smoothing of `target` [H, W] guided by the uint8 RGB image `ref` [H, W, 3]:
    minimise lam/2 * sum_ij W_ij (y_i - y_j)^2 + sum_i c_i (y_i - t_i)^2 in the bilateral grid, solved
    with Jacobi-preconditioned CG. Returns the soft result, float [H, W]. Parameters = ZUTIS/TokenCut."""
    H, W = target.shape
    grid = BilateralGrid(ref, sigma_spatial, sigma_luma, sigma_chroma)
    x = target.reshape(-1).astype(np.float64)
    w = np.broadcast_to(np.asarray(confidence, np.float64), x.shape).reshape(-1)
    # Bistochastise: find n so that diag(n) B diag(n) has the splatted pixel counts as row sums.
    m = grid.splat(np.ones(grid.n_pixels))
    n = np.ones(grid.n_vertices)
    for _ in range(bistoch_iters):
        n = np.sqrt(n * m / grid.blur(n))
    m = n * grid.blur(n)
    # A = lam * (Dm - Dn B Dn) + diag(splat(w)); B = 2*dim*I + neighbours.
    w_splat = grid.splat(w)
    diag = lam * (m - 2 * grid.dim * n * n) + w_splat
    nb = grid.neighbours

    def matvec(v):
        return diag * v - lam * n * (nb @ (n * v))
    b = grid.splat(x * w)
    # Jacobi preconditioner: A's diagonal is exactly `diag`.
    y = pcg(matvec, b, b / w_splat, 1.0 / np.maximum(diag, A_diag_min), cg_tol, cg_maxiter)
    return grid.slice(y).reshape(H, W)


# ----------------------------------------------------------------------------- fallbacks

def _warn_fallback(name):
    if not _warned.get(name):
        print(f"WARNING: using the training-free '{name}' saliency FALLBACK, not SelfMask: pseudo-masks "
              "will be worse than ZUTIS's (see README, 'Saliency')", flush=True)
        _warned[name] = True


_warned = {}


def rgb_to_lab(rgb):
    """uint8 sRGB [..., 3] -> CIE L*a*b* (D65) float32 [..., 3]: Euclidean distances there roughly
    follow perceived colour differences, unlike RGB."""
    c = rgb.astype(np.float32) / 255
    c = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    xyz = c @ np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]],
                       np.float32).T / np.array([0.9505, 1.0, 1.089], np.float32)
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def kmeans(x, k, iters=10, seed=0):
    """Lloyd's k-means on rows of x [N, D], farthest-point init -> (centres [k', D], each cluster's
    share of the points [k'])."""
    x = x.astype(np.float32)
    first = int(np.random.default_rng(seed).integers(len(x)))
    chosen, d = [first], ((x - x[first]) ** 2).sum(1)
    for _ in range(1, min(k, len(x))):
        chosen.append(int(d.argmax()))
        d = np.minimum(d, ((x - x[chosen[-1]]) ** 2).sum(1))
    c = x[chosen]
    for _ in range(iters + 1):
        assign = ((c * c).sum(1) - 2 * x @ c.T).argmin(1)  # ||x - c||^2 up to the constant ||x||^2
        count = np.bincount(assign, minlength=len(c))
        if _ == iters:
            break
        sums = np.eye(len(c), dtype=np.float32)[assign].T @ x  # [k, N] @ [N, D] -> [k, D]
        c = np.where(count[:, None] > 0, sums / np.maximum(count, 1)[:, None], c)
    return c, count / len(x)


def otsu_threshold(v, bins=256):
    """Otsu's threshold of the values v: maximises the between-class variance."""
    hist, edges = np.histogram(v, bins=bins)
    p = hist / max(hist.sum(), 1)
    w0 = np.cumsum(p)
    mu = np.cumsum(p * (edges[:-1] + edges[1:]) / 2)
    between = (mu[-1] * w0 - mu) ** 2 / np.maximum(w0 * (1 - w0), 1e-12)
    return edges[int(np.argmax(between[:-1])) + 1]


def clean_mask(mask):
    """Largest connected component with its holes filled (scipy.ndimage)."""
    from scipy import ndimage
    lab, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(lab.ravel())[1:]
    return ndimage.binary_fill_holes(lab == 1 + int(sizes.argmax()))


def boundary_saliency(image, k=4, border=0.05, min_cluster=0.2, work_side=160, texture_weight=1.0,
                      bilateral=False):
    """Training-free FALLBACK saliency from the boundary prior: the image border is mostly background,
    so a pixel is salient when its (smoothed) colour and texture are far from every dominant border
    colour cluster. Otsu threshold, largest component, holes filled. Image -> bool [H, W]."""
    from scipy import ndimage
    _warn_fallback("boundary")
    rgb = to_rgb(image)
    H, W = rgb.shape[:2]
    small = resize_shorter(rgb, min(min(H, W), work_side), max_side=None) if max(H, W) > work_side else rgb
    h, w = small.shape[:2]
    s = max(1.0, min(h, w) / 48)  # smoothing scale: averages over a fine texture period at 64 px
    lab = rgb_to_lab(small)
    mean = ndimage.gaussian_filter(lab, (s, s, 0))
    # Texture energy: local standard deviation of lightness, so e.g. stripes vs flat of the same mean
    # colour still differ.
    energy = np.sqrt(np.maximum(ndimage.gaussian_filter((lab[..., 0] - mean[..., 0]) ** 2, s), 0))
    feats = np.concatenate([mean, texture_weight * energy[..., None]], -1)  # [h, w, 4]
    b = max(1, int(round(border * min(h, w))))
    ring = np.ones((h, w), bool)
    ring[b:-b, b:-b] = False
    pix = feats[ring][:: max(1, ring.sum() // 2000)]
    centres, weight = kmeans(pix, k)
    # Clusters holding little of the border are more likely object parts touching the edge.
    centres = centres[weight >= min(min_cluster, weight.max())]
    dist = np.sqrt(((feats[:, :, None] - centres[None, None]) ** 2).sum(-1)).min(-1)  # [h, w]
    dist = ndimage.gaussian_filter(dist, s)
    if dist.max() - dist.min() < 1.0:  # under ~1 Lab unit everywhere: nothing stands out, no object
        return np.zeros((H, W), bool)
    fg = dist > otsu_threshold(dist)
    if bilateral:
        fg = bilateral_solve(small, fg.astype(np.float64)) > 0.5
    fg = clean_mask(fg)
    return finish_mask(fg, orig_size=(H, W), bilateral=False)


def spectral_cut(feats, border=1):
    """Normalised-cut bipartition of a token grid (Shi & Malik; SelfMask's affinity: cosine
    similarities min-max rescaled to [0, 1]). feats [h, w, C] -> (bool foreground [h, w], signed
    Fiedler vector [h, w], positive on the foreground). The side touching less of the grid's
    border (ring `border` tokens wide) is the foreground."""
    from scipy.linalg import eigh
    h, w, C = feats.shape
    f = np.asarray(feats, np.float64).reshape(h * w, C)  # [h, w, C] -> [N, C]
    f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-8)
    A = f @ f.T
    if A.max() - A.min() < 1e-6:  # all tokens alike: any cut is arbitrary, call it no object
        return np.zeros((h, w), bool), np.zeros((h, w))
    A = (A - A.min()) / (A.max() - A.min())
    d = A.sum(1)
    # (D - A) v = lambda D v  <=>  (I - D^-1/2 A D^-1/2) u = lambda u with v = D^-1/2 u.
    s = 1 / np.sqrt(d)
    _, u = eigh(np.eye(h * w) - s[:, None] * A * s[None], subset_by_index=[1, 1])
    v = (u[:, 0] * s).reshape(h, w)
    side = v > v.mean()  # TokenCut splits at the mean of the Fiedler vector
    ring = np.ones((h, w), bool)
    ring[border:h - border, border:w - border] = False
    if (side & ring).sum() > (~side & ring).sum():
        side, v = ~side, -v
    return side, v - v.mean()


@torch.no_grad()
def spectral_saliency(image, clip_visual, short_side=224, bilateral=False, pos_interp="bicubic"):
    """Training-free FALLBACK saliency: normalised cut of a CLIP ViT's last-layer patch tokens
    (`clip_model` VisionTransformer.forward_dense). Image -> bool [H, W]."""
    from clip_model import CLIP_MEAN, CLIP_STD
    _warn_fallback("spectral")
    rgb = to_rgb(image)
    H, W = rgb.shape[:2]
    small = resize_shorter(rgb, short_side, max_side=4 * short_side)
    h, w = small.shape[:2]
    p = clip_visual.patch_size
    x = torch.from_numpy(small.copy()).permute(2, 0, 1).float().div(255)  # [h, w, 3] -> [3, h, w]
    x = (x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
    x = F.pad(x, (0, -w % p, 0, -h % p))  # the conv would drop a partial patch; pad to keep the edge
    dev = next(clip_visual.parameters()).device
    feats = clip_visual.forward_dense(x[None].to(dev), pos_interp=pos_interp)[0].float().cpu().numpy()
    _, v = spectral_cut(feats)
    # Bilinear upsampling of the Fiedler vector, thresholded at the split point, gives smoother
    # edges than blocky tokens; then crop the padding.
    v = F.interpolate(torch.from_numpy(v)[None, None].float(), scale_factor=p, mode="bilinear",
                      align_corners=False)[0, 0, :h, :w].numpy()
    fg = v > 0
    if bilateral:
        fg = bilateral_solve(small, fg.astype(np.float64)) > 0.5
    return finish_mask(fg, orig_size=(H, W), bilateral=False)
