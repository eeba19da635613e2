"""TRELLIS.2 for Blender: the Blender extension (UI, operators, mesh/material building).

It never imports torch or backend code: it reaches the backend only through `protocol`.
"""

from __future__ import annotations

import bpy


class Trellis2Preferences(bpy.types.AddonPreferences):
    """Where the backend runs."""

    bl_idname = __package__

    backend_address: bpy.props.StringProperty(  # type: ignore[valid-type]
        name="Backend address",
        description="ZeroMQ address of the TRELLIS.2 backend",
        default="tcp://127.0.0.1:5555",
    )

    def draw(self, context: bpy.types.Context) -> None:
        self.layout.prop(self, "backend_address")


CLASSES = (Trellis2Preferences,)


def register() -> None:
    for cls in CLASSES:
        bpy.utils.register_class(cls)


def unregister() -> None:
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
