"""Stage 1: retrieve a per-category image archive from unlabelled image folders with CLIP
(ZUTIS paper section 3.2; zutis_facts.md section 2).

Reads:  index dirs (any folder tree of images, found recursively), a category list, a CLIP model.
Writes: OUT/archive.json (format: top of common.py), OUT/embeddings/<arch_tag>/ (float16 chunks +
        the ordered path list, reused by later runs; layout in index_store.py),
        OUT/contact_sheets/<category>.jpg (top-16 thumbnails), OUT/skipped.txt (unreadable images),
        OUT/build_archive_config.json (config, git sha, summary and timings).

Steps: (1) CLIP image embeddings (CLIP preprocess, L2-normalised) of every index image, in
fixed-size chunks written atomically: a killed run resumes from the last finished chunk; (2) text
embeddings per category (85-template ensemble); (3) cosine scores streamed over the embeddings with
a running exact top-k (ties: lower image index first); never an N x K matrix.

    python build_archive.py                                     # data/ImageNet2012/train + data/pass/images, VOC
    python build_archive.py --index_dirs my_photos --categories my_names.txt --k 100 --out_dir out_mine
    torchrun --nproc_per_node 8 build_archive.py                # rank r embeds chunks r, r+8, ...; rank 0 merges
    python build_archive.py --arch tiny_clip.pt --index_dirs imgs --categories cat,dog --k 5 --device cpu
    python build_archive.py --import_embeddings imnet.pkl pass.pkl --index_dirs data/ImageNet2012/train data/pass/images
    python build_archive.py --import_archive voc_category_to_p_images_n500.json --remap /old/root=/new/root
    python build_archive.py --benchmark 2700000                 # retrieval time + peak RSS, 919 categories

References: ZUTIS paper section 3.2 (archive = top-k CLIP retrievals per category name, k = 500);
the official repo's datasets/index_dataset.py `_get_category_to_p_images` and
utils/extract_image_embeddings.py (behaviour and file formats only; zutis_facts.md sections 1-2).

Expected console output ends with a summary such as (3000 images, tiny CLIP, CPU, a resumed run)
    summary: 3000 images listed, 3000 embedded (1720 this run, 2.1 s, 832.7 img/s), 0 skipped (see
    out/skipped.txt); 80 categories x k=50 (text 11.6 s, retrieval 0.1 s); 357 distinct images, 225 in
    more than one archive -> out/archive.json
"""
import argparse
import os
import re
import resource
import shutil
import tempfile
import time
from collections import Counter
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F

import common
import index_store as store
from categories import IMAGENET_S919, get_categories
from common import UserError

DEFAULT_INDEX_DIRS = ["data/ImageNet2012/train", "data/pass/images"]
LAYOUT = ("data/ImageNet2012/train/<wnid>/<wnid>_<n>.JPEG and/or data/pass/images/<name>.jpg, "
          "or any folder tree of images given with --index_dirs DIR [DIR ...]")


# --- CLI ---
def get_args_parser():
    p = argparse.ArgumentParser(description="Build a per-category image archive with CLIP retrieval.")
    p.add_argument("--index_dirs", nargs="+", default=None,
                   help=f"folders of unlabelled images, searched recursively (default: those of {DEFAULT_INDEX_DIRS} that exist)")
    p.add_argument("--categories", default=None,
                   help="voc | coco | coca | imagenet_s919 | a text file (one name per line) | 'a,b,c' (default voc)")
    p.add_argument("--arch", default="ViT-L/14@336px", help="CLIP model name or checkpoint path used for retrieval")
    p.add_argument("--k", type=int, default=500, help="images per category (official: 500)")
    p.add_argument("--out_dir", default="out", help="output folder")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--batch_size", type=int, default=128, help="images per forward pass when embedding")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="DataLoader workers (decode + resize)")
    p.add_argument("--chunk_size", type=int, default=4096, help="images per cached embedding chunk (the resume unit)")
    p.add_argument("--block_size", type=int, default=65536, help="embedding rows per retrieval block (memory: K x block fp32)")
    p.add_argument("--sheet_size", type=int, default=16, help="thumbnails per contact sheet (0: no contact sheets)")
    p.add_argument("--import_embeddings", nargs="+", default=None, metavar="PKL",
                   help="official embedding pickles {basename: tensor}, one per --index_dirs entry, instead of embedding")
    p.add_argument("--import_archive", default=None, metavar="JSON",
                   help="convert an official archive {category: [absolute paths]} to our format and exit")
    p.add_argument("--remap", action="append", default=[], metavar="OLD=NEW",
                   help="with --import_archive: replace the path prefix OLD by NEW (repeatable)")
    p.add_argument("--benchmark", type=int, default=0, metavar="N",
                   help="time retrieval on N synthetic unit vectors (D=768) for the 919 ImageNet-S categories and exit")
    p.add_argument("--seed", type=int, default=0, help="seed of the --benchmark data")
    p.add_argument("--_fail_after_chunks", type=int, default=0, help=argparse.SUPPRESS)  # test hook: simulate a kill
    return p


# ----------------------------------------------------------------------------- inputs

def resolve_index_dirs(index_dirs):
    """Absolute, existing index dirs; the defaults are the two official folders that exist."""
    if index_dirs is None:
        index_dirs = [d for d in DEFAULT_INDEX_DIRS if os.path.isdir(d)]
        if not index_dirs:
            raise UserError(f"no index images: neither of {DEFAULT_INDEX_DIRS} exists. Expected layout: {LAYOUT} "
                            "(see README, 'Data layout')")
    for d in index_dirs:
        common.require_dir(d, "index dir", LAYOUT)
        if not has_image(d):  # checked now, before minutes of model download
            raise UserError(f"index dir {d!r} holds no images ({', '.join(common.IMG_EXTS)}, searched recursively)")
    if len({os.path.abspath(d) for d in index_dirs}) != len(index_dirs):
        raise UserError(f"--index_dirs lists a folder twice: {index_dirs}")
    return [os.path.abspath(d) for d in index_dirs]


def has_image(root):
    for _, _, files in os.walk(root, followlinks=True):
        if any(f.lower().endswith(common.IMG_EXTS) and not f.startswith(".") for f in files):
            return True
    return False


def list_index(dirs):
    """[[dir index, path relative to that dir], ...] in a fixed order: the global row order."""
    paths = []
    for d, root in enumerate(dirs):
        rel = common.list_images(root)
        if not rel:
            raise UserError(f"index dir {root!r} holds no images ({', '.join(common.IMG_EXTS)}, searched recursively)")
        paths += [[d, r] for r in rel]
    return paths


def load_categories(spec):
    try:
        return get_categories(spec)
    except ValueError as e:
        raise UserError(str(e)) from None


# ----------------------------------------------------------------------------- embedding

class ImageFiles(torch.utils.data.Dataset):
    """Item i -> (i, CLIP-preprocessed image [3, R, R] or None, error message)."""

    def __init__(self, files, preprocess):
        self.files, self.preprocess = files, preprocess

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        try:
            return i, self.preprocess(common.load_rgb(self.files[i])), ""
        except Exception as e:  # decoders raise many types on corrupt files: skip and log, never stop
            return i, None, f"{type(e).__name__}: {e}".replace("\n", " ")[:200]


def collate_skip(items):
    """Drop unreadable images: -> (rows long [b], images [b, 3, R, R] or None, [(row, reason)])."""
    ok = [it for it in items if it[1] is not None]
    rows = torch.tensor([it[0] for it in ok], dtype=torch.long)
    x = torch.stack([it[1] for it in ok]) if ok else None
    return rows, x, [(it[0], it[2]) for it in items if it[1] is None]


def embed_chunks(model, preprocess, files, todo, st_dir, args, device):
    """Embed the chunks in `todo` and write each one the moment its last batch is done. One
    DataLoader for all of them (workers start once); batches never straddle two chunks."""
    cs, bs, dim = args.chunk_size, args.batch_size, model.visual.output_dim
    batches, owner = [], []
    for c in todo:
        lo, hi = c * cs, min(len(files), (c + 1) * cs)
        for s in range(lo, hi, bs):
            batches.append(list(range(s, min(hi, s + bs))))
            owner.append(c)
    loader = torch.utils.data.DataLoader(ImageFiles(files, preprocess), batch_sampler=batches, num_workers=args.workers,
                                         collate_fn=collate_skip, pin_memory=device.type == "cuda")
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    left, acc, n_done = Counter(owner), {}, 0
    from tqdm import tqdm
    bar = tqdm(total=sum(len(b) for b in batches), unit="img", desc="embed", disable=not args.progress, mininterval=5)
    for c, (rows, x, skipped) in zip(owner, loader):
        emb, ok_rows, bad = acc.setdefault(c, ([], [], []))
        if x is not None:
            with torch.no_grad(), amp:
                f = model.encode_image(x.to(device, non_blocking=True))
            f = F.normalize(f.float(), dim=-1).cpu()  # [b, D], unit vectors: cosine = dot product
            finite = torch.isfinite(f).all(1)
            emb.append(f[finite].half().numpy())
            ok_rows.append(rows[finite].numpy())
            bad += [(int(r), "non-finite embedding") for r in rows[~finite]]
        bad += skipped
        bar.update(len(rows) + len(skipped))
        left[c] -= 1
        if left[c] == 0:  # the chunk is complete: write it atomically and free it
            bad.sort()
            store.save_chunk(st_dir, c, np.concatenate(emb) if emb else np.zeros((0, dim), np.float16),
                             np.concatenate(ok_rows) if ok_rows else [], [b[0] for b in bad], [b[1] for b in bad])
            del acc[c]
            n_done += 1
            if args._fail_after_chunks and n_done >= args._fail_after_chunks:
                raise RuntimeError(f"test hook: stopping after {n_done} chunk(s), as if killed")
    bar.close()


def embed_index(args, dist, model, preprocess, dirs, st_dir):
    """Make sure st_dir holds a complete store for `dirs`: list, embed missing chunks, merge."""
    if dist.is_main:
        meta = store.read_paths(st_dir)
        if meta is not None and meta.get("source") == "import" and store.is_complete(st_dir):
            if len(meta["index_dirs"]) != len(dirs):
                raise UserError(f"{st_dir} holds embeddings imported for {len(meta['index_dirs'])} index dirs "
                                f"({meta['index_dirs']}), but {len(dirs)} were given")
            print(f"using imported embeddings in {st_dir} ({len(meta['paths'])} images)")
        else:
            paths = list_index(dirs)
            if meta is not None and (meta["paths"] != paths or len(meta["index_dirs"]) != len(dirs)):
                raise UserError(f"{st_dir} holds embeddings of a different image list ({len(meta['paths'])} images, "
                                f"now {len(paths)}): delete that folder to re-embed, or use another --out_dir")
            if meta is None:
                meta = {"arch": args.arch, "source": "embed", "chunk_size": args.chunk_size,
                        "index_dirs": dirs, "paths": paths}
                store.write_paths(st_dir, meta)  # the ordered list first: chunks refer to its rows
    # every rank reads the same meta; the chunks missing now are the work of this run (all ranks)
    n_new = 0
    if dist.is_main and not store.is_complete(st_dir):
        cs, n = meta["chunk_size"], len(meta["paths"])
        n_new += sum(min(n, (c + 1) * cs) - c * cs for c in range((n + cs - 1) // cs)
                     if not os.path.isfile(store.chunk_file(st_dir, c)))
    dist.barrier()
    meta = store.read_paths(st_dir)
    if store.is_complete(st_dir):
        dist.print0(f"embeddings: all {len(meta['paths'])} images already embedded in {st_dir}")
        return 0
    cs, n = meta["chunk_size"], len(meta["paths"])
    n_chunks = (n + cs - 1) // cs
    mine = [c for c in range(n_chunks) if c % dist.world == dist.rank]  # chunk c belongs to rank c % world
    todo = [c for c in mine if not os.path.isfile(store.chunk_file(st_dir, c))]
    dist.print0(f"embeddings: {n} images in {n_chunks} chunks of {cs}; {n_new} images to embed "
                f"({len(mine) - len(todo)} of rank 0's {len(mine)} chunks already on disk; world size {dist.world})")
    files = [os.path.join(dirs[d], r) for d, r in meta["paths"]]
    embed_chunks(model, preprocess, files, todo, st_dir, args, dist.device)
    dist.barrier()
    if dist.is_main:
        store.merge_chunks(st_dir, n_chunks, model.visual.output_dim, meta["paths"])
    return n_new


def import_embeddings(args, dirs, st_dir):
    """Official pickles (one per index dir) -> a complete store. Embeddings whose image is not on
    disk are left out and listed as skipped. One pickle in memory at a time (~5 GB for ImageNet)."""
    if len(args.import_embeddings) != len(dirs):
        raise UserError(f"--import_embeddings got {len(args.import_embeddings)} files but --index_dirs "
                        f"{len(dirs)} folders: give one pickle per index dir, in the same order")
    sources = [os.path.abspath(p) for p in args.import_embeddings]
    meta = store.read_paths(st_dir)
    if meta and meta.get("imported_from") == sources and meta["index_dirs"] == dirs and store.is_complete(st_dir):
        print(f"embeddings: already imported from {sources} into {st_dir}")
        return
    paths, pieces, skipped = [], [], []
    for d, (pkl, root) in enumerate(zip(args.import_embeddings, dirs)):
        table = store.load_embedding_pickle(pkl)
        found, missing = store.rebuild_paths(sorted(table), set(common.list_images(root)))
        print(f"{pkl}: {len(table)} embeddings, {len(found)} images found under {root}, {len(missing)} missing")
        names = sorted(found, key=found.get)  # row order = path order, as for embedded stores
        if names:
            x = torch.stack([table[n] for n in names])  # [n, D]
            pieces.append(F.normalize(x, dim=-1).half().numpy())  # the official ones are unit-norm already
        paths += [[d, found[n]] for n in names]
        skipped += [[d, name, "embedding imported, but no image file"] for name in missing]
        del table
    if not paths:
        raise UserError(f"none of the imported embeddings has an image under {dirs}. Expected layout: {LAYOUT}")
    if len({x.shape[1] for x in pieces}) > 1:
        raise UserError(f"the imported pickles hold embeddings of different sizes: {[x.shape[1] for x in pieces]}")
    meta = {"arch": args.arch, "source": "import", "chunk_size": args.chunk_size, "index_dirs": dirs,
            "paths": paths, "imported_from": sources}
    store.write_store(st_dir, meta, pieces, skipped)


# ----------------------------------------------------------------------------- outputs

def safe_name(name):
    return re.sub(r"[^\w.-]+", "_", name).strip("_") or "category"


def write_archive(path, arch, k, dirs, categories, archive):
    out_base = os.path.dirname(os.path.abspath(path))
    common.save_json({"arch": arch, "k": k, "index_dirs": [os.path.relpath(d, out_base) for d in dirs],
                      "categories": categories, "archive": archive}, path)


def contact_sheet(name, entries, dirs, path, n=16, tile=128, cols=4):
    """A grid of the top-n thumbnails with the category name and each image's score."""
    from PIL import Image, ImageDraw, ImageFont, ImageOps
    entries = entries[:n]
    rows = max(1, (len(entries) + cols - 1) // cols)
    font = ImageFont.load_default()
    sheet = Image.new("RGB", (cols * tile, 20 + rows * (tile + 14)), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 4), f"{name}  (top {len(entries)})", fill="black", font=font)
    for j, e in enumerate(entries):
        x, y = (j % cols) * tile, 20 + (j // cols) * (tile + 14)
        try:
            with Image.open(os.path.join(dirs[e["dir"]], e["path"])) as im:
                im.draft("RGB", (tile, tile))  # JPEG: decode at reduced size, much faster
                im = ImageOps.contain(im.convert("RGB"), (tile, tile))
                sheet.paste(im, (x + (tile - im.width) // 2, y + (tile - im.height) // 2))
        except Exception:  # a vanished or unreadable file gets a grey tile, not a crash
            draw.rectangle([x + 2, y + 2, x + tile - 2, y + tile - 2], fill=(160, 160, 160))
        score = "" if e["score"] is None else f"{e['score']:.3f}"
        draw.text((x + 4, y + tile), f"{j + 1}. {score}", fill="black", font=font)
    common.save_image(sheet, path, quality=90)


def write_outputs(args, arch, k, dirs, categories, archive, skipped):
    """archive.json, contact sheets, skipped.txt; returns (distinct images, images in > 1 archive)."""
    write_archive(os.path.join(args.out_dir, "archive.json"), arch, k, dirs, categories, archive)
    if args.sheet_size > 0:
        for name, entries in archive.items():
            contact_sheet(name, entries, dirs, os.path.join(args.out_dir, "contact_sheets", safe_name(name) + ".jpg"),
                          n=args.sheet_size)
    with common.atomic_path(os.path.join(args.out_dir, "skipped.txt")) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.writelines(f"{os.path.join(dirs[d], rel)}\t{why}\n" for d, rel, why in skipped)
    seen = Counter((e["dir"], e["path"]) for entries in archive.values() for e in entries)
    return len(seen), sum(c > 1 for c in seen.values())


# ----------------------------------------------------------------------------- official archives

def split_official_path(path, dirs):
    """An absolute image path -> (index dir, relative path). With --index_dirs: the longest dir that
    contains it; otherwise ImageNet's <dir>/<wnid>/<wnid>_<n>.JPEG or a flat <dir>/<name>."""
    if dirs:
        owners = [d for d in dirs if path.startswith(d.rstrip(os.sep) + os.sep)]
        if not owners:
            return None, None
        d = max(owners, key=len)
        return d, os.path.relpath(path, d)
    parent, name = os.path.split(path)
    m = re.match(r"^(n\d{8})_", name)
    if m and os.path.basename(parent) == m.group(1):
        return os.path.dirname(parent), f"{m.group(1)}/{name}"
    return parent, name


def import_archive(args):
    import json
    src = args.import_archive
    if not os.path.isfile(src):
        raise UserError(f"archive to import not found: {src!r}")
    try:
        with open(src, encoding="utf-8") as f:
            official = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{src!r} is not JSON: {e}") from None
    if not isinstance(official, dict) or not all(isinstance(v, list) for v in official.values()):
        raise UserError(f"{src!r} is not an official archive (a JSON object: category -> list of paths)")
    remaps = []
    for r in args.remap:
        if "=" not in r:
            raise UserError(f"--remap {r!r}: expected OLD_PREFIX=NEW_PREFIX")
        remaps.append(r.split("=", 1))
    categories = load_categories(args.categories) if args.categories else ["background"] + list(official)
    if set(categories[1:]) != set(official) - {"background"}:
        diff = sorted(set(categories[1:]) ^ (set(official) - {"background"}))
        raise UserError(f"--categories does not match the categories of {src!r}: they differ in {diff[:10]}")
    dirs = [os.path.abspath(d) for d in args.index_dirs] if args.index_dirs else []
    found_dirs, archive, missing = list(dirs), {}, []
    for cat in categories[1:]:
        archive[cat] = []
        for p in official[cat]:
            for old, new in remaps:
                if p.startswith(old):
                    p = new + p[len(old):]
                    break
            d, rel = split_official_path(os.path.abspath(p), dirs)
            if d is None or not os.path.isfile(p):
                missing.append(p)
                continue
            if d not in found_dirs:
                found_dirs.append(d)
            archive[cat].append({"path": rel, "dir": found_dirs.index(d), "score": None})
    n_all = sum(len(v) for v in official.values())
    if len(missing) == n_all:
        raise UserError(f"none of the {n_all} paths in {src!r} exists (first: {missing[0]!r}); "
                        "point them at your data with --remap OLD_PREFIX=NEW_PREFIX")
    os.makedirs(args.out_dir, exist_ok=True)
    skipped = [[0, p, "listed in the official archive, file not found"] for p in missing]
    k = max(len(v) for v in official.values())
    # skipped entries hold absolute paths, which os.path.join(dirs[0], path) leaves as they are
    n_unique, n_dup = write_outputs(args, "ViT-L/14@336px", k, found_dirs, categories, archive, skipped)
    print(f"imported {src}: {len(categories) - 1} categories, {n_all - len(missing)} of {n_all} paths found, "
          f"{len(missing)} missing (listed in {os.path.join(args.out_dir, 'skipped.txt')}); "
          f"{n_unique} distinct images, {n_dup} in more than one archive; index dirs {found_dirs}")


# ----------------------------------------------------------------------------- benchmark

def benchmark(args):
    n, K, D = args.benchmark, len(IMAGENET_S919) - 1, 768
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    tmp = tempfile.mkdtemp(prefix="zutis_archive_bench_")
    try:
        path = os.path.join(tmp, "embeddings.npy")
        t0 = time.time()
        store.synthetic_store(path, n, D, seed=args.seed)
        t_gen = time.time() - t0
        text = F.normalize(torch.randn(K, D, generator=torch.Generator().manual_seed(args.seed)), dim=-1)
        t0, cpu0 = time.time(), time.process_time()
        scores, idx = store.topk_stream(text, store.iter_blocks(path, args.block_size), args.k, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt, cpu = time.time() - t0, time.process_time() - cpu0
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB (Linux)
        # CPU seconds too: on a shared machine the wall time says more about the neighbours than about us
        print(f"benchmark: N={n:,} x K={K} (D={D}, fp16 on disk, memory-mapped), k={args.k}, block={args.block_size}, "
              f"device={device.type}, threads={torch.get_num_threads()}: retrieval {dt:.1f} s wall, {cpu:.1f} s CPU "
              f"({n * K / dt / 1e6:.0f} M scores/s), peak RSS {rss:.0f} MiB (data generation {t_gen:.0f} s, not timed)")
        assert idx.shape == (K, min(args.k, n))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- main

def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if args.k < 1 or args.chunk_size < 1 or args.batch_size < 1 or args.block_size < 1:
        raise UserError("--k, --chunk_size, --batch_size and --block_size must be positive")
    if args.benchmark:
        return benchmark(args)
    if args.import_archive:
        return import_archive(args)
    import clip_model
    categories = load_categories(args.categories or "voc")
    dirs = resolve_index_dirs(args.index_dirs)
    dist = common.Dist(args.device)
    config = {**{k: v for k, v in vars(args).items() if not k.startswith("_")}, "index_dirs": dirs,
              "categories": args.categories or "voc", **common.git_info()}
    args.progress = dist.is_main
    if dist.is_main:
        common.print_config(config)
    st_dir = os.path.join(args.out_dir, "embeddings", clip_model.arch_tag(args.arch))
    model, preprocess = clip_model.load(args.arch, device=dist.device)
    t0 = time.time()
    if args.import_embeddings:
        if dist.is_main:
            import_embeddings(args, dirs, st_dir)
        n_new = 0
    else:
        n_new = embed_index(args, dist, model, preprocess, dirs, st_dir)
    t_embed = time.time() - t0
    if not dist.is_main:  # retrieval and outputs are rank 0's
        return dist.close()
    meta = store.read_paths(st_dir)
    rows, skipped = store.load_merged(st_dir)
    if len(rows) == 0:
        raise UserError(f"none of the {len(meta['paths'])} index images could be read (see {st_dir}/skipped.json)")
    names = categories[1:]  # "background" never gets an archive
    t0 = time.time()
    with torch.no_grad(), (torch.autocast("cuda", dtype=torch.bfloat16) if dist.device.type == "cuda" else nullcontext()):
        text = clip_model.text_embeddings(model, names, clip_model.TEMPLATES).float()  # [K, D]
    t_text, t0 = time.time() - t0, time.time()
    emb_file = os.path.join(st_dir, "embeddings.npy")
    (n_ok, dim), _, _ = store.npy_shape(emb_file)
    if text.shape[1] != dim:
        raise UserError(f"{args.arch!r} embeds text in {text.shape[1]} dims but the image embeddings in {st_dir} "
                        f"have {dim}: retrieve with the model that made them")
    scores, idx = store.topk_stream(text, store.iter_blocks(emb_file, args.block_size), args.k, dist.device)
    t_ret = time.time() - t0
    k = scores.shape[1]
    if k < args.k:
        print(f"note: only {n_ok} images were embedded, so each archive has {k} < --k {args.k} entries")
    paths = meta["paths"]
    archive = {}
    for c, name in enumerate(names):
        archive[name] = [{"path": paths[r][1], "dir": paths[r][0], "score": round(float(s), 6)}
                         for r, s in zip(rows[idx[c].numpy()].tolist(), scores[c].tolist())]
    n_unique, n_dup = write_outputs(args, args.arch, k, dirs, categories, archive, skipped)
    summary = {"images_listed": len(paths) + (len(skipped) if args.import_embeddings else 0), "embedded": n_ok,
               "embedded_this_run": n_new, "skipped": len(skipped), "embed_seconds": round(t_embed, 1),
               "images_per_second": round(n_new / max(t_embed, 1e-9), 1), "text_seconds": round(t_text, 1),
               "retrieval_seconds": round(t_ret, 1),
               "categories": len(names), "k": k, "distinct_images": n_unique, "in_several_archives": n_dup}
    common.save_json({"config": config, "summary": summary}, os.path.join(args.out_dir, "build_archive_config.json"))
    print(f"summary: {summary['images_listed']} images listed, {n_ok} embedded ({n_new} this run, {t_embed:.1f} s, "
          f"{summary['images_per_second']} img/s), {len(skipped)} skipped (see {os.path.join(args.out_dir, 'skipped.txt')}); "
          f"{len(names)} categories x k={k} (text {t_text:.1f} s, retrieval {t_ret:.1f} s); {n_unique} distinct images, "
          f"{n_dup} in more than one archive -> {os.path.join(args.out_dir, 'archive.json')}")
    dist.close()


if __name__ == "__main__":
    common.run_main(main)
