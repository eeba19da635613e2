"""The add-on's Blender-free core, tested from the source tree in plain Python (the backend's .venv, and again in
the bpy environments): its helpers are importable from here, the protocol fakes and the fake backend included."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path[:0] = [str(HERE), str(HERE.parent / "protocol"), str(HERE.parents[1])]
