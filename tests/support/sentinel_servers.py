"""A Redis Sentinel group of real processes on loopback ports, for integration tests (no pytest import
here): a primary, a replica (`--replicaof`) and three sentinels (quorum 2) with short timeouts, so a
primary killed with SIGKILL is replaced by the replica within a few seconds (Redis docs "High
availability with Redis Sentinel": down-after-milliseconds, failover-timeout).

The sentinels run as `redis-sentinel <config>` where Debian's redis-sentinel package is installed,
else as `redis-server <config> --sentinel` (the same program, documented by Redis as the other way to
start one).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import redis

from tests.support.redis_server import free_port

MASTER = "spinewatch"
QUORUM = 2
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 5000
NOT_INSTALLED = "Redis Sentinel is not installed (apt-get install redis-sentinel, or redis-server)"


def sentinel_command() -> list[str] | None:
    """How to start a sentinel here, or None when neither program is installed."""
    if binary := shutil.which("redis-sentinel"):
        return [binary]
    if binary := shutil.which("redis-server"):
        return [binary]  # with --sentinel after the config file
    return None


class SentinelGroup:
    """Primary + replica + 3 sentinels. `url` is the SPINEWATCH_REDIS_URL that names the group."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="spinewatch-sentinel-"))
        self.primary_port, self.replica_port = free_port(), free_port()
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.procs: dict[str, subprocess.Popen] = {}

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{MASTER}/0"

    def start(self) -> "SentinelGroup":
        self._server("primary", self.primary_port)
        self._server("replica", self.replica_port, "--replicaof", "127.0.0.1", str(self.primary_port))
        for i, port in enumerate(self.sentinel_ports):
            self._sentinel(f"sentinel-{i}", port)
        self._wait(self._settled, 30, "the sentinels to see the replica and each other")
        return self

    # ---- faults and observations

    def kill_primary(self) -> int:
        """SIGKILL the current primary (no shutdown, no last replication): returns its port."""
        port = self.master_port()
        name = "primary" if port == self.primary_port else "replica"
        proc = self.procs.pop(name)
        proc.kill()
        proc.wait(5)
        return port

    def master_port(self) -> int | None:
        """The primary's port as the first sentinel that answers reports it."""
        for port in self.sentinel_ports:
            try:
                address = self._ask(port, "SENTINEL", "get-master-addr-by-name", MASTER)
            except redis.RedisError:
                continue
            if address:
                return int(address[1])
        return None

    def role(self, port: int) -> str | None:
        try:
            return self._ask(port, "ROLE")[0].decode()
        except redis.RedisError:
            return None

    # ---- plumbing

    def _server(self, name: str, port: int, *extra: str) -> None:
        data = self.dir / name
        data.mkdir()
        self.procs[name] = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data), "--appendonly", "yes",
             "--appendfsync", "always", "--save", "", "--maxmemory-policy", "noeviction", "--protected-mode", "no",
             *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._wait(lambda: self._ask(port, "PING"), 10, f"redis-server {name} on port {port}")

    def _sentinel(self, name: str, port: int) -> None:
        config = self.dir / f"{name}.conf"  # a sentinel rewrites its own config file: a file of its own
        config.write_text(f"port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {self.dir}\n"
                          f"sentinel monitor {MASTER} 127.0.0.1 {self.primary_port} {QUORUM}\n"
                          f"sentinel down-after-milliseconds {MASTER} {DOWN_AFTER_MS}\n"
                          f"sentinel failover-timeout {MASTER} {FAILOVER_TIMEOUT_MS}\n"
                          f"sentinel parallel-syncs {MASTER} 1\n")
        command = sentinel_command()
        if command is None:
            raise RuntimeError("neither redis-sentinel nor redis-server is installed")
        args = [*command, str(config)] + (["--sentinel"] if command[0].endswith("redis-server") else [])
        self.procs[name] = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._wait(lambda: self._ask(port, "PING"), 10, f"sentinel {name} on port {port}")

    def _settled(self) -> bool:
        for port in self.sentinel_ports:
            master = self._ask(port, "SENTINEL", "master", MASTER)
            if int(master[b"num-slaves"]) < 1 or int(master[b"num-other-sentinels"]) < 2:
                return False
        role = self._ask(self.replica_port, "ROLE")
        return role[0] == b"slave" and role[3] == b"connected"

    @staticmethod
    def _ask(port: int, *command: str):
        client = redis.Redis(port=port, socket_timeout=1, socket_connect_timeout=1)
        try:
            return client.execute_command(*command)
        finally:
            client.close()

    @staticmethod
    def _wait(predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if predicate():
                    return
            except redis.RedisError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self.procs.clear()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "SentinelGroup":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


@pytest.fixture(scope="module")
def group():
    """A running Sentinel group for a test module; skipped, saying why, where Sentinel is not installed."""
    if sentinel_command() is None:
        pytest.skip(NOT_INSTALLED)
    with SentinelGroup() as g:
        yield g
