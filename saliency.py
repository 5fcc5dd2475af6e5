"""Saliency without a trained saliency network: the fast bilateral solver that refines every SelfMask
mask (ZUTIS protocol), and two training-free fallbacks for when no SelfMask checkpoint is at hand.

What is here (library only; importing it does no work):
- `bilateral_solve(reference, target)`: Barron & Poole's fast bilateral solver, grid form (the variant
  TokenCut and SelfMask use), vectorised numpy + scipy.sparse CG (`BilateralGrid`, `pcg`).
- Fallbacks, loud in the log: `boundary_saliency(image)` (colour contrast to the border's colour
  clusters) and `spectral_saliency(image, clip_visual)` (normalised cut of ViT patch tokens,
  `spectral_cut`).
selfmask.py imports the solver from here; the fallbacks reuse selfmask.py's image helpers (imported
inside them, since selfmask.py imports this file at its top). Tests: `python -m pytest -q test_selfmask.py`.

References: ZUTIS paper section 3.2; selfmask_facts.md sections 3 and 4.1 (behaviour of the
bilateral-solver step of zutis datasets/index_dataset.py `generate_pseudo_masks`; SelfMask's spectral
affinity); Barron & Poole, "The Fast Bilateral Solver", ECCV 2016; Shi & Malik, "Normalized Cuts and
Image Segmentation", 2000.
"""
import numpy as np
import torch
import torch.nn.functional as F


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
    from selfmask import finish_mask, resize_shorter, to_rgb  # here: selfmask.py imports this file
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
    from common import CLIP_MEAN, CLIP_STD
    from selfmask import finish_mask, resize_shorter, to_rgb  # here: selfmask.py imports this file
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
