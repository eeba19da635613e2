"""`./trellis2 generate IMAGE -o OUT.blend`: image in, textured object in a saved .blend out.

Runs in .venv-blender (Blender as a Python module) exactly as a user's Blender would: the extension is built with
build_addon.py and installed from its zip into a private, temporary Blender user folder (the user's own Blender
configuration is never touched), its preferences are pointed at the backend, and its batch API,
`bpy.ops.trellis2.generate(...)`, builds the object. By default the add-on starts a local backend
(`--backend-python -m backend serve`) and stops it at the end; `--server` uses a running one instead.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import build_addon  # noqa: E402
from blender_addon.core.settings import FIELDS, USE_ADVANCED, to_blender  # noqa: E402
from protocol.settings import DEFAULT_WEIGHTS, GENERATE  # noqa: E402
from protocol.settings_cli import add_setting_arguments, given_settings  # noqa: E402

ADDON = "bl_ext.user_default.trellis2"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="./trellis2 generate", description=__doc__.splitlines()[0])
    parser.add_argument("image", type=Path, help="PNG, JPEG, WebP, BMP or TIFF file")
    parser.add_argument("-o", "--output", type=Path, help="the .blend to write (default: IMAGE with .blend)")
    parser.add_argument("--glb", type=Path, help="also export the object as this .glb")
    parser.add_argument("--weights", default=DEFAULT_WEIGHTS, help="hub repo id or local weights folder "
                        "for the local backend (default: %(default)s)")
    parser.add_argument("--backend-python", default=str(ROOT / ".venv" / "bin" / "python"),
                        help="python of the backend environment, for the local backend (default: %(default)s)")
    parser.add_argument("--server", help="address of a running backend (tcp://HOST:PORT) instead of a local one")
    parser.add_argument("--server-key", default="", help="the server's public CURVE key or its server.key file")
    parser.add_argument("--client-key", default="", help="this client's NAME.key_secret file (with --server-key)")
    add_setting_arguments(parser, GENERATE)
    args = parser.parse_args(argv)
    args.output = args.output or args.image.with_suffix(".blend")
    return args


def operator_settings(given: dict) -> dict:
    """Settings as the operator's properties take them: Blender enums are strings, so int choices become strings,
    and advanced settings need the add-on's `use_advanced` switch on."""
    out = {name: to_blender(FIELDS[name], value) for name, value in given.items()}
    if any(FIELDS[name].section == "advanced" for name in given):
        out[USE_ADVANCED.name] = True
    return out


def install_addon(bpy) -> None:
    """Build the extension and install it from the zip into the (temporary) user repository, enabled."""
    with tempfile.TemporaryDirectory() as dist:
        zip_path = build_addon.build(Path(dist))
        bpy.ops.extensions.package_install_files(filepath=str(zip_path), repo="user_default", enable_on_install=True)


def configure(bpy, args: argparse.Namespace) -> None:
    prefs = bpy.context.preferences.addons[ADDON].preferences
    if args.server:
        prefs.backend_mode, prefs.server_address = "REMOTE", args.server
        prefs.server_key, prefs.client_key_file = args.server_key, args.client_key
    else:
        prefs.backend_mode = "LOCAL"
        prefs.backend_python, prefs.weights = str(Path(args.backend_python).absolute()), args.weights


def weights_ready(args: argparse.Namespace) -> bool:
    """For a local backend: get the weights first, in the foreground, so the user sees the download's progress, and
    a machine without them (and without a connection) hears it within seconds, once (`backend weights download`
    prints what is missing and what to do)."""
    python = Path(args.backend_python)
    if args.server or not python.is_file():  # a missing backend Python is the add-on's to report, with its fix
        return True
    return subprocess.run([str(python), "-m", "backend", "weights", "download", "--weights", args.weights],
                          stdout=subprocess.DEVNULL).returncode == 0


def generate(args: argparse.Namespace) -> int:
    import bpy
    import addon_utils  # on sys.path once bpy is imported

    install_addon(bpy)
    configure(bpy, args)
    bpy.ops.wm.read_homefile(use_empty=True)
    settings = operator_settings(given_settings(args, GENERATE))
    try:
        bpy.ops.trellis2.generate(image_path=str(args.image.absolute()), **settings)
    except (RuntimeError, TypeError) as exc:  # the operator's error report (one line, with its hint) or a bad value
        print(str(exc).removeprefix("Error: "), file=sys.stderr)
        return 1
    finally:
        addon_utils.disable(ADDON)  # stops the local backend
    obj = bpy.context.view_layer.objects.active
    args.output.parent.mkdir(parents=True, exist_ok=True)
    bpy.ops.wm.save_as_mainfile(filepath=str(args.output.absolute()), compress=True)
    print(f"wrote {args.output} ({obj.name}: {len(obj.data.polygons)} faces)")
    if args.glb:
        bpy.ops.export_scene.gltf(filepath=str(args.glb.absolute()), export_format="GLB", use_selection=True)
        print(f"wrote {args.glb}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.image.is_file():
        print(f"error: image {args.image} not found", file=sys.stderr)
        return 2
    if not weights_ready(args):
        return 1
    with tempfile.TemporaryDirectory(prefix="trellis2-blender-user-") as user:
        os.environ["BLENDER_USER_RESOURCES"] = user  # before bpy is imported: keeps the user's Blender untouched
        try:
            return generate(args)
        except build_addon.ManifestError as exc:  # the extension could not be built (e.g. wheels not downloadable)
            print(f"error: {exc}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    code = main()
    # Leave without Python's teardown: bpy 4.2 crashes at interpreter exit (shared/reference/blender.md, gotcha 1).
    # Everything is written and the add-on (and with it the local backend) is already shut down.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
