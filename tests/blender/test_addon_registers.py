"""The add-on registers and unregisters inside Blender-as-a-module (bpy 5.0.1, .venv-blender)."""

from __future__ import annotations

import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import blender_addon  # noqa: E402


def test_register_and_unregister_preferences() -> None:
    blender_addon.register()
    try:
        assert blender_addon.Trellis2Preferences.is_registered
        assert blender_addon.Trellis2Preferences.bl_idname == "blender_addon"
    finally:
        blender_addon.unregister()
    assert not blender_addon.Trellis2Preferences.is_registered
