"""The embedding store behind build_archive.py: chunked float16 embeddings on disk, a streaming
exact top-k over them, and safe import of the official embedding pickles. Importing this file does
no work.

Store layout (OUT/embeddings/<arch_tag>/):

    paths.json            {"arch", "source": "embed"|"import", "chunk_size", "index_dirs": [abs],
                           "paths": [[dir index, path relative to that dir], ...]}   (row order)
    chunk_000000.npz      one finished chunk (rows [c*chunk_size, (c+1)*chunk_size)): "emb" float16
                          [n_ok, D] (L2-normalised), "rows" int64 [n_ok], "skipped" int64, "reasons" str
    rows.npy, skipped.json, embeddings.npy
                          the merged store: float16 [N_ok, D], the row (into "paths") of each
                          embedding, the unreadable images as [[dir, rel path, reason], ...];
                          embeddings.npy is renamed into place last: its presence means "complete"

Every file is written atomically (common.atomic_path), so a killed run resumes from the last
finished chunk.

References: ZUTIS paper section 3.2 (archive construction), zutis_facts.md sections 1-2 (pickle
format of the released embeddings, retrieval = cosine + argsort, k = 500).
"""
import json
import mmap
import os
import pickle
import re

import numpy as np
import torch

from common import UserError, atomic_path, save_json, save_npy

PAGE = mmap.PAGESIZE


# ----------------------------------------------------------------------------- chunk store

def chunk_file(store, c):
    return os.path.join(store, f"chunk_{c:06d}.npz")


def read_paths(store):
    p = os.path.join(store, "paths.json")
    if not os.path.isfile(p):
        return None
    with open(p, encoding="utf-8") as f:
        return json.load(f)


def write_paths(store, meta):
    save_json(meta, os.path.join(store, "paths.json"), indent=None)


def save_chunk(store, c, emb, rows, skipped, reasons):
    """emb float16 [n_ok, D]; rows int64 [n_ok]; skipped int64 [n_skip]; reasons list of str."""
    with atomic_path(chunk_file(store, c)) as tmp, open(tmp, "wb") as f:
        np.savez(f, emb=emb.astype(np.float16), rows=np.asarray(rows, np.int64),
                 skipped=np.asarray(skipped, np.int64), reasons=np.asarray(reasons, dtype=str))


def load_chunk(store, c):
    with np.load(chunk_file(store, c), allow_pickle=False) as z:
        return z["emb"], z["rows"], z["skipped"], [str(r) for r in z["reasons"]]


def is_complete(store):
    return os.path.isfile(os.path.join(store, "embeddings.npy"))


def _write_npy_stream(path, pieces, n, dim):
    """Write float16 [n, dim] to a .npy file piece by piece (atomically): never all of it in memory."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)),
                  "fortran_order": False, "shape": (n, dim)}
        np.lib.format.write_array_header_2_0(f, header)
        for x in pieces:
            assert x.ndim == 2 and x.shape[1] == dim, f"piece of shape {x.shape}, expected [*, {dim}]"
            f.write(np.ascontiguousarray(x, np.float16).tobytes())


def merge_chunks(store, n_chunks, dim, paths):
    """Concatenate the chunk files into rows.npy / skipped.json / embeddings.npy, streaming: one
    chunk in memory at a time, whatever N is. paths: the [dir, rel path] list of paths.json."""
    rows, skipped = [], []
    for c in range(n_chunks):
        _, r, s, why = load_chunk(store, c)
        rows.append(r)
        skipped += [[*paths[int(i)], w] for i, w in zip(s, why)]
    save_npy(np.concatenate(rows) if rows else np.zeros(0, np.int64), os.path.join(store, "rows.npy"))
    save_json(skipped, os.path.join(store, "skipped.json"), indent=None)
    _write_npy_stream(os.path.join(store, "embeddings.npy"), (load_chunk(store, c)[0] for c in range(n_chunks)),
                      sum(len(r) for r in rows), dim)


def write_store(store, meta, pieces, skipped):
    """Write a complete store in one go (the pickle import): pieces = float16 arrays [n_i, D] whose
    rows follow meta["paths"]."""
    for f in os.listdir(store) if os.path.isdir(store) else []:
        if f.startswith("chunk_") or f == "embeddings.npy":  # stale pieces of an earlier store
            os.remove(os.path.join(store, f))
    n = sum(len(x) for x in pieces)
    assert n == len(meta["paths"]), "one embedding per path"
    write_paths(store, meta)
    save_npy(np.arange(n, dtype=np.int64), os.path.join(store, "rows.npy"))
    save_json(skipped, os.path.join(store, "skipped.json"), indent=None)
    _write_npy_stream(os.path.join(store, "embeddings.npy"), pieces, n, pieces[0].shape[1])


def load_merged(store):
    """-> (rows int64 [N_ok], skipped [[dir, rel path, reason], ...]); embeddings: iter_blocks."""
    rows = np.load(os.path.join(store, "rows.npy"))
    with open(os.path.join(store, "skipped.json"), encoding="utf-8") as f:
        skipped = json.load(f)
    return rows, skipped


def npy_shape(path):
    """(shape, dtype, data offset) of a .npy file, reading only its header."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        shape, fortran, dtype = read.get(version, np.lib.format.read_array_header_2_0)(f)
        assert not fortran, f"{path}: Fortran-ordered arrays are not supported"
        return shape, dtype, f.tell()


def iter_blocks(path, block_rows):
    """Yield (first row, float16/32 array [b, D]) over a 2-D .npy file through a memory map.

    Why not np.load(mmap_mode="r"): the pages a map touches count towards the process RSS and
    stay there, so reading 2.7M x 768 fp16 (4.1 GB) would end with a 4 GB RSS. We map the file
    privately (copy-on-write, never written) and madvise(DONTNEED) each block once it is used:
    the page cache keeps the data, but our RSS stays at about one block."""
    (n, d), dtype, offset = npy_shape(path)
    if n == 0:
        return
    row_bytes = d * dtype.itemsize
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    for s in range(0, n, block_rows):
        e = min(n, s + block_rows)
        yield s, np.frombuffer(mm, dtype, (e - s) * d, offset + s * row_bytes).reshape(e - s, d)
        a0 = (offset + s * row_bytes) // PAGE * PAGE  # madvise wants a page-aligned start
        mm.madvise(mmap.MADV_DONTNEED, a0, offset + e * row_bytes - a0)


# ----------------------------------------------------------------------------- streaming top-k

def _candidates(S, thr, strict, group=64):
    """(rows, cols, vals) of the entries of S [K, B] above thr [K, 1] (>= when not strict), in
    (row, col) order. S is first reduced to maxima of column groups, so a block where few entries
    qualify costs one cheap pass over S instead of a full compare-and-nonzero."""
    K, B = S.shape
    above = torch.gt if strict else torch.ge
    n_g = B // group
    G = S[:, :n_g * group].reshape(K * n_g, group)  # [K, n_g*group] -> [K*n_g, group] (a view)
    hit = above(G.amax(-1).view(K, n_g), thr).view(-1).nonzero().squeeze(1)  # groups with a candidate
    sub = G.index_select(0, hit)  # [n_hit, group]
    grow = hit // n_g
    a, b = above(sub, thr.view(-1).index_select(0, grow)[:, None]).nonzero(as_tuple=True)
    rows, cols, vals = grow[a], (hit[a] % n_g) * group + b, sub[a, b]
    if n_g * group < B:  # the last < group columns; then restore (row, col) order with a stable sort
        tr, tc = above(S[:, n_g * group:], thr).nonzero(as_tuple=True)
        rows, cols = torch.cat([rows, tr]), torch.cat([cols, tc + n_g * group])
        vals = torch.cat([vals, S[tr, tc + n_g * group]])
        o = torch.argsort(rows, stable=True)
        rows, cols, vals = rows[o], cols[o], vals[o]
    return rows, cols, vals


def _merge_topk(best_s, best_i, S, start, k):
    """Merge one block of scores into the running top-k of each row.

    best_s, best_i: [K, m] current best scores / global indices (m <= k), each row ordered by
    score descending, then index ascending. S: [K, B] scores of global columns start .. start+B-1
    (all larger than any index in best_i). Returns the same for [K, min(k, m + B)]."""
    K, B = S.shape
    m = best_s.shape[1]
    kk = min(k, m + B)
    dev = S.device
    if m == k:
        # A block entry that ties the current k-th best loses to it (its index is larger): strict ">".
        rows, cols, vals = _candidates(S, best_s[:, -1:], strict=True)
    elif B > k:
        # Not k entries yet: keep the block entries >= the block's own k-th largest score (all ties
        # at that value, so the result stays exact), at least k per row.
        kth = torch.topk(S, k, dim=1, sorted=False).values.amin(1, keepdim=True)  # [K, 1]
        rows, cols, vals = _candidates(S, kth, strict=False)
    else:
        rows = torch.arange(K, device=dev).repeat_interleave(B)
        cols = torch.arange(B, device=dev).repeat(K)
        vals = S.reshape(-1)
    # Candidates -> a [K, c_max] matrix padded with -inf, sorted per row (stable, so equal scores
    # stay in ascending column order).
    counts = torch.bincount(rows, minlength=K)
    c_max = int(counts.max()) if len(rows) else 0
    pos = torch.arange(len(rows), device=dev) - (torch.cumsum(counts, 0) - counts)[rows]
    cand_s = torch.full((K, c_max), float("-inf"), device=dev)
    cand_i = torch.full((K, c_max), -1, dtype=torch.long, device=dev)
    cand_s[rows, pos] = vals
    cand_i[rows, pos] = cols + start
    cand_s, o = torch.sort(cand_s, dim=1, descending=True, stable=True)
    cand_i = torch.gather(cand_i, 1, o)
    # Merge two sorted lists per row. On equal scores the current best wins (lower index), so a
    # best entry moves down by the number of candidates strictly above it, a candidate by the
    # number of best entries >= it. searchsorted needs ascending rows, hence the negations.
    pos_b = torch.arange(m, device=dev) + torch.searchsorted(-cand_s, -best_s, right=False)  # [K, m]
    pos_c = torch.arange(c_max, device=dev) + torch.searchsorted(-best_s, -cand_s, right=True)  # [K, c_max]
    out_s = torch.empty(K, m + c_max, device=dev)
    out_i = torch.empty(K, m + c_max, dtype=torch.long, device=dev)
    out_s.scatter_(1, pos_b, best_s).scatter_(1, pos_c, cand_s)
    out_i.scatter_(1, pos_b, best_i).scatter_(1, pos_c, cand_i)
    return out_s[:, :kk].contiguous(), out_i[:, :kk].contiguous()


@torch.no_grad()
def topk_stream(text_emb, blocks, k, device="cpu"):
    """Exact top-k of text_emb @ E.T per row without ever holding the N x K score matrix.

    text_emb: [K, D] (unit vectors); blocks: iterable of (first row, array [b, D]) in row order.
    Returns (scores float32 [K, k'], index int64 [K, k']) with k' = min(k, N), each row ordered by
    score descending, ties broken by the lower index. Memory: one [K, b] block plus [K, k]."""
    T = text_emb.to(device=device, dtype=torch.float32)  # [K, D]
    K = T.shape[0]
    best_s = torch.empty(K, 0, device=device)
    best_i = torch.empty(K, 0, dtype=torch.long, device=device)
    E_buf = S_buf = None  # reused across blocks: a fresh 100+ MB tensor per block costs page faults
    for start, block in blocks:
        b = len(block)
        if E_buf is None or E_buf.shape[0] < b:
            E_buf = torch.empty(b, T.shape[1], device=device)
            S_buf = torch.empty(K, b, device=device)
        E = E_buf[:b].copy_(torch.as_tensor(block))  # [b, D] fp16 -> fp32
        S = S_buf[:, :b] if b == S_buf.shape[1] else torch.empty(K, b, device=device)
        torch.mm(T, E.t(), out=S)  # [K, D] x [D, b] -> [K, b], cosine since both sides are unit vectors
        best_s, best_i = _merge_topk(best_s, best_i, S, start, k)
    return best_s.cpu(), best_i.cpu()


def synthetic_store(path, n, dim=768, seed=0, block_rows=65536):
    """Write n random unit vectors [n, dim] float16 to a .npy file, block by block (benchmarks)."""
    with open(path, "wb") as f:
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)),
                  "fortran_order": False, "shape": (n, dim)}
        np.lib.format.write_array_header_2_0(f, header)
        for b, s in enumerate(range(0, n, block_rows)):
            x = np.random.default_rng([seed, b]).standard_normal((min(block_rows, n - s), dim), np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            f.write(x.astype(np.float16).tobytes())


# ----------------------------------------------------------------------------- safe pickle import

_STORAGE_DTYPES = {"FloatStorage": torch.float32, "HalfStorage": torch.float16, "DoubleStorage": torch.float64,
                   "BFloat16Storage": torch.bfloat16}


class _StorageUnpickler(pickle.Unpickler):
    """Reads the small pickles inside one legacy torch.save(storage) record: storage classes map to
    dtypes, the persistent id is returned as is, any other global is refused."""

    def find_class(self, module, name):
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        raise UserError(f"refusing to load an embedding storage: it references {module}.{name}")

    def persistent_load(self, pid):
        return pid


def _load_storage_bytes(b):
    """pickle.dump of a tensor stores its storage as legacy torch.save(storage) bytes: five small
    pickles (magic number, protocol, sys info, a persistent id ('storage', dtype, key, location,
    numel, ...), the key list), then numel (int64) and the raw little-endian data. We read that
    layout directly: ~10x faster than a torch.load per tensor, which matters for 2.7M tensors.
    Anything unexpected goes to torch's own allow-list loader, torch.load(weights_only=True)."""
    import io
    f = io.BytesIO(b)
    try:
        magic, _, sys_info, pid, keys = (_StorageUnpickler(f).load() for _ in range(5))
        dtype = pid[1]
        ok = (magic == 0x1950a86a20f9469cfc6c and sys_info.get("little_endian") and pid[0] == "storage"
              and isinstance(dtype, torch.dtype) and len(keys) == 1)
    except (pickle.UnpicklingError, EOFError, IndexError, AttributeError, TypeError, ValueError):
        ok = False
    if not ok:
        return torch.load(io.BytesIO(b), map_location="cpu", weights_only=True)
    numel = int.from_bytes(f.read(8), "little")
    data = bytearray(f.read(numel * dtype.itemsize))
    return torch.frombuffer(data, dtype=dtype) if numel else torch.empty(0, dtype=dtype)


def _rebuild_tensor(storage, offset, size, stride, *rest):
    """torch._utils._rebuild_tensor_v2 for the plain 1-D tensors _load_storage_bytes returns."""
    if isinstance(storage, torch.Tensor):
        return torch.as_strided(storage, size, stride, offset)
    return torch._utils._rebuild_tensor_v2(storage, offset, size, stride, *rest)


# (module, name) -> what to return. Nothing else may be imported by a pickle we read.
_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): lambda: _rebuild_tensor,
    ("torch.storage", "_load_from_bytes"): lambda: _load_storage_bytes,
    ("collections", "OrderedDict"): lambda: __import__("collections").OrderedDict,
}


class TensorOnlyUnpickler(pickle.Unpickler):
    """A pickle reader that can rebuild tensors and nothing else: every global a pickle names
    must be in _ALLOWED, so a payload such as os.system is refused before it is ever called."""

    def __init__(self, f, source):
        super().__init__(f)
        self.source = source

    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]()
        raise UserError(f"refusing to load {self.source!r}: it references {module}.{name}, which is not "
                        "needed to rebuild tensors (pickles can run code; only tensor globals are allowed)")

    def persistent_load(self, pid):
        raise UserError(f"refusing to load {self.source!r}: unexpected persistent id {str(pid)[:60]!r}")


_TORCH_LEGACY_MAGIC = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19."


def load_embedding_pickle(path):
    """Read {basename: tensor [D]} from a pickle.dump or torch.save file without running code.

    torch.save files (zip or legacy) go through torch.load(weights_only=True), torch's own
    allow-list unpickler; plain pickles through TensorOnlyUnpickler. Returns {str: float32 [D]}."""
    if not os.path.isfile(path):
        raise UserError(f"embedding file not found: {path!r}")
    with open(path, "rb") as f:
        head = f.read(len(_TORCH_LEGACY_MAGIC))
        f.seek(0)
        try:
            if head.startswith(b"PK\x03\x04") or head == _TORCH_LEGACY_MAGIC:
                obj = torch.load(f, map_location="cpu", weights_only=True)
            else:
                obj = TensorOnlyUnpickler(f, path).load()
        except UserError:
            raise
        except Exception as e:  # corrupt files and refused globals surface as many exception types
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [""]
            msg = next((ln for ln in lines if "GLOBAL" in ln), lines[0])  # torch names the refused global there
            raise UserError(f"cannot load {path!r} safely: {type(e).__name__}: {msg[:300]}") from None
    if not isinstance(obj, dict) or not obj:
        raise UserError(f"{path!r} is not a non-empty dict of image name -> embedding")
    out = {}
    for name, v in obj.items():
        if not isinstance(name, str) or not isinstance(v, torch.Tensor):
            raise UserError(f"{path!r}: expected str -> tensor entries, got {type(name).__name__} -> "
                            f"{type(v).__name__}")
        out[name] = v.reshape(-1).float()
    if len({v.numel() for v in out.values()}) != 1:
        raise UserError(f"{path!r}: the embeddings have different sizes {sorted({v.numel() for v in out.values()})[:5]}")
    return out


_WNID = re.compile(r"^(n\d{8})_")


def rebuild_paths(names, listing):
    """Official pickles key images by basename. ImageNet: 'n01440764_10026.JPEG' lives at
    'n01440764/n01440764_10026.JPEG'; PASS (and anything else): flat. `listing` is the set of
    relative paths that exist. Returns ({name: rel path}, [names with no file])."""
    found, missing = {}, []
    for name in names:
        m = _WNID.match(name)
        cands = ([f"{m.group(1)}/{name}"] if m else []) + [name]
        hit = next((c for c in cands if c in listing), None)
        if hit is None:
            missing.append(name)
        else:
            found[name] = hit
    return found, missing
