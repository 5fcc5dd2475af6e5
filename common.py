"""Small helpers every stage shares: one-line errors, atomic writes, image listing and loading,
the archive format, DDP setup and provenance. Importing this file does no work.

The archive format (written by build_archive.py, read by pseudo_label.py and dataset.py):

    {"arch": "ViT-L/14@336px", "k": 500,
     "index_dirs": ["../data/ImageNet2012/train", ...],    # relative to the JSON's folder when possible
     "categories": ["background", "aeroplane", ...],        # label id = list index
     "archive": {"aeroplane": [{"path": "n02690373/n02690373_1.JPEG", "dir": 0, "score": 0.31}, ...]}}

A pseudo-mask lives at <masks_dir>/<dir index>_<index dir basename>/<path without extension>.png
(`mask_relpath`), one single-channel PNG (0/255) at the image's original size.
"""
import argparse
import contextlib
import functools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import zipfile

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
NORMS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "clip": (CLIP_MEAN, CLIP_STD)}
TMP_PREFIX = ".tmp_"  # atomic writes in progress; a killed run leaves these behind (see remove_stale_tmp)
IMG_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff", ".gif")


# ----------------------------------------------------------------------------- errors

class UserError(Exception):
    """A problem with the user's input: printed as one line, no traceback, exit code 2."""


def _sigterm(signum, frame):
    raise KeyboardInterrupt  # `kill` and a scheduler's time limit stop a stage like Ctrl-C does


def run_main(main):
    """Run a script's main(); UserError, Ctrl-C and SIGTERM become one clear line and a non-zero exit."""
    import signal
    signal.signal(signal.SIGTERM, _sigterm)
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: finished work is on disk; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)


def require_dir(path, what, layout_hint=""):
    if not os.path.isdir(path):
        hint = f" Expected layout: {layout_hint}" if layout_hint else ""
        raise UserError(f"{what} not found: {path!r}.{hint} (see README, 'Data layout')")
    return path


# ----------------------------------------------------------------------------- flags

class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's errors: a flag argparse refuses prints one `error: ...` line that
    points to --help (not a usage block), exit code 2, like every other bad input."""

    def error(self, message):
        message = re.sub(r"^argument (\S+?)(/\S+)?: ", r"\1: ", message.strip().replace("\n", " "))
        if message.endswith("expected one argument"):  # argparse takes `--lr -1e-3`'s value for a flag
            message += f", or a value that starts with '-' written as {message.split(':')[0]}=VALUE"
        print(f"error: {message} (python {self.prog} --help lists the flags)", file=sys.stderr)
        sys.exit(2)


def parse_args(parser, argv=None):
    """parser.parse_args(argv) and the set of flags (dests) set to other than their defaults, so that a
    check can refuse a flag the chosen mode would ignore: nothing a user gives is dropped silently."""
    args, defaults = parser.parse_args(argv), vars(parser.parse_args([]))
    return args, {k for k, v in vars(args).items() if v != defaults.get(k)}


def refuse_unused(given, flags, why):
    """A UserError naming the first of `flags` (dests) that was given although `why` makes it meaningless."""
    used = [f for f in flags if f in given]
    if used:
        raise UserError(f"--{used[0]} has no effect {why}: remove it")


def library_main(doc, used_by):
    """`python FILE.py [--help]` on a file with no command line: say what it is for and which command
    uses it (exit 0); anything else given is a one-line error."""
    p = ArgumentParser(description=doc.strip() + "\n\nThis file has no command line of its own: " + used_by,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.parse_args()
    p.print_help()


def check_device(spec):
    """A --device value -> torch.device, checked before any work: 'auto' is cuda:LOCAL_RANK when CUDA
    exists, else cpu; an unknown string, or CUDA asked for where there is none, is a UserError."""
    import torch
    if spec == "auto":
        return torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError, ValueError):
        raise UserError(f"--device {spec!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {spec!r} is not supported here: use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {spec} asks for a GPU, but PyTorch sees no CUDA device on this machine: "
                            "use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {spec} names GPU {device.index}, but this machine has "
                            f"{torch.cuda.device_count()} (cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {spec} asks for Apple's GPU, which PyTorch cannot use here: use --device cpu")
    return device


def number(kind=float, lo=None, hi=None, lo_open=False, what="a number"):
    """An argparse `type` that checks a range, so an impossible value stops before any work:
    number(float, 0, lo_open=True) accepts x > 0; number(int, 1) accepts whole numbers >= 1."""
    def parse(text):
        try:
            x = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'a whole number' if kind is int else 'a number'}") from None
        if x in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"{text} is not a finite number: {what} must be finite")
        if (lo is not None and (x < lo or (lo_open and x == lo))) or (hi is not None and x > hi) or x != x:
            rng = f"{'>' if lo_open else '>='} {lo}" if hi is None else f"in [{lo}, {hi}]"
            raise argparse.ArgumentTypeError(f"{text} is out of range: {what} must be {rng}")
        return x
    return parse


def check_out_dir(path, flag="--out_dir"):
    """An output folder must be a folder, or one that can be made: an existing file there, a file above it
    or a parent where this user may not write is a UserError. Nothing is created here."""
    if not str(path).strip():
        raise UserError(f"{flag} is empty: give a folder path")
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {path!r} is an existing file, not a folder: choose a folder path")
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UserError(f"{flag} {path!r} lies inside {parent!r}, which is a file: choose a folder path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path!r} cannot be written: this user may not write in {parent!r}")
    return path


# ----------------------------------------------------------------------------- numeric precision

DTYPES = ("float32", "bfloat16", "float16")
DTYPE_HELP = ("arithmetic of the networks: float32 (the default, the official numerics), bfloat16 "
              "(autocast; fast on GPUs and on CPUs with AMX or AVX512-BF16, slow on other CPUs) or float16 "
              "(CUDA only)")


@functools.lru_cache(maxsize=None)
def cpu_bf16_flags():
    """The CPU's bfloat16 instructions, from /proc/cpuinfo (Linux): a subset of {'amx_bf16',
    'avx512_bf16'}; None where the flags cannot be read (other systems)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), None)
    except OSError:
        return None
    return None if flags is None else {x for x in ("amx_bf16", "avx512_bf16") if x in flags}


def resolve_dtype(name, device, quiet=False):
    """A --dtype value -> torch dtype for autocast (None for float32: no autocast). float16 is
    refused on a CPU; bfloat16 on a CPU without bf16 instructions runs (emulated) and says it is slow."""
    import torch
    if name not in DTYPES:
        raise UserError(f"--dtype {name!r} is not one of {', '.join(DTYPES)}")
    device = torch.device(device)
    if name == "float32":
        return None
    if name == "float16" and device.type != "cuda":
        raise UserError("--dtype float16 runs on CUDA only (it has no fast path on a CPU): use bfloat16 or float32")
    if name == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("this GPU has no bfloat16: use --dtype float16 or float32")
    if name == "bfloat16" and device.type == "cpu" and not quiet and int(os.environ.get("RANK", 0)) == 0:
        flags = cpu_bf16_flags()
        if flags is not None and not flags:
            print("warning: this CPU has no bfloat16 instructions (neither AMX nor AVX512-BF16): --dtype "
                  "bfloat16 is emulated and slower than float32 here", file=sys.stderr, flush=True)
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def autocast(device, dtype):
    """Autocast for a torch dtype from resolve_dtype (None -> a no-op context)."""
    import torch
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


# ----------------------------------------------------------------------------- atomic writes

@functools.lru_cache(maxsize=None)
def _umask():
    """The process umask, read once. os.umask can only be read by setting it, which races with
    other threads creating files, so Linux's /proc is asked first."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path next to `path`; on success it is renamed onto `path` in one step,
    so a killed run never leaves a half-written file under the final name."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=TMP_PREFIX, suffix=os.path.splitext(path)[1])
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files: give outputs the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove_stale_tmp(root, recursive=True):
    """Delete the temp files of atomic writes that a killed run left below `root`. Call it only when
    this process owns `root` (a stage at start-up, rank 0), never while another writer may be running."""
    n = 0
    if not os.path.isdir(root):
        return n
    for d, dirs, files in os.walk(root):
        for f in files:
            if f.startswith(TMP_PREFIX):
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(d, f))
                    n += 1
        if not recursive:
            break
    return n


def load_json(path, what="JSON file"):
    """Read a JSON file; a missing or malformed one is a UserError naming the file."""
    if not os.path.isfile(path):
        raise UserError(f"{what} not found: {path!r}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{what} {path!r} is not valid JSON ({e})") from None


def first_sentence(text, limit=200):
    """A library message's first sentence, whole, for quoting inside our own: '' when it has none
    shorter than `limit` (a quote is never cut mid-sentence)."""
    text = re.sub(r"\[enforce fail at [^\]]*\]\s*\.?\s*", "", str(text)).strip()
    line = text.splitlines()[0].strip() if text else ""
    m = re.match(r"(.+?[.!?])(\s|$)", line)
    line = (m.group(1) if m else line).rstrip(".")
    return line if 0 < len(line) <= limit and line.count("`") % 2 == 0 and line.count("(") == line.count(")") else ""


_MAGIC = ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
          (b"\x1f\x8b", "a gzip file"), (b"<", "an HTML or XML page (a failed download's error page?)"),
          (b"{", "a JSON or text file"), (b"[", "a JSON or text file"))


def unreadable(path, what, err):
    """The one-line UserError for a file torch.load (or torch.jit.load) could not read, in our words: what
    is wrong and what to do, with at most the library's first sentence."""
    with open(path, "rb") as f:
        head = f.read(512)
    msg, lib = str(err), first_sentence(err)
    quote, glob = f" ({lib})" if lib else "", re.search(r"GLOBAL ([\w.]+)", str(err))
    kind = next((k for magic, k in _MAGIC if head.lstrip().startswith(magic)), "")
    kind = kind or ("a text file" if head and all(32 <= c < 127 or c in (9, 10, 13) for c in head) else "")
    if not head:
        why = "it is empty (0 bytes), as an interrupted download or copy leaves it: fetch or copy it again"
    elif glob:
        why = (f"it holds Python objects other than tensors ({glob.group(1)}), which are not loaded because "
               "unpickling them could run code: save a state dict of tensors instead")
    elif head.startswith(b"PK\x03\x04"):
        why = (f"it is a zip archive but not one PyTorch wrote{quote}" if zipfile.is_zipfile(path) else
               f"it is damaged or truncated{quote}, as an interrupted download or copy leaves it: fetch or copy it again")
    elif kind or "Unsupported operand" in msg or "invalid load key" in msg:
        why = f"it is not a PyTorch file{f' (it looks like {kind})' if kind else ''}"
    else:
        why = f"it is not a PyTorch file of tensors ({type(err).__name__}{f': {lib}' if lib else ''})"
    return UserError(f"{what} {path!r} cannot be read: {why}")


def torch_load(path, what="checkpoint"):
    """The one reader of our .pt files: tensors and plain types only (weights_only=True), on CPU.
    A missing, truncated or foreign file is a UserError naming the file."""
    import torch
    if os.path.isdir(path):
        raise UserError(f"{what} {path!r} is a folder, not a file")
    if not os.path.isfile(path):
        raise UserError(f"{what} not found: {path!r}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # random bytes raise anything from UnpicklingError to IndexError
        raise unreadable(path, what, e) from None


def _few(keys, n=6):
    return "none" if not keys else ", ".join(map(str, keys[:n])) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def load_strict(module, sd, what="state dict", assign=False):
    """The one strict state-dict check: every key present, none extra, every shape equal; the error
    names the offending keys. `assign` keeps the file's tensors (works for a meta-device module)."""
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shape = [f"{k} {tuple(sd[k].shape)} (model {tuple(own[k].shape)})" for k in own
             if k in sd and (not hasattr(sd[k], "shape") or tuple(sd[k].shape) != tuple(own[k].shape))]
    if missing or unexpected or shape:
        raise UserError(f"{what} does not match the model: missing keys: {_few(missing)}; "
                        f"unexpected keys: {_few(unexpected)}; wrong shapes: {_few(shape)}")
    module.load_state_dict(sd, strict=True, assign=assign)
    return module


def _busy_cores(seconds=0.1):
    """How many cores other work keeps busy right now, from two reads of /proc/stat (Linux); the load
    average elsewhere, which lags by about a minute."""
    def ticks():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # all, idle + iowait
    try:
        t0, i0 = ticks()
        time.sleep(seconds)
        t1, i1 = ticks()
        return (1 - (i1 - i0) / max(t1 - t0, 1)) * (os.cpu_count() or 1)
    except (OSError, ValueError, IndexError):
        try:
            return os.getloadavg()[0]
        except OSError:
            return 0.0


def cpu_threads():
    """Intra-op threads for CPU work: the cores not already busy. More threads than idle cores makes
    small models many times slower (OpenMP threads spin waiting for each other), while a big run on an
    idle machine still gets every core. ZUTIS_THREADS or OMP_NUM_THREADS, when set, win."""
    for var in ("ZUTIS_THREADS", "OMP_NUM_THREADS"):
        if os.environ.get(var, "").isdigit() and int(os.environ[var]) > 0:
            return int(os.environ[var])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, int(cores - _busy_cores() + 0.5)))


def set_cpu_threads(quiet=False):
    """Set torch's intra-op threads to cpu_threads() and say so (rank 0 only under torchrun)."""
    import torch
    n = cpu_threads()
    torch.set_num_threads(n)
    if not quiet and int(os.environ.get("RANK", 0)) == 0:
        print(f"CPU: {n} thread{'s' * (n > 1)} (the idle cores; OMP_NUM_THREADS sets the number)", flush=True)
    return n


def save_json(obj, path, indent=1):
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent)


def save_torch(obj, path):
    import torch
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def save_npy(arr, path):
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, arr)


def save_image(arr_or_pil, path, **kw):
    from PIL import Image
    img = arr_or_pil if isinstance(arr_or_pil, Image.Image) else Image.fromarray(arr_or_pil)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG"}.get(os.path.splitext(path)[1].lower(), "PNG")
    with atomic_path(path) as tmp:
        img.save(tmp, format=fmt, **kw)


# ----------------------------------------------------------------------------- images

def list_images(root):
    """All image files below `root`, recursively, as sorted paths relative to `root`."""
    out = []
    for d, dirs, files in os.walk(root, followlinks=True):
        dirs.sort()
        out += [os.path.relpath(os.path.join(d, f), root) for f in files
                if f.lower().endswith(IMG_EXTS) and not f.startswith(".")]
    return sorted(out)


def list_files(src, out_dir=None):
    """--images: every file below `src` (a file: itself) -> (sorted relative paths, skipped lines "path\treason").
    Hidden files and folders (a leading ".") and the output folder are not read, only listed."""
    if os.path.isfile(src):
        return [os.path.basename(src)], []
    files, skipped, out = [], [], out_dir and os.path.realpath(out_dir)
    for d, dirs, names in os.walk(src, followlinks=True):
        for n in list(dirs):
            hidden, rel = n.startswith("."), os.path.relpath(os.path.join(d, n), src)
            if hidden or os.path.realpath(os.path.join(d, n)) == out:
                dirs.remove(n)
                skipped.append(f"{rel}{os.sep}\t{'a hidden folder' if hidden else 'the output folder'}, not searched")
        for n in names:
            rel = os.path.relpath(os.path.join(d, n), src)
            (skipped.append(f"{rel}\ta hidden file") if n.startswith(".") else files.append(rel))
    return sorted(files), sorted(skipped)


def load_rgb(path, displayed=False):
    """Open an image as 8-bit RGB (to_rgb; a GIF or a multi-page TIFF gives its first frame). Raises OSError
    (UnidentifiedImageError for an empty file or one Pillow cannot read) or ValueError; callers skip and log."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            im.load()  # force decoding now so truncated files fail here, not later
            return to_rgb(im, displayed)
    except UnidentifiedImageError:  # Pillow's message names only the path
        empty = os.path.isfile(path) and os.path.getsize(path) == 0
        raise UnidentifiedImageError("an empty file (0 bytes)" if empty else "not an image Pillow can read") from None
    except Image.DecompressionBombError as e:  # not an OSError: it would end a run instead of skipping a file
        raise ValueError(str(e)) from None


def to_rgb(im, displayed=False):
    """A PIL image of any mode -> 8-bit RGB: grayscale, palette, CMYK and LA / RGBA (alpha dropped) as Pillow
    converts them; 16-bit grayscale (I;16*, and I taken as 16-bit) scaled to 8 bits by round(x / 257), which
    Pillow's convert would clip to white. displayed=True applies the EXIF orientation and composites
    transparency over white, as an image viewer shows the photo (--images, the Python entry); the other
    stages keep the stored pixels, on which ground truth and archives were made."""
    from PIL import Image, ImageOps
    if displayed:
        im = ImageOps.exif_transpose(im)
    if im.mode.startswith("I"):
        a = np.clip(np.asarray(im).astype(np.float64), 0, 65535)
        im = Image.fromarray(np.round(a / 257).astype(np.uint8))
    elif im.mode == "F":
        raise ValueError("a 32-bit float image has no standard 8-bit scale: save it as an 8- or 16-bit image")
    if displayed and (im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info):
        im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im.convert("RGBA"))
    return im.convert("RGB")


# ----------------------------------------------------------------------------- archive

def load_archive(path, index_dirs=None):
    """Read an archive JSON and resolve its index dirs to absolute paths (or use `index_dirs`)."""
    if not os.path.isfile(path):
        raise UserError(f"archive not found: {path!r} (run build_archive.py first)")
    arc = load_json(path, "archive")
    for key in ("index_dirs", "categories", "archive"):
        if not isinstance(arc, dict) or key not in arc:
            raise UserError(f"{path!r} is not a zutis archive (no {key!r}); convert official "
                            "archives with build_archive.py --import_archive")
    base = os.path.dirname(os.path.abspath(path))
    if index_dirs is not None:  # the data moved without the archive: the user says where
        arc["index_dirs"] = [os.path.abspath(d) for d in index_dirs]
    else:
        arc["index_dirs"] = [os.path.normpath(os.path.join(base, d)) for d in arc["index_dirs"]]
    return arc


def mask_relpath(archive, entry):
    """Where the pseudo-mask of an archive entry lives, relative to the masks dir."""
    d = entry["dir"]
    key = f"{d}_{os.path.basename(os.path.normpath(archive['index_dirs'][d]))}"
    return os.path.join(key, os.path.splitext(entry["path"])[0] + ".png")


def image_path(archive, entry):
    return os.path.join(archive["index_dirs"][entry["dir"]], entry["path"])


def unique_entries(archive):
    """Each (dir, path) once, in archive order: an image retrieved for several categories
    needs one mask."""
    out = {}
    for entries in archive["archive"].values():
        for e in entries:
            out.setdefault((e["dir"], e["path"]), e)
    return list(out.values())


# ----------------------------------------------------------------------------- distributed

class Dist:
    """rank/world/device from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), or a
    single process. `device='auto'` picks cuda:LOCAL_RANK when CUDA exists, else cpu."""

    def __init__(self, device="auto"):
        import torch
        import torch.distributed as dist
        self.rank = int(os.environ.get("RANK", 0))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.ddp = self.world > 1
        if device == "cuda" and self.ddp:
            device = f"cuda:{self.local_rank}"
        self.device = check_device(device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.ddp and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.is_main = self.rank == 0

    def barrier(self):
        import torch.distributed as dist
        if self.ddp:
            dist.barrier()

    def gather(self, obj):
        """Every rank's picklable `obj`, as a list indexed by rank ([obj] in a single process)."""
        import torch.distributed as dist
        if not self.ddp:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def print0(self, *a, **kw):
        if self.is_main:
            print(*a, **kw, flush=True)

    def close(self):
        import gc
        import torch.distributed as dist
        if self.ddp and dist.is_initialized():
            # DDP's reducer sits in reference cycles that keep the process group alive; freeing them now,
            # not at interpreter exit, avoids gloo threads dying with the interpreter (SIGABRT, ~1 run in 10)
            gc.collect()
            dist.destroy_process_group()


# ----------------------------------------------------------------------------- provenance

def git_info():
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                    cwd=here, capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        sha, dirty = "", False
    return {"git_sha": sha or "unknown", "git_dirty": dirty}


def print_config(config, width=110):
    """The run's settings as a few wrapped `key=value` lines (the full record goes to the run's own files)."""
    import textwrap
    print(textwrap.fill("  ".join(f"{k}={v}" for k, v in config.items()), width, initial_indent="config: ",
                        subsequent_indent="  ", break_on_hyphens=False), flush=True)


if __name__ == "__main__":
    library_main(__doc__, "every stage script imports it.")
