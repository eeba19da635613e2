#!/usr/bin/env bash
# Runs the whole test suite: backend + protocol tests in .venv, Blender-side tests in .venv-blender (bpy 5.0.1)
# and, where Python 3.13 exists, again in .venv-blender-313 (the newest bpy).
# Extra arguments go to both pytest runs (e.g. -x, -k NAME).
set -uo pipefail
cd "$(dirname "$0")/.."
tools/setup_envs.sh || exit 1

status=0
.venv/bin/python -m pytest tests --ignore=tests/blender -q "$@" || status=1
.venv-blender/bin/python -m pytest tests/blender -q -p no:cacheprovider "$@" || status=1
if [ -x .venv-blender-313/bin/python ]; then
    .venv-blender-313/bin/python -m pytest tests/blender -q -p no:cacheprovider "$@" || status=1
else
    echo "note: no Python 3.13 found, so the add-on was not tested against the newest bpy" >&2
fi
exit $status
