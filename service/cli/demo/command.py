"""`spinewatch demo [--serve]`: the whole flow on embedded development defaults (service/cli/demo/run.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def demo(
    serve: Annotated[bool, typer.Option("--serve", help="keep everything running and print the URLs until Ctrl-C")] = False,
    run_dir: Annotated[Optional[Path], typer.Option("--dir", help="keep logs and data here (default: a temp dir, removed)")] = None,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the worker's assessments and alerts")] = 90.0,
) -> None:
    """Run the whole flow locally: FHIR server, API, worker, demo patients, cards, alerts, audit.

    Starts redis-server, sekmet-fhir, the API and a worker on free ports, shows each demo patient's tier,
    card, care-team alerts and the audit trail, then stops everything it started."""
    from service.cli.demo.run import Demo
    from service.core.settings import get_settings

    code = Demo(serve=serve, run_dir=run_dir, allow_install=get_settings().demo_install, timeout=timeout).run()
    raise typer.Exit(code)
