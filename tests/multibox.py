"""Boxes for the multi-box scenario: network namespaces on one bridge, and the store box's Postgres
and Redis bound to its veth address with passwords.  Root only (ip netns); every namespace and link
made here is removed on exit, even after a failure."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import redis

from etsq.queue.broker import redis_server_binary
from tests.services import _cluster_base, _template, postgres_bindir, postgres_os_user

START_S = 30.0
STORE_MAC = "02:00:0a:c8:00:01"  # the store's bridge (locally administered)


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=check, timeout=60)


def can_make_namespaces() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None and shutil.which("setpriv") is not None


@dataclass
class Net:
    """Namespaces `<tag>-store`, `-box1`, `-box2`, `-laptop` on a bridge in the store's namespace;
    this process reaches it too, over its own veth (for the test's checks)."""

    tag: str
    subnet: str  # "10.200.N"
    boxes: tuple[str, ...] = ("box1", "box2", "laptop")
    made: list[str] = field(default_factory=list)

    def ns(self, role: str) -> str:
        return f"{self.tag}-{role}"

    def addr(self, role: str) -> str:
        return f"{self.subnet}.{ {'store': 1, 'box1': 11, 'box2': 12, 'laptop': 13, 'host': 99}[role] }"

    def peer(self, role: str) -> str:
        return f"{self.tag[-6:]}b{role[-1] if role != 'laptop' else 'l'}"  # the bridge's end, in store

    def up(self) -> None:
        store = self.ns("store")
        sh("ip", "netns", "add", store)
        self.made.append(store)
        sh("ip", "-n", store, "link", "set", "lo", "up")
        sh("ip", "-n", store, "link", "add", "br0", "type", "bridge")
        # A fixed address: a bridge takes its lowest port's otherwise, which the boxes' entries below
        # would have to follow.
        sh("ip", "-n", store, "link", "set", "br0", "address", STORE_MAC)
        sh("ip", "-n", store, "addr", "add", f"{self.addr('store')}/24", "dev", "br0")
        sh("ip", "-n", store, "link", "set", "br0", "up")
        for role in (*self.boxes, "host"):
            inner, outer = f"{self.tag[-6:]}i{role[:2]}{role[-1]}", self.peer(role)
            if role != "host":
                sh("ip", "netns", "add", self.ns(role))
                self.made.append(self.ns(role))
                sh("ip", "-n", self.ns(role), "link", "set", "lo", "up")
            sh("ip", "link", "add", inner, "type", "veth", "peer", "name", outer)
            if role == "host":
                self.host_link = inner
            else:
                sh("ip", "link", "set", inner, "netns", self.ns(role))
            sh("ip", "link", "set", outer, "netns", store)
            sh("ip", "-n", store, "link", "set", outer, "master", "br0", "up")
            where = [] if role == "host" else ["-n", self.ns(role)]
            sh("ip", *where, "addr", "add", f"{self.addr(role)}/24", "dev", inner)
            sh("ip", *where, "link", "set", inner, "up")
            # The store's address resolved for good: a link taken down (`link`) then drops packets,
            # as a partition does, instead of the kernel flushing the box's ARP entry at carrier loss
            # and refusing new connections with EHOSTUNREACH (which made box2 hand its jobs back
            # during the partition, or not, by which of its connections happened to be pooled).
            sh("ip", *where, "neigh", "replace", self.addr("store"), "lladdr", STORE_MAC, "dev", inner,
               "nud", "permanent")  # fmt: skip

    def link(self, role: str, up: bool) -> None:
        """Take a box's link down (its end on the bridge) or bring it back."""
        sh("ip", "-n", self.ns("store"), "link", "set", self.peer(role), "up" if up else "down")

    def down(self) -> None:
        if getattr(self, "host_link", None):
            sh("ip", "link", "del", self.host_link, check=False)
        for ns in reversed(self.made):
            sh("ip", "netns", "del", ns, check=False)
        self.made.clear()


@contextlib.contextmanager
def network(tag: str) -> Iterator[Net]:
    used = sh("ip", "-4", "route").stdout
    n = next(n for n in range(20 + os.getpid() % 150, 250) if f"10.200.{n}." not in used)
    net = Net(tag, f"10.200.{n}")
    try:
        net.up()
        yield net
    finally:
        net.down()


class StorePostgres:
    """Postgres in the store namespace on `addr`:5432, password (scram) login, run with pg_ctl."""

    def __init__(self, net: Net, password: str, log_dir: Path) -> None:
        self.net, self.password = net, password
        self.user = postgres_os_user()
        self.bindir = postgres_bindir()
        self.root = _cluster_base() / f"etsq-pg-multibox-{os.getpid()}"
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"  # the postgres account cannot write pytest's tmp dirs
        self.log_copy = log_dir / "postgres.log"

    def _as_pg(
        self, *argv: str, stdin: str | None = None, ns: bool = True
    ) -> subprocess.CompletedProcess[str]:
        prefix = ["ip", "netns", "exec", self.net.ns("store")] if ns else []
        if self.user is not None:
            prefix += [
                "setpriv",
                f"--reuid={self.user.uid}",
                f"--regid={self.user.gid}",
                "--clear-groups",
                "--",
            ]
        return subprocess.run(
            [*prefix, *argv], input=stdin, capture_output=True, text=True, check=True, timeout=60,
            env={k: v for k, v in os.environ.items() if not k.startswith("PG")} | {"LC_ALL": "C"},
        )  # fmt: skip

    def start(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(mode=0o700)
        if self.user is not None:
            os.chown(self.root, self.user.uid, self.user.gid)
        self._as_pg("cp", "-a", str(_template(self.bindir, self.user)), str(self.data), ns=False)
        sql = f"ALTER ROLE etsq PASSWORD '{self.password}';\nCREATE DATABASE etsq;\n"
        self._as_pg(str(self.bindir / "postgres"), "--single", "-D", str(self.data), "postgres", stdin=sql)
        hba = f"host all all {self.net.subnet}.0/24 scram-sha-256\n"
        self._as_pg("sh", "-c", f"printf '{hba}' > {self.data}/pg_hba.conf", ns=False)
        opts = (
            f"-c listen_addresses={self.net.addr('store')} -p 5432 -c unix_socket_directories='' "
            "-c fsync=off -c full_page_writes=off -c idle_in_transaction_session_timeout=10s"
        )
        self._as_pg(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w",
                    "-t", "30", "-o", opts, "start")  # fmt: skip

    def restart_immediate(self) -> None:
        self._as_pg(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w",
                    "-t", "30", "-m", "immediate", "restart")  # fmt: skip

    def stop(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            self._as_pg(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop")
        with contextlib.suppress(OSError):
            shutil.copy(self.log, self.log_copy)
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, password: str | None = None) -> str:
        pw = self.password if password is None else password
        return f"postgresql+psycopg://etsq:{pw}@{self.net.addr('store')}:5432/etsq"

    def connect(self) -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(host=self.net.addr("store"), port=5432, user="etsq", password=self.password,
                               dbname="etsq", connect_timeout=3, autocommit=True)  # fmt: skip


class StoreRedis:
    """Redis in the store namespace on `addr`:6379, `requirepass` from its config file (not argv),
    append-only with fsync at every write, so a kill -9 loses no message."""

    def __init__(self, net: Net, password: str, directory: Path) -> None:
        self.net, self.password, self.dir = net, password, directory
        self.proc: subprocess.Popen[bytes] | None = None
        directory.mkdir(parents=True, exist_ok=True)
        self.conf = directory / "redis.conf"
        self.conf.write_text(
            f"bind {net.addr('store')}\nport 6379\nrequirepass {password}\nappendonly yes\n"
            f'appendfsync always\nsave ""\ndir {directory}\nlogfile {directory}/redis.log\n'
        )
        self.conf.chmod(0o600)

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.net.ns("store"), redis_server_binary(), str(self.conf)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.RedisError, OSError):
                if self.client().ping():
                    return
            time.sleep(0.1)
        raise RuntimeError("store redis did not start")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def url(self, password: str | None = None) -> str:
        pw = self.password if password is None else password
        return f"redis://:{pw}@{self.net.addr('store')}:6379/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host=self.net.addr("store"), port=6379, password=self.password,
                           socket_timeout=2, socket_connect_timeout=2)  # fmt: skip
