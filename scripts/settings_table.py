"""Print the README's settings table (Markdown) from the Settings field descriptions.

    .venv/bin/python scripts/settings_table.py > /tmp/settings.md    # paste into README.md

tests/unit/test_settings_docs.py checks that every field has a description and that the README
lists every SPINEWATCH_ variable.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.settings import Settings  # noqa: E402

PREFIX = Settings.model_config.get("env_prefix", "SPINEWATCH_")


def default_text(field) -> str:
    if field.is_required():
        return "(required)"
    value = field.get_default(call_default_factory=True)
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple, set)):
        return ",".join(str(v) for v in value) or "(empty)"
    return str(value) if str(value) != "" else "(empty)"


def rows() -> list[tuple[str, str, str]]:
    return [(PREFIX + name.upper(), default_text(field), (field.description or "").replace("|", "\\|"))
            for name, field in Settings.model_fields.items()]


def table() -> str:
    lines = ["| Variable | Default | Meaning |", "|---|---|---|"]
    lines += [f"| `{name}` | `{default}` | {description} |" for name, default, description in rows()]
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
