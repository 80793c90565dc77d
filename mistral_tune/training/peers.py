"""Which rank was lost, when a collective fails in the middle of training.

When a machine dies, the survivors see only their backend's error: gloo's "Connection closed by
peer [10.0.0.2]:port" or NCCL's watchdog timeout, neither naming a rank. So while a stage trains,
every rank bumps a counter of its own in torch.distributed's rendezvous store (the TCPStore that
torchrun's agent on machine rank 0 serves at MASTER_ADDR:MASTER_PORT, through a client of our own
so the process group's is never shared across threads) once a second. When training fails, the
survivor reads the counters twice, a few seconds apart: the ranks whose counters stood still are
the lost ones; a store that no longer answers means machine rank 0 itself is gone.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from datetime import timedelta

log = logging.getLogger("mistral_tune")

PREFIX = "mistral_tune/heartbeat/"


def machine_of(rank: int) -> int:
    """torchrun numbers ranks machine by machine: LOCAL_WORLD_SIZE consecutive ranks per machine."""
    return rank // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


class Heartbeat:
    """A context manager around training; `lost()` after a failure names the ranks that stopped."""

    def __init__(self, interval_s: float = 1.0):
        self.interval_s = interval_s
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.store = None
        self._stop = threading.Event()
        self._thread = None

    def _connect(self):
        import torch.distributed as dist

        return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                             timeout=timedelta(seconds=10))

    def __enter__(self) -> Heartbeat:
        if self.world <= 1 or "MASTER_ADDR" not in os.environ:
            return self
        try:
            self.store = self._connect()
            self.store.add(f"{PREFIX}{self.rank}", 1)
        except Exception as err:  # no store to beat in: failures are reported without a rank
            log.warning("rank %d: no heartbeat (%s); a lost rank will not be named", self.rank, err)
            self.store = None
            return self
        self._thread = threading.Thread(target=self._beat, name="mistral_tune-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.store.add(f"{PREFIX}{self.rank}", 1)
            except Exception:
                return  # the store is gone (machine rank 0 lost): lost() says so

    def __exit__(self, *exc) -> None:
        self._stop.set()

    def lost(self) -> str | None:
        """`lost rank R (machine rank M)` for the ranks that stopped beating, None if all still beat
        (the failure was something else) or nothing can be said."""
        if self.store is None:
            return None
        try:
            client = self._connect()  # a fresh connection: the thread's may be mid-request
            before = [client.add(f"{PREFIX}{r}", 0) for r in range(self.world)]
            time.sleep(4 * self.interval_s)
            after = [client.add(f"{PREFIX}{r}", 0) for r in range(self.world)]
        except Exception:
            # The store is served on machine rank 0 (torchrun's agent): it no longer answers.
            return None if self.rank == 0 else f"lost rank 0 (machine rank 0, the rendezvous host {os.environ['MASTER_ADDR']})"
        stopped = [r for r in range(self.world) if r != self.rank and after[r] == before[r]]
        if not stopped:
            return None
        machines = sorted({machine_of(r) for r in stopped})
        return (f"lost rank {', '.join(map(str, stopped))} (machine rank {', '.join(map(str, machines))}): "
                f"it stopped responding during training; rank {self.rank} stops too")
