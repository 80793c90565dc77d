"""One command per run_dir: DIR/.lock (mistral_tune/lock.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from mistral_tune import lock
from mistral_tune.errors import UserError


@pytest.fixture(autouse=True)
def no_inherited_holder(monkeypatch):
    monkeypatch.delenv(lock.HOLDER_ENV, raising=False)
    monkeypatch.delenv("RANK", raising=False)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_lock(run_dir, pid, host=None, command="sft"):
    (run_dir / ".lock").write_text(json.dumps({"id": f"{pid}@{host or socket.gethostname()}", "pid": pid,
                                               "host": host or socket.gethostname(), "command": command}))


def test_lock_is_taken_and_released(tmp_path):
    with lock.run_dir_lock(tmp_path, "sft") as path:
        holder = json.loads(path.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        assert os.environ[lock.HOLDER_ENV] == holder["id"]  # what launched ranks inherit
        # another process (no inherited holder id) trying the same run_dir
        env = {k: v for k, v in os.environ.items() if k != lock.HOLDER_ENV}
        proc = subprocess.run([sys.executable, "-c", f"from mistral_tune import lock; lock.acquire({str(tmp_path)!r}, 'dpo')"],
                              capture_output=True, text=True, env=env)
        assert proc.returncode != 0
        assert f"busy: `mistral-tune sft` (process {os.getpid()} on {socket.gethostname()}" in proc.stderr
    assert not (tmp_path / ".lock").exists()
    assert lock.HOLDER_ENV not in os.environ


def test_lock_released_after_an_error(tmp_path):
    with pytest.raises(RuntimeError):
        with lock.run_dir_lock(tmp_path, "sft"):
            raise RuntimeError("boom")
    assert not (tmp_path / ".lock").exists()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
    pid = dead_pid()
    write_lock(tmp_path, pid)
    with caplog.at_level("WARNING", logger="mistral_tune"), lock.run_dir_lock(tmp_path, "sft") as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert f"stale lock of process {pid}" in caplog.text


def test_lock_of_another_host_is_not_taken_over(tmp_path):
    write_lock(tmp_path, dead_pid(), host="some-other-node")
    with pytest.raises(UserError, match="busy.*some-other-node"):
        lock.acquire(tmp_path, "sft")


def test_launched_rank_of_the_holder_proceeds(tmp_path, monkeypatch):
    write_lock(tmp_path, 4242, host="launcher-host")
    monkeypatch.setenv(lock.HOLDER_ENV, "4242@launcher-host")
    assert lock.acquire(tmp_path, "sft") is None  # a child of the holder: no lock of its own
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == 4242  # and it leaves the holder's alone
    monkeypatch.setenv(lock.HOLDER_ENV, "999@elsewhere")  # a holder id that is not this lock's
    with pytest.raises(UserError, match="busy"):
        lock.acquire(tmp_path, "sft")


def test_second_command_in_a_busy_run_dir_is_refused_in_one_line(tmp_path):
    """Through the CLI: a live process (this test) holds the run_dir."""
    write_lock(tmp_path, os.getpid(), command="pipeline")
    env = {k: v for k, v in os.environ.items() if k != lock.HOLDER_ENV}
    proc = subprocess.run([sys.executable, "-m", "mistral_tune", "data", f"run_dir={tmp_path}"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    err = lines[next(i for i, line in enumerate(lines) if ": error: " in line):]
    assert "Traceback" not in proc.stderr and len(err) == 2 and err[1].startswith("hint: "), proc.stderr
    assert f"process {os.getpid()} on {socket.gethostname()}" in proc.stderr and "busy" in proc.stderr
    assert not (tmp_path / "data").exists()  # refused before any work


def test_only_rank_0_of_a_hand_started_launch_takes_the_lock(tmp_path, monkeypatch):
    """`accelerate launch -m mistral_tune sft` (or the SLURM script): no parent of ours holds it."""
    monkeypatch.setenv("RANK", "0")
    with lock.run_dir_lock(tmp_path, "sft") as path:
        assert path is not None
        monkeypatch.setenv("RANK", "1")
        monkeypatch.delenv(lock.HOLDER_ENV)  # a sibling rank never saw rank 0's environment
        assert lock.acquire(tmp_path, "sft") is None  # proceeds, takes nothing
        monkeypatch.setenv("RANK", "0")
    assert not (tmp_path / ".lock").exists()
