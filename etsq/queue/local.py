"""A local worker: a real Celery worker in a child process, for `submit --wait` on the embedded default."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from etsq import procs
from etsq.settings import Settings


def worker_env(settings: Settings, broker: str) -> dict[str, str]:
    """This process's environment with the settings of this command, so the child sees the same."""
    return settings.with_(broker_url=broker).child_env(os.environ)


def start_local_worker(settings: Settings, broker: str, log_path: Path) -> subprocess.Popen[bytes]:
    """A real Celery worker in a child process, logging to `log_path`."""
    cmd = [sys.executable, "-m", "cli", "worker", "--loglevel", "INFO"]
    return procs.spawn(cmd, log_path, worker_env(settings, broker))


def stop_local_worker(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """Warm shutdown (SIGTERM lets the current task finish), then kill if it hangs."""
    procs.stop_child(proc, timeout)
