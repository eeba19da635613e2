"""TRELLIS.2 for Blender: turn an image into a textured PBR object through a TRELLIS.2 backend.

Layout (as glTF-Blender-IO: Blender-free logic apart from the bpy layer):
    core/      settings, result checking and conversion, jobs, local backend, status (no bpy)
    blender/   properties, preferences, operators, panel, runtime, mesh/material builder (bpy)
    protocol/  the wire protocol, bundled by build_addon.py as this package's subpackage
    wheels/    pyzmq and msgpack for every platform, bundled by build_addon.py
It never imports torch or backend code. bpy is imported only on register, so `core` is importable anywhere.
"""

from __future__ import annotations


def register() -> None:
    from . import blender

    blender.register()


def unregister() -> None:
    from . import blender

    blender.unregister()
