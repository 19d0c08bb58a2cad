"""`sempcyc <stage>`: the one entry point that dvc.yaml calls; each stage module adds its own arguments."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from .errors import UserError

# stage name -> module; a module defines HELP, add_arguments(parser) and run(args).
STAGES = {
    "demo-data": "demo_data",
    "extract": "extract",
    "semantic": "semantic",
    "prepare": "prepare",
    "features": "features",
    "train": "train",
    "evaluate": "evaluate",
    "gallery": "gallery",
    "archive": "archive",
    "serve-check": "serve_check",
    "deploy": "deploy",
    "serve": "serve",
    "release": "release",
    "report": "report",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sempcyc",
        description="SEM-PCYC zero-shot sketch-based image retrieval pipeline. Each subcommand is one DVC stage; "
                    "`dvc repro` runs them in order with the paths and params in dvc.yaml and params.yaml.")
    parser.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    subparsers = parser.add_subparsers(dest="stage", metavar="<stage>")
    subparsers.required = True
    for stage, module_name in STAGES.items():
        module = importlib.import_module(f"sempcyc.{module_name}")
        sub = subparsers.add_parser(stage, help=module.HELP, description=module.HELP)
        sub.add_argument("--params", default=argparse.SUPPRESS, help="params file (default: params.yaml)")
        module.add_arguments(sub)
        sub.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args._run(args)
    except UserError as exc:
        print(f"sempcyc {args.stage}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"sempcyc {args.stage}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
