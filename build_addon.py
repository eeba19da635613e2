"""Build the installable Blender extension zip: `python build_addon.py [-o dist/]`.

Validates `blender_addon/blender_manifest.toml` first (a bad manifest is refused with the field that is wrong),
then zips the add-on with the `protocol` package vendored inside it, so the add-on needs no system-wide install.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
ADDON = ROOT / "blender_addon"
REQUIRED = ("schema_version", "id", "version", "name", "tagline", "maintainer", "type", "blender_version_min", "license")


class ManifestError(ValueError):
    pass


def validate_manifest(path: Path) -> dict:
    try:
        manifest = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ManifestError(f"{path}: cannot read: {exc}") from exc
    missing = [k for k in REQUIRED if k not in manifest]
    if missing:
        raise ManifestError(f"{path}: missing field(s) {', '.join(missing)}")
    if manifest["type"] != "add-on":
        raise ManifestError(f"{path}: type must be 'add-on', not {manifest['type']!r}")
    if not re.fullmatch(r"[a-z][a-z0-9_]*", manifest["id"]):
        raise ManifestError(f"{path}: id {manifest['id']!r} must be a lowercase Python identifier")
    for key in ("version", "blender_version_min"):
        if not re.fullmatch(r"\d+\.\d+\.\d+", manifest[key]):
            raise ManifestError(f"{path}: {key} {manifest[key]!r} is not MAJOR.MINOR.PATCH")
    if tuple(map(int, manifest["blender_version_min"].split("."))) < (4, 2, 0):
        raise ManifestError(f"{path}: extensions need blender_version_min >= 4.2.0")
    for perm, reason in manifest.get("permissions", {}).items():
        if not isinstance(reason, str) or not reason.strip() or reason.rstrip().endswith("."):
            raise ManifestError(f"{path}: permission {perm!r} needs a reason (a sentence without a final period)")
    return manifest


def build(out_dir: Path) -> Path:
    manifest = validate_manifest(ADDON / "blender_manifest.toml")
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{manifest['id']}-{manifest['version']}.zip"
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as zf:
        for src, prefix in ((ADDON, ""), (ROOT / "protocol", "protocol/")):
            for f in sorted(src.rglob("*")):
                if f.is_file() and "__pycache__" not in f.parts:
                    zf.write(f, prefix + str(f.relative_to(src)))
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--out-dir", type=Path, default=ROOT / "dist")
    args = parser.parse_args()
    try:
        print(build(args.out_dir))
    except ManifestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
