"""The layering DESIGN.md asks for: fhir_mappings is pure; the service enqueues by task name."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
IMPURE = {"fastapi", "starlette", "celery", "kombu", "redis", "httpx", "requests", "sqlalchemy", "uvicorn",
          "service", "workers"}


def imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", sorted((ROOT / "fhir_mappings").rglob("*.py")), ids=lambda p: p.name)
def test_fhir_mappings_stays_pure(path):
    assert not {n for n in imports(path) if n.split(".")[0] in IMPURE}


@pytest.mark.parametrize("path", sorted((ROOT / "service").rglob("*.py")), ids=lambda p: p.name)
def test_service_does_not_import_worker_tasks(path):
    assert not {n for n in imports(path) if n.startswith("workers.tasks")}
