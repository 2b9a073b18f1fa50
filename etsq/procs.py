"""Processes and files on this machine: the one home of what the embedded broker, `etsq servers`, the
local worker and the result writers share.

- ports: whether one is free to bind, and a free one;
- child processes: start one with its output in a log, signal a pid or a process group, stop a child
  (SIGTERM, then SIGKILL after a timeout), follow a process and the session it leads through /proc;
- a file lock (an exclusive `flock`) with a timeout;
- atomic writes: a file is written beside its target and renamed into place, so a reader never sees
  a half-written file and a failed write leaves the old one (or none);
- the last line of a log, for the one-line error of a server that would not start;
- this process's heap: glibc's malloc asked to keep freed memory for reuse (`keep_freed_memory`).

Nothing here knows etsq's errors beyond `LockBusy`: callers turn an `OSError` into their own message.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

POLL_S = 0.05
LOG_LINE_CHARS = 300


# --------------------------------------------------------------------------- ports


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could bind `host:port` now (raises socket.gaierror for an unknown host).

    SO_REUSEADDR as servers bind: a port whose old connections linger in TIME_WAIT is free to them.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0" if host in ("", "::") else host, port))
        except socket.gaierror:
            raise
        except OSError:
            return False
    return True


def free_local_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --------------------------------------------------------------------------- child processes


def spawn(
    argv: Sequence[str],
    log: Path,
    env: Mapping[str, str] | None = None,
    *,
    new_session: bool = False,
    keep_previous_log: bool = False,
) -> subprocess.Popen[bytes]:
    """Start `argv` with stdout and stderr in `log` (appended to, or, with `keep_previous_log`, the
    previous log moved to `log.1` first); `new_session`: it outlives this process's terminal and
    can be stopped as a process group.  Raises OSError when the program cannot run."""
    log.parent.mkdir(parents=True, exist_ok=True)
    if keep_previous_log and log.exists():
        log.replace(log.with_name(log.name + ".1"))
    with open(log, "wb" if keep_previous_log else "ab") as out:
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=new_session,
            env=None if env is None else dict(env),
        )


def send_signal(pid: int, sig: signal.Signals, group: bool = False) -> None:
    """Signal a process (or the process group it leads); one already gone or not ours is skipped."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


def wait_until(done: Callable[[], bool], timeout: float, poll: float = POLL_S) -> bool:
    """Poll `done` until it holds or `timeout` seconds pass; whether it held."""
    deadline = time.monotonic() + timeout
    while True:
        if done():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll)


def terminate(pid: int, running: Callable[[int], bool], timeout: float, kill_timeout: float = 2.0) -> bool:
    """SIGTERM `pid`, SIGKILL it if `running(pid)` still holds after `timeout`; whether it is gone."""
    send_signal(pid, signal.SIGTERM)
    return kill_after(pid, running, timeout, kill_timeout)


def kill_after(pid: int, running: Callable[[int], bool], timeout: float, kill_timeout: float = 2.0) -> bool:
    """Wait up to `timeout` for a process asked to stop, then SIGKILL it; whether it is gone."""
    if wait_until(lambda: not running(pid), timeout):
        return True
    send_signal(pid, signal.SIGKILL)
    return wait_until(lambda: not running(pid), kill_timeout)


def stop_child(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Stop and reap a child: SIGTERM (a warm shutdown), SIGKILL if it has not exited in `timeout`."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command name: state, ppid, pgrp, session, ... (Linux)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _has_procfs() -> bool:
    return Path("/proc/self/stat").exists()


def proc_start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks, which tells a reused pid from ours."""
    fields = _stat(pid)
    return None if fields is None else int(fields[19])


def pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def alive(pid: int, start_ticks: int | None) -> bool:
    """Whether the recorded process still runs (a zombie or a reused pid does not count)."""
    if not _has_procfs():  # ask the kernel whether the pid exists
        return pid_exists(pid)
    fields = _stat(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return False
    return start_ticks is None or int(fields[19]) == start_ticks


def session_members(pid: int, start_ticks: int | None) -> list[int]:
    """The live processes of the session `pid` leads (it and what it spawned), started no earlier
    than it, so a reused session id is not mistaken for it."""
    if not _has_procfs():
        return [pid] if pid_exists(pid) else []
    members = []
    for entry in Path("/proc").iterdir():
        fields = _stat(int(entry.name)) if entry.name.isdigit() else None
        if fields is None or fields[0] in ("Z", "X") or int(fields[3]) != pid:
            continue
        if start_ticks is None or int(fields[19]) >= start_ticks:
            members.append(int(entry.name))
    return members


def end_session(pid: int, start_ticks: int | None, grace_s: float, poll: float = 0.125) -> None:
    """Wait up to `grace_s` for the session `pid` leads to exit, then SIGKILL what is left of it."""
    wait_until(lambda: not session_members(pid, start_ticks), grace_s, poll)
    for member in session_members(pid, start_ticks):
        send_signal(member, signal.SIGKILL)
    wait_until(lambda: not session_members(pid, start_ticks), 5, poll)


def stop_session(pid: int, start_ticks: int | None, timeout_s: float) -> None:
    """SIGTERM the process group `pid` leads, then SIGKILL whatever of its session is left after
    `timeout_s` (a leader that exits may leave its children behind, holding GPU memory)."""
    leader = alive(pid, start_ticks)
    if leader:
        send_signal(pid, signal.SIGTERM, group=True)
    # What a dead leader left behind has nobody to shut it down in order: no point waiting.
    end_session(pid, start_ticks, timeout_s if leader else 0)


def last_log_line(path: Path | str, missing: str = "(no log)", empty: str = "(no output)") -> str:
    """The last non-blank line of a log (shortened to LOG_LINE_CHARS), else `missing` or `empty`."""
    try:
        lines = [line.strip() for line in Path(path).read_text(errors="replace").splitlines()]
    except OSError:
        return missing
    text = next((line for line in reversed(lines) if line), empty)
    return text if len(text) <= LOG_LINE_CHARS else text[: LOG_LINE_CHARS - 3] + "..."


# --------------------------------------------------------------------------- locks


class LockBusy(Exception):
    """Another process holds the lock (past the timeout)."""


@contextlib.contextmanager
def file_lock(path: Path, timeout: float = 0.0, poll: float = POLL_S) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created if missing); LockBusy after `timeout` seconds."""
    with open(path, "a+b") as handle:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() >= deadline:
                    raise LockBusy(f"timed out after {timeout:.0f} s waiting for lock {path}") from exc
                time.sleep(poll)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


# --------------------------------------------------------------------------- atomic writes


def is_special(path: Path) -> bool:
    """Whether `path` exists and is not a regular file (`/dev/stdout`, a named pipe)."""
    try:
        return not stat.S_ISREG(path.stat().st_mode)
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def atomic_file(path: Path, binary: bool = False, fsync: bool = False) -> Iterator[IO[Any]]:
    """A file open for writing that replaces `path` when the block ends without error.

    It is written as a hidden sibling and renamed over `path`; on any error the sibling is removed and
    `path` is as it was.  A `path` that exists and is not a regular file is written in place: renaming
    over it would replace a device node with a file.  `fsync`: on disk before the rename.
    """
    mode, encoding = ("wb", None) if binary else ("w", "utf-8")
    if is_special(path):
        with open(path, mode, encoding=encoding) as handle:
            yield handle
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, mode, encoding=encoding) as handle:
            yield handle
            handle.flush()
            if fsync:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str | Iterable[str], fsync: bool = False) -> None:
    """Write `text` (a string, or lines) to `path` atomically (see `atomic_file`)."""
    with atomic_file(path, fsync=fsync) as handle:
        if isinstance(text, str):
            handle.write(text)
        else:
            handle.writelines(text)


def atomic_write_json(path: Path, data: Any, fsync: bool = False) -> None:
    """Write `data` as indented JSON with a final newline to `path` atomically."""
    atomic_write_text(path, json.dumps(data, indent=2) + "\n", fsync=fsync)


# --------------------------------------------------------------------------- the heap

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
TRIM_THRESHOLD = 256 << 20
MMAP_THRESHOLD = 32 << 20


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse; False where malloc is not glibc's.

    Each ETS select allocates and frees ~10 MB of arrays at W = 1024 (the embeddings, their unit
    rows, the Gram matrix, its mask). With glibc's defaults the freed top of the heap goes back to
    the kernel and the next select faults it in again page by page: ~1,900 minor faults per select,
    6 of its 26 ms on this VM (3.5 us a fault). With a trim threshold of 256 MiB and arrays up to
    32 MiB taken from the heap instead of mappings of their own, the pages stay mapped and are
    reused (0 faults; `bench/select_bench.py`). The cost: a worker may hold up to 256 MiB it no
    longer uses. `etsq worker` calls it at start.
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)) and bool(
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    )
