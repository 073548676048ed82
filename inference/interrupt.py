"""Stop a training loop cleanly on a signal: the loop checkpoints at its next step boundary, then raises
:class:`Interrupted`, which the command line turns into one line and the conventional exit status
(130 for SIGINT, 143 for SIGTERM, 128 + n otherwise).

Batch systems end a job with a signal: SLURM and submitit send SIGTERM at the time limit, and submitit's
requeue signal (SIGUSR2 unless ``SUBMITIT_PREEMPT_SIGNAL`` names another; SIGUSR1 on some clusters) before it.
A handler that only records the signal lets the step finish, so the checkpoint is consistent; a handler that was
installed before (submitit's, which requeues the job) is called after the checkpoint is written, so requeueing
still works and the requeued job resumes from that checkpoint (``resume="auto"``).

A job watches for its whole length (a signal during data preparation stops the job at the first step
boundary); an engine's loop watches too, so it also stops cleanly when called outside a job. Only the main thread
can install signal handlers; elsewhere :func:`watch_signals` installs nothing and a loop runs as before.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Callable, Iterator

__all__ = ["Interrupted", "watch_signals", "requested_signal", "stop_if_signalled", "exit_status", "WATCHED_SIGNALS"]

log = logging.getLogger(__name__)


def _requeue_signals() -> list[int]:
    names = {"SIGUSR1", "SIGUSR2", "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2").upper().removeprefix("SIG")}
    return [getattr(signal, n) for n in sorted(names) if hasattr(signal, n)]


WATCHED_SIGNALS: tuple[int, ...] = tuple(dict.fromkeys([signal.SIGINT, signal.SIGTERM, *_requeue_signals()]))


class Interrupted(Exception):
    """A training loop stopped on ``signum`` at ``step``; its state is in ``checkpoint`` (None: none was kept)."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None, unit: str = "step"):
        self.signum = int(signum)
        self.step = int(step)
        self.checkpoint = checkpoint
        name = signal.Signals(self.signum).name
        where = f"checkpoint saved to {checkpoint}" if checkpoint else "no checkpoint (no work directory)"
        super().__init__(f"{name} at {unit} {step}: {where}")

    @property
    def exit_status(self) -> int:
        return exit_status(self.signum)


def exit_status(signum: int) -> int:
    """The shell's status for a process ended by ``signum``: 128 + its number (130 SIGINT, 143 SIGTERM)."""
    return 128 + int(signum)


_state = threading.local()


def requested_signal() -> int | None:
    """The first signal received inside :func:`watch_signals`, or None."""
    stack = getattr(_state, "stack", None)
    return stack[0]["signum"] if stack else None


def stop_if_signalled(step: int, checkpoint: Path | None = None, save: Callable[[], None] | None = None,
                      unit: str = "step") -> None:
    """At a loop's step boundary: if a watched signal came, ``save()`` the checkpoint (when given), hand over to the
    handler installed before (submitit's requeue), and raise :class:`Interrupted`; otherwise nothing."""
    signum = requested_signal()
    if signum is None:
        return
    if save is not None:
        save()
    stack = getattr(_state, "stack", None)
    if stack:
        stack[0]["chain"]()
    raise Interrupted(signum, step, checkpoint if checkpoint is not None and checkpoint.exists() else None, unit=unit)


@contextlib.contextmanager
def watch_signals() -> Iterator[Callable[[], None]]:
    """Record SIGINT, SIGTERM and the requeue signals instead of dying on them; restore the handlers on exit.

    Yields ``chain()``: call it after the checkpoint is written, to run the handler that was installed before
    (e.g. submitit's requeue) for the signal received. A second SIGINT while a step is still running raises
    ``KeyboardInterrupt`` at once, as a user pressing Ctrl-C twice expects.
    """
    if threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return
    if getattr(_state, "stack", None):  # already watched (a job around an engine's loop): the outer handlers stand
        yield _state.stack[0]["chain"]
        return
    frame = {"signum": None}
    previous: dict[int, object] = {}

    def record(signum, _frame):
        if frame["signum"] == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if frame["signum"] is None:
            frame["signum"] = signum
            log.warning("%s received: stopping at the next step boundary with a checkpoint (a second Ctrl-C "
                        "stops at once)", signal.Signals(signum).name)

    for signum in WATCHED_SIGNALS:
        try:
            previous[signum] = signal.signal(signum, record)
        except (ValueError, OSError):  # not settable on this platform
            continue

    def chain() -> None:
        signum = frame["signum"]
        handler = previous.get(signum)
        if callable(handler) and getattr(handler, "__module__", "").startswith("submitit"):
            handler(signum, None)  # submitit requeues the job and exits

    frame["chain"] = chain
    _state.stack = [frame]
    try:
        yield chain
    finally:
        _state.stack = []
        for signum, handler in previous.items():
            signal.signal(signum, handler)
