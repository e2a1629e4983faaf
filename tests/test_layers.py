"""The import rule: the folder is the layer, and imports only point down.

In the style of import-linter's "layers" contract (https://import-linter.readthedocs.io/): each
application module belongs to the first layer whose package prefix it starts with, and may import
only its own layer or the layers below it. Every import counts, including the ones inside
functions: a lazy import is still a dependency, and hiding a cycle in a function does not remove it.

    service.cli                                       commands and the demo
    service.api, workers.tasks, workers.celery_app    the two front doors (HTTP, Celery)
    service.usecases, workers.pipeline, workers.alerts, workers.broker
    service.infra                                     Redis, SQL, FHIR servers, JWKS
    service.core                                      settings, errors, logging, metrics
    fhir_mappings.cds                                 cards and alerts
    fhir_mappings.clinical                            the decision
    fhir_mappings.fhir                                FHIR wire shapes

Also: nothing in `service/` below the CLI imports `workers/`; `fhir_mappings` imports no framework
and does no I/O; only `service.api` imports FastAPI or Starlette; and no module imports itself
through a cycle.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fhir_mappings", "service", "workers")

# Lowest first. Modules in one layer may import each other (no cycles); a layer may import any below.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("fhir_mappings.fhir",),
    ("fhir_mappings.clinical",),
    ("fhir_mappings.cds",),
    ("service.core",),
    ("service.infra",),
    ("service.usecases", "workers.pipeline", "workers.alerts", "workers.broker"),
    ("service.api", "workers.tasks", "workers.celery_app"),
    ("service.cli",),
)
# Third-party packages that mean I/O or a framework: never in the pure clinical core.
IMPURE = {"fastapi", "starlette", "celery", "kombu", "redis", "httpx", "requests", "sqlalchemy", "uvicorn",
          "psycopg", "jwt", "typer", "structlog", "prometheus_client", "jinja2", "service", "workers"}
WEB = {"fastapi", "starlette"}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, module: str) -> set[str]:
    """Every name `path` imports, anywhere in it: `a.b` for `import a.b`, and `a.b.C` for each
    `from a.b import C` (relative imports resolved). C may be a module or a name inside a.b."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names |= {f"{base}.{a.name}" for a in node.names}
    return names


def import_graph(root: Path, packages: Iterable[str] = PACKAGES) -> dict[str, set[str]]:
    """module -> the application modules it imports (each name resolved to the module that holds it)."""
    files = {module_name(p, root): p for pkg in packages for p in (root / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        targets = set()
        for name in imports_of(path, module):
            while name and name not in files:  # `from a.b import C`: C is not a module, a.b is
                name = name.rpartition(".")[0]
            if name and name != module and not module.startswith(name + "."):  # a package's own __init__
                targets.add(name)
        graph[module] = targets
    return graph


def layer_of(module: str, layers=LAYERS) -> int | None:
    for rank, prefixes in enumerate(layers):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    return None


def layer_violations(graph: Mapping[str, set[str]], layers=LAYERS) -> list[str]:
    found = []
    for module, targets in sorted(graph.items()):
        rank = layer_of(module, layers)
        for target in sorted(targets):
            target_rank = layer_of(target, layers)
            if rank is not None and target_rank is not None and target_rank > rank:
                found.append(f"{module} imports {target}, a higher layer")
            if module.startswith("service.") and target.startswith("workers") and not module.startswith("service.cli"):
                found.append(f"{module} imports {target}: service/ below the CLI never imports workers/")
    return found


def unlayered(graph: Mapping[str, set[str]], layers=LAYERS) -> list[str]:
    """Application modules no layer claims (a package's bare __init__ aside)."""
    return sorted(m for m in graph if layer_of(m, layers) is None and m not in {"service", "workers", "fhir_mappings"})


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def third_party(root: Path, prefix: str) -> dict[str, set[str]]:
    out = {}
    base = root / Path(*prefix.split("."))
    for path in base.rglob("*.py"):
        module = module_name(path, root)
        out[module] = {n.split(".")[0] for n in imports_of(path, module)}
    return out


# --- the rule, on the real tree ------------------------------------------------------------------

GRAPH = import_graph(ROOT)


def test_every_application_module_is_in_a_layer():
    assert not unlayered(GRAPH)


def test_imports_only_point_down():
    assert not layer_violations(GRAPH)


def test_no_import_cycles():
    assert not cycles(GRAPH)


def test_the_clinical_core_stays_pure():
    assert not {m: sorted(n & IMPURE) for m, n in third_party(ROOT, "fhir_mappings").items() if n & IMPURE}


def test_only_the_api_speaks_http_frameworks():
    speakers = {m for pkg in PACKAGES for m, n in third_party(ROOT, pkg).items() if n & WEB}
    assert {m for m in speakers if not m.startswith("service.api")} == set()


# --- the rule, tested: it fails on a deliberate bad import ------------------------------------------


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir(exist_ok=True)
    return tmp_path


GOOD = {
    "fhir_mappings/__init__.py": "",
    "fhir_mappings/clinical/__init__.py": "",
    "fhir_mappings/clinical/evaluate.py": "from fhir_mappings.fhir.bundle import Bundle\n",
    "fhir_mappings/fhir/__init__.py": "",
    "fhir_mappings/fhir/bundle.py": "Bundle = dict\n",
    "service/__init__.py": "",
    "service/core/__init__.py": "",
    "service/core/settings.py": "from fhir_mappings.clinical import evaluate\n",
    "service/infra/__init__.py": "",
    "service/infra/queue.py": "from service.core.settings import *\n",
    "service/cli/__init__.py": "",
    "service/cli/worker.py": "def run():\n    from workers import tasks\n",
    "workers/__init__.py": "",
    "workers/tasks.py": "from service.infra import queue\n",
}


def test_the_rule_passes_a_tree_that_keeps_it(tmp_path):
    graph = import_graph(_tree(tmp_path, GOOD))
    assert graph["service.infra.queue"] == {"service.core.settings"}
    assert graph["service.core.settings"] == {"fhir_mappings.clinical.evaluate"}
    assert layer_violations(graph) == [] and cycles(graph) == [] and unlayered(graph) == []


@pytest.mark.parametrize("module, text, expected", [
    # an upward import, written at module level
    ("service/core/settings.py", "from service.infra.queue import X\n",
     "service.core.settings imports service.infra.queue, a higher layer"),
    # the same, hidden in a function
    ("fhir_mappings/fhir/bundle.py", "def f():\n    import service.core.settings\n",
     "fhir_mappings.fhir.bundle imports service.core.settings, a higher layer"),
    # a relative import resolves to the same module
    ("service/core/settings.py", "from ..infra import queue\n",
     "service.core.settings imports service.infra.queue, a higher layer"),
    # service/ below the CLI reaching into the workers
    ("service/infra/queue.py", "from workers.tasks import evaluate\n",
     "service.infra.queue imports workers.tasks: service/ below the CLI never imports workers/"),
])
def test_the_rule_fails_on_a_deliberate_bad_import(tmp_path, module, text, expected):
    graph = import_graph(_tree(tmp_path, {**GOOD, module: text}))
    assert expected in layer_violations(graph)


def test_the_rule_finds_a_cycle_even_through_lazy_imports(tmp_path):
    graph = import_graph(_tree(tmp_path, {
        **GOOD,
        "service/cli/main.py": "from service.cli import worker\n",
        "service/cli/worker.py": "def run():\n    from service.cli import main\n",
    }))
    assert cycles(graph) == [["service.cli.main", "service.cli.worker"]]


def test_the_rule_names_a_module_outside_every_layer(tmp_path):
    graph = import_graph(_tree(tmp_path, {**GOOD, "service/helpers.py": ""}))
    assert unlayered(graph) == ["service.helpers"]
