"""`python -m backend golden CASE_DIR ...`: run every case, print one line each and an `N passed, M failed` total."""

from __future__ import annotations

import importlib
import traceback
from pathlib import Path

from backend.golden.registry import KINDS, Case, Check

# Modules whose import registers kind handlers.
HANDLER_MODULES = [
    "backend.golden.flows",
    "backend.golden.decoders",
    "backend.golden.samplers",
    "backend.golden.pipeline",
    "backend.golden.texturing",
]


def load_handlers() -> None:
    for name in HANDLER_MODULES:
        importlib.import_module(name)


def run_case(path: Path) -> tuple[bool, str]:
    """Returns (passed, one-line summary)."""
    try:
        case = Case.load(path)
    except Exception as exc:  # a broken case folder is a failed case, not a crash of the whole run
        return False, f"cannot read case: {exc}"
    kind = case.meta.get("kind", "?")
    handler = KINDS.get(kind)
    if handler is None:
        return False, f"kind {kind!r} is not supported (known: {', '.join(sorted(KINDS)) or 'none'})"
    try:
        checks: list[Check] = handler(case)
    except Exception as exc:
        last = traceback.format_exception_only(type(exc), exc)[-1].strip()
        return False, f"kind {kind}: error while running: {last}"
    if not checks:
        return False, f"kind {kind}: handler compared nothing"
    failed = [c for c in checks if not c.passed]
    worst = max(checks, key=lambda c: c.error if c.note != "exact" else -1.0)
    summary = f"kind {kind}: {len(checks)} outputs, worst |err| {worst.error:.3g} ({worst.name})"
    if failed:
        summary += "; FAILED " + ", ".join(f"{c.name} err={c.error:.3g} {c.note}".strip() for c in failed)
    return not failed, summary


def main(case_dirs: list[str]) -> int:
    load_handlers()
    passed = failed = 0
    for d in case_dirs:
        ok, summary = run_case(Path(d))
        print(f"{'PASS' if ok else 'FAIL'} {Path(d).name}: {summary}", flush=True)
        passed += ok
        failed += not ok
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 and passed > 0 else 1
