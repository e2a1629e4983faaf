"""Misspelled SPINEWATCH_ variables are named with the nearest setting (check-config: exit 2 in
production), and `serve`, `worker` and `check-config` refuse an invalid setting alike: exit 2, the
same one-line messages."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from service.core.config_check import unknown_variables
from service.core.settings import Settings
from tests.support.paths import ROOT

def spinewatch(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service.cli.main", *args], capture_output=True, text=True,
                          cwd=ROOT, env={"PATH": "/usr/bin:/bin", **env}, timeout=60)


def test_unknown_variables_are_named_with_the_nearest_setting():
    lines = unknown_variables({"SPINEWATCH_LOOKBAK_DAYS": "30", "SPINEWATCH_LOOKBACK_DAYS": "30", "HOME": "/root",
                               "spinewatch_log_level": "INFO", "SPINEWATCH_PORT": "8000", "SPINEWATCH_ZZZ": "1"},
                              Settings.model_fields)
    assert lines == [
        "unknown setting SPINEWATCH_LOOKBAK_DAYS: not a SpineWatch setting, ignored "
        "(did you mean SPINEWATCH_LOOKBACK_DAYS?)",
        "unknown setting SPINEWATCH_ZZZ: not a SpineWatch setting, ignored",
    ]


def test_unknown_variables_never_show_their_values():
    (line,) = unknown_variables({"SPINEWATCH_REVIEWER_TOKN": "hunter2hunter2"}, Settings.model_fields)
    assert "hunter2" not in line and "SPINEWATCH_REVIEWER_TOKEN?" in line


def test_check_config_warns_about_a_misspelled_variable_outside_production():
    proc = spinewatch("check-config", SPINEWATCH_HOOK_TIMEOUT_SECOND="5")
    assert proc.returncode == 0, proc.stderr
    assert ("spinewatch: warning: unknown setting SPINEWATCH_HOOK_TIMEOUT_SECOND: not a SpineWatch setting, "
            "ignored (did you mean SPINEWATCH_HOOK_TIMEOUT_SECONDS?)") in proc.stderr
    assert "configuration OK" in proc.stderr


def test_check_config_refuses_a_misspelled_variable_in_production(monkeypatch):
    # In-process, on settings taken as valid: what production must hold besides changes over time.
    from typer.testing import CliRunner

    import service.core.settings as settings_module
    from service.cli.main import app

    for name in [n for n in os.environ if n.upper().startswith("SPINEWATCH_")]:
        monkeypatch.delenv(name)
    taken_as_valid = type("TakenAsValid", (), {"model_fields": Settings.model_fields,
                                               "__new__": lambda cls: Settings.model_construct(environment="production")})
    monkeypatch.setattr(settings_module, "Settings", taken_as_valid)
    runner = CliRunner()
    assert runner.invoke(app, ["check-config"]).exit_code == 0
    monkeypatch.setenv("SPINEWATCH_MAX_BODY_BYTE", "1000")
    result = runner.invoke(app, ["check-config"])
    assert result.exit_code == 2
    assert ("spinewatch: unknown setting SPINEWATCH_MAX_BODY_BYTE: not a SpineWatch setting, ignored "
            "(did you mean SPINEWATCH_MAX_BODY_BYTES?)") in result.output
    assert "SPINEWATCH_LOOKBACK_DAYS=" not in result.output


@pytest.mark.parametrize("command", [["serve", "--port", "1"], ["worker"], ["check-config"]])
def test_an_invalid_setting_exits_2_with_the_same_line_everywhere(command):
    proc = spinewatch(*command, SPINEWATCH_LOOKBACK_DAYS="ninety")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == ("spinewatch: invalid setting SPINEWATCH_LOOKBACK_DAYS='ninety': "
                                   "Input should be a valid integer, unable to parse string as an integer")


def test_serve_runs_uvicorn_with_the_http_limits():
    from service.cli.serve import uvicorn_options

    options = uvicorn_options(Settings(environment="test", http_max_header_bytes=20_000, http_keep_alive_seconds=7))
    assert options == {"http": "h11", "h11_max_incomplete_event_size": 20_000, "timeout_keep_alive": 7}
    assert Settings(environment="test").http_max_header_bytes == 16_384
