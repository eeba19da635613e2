"""Blender-side test set-up (runs in .venv-blender: bpy 5.0.1 on Python 3.11, or .venv-blender-313: bpy 5.2.x).

The extension is built by build_addon.py and installed the way a user installs it (Blender's "Install from Disk",
`extensions.package_install_files`) into a private Blender user folder, so no test touches ~/.config/blender:
BLENDER_USER_RESOURCES must be set before bpy is imported, hence at the top of this file.
"""

from __future__ import annotations

import importlib
import os
import sys
import tempfile
from pathlib import Path
from types import ModuleType

USER_RESOURCES = tempfile.mkdtemp(prefix="trellis2-blender-user-")
os.environ["BLENDER_USER_RESOURCES"] = USER_RESOURCES

import bpy  # noqa: E402
import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(Path(__file__).parent), str(ROOT / "tests" / "protocol"), str(ROOT / "tests" / "addon_core")]

import build_addon  # noqa: E402

PACKAGE = "bl_ext.user_default.trellis2"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    session.config._bpy_exitstatus = int(exitstatus)


def pytest_unconfigure(config: pytest.Config) -> None:
    """Leave without Python's teardown: bpy can crash at interpreter exit (blender.md, gotcha 1), which would turn
    a green run into rc 139. The exit status is pytest's own."""
    if hasattr(config, "_bpy_exitstatus"):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(config._bpy_exitstatus)


def addon_module(name: str = "") -> ModuleType:
    """A module of the installed extension, e.g. addon_module("core.result")."""
    return importlib.import_module(f"{PACKAGE}.{name}" if name else PACKAGE)


@pytest.fixture(scope="session")
def extension_zip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_addon.build(tmp_path_factory.mktemp("dist"))


@pytest.fixture(scope="session")
def addon(extension_zip: Path) -> ModuleType:
    """The extension, installed from its zip into the user repository and enabled."""
    result = bpy.ops.extensions.package_install_files(filepath=str(extension_zip), repo="user_default",
                                                      enable_on_install=True)
    assert result == {"FINISHED"}
    assert PACKAGE in bpy.context.preferences.addons
    return addon_module()


@pytest.fixture
def scene(addon: ModuleType) -> bpy.types.Scene:
    """An empty scene (add-ons stay enabled), backend preferences reset, no job, message or status monitor (a
    timer tick of an earlier test starts one) in the session."""
    bpy.ops.wm.read_homefile(use_empty=True)
    prefs = bpy.context.preferences.addons[PACKAGE].preferences
    for name in ("backend_mode", "backend_python", "weights", "server_address", "server_key"):
        prefs.property_unset(name)
    session = addon_module("blender.running").session
    session.job = session.target = session.message = session.shown_status = None
    if session.monitor is not None:
        session.monitor.stop()
        session.monitor = None
    return bpy.context.scene


@pytest.fixture
def prefs(scene):
    return bpy.context.preferences.addons[PACKAGE].preferences


@pytest.fixture
def fake_backend(prefs):
    """A fake backend that finishes every job (tests/addon_core/addon_fakes.py), set as the remote server in the
    preferences."""
    from addon_fakes import backend_handler
    from protocol_fakes import FakeServer

    server = FakeServer(backend_handler())
    prefs.backend_mode, prefs.server_address = "REMOTE", server.address
    yield server
    server.stop()
