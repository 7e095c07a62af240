"""Epoch lines on the driver's console while Ray Train runs elsewhere.

Train V2 runs callbacks in a controller actor, not in the driver: their prints would reach
the terminal only with Ray's log forwarding (and everything else Ray forwards) on. A mailbox
actor carries each report's metrics to a thread in the driver instead, also under
``ray job submit``.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

import ray
import ray.train
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from t2i import console


@ray.remote(num_cpus=0)
class EpochMailbox:
    """Messages from the Train controller to the driver. The driver long-polls
    :meth:`take`: one call per message or per ``wait_s`` of quiet, so the job's dashboard
    page does not fill with polling tasks (and no timed-out ``Queue.get`` shows as failed)."""

    def __init__(self):
        self.messages: list[dict] = []
        self.arrived = asyncio.Event()

    async def put(self, message: dict) -> None:
        self.messages.append(message)
        self.arrived.set()

    async def take(self, wait_s: float) -> list[dict]:
        """Every message waiting, after up to ``wait_s`` for the first (``[]`` if none came)."""
        if not self.messages:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.arrived.wait(), wait_s)
        taken, self.messages = self.messages, []
        self.arrived.clear()
        return taken

    async def wake(self) -> None:
        """End a waiting :meth:`take` now (the run is over)."""
        self.arrived.set()


class EpochRelay(ray.train.UserCallback):
    """On the Train controller: hand rank 0's metrics of every report to the driver."""

    def __init__(self, mailbox):
        self.mailbox = mailbox

    def _send(self, message: dict) -> None:
        if self.mailbox is None:
            return
        try:
            ray.get(self.mailbox.put.remote(message), timeout=10)
        except Exception:  # noqa: BLE001 - the console must never fail a training run
            self.mailbox = None

    def after_report(self, run_context, metrics, checkpoint):
        if metrics:
            self._send(metrics[0])

    def after_exception(self, run_context, worker_exceptions):
        self._send({"failure": {rank: (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
                                for rank, exc in worker_exceptions.items()}})


@contextlib.contextmanager
def following(epochs: int, printer=print):
    """Yield an :class:`EpochRelay` to pass in ``RunConfig(callbacks=...)``; print one
    :func:`console.epoch_line` per report (and a line per worker failure) it relays until
    the block ends."""
    # On the driver's node: a mailbox on a worker node would die with that node.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    mailbox = EpochMailbox.options(scheduling_strategy=here).remote()
    stop = threading.Event()
    said: set[str] = set()
    printing = threading.Lock()  # the thread and the final drain below

    def show(messages: list[dict]) -> None:
        with printing:
            for message in messages:
                line = (console.failure_line(message["failure"]) if "failure" in message
                        else console.epoch_line(message, epochs))
                if line not in said:  # the controller may report one failure at several polls
                    printer(line, flush=True)
                    said.add(line)

    def loop() -> None:
        while not stop.is_set():
            try:
                show(ray.get(mailbox.take.remote(2.0)))
            except Exception:  # noqa: BLE001 - the mailbox is gone: the run is over
                return

    thread = threading.Thread(target=loop, name="t2i-epoch-lines", daemon=True)
    thread.start()
    try:
        yield EpochRelay(mailbox)
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            ray.get(mailbox.wake.remote(), timeout=5)
        thread.join(timeout=5)
        with contextlib.suppress(Exception):
            show(ray.get(mailbox.take.remote(0.0)))  # the last epoch's line, if the thread had not shown it
            ray.kill(mailbox)
