"""Shared fixtures: the reference data folder, its golden cases and manifests, and one tiny checkpoint per session.

Servers create CURVE keys in the user's config folder on first start; the tests' go to a temporary one, so no test
reads or writes ~/.config/trellis2.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

os.environ["XDG_CONFIG_HOME"] = tempfile.mkdtemp(prefix="trellis2-test-config-")

GOLDEN = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "golden"
GOLDEN_TEXTURING = GOLDEN.parent / "golden-texturing"
MANIFESTS = GOLDEN.parent / "manifests"


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    if not GOLDEN.is_dir():
        pytest.skip(f"reference golden cases not found at {GOLDEN} (shared/ must sit beside the repo)")
    return GOLDEN


@pytest.fixture(scope="session")
def golden_texturing_dir() -> Path:
    if not GOLDEN_TEXTURING.is_dir():
        pytest.skip(f"texturing golden cases not found at {GOLDEN_TEXTURING} (shared/ must sit beside the repo)")
    return GOLDEN_TEXTURING


@pytest.fixture(scope="session")
def golden_failures(golden_dir: Path) -> Callable[[str], tuple[list, list[str]]]:
    """Runs the golden case folder `name` (in golden/ or golden-texturing/) with its kind's handler:
    (checks, one line per failed check)."""
    from backend.golden.registry import KINDS, Case
    from backend.golden.runner import load_handlers

    load_handlers()

    def run(name: str) -> tuple[list, list[str]]:
        path = golden_dir / name if (golden_dir / name).is_dir() else GOLDEN_TEXTURING / name
        if not path.is_dir():
            pytest.skip(f"golden case folder {path} not found (the shared reference data sits beside the repo)")
        case = Case.load(path)
        checks = KINDS[case.meta["kind"]](case)
        return checks, [f"{c.name}: err={c.error:.3g} {c.note}" for c in checks if not c.passed]

    return run


@pytest.fixture(scope="session")
def load_manifest() -> Callable[[str], dict[str, Any]]:
    """Reads shared/reference/manifests/`name`.json, skipping the test when it is absent."""

    def load(name: str) -> dict[str, Any]:
        path = MANIFESTS / f"{name}.json"
        if not path.is_file():
            pytest.skip(f"manifest {path} not found")
        return json.loads(path.read_text())

    return load


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from backend.trellis2.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "weights")
