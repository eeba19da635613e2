"""The add-on's Blender half: properties, preferences, operators, the sidebar panel, the session runtime and the
builder that turns checked results into Blender data. Everything that needs no bpy lives in `..core`."""

from __future__ import annotations

import bpy

from . import operators, panel, preferences, properties, runtime


def register() -> None:
    properties.register()
    for cls in (preferences.Trellis2Preferences, *operators.CLASSES, *panel.CLASSES):
        bpy.utils.register_class(cls)
    panel.register()
    runtime.register()


def unregister() -> None:
    runtime.unregister()
    panel.unregister()
    for cls in reversed((preferences.Trellis2Preferences, *operators.CLASSES, *panel.CLASSES)):
        bpy.utils.unregister_class(cls)
    properties.unregister()
