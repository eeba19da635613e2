#!/usr/bin/env bash
# Runs the whole test suite: backend + protocol tests in .venv, Blender-side tests in .venv-blender.
# Extra arguments go to both pytest runs (e.g. -x, -k NAME).
set -uo pipefail
cd "$(dirname "$0")/.."
tools/setup_envs.sh || exit 1

status=0
.venv/bin/python -m pytest tests --ignore=tests/blender -q "$@" || status=1
if [ -d tests/blender ]; then
    .venv-blender/bin/python -m pytest tests/blender -q -p no:cacheprovider "$@" || status=1
fi
exit $status
