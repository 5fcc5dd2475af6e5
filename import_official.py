"""Readers of the official ZUTIS retrieval files, kept apart so build_archive.py reads as one stage: the
embedding pickles {image basename: tensor} (read without running their code) and the archives
{category: [absolute image paths]} (official utils/extract_image_embeddings.py and
datasets/index_dataset.py `_get_category_to_p_images` write them). Guide: docs/retrieval.md.
"""
import io
import os
import pickle
import re

import torch

import common
from common import UserError


def _storage_from_bytes(b):
    # pickle.dump stores a tensor's storage as torch.save bytes: torch's allow-list reader takes those
    return torch.load(io.BytesIO(b), map_location="cpu", weights_only=True)


class TensorOnlyUnpickler(pickle.Unpickler):
    """A pickle reader that rebuilds tensors and nothing else: a global outside this allow-list (such
    as os.system) is refused before it could ever be called."""
    ALLOWED = {("torch._utils", "_rebuild_tensor_v2"): lambda: torch._utils._rebuild_tensor_v2,
               ("torch.storage", "_load_from_bytes"): lambda: _storage_from_bytes,
               ("collections", "OrderedDict"): lambda: __import__("collections").OrderedDict}

    def __init__(self, f, source):
        super().__init__(f)
        self.source = source

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return self.ALLOWED[(module, name)]()
        raise UserError(f"refusing to load {self.source!r}: it references {module}.{name}, which is not "
                        "needed to rebuild tensors (pickles can run code; only tensor globals are allowed)")

    def persistent_load(self, pid):
        raise UserError(f"refusing to load {self.source!r}: unexpected persistent id {str(pid)[:60]!r}")


def load_embedding_pickle(path):
    """{basename: tensor [D]} from a pickle.dump or torch.save file, without running code: torch.save
    files go through torch.load(weights_only=True), plain pickles through TensorOnlyUnpickler.
    Returns {str: float32 [D]}."""
    if not os.path.isfile(path):
        raise UserError(f"embedding file not found: {path!r}")
    with open(path, "rb") as f:
        head = f.read(16)
        f.seek(0)
        try:  # zip (torch.save) or the legacy torch.save magic number
            if head.startswith(b"PK\x03\x04") or head.startswith(b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19"):
                obj = torch.load(f, map_location="cpu", weights_only=True)
            else:
                obj = TensorOnlyUnpickler(f, path).load()
        except UserError:
            raise
        except Exception as e:  # corrupt files and refused globals surface as many exception types
            raise common.unreadable(path, "embedding file", e) from None
    if not isinstance(obj, dict) or not obj:
        raise UserError(f"{path!r} is not a non-empty dict of image name -> embedding")
    if not all(isinstance(n, str) and isinstance(v, torch.Tensor) for n, v in obj.items()):
        raise UserError(f"{path!r}: expected image name -> tensor entries")
    out = {name: v.reshape(-1).float() for name, v in obj.items()}
    if len({v.numel() for v in out.values()}) != 1:
        raise UserError(f"{path!r}: the embeddings have different sizes {sorted({v.numel() for v in out.values()})[:5]}")
    return out


_WNID = re.compile(r"^(n\d{8})_")


def rebuild_paths(names, listing):
    """Official pickles key images by basename: ImageNet's 'n01440764_10026.JPEG' lives at
    'n01440764/n01440764_10026.JPEG', PASS (and anything else) is flat. `listing`: the set of relative
    paths that exist. Returns ({name: rel path}, [names with no file])."""
    found, missing = {}, []
    for name in names:
        m = _WNID.match(name)
        hit = next((c for c in ([f"{m.group(1)}/{name}"] if m else []) + [name] if c in listing), None)
        if hit is None:
            missing.append(name)
        else:
            found[name] = hit
    return found, missing


def convert_archive(official, names, dirs, remaps):
    """Official {category: [absolute paths]} -> (index dirs, {category: [entry]}, [paths with no file]).
    Each path has its first matching (old, new) prefix of `remaps` replaced, then belongs to the longest of
    `dirs` that contains it; without `dirs`, to the root of ImageNet's <dir>/<wnid>/<wnid>_<n>.JPEG or to
    its parent folder (PASS is flat). Scores are unknown: None."""
    found_dirs, archive, missing = list(dirs), {}, []
    for cat in names:
        archive[cat] = []
        for p in official[cat]:
            p = os.path.abspath(next((new + p[len(old):] for old, new in remaps if p.startswith(old)), p))
            owners = [d for d in dirs if p.startswith(d.rstrip(os.sep) + os.sep)]
            d = max(owners, key=len) if owners else None if dirs else os.path.dirname(p)
            m = _WNID.match(os.path.basename(p))
            if not dirs and m and os.path.basename(d) == m.group(1):
                d = os.path.dirname(d)
            if d is None or not os.path.isfile(p):
                missing.append(p)
                continue
            found_dirs += [d] if d not in found_dirs else []
            archive[cat].append({"path": os.path.relpath(p, d), "dir": found_dirs.index(d), "score": None})
    return found_dirs, archive, missing


if __name__ == "__main__":
    common.library_main(__doc__, "build_archive.py imports it for --import_embeddings and --import_archive "
                                 "(python build_archive.py --help).")
