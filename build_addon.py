"""Build the installable Blender extension zip: `python build_addon.py [-o dist/] [--wheel-cache build/wheels]`.

The manifest (`blender_addon/blender_manifest.toml`) is validated first, with the rules Blender's own
`blender --command extension validate` applies plus one it cannot: every bundled distribution must have a wheel for
every platform the manifest claims, on both Python versions Blender ships (3.11 for 4.2-5.0, 3.13 for 5.1+).
Then the wheels the manifest names are fetched with `pip download` (once; they are kept in the wheel cache) and
zipped together with the add-on and the `protocol` package, which becomes the add-on's subpackage
`<extension>.protocol`, so it can never clash with another add-on's modules.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent
ADDON = ROOT / "blender_addon"
DEFAULT_WHEEL_CACHE = ROOT / "build" / "wheels"

REQUIRED = ("schema_version", "id", "version", "name", "tagline", "maintainer", "type", "blender_version_min", "license")
PERMISSIONS = ("files", "network", "clipboard", "camera", "microphone")
PLATFORMS = ("linux-x64", "windows-x64", "windows-arm64", "macos-x64", "macos-arm64")
BLENDER_PYTHONS = ((3, 11), (3, 13))  # Blender 4.2-5.0, Blender 5.1+
BUNDLED = ("msgpack", "pyzmq")  # what the vendored protocol imports besides numpy, which Blender ships
TERSE_MAX = 64  # Blender's limit for the tagline and permission reasons


class ManifestError(ValueError):
    pass


@dataclass(frozen=True)
class Wheel:
    """A wheel file name split by the binary-distribution spec: name-version(-build)?-python-abi-platform.whl."""

    filename: str
    distribution: str
    version: str
    python_tag: str
    abi_tag: str
    platform_tags: tuple[str, ...]

    @classmethod
    def parse(cls, filename: str) -> Wheel:
        parts = filename[: -len(".whl")].split("-") if filename.endswith(".whl") else []
        if len(parts) not in (5, 6):
            raise ManifestError(f"wheel {filename!r} is not named name-version-python-abi-platform.whl")
        return cls(filename, parts[0], parts[1], parts[-3], parts[-2], tuple(parts[-1].split(".")))

    def pythons(self) -> set[tuple[int, int]]:
        """The Blender Pythons this wheel loads in (a stable-ABI wheel also serves newer Pythons)."""
        tagged = {(int(t[2]), int(t[3:])) for t in self.python_tag.split(".") if re.fullmatch(r"cp3\d+", t)}
        if self.abi_tag == "abi3":
            return {py for py in BLENDER_PYTHONS if any(py >= t for t in tagged)}
        return tagged & set(BLENDER_PYTHONS)

    def serves(self, platform: str) -> bool:
        """Blender's own matching rule (bl_pkg): architecture suffix for Linux/macOS, exact tag for Windows."""
        for tag in self.platform_tags:
            if tag == "any":
                return True
            if platform == "linux-x64" and tag.startswith("manylinux") and tag.endswith("_x86_64"):
                return True
            if tag == {"windows-x64": "win_amd64", "windows-arm64": "win_arm64"}.get(platform):
                return True
            arch = {"macos-x64": "_x86_64", "macos-arm64": "_arm64"}.get(platform)
            if arch and tag.startswith("macosx_") and (tag.endswith(arch) or tag.endswith("_universal2")):
                return True
        return False


def _terse(path: Path, what: str, value: object) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ManifestError(f"{path}: {what} must be a non-empty string")
    if len(value) > TERSE_MAX:
        raise ManifestError(f"{path}: {what} is {len(value)} characters, Blender allows {TERSE_MAX}")
    if not (value[-1].isalnum() or value[-1] in ")]}"):
        raise ManifestError(f"{path}: {what} {value!r} must not end with punctuation")


def validate_manifest(path: Path) -> dict:
    """Return the parsed manifest, or raise ManifestError naming the field that is wrong and why."""
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
    _terse(path, "tagline", manifest["tagline"])
    if not manifest["license"] or not all(isinstance(x, str) and x.startswith("SPDX:") for x in manifest["license"]):
        raise ManifestError(f"{path}: license must be a list of 'SPDX:<identifier>' strings")
    permissions = manifest.get("permissions", {})
    for perm, reason in permissions.items():
        if perm not in PERMISSIONS:
            raise ManifestError(f"{path}: unknown permission {perm!r}; Blender knows {', '.join(PERMISSIONS)}")
        _terse(path, f"permission {perm!r} reason", reason)
    for perm in ("network", "files"):
        if perm not in permissions:
            raise ManifestError(f"{path}: the add-on talks to a backend and reads images: declare {perm!r} with a reason")
    unknown = set(manifest.get("platforms", ())) - set(PLATFORMS)
    if unknown:
        raise ManifestError(f"{path}: unknown platform(s) {sorted(unknown)}; valid: {', '.join(PLATFORMS)}")
    _validate_wheels(path, manifest)
    return manifest


def _validate_wheels(path: Path, manifest: dict) -> None:
    wheels = []
    for entry in manifest.get("wheels", ()):
        if not isinstance(entry, str) or not entry.startswith("./wheels/") or "\\" in entry or entry.count("/") != 2:
            raise ManifestError(f"{path}: wheel entry {entry!r} must be './wheels/<file>.whl' with forward slashes")
        wheels.append(Wheel.parse(entry.rsplit("/", 1)[1]))
    names = {w.distribution for w in wheels}
    absent = [d for d in BUNDLED if d not in names]
    if absent:
        raise ManifestError(f"{path}: no wheels for {', '.join(absent)}, which the add-on imports")
    for platform in manifest.get("platforms", PLATFORMS):
        for py in BLENDER_PYTHONS:
            for name in sorted(names):
                if not any(w.distribution == name and py in w.pythons() and w.serves(platform) for w in wheels):
                    raise ManifestError(f"{path}: no {name} wheel for {platform} on Python {py[0]}.{py[1]}; add one "
                                        f"(pip download {name} --only-binary=:all: --platform ... --python-version "
                                        f"{py[0]}.{py[1]}) or drop the platform")


def fetch_wheel(wheel: Wheel, cache: Path) -> Path:
    """The wheel file from the cache, downloaded with pip (exactly this file, no dependencies) when absent."""
    target = cache / wheel.filename
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    version = re.fullmatch(r"cp3(\d+)", wheel.python_tag.split(".")[0])
    if version is None:
        raise ManifestError(f"cannot derive a Python version from wheel {wheel.filename}")
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", f"{wheel.distribution}=={wheel.version}", "--no-deps",
               "--only-binary=:all:", "--disable-pip-version-check", "--quiet", "--dest", tmp,
               "--implementation", "cp", "--python-version", f"3.{version.group(1)}", "--abi", wheel.abi_tag]
        for tag in wheel.platform_tags:
            cmd += ["--platform", tag]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / wheel.filename
        if not got.is_file():
            fetched = sorted(p.name for p in Path(tmp).iterdir())
            raise ManifestError(f"pip could not download {wheel.filename} (got {fetched or 'nothing'}): "
                                f"{proc.stderr.strip()[-500:]}; download it by hand into {cache}")
        got.replace(target)
    return target


def build(out_dir: Path, wheel_cache: Path = DEFAULT_WHEEL_CACHE) -> Path:
    """Validate, fetch the wheels and write `<out_dir>/<id>-<version>.zip`; return its path."""
    manifest = validate_manifest(ADDON / "blender_manifest.toml")
    wheel_files = [fetch_wheel(Wheel.parse(entry.rsplit("/", 1)[1]), wheel_cache) for entry in manifest["wheels"]]
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{manifest['id']}-{manifest['version']}.zip"
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as zf:
        for src, prefix in ((ADDON, ""), (ROOT / "protocol", "protocol/")):
            for f in sorted(src.rglob("*")):
                if f.is_file() and "__pycache__" not in f.parts:
                    zf.write(f, prefix + f.relative_to(src).as_posix())
        for f in wheel_files:
            zf.write(f, f"wheels/{f.name}", compress_type=zipfile.ZIP_STORED)  # wheels are zips already
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--out-dir", type=Path, default=ROOT / "dist")
    parser.add_argument("--wheel-cache", type=Path, default=DEFAULT_WHEEL_CACHE,
                        help="folder holding the downloaded wheels (default: build/wheels)")
    args = parser.parse_args()
    try:
        print(build(args.out_dir, args.wheel_cache))
    except ManifestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
