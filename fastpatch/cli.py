"""The ``fastpatch`` command: ``fastpatch env`` (what runs here) and ``fastpatch demo``."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastpatch", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("env", help="versions, GPU, extension status and the path each op takes")
    demo = sub.add_parser("demo", help="accelerate a small built-in model and check it against the original")
    demo.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    args = parser.parse_args(argv)
    if args.command == "env":
        from .env import collect, format_report

        print(format_report(collect()))
        return 0
    from .demo import run_demo

    return run_demo(device=args.device)


if __name__ == "__main__":
    sys.exit(main())
