"""Every script's command line, as a new user meets it: each bad flag stops before any work with exactly
one `error: ...` line (a whole sentence, no traceback) and exit code 2, and every .py file answers --help.

The cases run in one child process (tests/test_cli.py's DRIVER runs each script as __main__ in turn, with
its own argv and captured output), so the table stays cheap; a few run as real `python X.py` commands.
CUDA is hidden from the child, so `--device cuda` means "a machine without a GPU" everywhere."""
import glob
import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": REPO}

DRIVER = r"""
import contextlib, io, json, runpy, sys, traceback
results = []
for script, argv in json.load(sys.stdin):
    out, err, code = io.StringIO(), io.StringIO(), 0
    sys.argv = [script] + argv
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 1
    results.append({"rc": code, "stdout": out.getvalue(), "stderr": err.getvalue()})
print(json.dumps(results))
"""


def run_cases(cases, cwd):
    """[(script, argv)] -> [{"rc", "stdout", "stderr"}], all in one child process started in `cwd`."""
    todo = [(os.path.join(REPO, script), argv) for script, argv in cases]
    p = subprocess.run([sys.executable, "-c", DRIVER], input=json.dumps(todo), capture_output=True, text=True,
                       cwd=cwd, env=ENV, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def assert_one_line_error(res, says, case):
    lines = [ln for ln in res["stderr"].splitlines() if ln.strip()]
    assert res["rc"] == 2, (case, res)
    assert len(lines) == 1 and lines[0].startswith("error: "), (case, res["stderr"])
    body = lines[0][len("error: "):]
    assert "Traceback" not in res["stderr"] + res["stdout"], case
    # a whole sentence: nothing cut mid-way (balanced brackets and backticks, no dangling separator)
    assert 15 < len(body) < 500 and body.count("(") == body.count(")") and body.count("[") == body.count("]"), body
    assert body.count("`") % 2 == 0 and body.rstrip()[-1] not in ",:;(" and "\x1b" not in body, body
    assert says.lower() in body.lower(), (case, body)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The wrong inputs a new user has at hand: a text file, a folder, a truncated and an empty checkpoint,
    an image, empty and comment-only category files, unicode names."""
    d = tmp_path_factory.mktemp("cli")
    (d / "notes.txt").write_text("# my notes\nnot a checkpoint\n")
    (d / "folder").mkdir()
    (d / "imgs").mkdir()
    from PIL import Image
    Image.new("RGB", (40, 30), (200, 10, 10)).save(d / "imgs" / "red.png")
    torch.save({"w": torch.zeros(4096)}, d / "good.pt")
    data = (d / "good.pt").read_bytes()
    (d / "truncated.pt").write_bytes(data[:len(data) // 2])
    (d / "empty.pt").write_bytes(b"")
    (d / "empty.txt").write_text("")
    (d / "comments.txt").write_text("# only a comment\n\n")
    (d / "unicode.txt").write_text("\ufeff猫\r\nchien rouge\r\nÉléphant\n", encoding="utf-8")  # BOM, CRLF
    (d / "latin1.txt").write_bytes("café\nnaïve\n".encode("latin-1"))
    torch.save({"visual.conv1.weight": torch.zeros(8, 3, 4, 4), "visual.proj": torch.zeros(8, 4)}, d / "clip.pt")
    return d


# toy_world.py and toy_report.py get their --help (common.library_main) where the toy folder lands


# (script, argv, words the error line must contain); paths are relative to the files fixture's folder
CASES = [
    ("evaluate.py", ["--device", "cpuu"], "not a device"),
    ("evaluate.py", ["--device", "cuda"], "no CUDA device"),
    ("evaluate.py", ["--device", ""], "not a device"),
    ("evaluate.py", ["--classes", ""], "is empty"),
    ("evaluate.py", ["--classes", "  "], "is empty"),
    ("evaluate.py", ["--images", "imgs", "--classes", "cat,,dog"], "blank name"),
    ("evaluate.py", ["--images", "imgs", "--classes", "cat, ,dog"], "blank name"),
    ("evaluate.py", ["--images", "imgs", "--classes", ",cat"], "blank name"),
    ("evaluate.py", ["--images", "imgs", "--classes", "empty.txt"], "is empty"),
    ("evaluate.py", ["--images", "imgs", "--classes", "comments.txt"], "is empty"),
    ("evaluate.py", ["--images", "imgs", "--classes", "folder"], "is a folder"),
    ("evaluate.py", ["--images", "imgs", "--classes", "background"], "only 'background'"),
    ("evaluate.py", ["--out_dir", "notes.txt"], "existing file"),
    ("evaluate.py", ["--out_dir", ""], "is empty"),
    ("evaluate.py", ["--out_dir", "notes.txt/results"], "which is a file"),
    ("evaluate.py", ["--images", "imgs", "--classes", "latin1.txt"], "not UTF-8"),
    ("evaluate.py", ["--images", "imgs", "--ckpt", "clip.pt"], "give it to --arch"),
    ("evaluate.py", ["--t", "1.5"], "out of range"),
    ("evaluate.py", ["--t", "nan"], "out of range"),
    ("evaluate.py", ["--t=-inf"], "finite"),
    ("evaluate.py", ["--nms_iou", "-1e-3"], "--nms_iou=VALUE"),
    ("evaluate.py", ["--nms_iou", "-0.1"], "out of range"),
    ("evaluate.py", ["--max_images", "0"], ">= 1"),
    ("evaluate.py", ["--max_images", "ten"], "not a whole number"),
    ("evaluate.py", ["--max_size", "-1"], ">= 1"),
    ("evaluate.py", ["--save_vis", "-1"], ">= 0"),
    ("evaluate.py", ["--nms", "soft"], "must be one of"),
    ("evaluate.py", ["--bench", "vocc"], "unknown benchmark"),
    ("evaluate.py", ["--images", "missing_folder"], "not found"),
    ("evaluate.py", ["--ckpt", "notes.txt", "--images", "imgs"], "not a PyTorch file (it looks like a text file)"),
    ("evaluate.py", ["--ckpt", "imgs/red.png", "--images", "imgs"], "looks like a PNG image"),
    ("evaluate.py", ["--ckpt", "truncated.pt", "--images", "imgs"], "damaged or truncated"),
    ("evaluate.py", ["--ckpt", "empty.pt", "--images", "imgs"], "empty (0 bytes)"),
    ("evaluate.py", ["--ckpt", "folder"], "is a folder"),
    ("evaluate.py", ["--ckpt", "missing.pt"], "not found"),
    ("evaluate.py", ["--model", "maskclip", "--ckpt", "good.pt"], "--ckpt has no effect"),
    ("evaluate.py", ["--model", "maskclip", "--t", "0.3"], "--t has no effect"),
    ("evaluate.py", ["--images", "imgs", "--split", "val"], "--split has no effect"),
    ("evaluate.py", ["--with_decoder"], "without --proposals"),
    ("evaluate.py", ["--nms", "none", "--nms_iou", "0.5"], "with --nms none"),
    ("evaluate.py", ["--proposals", "folder"], "is a folder"),
    ("evaluate.py", ["--unseen"], "coco20k"),
    ("evaluate.py", ["--cub_text", "breed"], "cub"),
    ("evaluate.py", ["--frobnicate"], "unrecognized arguments"),
    ("evaluate.py", ["--t"], "expected one argument"),
    ("build_archive.py", ["--k", "0"], ">= 1"),
    ("build_archive.py", ["--k", "-3"], ">= 1"),
    ("build_archive.py", ["--k", "2.5"], "not a whole number"),
    ("build_archive.py", ["--batch_size", "0"], ">= 1"),
    ("build_archive.py", ["--workers", "-1"], ">= 0"),
    ("build_archive.py", ["--sheet_size", "-1"], ">= 0"),
    ("build_archive.py", ["--device", "cpuu"], "not a device"),
    ("build_archive.py", ["--device", "cuda:1"], "no CUDA device"),
    ("build_archive.py", ["--out_dir", "notes.txt"], "existing file"),
    ("build_archive.py", ["--categories", ""], "is empty"),
    ("build_archive.py", ["--categories", "cat,,dog"], "blank name"),
    ("build_archive.py", ["--categories", "empty.txt"], "is empty"),
    ("build_archive.py", ["--categories", "folder"], "is a folder"),
    ("build_archive.py", ["--categories", "vocc"], "did you mean 'voc'"),
    ("build_archive.py", ["--arch", "ViT-B/17", "--index_dirs", "imgs", "--device", "cpu", "--out_dir", "ba"],
     "not found: use one of"),
    ("build_archive.py", ["--arch", "folder", "--index_dirs", "imgs", "--device", "cpu", "--out_dir", "ba"],
     "not found: use one of"),
    ("build_archive.py", ["--arch", "notes.txt", "--index_dirs", "imgs", "--categories", "unicode.txt",
                          "--device", "cpu", "--out_dir", "ba"], "not a PyTorch file"),
    ("build_archive.py", ["--remap", "a=b"], "without --import_archive"),
    ("build_archive.py", ["--import_archive", "notes.txt", "--k", "5"], "--k has no effect"),
    ("build_archive.py", ["--import_archive", "folder"], "is a folder"),
    ("build_archive.py", ["--import_archive", "notes.txt"], "not valid JSON"),
    ("build_archive.py", ["--import_archive", "notes.txt", "--remap", "nothing"], "OLD_PREFIX=NEW_PREFIX"),
    ("build_archive.py", ["--import_embeddings", "notes.txt", "notes.txt", "--index_dirs", "imgs"],
     "one pickle per index dir"),
    ("build_archive.py", ["--dtype", "fp64"], "invalid choice"),
    ("build_archive.py", ["--index_dirs", "imgs", "notes.txt"], "is a file, not a folder"),
    ("pseudo_label.py", ["--batch_size", "0"], ">= 1"),
    ("pseudo_label.py", ["--short_side", "4"], ">= 8"),
    ("pseudo_label.py", ["--num_workers", "-1"], ">= 0"),
    ("pseudo_label.py", ["--archive", "folder"], "is a folder"),
    ("pseudo_label.py", ["--archive", "notes.txt", "--device", "cpu"], "not valid JSON"),
    ("pseudo_label.py", ["--archive", "missing.json", "--device", "cpu"], "run build_archive.py first"),
    ("pseudo_label.py", ["--out_dir", "notes.txt"], "existing file"),
    ("pseudo_label.py", ["--device", "cpuu"], "not a device"),
    ("pseudo_label.py", ["--device", "cuda"], "no CUDA device"),
    ("pseudo_label.py", ["--saliency", "boundary", "--selfmask", "selfmask_nq10"], "--selfmask has no effect"),
    ("pseudo_label.py", ["--saliency", "sal"], "invalid choice"),
    ("pseudo_label.py", ["--index_dirs", "notes.txt"], "not a folder"),
    ("dataset.py", ["--crop", "0"], ">= 32"),
    ("dataset.py", ["--n_scenes", "0"], ">= 1"),
    ("dataset.py", ["--preview", "folder"], "is a folder"),
    ("dataset.py", ["--masks_dir", "notes.txt"], "not a folder"),
    ("dataset.py", ["--index_dirs", "notes.txt"], "not a folder"),
    ("dataset.py", ["--archive", "notes.txt"], "not valid JSON"),
    ("dataset.py", ["--norm", "coco"], "invalid choice"),
    ("dataset.py", ["--preview", "scenes.txt"], "not an image name"),
    ("bench.py", ["--device", "cpuu", "clip"], "not a device"),
    ("bench.py", ["--device", "cuda", "infer"], "no CUDA device"),
    ("bench.py", ["--json", "folder", "clip"], "is a folder"),
    ("bench.py", ["nope"], "invalid choice"),
    ("bench.py", ["clip", "--batch", "0"], ">= 1"),
    ("bench.py", ["train", "--tol", "-1"], ">= 0"),
    ("bench.py", ["smoke", "--timeout", "0"], "> 0"),
    ("bench.py", ["selfmask", "--size", "0", "5"], ">= 1"),
    ("selfmask.py", ["--foo"], "unrecognized arguments"),
    ("train.py", ["--lr", "-1"], "must be >= 0"),
    ("train.py", ["--dtype", "fp8"], "invalid choice"),
    ("train.py", ["--iters", "0"], ">= 1"),
    ("common.py", ["extra"], "unrecognized arguments"),
]


def help_cases():
    scripts = sorted(os.path.relpath(f, REPO) for f in glob.glob(os.path.join(REPO, "**", "*.py"), recursive=True)
                     if os.sep + "tests" + os.sep not in f and os.path.basename(f) != "__init__.py")
    return [(s, ["--help"]) for s in scripts] + [
        ("bench.py", [name, "--help"]) for name in ("clip", "infer", "smoke")]


@pytest.fixture(scope="module")
def results(files):
    """Every case of CASES and help_cases(), run once in one child process."""
    cases = [(s, a) for s, a, _ in CASES] + help_cases()
    return dict(zip(map(json.dumps, cases), run_cases(cases, files)))


def test_bad_flags_give_one_line(results):
    for script, argv, says in CASES:
        assert_one_line_error(results[json.dumps((script, argv))], says, [script] + argv)


def test_real_commands(files):
    """The same rule through the real entry points, not the driver."""
    p = subprocess.run([sys.executable, os.path.join(REPO, "evaluate.py"), "--device", "cpuu"], capture_output=True,
                       text=True, cwd=files, env=ENV, timeout=300)
    assert_one_line_error({"rc": p.returncode, "stdout": p.stdout, "stderr": p.stderr}, "not a device", "evaluate.py")
    p = subprocess.run([sys.executable, os.path.join(REPO, "selfmask.py"), "--help"], capture_output=True,
                       text=True, cwd=files, env=ENV, timeout=300)
    assert p.returncode == 0 and "SelfMask saliency" in p.stdout and "pseudo_label.py" in p.stdout, p


def test_every_file_answers_help(results):
    cases = help_cases()
    assert len(cases) >= 18, cases
    for script, argv in cases:
        res = results[json.dumps((script, argv))]
        assert res["rc"] == 0 and not res["stderr"].strip(), (script, res)
        if script.startswith("toy" + os.sep):  # the toy package's parts print their docstring and name toy.py
            assert len(res["stdout"].split()) >= 8 and "toy.py" in res["stdout"], (script, res["stdout"])
            continue
        text = res["stdout"][res["stdout"].find("usage:"):]  # bench.py says its CPU threads first
        assert text.startswith("usage:") and "--help" in text, (script, res["stdout"])
        description = text.split("\n\n")[1] if "\n\n" in text else ""
        assert len(description.split()) >= 8 and not description.startswith(("options:", "positional")), (script, text)


def test_first_sentence_never_cuts():
    import common
    msg = ("PytorchStreamReader failed reading zip archive: failed finding central directory. This is an internal "
           "miniz error. If you are seeing this error, there is a high likelihood that your checkpoint is corrupted.")
    assert common.first_sentence(msg) == ("PytorchStreamReader failed reading zip archive: failed finding central "
                                          "directory")
    assert common.first_sentence("x" * 300 + ". More.") == ""  # too long to quote whole: not quoted at all
    assert common.first_sentence("Re-running `torch.load` with `weights_only` set to `False` will likely succeed.")
    assert common.first_sentence("[enforce fail at inline_container.cc:180] . file in archive is not in a "
                                 "subdirectory: x.txt") == "file in archive is not in a subdirectory: x.txt"


def test_unicode_and_trailing_comma_names(files):
    import categories
    assert categories.get_categories(str(files / "unicode.txt")) == ["background", "猫", "chien rouge", "Éléphant"]
    assert categories.get_categories("bird,") == ["background", "bird"]  # a class named like a list
    assert categories.get_categories("cat,dog,") == ["background", "cat", "dog"]


def test_dtype_rules_and_the_slow_bf16_warning(monkeypatch, capsys):
    """One --dtype vocabulary: float32 is no autocast, float16 is refused on a CPU, and bfloat16 on a CPU
    without bf16 instructions runs but says it is emulated; with them (or flags unknown) it says nothing."""
    import common
    assert common.resolve_dtype("float32", "cpu") is None
    with pytest.raises(common.UserError, match="CUDA only"):
        common.resolve_dtype("float16", "cpu")
    with pytest.raises(common.UserError, match="is not one of"):
        common.resolve_dtype("fp16", "cpu")
    for flags, warned in ((set(), True), ({"avx512_bf16"}, False), ({"amx_bf16", "avx512_bf16"}, False), (None, False)):
        monkeypatch.setattr(common, "cpu_bf16_flags", lambda: flags)
        assert common.resolve_dtype("bfloat16", "cpu") is torch.bfloat16
        err = capsys.readouterr().err
        assert ("emulated and slower than float32" in err) == warned and err.count("\n") == int(warned), (flags, err)
    with common.autocast("cpu", torch.bfloat16):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with common.autocast("cpu", None):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
