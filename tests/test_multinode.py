"""Several machines: `launcher.num_machines=2`, one command per machine, one shared run_dir.

The extended tests start two real "machines" on this host: two `mistral-tune sft` commands,
machine ranks 0 and 1, one process each, rendezvous on 127.0.0.1 (torchrun + gloo). The fast
tests cover the command line, the lock's view of a multi-node job and the waits.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from mistral_tune import lock
from mistral_tune.errors import UserError

REPO = Path(__file__).resolve().parent.parent
STEPS = 6
TINY = ["logger=none", f"sft.trainer.max_steps={STEPS}", "sft.trainer.save_steps=2", "sft.data.limit=96",
        "sft.trainer.per_device_train_batch_size=4"]


def _launcher(**kw):
    base = {"name": "ddp", "config_file": "launch/accelerate/ddp.yaml", "num_processes": 2, "extra_args": [],
            "num_machines": 1, "machine_rank": 0, "main_process_ip": None, "main_process_port": None,
            "timeout_s": 1800}
    return OmegaConf.create({**base, **kw})


# ---------------------------------------------------------------------------------------------
# fast


def test_launch_command_carries_the_machine_keys():
    from mistral_tune.launch import launch_command

    cfg = OmegaConf.create({"run_dir": "/shared/x", "launcher": _launcher(
        num_processes=16, num_machines=2, machine_rank=1, main_process_ip="10.0.0.1", main_process_port=29555,
        timeout_s=120)})
    cmd = launch_command(cfg, "sft", ["launcher=ddp", "launcher.machine_rank=1", "sft.trainer.max_steps=3"])
    flags = " ".join(cmd)
    assert "--num_processes 16 --num_machines 2 --machine_rank 1 --main_process_ip 10.0.0.1 --main_process_port 29555" in flags
    # The ranks train in place, with the same collective timeout; no launcher override leaks through.
    assert cmd[-4:] == ["sft.trainer.max_steps=3", "run_dir=/shared/x", "launcher=none", "launcher.timeout_s=120"]
    # torchrun's rendezvous waits for the other machines as long as the launcher says, not its own 600 s.
    assert "--rdzv_conf timeout=120" in flags
    single = launch_command(OmegaConf.create({"run_dir": "/x", "launcher": _launcher()}), "sft", [])
    assert "--num_machines" not in single and "--main_process_port" not in single and "--rdzv_conf" not in single


@pytest.mark.parametrize("kw, message", [
    ({"num_machines": 2, "machine_rank": 2, "main_process_ip": "a"}, "ranks are 0..1"),
    ({"num_machines": 2}, "needs launcher.main_process_ip"),
    ({"num_machines": 2, "main_process_ip": "a", "num_processes": 3}, "not a multiple"),
    ({"num_machines": 2, "main_process_ip": "a", "name": "none"}, "nothing would be launched"),
    ({"timeout_s": 0}, "timeout_s=0"),
])
def test_contradictory_machine_keys_are_one_line_errors(kw, message):
    from mistral_tune.launch import check_machines

    with pytest.raises(UserError, match=message):
        check_machines(_launcher(**kw))


def test_the_lost_rank_line_leads_the_launchers_error(monkeypatch, capsys):
    """torch's failure dump would bury it: the surviving rank's one line becomes the error."""
    from mistral_tune import launch

    rank_output = ("print('[mistral_tune] sft: step 3'); "
                   "print('mistral-tune sft: error: lost rank 1 (machine rank 1): it stopped responding during training'); "
                   "print('torch.distributed.elastic.multiprocessing.errors.ChildFailedError:\\n' * 20); raise SystemExit(1)")
    monkeypatch.setattr(launch, "launch_command", lambda cfg, stage, overrides: [sys.executable, "-c", rank_output])
    cfg = OmegaConf.create({"launcher": _launcher(num_machines=2, main_process_ip="127.0.0.1")})
    with pytest.raises(UserError) as err:
        launch.run_launched(cfg, "sft", [])
    assert str(err.value) == ("sft (machine rank 0 of 2): lost rank 1 (machine rank 1): it stopped responding "
                              "during training")
    assert "ChildFailedError" in capsys.readouterr().out  # the ranks' output still streams through


def test_a_machine_that_never_joined_is_one_line_naming_the_rendezvous(monkeypatch):
    """Machine rank 0's torchrun gives up on the rendezvous after launcher.timeout_s: its traceback
    becomes one line that says how many machines came and where they were expected."""
    from mistral_tune import launch

    agent_output = ("print('Traceback (most recent call last):\\n  File static_tcp_rendezvous.py'); "
                    "print('torch.distributed.DistStoreError: Timed out after 21 seconds waiting for clients. "
                    "1/2 clients joined.'); raise SystemExit(1)")
    monkeypatch.setattr(launch, "launch_command", lambda cfg, stage, overrides: [sys.executable, "-c", agent_output])
    cfg = OmegaConf.create({"launcher": _launcher(num_machines=2, main_process_ip="10.0.0.1", main_process_port=29555,
                                                   timeout_s=20)})
    with pytest.raises(UserError) as err:
        launch.run_launched(cfg, "sft", [])
    assert err.value.message == ("sft (machine rank 0 of 2): only 1 of 2 machines joined the rendezvous 10.0.0.1:29555 "
                              "within launcher.timeout_s=20s")
    assert "launcher.machine_rank=1" in err.value.hint


@pytest.fixture
def no_rank(monkeypatch):
    monkeypatch.delenv(lock.HOLDER_ENV, raising=False)
    monkeypatch.delenv("RANK", raising=False)


def test_the_second_machine_joins_the_job_machine_rank_0_holds(tmp_path, no_rank, monkeypatch):
    job = _launcher(num_machines=2, main_process_ip="127.0.0.1", main_process_port=29555, timeout_s=5)
    with lock.run_dir_lock(tmp_path, "sft", job) as held:
        assert json.loads(held.read_text())["job"] == {"num_machines": 2, "rendezvous": "127.0.0.1:29555"}
        job.machine_rank = 1
        with lock.run_dir_lock(tmp_path, "sft", job) as joined:  # not refused as a second user
            assert joined is None
        assert held.exists()  # the joining machine never releases rank 0's lock
        # A single-machine command, and another job (other rendezvous), are refused as before
        # (as from another process: not one of the ranks the holder started).
        monkeypatch.delenv(lock.HOLDER_ENV)
        with pytest.raises(UserError, match="busy"):
            lock.acquire(tmp_path, "sft")
        other = _launcher(num_machines=2, machine_rank=1, main_process_ip="127.0.0.1", main_process_port=29999)
        with pytest.raises(UserError, match="another multi-node job"):
            with lock.run_dir_lock(tmp_path, "sft", other):
                pass
    assert not (tmp_path / ".lock").exists()


def test_the_second_machine_refuses_a_plain_command_holding_the_run_dir(tmp_path, no_rank):
    with lock.run_dir_lock(tmp_path, "dpo"):
        job = _launcher(num_machines=2, machine_rank=1, main_process_ip="h", timeout_s=5)
        with pytest.raises(UserError, match="not as this multi-node job"):
            lock.join(tmp_path, "sft", lock.job_of(job), 1, 5)


def test_the_second_machine_waits_for_rank_0_then_gives_up_in_one_line(tmp_path, no_rank):
    job = lock.job_of(_launcher(num_machines=2, machine_rank=1, main_process_ip="h"))
    t0 = time.monotonic()
    with pytest.raises(UserError, match=r"machine rank 0 has not started this job .* within launcher.timeout_s=0.5s"):
        lock.join(tmp_path, "sft", job, 1, 0.5, poll_s=0.1)
    assert time.monotonic() - t0 < 5
    # ... and proceeds as soon as rank 0's lock appears.
    threading.Timer(0.3, lambda: lock.acquire(tmp_path, "sft", job)).start()
    lock.join(tmp_path, "sft", job, 1, 10, poll_s=0.05)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_the_second_machine_waits_out_a_dead_jobs_lock_for_its_own_rank_0(tmp_path, no_rank, caplog):
    """A rerun after machine rank 0 died: its lock (another rendezvous port) is still there when
    machine rank 1 of the new job looks. Rank 0 takes a dead process's lock over, so rank 1 waits
    for that instead of refusing the run_dir as busy (a race the CI lost once)."""
    old = lock.job_of(_launcher(num_machines=2, main_process_ip="127.0.0.1", main_process_port=29001))
    new = lock.job_of(_launcher(num_machines=2, main_process_ip="127.0.0.1", main_process_port=29002))
    (tmp_path / ".lock").write_text(json.dumps({"id": "x", "pid": _dead_pid(), "host": socket.gethostname(),
                                                "command": "sft", "job": old}))
    threading.Timer(0.5, lambda: lock.acquire(tmp_path, "sft", new)).start()  # rank 0: takes over the stale lock
    with caplog.at_level("INFO", logger="mistral_tune"):
        lock.join(tmp_path, "sft", new, 1, 10, poll_s=0.05)
    assert json.loads((tmp_path / ".lock").read_text())["job"] == new
    assert "no longer running); waiting up to 10s for machine rank 0 of this job" in caplog.text


def test_the_second_machine_refuses_another_hosts_job_after_waiting(tmp_path, no_rank):
    """A lock from another host cannot be checked from here: machine rank 1 waits for its own rank 0
    (which may be about to take a stale one over) and, at launcher.timeout_s, names the holder."""
    other = lock.job_of(_launcher(num_machines=2, main_process_ip="10.0.0.9", main_process_port=29001))
    (tmp_path / ".lock").write_text(json.dumps({"id": "x", "pid": 4242, "host": "some-other-node", "command": "dpo",
                                                "job": other}))
    job = lock.job_of(_launcher(num_machines=2, main_process_ip="10.0.0.1"))
    t0 = time.monotonic()
    with pytest.raises(UserError, match=r"busy: `mistral-tune dpo` \(process 4242 on some-other-node\).*"
                                        r"another multi-node job \(2 machines, rendezvous 10.0.0.9:29001"):
        lock.join(tmp_path, "sft", job, 1, 0.5, poll_s=0.1)
    assert 0.4 < time.monotonic() - t0 < 5
    # A dead process's lock that nobody takes over: the same "rank 0 has not started" line as no lock.
    (tmp_path / ".lock").write_text(json.dumps({"id": "x", "pid": _dead_pid(), "host": socket.gethostname(),
                                                "command": "sft", "job": other}))
    with pytest.raises(UserError, match="machine rank 0 has not started this job"):
        lock.join(tmp_path, "sft", job, 1, 0.3, poll_s=0.1)


def test_the_second_machine_waits_for_this_configs_data_not_any(tmp_path, no_rank):
    """A manifest from another build (other inputs) in the shared run_dir is not taken for the
    one rank 0 is making; the wait ends with one line naming the folder and the reason."""
    from mistral_tune import runs
    from mistral_tune.config import compose
    from mistral_tune.stages import data

    cfg = compose([f"run_dir={tmp_path}", "logger=none", "launcher=ddp", "launcher.num_machines=2",
                   "launcher.machine_rank=1", "launcher.main_process_ip=127.0.0.1", "launcher.timeout_s=1"])
    runs.write_json(tmp_path / "data" / "sft" / runs.MANIFEST, {"fingerprint": "an older build"})
    with pytest.raises(UserError, match=r"data/sft was not built by machine rank 0 within launcher.timeout_s=1s "
                                        r"\(a build from other inputs is there\)"):
        data.wait_built(cfg, "sft", poll_s=0.1)
    # (the wait that ends when rank 0's build lands is in the two-machine test below)


def test_the_heartbeat_names_the_rank_that_stopped(monkeypatch):
    """Two ranks beat into a real TCPStore; one stops: the other names it (and its machine)."""
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    from mistral_tune.training.peers import Heartbeat

    monkeypatch.setenv("RANK", "1")
    other = Heartbeat(interval_s=0.1).__enter__()
    monkeypatch.setenv("RANK", "0")
    with Heartbeat(interval_s=0.1) as me:
        assert me.lost() is None  # both beating: a failure is not blamed on a rank
        other.__exit__(None, None, None)
        time.sleep(0.3)
        assert me.lost().startswith("lost rank 1 (machine rank 1)")
    del server


# ---------------------------------------------------------------------------------------------
# extended: two machines on this host


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Machines:
    """Commands started in their own process groups, all killed at teardown."""

    def __init__(self):
        self.procs: list[subprocess.Popen] = []

    def start(self, args: list[str], log: Path) -> subprocess.Popen:
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", lock.HOLDER_ENV)}
        proc = subprocess.Popen([sys.executable, "-m", "mistral_tune", *args], cwd=REPO, env=env,
                                stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def kill(self, proc: subprocess.Popen) -> None:
        """The command and every process under it, at once, as when its machine dies. (Not its
        process group alone: torchrun starts each rank in a session of its own.)"""
        import psutil

        try:
            tree = [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]
        except psutil.NoSuchProcess:
            tree = []
        for p in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGKILL)
        proc.wait()

    def two(self, run_dir: Path, stage_args: list[str], tmp: Path, tag: str, launcher: str = "ddp",
            rank_1_first: bool = False):
        """Machine ranks 0 and 1; with `rank_1_first`, rank 1 starts first and rank 0 once rank 1
        says it is waiting for rank 0's lock."""
        port = _free_port()
        common = [stage_args[0], f"run_dir={run_dir}", *stage_args[1:], f"launcher={launcher}",
                  "launcher.num_processes=2", "launcher.num_machines=2", "launcher.main_process_ip=127.0.0.1",
                  f"launcher.main_process_port={port}", "launcher.timeout_s=120"]
        start = lambda r: self.start([*common, f"launcher.machine_rank={r}"], tmp / f"{tag}-machine{r}.log")  # noqa: E731
        if not rank_1_first:
            return [start(0), start(1)]
        one = start(1)
        deadline = time.monotonic() + 120
        while "waiting up to" not in (tmp / f"{tag}-machine1.log").read_text():
            assert time.monotonic() < deadline and one.poll() is None, (tmp / f"{tag}-machine1.log").read_text()[-3000:]
            time.sleep(0.1)
        return [start(0), one]


@pytest.fixture
def machines():
    m = Machines()
    yield m
    for proc in m.procs:
        m.kill(proc)


def _wait_all(procs, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    codes = []
    for proc in procs:
        codes.append(proc.wait(timeout=max(1.0, deadline - time.monotonic())))
    return codes


def _weights(stage_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(stage_dir / "model.safetensors")


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def two_machine_sft(tmp_path_factory):
    """An uninterrupted two-machine SFT, and the same config on one machine with 2 processes."""
    tmp = tmp_path_factory.mktemp("multinode")
    m = Machines()
    try:
        t0 = time.monotonic()
        procs = m.two(tmp / "two", ["sft", *TINY], tmp, "two")
        codes = _wait_all(procs, 600)
        two_s = time.monotonic() - t0
        logs = {r: (tmp / f"two-machine{r}.log").read_text() for r in (0, 1)}
        assert codes == [0, 0], f"{codes}\n{logs[0][-3000:]}\n{logs[1][-3000:]}"
        one = m.start(["sft", f"run_dir={tmp / 'one'}", *TINY, "launcher=ddp", "launcher.num_processes=2",
                       f"launcher.main_process_port={_free_port()}"], tmp / "one.log")
        assert one.wait(timeout=600) == 0, (tmp / "one.log").read_text()[-3000:]
    finally:
        for proc in m.procs:
            m.kill(proc)
    return {"two": tmp / "two", "one": tmp / "one", "logs": logs, "two_s": two_s}


@pytest.mark.slow
@pytest.mark.extended
def test_two_machines_train_like_one_machine_with_two_processes(two_machine_sft):
    two, one = two_machine_sft["two"], two_machine_sft["one"]
    metrics = json.loads((two / "sft" / "metrics.json").read_text())
    assert metrics["num_machines"] == 2 and metrics["world_size"] == 2
    assert json.loads((one / "sft" / "metrics.json").read_text())["num_machines"] == 1
    diff = _max_diff(_weights(two / "sft"), _weights(one / "sft"))
    moved = _max_diff(_weights(two / "sft"), _weights(two / "base"))
    print(f"two machines vs one machine x 2 processes: max |weight difference| {diff:.3g} "
          f"(training moved them {moved:.3g}); two-machine run {two_machine_sft['two_s']:.0f}s")
    assert moved > 1e-3 and diff <= 1e-5
    # One writer: machine rank 1 built nothing and joined rank 0's lock.
    logs = two_machine_sft["logs"]
    # (Whether it also waited for the build depends on which machine got there first: CI's rank 1
    # once arrived after rank 0 had built it, so the wait line is not asserted.)
    assert "joining machine rank 0's sft" in logs[1] and "data/sft: machine rank 1 reads machine rank 0's build" in logs[1]
    assert "data/sft: read" in logs[0] and "data/sft: read" not in logs[1]
    assert (two / "sft" / f"checkpoint-{STEPS}" / "rng_state_1.pth").exists()  # rank 1 really trained
    assert not (two / ".lock").exists()


@pytest.mark.slow
@pytest.mark.extended
def test_a_killed_machine_ends_the_other_with_one_line_and_the_rerun_resumes(tmp_path, machines, two_machine_sft):
    run_dir = tmp_path / "run"
    procs = machines.two(run_dir, ["sft", *TINY], tmp_path, "killed")
    deadline = time.monotonic() + 600
    while not list((run_dir / "sft").glob("checkpoint-*/trainer_state.json")):  # a checkpoint: kill mid-run
        assert time.monotonic() < deadline and procs[0].poll() is None, (tmp_path / "killed-machine0.log").read_text()[-3000:]
        time.sleep(0.05)
    machines.kill(procs[1])  # machine rank 1 and everything it started, at once
    t_kill = time.monotonic()
    code = procs[0].wait(timeout=150)
    waited = time.monotonic() - t_kill
    log0 = (tmp_path / "killed-machine0.log").read_text()
    finished = (run_dir / "sft" / "manifest.json").exists()
    print(f"machine rank 1 killed: machine rank 0 exited {code} after {waited:.1f}s; "
          f"its last line: {log0.strip().splitlines()[-1]}")
    # The kill lands within 50 ms of the first checkpoint, with STEPS - 2 steps still to train.
    assert not finished and code != 0 and waited < 120
    last = log0.strip().splitlines()[-1]
    assert last.startswith("mistral-tune sft: error: sft (machine rank 0 of 2): lost rank 1 (machine rank 1)"), last
    # The same commands again: resume from the last checkpoint, end on the uninterrupted weights.
    codes = _wait_all(machines.two(run_dir, ["sft", *TINY], tmp_path, "rerun"), 600)
    assert codes == [0, 0], (tmp_path / "rerun-machine0.log").read_text()[-3000:]
    rerun = (tmp_path / "rerun-machine0.log").read_text()
    assert "resuming from" in rerun
    diff = _max_diff(_weights(run_dir / "sft"), _weights(two_machine_sft["two"] / "sft"))
    print(f"resumed vs uninterrupted two-machine run: max |weight difference| {diff:.3g}")
    assert diff == 0.0


@pytest.mark.slow
@pytest.mark.extended
def test_losing_machine_rank_0_ends_the_other_with_one_line_and_the_rerun_resumes(tmp_path, machines, two_machine_sft):
    """Machine rank 0 holds the rendezvous store, the lock and the writes: when it dies, machine
    rank 1 can no longer read the heartbeats and says the rendezvous host is gone."""
    run_dir = tmp_path / "run"
    procs = machines.two(run_dir, ["sft", *TINY], tmp_path, "lost0")
    deadline = time.monotonic() + 600
    while not list((run_dir / "sft").glob("checkpoint-*/trainer_state.json")):
        assert time.monotonic() < deadline and procs[1].poll() is None, (tmp_path / "lost0-machine1.log").read_text()[-3000:]
        time.sleep(0.05)
    machines.kill(procs[0])
    t_kill = time.monotonic()
    code = procs[1].wait(timeout=150)
    waited = time.monotonic() - t_kill
    log1 = (tmp_path / "lost0-machine1.log").read_text()
    errors = [line for line in log1.splitlines() if line.startswith("mistral-tune sft: error:")]
    print(f"machine rank 0 killed: machine rank 1 exited {code} after {waited:.1f}s; its error: {errors}")
    assert code != 0 and waited < 120 and not (run_dir / "sft" / "manifest.json").exists()
    assert errors and "lost rank 0 (machine rank 0" in errors[-1], log1[-3000:]
    # The dead machine's lock is stale (its pid is gone): the same commands again resume. Machine
    # rank 1 starts first and finds the dead job's lock (another port): it waits for this job's
    # rank 0 to take it over rather than refusing the run_dir as busy (CI once lost that race).
    codes = _wait_all(machines.two(run_dir, ["sft", *TINY], tmp_path, "rerun0", rank_1_first=True), 600)
    assert codes == [0, 0], (tmp_path / "rerun0-machine0.log").read_text()[-3000:] + (tmp_path / "rerun0-machine1.log").read_text()[-3000:]
    assert "no longer running); waiting up to 120s for machine rank 0 of this job" in (tmp_path / "rerun0-machine1.log").read_text()
    assert "resuming from" in (tmp_path / "rerun0-machine0.log").read_text()
    diff = _max_diff(_weights(run_dir / "sft"), _weights(two_machine_sft["two"] / "sft"))
    print(f"resumed vs uninterrupted two-machine run: max |weight difference| {diff:.3g}")
    assert diff == 0.0


@pytest.mark.slow
@pytest.mark.extended
def test_deepspeed_zero3_across_two_machines(tmp_path, machines, two_machine_sft):
    codes = _wait_all(machines.two(tmp_path / "run", ["sft", *TINY], tmp_path, "zero3", launcher="zero3"), 600)
    assert codes == [0, 0], (tmp_path / "zero3-machine0.log").read_text()[-3000:] + (tmp_path / "zero3-machine1.log").read_text()[-2000:]
    metrics = json.loads((tmp_path / "run" / "sft" / "metrics.json").read_text())
    assert metrics["num_machines"] == 2 and metrics["world_size"] == 2
    diff = _max_diff(_weights(tmp_path / "run" / "sft"), _weights(two_machine_sft["two"] / "sft"))
    print(f"ZeRO-3 on two machines vs DDP on two machines: max |weight difference| {diff:.3g}")
    assert diff <= 1e-5
