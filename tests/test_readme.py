"""The README holds exactly two set-up commands, and .ci/run runs the test one."""

from tests.support.paths import ROOT


def setup_commands() -> list[str]:
    return [line.strip() for line in (ROOT / "README.md").read_text().splitlines()
            if line.startswith("bash scripts/bootstrap.sh")]


def test_readme_has_exactly_two_setup_commands():
    commands = setup_commands()
    assert len(commands) == 2
    assert commands[0].endswith("spinewatch demo")
    assert "pytest" in commands[1]


def test_ci_runs_the_readme_test_command():
    ci_lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines() if ln.strip()]
    assert ci_lines[-1] == setup_commands()[1]
