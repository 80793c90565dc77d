"""One command at a time per run_dir: DIR/.lock holds the pid and host of the process running it.

Two commands writing the same run folder at once (a pipeline and a re-run of `sft`, two shells on
one cluster login node) overwrite each other's checkpoints and manifests silently. The lock is
created atomically (O_EXCL); a second command is refused in one line naming the holder. A lock
left by a dead process on this host (pid gone) is taken over, and said so; one from another host
cannot be checked from here and is refused, with the path to remove.

Under `launcher=...` the command re-runs itself as `accelerate launch ... -m mistral_tune <stage>`:
the launching process holds the lock and exports its identity in MISTRAL_TUNE_LOCK_HOLDER; the
launched ranks find their holder's identity in the lock file and proceed without taking it. A
launch started by hand (`accelerate launch -m mistral_tune sft`, the SLURM script) has no parent
of ours: its rank 0 takes the lock, and the other ranks (RANK > 0) never take it.

A multi-node job (launcher.num_machines > 1, the same command on every machine): machine rank 0
takes the lock and records the job (machines and rendezvous address) in it; the command on every
other machine joins that job instead of taking the lock, waiting for it up to launcher.timeout_s.
A lock held by anything else (another job, a plain command) refuses it like any second user.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from mistral_tune.errors import UserError

log = logging.getLogger("mistral_tune")

HOLDER_ENV = "MISTRAL_TUNE_LOCK_HOLDER"


def identity() -> str:
    return f"{os.getpid()}@{socket.gethostname()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def read_holder(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # being written, or damaged: treated as held by an unknown process


def _create(path: Path, info: dict) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(info, f)
    return True


def job_of(launcher) -> dict | None:
    """What identifies a multi-node job in the lock (None on one machine)."""
    if launcher is None or launcher.num_machines <= 1:
        return None
    return {"num_machines": int(launcher.num_machines),
            "rendezvous": f"{launcher.main_process_ip}:{launcher.main_process_port or 29500}"}


def _who(holder: dict) -> str:
    return f"process {holder.get('pid')} on {holder.get('host')}" if holder.get("pid") else "another process"


def _running(holder: dict) -> bool | None:
    """Whether the holder's process still runs; None when it is on another host (not checkable)."""
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or not isinstance(pid, int):
        return None
    return _pid_alive(pid)


def _busy(run_dir, holder: dict, job: dict) -> UserError:
    theirs = holder.get("job")
    return UserError(
        f"run_dir={run_dir} is busy: `mistral-tune {holder.get('command', '?')}` ({_who(holder)}) is running in it"
        + (f" as another multi-node job ({theirs['num_machines']} machines, rendezvous {theirs['rendezvous']}; "
           f"this one: {job['num_machines']}, {job['rendezvous']})" if theirs else ", not as this multi-node job"),
        hint="give every machine the same launcher.num_machines/main_process_ip/main_process_port, or wait for it")


def join(run_dir: str | Path, command: str, job: dict, machine_rank: int, timeout_s: float,
         poll_s: float = 1.0) -> None:
    """Machine rank > 0 of a multi-node job: wait for machine rank 0's lock on the same job."""
    from mistral_tune.runs import RunDir

    path = RunDir(Path(run_dir)).lock
    deadline = time.monotonic() + timeout_s
    announced = False
    while True:
        holder = read_holder(path)
        if holder and holder.get("job") == job:
            log.info("%s: joining machine rank 0's %s (process %s on %s), as machine rank %d", run_dir,
                     holder.get("command", "?"), holder.get("pid"), holder.get("host"), machine_rank)
            return
        running = _running(holder) if holder else False
        if running:  # held, by something else than this job, still running
            raise _busy(run_dir, holder, job)
        if time.monotonic() > deadline:
            if running is None:
                raise _busy(run_dir, holder, job)
            raise UserError(f"machine rank {machine_rank}: machine rank 0 has not started this job in run_dir={run_dir} "
                            f"within launcher.timeout_s={timeout_s:g}s (no lock of this job: {path})",
                            hint="start the command with launcher.machine_rank=0 (same run_dir, on a filesystem both "
                                 "machines see), or raise launcher.timeout_s")
        if not announced and holder:
            # A dead process's lock (machine rank 0 takes it over when it starts), or one from
            # another host, which cannot be checked from here: wait for this job's machine rank 0.
            log.info("%s: the lock is `mistral-tune %s`'s (%s%s); waiting up to %gs for machine rank 0 of this job "
                     "to take it", run_dir, holder.get("command", "?"), _who(holder),
                     ", no longer running" if running is False else "", timeout_s)
        elif not announced:
            log.info("%s: machine rank %d waiting for machine rank 0 to take the run_dir lock (up to %gs)",
                     run_dir, machine_rank, timeout_s)
        announced = True
        time.sleep(poll_s)


def acquire(run_dir: str | Path, command: str, job: dict | None = None) -> Path | None:
    """Take DIR/.lock for this process; None when a launching parent already holds it for us.
    `job` (job_of): this process is machine rank 0 of a multi-node job, recorded in the lock."""
    from mistral_tune.runs import RunDir

    path = RunDir(Path(run_dir)).lock
    if os.environ.get("RANK", "0") != "0":
        return None  # a rank other than 0 of a launch (torchrun, accelerate, SLURM): rank 0 holds it
    inherited = os.environ.get(HOLDER_ENV)
    if inherited:
        holder = read_holder(path)
        if holder and holder.get("id") == inherited:
            return None  # a rank started by the command that holds the lock
    me = identity()
    info = {"id": me, "pid": os.getpid(), "host": socket.gethostname(), "command": command,
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if job:
        info["job"] = job
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(3):  # a stale lock removed by someone else between our reads: try again
        if _create(path, info):
            os.environ[HOLDER_ENV] = me  # inherited by the ranks a launcher starts
            return path
        holder = read_holder(path)
        if holder is None:
            continue
        if _running(holder) is False:
            log.warning("%s: taking over a stale lock of %s (%s, no longer running)",
                        run_dir, _who(holder), holder.get("command", "?"))
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            continue
        since = f" since {holder['since']}" if holder.get("since") else ""
        raise UserError(
            f"run_dir={run_dir} is busy: `mistral-tune {holder.get('command', '?')}` ({_who(holder)}{since}) is running in it",
            hint=f"wait for it, or use another run_dir=...; if it is not running, delete {path}",
        )
    raise UserError(f"run_dir={run_dir}: could not take the lock {path}")


def release(path: Path | None) -> None:
    if path is None:
        return
    holder = read_holder(path)
    if holder and holder.get("id") == identity():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    if os.environ.get(HOLDER_ENV) == identity():
        del os.environ[HOLDER_ENV]


@contextlib.contextmanager
def run_dir_lock(run_dir: str | Path, command: str, launcher=None) -> Iterator[Path | None]:
    """Hold DIR/.lock while the command runs (released on errors and Ctrl-C too). With `launcher`
    (cfg.launcher) of a multi-node job, machine rank 0 holds it and the other machines join."""
    job = job_of(launcher)
    if job and launcher.machine_rank > 0:
        join(run_dir, command, job, int(launcher.machine_rank), float(launcher.timeout_s))
        yield None
        return
    path = acquire(run_dir, command, job)
    try:
        yield path
    finally:
        release(path)
