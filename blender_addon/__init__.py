"""TRELLIS.2 for Blender: turn an image into a textured PBR object through a TRELLIS.2 backend.

Layout (as glTF-Blender-IO: Blender-free logic apart from the bpy layer):
    core/      settings, result checking and conversion, jobs, connection, local backend, status, session (no bpy)
    blender/   properties, preferences, operators, panel, timer, mesh/material builder (bpy)
    protocol/  the wire protocol, bundled by build_addon.py as this package's subpackage
    wheels/    pyzmq and msgpack for every platform, bundled by build_addon.py
It never imports torch or backend code. bpy is imported only on register, so `core` is importable anywhere.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path


def _borrow_the_repositorys_protocol() -> None:
    """Run from the source tree, where build_addon.py has vendored no `protocol/` here: the repository's own
    `protocol` package (and each of its modules) serves as this package's `protocol` subpackage, as the very same
    module objects, so `core` runs and is tested in plain Python without building the extension."""
    import protocol

    sys.modules[f"{__name__}.protocol"] = globals()["protocol"] = protocol
    for module in pkgutil.iter_modules(protocol.__path__):
        sys.modules[f"{__name__}.protocol.{module.name}"] = importlib.import_module(f"protocol.{module.name}")


if not (Path(__file__).parent / "protocol").is_dir():
    _borrow_the_repositorys_protocol()


def register() -> None:
    from . import blender

    blender.register()


def unregister() -> None:
    from . import blender

    blender.unregister()
