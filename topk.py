"""Exact streaming top-k of cosines for build_archive.py (stage 1, step 3). Reference: docs/retrieval.md.

The score of category c and image i is the dot product of the float32 text embedding t_c and the stored
float16 image embedding e_i, computed exactly and rounded once to float32 (round to nearest even). It is
a property of the two vectors alone, so it does not depend on the block size, the thread count, the
device or the prefilter. Each category keeps the k largest scores, ties to the lower image index.

A fast but inexact matrix product (float32, or bfloat16 where that is fast) scores every pair; a proven
bound on its error decides which pairs can still be in a top-k, and only those are rescored exactly at
the end. Nothing of size categories x images is ever held.
"""
import math
import mmap
from contextlib import contextmanager
from fractions import Fraction

import numpy as np
import torch

import common

U32, U64, BF16_OUT = 2.0 ** -24, 2.0 ** -53, 2.0 ** -8  # unit roundoffs; the last: rounding an output to bf16


def gamma(n, u):
    """Bound on the relative error of a dot product of length n summed in any order with unit roundoff
    u, relative to the sum of the absolute products (Higham, Accuracy and Stability, eq. 3.5)."""
    return n * u / (1 - n * u)


class Rows:
    """A 2-D .npy file as an array `x`, mapped privately; drop(a, b) releases the pages of rows a..b-1
    (madvise DONTNEED). np.load(mmap_mode="r") would keep every touched page in the process RSS, i.e.
    the whole store by the end; reading front to back and dropping, RSS stays at about one block."""

    def __init__(self, path):
        x = np.load(path, mmap_mode="r")  # reads the header only
        (n, d), self.row, self.offset = x.shape, x.strides[0], x.offset
        with open(path, "rb") as f:
            self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if n else None
        self.x = np.frombuffer(self.mm, x.dtype, n * d, self.offset).reshape(n, d) if n else x

    def drop(self, a, b):
        a0 = (self.offset + a * self.row) // mmap.PAGESIZE * mmap.PAGESIZE  # madvise wants a page-aligned start
        self.mm.madvise(mmap.MADV_DONTNEED, a0, self.offset + b * self.row - a0)


def iter_blocks(path, block_rows):
    """Yield (first row, array [b, D]) over a 2-D .npy file, front to back, releasing each block's pages."""
    rows = Rows(path)
    for s in range(0, len(rows.x), block_rows):
        e = min(len(rows.x), s + block_rows)
        yield s, rows.x[s:e]
        rows.drop(s, e)


def prefilter_dtype(device, choice="auto"):
    """The dtype of the prefilter product: bfloat16 where it is fast (a GPU, or a CPU with bf16
    instructions) under "auto", else float32. The result is the same either way."""
    if choice == "auto":
        fast = torch.device(device).type == "cuda" or bool(common.cpu_bf16_flags())
        return torch.bfloat16 if fast else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[choice]


@contextmanager
def ieee_matmul():
    """Products in plain float32 (no TF32 or bf16 passes) and bf16 products accumulated in float32:
    the error bounds below assume both."""
    prec, red = torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(prec)
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = red


def round_down(x, dtype):
    """The largest `dtype` value <= x (a float64 tensor), so a threshold never excludes what x admits."""
    y = x.to(dtype)
    return torch.where(y.double() > x, torch.nextafter(y, torch.full_like(y, -math.inf)), y)


def exact_f32(t, e):
    """The dot product of two float64 vectors whose products t_d e_d are exact, rounded once to float32
    (to nearest, ties to even). math.fsum rounds the exact sum once to float64; a second rounding to
    float32 can differ from the single one only where fsum lands exactly on a float32 midpoint, and there
    rational arithmetic decides."""
    y = math.fsum(a * b for a, b in zip(t, e))
    f = np.float32(y)
    if float(f) == y:
        return f
    g = np.nextafter(f, np.float32(math.copysign(math.inf, y - float(f))))
    if (float(f) + float(g)) / 2 != y:
        return f
    q = sum(Fraction(a) * Fraction(b) for a, b in zip(t, e))
    return min((f, g), key=lambda v: (abs(Fraction(float(v)) - q), int(v.view(np.int32)) & 1))


class Candidates:
    """Per category, the pairs that may still be in its top-k: columns, and bounds [lo, hi] on their exact
    score (float64). lam[c], the k-th largest lo, is a proven lower bound on the final k-th score."""

    def __init__(self, K, k, device):
        self.k, self.cap = k, max(4 * k, 64)
        self.lo = torch.full((K, self.cap), -math.inf, dtype=torch.float64, device=device)
        self.hi, self.col = self.lo.clone(), torch.zeros(K, self.cap, dtype=torch.long, device=device)
        self.cnt = torch.zeros(K, dtype=torch.long, device=device)
        self.lam = torch.full((K,), -math.inf, dtype=torch.float64, device=device)

    def compact(self, eta):
        """Drop pairs whose upper bound is below lam by more than eta: k others score strictly higher
        even after rounding to float32 (eta covers that rounding), whatever their index."""
        valid = torch.arange(self.cap, device=self.cnt.device) < self.cnt[:, None]
        if self.cap >= self.k:
            kth = self.lo.masked_fill(~valid, -math.inf).topk(self.k, dim=1).values[:, -1]
            self.lam = torch.maximum(self.lam, kth)
        keep = valid & (self.hi + eta[:, None] >= self.lam[:, None])
        order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)  # kept pairs first, in order
        self.lo, self.hi, self.col = (x.gather(1, order) for x in (self.lo, self.hi, self.col))
        self.cnt = keep.sum(1)

    def add(self, r, col, lo, hi, eta):
        """Append pairs (rows r ascending, as torch.nonzero gives them)."""
        n = torch.bincount(r, minlength=len(self.cnt))
        if (self.cnt + n).max() > self.cap:
            self.compact(eta)
            need = int((self.cnt + n).max())
            if need > self.cap:  # ties or a loose bound keep many pairs: grow
                grow = max(need, 2 * self.cap) - self.cap
                self.lo, self.hi = (torch.nn.functional.pad(x, (0, grow), value=-math.inf) for x in (self.lo, self.hi))
                self.col = torch.nn.functional.pad(self.col, (0, grow))
                self.cap += grow
        pos = self.cnt[r] + torch.arange(len(r), device=r.device) - (torch.cumsum(n, 0) - n)[r]
        self.lo[r, pos], self.hi[r, pos], self.col[r, pos] = lo, hi, col
        self.cnt += n


class Blocks:
    """Reusable buffers for one block: the float32 copy of the stored rows, the prefilter's input and
    output, and the mask (fresh tensors of this size would cost page faults on every block)."""

    def __init__(self, T, dt, rows, device):
        D, K = T.shape[1], len(T)
        self.T, self.Tc, self.dt = T, T.to(dt), dt
        self.tn = T.double().norm(dim=1)
        self.terr = (T.double() - self.Tc.double()).norm(dim=1)  # 0 for float32
        if not bool((self.terr <= BF16_OUT * self.tn).all()):  # the bound below relies on it
            raise RuntimeError("retrieval: this platform does not round float32 to bfloat16 to nearest")
        self.f32 = torch.empty(rows, D, device=device)
        self.low = torch.empty(rows, D, dtype=dt, device=device) if dt != torch.float32 else self.f32
        self.A = torch.empty(K, rows, dtype=dt, device=device)
        self.mask = torch.empty(K, rows, dtype=torch.bool, device=device)

    def scores(self, block):
        """The prefilter scores A [K, b] of a float16 block [b, D], and delta [K]: a bound on |A - exact|
        before A's rounding to its dtype (see out_err); and the largest norm in the block."""
        b, D = len(block), self.f32.shape[1]
        f32, low = self.f32[:b], self.low[:b]
        f32.copy_(torch.as_tensor(np.asarray(block)))  # float16 -> float32 is exact
        en = torch.linalg.vector_norm(f32, dim=1).max().item() * 1.001  # 0.1%: the norm's own rounding
        g = gamma(D, U32)
        if self.dt == torch.float32:  # only the product's own rounding
            delta = g * self.tn * en
        else:  # t.e - t^.e^ = t.(e - e^) + (t - t^).e^, by Cauchy-Schwarz with |e - e^| <= 2^-8 |e| (rounding
            low.copy_(f32)  # to nearest), plus the float32 sum of the products
            er = BF16_OUT * en
            delta = self.terr * (en + er) + self.tn * er + g * (self.tn + self.terr) * (en + er)
        full = b == self.A.shape[1]
        A = self.A if full else torch.empty(len(self.T), b, dtype=self.dt, device=f32.device)
        torch.mm(self.Tc, low.t(), out=A)
        return A, (self.mask if full else torch.empty_like(A, dtype=torch.bool)), delta * 1.001 + D * 1e-30, en


def nonzero(mask):
    """torch.nonzero(mask, as_tuple=True) for a sparse contiguous [K, b] mask, several times faster:
    first the nonzero 8-byte words, then the bytes inside them."""
    if mask.numel() % 8:
        return torch.nonzero(mask, as_tuple=True)
    flat = mask.view(-1)
    w = torch.nonzero(flat.view(torch.int64)).flatten()
    pos = (w[:, None] * 8 + torch.arange(8, device=w.device)).flatten()
    pos = pos[flat[pos]]
    return pos // mask.shape[1], pos % mask.shape[1]


def out_err(a, dtype):
    """Bound on |x - a| where a is x rounded to `dtype` (bf16 outputs; float32 outputs are x itself)."""
    return a.abs() * (BF16_OUT / (1 - BF16_OUT)) * 1.001 if dtype == torch.bfloat16 else torch.zeros_like(a)


@torch.no_grad()
def topk_stream(text_emb, emb, k, device="cpu", block_size=16384, prefilter="auto", stats=None):
    """Exact top-k of text_emb [K, D] @ E.T per row, E being `emb` (a 2-D .npy path, read in blocks, or an
    array) in row order. Returns (scores float32 [K, k'], index int64 [K, k']), k' = min(k, N): by score
    descending, ties by the lower index, every score the exact dot product rounded to float32.
    `prefilter`: auto, float32 or bfloat16 (the result is the same); `stats`, a dict, gets counters."""
    N = np.load(emb, mmap_mode="r").shape[0] if isinstance(emb, str) else len(emb)
    kk, dt = min(k, N), prefilter_dtype(device, prefilter)
    T = text_emb.to(device, torch.float32).contiguous()
    if N == 0:
        return torch.empty(len(T), 0), torch.empty(len(T), 0, dtype=torch.long)
    buf, cand, emax, n_pairs = Blocks(T, dt, min(block_size, max(N, 1)), device), Candidates(len(T), kk, device), 0.0, 0
    blocks = iter_blocks(emb, block_size) if isinstance(emb, str) else \
        ((s, emb[s:s + block_size]) for s in range(0, N, block_size))
    with ieee_matmul():
        for start, block in blocks:
            A, mask, delta, en = buf.scores(block)
            emax = max(emax, en)
            eta = 2.0 ** -23 * 1.01 * buf.tn * emax  # a gap that survives rounding both scores to float32
            if bool((cand.cnt < kk).any()) and A.shape[1] >= kk:  # a first k per category from this block
                kth = A.float().topk(kk, dim=1).values[:, -1].double()
                cand.lam = torch.where(cand.cnt < kk, torch.maximum(cand.lam, kth - delta - out_err(kth, dt)), cand.lam)
            # the pairs whose exact score may reach lam - eta: A >= that minus the bound, rounded down
            r, c = nonzero(torch.ge(A, round_down(cand.lam - eta - delta, dt)[:, None], out=mask))
            a = A[r, c].double()
            err = delta[r] + out_err(a, dt)
            cand.add(r, c + start, a - err, a + err, eta)
            n_pairs += len(r)
        cand.compact(eta)
    scores, index, n_amb = resolve(T.cpu(), emb, cand, kk, emax, block_size)
    if stats is not None:
        stats.update(prefilter=str(dt).split(".")[-1], pairs=n_pairs, rescored=int(cand.cnt.sum()), cap=cand.cap,
                     fsum=n_amb)
    return scores, index


def resolve(T, emb, cand, kk, emax, block_size, chunk=4096):
    """Rescore every remaining candidate exactly, check the bound it was kept with, sort, keep kk. A
    second pass over the store, front to back like the first (a store on disk is read sequentially,
    and memory stays at one block): each block's candidates, text row times image row in float64."""
    cnt, T64 = cand.cnt.cpu(), T.double()
    valid = torch.arange(cand.cap, device=cand.cnt.device) < cand.cnt[:, None]
    r, col, lo, hi = (x.cpu() for x in (torch.nonzero(valid)[:, 0], cand.col[valid], cand.lo[valid], cand.hi[valid]))
    o = torch.argsort(col, stable=True)
    r, col, lo, hi = r[o], col[o], lo[o], hi[o]
    x = torch.empty(len(col), dtype=torch.float64)
    N = np.load(emb, mmap_mode="r").shape[0] if isinstance(emb, str) else len(emb)
    blocks = iter_blocks(emb, block_size) if isinstance(emb, str) else \
        ((s, emb[s:s + block_size]) for s in range(0, N, block_size))
    bounds = torch.searchsorted(col, torch.arange(0, N + block_size, block_size)).tolist()
    for (start, block), a, b in zip(blocks, bounds, bounds[1:]):
        block = np.asarray(block)
        for s in range(a, b, chunk):
            e = min(b, s + chunk)
            prod = T64.index_select(0, r[s:e]).mul_(torch.from_numpy(block[(col[s:e] - start).numpy()]))
            x[s:e] = prod.sum(1)  # float16 -> float64 inside mul_: no float64 copy of the image rows
    # the float64 sum is within eps of the exact one; where that interval holds a float32 rounding
    # boundary, the exact sum decides (the products t_d e_d are exact in float64)
    eps = gamma(T.shape[1], U64) * 1.01 * T64.norm(dim=1)[r] * emax + 1e-300
    s, amb = (x - eps).float(), torch.nonzero((x - eps).float() != (x + eps).float()).flatten().tolist()
    store = np.load(emb, mmap_mode="r") if isinstance(emb, str) else emb  # a handful of rows at most
    for i in amb:
        s[i] = float(exact_f32(T64[r[i]].tolist(), np.asarray(store[int(col[i])], np.float64).tolist()))
    slack = 1e-12 * (1 + x.abs())
    if not bool(((x >= lo - slack) & (x <= hi + slack)).all()):
        raise RuntimeError("retrieval: a prefilter score fell outside its proven error bound")
    o = torch.from_numpy(np.lexsort((col.numpy(), -s.numpy(), r.numpy())))  # category, score desc, index
    pick = o[(torch.cumsum(cnt, 0) - cnt)[:, None] + torch.arange(kk)]
    return s[pick], col[pick], len(amb)


if __name__ == "__main__":
    common.library_main(__doc__, "build_archive.py ranks the index with it (python build_archive.py --help); "
                                 "python bench.py retrieval times it.")
