"""What the CLI prints: user strings are data, never markup, and no table cuts a name or an id.

Labels, ids, sources, paths, tag and encoder names come from users (or from
whoever made the images): ``[/]`` once committed a relabel and then crashed
every later `vismem info`; ``[bold red]x`` printed as ``x``. Each hostile
string here goes through every command that prints it, and the exact string
must come out. Tables are checked in a real pipe with COLUMNS=80 and in a real
80-column terminal (a pty).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import visual_memory as vm
from visual_memory.cli import app
from visual_memory.encoders import list_encoders

runner = CliRunner()

# Each is a label and (with a suffix) an id; a Rich console with markup parses all but the last two.
HOSTILE = [
    "[/]",
    "[bold red]boom",
    "[link=https://evil.example]click[/link]",
    "trailing\\",
    ":smile: été 猫 🐈",
    "L" + "o" * 300 + "ng",
]
CONTROL = "esc\x1b[2Jclear\x07"  # ESC and BEL must not reach the terminal raw
CONTROL_SHOWN = "esc\\x1b[2Jclear\\x07"
SRC = str(Path(vm.__file__).resolve().parents[1])


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


@pytest.fixture
def hostile_mem(tmp_path, cifar_small):
    """A real efficientnet-lite0 memory (real CIFAR-10 vectors) whose labels and ids are all hostile."""
    path = tmp_path / "[bold]mem[/]"  # the memory's own path is markup too
    mem = vm.create(path)
    labels = HOSTILE + [CONTROL]
    ids = [f"{lab[:40]}#id" for lab in labels]
    mem.add_embeddings(cifar_small["train_x"][: len(labels)], labels=labels, ids=ids, encoder="efficientnet-lite0",
                       source="[link=file:///etc/passwd]src[/link]")
    return path, labels, ids


def test_relabel_with_markup_commits_prints_it_and_info_keeps_working(tmp_path, unit_vectors):
    """The issue's reproduction: relabel "[/]" crashed after committing, then `vismem info` crashed on every call."""
    path = tmp_path / "m"
    vm.create(path, encoder=None, dim=8).add_embeddings(unit_vectors(3, 8), labels=["a", "b", "c"], ids=["x", "y", "z"])
    for label, rid in (("[/]", "x"), ("[bold red]boom", "y"), (CONTROL, "z")):
        r = invoke("relabel", path, label, "--id", rid)
        assert r.exit_code == 0, r.output
        shown = CONTROL_SHOWN if label == CONTROL else label
        assert f"relabelled 1 record(s) as '{shown}'" in r.output
    r = invoke("info", path)
    assert r.exit_code == 0, r.output
    rows = {line.strip("│ ").split("│")[0].strip() for line in r.output.splitlines() if line.startswith("│")}
    assert rows == {"[/]", "[bold red]boom", CONTROL_SHOWN}
    assert "\x1b" not in r.output and "\x07" not in r.output
    assert vm.open(path).labels == {"[/]": 1, "[bold red]boom": 1, CONTROL: 1}


def test_hostile_labels_ids_and_paths_through_every_printing_command(hostile_mem, cifar_root, tmp_path):
    path, labels, ids = hostile_mem
    shown, shown_ids = ([x.replace("\x1b", "\\x1b").replace("\x07", "\\x07") for x in xs] for xs in (labels, ids))

    r = invoke("info", path)
    assert r.exit_code == 0, r.output
    assert str(path) in r.output
    for s in shown:
        assert s in r.output

    # An image whose file name is markup, classified and explained against every record.
    img = tmp_path / "[bold red]query[link=x].jpg"
    shutil.copy(cifar_root / "val" / "ship" / "4500.jpg", img)
    r = invoke("classify", path, img, "--k", "7")
    assert r.exit_code == 0, r.output
    assert str(img) in r.output
    predicted = vm.open(path).classify(str(img), k=7)[0].label
    assert (CONTROL_SHOWN if predicted == CONTROL else predicted) in r.output

    r = invoke("explain", path, img, "--k", "7", "--html", tmp_path / "[x].html")
    assert r.exit_code == 0, r.output
    for s, i in zip(shown, shown_ids):
        assert s in r.output and i in r.output  # every label and every full id
    assert f"wrote {tmp_path / '[x].html'}" in r.output

    r = invoke("history", path)
    assert r.exit_code == 0 and "add_embeddings" in r.output

    r = invoke("label-issues", path, "--k", "3", "--top", "7")
    assert r.exit_code == 0, r.output
    assert "likely label issue(s) in 7 records" in r.output

    # Remove by a hostile label: the selector comes back in the message or the count.
    r = invoke("remove", path, "--label", "[bold red]boom")
    assert r.exit_code == 0 and "removed 1 record(s)" in r.output, r.output


def test_hostile_strings_in_error_messages(hostile_mem, tmp_path):
    path, _, _ = hostile_mem
    r = invoke("relabel", path, "cat", "--id", "[bold red]nope[/]")
    assert r.exit_code == 2 and "unknown id(s): '[bold red]nope[/]'" in r.output, r.output
    r = invoke("tag", path, "[/]")
    assert r.exit_code == 2 and "got '[/]'" in r.output, r.output
    r = invoke("tag", path, "[/]", "--delete")
    assert r.exit_code == 2 and "no tag '[/]'" in r.output, r.output
    r = invoke("create", tmp_path / "new", "--encoder", "[link=x]enc[/link]")
    assert r.exit_code == 2 and "unknown encoder '[link=x]enc[/link]'" in r.output, r.output
    r = invoke("info", tmp_path / "[/]missing")
    assert r.exit_code == 2 and f"{tmp_path / '[/]missing'}: does not exist" in r.output, r.output
    r = invoke("encoders", "[/]")
    assert r.exit_code == 1 and "no encoder name contains '[/]'" in r.output, r.output


def test_add_and_create_print_markup_paths_literally(tmp_path, cifar_root):
    root = tmp_path / "[bold]imgs[/]"
    (root / "[red]ship").mkdir(parents=True)
    shutil.copy(cifar_root / "val" / "ship" / "4500.jpg", root / "[red]ship" / "a.jpg")
    path = tmp_path / "[/]m"
    r = invoke("create", path)
    assert r.exit_code == 0 and f"created {path} " in r.output, r.output
    r = invoke("add", path, root)
    assert r.exit_code == 0 and "added 1 record(s)" in r.output, r.output
    assert vm.open(path).labels == {"[red]ship": 1}
    r = invoke("info", path)
    assert "[red]ship" in r.output


# -- tables in a pipe and in an 80-column terminal ---------------------------------------


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "COLUMNS")}
    env.update(PYTHONPATH=SRC, VISMEM_PROGRESS="0", **extra)
    return env


def test_encoders_in_a_pipe_with_80_columns_cut_nothing():
    out = subprocess.run([sys.executable, "-m", "visual_memory.cli", "encoders"], capture_output=True, text=True,
                         env=_env(COLUMNS="80"), timeout=120)
    assert out.returncode == 0, out.stderr
    assert "…" not in out.stdout
    for e in list_encoders():
        assert e.name in out.stdout and e.source in out.stdout and e.description in out.stdout


def _run_in_terminal(args: list[str], columns: int) -> str:
    """Run a command on a real pseudo-terminal of ``columns`` columns; its output without ANSI codes."""
    import fcntl
    import pty
    import select
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=_env(TERM="xterm"), close_fds=True)
    os.close(slave)
    chunks = []
    try:
        while select.select([master], [], [], 120)[0]:
            try:
                data = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
    finally:
        proc.wait(timeout=120)
        os.close(master)
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode())


def test_encoders_in_an_80_column_terminal_fold_but_never_cut():
    out = _run_in_terminal([sys.executable, "-m", "visual_memory.cli", "encoders"], 80)
    lines = out.splitlines()
    assert "…" not in out
    assert max(len(line) for line in lines if "│" in line) <= 80  # it does fit the terminal
    cells = [[c.strip() for c in line.strip("│").split("│")] for line in lines if line.startswith("│")]
    names = [row[0] for row in cells if row[0]]
    assert names == [e.name for e in list_encoders()]  # every name whole, on one line
    # Sources may fold onto more lines in 80 columns; joined up they are whole.
    sources = "".join(row[3] for row in cells)
    for e in list_encoders():
        assert e.source in sources


def test_ids_are_never_cut(tmp_path, unit_vectors):
    """label-issues used to show id[:16] and explain id[:16]: useless for `--id`."""
    path = tmp_path / "m"
    mem = vm.create(path, encoder=None, dim=8)
    x = unit_vectors(12, 8, seed=3)
    ids = [f"{i:02d}" + "f" * 62 for i in range(12)]
    mem.add_embeddings(x, labels=["a", "b"] * 6, ids=ids)
    r = invoke("label-issues", path, "--k", "3", "--top", "12")
    assert r.exit_code == 0, r.output
    shown = [i for i in ids if i in r.output]
    assert shown and all(len(line) > 64 for line in r.output.splitlines() if any(i in line for i in shown))
    issues = [line for line in r.output.splitlines() if line.startswith("│")]
    assert len(shown) == len(issues)  # every listed issue carries its whole id
