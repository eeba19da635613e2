"""`./trellis2 generate IMAGE -o OUT.blend`: image in, textured object in a saved .blend out.

Runs in .venv-blender (Blender as a Python module). It needs the backend pipeline and server, which are not
built yet; until then it checks its inputs and says exactly what is missing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(prog="./trellis2 generate", description=__doc__.splitlines()[0])
    parser.add_argument("image", type=Path)
    parser.add_argument("-o", "--output", type=Path, help="the .blend to write (default: IMAGE with .blend)")
    parser.add_argument("--weights", default="microsoft/TRELLIS.2-4B", help="hub repo id or local weights folder")
    parser.add_argument("--backend-python", default=".venv/bin/python", help="Python of the backend environment")
    args = parser.parse_args()
    if not args.image.is_file():
        print(f"error: image {args.image} not found", file=sys.stderr)
        return 2
    print(
        "error: image-to-3D generation is not available yet: the pipeline (issue 4), the backend server (issue 6) "
        "and the add-on's batch API (issue 7) are still being built. Nothing was written.",
        file=sys.stderr,
    )
    return 3


if __name__ == "__main__":
    sys.exit(main())
