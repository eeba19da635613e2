#!/usr/bin/env bash
# Runs the whole test suite: backend, protocol and add-on core tests in .venv; Blender-side tests (and the add-on
# core again) in .venv-blender (bpy 5.0.1) and, where Python 3.13 exists, in .venv-blender-313 (the newest bpy).
# Extra arguments go to both pytest runs (e.g. -x, -k NAME).
set -uo pipefail
cd "$(dirname "$0")/.."
tools/setup_envs.sh || exit 1

status=0
.venv/bin/python -m pytest tests --ignore=tests/blender -q "$@" || status=1
for bpy_env in .venv-blender .venv-blender-313; do
    [ -x "$bpy_env/bin/python" ] || continue
    "$bpy_env/bin/python" -m pytest tests/blender -q -p no:cacheprovider "$@" || status=1
    "$bpy_env/bin/python" -m pytest tests/addon_core -q -p no:cacheprovider "$@" || status=1  # Blender's Pythons
done
if [ ! -x .venv-blender-313/bin/python ]; then
    echo "note: no Python 3.13 found, so the add-on was not tested against the newest bpy" >&2
fi
exit $status
