"""`sempcyc serve`: the built archive in TorchServe, in the foreground on localhost, for a person to try: a curl line
and the sketch page (page.py) on its own 127.0.0.1 port."""
from __future__ import annotations

import argparse
import shutil
import signal
import tempfile
import time
from pathlib import Path

from .. import params as params_mod
from ..errors import UserError
from ..page import PageConfig, PageServer, PageSettings, read_archive
from ..serving import ReleaseSettings, ServeSettings, models_config
from ..torchserve import TorchServe, free_port, port_in_use


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mar", default="models/sem_pcyc.mar", help="archive (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8080, help="inference port; another free one is picked if "
                                                               "it is taken (default: %(default)s)")
    parser.add_argument("--management-port", type=int, default=8081, help="management port (default: %(default)s)")
    parser.add_argument("--page-port", type=int, default=0, help="port of the sketch page on 127.0.0.1 "
                                                                 "(default: a free one)")
    parser.add_argument("--workers", type=int, help="worker processes (default: serve.workers in params.yaml)")


def pick_ports(inference: int, management: int) -> dict[str, int]:
    """The wanted ports, or free ones where they are taken (said on stdout)."""
    ports = {}
    for label, wanted in (("inference", inference), ("management", management)):
        if port_in_use(wanted):
            ports[label] = free_port()
            print(f"serve: port {wanted} is in use; using {ports[label]} for the {label} API")
        else:
            ports[label] = wanted
    return ports


def run(args: argparse.Namespace) -> None:
    release, serve, page_settings = params_mod.read(args.params, ReleaseSettings, ServeSettings, PageSettings)
    mar = Path(args.mar)
    if not mar.exists():
        raise UserError(f"{mar}: not found; build it with `dvc repro archive`")
    archive = read_archive(mar)
    ports = pick_ports(args.port, args.management_port)
    with tempfile.TemporaryDirectory(prefix="sem-pcyc-serve-") as tmp:
        store = Path(tmp) / "model-store"
        store.mkdir()
        shutil.copy2(mar, store / mar.name)
        models = models_config(release.model_name, release.version, mar.name, serve.batch_size,
                               serve.max_batch_delay_ms, workers=args.workers or serve.workers)
        ts = TorchServe(store, models, workdir=Path(tmp) / "ts", inference_port=ports["inference"],
                        management_port=ports["management"], extra_config={"job_queue_size": serve.queue_size})
        previous = signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        try:
            with ts:
                print(f"serve: starting TorchServe with {mar} (v{release.version}) ...")
                ts.wait_ready(release.model_name, serve.ready_timeout_s)
                config = PageConfig(ts.inference_url, (archive,), page_settings, token=None, token_env=None,
                                    management_url=ts.management_url)
                with PageServer(config, args.page_port) as page:
                    print(f"serve: ready. Try:\n  curl -T sketch.png {ts.inference_url}/predictions/"
                          f"{release.model_name}\nor draw in the sketch page: {page.url}\n"
                          f"Logs: {ts.workdir / 'logs'}. Press Ctrl-C to stop.", flush=True)
                    while ts.proc is not None and ts.proc.poll() is None:
                        time.sleep(0.5)
                raise UserError(f"TorchServe exited unexpectedly:\n{ts.log_tail(15)}")
        except KeyboardInterrupt:
            print("\nserve: stopped")
        finally:
            signal.signal(signal.SIGTERM, previous)
