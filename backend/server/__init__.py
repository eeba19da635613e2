"""The ZeroMQ job server (`serve`), its CURVE keys (`keys`) and a terminal client (`submit`); see README.md here.

`register(subparsers)` adds all three commands to `python -m backend`; importing this package loads neither torch nor
the models.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    from backend.server import auth, server, submit_cli

    for module in (server, auth, submit_cli):
        module.register(subparsers)
