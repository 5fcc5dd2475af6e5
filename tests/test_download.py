"""Tests for downloads.py and the download paths of clip_model.py, selfmask.py and model.py, against a
real HTTP server on the loopback interface (http.server in a thread): sources tried in order after a
404, a transfer cut halfway and resumed with a Range request, wrong bytes refused with nothing kept, the
Hugging Face hub's published sha256 and layout. No network.

    python -m pytest -q tests/test_download.py
"""
import hashlib
import http.server
import io
import os
import threading

import pytest
import torch

import clip_model
import common
import downloads
import model
import selfmask
from conftest import TINY, make_tiny_clip


# ----------------------------------------------------------------------------- a loopback server

class Handler(http.server.BaseHTTPRequestHandler):
    """Serves `server.routes[path]`: {"body": bytes} with Range support, plus optional "cut" (send only
    that many bytes of the first GET, then close), "ignore_range", "status" and "headers" (a redirect or
    the hub's metadata). Unknown paths are 404. Every request is logged as (method, path, Range)."""

    def do_HEAD(self):
        self.answer(head=True)

    def do_GET(self):
        self.answer(head=False)

    def answer(self, head):
        self.server.log.append((self.command, self.path, self.headers.get("Range")))
        r = self.server.routes.get(self.path)
        if r is None:
            return self.send_error(404)
        if "status" in r:  # a redirect with the hub's headers
            self.send_response(r["status"])
            for k, v in r.get("headers", {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", "0")
            return self.end_headers()
        body, rng, start = r["body"], self.headers.get("Range"), 0
        if rng and not r.get("ignore_range"):
            start = int(rng.removeprefix("bytes=").split("-")[0])
            if start >= len(body):
                return self.send_error(416)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if head:
            return
        data = body[start:]
        if r.get("cut") and not head:
            data, r["cut"] = data[:r["cut"]], None  # the client sees the connection close early
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.routes, srv.log, srv.daemon_threads = {}, [], True
    srv.base = f"http://127.0.0.1:{srv.server_address[1]}"
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    stop = threading.Timer(120, srv.shutdown)  # never outlives a stuck test
    stop.start()
    yield srv
    stop.cancel()
    srv.shutdown()
    srv.server_close()
    t.join(5)


@pytest.fixture(autouse=True)
def no_network(monkeypatch, tmp_path):
    """Nothing here may leave the machine: no mirror unless a test sets one, the hub under a dead local path."""
    monkeypatch.delenv(downloads.MIRROR_ENV, raising=False)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", (tmp_path / "no_hub").as_uri())
    monkeypatch.setattr(downloads, "TIMEOUT", 10)


def sha(b):
    return hashlib.sha256(b).hexdigest()


def payload(n=300_000, seed=0):
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8).numpy().tobytes()


# ----------------------------------------------------------------------------- resume, checksums, sources

def test_cut_transfer_resumes_with_a_range_request(server, tmp_path):
    body = payload()
    server.routes["/w.pt"] = {"body": body, "cut": 100_000}
    path = downloads.download(f"{server.base}/w.pt", str(tmp_path / "c"), sha256=sha(body))
    assert open(path, "rb").read() == body and os.listdir(tmp_path / "c") == ["w.pt"]
    assert server.log == [("GET", "/w.pt", None), ("GET", "/w.pt", "bytes=100000-")]


def test_a_part_left_by_a_killed_run_is_resumed_or_restarted(server, tmp_path):
    body, root = payload(), tmp_path / "c"
    root.mkdir()
    server.routes["/w.pt"] = {"body": body}
    (root / "w.pt.part").write_bytes(body[:1234])
    assert common.remove_stale_tmp(str(root)) == 0  # not a stale temp file: the next run resumes it
    downloads.download(f"{server.base}/w.pt", str(root), sha256=sha(body))
    assert server.log == [("GET", "/w.pt", "bytes=1234-")] and (root / "w.pt").read_bytes() == body
    # killed after the last byte, before the rename: the server has nothing left to send (416)
    (root / "w.pt").rename(root / "w.pt.part")
    downloads.download(f"{server.base}/w.pt", str(root), sha256=sha(body))
    assert server.log[-1] == ("GET", "/w.pt", f"bytes={len(body)}-") and os.listdir(root) == ["w.pt"]
    # a server that ignores Range answers 200 with the whole file: the part is rewritten from zero
    (root / "w.pt").unlink()
    (root / "w.pt.part").write_bytes(body[:999])
    server.routes["/w.pt"]["ignore_range"] = True
    downloads.download(f"{server.base}/w.pt", str(root), sha256=sha(body))
    assert (root / "w.pt").read_bytes() == body and os.listdir(root) == ["w.pt"]
    # wrong bytes in the part: the resumed file fails its check, is deleted, and is fetched again whole
    (root / "w.pt").unlink()
    (root / "w.pt.part").write_bytes(b"x" * 500)
    server.routes["/w.pt"]["ignore_range"], server.log[:] = False, []
    downloads.download(f"{server.base}/w.pt", str(root), sha256=sha(body))
    assert server.log == [("GET", "/w.pt", "bytes=500-"), ("GET", "/w.pt", None)]
    assert (root / "w.pt").read_bytes() == body and os.listdir(root) == ["w.pt"]


def test_wrong_bytes_are_refused_and_nothing_is_kept(server, tmp_path):
    body = payload()
    server.routes["/w.pt"] = {"body": body[:-1] + b"?"}
    root = tmp_path / "c"
    with pytest.raises(common.UserError, match="checksum mismatch") as e:
        downloads.download(f"{server.base}/w.pt", str(root), sha256=sha(body))
    assert "\n" not in str(e.value) and os.listdir(root) == []
    with pytest.raises(common.UserError, match="checksum mismatch"):
        downloads.download(f"{server.base}/w.pt", str(root), size=len(body) + 1)
    assert os.listdir(root) == []


def test_file_urls_and_a_stale_cached_copy(tmp_path):
    body = payload(3000)
    src = tmp_path / "remote" / "weights.pt"
    src.parent.mkdir()
    src.write_bytes(body)
    cache = tmp_path / "cache"
    path = downloads.download(src.as_uri(), str(cache), sha256=sha(body))
    assert open(path, "rb").read() == body
    with open(path, "wb") as f:
        f.write(b"stale")
    with pytest.warns(UserWarning, match="checksum"):
        path = downloads.download(src.as_uri(), str(cache), sha256=sha(body))
    assert open(path, "rb").read() == body


def test_the_mirror_is_tried_first_and_every_failure_is_one_line(server, tmp_path, monkeypatch):
    body = payload()
    server.routes["/mirror/w.pt"] = {"body": body}
    server.routes["/origin/w.pt"] = {"body": body}
    monkeypatch.setenv(downloads.MIRROR_ENV, f"{server.base}/mirror/")
    downloads.download(f"{server.base}/origin/w.pt", str(tmp_path / "a"), sha256=sha(body))
    assert server.log == [("GET", "/mirror/w.pt", None)]
    # a mirror without the file (404): the origin is next
    server.routes["/origin/x.pt"] = {"body": body}
    downloads.download(f"{server.base}/origin/x.pt", str(tmp_path / "b"), sha256=sha(body))
    assert server.log[1:] == [("GET", "/mirror/x.pt", None), ("GET", "/origin/x.pt", None)]
    # a folder as the mirror: no request at all
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "y.pt").write_bytes(body)
    monkeypatch.setenv(downloads.MIRROR_ENV, str(folder))
    n = len(server.log)
    downloads.download(f"{server.base}/origin/y.pt", str(tmp_path / "c"), sha256=sha(body))
    assert len(server.log) == n and (tmp_path / "c" / "y.pt").read_bytes() == body
    # every source fails: one line naming each try, the cache path, the mirror variable and the hint
    with pytest.raises(common.UserError) as e:
        downloads.download(f"{server.base}/origin/z.pt", str(tmp_path / "d"), hint="or pass --z PATH")
    msg = str(e.value)
    assert "\n" not in msg and "z.pt (" in msg and "HTTP 404" in msg and str(folder / "z.pt") in msg
    assert str(tmp_path / "d" / "z.pt") in msg and downloads.MIRROR_ENV in msg and msg.endswith("or pass --z PATH")


def test_other_ranks_only_wait_for_a_verified_file(server, tmp_path, monkeypatch):
    body, root = payload(1000), tmp_path / "c"
    root.mkdir()
    (root / "w.pt").write_bytes(body)
    monkeypatch.setenv("RANK", "1")
    assert downloads.download(f"{server.base}/w.pt", str(root), sha256=sha(body)) == str(root / "w.pt")
    assert server.log == []


# ----------------------------------------------------------------------------- CLIP: OpenAI, then the hub

@pytest.fixture
def tiny_name(monkeypatch):
    """A MODELS entry named "tiny" with conftest's TINY shapes, hub repository "timm/tiny"."""
    e, r, L, w, p = (TINY[k] for k in ("embed_dim", "image_resolution", "vision_layers", "vision_width", "vision_patch_size"))
    monkeypatch.setitem(clip_model._SHAPES, "tiny", (e, r, L, w, p, TINY["transformer_width"], TINY["transformer_layers"]))
    monkeypatch.setitem(clip_model.HUB_REPOS, "tiny", "timm/tiny")
    return "tiny"


def hub_file(model):
    """A file in the hub copies' layout: open_clip's state dict, which has OpenAI's parameter names, no
    input_resolution / context_length / vocab_size entries, float32 tensors, saved with torch.save."""
    buf = io.BytesIO()
    torch.save({k: v.detach().clone().float() for k, v in model.state_dict().items()}, buf)
    return buf.getvalue()


def serve_hub(server, body, published=None):
    """The hub's answer to its resolve URL: a redirect to the storage host carrying X-Linked-Etag (the
    file's sha256) and X-Linked-Size, as huggingface.co sends for files stored with git LFS."""
    meta = {"Location": f"{server.base}/cdn/blob", "X-Linked-Etag": f'"{published or sha(body)}"',
            "X-Linked-Size": str(len(body)), "ETag": '"not-the-sha"'}
    server.routes[f"/timm/tiny/resolve/main/{clip_model.HUB_FILE}"] = {"status": 302, "headers": meta}
    server.routes["/cdn/blob"] = {"body": body}


def test_clip_from_the_hub_when_mirror_and_openai_fail(server, tmp_path, monkeypatch, tiny_name):
    ours = make_tiny_clip(seed=3)
    body = hub_file(ours)
    monkeypatch.setitem(clip_model.MODELS, "tiny", f"{server.base}/clip/{'1' * 64}/tiny.pt")  # 404
    monkeypatch.setenv(downloads.MIRROR_ENV, f"{server.base}/mirror")  # 404 too
    monkeypatch.setenv("HF_ENDPOINT", server.base)
    serve_hub(server, body)
    server.routes["/cdn/blob"]["cut"] = 4_000_000  # and the transfer breaks once: resumed through the redirect
    root = tmp_path / "clip"
    model, _ = clip_model.load("tiny", download_root=str(root))
    resolve = f"/timm/tiny/resolve/main/{clip_model.HUB_FILE}"
    assert server.log == [
        ("GET", "/mirror/tiny.pt", None), ("GET", "/clip/" + "1" * 64 + "/tiny.pt", None), ("HEAD", resolve, None),
        ("GET", resolve, None), ("GET", "/cdn/blob", None),
        ("GET", resolve, "bytes=4000000-"), ("GET", "/cdn/blob", "bytes=4000000-")]
    want, got = ours.state_dict(), model.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)  # bit-exact
    assert os.listdir(root) == [f"tiny-open_clip_pytorch_model.{sha(body)}.bin"]
    # the next load uses the cached copy, checked against the sha256 in its name: no request
    n = len(server.log)
    clip_model.load("tiny", download_root=str(root))
    assert len(server.log) == n
    # the hub's file given as a path loads too (offline use)
    local = tmp_path / clip_model.HUB_FILE
    local.write_bytes(body)
    got = clip_model.load(str(local))[0].state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_hub_copies_are_refused_unless_verified_and_of_the_right_model(server, tmp_path, monkeypatch, tiny_name):
    monkeypatch.setitem(clip_model.MODELS, "tiny", f"{server.base}/clip/{'1' * 64}/tiny.pt")
    monkeypatch.setenv("HF_ENDPOINT", server.base)
    root = tmp_path / "clip"
    body = hub_file(make_tiny_clip())
    serve_hub(server, body, published="2" * 64)  # the bytes do not match the published sha256
    with pytest.raises(common.UserError, match="checksum mismatch"):
        clip_model.load("tiny", download_root=str(root))
    assert os.listdir(root) == []
    serve_hub(server, body, published="3" * 40)  # a git blob id, not a sha256: nothing to verify against
    with pytest.raises(common.UserError, match="publishes no sha256"):
        clip_model.load("tiny", download_root=str(root))
    other = hub_file(make_tiny_clip(vision_width=128))  # verified bytes, but another model's shapes
    serve_hub(server, other)
    with pytest.raises(common.UserError, match="Hugging Face copy of tiny.*visual.conv1.weight") as e:
        clip_model.load("tiny", download_root=str(root))
    assert "\n" not in str(e.value) and os.listdir(root) == []


def test_openai_file_first_and_offline_error(server, tmp_path, monkeypatch, tiny_name):
    ours = make_tiny_clip(seed=4)
    buf = io.BytesIO()
    torch.save(ours.state_dict(), buf)
    body = buf.getvalue()
    monkeypatch.setitem(clip_model.MODELS, "tiny", f"{server.base}/clip/{sha(body)}/tiny.pt")
    monkeypatch.setenv("HF_ENDPOINT", server.base)
    with pytest.raises(common.UserError) as e:  # nothing served anywhere
        clip_model.load("tiny", download_root=str(tmp_path / "a"))
    msg = str(e.value)
    assert msg.count("HTTP 404") == 2 and str(tmp_path / "a" / "tiny.pt") in msg and "--arch" in msg
    server.routes[f"/clip/{sha(body)}/tiny.pt"] = {"body": body, "cut": 5000}
    model, _ = clip_model.load("tiny", download_root=str(tmp_path / "b"))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in ours.state_dict().items())
    assert server.log[-1][2] == "bytes=5000-" and os.listdir(tmp_path / "b") == ["tiny.pt"]


# ----------------------------------------------------------------------------- SelfMask and official ZUTIS files

def test_official_checkpoint_comes_from_the_mirror(tmp_path, monkeypatch):
    folder = tmp_path / "mirror"
    folder.mkdir()
    (folder / "tiny_official.pt").write_bytes(payload(200_000))
    monkeypatch.setenv(downloads.MIRROR_ENV, str(folder))
    monkeypatch.setitem(model.OFFICIAL, "tiny", ("https://example.invalid/x/tiny_official.pt", 0.2, "ViT-B/16", "voc"))
    path = model.download_official("tiny", root=str(tmp_path / "zutis"))
    assert open(path, "rb").read() == (folder / "tiny_official.pt").read_bytes()
    monkeypatch.setitem(model.OFFICIAL, "tiny", ("https://example.invalid/x/tiny_official.pt", 0.3, "ViT-B/16", "voc"))
    with pytest.raises(common.UserError, match="README says ~0.3 MB, so it was deleted"):
        model.download_official("tiny", root=str(tmp_path / "zutis"))
    assert os.listdir(tmp_path / "zutis") == []


def test_selfmask_download_failure_lists_the_tries_and_the_way_offline(server, tmp_path, monkeypatch):
    monkeypatch.setitem(selfmask.SELFMASK_MODELS, "selfmask_nq20", (f"{server.base}/sm/selfmask_nq20.pt", "selfmask_nq20.pt"))
    monkeypatch.setenv(downloads.MIRROR_ENV, f"{server.base}/mirror")
    with pytest.raises(common.UserError) as e:
        selfmask.load_selfmask("selfmask_nq20", download_root=str(tmp_path / "sm"))
    msg = str(e.value)
    assert "\n" not in msg and msg.count("HTTP 404") == 2 and "/mirror/selfmask_nq20.pt" in msg
    assert str(tmp_path / "sm" / "selfmask_nq20.pt") in msg and "--selfmask PATH" in msg
