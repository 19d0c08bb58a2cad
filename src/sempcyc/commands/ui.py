"""`sempcyc ui`: the sketch page against any running TorchServe, e.g. a deployed host through an SSH tunnel
(`ssh -L 18080:127.0.0.1:8080 host`, then `sempcyc ui --inference-url http://127.0.0.1:18080`).

The page's metadata and thumbnails come from local archives (--mar, one per version the page should know; the
first is the default): the pipeline's models/sem_pcyc.mar or a release fetched with `dvc artifacts get`. The
TorchServe inference token comes from the environment variable deploy.defaults.inference_token_env names (as for
deploy) and stays in this process.
"""
from __future__ import annotations

import argparse
import os
import signal
import threading
import urllib.parse
from pathlib import Path

from .. import params as params_mod
from ..errors import UserError
from ..page import PageConfig, PageServer, PageSettings, read_archive
from ..targets import DeploySettings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--inference-url", required=True,
                        help="TorchServe's inference API as seen from here, e.g. http://127.0.0.1:18080 (an SSH "
                             "tunnel to a host's 127.0.0.1:8080)")
    parser.add_argument("--mar", action="append", default=None,
                        help="an archive of a version the page should know (metadata, thumbnails); repeat for "
                             "more versions, the first is the default (default: models/sem_pcyc.mar)")
    parser.add_argument("--port", type=int, default=0, help="port of the page on 127.0.0.1 (default: a free one)")
    parser.add_argument("--management-url", default=None,
                        help="TorchServe's management API as seen from here (e.g. http://127.0.0.1:18081 through "
                             "the tunnel), for the page's list of registered versions; without it the page "
                             "offers a text box for the version")
    parser.add_argument("--thumbnail-base-url", default=None,
                        help="overrides page.thumbnail_base_url (where images without a thumbnail come from)")


def page_config(args: argparse.Namespace) -> PageConfig:
    settings, deploy = params_mod.read(args.params, PageSettings, DeploySettings)
    check_url(args.inference_url, "--inference-url")
    management_url = check_url(args.management_url, "--management-url")
    if args.thumbnail_base_url is not None:
        settings = PageSettings(args.thumbnail_base_url or None, settings.search_debounce_ms)
    archives = tuple(read_archive(Path(p)) for p in (args.mar or ["models/sem_pcyc.mar"]))
    names = {a.model_name for a in archives}
    if len(names) > 1:
        raise UserError(f"the archives serve different models ({', '.join(sorted(names))}); give archives of one "
                        "model (release.model_name)")
    token_env = deploy.defaults.get("inference_token_env")
    if not isinstance(token_env, str) or not token_env:
        raise UserError(f"{args.params}: deploy.defaults.inference_token_env must name the variable holding "
                        "TorchServe's inference token (e.g. SEM_PCYC_TS_INFERENCE_TOKEN)")
    management_env = deploy.defaults.get("management_token_env")
    management_token = os.environ.get(management_env) or None if isinstance(management_env, str) else None
    return PageConfig(args.inference_url.rstrip("/"), archives, settings, os.environ.get(token_env) or None,
                      token_env, management_url, management_token)


def check_url(value: str | None, option: str) -> str | None:
    url = urllib.parse.urlsplit(value or "")
    if value is not None and (url.scheme not in ("http", "https") or not url.hostname):
        raise UserError(f"{option} {value!r}: expected http://host:port (TorchServe's {option[2:-4]} API, e.g. "
                        "http://127.0.0.1:18080 through an SSH tunnel)")
    return value.rstrip("/") if value else None


def run(args: argparse.Namespace) -> None:
    config = page_config(args)
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        with PageServer(config, args.port) as page:
            versions = ", ".join(a.version for a in config.archives)
            token = f"with the token from ${config.token_env}" if config.token else "without a token"
            print(f"ui: {config.model_name} (versions {versions}) at {config.meta()['inference']}, {token}.\n"
                  f"Open the sketch page: {page.url}\nPress Ctrl-C to stop.", flush=True)
            while not stop.wait(0.5):
                pass
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
    print("\nui: stopped")
