"""Release overhead on the demo: what `sempcyc release` (the button) costs once features and the model are built.

In a scratch clone of this repository, on 127.0.0.1: a bare git origin, moto_server as the S3 DVC remote, and one
serving host (a real sshd + TorchServe, sempcyc.testing.hosts) as the deploy target. The demo data is a DVC-tracked tar
(as with your own data), so adding classes is a data commit.

1. `dvc repro` from nothing (timed, not part of the overhead), committed;
2. the first release: version, archive and serve-check again (the version is in the archive), the quality gate,
   commit and tag, `dvc push` of everything, git push, deploy to the host;
3. three classes added that the hash split puts on the unseen side (data commit), the second release: it also
   re-runs extract ... evaluate and gallery for the new classes (features and train stay cached), and scores the
   last release's model on the new test set for the quality gate;
4. a serving setting changed (serve.top_k 30 -> 40), the third release: the steady-state overhead, where only
   archive, serve-check, the pushes and the deploy run.

Prints each release's wall time, its receipt's steps (reports/release.json), the stages it ran with their seconds,
and serve-check's and deploy's own figures. The stages run the clone's code (PYTHONPATH).

Usage: python bench/release.py [--keep DIR]     (about 7 minutes on 2 cores)
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import boto3
import yaml

from common import REPO, Host, demo_tars
from sempcyc.testing.hosts import start_sshd, target_dict, wait_port
from sempcyc.torchserve import free_port

BIN = Path(sys.executable).parent
BUCKET = "bench-bucket"


def timed_lines(cmd: list[str], cwd: Path, env: dict) -> tuple[float, list[tuple[float, str]]]:
    """Run `cmd`, echoing nothing: (wall seconds, [(seconds since start, line)]); exits on failure."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = [(time.perf_counter() - start, line.rstrip()) for line in proc.stdout]
    proc.wait()
    if proc.returncode != 0:
        tail = "\n".join(line for _, line in lines[-30:])
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}) in {cwd}:\n{tail}")
    return time.perf_counter() - start, lines


def stage_seconds(lines: list[tuple[float, str]], end: float) -> dict[str, float]:
    """Seconds of each `dvc repro` stage, from DVC's 'Running stage' line to the next stage or the end of repro
    (the line after its last 'Updating lock file')."""
    marks = [(t, m.group(1)) for t, line in lines if (m := re.match(r"Running stage '([^']+)'", line))]
    done = [t for t, line in lines if line.startswith("Updating lock file")]
    stop = done[-1] if done and marks and done[-1] > marks[-1][0] else end
    return {name: round((marks[i + 1][0] if i + 1 < len(marks) else stop) - t, 1)
            for i, (t, name) in enumerate(marks)}


def git(proj: Path, env: dict, *args: str) -> None:
    subprocess.run(["git", *args], cwd=proj, env=env, check=True, capture_output=True)


def setup_project(work: Path, env: dict, moto_url: str) -> tuple[Path, bytes]:
    """The scratch clone: DVC-tracked demo tar, S3 remote, origin a bare repo; the extended tar for step 3."""
    proj = work / "proj"
    subprocess.run(["git", "clone", "-q", str(REPO), str(proj)], check=True)
    base_tar, ext_tar, _, extra = demo_tars(proj / "params.yaml")
    print(f"classes added before the second release: {', '.join(c.name for c in extra)}")
    (proj / "data").mkdir(exist_ok=True)
    (proj / "data/bench.tar").write_bytes(base_tar)
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["data"]["tar"] = "data/bench.tar"
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc = str(BIN / "dvc")
    for cmd in (["add", "-q", "data/bench.tar"], ["remote", "add", "-d", "storage", f"s3://{BUCKET}/cache"],
                ["remote", "modify", "storage", "endpointurl", moto_url]):
        subprocess.run([dvc, *cmd], cwd=proj, env=env, check=True, capture_output=True)
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(work / "origin.git")], check=True)
    git(proj, env, "remote", "set-url", "origin", str(work / "origin.git"))
    git(proj, env, "add", "-A")
    git(proj, env, "commit", "-qm", "bench: demo data as a tracked tar, S3 remote")
    git(proj, env, "push", "-q", "origin", "main")
    return proj, ext_tar


def add_host(proj: Path, target: dict) -> None:
    """The serving host as the only deploy target, as a person adds hosts after a first `dvc repro`."""
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["deploy"]["targets"] = [target]
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def release(proj: Path, env: dict, label: str) -> None:
    wall, lines = timed_lines([str(BIN / "sempcyc"), "release", "--bump", "minor"], proj, env)
    receipt = json.loads((proj / "reports/release.json").read_text())
    check = json.loads((proj / "reports/serve_check.json").read_text())
    deployed = json.loads((proj / "reports/deploy.json").read_text())
    print(f"\n{label}: {receipt['tag']} in {wall:.1f} s, deploy {receipt['deploy']}")
    print(f"  receipt steps (s): {json.dumps(receipt['timings_s'])}")
    print(f"  stages it ran (s): {json.dumps(stage_seconds(lines, wall))}")
    pushed = next((line for _, line in lines if re.match(r"\d+ files? pushed", line)), "?")
    print(f"  dvc push: {pushed}")
    print(f"  serve-check: ready {check['ready_seconds']} s, its wall {check['wall_seconds']} s, "
          f"p50 {check['latency_ms_p50']} ms")
    for host in deployed.get("targets", []):
        print(f"  deploy {host.get('target')}: {host.get('status')}, {host.get('bytes_sent', 0):,} bytes sent, "
              f"steps {json.dumps(host.get('timings', {}))}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", help="run in this folder and keep it (default: a temporary folder)")
    args = parser.parse_args()
    work = Path(args.keep or tempfile.mkdtemp(prefix="sem-pcyc-release-"))
    if (work / "proj").exists():
        raise SystemExit(f"{work / 'proj'} exists; pass an empty folder")
    work.mkdir(parents=True, exist_ok=True)
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "DVC_", "GIT_"))}
    env = dict(clean, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", DVC_NO_ANALYTICS="1",
               AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
               AWS_EC2_METADATA_DISABLED="true", GIT_AUTHOR_NAME="bench", GIT_AUTHOR_EMAIL="bench@localhost",
               GIT_COMMITTER_NAME="bench", GIT_COMMITTER_EMAIL="bench@localhost")
    port = free_port()
    moto = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    (work / "sshd").mkdir()
    host = None
    try:
        wait_port(port, 30)
        boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", aws_access_key_id="testing",
                     aws_secret_access_key="testing", region_name="us-east-1").create_bucket(Bucket=BUCKET)
        with start_sshd(work / "sshd") as sshd:
            host = Host(work / "host").start()
            proj, ext_tar = setup_project(work, env, f"http://127.0.0.1:{port}")
            env["PYTHONPATH"] = str(proj / "src")
            wall, lines = timed_lines([str(BIN / "dvc"), "repro"], proj, env)
            print(f"dvc repro from nothing: {wall:.0f} s; stages (s): {json.dumps(stage_seconds(lines, wall))}")
            add_host(proj, target_dict(host, sshd, name="bench-host"))
            git(proj, env, "add", "-A")
            git(proj, env, "commit", "-qm", "bench: dvc repro; one serving host")
            release(proj, env, "first release (nothing but the version changed since the repro)")
            (proj / "data/bench.tar").write_bytes(ext_tar)
            subprocess.run([str(BIN / "dvc"), "add", "-q", "data/bench.tar"], cwd=proj, env=env, check=True)
            git(proj, env, "commit", "-qam", "bench: three unseen classes added")
            release(proj, env, "second release (three unseen classes added)")
            params = yaml.safe_load((proj / "params.yaml").read_text())
            params["serve"]["top_k"] = 40
            (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
            git(proj, env, "commit", "-qam", "bench: serve.top_k 40")
            release(proj, env, "third release (a serving setting changed: archive, serve-check, push, deploy)")
    finally:
        if host is not None:
            host.stop()
        moto.terminate()
        moto.wait(timeout=10)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
