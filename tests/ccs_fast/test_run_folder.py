"""The run folder: lock with PID and host, no silent overwrite, stale temporaries, room for
a checkpoint, unwritable folders (SPEC §5, §9)."""
import errno
import json
import os
import socket
import subprocess
import sys

import pytest

from ccs_fast import run_folder
from ccs_fast.base.errors import CCSError
from ccs_fast.run_folder import LOCK_FILE, claim_run_folder


def claim(path, **kwargs):
    options = dict(resume=False, overwrite=False, run_id="test-run", log=lambda line: None)
    return claim_run_folder(path, **(options | kwargs))


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_lock_holds_pid_and_host_and_goes_at_release(tmp_path):
    folder = claim(tmp_path / "run")
    holder = json.loads((tmp_path / "run" / LOCK_FILE).read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    assert holder["run_id"] == "test-run"
    folder.release()
    assert not (tmp_path / "run").exists()  # created by the claim and left empty: removed


def test_second_claim_while_held_is_refused(tmp_path):
    first = claim(tmp_path / "run")
    try:
        with pytest.raises(CCSError) as info:
            claim(tmp_path / "run", resume=True)
        message = str(info.value)
        assert "\n" not in message and "in use by another training run" in message
        assert f"PID {os.getpid()} on {socket.gethostname()}" in message
    finally:
        first.release()


def test_lock_of_a_dead_process_is_taken_over(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    stale = {"pid": dead_pid(), "host": socket.gethostname(), "run_id": "old", "started": 0}
    (out / LOCK_FILE).write_text(json.dumps(stale))
    folder = claim(out)  # nothing else in the folder: a fresh run may start
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
    folder.release()


def test_dead_holder_whose_children_still_hold_the_lock(tmp_path):
    """A run killed with -9 leaves forked DataLoader workers holding its flock for a moment."""
    import fcntl

    out = tmp_path / "run"
    out.mkdir()
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, json.dumps({"pid": dead_pid(), "host": socket.gethostname()}).encode())
    try:
        folder = claim(out)
        folder.release()
    finally:
        os.close(fd)


def test_non_empty_folder_needs_resume_or_overwrite(tmp_path):
    out = tmp_path / "run"
    (out / "tb").mkdir(parents=True)
    for name in ("last.pt", "best.pt", "metrics.jsonl", "notes.txt"):
        (out / name).write_text(name)
    with pytest.raises(CCSError) as info:
        claim(out)
    message = str(info.value)
    assert "\n" not in message and "not empty" in message and "--resume" in message and "--overwrite" in message
    assert (out / "last.pt").read_text() == "last.pt" and not (out / LOCK_FILE).exists()
    claim(out, resume=True).release()
    assert (out / "last.pt").exists()
    lines = []
    claim(out, overwrite=True, log=lines.append).release()
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # only the run's own outputs go
    assert "best.pt" in lines[0]


def test_stale_temporaries_are_removed(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    for name in (".last.pt.123.abcd.tmp", ".best.pt.9.ff.tmp", ".metrics.jsonl.77.tmp"):
        (out / name).write_bytes(b"x" * 100)
    (out / ".other.tmp").write_text("not ours")
    claim(out, resume=True).release()
    assert sorted(p.name for p in out.iterdir()) == [".other.tmp"]


def test_unwritable_output_folder_is_one_line(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(CCSError, match="cannot create the output folder") as info:
        claim(blocker / "run")
    assert str(blocker / "run") in str(info.value)
    with pytest.raises(CCSError, match="output folder is a file"):
        claim(blocker)

    real_open = os.open

    def denied(path, *args, **kwargs):
        if str(path).endswith(LOCK_FILE):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(run_folder.os, "open", denied)
    with pytest.raises(CCSError) as info:
        claim(tmp_path / "ro")
    message = str(info.value)
    assert message == f"{tmp_path / 'ro'}: output folder is not writable (Permission denied); nothing was written"


def test_room_for_one_checkpoint(tmp_path, monkeypatch):
    import collections
    import resource

    folder = claim(tmp_path / "run")
    try:
        folder.check_room(10 * 2**20)
        usage = collections.namedtuple("usage", "total used free")
        monkeypatch.setattr(run_folder.shutil, "disk_usage", lambda path: usage(2**30, 2**30 - 2**20, 2**20))
        with pytest.raises(CCSError, match=r"not enough free space for a checkpoint: one needs about 10.0 MiB, 1.0 MiB free"):
            folder.check_room(10 * 2**20)
        monkeypatch.undo()
        monkeypatch.setattr(run_folder.resource, "getrlimit", lambda which: (2**20, resource.RLIM_INFINITY))
        with pytest.raises(CCSError, match=r"file size limit \(ulimit -f\) of 1048576 bytes"):
            folder.check_room(10 * 2**20)
    finally:
        folder.release()


def test_file_system_without_flock_judges_by_pid(tmp_path, monkeypatch):
    def no_flock(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(run_folder.fcntl, "flock", no_flock)
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_FILE).write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname()}))
    folder = claim(out)  # a dead holder
    with pytest.raises(CCSError, match="in use by another training run"):
        claim(out)  # the live holder is this process, through another claim
    folder.release()
    (out / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "elsewhere"}))
    with pytest.raises(CCSError, match="PID 1 on elsewhere"):
        claim(out)
