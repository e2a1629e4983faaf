"""The demo's processes: each in a session of its own, stopped (SIGTERM, then SIGKILL) when the
demo ends, fails or is interrupted; redis-server, sekmet-fhir (the demo EHR), the API and a worker
on free local ports. tests/support uses the same plumbing."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

FHIR_JSON = "application/fhir+json"
HOST = "127.0.0.1"


class DemoError(RuntimeError):
    """A step failed; the message says what and, where it can, how to fix it."""


# ---------------- processes ----------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@dataclass
class Managed:
    name: str
    proc: subprocess.Popen
    log_path: Path

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


class Processes:
    """The processes the demo started, stopped in reverse order of starting."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.started: list[Managed] = []

    def start(self, name: str, cmd: list[str], env: dict[str, str], cwd: Path | None = None) -> Managed:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        managed = Managed(name, proc, log_path)
        self.started.append(managed)
        return managed

    def check_alive(self) -> None:
        for m in self.started:
            code = m.proc.poll()
            if code is not None:
                raise DemoError(f"{m.name} exited with code {code}; its log ({m.log_path}) ends:\n{m.log_tail()}")

    def stop_all(self, timeout: float = 10.0) -> None:
        for m in reversed(self.started):
            stop_process_group(m.proc, timeout)
        self.started.clear()


def stop_process_group(proc: subprocess.Popen, timeout: float) -> None:
    """SIGTERM to the process group (a Celery worker has children), then SIGKILL."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def wait_until(what: str, ready: Callable[[], Any], procs: Processes, timeout: float = 60.0,
               interval: float = 0.2) -> Any:
    """Poll `ready()` until it returns something truthy; fail early if a process died."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        procs.check_alive()
        try:
            value = ready()
            if value:
                return value
        except Exception as exc:  # not ready yet: keep the reason for the time-out message
            last = f" (last: {type(exc).__name__})"
        time.sleep(interval)
    raise DemoError(f"timed out after {timeout:.0f} s waiting for {what}{last}")


def http_ok(url: str) -> bool:
    return httpx.get(url, timeout=2.0).status_code == 200


# ---------------- redis-server ----------------

def find_or_install_redis(allow_install: bool, say: Callable[[str], None]) -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    how = "install it with: sudo apt-get install redis-server"
    can_install = os.name == "posix" and os.geteuid() == 0 and shutil.which("apt-get")
    if not allow_install:
        raise DemoError(f"redis-server is not installed; {how} (SPINEWATCH_DEMO_INSTALL=false forbids installing it)")
    if not can_install:
        raise DemoError(f"redis-server is not installed and the demo can install it only as root with apt-get; {how}")
    say("      redis-server is missing: installing it with apt-get (set SPINEWATCH_DEMO_INSTALL=false to forbid)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "redis-server"]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no message"])[-1]
            raise DemoError(f"`{' '.join(cmd)}` failed ({last}); {how}")
    # If the package's scripts start a system redis-server (port 6379), it is the system's: the demo
    # runs its own on a free port and leaves that one alone.
    found = shutil.which("redis-server")
    if not found:
        raise DemoError(f"apt-get installed redis-server but it is not on PATH; {how}")
    return found


def start_redis(procs: Processes, binary: str, run_dir: Path) -> str:
    port = free_port()
    data = run_dir / "redis"
    data.mkdir(parents=True, exist_ok=True)
    # The same durability settings as docker-compose.yml: the broker must not lose or evict tasks.
    procs.start("redis", [binary, "--port", str(port), "--bind", HOST, "--dir", str(data), "--appendonly", "yes",
                          "--save", "", "--maxmemory-policy", "noeviction", "--protected-mode", "no"], env=dict(os.environ))
    url = f"redis://{HOST}:{port}/0"

    def pong() -> bool:
        with socket.create_connection((HOST, port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    wait_until("redis-server to answer PING", pong, procs, timeout=20)
    return url


# ---------------- sekmet-fhir, the demo EHR ----------------

def start_sekmet(procs: Processes, run_dir: Path) -> str:
    """sekmet serves its FHIR base at /fhir; base_url in its settings file must match the port,
    since it writes that base into Location headers and notifications (docs/sekmet.md)."""
    if importlib.util.find_spec("sekmet") is None:
        raise DemoError("sekmet-fhir (the demo EHR) is not installed: run `bash scripts/bootstrap.sh` "
                        "or `.venv/bin/pip install sekmet-fhir`")
    port = free_port()
    home = run_dir / "sekmet"
    home.mkdir(parents=True, exist_ok=True)
    base = f"http://{HOST}:{port}/fhir"
    config = home / "settings.yaml"
    config.write_text(json.dumps({  # JSON is YAML
        "base_url": base, "host": HOST, "port": port, "data_dir": str(home / "data"),
        "server_auth": {"types": ["none"]}, "simulator": {"enabled": False}, "validation": {"inbound": "strict"},
        "own_private_key_path": str(home / "keys" / "sekmet_private.pem"),
        "facility_name": "SpineWatch demo EHR",
    }, indent=2))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEKMET_")}
    env.update(SEKMET_CONFIG=str(config), PYTHONUNBUFFERED="1")
    procs.start("sekmet-fhir", [sys.executable, "-m", "sekmet.cli", "serve", "--config", str(config),
                                "--host", HOST, "--port", str(port)], env=env, cwd=home)
    wait_until(f"the FHIR server at {base}/metadata", lambda: http_ok(f"{base}/metadata"), procs, timeout=60)
    return base


# ---------------- the SpineWatch API and worker ----------------

def spinewatch_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "service.cli", *args]


def start_api(procs: Processes, env: dict[str, str], port: int) -> str:
    base = f"http://{HOST}:{port}"
    procs.start("api", spinewatch_cmd("serve", "--host", HOST, "--port", str(port)), env=env)
    wait_until(f"the API at {base}/healthz", lambda: http_ok(f"{base}/healthz"), procs, timeout=60)
    wait_until(f"the API's dependencies ({base}/readyz)", lambda: http_ok(f"{base}/readyz"), procs, timeout=30)
    return base


def start_worker(procs: Processes, env: dict[str, str]) -> Managed:
    worker = procs.start("worker", spinewatch_cmd("worker", "--concurrency", "2"), env=env)
    # Celery logs "celery@host ready." once it consumes from the queue.
    wait_until("the worker to be ready", lambda: re.search(r"ready\.", worker.log_path.read_text(errors="replace")),
               procs, timeout=60)
    return worker
