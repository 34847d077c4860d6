"""l1fx._atomicfile: stale temporary files are found by their lock, not their pid; the umask is never changed."""
import fcntl
import os
import stat
import time

import pytest

from l1fx import _atomicfile


def _new_file_mode(directory) -> int:
    """The mode ``open(path, "w")`` gives a new file here (0o666 minus the umask), read without os.umask."""
    probe = directory / "mode-probe"
    os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    mode = stat.S_IMODE(probe.stat().st_mode)
    probe.unlink()
    return mode


def _leftover(directory, name, pid):
    """What a writer killed with SIGKILL leaves: an unlocked temporary file."""
    tmp = directory / f".{name}.l1fx-tmp-{pid}.deadbeef"
    tmp.write_bytes(b"x" * 1000)
    return tmp


def test_a_leftover_with_this_process_pid_or_an_old_one_is_removed(tmp_path):
    # in a container the trainer is PID 1 after every restart: the pid of a crashed save is our own
    target = tmp_path / "last.pt"
    mine, reused = _leftover(tmp_path, "last.pt", os.getpid()), _leftover(tmp_path, "last.pt", os.getppid())
    recent = _leftover(tmp_path, "other.pt", os.getppid())  # unlocked, a live pid, fresh: maybe an old writer
    hour_ago = time.time() - 3600
    os.utime(reused, (hour_ago, hour_ago))  # a live pid that is not the writer's any more: the age decides
    _atomicfile.atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert sorted(os.listdir(tmp_path)) == sorted(["last.pt", recent.name]), "a crashed save's copy was kept"
    os.utime(recent, (hour_ago, hour_ago))
    assert _atomicfile.remove_stale_temps(tmp_path) == [recent]


def test_a_temp_being_written_is_kept(tmp_path):
    busy = _leftover(tmp_path, "last.pt", os.getpid())  # our pid, as another container's PID 1 writer has
    with open(busy, "rb+") as held:  # a live writer holds its lock (another open file: flock conflicts)
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        assert _atomicfile.remove_stale_temps(tmp_path) == []
        _atomicfile.atomic_write_bytes(tmp_path / "last.pt", b"new")
        assert busy.exists()
    assert _atomicfile.remove_stale_temps(tmp_path) == [busy] and not busy.exists()


def test_a_writer_whose_temp_a_cleaner_took_retries(tmp_path, monkeypatch):
    """A cleaner may find the temp between its creation and the writer's lock; the write still lands."""
    real_lock, raced = _atomicfile._lock, []

    def lock_after_a_cleaner(fd, block):
        if block and not raced:
            # another container's PID 1 sharing the directory: our pid is its own, the temp not its write
            _atomicfile._ACTIVE.clear()
            raced.extend(_atomicfile.remove_stale_temps(tmp_path))  # sees it unlocked: deletes it
        return real_lock(fd, block)

    monkeypatch.setattr(_atomicfile, "_lock", lock_after_a_cleaner)
    _atomicfile.atomic_write_bytes(tmp_path / "f.bin", b"data", clean_stale=False)
    assert len(raced) == 1 and (tmp_path / "f.bin").read_bytes() == b"data"
    assert os.listdir(tmp_path) == ["f.bin"]


def test_modes_without_touching_the_umask(tmp_path, monkeypatch):
    def no_umask(*a):
        raise AssertionError("os.umask changes the mask of every thread of the process")

    expected_new = _new_file_mode(tmp_path)
    monkeypatch.setattr(os, "umask", no_umask)
    fresh = tmp_path / "sub" / "new.bin"
    _atomicfile.atomic_write_bytes(fresh, b"\x00\x01")  # parents are created
    assert fresh.read_bytes() == b"\x00\x01" and stat.S_IMODE(fresh.stat().st_mode) == expected_new
    old = tmp_path / "old.txt"
    old.write_text("old")
    os.chmod(old, 0o640)
    _atomicfile.atomic_write_bytes(old, b"new")
    assert old.read_bytes() == b"new" and stat.S_IMODE(old.stat().st_mode) == 0o640
    src = tmp_path / "src.py"
    src.write_text("")
    os.chmod(src, 0o751)
    _atomicfile.atomic_write_bytes(tmp_path / "out.py", b"", mode_from=src)
    assert stat.S_IMODE((tmp_path / "out.py").stat().st_mode) == 0o751


def test_a_failed_write_keeps_the_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "out.txt"
    target.write_text("old")

    def fail(*a):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        _atomicfile.atomic_write_bytes(target, b"half")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["out.txt"]
    assert not _atomicfile._ACTIVE
