"""The `spinewatch` command line: one module per command (service/cli/*.py), assembled here.

Errors a user can fix are one line on stderr and exit code 2; nothing about a patient is printed.
"""

from __future__ import annotations

import typer

from service.cli import audit, dead_letters
from service.cli.check_config import check_config
from service.cli.demo.command import demo
from service.cli.evaluate import evaluate
from service.cli.report import report
from service.cli.serve import serve
from service.cli.subscribe import subscribe
from service.cli.worker import worker

app = typer.Typer(
    help="SpineWatch: red flags for spinal metastasis and cord compression in patients with cancer.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """SpineWatch command line."""


app.command()(evaluate)
app.command()(demo)
app.command("check-config")(check_config)
app.command()(serve)
app.command()(worker)
app.command()(subscribe)
app.command()(report)
app.add_typer(dead_letters.app, name="dead-letters")
app.add_typer(audit.app, name="audit")


if __name__ == "__main__":  # pragma: no cover
    app()
