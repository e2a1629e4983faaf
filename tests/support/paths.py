"""Where the repository and the shared test data are, for every test wherever it sits in the tree.
Tests that read ../shared ask for the `shared_data` fixture (tests/conftest.py), which skips with a
clear message where it is absent."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared"
