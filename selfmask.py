"""SelfMask saliency (Shin, Albanie, Xie 2022) as ZUTIS uses it to pseudo-label archive images
(ZUTIS paper section 3.2; official zutis datasets/index_dataset.py `generate_pseudo_masks`).

- `SelfMask`: DINO ViT-S/8 encoder + 6-layer post-norm DETR decoder with 20 learned queries; a mask is
  sigmoid(query . patch features upsampled x2), a 3-layer MLP scores each query's objectness.
  Parameter names and shapes equal the released `selfmask_nq20.pt`, so it loads strictly.
- `load_selfmask(name_or_path)`: a released name (downloaded into ~/.cache/selfmask) or a local file.
- `predict_saliency(model, image) -> bool [H, W]`: the protocol (shorter side 512, ImageNet norm,
  zero-pad to x8, masks x4 bilinear then cropped, argmax objectness, > 0.5, bilateral solver guided by
  the normalised input turned back into uint8 pixels, > 0.5, nearest resize to the original size).
  `prepare` / `coarse_masks` / `finish_mask` are the same steps split, so pseudo_label.py decodes in
  workers, batches same-sized images and solves in other processes.
- `bilateral_solve`: Barron & Poole's fast bilateral solver (grid form, as in TokenCut and the official
  zutis utils/bilateral_solver.py), vectorised numpy + scipy.sparse.
Importing this file does no work. Reference: docs/pseudo_label.md.
"""
import os
from collections import OrderedDict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from scipy.sparse import csr_matrix

import common
import downloads

_SM = "https://www.robots.ox.ac.uk/~vgg/research/selfmask/shared_files"
_GH = "https://github.com/NoelShin/selfmask/releases/download/v1.0.0"
# name -> (url, file name in the cache). No SHA256 is published for these files.
SELFMASK_MODELS = {
    "selfmask_nq20": (f"{_SM}/selfmask_nq20.pt", "selfmask_nq20.pt"),
    "selfmask_nq10": (f"{_SM}/selfmask_nq10.pt", "selfmask_nq10.pt"),
    # the first release ({"model": ...} trainer files); same basename, so cached under another name
    "selfmask_nq20_v1": (f"{_GH}/selfmask_nq20.pt", "selfmask_nq20_v1.0.0.pt"),
    "selfmask_nq10_v1": (f"{_GH}/selfmask_nq10.pt", "selfmask_nq10_v1.0.0.pt"),
}
SHORT_SIDE = 512  # the protocol's working scale: shorter side in px
MAX_SIDE = 2048  # cap on the longer working side, so extreme panoramas do not exhaust memory


# ----------------------------------------------------------------------------- network

class Attention(nn.Module):
    """timm/DINO multi-head self-attention (fused qkv) through SDPA: softmax(q k^T / sqrt(d)) v."""

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


class Block(nn.Module):
    """Pre-norm ViT block; LayerNorm eps 1e-6 as in DINO."""

    def __init__(self, dim, n_heads, mlp_ratio=4):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, n_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = dim * mlp_ratio
        self.mlp = nn.Sequential(OrderedDict(fc1=nn.Linear(dim, hidden), act=nn.GELU(), fc2=nn.Linear(hidden, dim)))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """DINO's ViT (timm names). Always built for 224 px (a 28x28 table at patch 8), bicubically
    resized to the actual token grid; the input is zero-padded right/bottom to a patch multiple."""

    def __init__(self, patch_size=8, dim=384, depth=12, n_heads=6, img_size=224):
        super().__init__()
        self.patch_size, self.grid = patch_size, img_size // patch_size
        self.patch_embed = nn.Sequential(OrderedDict(proj=nn.Conv2d(3, dim, patch_size, stride=patch_size)))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid ** 2 + 1, dim))
        self.blocks = nn.ModuleList([Block(dim, n_heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def pos_for(self, h, w):
        # Compare the grid (h, w), not the token count: the official check compares counts and would
        # reuse the 28x28 table for e.g. a 14x56 grid.
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
        x = self.patch_embed(x)  # [B, 3, H, W] -> [B, C, H/p, W/p]
        B, C, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)  # [B, C, h, w] -> [B, h*w, C]
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1) + self.pos_for(h, w)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)[:, 1:], (h, w)


class DecoderLayer(nn.Module):
    """DETR decoder layer, post-norm, ReLU FFN, dropout 0. Differs from model.py's ZUTIS layer in one
    term: SelfMask's memory keys get no positional encoding (the queries' embedding still goes to q, k
    of self-attention and q of cross-attention)."""

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


class SelfMask(nn.Module):
    """The released SelfMask. Defaults = selfmask_nq20.pt (36,174,337 parameters)."""

    def __init__(self, n_queries=20, patch_size=8, dim=384, depth=12, n_heads=6, n_dec_layers=6, dim_ffn=1536):
        super().__init__()
        self.encoder = ViT(patch_size, dim, depth, n_heads)
        layers = nn.ModuleList([DecoderLayer(dim, n_heads, dim_ffn) for _ in range(n_dec_layers)])
        self.decoder = nn.ModuleDict(dict(layers=layers, norm=nn.LayerNorm(dim)))  # + one final LayerNorm
        self.query_embed = nn.Parameter(torch.randn(n_queries, dim))  # an nn.Embedding weight upstream
        head = [nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, 1)]  # objectness: Linear-ReLU-Linear-ReLU-Linear
        self.ffn = nn.ModuleDict(dict(layers=nn.ModuleList(head)))

    def forward(self, x):
        """Normalised images [B, 3, H, W] -> {"mask_probs": [B, Q, h*2, w*2] (stride 4 of the padded
        input), "objectness": [B, Q] logits}."""
        tokens, (h, w) = self.encoder(x)  # [B, h*w, C]
        B, N, C = tokens.shape
        pos = self.query_embed[None].expand(B, -1, -1)  # [Q, C] -> [B, Q, C]
        q = torch.zeros_like(pos)
        for layer in self.decoder["layers"]:
            q = layer(q, tokens, pos)
        q = self.decoder["norm"](q)  # [B, Q, C]; inference needs only the last layer's output
        l0, l1, l2 = self.ffn["layers"]
        objectness = l2(F.relu(l1(F.relu(l0(q))))).squeeze(-1)
        feats = tokens.transpose(1, 2).reshape(B, C, h, w)  # [B, h*w, C] -> [B, C, h, w]
        feats = F.interpolate(feats, scale_factor=2, mode="bilinear", align_corners=False)
        logits = torch.einsum("bqc,bchw->bqhw", q, feats)  # plain dot product, no temperature
        return {"mask_probs": logits.sigmoid(), "objectness": objectness}


# ----------------------------------------------------------------------------- loading

def selfmask_hint(name="selfmask_nq20"):
    url = SELFMASK_MODELS.get(name, SELFMASK_MODELS["selfmask_nq20"])[0]
    return (f"download {url} on a machine with internet and pass its path with --selfmask PATH, or use "
            "the training-free fallback --saliency boundary")


def load_selfmask(name_or_path="selfmask_nq20", device="cpu", download_root=None):
    """A released name (SELFMASK_MODELS) or a local file (bare state dict or the trainer's
    {"model": ...}) -> SelfMask in eval mode. The query count is read from `query_embed`."""
    if os.path.isfile(str(name_or_path)):
        path = str(name_or_path)
    elif name_or_path in SELFMASK_MODELS:
        url, fname = SELFMASK_MODELS[name_or_path]
        try:
            path = downloads.download(url, download_root or os.path.expanduser("~/.cache/selfmask"), filename=fname)
        except common.UserError as e:
            raise common.UserError(f"{e}; {selfmask_hint(name_or_path)}") from None
    else:
        raise common.UserError(f"SelfMask checkpoint {name_or_path!r} not found (names: "
                               f"{sorted(SELFMASK_MODELS)}); {selfmask_hint()}")
    try:
        sd = common.torch_load(path, "SelfMask checkpoint")
    except common.UserError as e:  # the old trainer files may hold objects beyond tensors
        raise common.UserError(f"{e}. If it is a SelfMask trainer file you trust, extract its weights as "
                               "docs/pseudo_label.md shows ('The SelfMask checkpoint')") from None
    if isinstance(sd, dict) and isinstance(sd.get("model"), dict):
        sd = sd["model"]
    if not isinstance(sd, dict):
        raise common.UserError(f"{path!r} does not hold a SelfMask state dict")
    sd = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in sd.items()}
    q = sd.get("query_embed")
    with torch.device("meta"):  # no random init of 36 M parameters that are overwritten anyway
        model = SelfMask(n_queries=q.shape[0] if torch.is_tensor(q) and q.ndim == 2 else 20)
    return common.load_strict(model, sd, f"SelfMask checkpoint {path!r}", assign=True).to(device).eval()


# ----------------------------------------------------------------------------- inference protocol

def to_rgb(image):
    """PIL image (any mode, 16-bit included: common.to_rgb) or uint8 array [H, W], [H, W, 1|3|4] -> uint8
    RGB array [H, W, 3]."""
    if hasattr(image, "convert"):
        return np.asarray(common.to_rgb(image))
    a = np.asarray(image)
    if a.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {a.dtype}")
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected an image [H, W(, 1|3|4)], got shape {a.shape}")
    return np.ascontiguousarray(np.repeat(a, 3, -1) if a.shape[-1] == 1 else a[..., :3])


def resize_shorter(rgb, short_side=SHORT_SIDE, max_side=MAX_SIDE):
    """torchvision's int-size Resize on a PIL image (shorter side -> short_side, longer side
    int(short_side * long / short), PIL bilinear). `max_side` caps the longer side (None = no cap,
    the official behaviour)."""
    H, W = rgb.shape[:2]
    short, long = min(H, W), max(H, W)
    new_short, new_long = short_side, int(short_side * long / short)
    if max_side is not None and new_long > max_side:
        new_short, new_long = max(1, int(max_side * new_short / new_long)), max_side
    h, w = (new_short, new_long) if H <= W else (new_long, new_short)
    if (h, w) == (H, W):
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((w, h), Image.BILINEAR))


def prepare(image, short_side=SHORT_SIDE, max_side=MAX_SIDE):
    """Image -> (normalised float tensor [3, h, w] at the working scale, the bilateral solver's guide
    uint8 [h, w, 3] made from that tensor by `guide_image`, original (H, W))."""
    rgb = to_rgb(image)
    small = resize_shorter(rgb, short_side, max_side)
    x = torch.tensor(small).permute(2, 0, 1).float().div_(255)  # [h, w, 3] -> [3, h, w]
    x = (x - torch.tensor(common.IMAGENET_MEAN)[:, None, None]) / torch.tensor(common.IMAGENET_STD)[:, None, None]
    return x, guide_image(x), rgb.shape[:2]


def guide_image(x):
    """Normalised image [3, h, w] -> the solver's guide, uint8 [h, w, 3], as the official SelfMask inference
    makes it (networks/selfmask/selfmask.py with bilateral_solver=True, utils/utils.py
    `convert_tensor_to_pil_image`): in float32, x * std + mean, times 255, clipped to [0, 255], then
    truncated by astype(uint8). Truncation leaves many pixels one level below the resized image, and the
    solver's grid cells follow these values, so the guide is this image and not the resized one."""
    std = torch.tensor(common.IMAGENET_STD)[:, None, None]  # float32, as torch.tensor makes it upstream
    mean = torch.tensor(common.IMAGENET_MEAN)[:, None, None]
    g = torch.clip((x.float().cpu() * std + mean) * 255, 0, 255)  # separate ops, the official order
    return np.ascontiguousarray(g.numpy().astype(np.uint8).transpose(1, 2, 0))  # [3, h, w] -> [h, w, 3]


@torch.no_grad()
def coarse_masks(model, x):
    """Same-sized normalised images [B, 3, h, w] -> the top-objectness query's mask > 0.5, bool [B, h, w]
    (on the model's device). Only the chosen query is upsampled x4: bilinear interpolation is per
    channel, so this equals upsampling every query and picking one, at a fraction of the cost."""
    B, _, h, w = x.shape
    out = model(x)
    best = out["objectness"].argmax(dim=1)  # [B]
    probs = out["mask_probs"][torch.arange(B, device=x.device), best].float()  # [B, Q, h', w'] -> [B, h', w']
    probs = F.interpolate(probs[:, None], scale_factor=4, mode="bilinear", align_corners=False)[:, 0]
    return probs[:, :h, :w] > 0.5  # crop the padding after upsampling, as the official code does


def finish_mask(mask, ref=None, orig_size=None, bilateral=True):
    """Coarse bool mask [h, w] at the working scale -> (bilateral solver guided by `ref`, the guide from
    `prepare`, > 0.5) -> nearest resize to orig_size (H, W) -> bool numpy [H, W]."""
    mask = mask.cpu().numpy() if torch.is_tensor(mask) else np.asarray(mask)
    if bilateral:
        mask = bilateral_solve(ref, mask.astype(np.float64)) > 0.5
    if orig_size is not None and tuple(orig_size) != mask.shape:
        m = torch.from_numpy(mask.astype(np.uint8))[None, None]
        mask = F.interpolate(m, size=tuple(orig_size), mode="nearest")[0, 0].numpy()
    return mask.astype(bool)


def predict_saliency(model, image, bilateral=True, short_side=SHORT_SIDE, max_side=MAX_SIDE):
    """One image (PIL or uint8 array) -> bool saliency mask [H, W] at its original size."""
    device = next(model.parameters()).device
    x, ref, size = prepare(image, short_side, max_side)
    return finish_mask(coarse_masks(model, x[None].to(device))[0], ref, size, bilateral)


# ----------------------------------------------------------------------------- bilateral solver

# JPEG YCbCr (BT.601, full range), offset 128 on chroma
RGB_TO_YUV = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
YUV_OFFSET = np.array([0.0, 128.0, 128.0])


class BilateralGrid:
    """Barron & Poole's simplified bilateral grid over (x, y, Y, U, V). Each pixel falls into one
    vertex (its integer coordinates divided by the sigmas); splat = sum pixels into vertices,
    slice = read the vertex value back, blur = [1 2 1] along each of the 5 axes between occupied
    vertices. Built for speed (it runs on every archive image): splat/slice are a bincount and a
    gather on the pixel -> vertex index instead of an N_pixels-sized sparse matrix, vertices are
    found with two 16-bit radix sorts instead of a general sort, and the blur, being symmetric,
    searches each neighbour pair in one direction only."""

    def __init__(self, ref, sigma_spatial=16, sigma_luma=16, sigma_chroma=8):
        H, W = ref.shape[:2]
        rgb = ref.reshape(-1, 3).astype(np.float64)  # float64 like the original
        # Elementwise, not a BLAS matmul: threaded BLAS spins on busy cores and is many times slower here.
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
    processes per GPU) cost many times the arithmetic."""
    def dot(a, c):
        return float(np.multiply(a, c).sum())
    atol = rtol * np.sqrt(dot(b, b))
    if atol == 0:
        return np.zeros_like(b)
    x, rho_prev, p = x.copy(), None, None
    r = b - matvec(x)
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
    with Jacobi-preconditioned CG. Returns the soft result, float [H, W]. Defaults = official ZUTIS/TokenCut."""
    H, W = target.shape
    grid = BilateralGrid(ref, sigma_spatial, sigma_luma, sigma_chroma)
    x = target.reshape(-1).astype(np.float64)
    w = np.full(x.shape, confidence, np.float64)
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


if __name__ == "__main__":
    common.library_main(__doc__, "pseudo_label.py runs it on every archive image (python pseudo_label.py "
                                 "--help); `python bench.py selfmask` times it.")
