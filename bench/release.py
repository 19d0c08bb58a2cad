"""Release overhead and the quality gate on the demo: what `sempcyc release` (the button) costs once features and
the model are built, and what its gate decides on the two daily paths.

In a scratch clone of this repository, on 127.0.0.1: a bare git origin, moto_server as the S3 DVC remote, and one
serving host (a real sshd + TorchServe, sempcyc.testing.hosts) as the deploy target. The demo data is a DVC-tracked tar
(as with your own data), so adding classes is a data commit.

1. `dvc repro` from nothing (timed, not part of the overhead; its evaluate is a full one, from a cold cache),
   committed;
2. the first release: version, archive and serve-check again (the version is in the archive), the quality gate,
   commit and tag, `dvc push` of everything, git push, deploy to the host;
3. one class added that the hash split puts on the unseen side (data commit) and features.seed and train.seed
   0 -> 1: a second training of the same training data (the tuned blocks too: with the transfer preset the model
   retrieves with their features, so train.seed alone leaves retrieval as it was), which the gate must pass
   without --override-gate. It re-runs extract ... evaluate and gallery and re-scores the last release's model on
   the new test set: the re-score's time against the full evaluate of step 1;
4. a clearly worse model: features.tune_blocks 5 -> 0 (the backbone's ImageNet features, untuned): the gate must
   refuse it (the change is then dropped);
5. a serving setting changed (serve.top_k 30 -> 40): the steady-state overhead, where only archive, serve-check,
   the pushes and the deploy run.

Prints each release's wall time, its receipt's steps (reports/release.json), the stages it ran with their seconds,
the gate's verdict (reports/gate.json), and serve-check's and deploy's own figures. The stages run the clone's code
(PYTHONPATH), so commit first.

Usage: python bench/release.py [--keep DIR] [--classes N]   (the full demo, 100 classes: about 50 minutes on 2
busy cores; a smaller demo has few unseen classes, whose zero-shot task the baselines may already solve)
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


def timed_lines(cmd: list[str], cwd: Path, env: dict, check: bool = True) -> tuple[float, list[tuple[float, str]]]:
    """Run `cmd`, echoing nothing: (wall seconds, [(seconds since start, line)]); with `check`, exits on failure,
    else the last line is ("exit", its status)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = [(time.perf_counter() - start, line.rstrip()) for line in proc.stdout]
    proc.wait()
    if proc.returncode != 0 and check:
        tail = "\n".join(line for _, line in lines[-30:])
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}) in {cwd}:\n{tail}")
    return time.perf_counter() - start, lines + ([] if check else [("exit", str(proc.returncode))])


def stage_seconds(lines: list[tuple[float, str]], end: float) -> dict[str, float]:
    """Seconds of each `dvc repro` stage, from DVC's 'Running stage' line to the next stage or the end of repro
    (the line after its last 'Updating lock file')."""
    lines = [(t, line) for t, line in lines if t != "exit"]
    marks = [(t, m.group(1)) for t, line in lines if (m := re.match(r"Running stage '([^']+)'", line))]
    done = [t for t, line in lines if line.startswith("Updating lock file")]
    stop = done[-1] if done and marks and done[-1] > marks[-1][0] else end
    return {name: round((marks[i + 1][0] if i + 1 < len(marks) else stop) - t, 1)
            for i, (t, name) in enumerate(marks)}


def git(proj: Path, env: dict, *args: str) -> None:
    subprocess.run(["git", *args], cwd=proj, env=env, check=True, capture_output=True)


def edit_params(proj: Path, **sections: dict) -> None:
    params = yaml.safe_load((proj / "params.yaml").read_text())
    for section, values in sections.items():
        params[section].update(values)
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def setup_project(work: Path, env: dict, moto_url: str, classes: int) -> tuple[Path, bytes, str]:
    """The scratch clone: a demo of `classes` classes as a DVC-tracked tar, S3 remote, origin a bare repo; the
    tar with one more class on the unseen side for step 3, and that class's name."""
    from pipeline import split_tar  # imported here to leave the module's import header as it is

    from sempcyc.datasets.demo import available_classes

    proj = work / "proj"
    subprocess.run(["git", "clone", "-q", str(REPO), str(proj)], check=True)
    git(proj, env, "checkout", "-q", "-B", "main")  # whichever branch this checkout is on, the release is of main
    edit_params(proj, demo={"classes": classes})
    base_tar, ext_tar, demo, extra = demo_tars(proj / "params.yaml")
    added, base = extra[0].name, {c.name for c in available_classes()[:demo.classes]}
    _, one_more = split_tar(ext_tar, base, base | {added})
    (proj / "data").mkdir(exist_ok=True)
    (proj / "data/bench.tar").write_bytes(base_tar)
    edit_params(proj, data={"tar": "data/bench.tar"})
    dvc = str(BIN / "dvc")
    for cmd in (["add", "-q", "data/bench.tar"], ["remote", "add", "-d", "storage", f"s3://{BUCKET}/cache"],
                ["remote", "modify", "storage", "endpointurl", moto_url]):
        subprocess.run([dvc, *cmd], cwd=proj, env=env, check=True, capture_output=True)
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(work / "origin.git")], check=True)
    git(proj, env, "remote", "set-url", "origin", str(work / "origin.git"))
    git(proj, env, "add", "-A")
    git(proj, env, "commit", "-qm", f"bench: demo data ({classes} classes) as a tracked tar, S3 remote")
    git(proj, env, "push", "-q", "origin", "main")
    return proj, one_more, added


def add_host(proj: Path, target: dict) -> None:
    """The serving host as the only deploy target, as a person adds hosts after a first `dvc repro`."""
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["deploy"]["targets"] = [target]
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def gate_lines(proj: Path) -> list[str]:
    """The gate's verdict (reports/gate.json): each figure against the last release, and its warnings."""
    gate = json.loads((proj / "reports/gate.json").read_text())
    if not gate.get("figures"):
        return [f"  gate: {'passed' if gate['passed'] else 'refused'}: {gate['reason']}"]
    lines = [f"  gate: {'passed' if gate['passed'] else 'REFUSED'} against {gate['last_release']} on "
             f"{gate['unseen_classes']} unseen classes ({gate['unseen_queries']} queries), {gate['seen_classes']} seen "
             f"({gate['seen_queries']} queries); tolerance {gate['tolerance']}, {gate['confidence']:.0%} intervals"]
    lines += [f"    {name}: {f['new']:.4f} vs {f['last']:.4f}, new - last {f['new_minus_last']:+.4f}, interval "
              f"[{f['low']:+.4f}, {f['high']:+.4f}]" for name, f in gate["figures"].items()]
    return lines + [f"    warning: {w}" for w in gate["warnings"]]


def release(proj: Path, env: dict, label: str) -> dict:
    """A release with the button's defaults; its receipt, plus the lines the re-score's evaluate printed."""
    wall, lines = timed_lines([str(BIN / "sempcyc"), "release", "--bump", "minor"], proj, env)
    receipt = json.loads((proj / "reports/release.json").read_text())
    check = json.loads((proj / "reports/serve_check.json").read_text())
    deployed = json.loads((proj / "reports/deploy.json").read_text())
    print(f"\n{label}: {receipt['tag']} in {wall:.1f} s, deploy {receipt['deploy']}")
    print(f"  first line: {lines[0][1]}")
    print(f"  receipt steps (s): {json.dumps(receipt['timings_s'])}")
    print(f"  stages it ran (s): {json.dumps(stage_seconds(lines, wall))}")
    print("\n".join(gate_lines(proj)))
    pushed = next((line for _, line in lines if re.match(r"\d+ files? pushed", line)), "?")
    print(f"  dvc push: {pushed}")
    print(f"  serve-check: ready {check['ready_seconds']} s, its wall {check['wall_seconds']} s, "
          f"p50 {check['latency_ms_p50']} ms")
    for host in deployed.get("targets", []):
        print(f"  deploy {host.get('target')}: {host.get('status')}, {host.get('bytes_sent', 0):,} bytes sent, "
              f"steps {json.dumps(host.get('timings', {}))}")
    return {**receipt, "evaluate_lines": [line for _, line in lines if re.match(r"evaluate: \d+ test items", line)]}


def refused_release(proj: Path, env: dict, label: str) -> None:
    """A release the gate should refuse: its error line and the gate's figures; then the tree as it was."""
    wall, lines = timed_lines([str(BIN / "sempcyc"), "release", "--bump", "minor"], proj, env, check=False)
    status = lines[-1][1]
    error = next((line for _, line in lines if line.startswith("sempcyc release: error:")), "(no error line)")
    print(f"\n{label}: exit {status} in {wall:.1f} s\n  {error}")
    print("\n".join(gate_lines(proj)))
    git(proj, env, "reset", "-q", "--hard", "HEAD")


def rescore_share(full_evaluate: float, receipt: dict) -> None:
    rescore = receipt["timings_s"].get("rescore_last_release")
    if rescore is None:
        print("  (no re-score: the test set did not change)")
        return
    print(f"  re-score of the last release: {rescore:.1f} s = {100 * rescore / full_evaluate:.1f} % of a full "
          f"evaluate ({full_evaluate:.1f} s, cold cache, in the dvc repro from nothing); its count line: "
          f"{receipt['evaluate_lines'][-1] if receipt['evaluate_lines'] else '?'}")


def releases(proj: Path, env: dict, sshd: dict, host: Host, one_more: bytes, added: str) -> None:
    """Steps 1-5 of the module docstring."""
    wall, lines = timed_lines([str(BIN / "dvc"), "repro"], proj, env)
    stages = stage_seconds(lines, wall)
    print(f"dvc repro from nothing: {wall:.0f} s; stages (s): {json.dumps(stages)}")
    print("  " + next(line for _, line in lines if re.match(r"evaluate: \d+ test items", line)))
    add_host(proj, target_dict(host, sshd, name="bench-host"))
    git(proj, env, "add", "-A")
    git(proj, env, "commit", "-qm", "bench: dvc repro; one serving host")
    release(proj, env, "first release (nothing but the version changed since the repro)")
    (proj / "data/bench.tar").write_bytes(one_more)
    subprocess.run([str(BIN / "dvc"), "add", "-q", "data/bench.tar"], cwd=proj, env=env, check=True)
    edit_params(proj, features={"seed": 1}, train={"seed": 1})
    git(proj, env, "commit", "-qam", f"bench: class {added} added (unseen side); features.seed and train.seed 1")
    rescore_share(stages["evaluate"], release(proj, env, f"second release ({added} added, the model trained again "
                                                         "with other seeds)"))
    edit_params(proj, features={"tune_blocks": 0})
    git(proj, env, "commit", "-qam", "bench: features.tune_blocks 0 (a clearly worse model)")
    refused_release(proj, env, "a clearly worse model (features untuned)")
    git(proj, env, "reset", "-q", "--hard", "HEAD~1")
    edit_params(proj, serve={"top_k": 40})
    git(proj, env, "commit", "-qam", "bench: serve.top_k 40")
    release(proj, env, "third release (a serving setting changed: archive, serve-check, push, deploy)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", help="run in this folder and keep it (default: a temporary folder)")
    parser.add_argument("--classes", type=int, default=100, help="demo classes (default: %(default)s)")
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
            proj, one_more, added = setup_project(work, env, f"http://127.0.0.1:{port}", args.classes)
            env["PYTHONPATH"] = str(proj / "src")
            releases(proj, env, sshd, host, one_more, added)
    finally:
        if host is not None:
            host.stop()
        moto.terminate()
        moto.wait(timeout=10)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
