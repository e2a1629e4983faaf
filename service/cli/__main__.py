"""`python -m service.cli`: the same commands as the `spinewatch` console script."""

from service.cli.main import app

app(prog_name="spinewatch")
