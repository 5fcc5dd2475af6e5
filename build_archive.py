"""Stage 1: retrieve a per-category image archive from unlabelled image folders with CLIP (ZUTIS paper
section 3.2: the k images closest to each category name's prompt-ensemble embedding; official
datasets/index_dataset.py `_get_category_to_p_images`). User reference: docs/retrieval.md.

    python build_archive.py                                     # official index for VOC, ViT-L/14@336px, k=500
    python build_archive.py --categories imagenet_s919          # its recipe: ImageNet train only
    python build_archive.py --index_dirs my_photos --categories my_names.txt --k 100 --out_dir out_mine
    torchrun --nproc_per_node 8 build_archive.py                # rank r embeds chunks r, r+8, ...; rank 0 merges
    python build_archive.py --import_embeddings imnet.pkl pass.pkl --index_dirs data/ImageNet2012/train data/pass/images
    python build_archive.py --import_archive voc_category_to_p_images_n500.json --remap /old/root=/new/root

Steps: (1) CLIP image embeddings (unit norm) of every index image into OUT/embeddings/<arch tag>/ in chunks, each
written atomically, so a killed run resumes from its last finished chunk; (2) a text embedding per category
(85-template ensemble); (3) an exact streaming top-k of the cosines (topk.py), never an N x K matrix. Outputs:
OUT/archive.json (format: common.py), OUT/contact_sheets/, OUT/skipped.txt, OUT/build_archive_config.json.
"""
import os
import re
import shutil
import time
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import categories
import clip_model
import common
import import_official
import topk
from common import UserError

LAYOUT = "data/ImageNet2012/train/<wnid>/<wnid>_<n>.JPEG, data/pass/images/<name>.jpg, or any image tree via --index_dirs"


def get_args_parser():
    p = common.ArgumentParser(description="Build a per-category image archive by CLIP retrieval (ZUTIS stage 1). "
                                "Defaults follow the official recipe; reference: docs/retrieval.md.")
    p.add_argument("--categories", default=None, help="The category names: voc (the default), coco, coca, "
                   "imagenet_s919, a text file with one name per line, or 'a,b,c'.")
    p.add_argument("--index_dirs", nargs="+", default=None, metavar="DIR", help="Folders of unlabelled images, searched "
                   "recursively. By default the official index: ImageNet train for imagenet_s919, else ImageNet train and PASS.")
    p.add_argument("--arch", default="ViT-L/14@336px", help="The CLIP model name or checkpoint file (default %(default)s).")
    p.add_argument("--k", type=common.number(int, 1, what="--k"), default=500,
                   help="Images per category (default %(default)s).")
    p.add_argument("--dtype", choices=["auto", *common.DTYPES], default="auto", help="CLIP arithmetic: auto (the "
                   "default) is the official float16 on CUDA (OpenAI's fp16 model, as clip.load gives) and float32 on a "
                   "CPU; bfloat16 is autocast (fast on GPUs and CPUs with AMX or AVX512-BF16); float16 is CUDA only.")
    p.add_argument("--out_dir", default="out", help="The output folder (default %(default)s).")
    p.add_argument("--device", default="auto", help="Where to run: auto (the default), cpu or cuda.")
    p.add_argument("--batch_size", type=common.number(int, 1, what="--batch_size"), default=128,
                   help="Images per forward pass (default %(default)s).")
    p.add_argument("--workers", type=common.number(int, 0, what="--workers"), default=min(8, os.cpu_count() or 1),
                   help="Image decoding workers (default %(default)s).")
    p.add_argument("--chunk_size", type=common.number(int, 1, what="--chunk_size"), default=4096,
                   help="Images per stored chunk, the unit of resuming (default %(default)s).")
    p.add_argument("--block_size", type=common.number(int, 1, what="--block_size"), default=16384,
                   help="Embeddings per retrieval block (default %(default)s).")
    p.add_argument("--sheet_size", type=common.number(int, 0, what="--sheet_size"), default=16,
                   help="Thumbnails per contact sheet, 0 for none (default %(default)s).")
    p.add_argument("--import_embeddings", nargs="+", default=None, metavar="PKL",
                   help="Use official embedding pickles, one per --index_dirs folder in order, instead of embedding.")
    p.add_argument("--import_archive", default=None, metavar="JSON", help="Convert an official archive to ours and exit.")
    p.add_argument("--remap", action="append", default=[], metavar="OLD=NEW",
                   help="With --import_archive: replace the path prefix OLD by NEW; repeatable.")
    return p


# ----------------------------------------------------------------------------- inputs

def resolve_index_dirs(index_dirs, recipe):
    """Absolute, existing index dirs that hold images; by default the official recipe's folders."""
    if index_dirs is None:
        index_dirs = recipe["index_dirs"]
        missing = [d for d in index_dirs if not os.path.isdir(d)]
        if missing:
            raise UserError(f"the official index of the {recipe['name']} recipe is {' + '.join(index_dirs)}, but "
                            f"{missing} does not exist. Expected layout: {LAYOUT} (see README, 'Data layout')")
    for d in index_dirs:
        common.require_dir(d, "index dir", LAYOUT)
        if not any(f.lower().endswith(common.IMG_EXTS) for _, _, fs in os.walk(d, followlinks=True) for f in fs):
            raise UserError(f"index dir {d!r} holds no images ({', '.join(common.IMG_EXTS)}, searched recursively)")
    if len({os.path.abspath(d) for d in index_dirs}) != len(index_dirs):
        raise UserError(f"--index_dirs lists a folder twice: {index_dirs}")
    return [os.path.abspath(d) for d in index_dirs]


def list_index(dirs):
    """[[dir index, path relative to that dir], ...] in a fixed order: the global row order."""
    return [[d, r] for d, root in enumerate(dirs) for r in common.list_images(root)]


# ----------------------------------------------------------------------------- embedding store

def chunk_file(store, c):
    return os.path.join(store, f"chunk_{c:06d}.npz")


def read_meta(store):
    p = os.path.join(store, "paths.json")
    return common.load_json(p, "embedding store index") if os.path.isfile(p) else None


def is_complete(store):
    return os.path.isfile(os.path.join(store, "embeddings.npy"))


def save_chunk(store, c, emb, rows, skipped, reasons):
    """emb float16 [n_ok, D]; rows int64 [n_ok]; skipped int64 [n_skip]; reasons list of str."""
    with common.atomic_path(chunk_file(store, c)) as tmp, open(tmp, "wb") as f:
        np.savez(f, emb=emb.astype(np.float16), rows=np.asarray(rows, np.int64),
                 skipped=np.asarray(skipped, np.int64), reasons=np.asarray(reasons, dtype=str))


def load_chunk(store, c):
    with np.load(chunk_file(store, c), allow_pickle=False) as z:
        return z["emb"], z["rows"], z["skipped"], [str(r) for r in z["reasons"]]


def write_complete(store, rows, skipped, pieces, n, dim):
    """rows.npy, skipped.json, then embeddings.npy (float16 [n, dim]) written piece by piece, so the
    merged store never has to fit in memory; its atomic rename marks the store complete."""
    common.save_npy(np.asarray(rows, np.int64), os.path.join(store, "rows.npy"))
    common.save_json(skipped, os.path.join(store, "skipped.json"), indent=None)
    with common.atomic_path(os.path.join(store, "embeddings.npy")) as tmp, open(tmp, "wb") as f:
        np.lib.format.write_array_header_2_0(f, {"descr": "<f2", "fortran_order": False, "shape": (n, dim)})
        for x in pieces:
            assert x.ndim == 2 and x.shape[1] == dim, f"piece of shape {x.shape}, expected [*, {dim}]"
            f.write(np.ascontiguousarray(x, np.float16).tobytes())


# ----------------------------------------------------------------------------- embedding

class ImageFiles(torch.utils.data.Dataset):
    """Item i -> (i, CLIP-preprocessed image [3, R, R] or None, error message)."""
    def __init__(self, files, preprocess):
        self.files, self.preprocess = files, preprocess

    def __getitem__(self, i):
        try:
            return i, self.preprocess(common.load_rgb(self.files[i])), ""
        except Exception as e:  # decoders raise many types on corrupt files: skip and log, never stop
            return i, None, f"{type(e).__name__}: {e}".replace("\n", " ")[:200]


def collate_skip(items):
    """Drop unreadable images: -> (rows long [b], images [b, 3, R, R] or None, [(row, reason)])."""
    ok = [it for it in items if it[1] is not None]
    x = torch.stack([it[1] for it in ok]) if ok else None
    return torch.tensor([it[0] for it in ok], dtype=torch.long), x, [(it[0], it[2]) for it in items if it[1] is None]


def embed_chunks(model, preprocess, files, todo, store, args, device, amp):
    """Embed the chunks in `todo`, writing each the moment its last batch is done. One DataLoader for all
    of them (the workers start a single time); batches never straddle two chunks."""
    cs, bs, dim = args.chunk_size, args.batch_size, model.visual.output_dim
    batches, owner = [], []
    for c in todo:
        lo, hi = c * cs, min(len(files), (c + 1) * cs)
        batches += [list(range(s, min(hi, s + bs))) for s in range(lo, hi, bs)]
        owner += [c] * len(range(lo, hi, bs))
    loader = torch.utils.data.DataLoader(ImageFiles(files, preprocess), batch_sampler=batches, num_workers=args.workers,
                                         collate_fn=collate_skip, pin_memory=device.type == "cuda")
    left, acc = Counter(owner), {}
    bar = tqdm(total=sum(map(len, batches)), unit="img", desc="embed", disable=not args.is_main, mininterval=5)
    for c, (rows, x, skipped) in zip(owner, loader):
        emb, ok_rows, bad = acc.setdefault(c, ([], [], []))
        if x is not None:
            with torch.no_grad(), amp:
                f = F.normalize(model.encode_image(x.to(device, non_blocking=True)).float(), dim=-1).cpu()  # [b, D]
            finite = torch.isfinite(f).all(1)
            emb.append(f[finite].half().numpy())
            ok_rows.append(rows[finite].numpy())
            bad += [(int(r), "non-finite embedding") for r in rows[~finite]]
        bad += skipped
        bar.update(len(rows) + len(skipped))
        left[c] -= 1
        if left[c] == 0:  # the chunk is complete: write it atomically and free it
            bad = sorted(bad)
            save_chunk(store, c, np.concatenate(emb) if emb else np.zeros((0, dim), np.float16),
                       np.concatenate(ok_rows) if ok_rows else [], [b[0] for b in bad], [b[1] for b in bad])
            del acc[c]
    bar.close()


LEGACY_PRECISION = {"fp16": "float16", "fp32": "float32", "bf16": "bfloat16"}  # stores that name it "precision"


def embed_index(args, dist, model, preprocess, dirs, store, dtype, amp):
    """Make sure `store` is complete for `dirs`: list, embed the missing chunks (rank r: chunks r, r+world, ...),
    merge. Returns the number of images embedded by this run."""
    meta = read_meta(store)
    if meta and meta["source"] == "import" and is_complete(store):
        dist.print0(f"embeddings: using those imported into {store} ({len(meta['paths'])} images)")
        return 0
    if dist.is_main:
        paths = list_index(dirs)
        stored = meta and (meta.get("dtype") or LEGACY_PRECISION.get(meta.get("precision")))
        if meta is not None and (meta["paths"] != paths or stored != dtype):
            raise UserError(f"{store} holds embeddings of another image list or dtype ({len(meta['paths'])} images, "
                            f"{stored}; this run: {dtype}): delete that folder to re-embed, or use another --out_dir")
        if meta is None:  # the ordered list first: chunks refer to its rows
            common.save_json({"arch": args.arch, "dtype": dtype, "source": "embed", "chunk_size": args.chunk_size,
                              "index_dirs": dirs, "paths": paths}, os.path.join(store, "paths.json"), indent=None)
    dist.barrier()
    meta = read_meta(store)
    if is_complete(store):
        dist.print0(f"embeddings: all {len(meta['paths'])} images already embedded in {store}")
        return 0
    cs, n = meta["chunk_size"], len(meta["paths"])
    n_chunks = (n + cs - 1) // cs
    todo = [c for c in range(n_chunks) if not os.path.isfile(chunk_file(store, c))]
    n_new = sum(min(n, (c + 1) * cs) - c * cs for c in todo)
    dist.print0(f"embeddings: {n} images in {n_chunks} chunks of {cs}; {n_new} images to embed ({n_chunks - len(todo)} "
                f"of {n_chunks} chunks on disk; {dist.world} process(es), {dtype})")
    files = [os.path.join(dirs[d], r) for d, r in meta["paths"]]
    embed_chunks(model, preprocess, files, [c for c in todo if c % dist.world == dist.rank], store, args, dist.device, amp)
    dist.barrier()
    if dist.is_main:  # merge, one chunk in memory at a time
        chunks = [load_chunk(store, c)[1:] for c in range(n_chunks)]  # (rows, skipped rows, reasons)
        skipped = [[*meta["paths"][int(i)], w] for _, s, why in chunks for i, w in zip(s, why)]
        rows = np.concatenate([r for r, _, _ in chunks])
        write_complete(store, rows, skipped, (load_chunk(store, c)[0] for c in range(n_chunks)), len(rows),
                       model.visual.output_dim)
    return n_new


def import_embeddings(args, dirs, store):
    """Official pickles (one per index dir) -> a complete store; embeddings whose image is not on disk are
    left out and listed as skipped. One pickle in memory at a time."""
    if len(args.import_embeddings) != len(dirs):
        raise UserError(f"--import_embeddings got {len(args.import_embeddings)} files but --index_dirs {len(dirs)} "
                        "folders: give one pickle per index dir, in the same order")
    sources = [os.path.abspath(p) for p in args.import_embeddings]
    meta = read_meta(store)
    if meta and meta.get("imported_from") == sources and meta["index_dirs"] == dirs and is_complete(store):
        print(f"embeddings: already imported from {sources} into {store}")
        return
    paths, pieces, skipped = [], [], []
    for d, (pkl, root) in enumerate(zip(args.import_embeddings, dirs)):
        table = import_official.load_embedding_pickle(pkl)
        found, missing = import_official.rebuild_paths(sorted(table), set(common.list_images(root)))
        print(f"{pkl}: {len(table)} embeddings, {len(found)} images found under {root}, {len(missing)} missing")
        names = sorted(found, key=found.get)  # row order = path order, as in embedded stores
        if names:
            pieces.append(F.normalize(torch.stack([table[n] for n in names]), dim=-1).half().numpy())
        paths += [[d, found[n]] for n in names]
        skipped += [[d, name, "embedding imported, but no image file"] for name in missing]
        del table
    if not paths or len({x.shape[1] for x in pieces}) > 1:
        raise UserError(f"none of the imported embeddings has an image under {dirs} (expected layout: {LAYOUT})" if not paths
                        else f"the imported pickles hold embeddings of different sizes: {[x.shape[1] for x in pieces]}")
    shutil.rmtree(store, ignore_errors=True)  # an earlier store of this model is replaced as a whole
    common.save_json({"arch": args.arch, "precision": "official import", "source": "import", "chunk_size": args.chunk_size,
                      "index_dirs": dirs, "paths": paths, "imported_from": sources}, os.path.join(store, "paths.json"), indent=None)
    write_complete(store, np.arange(len(paths)), skipped, pieces, len(paths), pieces[0].shape[1])


# ----------------------------------------------------------------------------- outputs

def safe_name(name):
    return re.sub(r"[^\w.-]+", "_", name).strip("_") or "category"


def contact_sheet(name, entries, dirs, path, n=16, tile=128, cols=4):
    """A grid of the top-n thumbnails with the category name and each image's score."""
    from PIL import Image, ImageDraw, ImageFont, ImageOps
    entries, font = entries[:n], ImageFont.load_default()
    sheet = Image.new("RGB", (cols * tile, 20 + max(1, (len(entries) + cols - 1) // cols) * (tile + 14)), "white")
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
        draw.text((x + 4, y + tile), f"{j + 1}. {'' if e['score'] is None else format(e['score'], '.3f')}", fill="black", font=font)
    common.save_image(sheet, path, quality=90)


def write_outputs(args, arch, k, dirs, names, archive, skipped):
    """archive.json, contact sheets, skipped.txt; returns (distinct images, images in > 1 archive)."""
    base = os.path.abspath(args.out_dir)
    common.save_json({"arch": arch, "k": k, "index_dirs": [os.path.relpath(d, base) for d in dirs],
                      "recipe": categories.recipe(names)["name"], "categories": names, "archive": archive},
                     os.path.join(args.out_dir, "archive.json"))
    for name, entries in archive.items() if args.sheet_size > 0 else []:
        contact_sheet(name, entries, dirs, os.path.join(args.out_dir, "contact_sheets", safe_name(name) + ".jpg"), args.sheet_size)
    with common.atomic_path(os.path.join(args.out_dir, "skipped.txt")) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.writelines(f"{os.path.join(dirs[d], rel)}\t{why}\n" for d, rel, why in skipped)
    seen = Counter((e["dir"], e["path"]) for entries in archive.values() for e in entries)
    return len(seen), sum(c > 1 for c in seen.values())


def import_archive(args):
    """An official archive {category: [absolute paths]} -> our archive.json (scores unknown: None)."""
    src, official = args.import_archive, common.load_json(args.import_archive, "archive to import")
    if not isinstance(official, dict) or not all(isinstance(v, list) for v in official.values()):
        raise UserError(f"{src!r} is not an official archive (a JSON object: category -> list of paths)")
    if any("=" not in r for r in args.remap):
        raise UserError(f"--remap {args.remap}: expected OLD_PREFIX=NEW_PREFIX")
    names = categories.get_categories(args.categories) if args.categories else ["background"] + list(official)
    if set(names[1:]) != set(official) - {"background"}:
        diff = sorted(set(names[1:]) ^ (set(official) - {"background"}))
        raise UserError(f"--categories does not match the categories of {src!r}: they differ in {diff[:10]}")
    found_dirs, archive, missing = import_official.convert_archive(
        official, names[1:], [os.path.abspath(d) for d in args.index_dirs or []], [r.split("=", 1) for r in args.remap])
    n_all = sum(len(v) for v in official.values())
    if len(missing) == n_all:
        raise UserError(f"none of the {n_all} paths in {src!r} exists (first: {missing[0]!r}); "
                        "point them at your data with --remap OLD_PREFIX=NEW_PREFIX")
    skipped = [[0, p, "listed in the official archive, file not found"] for p in missing]  # absolute: join keeps them
    n_unique, n_dup = write_outputs(args, "ViT-L/14@336px", max(map(len, official.values())), found_dirs, names, archive, skipped)
    print(f"imported {src}: {len(names) - 1} categories, {n_all - len(missing)} of {n_all} paths found, {len(missing)} "
          f"missing (listed in {os.path.join(args.out_dir, 'skipped.txt')}); {n_unique} distinct images, {n_dup} in "
          f"more than one archive; index dirs {found_dirs}")


# ----------------------------------------------------------------------------- main

def check_args(args, given):
    """Every flag checked before any work (names, files, conflicts); returns args."""
    if args.categories is not None:
        categories.get_categories(args.categories)  # an empty list or a blank name
    common.check_out_dir(args.out_dir)
    if args.import_archive:
        common.refuse_unused(given, ("arch", "k", "precision", "device", "batch_size", "workers", "chunk_size",
                                     "block_size", "import_embeddings"), "with --import_archive (it converts a file)")
    else:
        common.refuse_unused(given, ("remap",), "without --import_archive")
        common.check_device(args.device)
    if any("=" not in r for r in args.remap):
        raise UserError(f"--remap {args.remap}: expected OLD_PREFIX=NEW_PREFIX")
    for d in args.index_dirs or []:
        if os.path.isfile(d):
            raise UserError(f"--index_dirs {d!r} is a file, not a folder of images")
    for flag in ("import_archive", "import_embeddings"):
        for path in [getattr(args, flag)] if flag == "import_archive" else getattr(args, flag) or []:
            if path is not None and not os.path.isfile(path):
                raise UserError(f"--{flag} {path!r} is a folder, not a file" if os.path.isdir(path) else
                                f"--{flag} file not found: {path!r}")
    if args.import_embeddings and args.index_dirs is not None and len(args.import_embeddings) != len(args.index_dirs):
        raise UserError(f"--import_embeddings got {len(args.import_embeddings)} files but --index_dirs "
                        f"{len(args.index_dirs)} folders: give one pickle per index dir, in the same order")
    return args


def main(argv=None):
    args = check_args(*common.parse_args(get_args_parser(), argv))
    if args.import_archive:
        return import_archive(args)
    spec = args.categories or "voc"
    names = categories.get_categories(spec)[1:]  # "background" never gets an archive
    recipe = categories.recipe(names)  # from the content: a file of the ImageNet-S919 names is imagenet_s919
    dist = common.Dist(args.device)
    args.is_main = dist.is_main
    dirs = resolve_index_dirs(args.index_dirs, recipe)
    if dist.device.type == "cpu":
        common.set_cpu_threads()
    dtype = ("float16" if dist.device.type == "cuda" else "float32") if args.dtype == "auto" else args.dtype
    autocast_dtype = common.resolve_dtype(dtype, dist.device)  # float16 on a CPU is refused before anything is read
    config = {**{k: v for k, v in vars(args).items() if k != "is_main"}, "categories": spec, "recipe": recipe["name"],
              "index_dirs": dirs, "dtype": dtype, **common.git_info()}
    store = os.path.join(args.out_dir, "embeddings", clip_model.arch_tag(args.arch))
    if dist.is_main:
        common.print_config(config)
        print(f"recipe: {recipe['name']} (from the category list's content); index dirs: "
              + ("--index_dirs" if args.index_dirs else f"the recipe's, {' + '.join(recipe['index_dirs'])}"))
        for d, recursive in ((store, True), (os.path.join(args.out_dir, "contact_sheets"), True), (args.out_dir, False)):
            common.remove_stale_tmp(d, recursive)  # temp files of atomic writes that a killed run left
    model, preprocess = clip_model.load(args.arch, device=dist.device)
    if dtype == "float16":  # the official numerics on CUDA: OpenAI's fp16 weights, not autocast
        clip_model.official_fp16(model)
    amp = common.autocast(dist.device, None if dtype == "float16" else autocast_dtype)
    t0 = time.time()
    if args.import_embeddings and dist.is_main:
        import_embeddings(args, dirs, store)
    n_new = 0 if args.import_embeddings else embed_index(args, dist, model, preprocess, dirs, store, dtype, amp)
    t_embed = time.time() - t0
    if not dist.is_main:  # retrieval and outputs are rank 0's
        return dist.close()
    meta, rows = read_meta(store), np.load(os.path.join(store, "rows.npy"))
    skipped = common.load_json(os.path.join(store, "skipped.json"), "embedding store")
    if len(rows) == 0:
        raise UserError(f"none of the {len(meta['paths'])} index images could be read (see {store}/skipped.json)")
    t0 = time.time()
    with amp:
        text = clip_model.text_embeddings(model, names, categories.TEMPLATES)  # [K, D] fp32 unit vectors
    t_text, t0 = time.time() - t0, time.time()
    if text.shape[1] != np.load(os.path.join(store, "embeddings.npy"), mmap_mode="r").shape[1]:
        raise UserError(f"{args.arch!r} embeds text in {text.shape[1]} dims, unlike the image embeddings in {store}: "
                        "retrieve with the model that made them")
    stats = {}
    scores, idx = topk.topk_stream(text, os.path.join(store, "embeddings.npy"), args.k, dist.device, args.block_size,
                                   stats=stats)
    t_ret, k = time.time() - t0, scores.shape[1]
    print(f"retrieval: exact top-{k} with a {stats['prefilter']} prefilter, {stats['rescored']} pairs rescored exactly")
    if k < args.k:
        print(f"note: only {len(rows)} images were embedded, so each archive has {k} < --k {args.k} entries")
    paths = meta["paths"]
    archive = {name: [{"path": paths[r][1], "dir": paths[r][0], "score": round(float(s), 6)}
                      for r, s in zip(rows[idx[c].numpy()].tolist(), scores[c].tolist())] for c, name in enumerate(names)}
    n_unique, n_dup = write_outputs(args, args.arch, k, dirs, ["background"] + names, archive, skipped)
    n_listed = len(paths) + (len(skipped) if meta["source"] == "import" else 0)
    summary = {"images_listed": n_listed, "embedded": len(rows), "embedded_this_run": n_new, "skipped": len(skipped),
               "embed_seconds": round(t_embed, 1), "text_seconds": round(t_text, 1), "retrieval_seconds": round(t_ret, 1),
               "categories": len(names), "k": k, "distinct_images": n_unique, "in_several_archives": n_dup}
    common.save_json({"config": config, "summary": summary}, os.path.join(args.out_dir, "build_archive_config.json"))
    print(f"summary: {n_listed} images listed, {len(rows)} embedded ({n_new} this run, {t_embed:.1f} s), {len(skipped)} "
          f"skipped (see {args.out_dir}/skipped.txt); {len(names)} categories x k={k} (text {t_text:.1f} s, retrieval "
          f"{t_ret:.1f} s); {n_unique} distinct images, {n_dup} in more than one archive -> {args.out_dir}/archive.json")
    dist.close()


if __name__ == "__main__":
    common.run_main(main)
