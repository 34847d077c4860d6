"""``python -m l1fx.rewrite`` under bad input and interruptions (issue 13): encodings, signals, exit codes."""
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from l1fx import errors
from l1fx import rewrite as rw
from l1fx.rewrite import RewriteError, main, rewrite_file

REPO = Path(__file__).resolve().parents[1]
MODEL = "import torch.nn as nn\n\n\nclass Net(nn.Module):\n    def __init__(self):\n" \
        "        super().__init__()\n        self.fc = nn.Linear(4, 2)\n"


def leftovers(directory: Path):
    """Temporary files of any writer, old (``.NAME.XXXX.tmp``) or new (``.NAME.l1fx-tmp-PID.X``)."""
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp") or ".l1fx-tmp-" in p.name)


# --------------------------------------------------------------------------- 1. decoding
def test_non_utf8_file_without_cookie_is_a_one_line_error_exit_2_even_with_check(tmp_path, capsys):
    bad = tmp_path / "bad.py"
    bad.write_bytes(MODEL.encode() + "# café, written by an old latin-1 editor\n".encode("latin-1"))
    good = tmp_path / "good.py"
    good.write_text(MODEL)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    assert main([str(tmp_path), "--check"]) == 2  # with --check, 1 means "would rewrite": an error must not
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and len(lines) == 1, err
    assert f"{bad}:8:6:" in lines[0] and "0xe9" in lines[0] and "coding cookie" in lines[0] \
        and "UTF-8" in lines[0] and "nothing was written" in lines[0]

    assert main([str(tmp_path), "--in-place"]) == 2  # and nothing is written, not even the good file
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    with pytest.raises(RewriteError, match="coding cookie") as info:
        rewrite_file(bad)
    assert isinstance(info.value, errors.RewriteError) and isinstance(info.value, errors.UsageError)


def test_unknown_coding_cookie_is_a_per_file_error(tmp_path, capsys):
    bad = tmp_path / "odd.py"
    bad.write_bytes(b"# -*- coding: klingon -*-\n" + MODEL.encode())
    assert main([str(bad), "--check"]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: unknown encoding: klingon" in err and "coding cookie" in err and len(err.splitlines()) == 1


# --------------------------------------------------------------------------- 2. --diff in the file's encoding
@pytest.mark.parametrize("encoding, header", [("latin-1", b"# -*- coding: latin-1 -*-\n"), ("utf-8-sig", b"")])
def test_diff_is_in_the_source_encoding_and_patch_applies_it(tmp_path, capsysbinary, encoding, header):
    # A form feed and (in latin-1) the byte 0x85 (U+0085) are line breaks to str.splitlines, not to patch.
    body = MODEL.replace("class Net", "# Ma\u00eftre Ren\u00e9\x0c\nclass Net")
    if encoding == "latin-1":
        body = body.replace("super()", "# \x85 ellipsis byte\n        super()")
    source = tmp_path / "model.py"
    source.write_bytes(header + body.encode(encoding))
    expected = rewrite_file(source).code

    assert main([str(source), "--diff", "-q"]) == 0
    diff = capsysbinary.readouterr().out
    assert "Ma\u00eftre".encode(encoding.replace("-sig", "")) in diff
    if encoding == "latin-1":
        assert "Ma\u00eftre".encode("utf-8") not in diff
    else:
        assert b"\n \xef\xbb\xbfimport torch.nn as nn\n" in diff  # the BOM is part of line 1, as in the file
    if shutil.which("patch") is None:
        pytest.skip("no `patch` command here; the encoding of the diff was checked above")
    patch_file = tmp_path / "change.diff"
    patch_file.write_bytes(diff)
    copy = tmp_path / "copy.py"
    copy.write_bytes(source.read_bytes())
    proc = subprocess.run(["patch", "--batch", "--no-backup-if-mismatch", str(copy), str(patch_file)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert copy.read_bytes() == expected


# --------------------------------------------------------------------------- 3. signals during the write
@pytest.mark.parametrize("mode", ["--in-place", "-o"])
def test_sigterm_during_the_write_leaves_no_temp_file_and_the_old_file(tmp_path, mode, monkeypatch, capsys):
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        pytest.skip("the test runner handles SIGTERM itself, so the CLI rightly leaves it alone")
    src = tmp_path / "src"
    src.mkdir()
    (src / "model.py").write_text(MODEL)
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.py").write_text("# the previous output\n")
    real_fsync = os.fsync

    def fsync_then_sigterm(fd):  # SIGTERM arrives while the temp file exists
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            raise AssertionError("the CLI does not handle SIGTERM: it would die here and leave its temp file")
        os.kill(os.getpid(), signal.SIGTERM)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_then_sigterm)
    args = [src / "model.py", "--in-place"] if mode == "--in-place" else [src / "model.py", "-o", out / "model.py"]
    assert main(list(map(str, args))) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "terminated (SIGTERM) while writing" in err and "no temporary file is left" in err
    assert (src / "model.py").read_text() == MODEL and (out / "model.py").read_text() == "# the previous output\n"
    assert leftovers(src) == [] and leftovers(out) == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # main() put the default handler back


# The CLI with a write that blocks in fsync, so the parent can SIGKILL it exactly while a temp file exists.
SLOW_WRITE = """
import os, sys, time
real_fsync = os.fsync
def slow_fsync(fd):
    print("writing", flush=True)
    time.sleep(60)
    real_fsync(fd)
os.fsync = slow_fsync
from l1fx.rewrite import main
sys.exit(main(sys.argv[1:]))
"""


def start_slow_write(*args):
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITE, *map(str, args)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()  # blocks until the temp file is being written
    if line.strip() != "writing":
        proc.kill()
        pytest.fail(f"the CLI did not reach the write: {line!r} {proc.communicate()[1]}")
    return proc


def test_sigkill_leftover_is_ignored_and_removed_by_the_next_run(tmp_path, capsys):
    (tmp_path / "model.py").write_text(MODEL)
    proc = start_slow_write(tmp_path, "--in-place")
    proc.kill()  # SIGKILL cannot be caught: the temp file stays, the file itself is untouched
    proc.communicate(timeout=60)
    stale = leftovers(tmp_path)
    assert len(stale) == 1 and stale[0].startswith(".model.py.l1fx-tmp-") and not stale[0].endswith(".py")
    assert (tmp_path / "model.py").read_text() == MODEL
    # Another writer's temp file (a live pid) is not touched.
    alive = tmp_path / f".other.py.l1fx-tmp-{os.getppid()}.0123abcd"
    alive.write_text("in progress")

    assert main([str(tmp_path), "--check"]) == 1  # the leftover is no input: one file would be rewritten
    assert "1 of 1 file(s)" in capsys.readouterr().err
    assert main([str(tmp_path), "--in-place"]) == 0
    assert leftovers(tmp_path) == [alive.name]
    assert "l1fx.nn.L1Linear(4, 2)" in (tmp_path / "model.py").read_text()


# --------------------------------------------------------------------------- 4. exit codes
def test_check_never_exits_1_for_an_error(tmp_path, capsys, monkeypatch):
    (tmp_path / "model.py").write_text(MODEL)  # would be rewritten
    (tmp_path / "broken.py").write_text("def f(:\n")
    assert main([str(tmp_path), "--check"]) == 2
    assert "broken.py:1:7: syntax error" in capsys.readouterr().err

    def bug(*args, **kwargs):
        raise RuntimeError("a bug in the codemod")

    (tmp_path / "broken.py").unlink()
    monkeypatch.setattr(rw, "_rewrite", bug)
    assert main([str(tmp_path), "--check"]) == rw.EXIT_INTERNAL != rw.EXIT_WOULD_REWRITE
    err = capsys.readouterr().err
    assert "Traceback" in err and "a bug in the codemod" in err and "internal error" in err
    with pytest.raises(RuntimeError, match="a bug"):  # other modes: an ordinary traceback (exit 1)
        main([str(tmp_path), "--diff"])
