"""`sempcyc serve`: the built archive in TorchServe, in the foreground on localhost, for a person to try."""
from __future__ import annotations

import argparse
import shutil
import signal
import tempfile
import time
from pathlib import Path

from . import params as params_mod
from .errors import UserError
from .serving import ReleaseSettings, ServeSettings, models_config
from .torchserve import TorchServe, free_port, port_in_use


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mar", default="models/sem_pcyc.mar", help="archive (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8080, help="inference port; another free one is picked if "
                                                               "it is taken (default: %(default)s)")
    parser.add_argument("--management-port", type=int, default=8081, help="management port (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default: %(default)s)")


def run(args: argparse.Namespace) -> None:
    release, serve = params_mod.read(args.params, ReleaseSettings, ServeSettings)
    mar = Path(args.mar)
    if not mar.exists():
        raise UserError(f"{mar}: not found; build it with `dvc repro archive`")
    ports = {}
    for label, wanted in (("inference", args.port), ("management", args.management_port)):
        if port_in_use(wanted):
            ports[label] = free_port()
            print(f"serve: port {wanted} is in use; using {ports[label]} for the {label} API")
        else:
            ports[label] = wanted
    with tempfile.TemporaryDirectory(prefix="sem-pcyc-serve-") as tmp:
        store = Path(tmp) / "model-store"
        store.mkdir()
        shutil.copy2(mar, store / mar.name)
        models = models_config(release.model_name, release.version, mar.name, serve.batch_size,
                               serve.max_batch_delay_ms, workers=args.workers)
        ts = TorchServe(store, models, workdir=Path(tmp) / "ts", inference_port=ports["inference"],
                        management_port=ports["management"])
        previous = signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        try:
            with ts:
                print(f"serve: starting TorchServe with {mar} (v{release.version}) ...")
                ts.wait_ready(release.model_name, serve.ready_timeout_s)
                print(f"serve: ready. Try:\n  curl -T sketch.png {ts.inference_url}/predictions/{release.model_name}\n"
                      f"Logs: {ts.workdir / 'logs'}. Press Ctrl-C to stop.", flush=True)
                while ts.proc is not None and ts.proc.poll() is None:
                    time.sleep(0.5)
                raise UserError(f"TorchServe exited unexpectedly:\n{ts.log_tail(15)}")
        except KeyboardInterrupt:
            print("\nserve: stopped")
        finally:
            signal.signal(signal.SIGTERM, previous)
