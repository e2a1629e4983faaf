"""pytest fixture: one real sekmet FHIR R4 server for the whole test session.

Use it from a conftest.py (`pytest_plugins = ["tests.support.sekmet_fixture"]`) or import the fixture
into a test module. Tests share the server, so they should scope their searches and Subscription
criteria to their own Patient and delete their Subscriptions before their receiver stops
(`sekmet_server.delete_subscriptions()`): see docs/sekmet.md for why.
"""
from __future__ import annotations

import importlib.util
from typing import Iterator

import pytest

try:  # imported as tests.support.sekmet_fixture
    from .sekmet_server import SekmetServer
except ImportError:  # imported with tests/support itself on sys.path
    from sekmet_server import SekmetServer  # type: ignore[no-redef]


@pytest.fixture(scope="session")
def sekmet_server() -> Iterator[SekmetServer]:
    if importlib.util.find_spec("sekmet") is None:
        pytest.skip("sekmet-fhir is not installed in this environment (pip install sekmet-fhir): "
                    "no real FHIR server for integration tests")
    with SekmetServer() as server:
        yield server
