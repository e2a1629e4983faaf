"""SpineWatch's own commands as real processes for the end-to-end tests: the console script as a
user runs it, started, waited for, and stopped with its whole process group."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from service.cli.demo.processes import stop_process_group

ROOT = Path(__file__).resolve().parents[2]
_SCRIPT = Path(sys.executable).parent / "spinewatch"
SPINEWATCH = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "service.cli"]


class Proc:
    """A started command; `ready()` is polled until true (40 s), else its log tail is the error."""

    def __init__(self, args: list[str], env: dict, log: Path, ready: Callable[[], bool], what: str):
        self.log = log
        self.proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + 40
        while not ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{what} did not start:\n" + log.read_text(errors="replace")[-3000:])
            time.sleep(0.1)

    def stop(self) -> None:
        stop_process_group(self.proc, timeout=15)  # SIGTERM (Celery's warm shutdown), then SIGKILL


def http_up(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
