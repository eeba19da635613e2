"""The add-on's Blender half: properties, preferences, operators, the sidebar panel, the main-thread timer and the
builder that turns checked results into Blender data. Everything that needs no bpy lives in `..core`."""

from __future__ import annotations

import bpy

from . import operators, panel, preferences, properties, timer


def register() -> None:
    properties.register()
    for cls in (preferences.Trellis2Preferences, *operators.CLASSES, *panel.CLASSES):
        bpy.utils.register_class(cls)
    panel.register()
    timer.register()


def unregister() -> None:
    timer.unregister()
    panel.unregister()
    for cls in reversed((preferences.Trellis2Preferences, *operators.CLASSES, *panel.CLASSES)):
        bpy.utils.unregister_class(cls)
    properties.unregister()
