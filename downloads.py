"""The one downloader of every file the project fetches: CLIP (clip_model.py), SelfMask (selfmask.py)
and the official ZUTIS checkpoints (model.py). For each file it tries, in order, a private mirror named
by $ZUTIS_MIRROR (a base URL or a folder that holds the file under its cache name), then each source
the caller lists. Bytes go to `<file>.part`, which an interruption leaves in place: the next try asks
for the rest with an HTTP Range request and appends (a server that ignores the Range is read from the
start). A file gets its final name only after its checks (the sha256 and size the caller knows), and
a file that fails them is deleted. A Hugging Face hub source (`Source(hub_url(...), sha256=HUB)`) is checked against the
sha256 the hub publishes for it. Under torchrun only rank 0 downloads; the other ranks wait for the file.
User reference: docs/weights.md. Importing this file does no work.

    path = download(url, root, sha256="...")                          # one source
    path = download([Source(url, sha256=s), Source(hub_url(repo, f), "x.bin", HUB)], root, hint="...")
"""
import glob
import hashlib
import http.client
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from typing import NamedTuple, Optional

from common import UserError

MIRROR_ENV = "ZUTIS_MIRROR"
HF_ENDPOINT_DEFAULT = "https://huggingface.co"  # the hub's own variable HF_ENDPOINT overrides it
HUB = "hub"  # Source.sha256 for a hub file: take the sha256 the hub publishes
PART = ".part"  # suffix of a download in progress; kept across runs so the next one resumes
TIMEOUT = 60  # seconds of silence before a source counts as failed
TRIES = 5  # transfers of one source that may break (after some progress) before it counts as failed


class Source(NamedTuple):
    url: str
    filename: Optional[str] = None  # the name in the cache and on the mirror (default: the URL's)
    sha256: Optional[str] = None  # hex digest, HUB, or None (no checksum is published)
    size: Optional[int] = None  # bytes, when known
    mirror: bool = True  # whether $ZUTIS_MIRROR is asked for this file first


class SourceError(Exception):
    """One source did not give a verified file; the next one is tried."""


class _Again(SourceError):
    """The transfer broke after some progress, or resumed bytes failed the check: try the same source again."""


def sha256_of(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def mirror_url(filename):
    """The file's address on $ZUTIS_MIRROR, or None when it is not set."""
    base = os.environ.get(MIRROR_ENV, "").strip()
    if not base:
        return None
    if "://" in base:
        return f"{base.rstrip('/')}/{urllib.parse.quote(filename)}"
    return "file://" + urllib.request.pathname2url(os.path.join(os.path.abspath(os.path.expanduser(base)), filename))


def hub_url(repo, filename):
    """The Hugging Face hub's download address of a file on the main branch, under $HF_ENDPOINT."""
    endpoint = os.environ.get("HF_ENDPOINT", "").strip() or HF_ENDPOINT_DEFAULT
    return f"{endpoint.rstrip('/')}/{repo}/resolve/main/{filename}"


def _reason(e):
    """An exception -> a short one-line reason."""
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    text = str(e.reason if isinstance(e, urllib.error.URLError) else e) or type(e).__name__
    return " ".join(text.split())[:160]


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None  # the redirect answer itself carries the hub's metadata headers


def hub_digest(url):
    """(sha256, size) that the hub publishes for a file stored with git LFS: the X-Linked-Etag and
    X-Linked-Size headers of its answer to a HEAD request on the resolve URL, read before the redirect to
    the storage host, as huggingface_hub's get_hf_file_metadata reads them (else ETag and Content-Length).
    Redirects within the hub (a renamed repository: a relative Location) are followed."""
    opener = urllib.request.build_opener(_NoRedirect)
    for _ in range(5):
        req = urllib.request.Request(url, method="HEAD", headers={"Accept-Encoding": "identity"})
        try:
            with opener.open(req, timeout=TIMEOUT) as r:
                status, h = r.status, r.headers
        except urllib.error.HTTPError as e:
            status, h = e.code, e.headers
            e.close()
            if not 300 <= status < 400:
                raise SourceError(_reason(e)) from None
        except (OSError, http.client.HTTPException) as e:
            raise SourceError(_reason(e)) from None
        loc = h.get("Location") or ""
        if h.get("X-Linked-Etag") or not (300 <= status < 400 and loc.startswith("/")):
            break
        url = urllib.parse.urljoin(url, loc)
    etag = (h.get("X-Linked-Etag") or h.get("ETag") or "").strip().removeprefix("W/").strip('"')
    if not re.fullmatch(r"[0-9a-f]{64}", etag):
        raise SourceError(f"the hub publishes no sha256 for it (ETag {etag[:70]!r})")
    size = h.get("X-Linked-Size") or (h.get("Content-Length") if status < 300 else None)
    return etag, int(size) if size and size.isdigit() else None


def _fetch(url, path, sha256=None, size=None, label=None):
    """One transfer of `url` into `path`.part (appending to what an earlier try left), then the checks
    and the rename to `path`. Raises SourceError, or _Again when retrying the same URL makes sense."""
    from tqdm import tqdm
    part = path + PART
    start = have = os.path.getsize(part) if os.path.isfile(part) else 0
    req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as src:
            status = getattr(src, "status", None)  # None for file:// (no Range there: whole file)
            if have and status == 206 and not src.headers.get("Content-Range", "").startswith(f"bytes {have}-"):
                os.remove(part)
                raise _Again("the server sent another byte range than asked for")
            have = have if status == 206 else 0  # a server that ignores Range sends the whole file
            left = int(src.headers.get("Content-Length") or 0)
            with open(part, "ab" if have else "wb") as dst, tqdm(
                    total=(have + left) or None, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                    desc=label or os.path.basename(path)) as bar:
                for block in iter(lambda: src.read(1 << 20), b""):
                    bar.update(dst.write(block))
            if left and bar.n < have + left:  # read(n) ends quietly when the connection closes early
                raise _Again(f"the connection closed after {bar.n} of {have + left} bytes")
    except urllib.error.HTTPError as e:
        if not (e.code == 416 and have):  # 416: nothing left to send, the part may be whole already
            raise SourceError(_reason(e)) from None
    except (OSError, http.client.HTTPException) as e:  # the bytes so far stay in the part file
        grew = os.path.isfile(part) and os.path.getsize(part) > start
        raise (_Again if grew else SourceError)(_reason(e)) from None
    n, got = os.path.getsize(part), sha256_of(part)
    if (size is not None and n != size) or (sha256 is not None and got != sha256):
        os.remove(part)
        want = ", ".join(w for w in (sha256 and f"sha256 {sha256}", size is not None and f"{size} bytes") if w)
        raise (_Again if start else SourceError)(
            f"checksum mismatch: got sha256 {got}, {n} bytes, expected {want}; nothing was kept")
    os.replace(part, path)
    print(f"downloaded {os.path.basename(path)} from {url}: {n} bytes, sha256 {got}", flush=True)
    return path


def _fetch_resuming(url, path, sha256, size, label):
    for _ in range(TRIES):
        try:
            return _fetch(url, path, sha256, size, label)
        except _Again as e:
            last = e
    raise SourceError(f"{last}, {TRIES} tries")


def _name(src):
    return src.filename or os.path.basename(urllib.parse.urlparse(src.url).path)


def _hub_path(root, src, sha256):
    """A hub file is cached with its published sha256 in its name, so a later run can check it offline."""
    stem, ext = os.path.splitext(_name(src))
    return os.path.join(root, f"{stem}.{sha256}{ext}")


def _cached(root, sources):
    """The first verified file of `sources` already in `root`, or None."""
    for src in sources:
        if src.sha256 == HUB:
            stem, ext = os.path.splitext(_name(src))
            for p in sorted(glob.glob(os.path.join(glob.escape(root), glob.escape(stem) + ".*" + ext))):
                if sha256_of(p) == os.path.basename(p)[len(stem) + 1:-len(ext) or None]:
                    return p
            continue
        p = os.path.join(root, _name(src))
        if os.path.isfile(p) and (src.size is None or os.path.getsize(p) == src.size) and (
                src.sha256 is None or sha256_of(p) == src.sha256):
            return p
    return None


def download(url, root, sha256=None, size=None, filename=None, hint="or pass the local file's path instead"):
    """The path of a verified copy in `root` of `url` (a URL, with its sha256 / size / cache file name) or
    of the first source that gives one (`url` a list of Source): a cached copy is reused; otherwise the
    mirror and each source are tried in order. When all fail: one UserError line listing what was tried
    and where to put the file to go on offline, ending with `hint`."""
    sources = [Source(url, filename, sha256, size)] if isinstance(url, str) else list(url)
    rank = int(os.environ.get("RANK", 0))
    for _ in range(7200 if rank else 1):  # the other ranks wait: rank 0 renames only verified files
        found = _cached(root, sources)
        if found:
            return found
        time.sleep(1.0 if rank else 0.0)
    first = os.path.join(root, _name(sources[0]))
    if rank:
        raise UserError(f"timed out waiting for rank 0 to download {first}")
    if os.path.isfile(first):
        warnings.warn(f"{first} exists but does not match its checksum; downloading it again")
    os.makedirs(root, exist_ok=True)
    tried = []
    for src in sources:
        want_sha, want_size = src.sha256, src.size
        if want_sha == HUB:
            try:
                want_sha, want_size = hub_digest(src.url)
            except SourceError as e:
                tried.append(f"{src.url} ({e})")
                continue
        path = _hub_path(root, src, want_sha) if src.sha256 == HUB else os.path.join(root, _name(src))
        for u in [mirror_url(_name(src)) if src.mirror else None, src.url]:
            if u is None:
                continue
            try:
                return _fetch_resuming(u, path, want_sha, want_size, _name(src))
            except SourceError as e:
                tried.append(f"{u} ({e})")
    raise UserError(f"could not download {_name(sources[0])}; tried: {'; '.join(tried)}. To go on offline, "
                    f"copy the file to {first} (or to the folder named by ${MIRROR_ENV}) {hint}")


if __name__ == "__main__":
    import common
    common.library_main(__doc__, "clip_model.py, selfmask.py and model.py download their weights with it; "
                                 "docs/weights.md says where each file comes from.")
