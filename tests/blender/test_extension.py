"""The extension package: manifest validation, zip contents, Blender's own validator, installation the way a user
installs it (wheels unpacked, protocol vendored), enable/disable, and the bpy-free core."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import addon_utils
import bpy
import pytest

import build_addon
from conftest import PACKAGE, USER_RESOURCES, addon_module

MANIFEST = build_addon.ADDON / "blender_manifest.toml"
PY = f"python{sys.version_info[0]}.{sys.version_info[1]}"


def test_the_manifest_is_valid_and_covers_every_platform_and_python() -> None:
    manifest = build_addon.validate_manifest(MANIFEST)
    assert set(manifest["permissions"]) == {"network", "files"}
    assert set(manifest["platforms"]) == set(build_addon.PLATFORMS)


@pytest.mark.parametrize("edit, complaint", [
    (lambda t: t.replace('id = "trellis2"', 'id = "Trellis-2"'), "lowercase Python identifier"),
    (lambda t: t.replace('blender_version_min = "4.2.0"', 'blender_version_min = "4.1.0"'), ">= 4.2.0"),
    (lambda t: t.replace("receives 3D objects", "receives 3D objects."), "must not end with punctuation"),
    (lambda t: t.replace("receives 3D objects", "receives 3D objects" + " and more" * 10), "Blender allows 64"),
    (lambda t: t.replace("network = ", "internet = "), "unknown permission 'internet'"),
    (lambda t: t.replace('tagline = "Turn', 'taglin = "Turn'), "missing field(s) tagline"),
    (lambda t: "\n".join(x for x in t.splitlines() if "pyzmq-27.3.0-cp312-abi3-win_arm64" not in x),
     "no pyzmq wheel for windows-arm64 on Python 3.13"),
    (lambda t: "\n".join(x for x in t.splitlines() if "msgpack-1.2.4-cp311-cp311-macosx_11_0_arm64" not in x),
     "no msgpack wheel for macos-arm64 on Python 3.11"),
    (lambda t: "\n".join(x for x in t.splitlines() if "msgpack-" not in x), "no wheels for msgpack"),
    (lambda t: t.replace('"./wheels/pyzmq-27.3.0-cp311-cp311-win_amd64.whl"', '"wheels\\\\pyzmq.whl"'),
     "forward slashes"),
])
def test_a_bad_manifest_is_refused_naming_the_problem(tmp_path: Path, edit, complaint: str) -> None:
    bad = tmp_path / "blender_manifest.toml"
    bad.write_text(edit(MANIFEST.read_text()))
    with pytest.raises(build_addon.ManifestError) as info:
        build_addon.validate_manifest(bad)
    assert complaint in str(info.value)


def test_wheel_tags_follow_blenders_matching_rules() -> None:
    universal = build_addon.Wheel.parse("pyzmq-27.3.0-cp312-abi3-macosx_10_15_universal2.whl")
    assert universal.serves("macos-arm64") and universal.serves("macos-x64") and not universal.serves("linux-x64")
    assert universal.pythons() == {(3, 13)}  # stable ABI from 3.12 on: serves 3.13, not 3.11
    linux = build_addon.Wheel.parse("msgpack-1.2.4-cp311-cp311-manylinux2014_x86_64.manylinux_2_28_x86_64.whl")
    assert linux.serves("linux-x64") and not linux.serves("windows-x64") and linux.pythons() == {(3, 11)}
    with pytest.raises(build_addon.ManifestError):
        build_addon.Wheel.parse("not-a-wheel.zip")


def test_the_zip_holds_the_addon_the_vendored_protocol_and_every_wheel(extension_zip: Path) -> None:
    names = zipfile.ZipFile(extension_zip).namelist()
    manifest = build_addon.validate_manifest(MANIFEST)
    assert {"blender_manifest.toml", "__init__.py", "core/remote_job.py", "blender/build.py", "protocol/client.py"} <= set(names)
    assert {f"wheels/{w.rsplit('/', 1)[1]}" for w in manifest["wheels"]} == {n for n in names if n.startswith("wheels/")}
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


def test_blenders_own_validator_accepts_the_zip(extension_zip: Path) -> None:
    cli = Path(bpy.utils.system_resource("SCRIPTS")) / "addons_core" / "bl_pkg" / "cli" / "blender_ext.py"
    run = subprocess.run([sys.executable, str(cli), "validate", str(extension_zip)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_installed_like_a_user_would_with_wheels_unpacked_and_protocol_vendored(addon) -> None:
    assert Path(addon.__file__).is_relative_to(Path(USER_RESOURCES) / "extensions" / "user_default" / "trellis2")
    site = Path(USER_RESOURCES) / "extensions" / ".local" / "lib" / PY / "site-packages"
    assert (site / "zmq" / "__init__.py").is_file() and (site / "msgpack" / "__init__.py").is_file()
    client_cls = addon_module("core.remote_job").Client
    assert client_cls.__module__ == f"{PACKAGE}.protocol.client"  # the bundled copy, not a top-level 'protocol'
    assert "trellis2" in dir(bpy.ops) and hasattr(bpy.types.Scene, "trellis2")


def test_disable_and_enable_unregister_and_register_everything(addon) -> None:
    addon_utils.disable(PACKAGE, default_set=True)
    try:
        assert not hasattr(bpy.types.Scene, "trellis2")
        assert "TRELLIS2_PT_main" not in dir(bpy.types)
        with pytest.raises(KeyError):  # the operator is gone
            bpy.ops.trellis2.generate.get_rna_type()
    finally:
        addon_utils.enable(PACKAGE, default_set=True)
    assert hasattr(bpy.types.Scene, "trellis2") and "TRELLIS2_PT_main" in dir(bpy.types)
    assert bpy.ops.trellis2.generate.get_rna_type().identifier == "TRELLIS2_OT_generate"


def test_the_core_never_imports_bpy(extension_zip: Path, tmp_path: Path) -> None:
    with zipfile.ZipFile(extension_zip) as zf:
        zf.extractall(tmp_path / "trellis2")
    code = ("import sys; import trellis2.core.settings, trellis2.core.result, trellis2.core.remote_job, "
            "trellis2.core.connection, trellis2.core.local_backend, trellis2.core.status, trellis2.core.session, "
            "trellis2.core.errors; "
            "assert 'bpy' not in sys.modules, 'bpy imported'; print('ok')")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert run.stdout.strip() == "ok", run.stderr
