"""`sempcyc <stage>`: the one entry point that dvc.yaml calls.

Each stage or command is one module defining add_arguments(parser) and run(args); only the chosen one is
imported, so `sempcyc --help` and a stage's start stay light.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from .errors import UserError

# command -> (module under sempcyc: stages.* are exactly dvc.yaml's stages, commands.* the others; one-line help)
COMMANDS = {
    "demo-data": ("stages.demo_data",
               "Render the built-in demo dataset (OpenMoji emoji as coloured images and hand-drawn-looking "
               "sketches)."),
    "cross-artist": ("commands.cross_artist",
               "Render the cross-artist benchmark: per class, photos from one artist's colour emoji, sketches from "
               "another's line art (needs scripts/iconify.sh)."),
    "extract": ("stages.extract",
               "Safely extract and validate the dataset tar (param data.tar) into data/dataset/ and "
               "data/dataset.json."),
    "semantic": ("stages.semantic",
               "Compute one semantic vector per class name (param semantic.backend: minilm, packaged and offline, or"
               " a word2vec file) into data/semantic/."),
    "prepare": ("stages.prepare",
               "Split classes into seen/unseen (stable under additions) and write uint8 train/test arrays."),
    "features": ("stages.features",
               "Tune the backbone's last blocks on the seen classes (features.tune_blocks) and cache the training "
               "shard's features."),
    "train": ("stages.train",
               "Train SEM-PCYC on cached features (params model.*, train.*); logs with DVCLive, resumes, early-"
               "stops."),
    "evaluate": ("stages.evaluate",
               "Evaluate zero-shot and generalised retrieval (mAP@all, P@k, 64-bit ITQ) against baselines."),
    "gallery": ("stages.gallery",
               "Embed every gallery image with the trained model (only new images when a cache exists)."),
    "archive": ("stages.archive",
               "Package model, gallery and handler into a self-contained TorchServe .mar (version = "
               "release.version)."),
    "serve-check": ("stages.serve_check",
               "Serve the .mar in an isolated TorchServe; check schema, parity with offline search, load, bad input."),
    "deploy": ("stages.deploy",
               "Deploy the .mar to the TorchServe hosts in deploy.targets over SSH (rolling; rollback on failure)."),
    "serve": ("commands.serve",
               "Serve models/sem_pcyc.mar on localhost in the foreground (Ctrl-C stops it), with a curl line to try "
               "and the sketch page."),
    "ui": ("commands.ui",
               "The sketch page against a running TorchServe (--inference-url, e.g. a deployed host through an SSH "
               "tunnel)."),
    "release": ("commands.release",
               "Release: update data, retrain what changed, gate on quality, commit and tag, push data, tag and "
               "branch, then deploy."),
    "report": ("commands.report",
               "Write reports/report.md: diffs against the previous release, curves, retrieval grid, serve/deploy "
               "summary."),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The parser, with the full arguments of the command named in `argv` (if any) and only the help line of
    the others."""
    parser = argparse.ArgumentParser(
        prog="sempcyc",
        description="SEM-PCYC zero-shot sketch-based image retrieval pipeline. Each subcommand is one DVC stage; "
                    "`dvc repro` runs them in order with the paths and params in dvc.yaml and params.yaml.")
    parser.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    subparsers = parser.add_subparsers(dest="stage", metavar="<stage>")
    subparsers.required = True
    chosen = next((a for a in argv if a in COMMANDS), None)
    for name, (module_name, help_line) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_line, description=help_line)
        if name == chosen:
            module = importlib.import_module(f"sempcyc.{module_name}")
            sub.add_argument("--params", default=argparse.SUPPRESS, help="params file (default: params.yaml)")
            module.add_arguments(sub)
            sub.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
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
