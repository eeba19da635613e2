#!/usr/bin/env bash
# Creates (or refreshes) the two virtual environments in the repo root, idempotently:
#   .venv/          backend: Python 3.11, torch 2.13.0 (the CPU wheel where that is what pip finds, CUDA on GPU boxes),
#                   and Ray (the cluster extra) for the cluster tests
#   .venv-blender/  Blender side: bpy 5.0.1 (Python 3.11) + the add-on's protocol dependencies
#   .venv-blender-313/  the newest bpy (5.2, Python 3.13), when a Python 3.13 is available
# A venv is reinstalled only when pyproject.toml or this script changed since it was last set up.
set -euo pipefail
cd "$(dirname "$0")/.."

PY311="${TRELLIS2_PYTHON311:-python3.11}"
find_python313() {  # the first Python 3.13 that actually runs (a pyenv shim may exist without one)
    for candidate in "${TRELLIS2_PYTHON313:-}" python3.13 "$HOME"/.pyenv/versions/3.13*/bin/python; do
        [ -n "$candidate" ] && "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 13)' 2>/dev/null \
            && { command -v "$candidate"; return; }
    done
}
PY313="$(find_python313)"
command -v "$PY311" >/dev/null || { echo "setup: $PY311 not found; install Python 3.11 (or set TRELLIS2_PYTHON311)" >&2; exit 1; }
stamp_value="$(cat pyproject.toml tools/setup_envs.sh | sha256sum | cut -d' ' -f1)"

needs_setup() {  # $1 = venv dir
    [ -x "$1/bin/python" ] && [ "$(cat "$1/.setup-stamp" 2>/dev/null)" = "$stamp_value" ] && return 1
    return 0
}

pip_quiet() { "$1/bin/python" -m pip install --disable-pip-version-check -q "${@:2}"; }

if needs_setup .venv; then
    echo "setup: preparing .venv (backend)"
    [ -x .venv/bin/python ] || "$PY311" -m venv .venv
    pip_quiet .venv torch==2.13.0
    pip_quiet .venv -e ".[backend,cluster,test]"
    echo "$stamp_value" > .venv/.setup-stamp
fi

if needs_setup .venv-blender; then
    echo "setup: preparing .venv-blender (bpy)"
    [ -x .venv-blender/bin/python ] || "$PY311" -m venv .venv-blender
    pip_quiet .venv-blender -e ".[blender]"
    echo "$stamp_value" > .venv-blender/.setup-stamp
fi

if [ -n "$PY313" ] && needs_setup .venv-blender-313; then
    echo "setup: preparing .venv-blender-313 (newest bpy)"
    [ -x .venv-blender-313/bin/python ] || "$PY313" -m venv .venv-blender-313
    pip_quiet .venv-blender-313 -e ".[blender-next]"
    echo "$stamp_value" > .venv-blender-313/.setup-stamp
fi
