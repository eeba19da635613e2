"""Shared fixtures: the reference data folder and one tiny checkpoint per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

GOLDEN = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "golden"
MANIFESTS = GOLDEN.parent / "manifests"


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    if not GOLDEN.is_dir():
        pytest.skip(f"reference golden cases not found at {GOLDEN} (shared/ must sit beside the repo)")
    return GOLDEN


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from backend.trellis2.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "weights")
