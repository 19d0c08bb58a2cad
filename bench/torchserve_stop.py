"""How a foreground TorchServe stops (the facts docs/torchserve.service relies on), with the real TorchServe:

1. SIGTERM to the `torchserve --start --foreground` wrapper alone: does Java keep running?
2. `torchserve --stop --foreground` (same TMPDIR, where the pid file is): how long until Java and the wrapper exit?
3. SIGTERM to every process of the group, as systemd's KillMode=control-group does: is anything left?

Usage: python bench/torchserve_stop.py      (about 30 s)
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

from sempcyc.torchserve import free_port, free_worker_port

TORCHSERVE = str(Path(sys.executable).parent / "torchserve")


def start(root: Path) -> tuple[subprocess.Popen, list[psutil.Process], dict]:
    """TorchServe in the foreground from its own config and TMPDIR: (wrapper, its Java processes, environment)."""
    for sub in ("tmp", "store"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    inference = free_port()
    (root / "config.properties").write_text(
        f"inference_address=http://127.0.0.1:{inference}\nmanagement_address=http://127.0.0.1:{free_port()}\n"
        f"metrics_address=http://127.0.0.1:{free_port()}\ngrpc_inference_port={free_port()}\n"
        f"grpc_management_port={free_port()}\ninitial_worker_port={free_worker_port()}\n"
        f"model_store={root / 'store'}\ndisable_token_authorization=true\nallowed_urls=^$\n")
    env = dict(os.environ, TMPDIR=str(root / "tmp"))
    wrapper = subprocess.Popen([TORCHSERVE, "--start", "--foreground", "--ncs", "--ts-config",
                                str(root / "config.properties")], cwd=root, env=env, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{inference}/ping", timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    java = [p for p in psutil.Process(wrapper.pid).children(recursive=True) if "java" in p.name()]
    return wrapper, java, env


def running(procs: list[psutil.Process]) -> list[int]:
    return [p.pid for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def stop(root: Path, env: dict) -> float:
    started = time.monotonic()
    subprocess.run([TORCHSERVE, "--stop", "--foreground"], cwd=root, env=env, capture_output=True, timeout=120)
    return time.monotonic() - started


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    base = Path(tempfile.mkdtemp(prefix="sem-pcyc-ts-stop-"))
    leftovers = []
    try:
        wrapper, java, env = start(base / "1")
        leftovers += java
        wrapper.terminate()
        wrapper.wait(30)
        time.sleep(3)
        print(f"1. SIGTERM to the wrapper alone: wrapper exit {wrapper.returncode}, Java still running: "
              f"{running(java) or 'none'}")
        print(f"   then `torchserve --stop --foreground` ({stop(base / '1', env):.1f} s): Java running: "
              f"{running(java) or 'none'}")
        wrapper, java, env = start(base / "2")
        leftovers += java
        took = stop(base / "2", env)
        wrapper.wait(30)
        print(f"2. `torchserve --stop --foreground`: {took:.1f} s, wrapper exit {wrapper.returncode}, Java running: "
              f"{running(java) or 'none'}")
        wrapper, java, env = start(base / "3")
        leftovers += java
        os.killpg(wrapper.pid, signal.SIGTERM)
        wrapper.wait(30)
        time.sleep(3)
        print(f"3. SIGTERM to the whole group: wrapper exit {wrapper.returncode}, Java running: "
              f"{running(java) or 'none'}")
    finally:
        for proc in leftovers:
            try:
                proc.kill()
            except psutil.Error:
                pass
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
