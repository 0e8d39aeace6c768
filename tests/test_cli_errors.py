"""The CLI as a new user meets it: bad paths, bad flags, empty folders, absurd k.

Every error is one clear line on stderr (a list of bad files when there are
several), exit code 1 or 2, no traceback, and the memory exactly as it was.
`vismem add` is all-or-nothing across all its paths.
"""

from __future__ import annotations

import json
import re
import shutil
import sys

import pytest
from typer.testing import CliRunner

import visual_memory as vm
from visual_memory.cli import app
from visual_memory.errors import ImageError
from visual_memory.index import MAX_K

runner = CliRunner()


@pytest.fixture(autouse=True)
def piped_output(monkeypatch):
    """The CLI's consoles as in a pipe, even where the environment sets FORCE_COLOR or TTY_* (rich reads those at import)."""
    app_module = sys.modules["visual_memory.cli.app"]
    monkeypatch.setattr(app_module, "console", app_module._console(force_terminal=False))
    monkeypatch.setattr(app_module, "err_console", app_module._console(stderr=True, force_terminal=False))


def invoke(*args):
    r = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in r.output, r.output
    return r


def state(path) -> tuple:
    m = vm.open(path)
    return len(m), sorted(m.ids()), m.version, (path / "audit.jsonl").read_bytes()


@pytest.fixture
def folders(tmp_path, cifar_root):
    """Two ImageFolders of real CIFAR-10 images (2 classes x 2 each), one image file, and bad files."""
    out = {}
    for name, classes, start in (("dir1", ("cat", "ship"), 0), ("dir2", ("dog", "truck"), 0)):
        for c in classes:
            d = tmp_path / name / c
            d.mkdir(parents=True)
            for p in sorted((cifar_root / "train" / c).glob("*.jpg"))[start : start + 2]:
                shutil.copy(p, d / p.name)
        out[name] = tmp_path / name
    out["one"] = cifar_root / "val" / "ship" / "4500.jpg"
    (tmp_path / "bad.jpg").write_bytes(b"this is not a jpeg")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "emptydir").mkdir()
    out.update(bad=tmp_path / "bad.jpg", empty=tmp_path / "empty.jpg", emptydir=tmp_path / "emptydir")
    return out


@pytest.fixture(scope="module")
def one_record_memory(tmp_path_factory, cifar_root):
    path = tmp_path_factory.mktemp("template") / "m.vm"
    vm.create(path).add([cifar_root / "val" / "cat" / "4500.jpg"], labels="cat")
    return path


@pytest.fixture
def mem_path(tmp_path, one_record_memory):
    """A real efficientnet-lite0 memory holding one CIFAR-10 cat (a fresh copy per test)."""
    return shutil.copytree(one_record_memory, tmp_path / "m.vm")


def test_add_is_all_or_nothing_across_paths(mem_path, folders):
    """`vismem add M dir1 dir2 bad.jpg` used to commit dir1 and dir2, then fail."""
    before = state(mem_path)
    r = invoke("add", mem_path, folders["dir1"], folders["dir2"], folders["bad"])  # a file needs --label
    assert r.exit_code == 2 and f"{folders['bad']}: a single image needs --label" in r.output, r.output
    assert state(mem_path) == before

    # With a label, the folders are read whole; two corrupt files are both named, nothing is added.
    r = invoke("add", mem_path, folders["dir1"], folders["dir2"], folders["bad"], folders["empty"], "--label", "x")
    assert r.exit_code == 2, r.output
    assert "2 of 10 image(s) cannot be used; nothing was added" in r.output
    assert f"{folders['bad']}: not a recognised image format" in r.output
    assert f"{folders['empty']}: file is empty (0 bytes)" in r.output
    assert state(mem_path) == before

    # Bad paths (missing, empty folder) are all named before any image is read, with the bad files given by name.
    r = invoke("add", mem_path, folders["dir1"], folders["emptydir"], folders["bad"], mem_path.parent / "nowhere.jpg",
               "--label", "x")
    assert r.exit_code == 2, r.output
    for text in (f"{folders['emptydir']}: no images found", f"{folders['bad']}: not a recognised image format",
                 f"{mem_path.parent / 'nowhere.jpg'}: no such file or folder", "3 of 4 path(s) cannot be used"):
        assert text in r.output
    assert state(mem_path) == before

    # All good: one add call, one commit (one version), everything in.
    r = invoke("add", mem_path, folders["dir1"], folders["dir2"])
    assert r.exit_code == 0 and "added 8 record(s); 9 in memory" in r.output, r.output
    m = vm.open(mem_path)
    assert m.version == before[2] + 1
    assert m.labels == {"cat": 3, "dog": 2, "ship": 2, "truck": 2}


def test_add_names_every_bad_file_up_to_a_cap(mem_path, tmp_path, folders):
    bad = []
    for i in range(13):
        p = tmp_path / f"broken{i:02d}.jpg"
        p.write_bytes(b"")
        bad.append(p)
    before = state(mem_path)
    r = invoke("add", mem_path, folders["one"], *bad, "--label", "ship")
    assert r.exit_code == 2, r.output
    assert "13 of 14 image(s) cannot be used; nothing was added" in r.output
    assert sum(str(p) in r.output for p in bad) == 10 and "... and 3 more" in r.output
    assert state(mem_path) == before


def test_python_add_names_every_bad_image(mem_path, folders):
    mem = vm.open(mem_path)
    with pytest.raises(ImageError) as err:
        mem.add([folders["one"], folders["bad"], folders["one"], folders["empty"]], labels="ship")
    assert str(folders["bad"]) in str(err.value) and str(folders["empty"]) in str(err.value)
    assert "2 of 4 image(s) cannot be used" in str(err.value)


def test_absurd_k_is_refused_and_a_large_k_is_clamped(mem_path, cifar_root):
    """`classify --k 100000000` on a tiny memory took 147 s and 10 GB."""
    img = cifar_root / "val" / "ship" / "4501.jpg"
    r = invoke("classify", mem_path, img, "--k", "100000000")
    assert r.exit_code == 2 and f"the limit is {MAX_K}" in r.output and "k=100000000" in r.output, r.output
    r = invoke("classify", mem_path, img, "--k", str(MAX_K), "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out[0]["k"] == 1 and len(out[0]["neighbors"]) == 1  # the memory holds one record
    r = invoke("eval", mem_path, cifar_root / "val", "--per-class", "1", "--k", "1,5000")
    assert r.exit_code == 0 and "k=5000" in r.output, r.output


@pytest.mark.parametrize(
    "args",
    [
        ["info", "{missing}"],
        ["add", "{missing}", "{image}", "--label", "x"],
        ["classify", "{missing}", "{image}"],
        ["explain", "{missing}", "{image}"],
        ["eval", "{missing}", "{folder}"],
        ["remove", "{missing}", "--id", "x"],
        ["forget", "{missing}", "--id", "x"],
        ["relabel", "{missing}", "cat", "--id", "x"],
        ["reweight", "{missing}", "0.5", "--id", "x"],
        ["history", "{missing}"],
        ["tag", "{missing}", "v1"],
        ["optimize", "{missing}"],
        ["prune", "{missing}", "--soft"],
        ["label-issues", "{missing}"],
        ["export-neighbors", "{missing}", "{folder}", "{tmp}/n.json"],
        ["serve", "{missing}"],
        ["import-neighbors", "{tmp}/missing.json"],
        ["add", "{memory}", "{tmp}/emptydir"],
        ["add", "{memory}", "{tmp}/emptydir", "--label", "x"],
        ["eval", "{memory}", "{tmp}/emptydir"],
        ["classify", "{memory}", "{tmp}/bad.jpg"],
        ["classify", "{memory}", "{image}", "--vote", "bogus"],
        ["reweight", "{memory}", "-1", "--id", "x"],
        ["create", "{memory}"],
        ["create", "{tmp}/bad.jpg"],
        ["create", "{tmp}/new", "--encoder", "no-such-encoder"],
        ["demo", "--out", "{tmp}/bad.jpg"],
    ],
)
def test_error_paths_are_one_clear_line(args, mem_path, folders, tmp_path, cifar_root):
    fill = {"missing": tmp_path / "nope.vm", "memory": mem_path, "image": folders["one"], "folder": folders["dir1"],
            "tmp": tmp_path}
    before = state(mem_path)
    r = invoke(*[a.format(**fill) for a in args])
    assert r.exit_code == 2, r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    assert state(mem_path) == before


@pytest.mark.parametrize(
    "args, message",
    [
        (["classify", "{memory}", "{tmp}"], "is a directory"),
        (["classify", "{memory}", "{image}", "--k", "0"], "--k"),
        (["eval", "{memory}", "{tmp}", "--k", "abc"], "comma-separated positive integers"),
        (["prune", "{memory}"], "choose exactly one of --hard, --soft, --undo"),
        (["info", "{memory}", "--bogus"], "No such option: --bogus"),
        (["optimize", "{memory}", "--prune-older-than", "-1"], "--prune-older-than"),
        (["demo", "--per-class", "0"], "--per-class"),
    ],
)
def test_usage_errors_are_typers_own(args, message, mem_path, folders, tmp_path):
    fill = {"memory": mem_path, "image": folders["one"], "tmp": tmp_path}
    before = state(mem_path)
    r = invoke(*[a.format(**fill) for a in args])
    # typer's error box wraps long lines (and is coloured where FORCE_COLOR is set)
    flat = " ".join(re.sub("[│╭╮╰╯─]", " ", re.sub(r"\x1b\[[0-9;]*m", "", r.output)).split())
    assert r.exit_code == 2 and message in flat and "Usage: vismem" in flat, r.output
    assert state(mem_path) == before


def test_an_unexpected_error_is_one_line_with_its_type_and_verbose_shows_it(mem_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("the disk caught fire")

    monkeypatch.setattr(vm, "open", boom)
    r = invoke("info", mem_path)
    assert r.exit_code == 1, r.output
    assert r.output.strip() == ("error: unexpected RuntimeError: the disk caught fire "
                                "(run `vismem --verbose ...` for the traceback)")
    r = runner.invoke(app, ["--verbose", "info", str(mem_path)])
    assert isinstance(r.exception, RuntimeError)  # --verbose lets the traceback through
