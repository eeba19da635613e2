"""`python -m backend SUBCOMMAND ...`: the backend's command line.

Each subcommand imports its module only when chosen, so `--help` and light commands start fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that add their own subcommands through `register(subparsers)`.
COMMAND_MODULES = ["backend.generate_cli", "backend.texture_cli", "backend.ovoxel_cli", "backend.server", "backend.bench",
                   "backend.weights"]


def _golden(args: argparse.Namespace) -> int:
    from backend.golden.runner import main

    return main(args.case_dirs)


def _manifest(args: argparse.Namespace) -> int:
    from backend.trellis2.checkpoint import print_manifest

    return print_manifest(args.ckpt_json)


def _settings(args: argparse.Namespace) -> int:
    import json

    from protocol.settings import SETTINGS
    from protocol.settings_cli import markdown_table

    print(json.dumps(SETTINGS.to_wire(), indent=1) if args.json else markdown_table(), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m backend", description="TRELLIS.2 backend: models, pipeline, server.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("golden", help="replay reference golden cases and report the worst error of each")
    p.add_argument("case_dirs", nargs="+", metavar="CASE_DIR")
    p.set_defaults(run=_golden)

    p = sub.add_parser("manifest", help="print a model's state-dict entries [[name, shape, dtype], ...] as JSON")
    p.add_argument("ckpt_json", metavar="CKPT_JSON", help="a checkpoint JSON {name, args}")
    p.set_defaults(run=_manifest)

    p = sub.add_parser("settings", help="print every job setting (name, type, default, range, requests) as a table")
    p.add_argument("--json", action="store_true", help="the schema as the server advertises it in `info`")
    p.set_defaults(run=_settings)

    for module in COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
