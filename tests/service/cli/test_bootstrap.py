"""scripts/bootstrap.sh with a stand-in apt-get: the demo profile asks only for what the demo needs,
the default (the tests) for everything; apt-get waits for the dpkg lock and a failure says why; the
project is not installed again when nothing changed."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.paths import ROOT

TOOLS = ("bash", "python3", "sed", "sha256sum", "cut", "head", "cat", "ls", "id", "dirname")

pytestmark = pytest.mark.skipif(os.getuid() != 0 or not (ROOT / ".venv/bin/spinewatch").exists(),
                                reason="needs root (the script calls apt-get only as root) and a bootstrapped .venv")


def run(tmp_path: Path, *args: str, apt_exit: int = 0) -> tuple[subprocess.CompletedProcess, list[str]]:
    """bootstrap.sh with PATH holding only basic tools and a recording apt-get: no redis-server,
    chromium, postgres or docker-compose on it, so each profile asks for all it wants."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in TOOLS:
        if not (bin_dir / tool).exists():
            (bin_dir / tool).symlink_to(shutil.which(tool))
    calls = tmp_path / "apt-calls"
    calls.write_text("")
    apt = bin_dir / "apt-get"
    apt.write_text(f'#!/bin/bash\necho "$*" >> {calls}\nexit {apt_exit}\n')
    apt.chmod(0o755)
    proc = subprocess.run(["bash", "scripts/bootstrap.sh", *args], cwd=ROOT, capture_output=True, text=True,
                          env={"PATH": str(bin_dir), "HOME": str(tmp_path)}, timeout=600)
    return proc, calls.read_text().splitlines()


def test_the_demo_profile_installs_only_redis(tmp_path):
    proc, calls = run(tmp_path, "--demo")
    assert proc.returncode == 0, proc.stderr
    install = [c for c in calls if " install " in f" {c} "]
    assert len(install) == 1 and install[0].endswith("--no-install-recommends redis-server"), calls
    assert all("-o DPkg::Lock::Timeout=300" in c for c in calls), calls


def test_the_default_profile_installs_what_the_tests_need(tmp_path):
    proc, calls = run(tmp_path)
    assert proc.returncode == 0, proc.stderr
    [install] = [c for c in calls if " install " in f" {c} "]
    assert {"redis-server", "chromium", "docker-compose"} <= set(install.split()), install


def test_a_held_dpkg_lock_fails_with_a_clear_message(tmp_path):
    proc, _ = run(tmp_path, "--demo", apt_exit=100)
    assert proc.returncode == 1
    assert "another apt or dpkg process held the lock for more than 300 s" in proc.stderr


def test_an_unchanged_project_is_not_installed_again(tmp_path):
    run(tmp_path, "--demo")  # brings the stamp up to date, whatever it was
    proc, _ = run(tmp_path, "--demo")
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"bootstrap: \.venv is up to date \(spinewatch [\w.]+, pyproject.toml unchanged\)", proc.stdout)
    assert "pip" not in proc.stderr


def test_an_unknown_option_is_refused(tmp_path):
    proc, calls = run(tmp_path, "--everything")
    assert proc.returncode == 2 and "unknown option --everything" in proc.stderr and calls == []
