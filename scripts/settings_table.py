"""Print the README's settings table (Markdown) from the Settings field descriptions.

    .venv/bin/python scripts/settings_table.py             # print it
    .venv/bin/python scripts/settings_table.py --readme    # rewrite it in README.md, between its markers

tests/service/core/test_settings_docs.py checks that every field has a description and that the README
lists every SPINEWATCH_ variable.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.core.settings import Settings  # noqa: E402
from pydantic import SecretStr  # noqa: E402

PREFIX = Settings.model_config.get("env_prefix", "SPINEWATCH_")


def default_text(field) -> str:
    if field.is_required():
        return "(required)"
    value = field.get_default(call_default_factory=True)
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, SecretStr):  # a documented placeholder, refused in production
        value = value.get_secret_value()
    if isinstance(value, (list, tuple, set)):
        return ",".join(str(v) for v in value) or "(empty)"
    return str(value) if str(value) != "" else "(empty)"


def rows() -> list[tuple[str, str, str]]:
    return [(PREFIX + name.upper(), default_text(field).replace("|", "\\|"), (field.description or "").replace("|", "\\|"))
            for name, field in Settings.model_fields.items()]


def table() -> str:
    lines = ["| Variable | Default | Meaning |", "|---|---|---|"]
    lines += [f"| `{name}` | `{default}` | {description} |" for name, default, description in rows()]
    return "\n".join(lines)


START, END = "<!-- settings-table:start -->", "<!-- settings-table:end -->"


def write_readme(readme: Path) -> None:
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"settings_table: {readme} has no {START} ... {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{table()}\n{END}{tail}")


if __name__ == "__main__":
    if "--readme" in sys.argv[1:]:
        write_readme(Path(__file__).resolve().parent.parent / "README.md")
    else:
        print(table())
