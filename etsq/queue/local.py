"""A local worker: a real Celery worker in a child process, for `submit --wait` on the embedded default."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

from etsq import procs
from etsq.settings import Settings


def worker_env(settings: Settings, broker: str) -> dict[str, str]:
    """This process's environment with the settings of this command, so the child sees the same."""
    return settings.with_(broker_url=broker).child_env(os.environ)


def start_local_worker(
    settings: Settings, broker: str, log_path: Path, queue: str | None = None
) -> subprocess.Popen[bytes]:
    """A real Celery worker in a child process, logging to `log_path`, consuming `queue` (default:
    the settings' queue).  It shares the terminal's process group, so it stops with the command's
    terminal (a Ctrl-C is a warm shutdown for Celery too)."""
    cmd = [sys.executable, "-m", "cli", "worker", "--loglevel", "INFO"]
    if queue is not None:
        cmd += ["--queue", queue]
    return procs.spawn(cmd, log_path, worker_env(settings, broker))


def stop_local_worker(proc: subprocess.Popen[bytes], timeout: float = 30.0, kill: bool = True) -> None:
    """Warm shutdown (SIGTERM: the job in hand commits its depth and goes back to the queue), then
    kill if it hangs; with `kill` False, it is left to finish that depth on its own after `timeout`."""
    if kill:
        procs.stop_child(proc, timeout)
        return
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=timeout)
