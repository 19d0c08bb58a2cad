"""`sempcyc release`: the one release command the GitHub workflow calls (and anyone can run locally).

  preflight (lock, clean work tree, S3 credentials and remote, deploy targets reachable)
  -> dvc update of the imported dataset (to --rev, or the registry's latest)
  -> version = bump of the newest published sem-pcyc@vX.Y.Z tag (GTO's format; first v0.1.0) -> release.version
  -> dvc repro up to serve-check -> quality gate -> git commit (params, dvc.lock, .dvc files, metrics)
  -> annotated tag (its message records the gate's verdict, OVERRIDDEN included) -> dvc push
  -> git push --atomic of branch and tag -> deploy (when deploying).
No host serves a version whose data and tag are not on the remotes: deploy runs only after both pushes. Nothing
is published before the data it points at is in the remote: the tag and dvc.lock reach origin only after
`dvc push` succeeded, in one atomic push. Re-running after any failure finishes the job: finished stages are
cached; a release commit tagged here but not on origin is published; a published release at HEAD with nothing
changed since (same imported data) is deployed (deploy is idempotent on the hosts). A deploy failure after the
publication leaves the release published and says so (exit 1); the rerun finishes the deploy.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import botocore.config
import botocore.exceptions

from .. import params as params_mod
from ..errors import UserError
from ..fsutil import atomic_write_json, sha256_file
from ..gate import Scored, committed_report, gate_note, pin_released, quality_gate, rescore
from ..serving import ReleaseSettings
from ..targets import DeploySettings, parse_targets
from ..vcs import (
    TAG_PREFIX,
    TAG_RE,
    dvc,
    dvc_files,
    imported_data_files,
    parse_tags,
    release_tags,
    remote_commits_missing,
    remote_tags,
    sh,
    tag_of,
    tags_at,
)

# What a release commit records besides the .dvc files: the pipeline state and its (small, uncached) metrics and
# plots, so `dvc metrics diff sem-pcyc@v0.1.0` and the quality gate can read any earlier release from git.
RELEASE_FILES = ["params.yaml", "dvc.lock", "reports/eval", "reports/serve_check.json", "dvclive"]
# The deploy receipt: written after the release is published, so never part of its commit (git ignores it).
DEPLOY_RECEIPT = "reports/deploy.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rev", default="", help="registry revision of the imported dataset (default: latest)")
    parser.add_argument("--bump", choices=("major", "minor", "patch"), default="minor",
                        help="which part of the version to bump (default: %(default)s)")
    deploy = parser.add_mutually_exclusive_group()
    deploy.add_argument("--deploy", dest="deploy", action="store_true", default=True,
                        help="deploy to deploy.targets (default)")
    deploy.add_argument("--no-deploy", dest="deploy", action="store_false", help="skip the deploy stage")
    parser.add_argument("--override-gate", action="store_true", help="release even if the quality gate fails")
    parser.add_argument("--git-remote", default="origin", help="git remote to push to (default: %(default)s)")
    parser.add_argument("--no-push", action="store_true", help="do everything locally; push nothing")
    parser.add_argument("--lock-wait", type=float, default=0, metavar="SECONDS",
                        help="wait this long for another release's lock (default: stop at once)")


# ----------------------------------------------------------------------------------------------- pure core

def next_version(tags: list[str], bump: str) -> str:
    versions = parse_tags(tags)
    if not versions:
        return "0.1.0"
    major, minor, patch = versions[-1]
    if bump == "major":
        return f"{major + 1}.0.0"
    if bump == "minor":
        return f"{major}.{minor + 1}.0"
    return f"{major}.{minor}.{patch + 1}"


def set_release_version(params_text: str, version: str) -> str:
    """Rewrite `version:` inside the `release:` block, keeping comments and layout."""
    out, in_release, done = [], False, False
    for line in params_text.splitlines(keepends=True):
        if re.match(r"^\S", line):
            in_release = line.startswith("release:")
        if in_release and not done and re.match(r"^\s+version:", line):
            indent, rest = re.match(r"^(\s+)version:\s*\S*(.*)$", line.rstrip("\n")).groups()
            line = f"{indent}version: {version}{rest}\n"
            done = True
        out.append(line)
    if not done:
        raise UserError("params.yaml: no release.version to update; add `release:\\n  version: 0.0.0`")
    return "".join(out)


def real_changes(dirty: list[str], params_name: str, head_params: str | None, work_params: str | None,
                 imported: set[str]) -> list[str]:
    """The uncommitted paths that are a person's changes, not leftovers of a release that stopped before its
    commit (quality gate, a failed stage or deploy): those rewrite only release.version in the params file, the
    pipeline's records (dvc.lock, metrics, plots, receipts) and the imported data's .dvc files, and the rerun
    rewrites them all. Anything else, including any other params change, must be committed or stashed first."""
    generated = [f for f in RELEASE_FILES if f != "params.yaml"] + [DEPLOY_RECEIPT]
    real = []
    for path in dirty:
        if path == params_name:
            try:
                same = head_params is not None and work_params is not None and \
                    set_release_version(head_params, "0.0.0") == set_release_version(work_params, "0.0.0")
            except UserError:
                same = False
            if not same:
                real.append(path)
        elif path not in imported and not any(path == f or path.startswith(f + "/") for f in generated):
            real.append(path)
    return real


# ------------------------------------------------------------------------------------------------ I/O shell

def step(message: str) -> None:
    print(f"release: {message}", flush=True)


@contextlib.contextmanager
def release_lock(wait_s: float):
    """One release at a time per checkout (the workflow's concurrency group does the same on GitHub)."""
    git_dir = Path(sh("git", "rev-parse", "--git-dir").stdout.strip())
    path = git_dir / "sem-pcyc-release.lock"
    handle = open(path, "a+")
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                handle.seek(0)
                holder = handle.read().strip() or "unknown"
                handle.close()
                raise UserError(f"another release is running (lock {path}, held by {holder}); wait for it or "
                                "rerun with --lock-wait SECONDS") from None
            time.sleep(0.5)
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} since {time.strftime('%Y-%m-%dT%H:%M:%S')}")
    handle.flush()
    try:
        yield
    finally:
        handle.truncate(0)
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def remote_config() -> dict:
    """The default DVC remote's url and settings (from the merged config)."""
    out = dvc("config", "--list").stdout
    conf = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    name = conf.get("core.remote")
    if not name:
        return {}
    return {"name": name, **{k.split(".", 2)[2]: v for k, v in conf.items() if k.startswith(f"remote.{name}.")}}


def check_s3(remote: dict) -> None:
    url = remote.get("url", "")
    if not url.startswith("s3://"):
        return
    session = boto3.session.Session()
    if session.get_credentials() is None:
        raise UserError("no AWS credentials for the DVC remote: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                        "(or AWS_PROFILE) in the environment; never commit them to .dvc/config")
    bucket = url[5:].split("/", 1)[0]
    endpoint = remote.get("endpointurl") or os.environ.get("AWS_ENDPOINT_URL_S3") or None
    client = session.client("s3", endpoint_url=endpoint,
                            config=botocore.config.Config(connect_timeout=10, read_timeout=20,
                                                          retries={"max_attempts": 2}))
    try:
        client.head_bucket(Bucket=bucket)
    except botocore.exceptions.ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "?")
        hint = {"403": "the credentials are not allowed to use it", "404": "it does not exist"}.get(code, "")
        raise UserError(f"DVC remote {url}: bucket check failed ({code}) {hint}".strip()) from None
    except botocore.exceptions.BotoCoreError as exc:
        raise UserError(f"DVC remote {url} is not reachable ({exc})") from None


def check_targets_reachable(deploy: DeploySettings, model_name: str) -> None:
    for t in parse_targets(deploy, model_name):
        try:
            with socket.create_connection((t.host, t.port), timeout=t.connect_timeout):
                pass
        except OSError as exc:
            raise UserError(f"deploy target {t.name} ({t.host}:{t.port}) is not reachable: {exc}; fix it or "
                            "release with --no-deploy") from None


def comparable_previous(r: ReleaseRun, tag: str | None, test_set: str | None) -> Scored | None:
    """The last release's reports on the test set `test_set` names: its committed ones when they were measured on
    the same one and hold per-query APs; otherwise (classes added, data changed, or reports older than the digest
    or the per-query APs) its model scored again on this test set, so the gate pairs the same queries. None: no
    earlier release, or (only with --override-gate) its model could not be scored."""
    previous = committed_report(tag)
    if previous is None or (previous.metrics.get("test_set") == test_set and previous.per_query is not None):
        return previous
    same = previous.metrics.get("test_set") == test_set
    step(f"{'no per-query APs in ' + tag + ' (an older release)' if same else 'the test set changed since ' + tag}"
         f": scoring {tag}'s model on this one for the quality gate")
    since = time.perf_counter()
    rescored, failure = rescore(tag, r.params_path)
    r.time("rescore_last_release", since)
    if rescored is None and not r.args.override_gate:
        raise UserError(f"could not score {tag}'s model on this test set ({failure}); nothing deployed, pushed "
                        "or tagged; rerun with --override-gate to release without comparing with it")
    if rescored is None:
        step(f"could not score {tag}'s model on this test set ({failure}); overridden: no comparison with it")
    return rescored


@dataclass
class ReleaseRun:
    """One release run: its arguments, settings, and the timings the receipt reports."""
    args: argparse.Namespace
    params_path: Path
    settings: ReleaseSettings
    deploy: DeploySettings
    started: float = field(default_factory=time.perf_counter)
    timings: dict[str, float] = field(default_factory=dict)

    def lap(self, name: str) -> None:
        """Record the time since the previous lap under `name`."""
        self.timings[name] = round(time.perf_counter() - self.started - sum(self.timings.values()), 2)

    def time(self, name: str, since: float) -> None:
        self.timings[name] = round(time.perf_counter() - since, 2)


def run(args: argparse.Namespace) -> None:
    params_path = Path(args.params)
    if sh("git", "rev-parse", "--show-toplevel", check=False).returncode != 0:
        raise UserError("not inside a git repository; run from the project checkout")
    os.chdir(sh("git", "rev-parse", "--show-toplevel").stdout.strip())
    # DVC runs the stages' `sempcyc <stage>` commands through the shell: they must be this environment's, also
    # when `.venv/bin/sempcyc release` runs without the venv activated (as scripts/release.sh puts it on PATH)
    os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
    with release_lock(args.lock_wait):
        settings, deploy = params_mod.read(params_path, ReleaseSettings, DeploySettings)
        release(ReleaseRun(args, params_path, settings, deploy))


def release(r: ReleaseRun) -> None:
    """preflight -> finish what an earlier run left (publish the unpublished release tagged at HEAD, or deploy the
    published one when nothing changed since) or build a new release (update, version, build, gate, commit and
    tag) -> publish (dvc push, atomic git push) -> deploy; then reports/release.json."""
    announce(r)
    branch = preflight(r)
    r.lap("preflight")
    tag, published = head_release(r)
    built = False
    if tag and not published:
        step(f"HEAD is already tagged {tag}; finishing its publication")
    else:
        update_imports(r)
        if tag and sh("git", "diff", "--quiet", "HEAD", check=False).returncode == 0:
            step(f"HEAD is {tag}, already published, and nothing changed since (same imported data): "
                 "finishing its deploy")
        else:
            tag, published, built = build_and_tag(r), False, True
    if not published and not r.args.no_push:
        publish(r, branch, tag)
    r.lap("publish")
    deployed = deploy_release(r, restore=not built)
    where = "tagged here (--no-push)" if r.args.no_push else f"published on {r.args.git_remote}"
    Path("reports").mkdir(exist_ok=True)
    Path("reports/release.json").write_text(json.dumps(
        {"version": tag[len(TAG_PREFIX):], "tag": tag, "commit": sh("git", "rev-parse", "HEAD").stdout.strip(),
         "published": not r.args.no_push, "deploy": deployed, "timings_s": r.timings}, indent=1) + "\n")
    if deployed == "failed":
        raise UserError(f"{tag} is released ({where}) but its deploy failed (receipt {DEPLOY_RECEIPT}); rerun the "
                        "release with the same inputs to finish the deploy")
    step(f"done: {tag} {where}, deploy {deployed}, in {time.perf_counter() - r.started:.0f} s "
         f"({json.dumps(r.timings)})")


def announce(r: ReleaseRun) -> None:
    """The release's first line: where it will publish (git remote and branch, DVC remote), before anything runs."""
    branch = sh("git", "rev-parse", "--abbrev-ref", "HEAD").stdout.strip()
    if r.args.no_push:
        step(f"releasing branch {branch} here (--no-push): nothing will be pushed")
        return
    url = sh("git", "remote", "get-url", r.args.git_remote, check=False).stdout.strip() or "not configured"
    url = re.sub(r"//[^/@]*@", "//", url)  # never print credentials a URL may carry (https://user:token@host/...)
    remote = remote_config()
    data = f"DVC remote {remote['name']} ({remote.get('url', '?')})" if remote else "the DVC remote (none configured)"
    step(f"will push branch {branch} and its release tag to git remote {r.args.git_remote} ({url}), and the data "
         f"to {data}")


def preflight(r: ReleaseRun) -> str:
    """Refuse to start when the tree has a person's uncommitted changes, the checkout is behind origin, or the
    S3 remote or a deploy host is unreachable; the branch to release."""
    check_clean_tree(r.params_path)
    branch = sh("git", "rev-parse", "--abbrev-ref", "HEAD").stdout.strip()
    if branch == "HEAD":
        raise UserError("HEAD is detached; check out the branch to release from")
    if not r.args.no_push:
        check_remotes(r.args.git_remote, branch)
    if r.args.deploy:
        check_targets_reachable(r.deploy, r.settings.model_name)
    return branch


def check_clean_tree(params_path: Path) -> None:
    dirty = [p for p in sh("git", "diff", "--name-only", "--no-renames", "-z", "HEAD").stdout.split("\0") if p]
    if not dirty:
        return
    head_params = sh("git", "show", f"HEAD:{params_path.as_posix()}", check=False)
    real = real_changes(dirty, params_path.as_posix(),
                        head_params.stdout if head_params.returncode == 0 else None,
                        params_path.read_text(encoding="utf-8") if params_path.is_file() else None,
                        {str(p) for p in imported_data_files()})
    if real:
        raise UserError("the work tree has uncommitted changes (" + ", ".join(real[:5])
                        + (", ..." if len(real) > 5 else "") + "); commit or stash them first")
    step("continuing after an unfinished release (its uncommitted leftovers are rewritten): " + ", ".join(dirty[:5])
         + (", ..." if len(dirty) > 5 else ""))


def check_remotes(git_remote: str, branch: str) -> None:
    remote = remote_config()
    if not remote:
        raise UserError("no default DVC remote (dvc remote add -d ...); releases push their data there")
    check_s3(remote)
    if sh("git", "remote", "get-url", git_remote, check=False).returncode != 0:
        raise UserError(f"git remote {git_remote!r} not found")
    # the next version is computed from the tags: make sure they include every published release, and that
    # this checkout is not behind the branch it will push to (another release may have landed meanwhile)
    sh("git", "fetch", "--quiet", "--tags", git_remote)
    behind = remote_commits_missing(git_remote, branch)
    if behind:
        raise UserError(f"{git_remote}/{branch} has {behind} commit(s) this checkout lacks (another release "
                        f"or push landed); update first (git pull --ff-only {git_remote} {branch}), then "
                        "release again")


def head_release(r: ReleaseRun) -> tuple[str | None, bool]:
    """The newest release tag at HEAD, and whether it is published (on origin; with --no-push a local tag counts,
    as nothing is pushed): (None, False) when HEAD is not a release."""
    here = [t for t in tags_at("HEAD") if TAG_RE.match(t)]
    if not here:
        return None, False
    if r.args.no_push:
        return tag_of(parse_tags(here)[-1]), True
    head = sh("git", "rev-parse", "HEAD").stdout.strip()
    published = remote_tags(r.args.git_remote)
    for t in here:
        if t in published and published[t] != head:
            raise UserError(f"{t} already exists on {r.args.git_remote} for another commit; another release took "
                            "this version. Fetch, reset to the remote branch, and release again")
    unfinished = [t for t in here if t not in published]
    return tag_of(parse_tags(unfinished or here)[-1]), not unfinished


def update_imports(r: ReleaseRun) -> None:
    for dvc_file in imported_data_files():
        step(f"dvc update {dvc_file}" + (f" --rev {r.args.rev}" if r.args.rev else ""))
        dvc("update", *(["--rev", r.args.rev] if r.args.rev else []), str(dvc_file))
    r.lap("update")


def build_and_tag(r: ReleaseRun) -> str:
    """Pick the version, build and check it, gate, commit and tag; the tag."""
    # versions count from the published tags: a local tag of a release that never reached origin (a runner's
    # fresh checkout abandons its commit) is reused rather than skipped
    tags = release_tags() if r.args.no_push else list(remote_tags(r.args.git_remote))
    released = [t for t in tags if TAG_RE.match(t)]
    last_tag = tag_of(parse_tags(released)[-1]) if released else None
    version = next_version(released, r.args.bump)
    r.params_path.write_text(set_release_version(r.params_path.read_text(encoding="utf-8"), version),
                             encoding="utf-8")
    step(f"version {version} (last release: {last_tag or 'none'})")
    return commit_and_tag(version, build_and_gate(r, last_tag))


def build_and_gate(r: ReleaseRun, last_tag: str | None) -> str:
    """dvc repro through evaluate and serve-check, then the quality gate; the gate's verdict (gate_note)."""
    since = time.perf_counter()
    # evaluate is not upstream of serve-check (nor of deploy): name it, the quality gate reads its metrics
    step("dvc repro (evaluate, and through serve-check)")
    dvc("repro", "evaluate", "serve-check", capture=False)
    r.time("repro_through_serve_check", since)
    metrics, per_query = (json.loads(Path(f"reports/eval/{name}.json").read_text(encoding="utf-8"))
                          for name in ("metrics", "per_query_ap"))
    verdict = quality_gate(metrics, per_query, comparable_previous(r, last_tag, metrics.get("test_set")), r.settings)
    atomic_write_json("reports/gate.json", {**verdict.record, "last_release": last_tag,
                                            "overridden": not verdict.passed and r.args.override_gate})
    if not verdict.passed and not r.args.override_gate:
        raise UserError(f"quality gate: {verdict.why}. Nothing deployed, pushed or tagged; rerun with "
                        "--override-gate to release anyway")
    pin_released(sha256_file("models/sem_pcyc.pt"))  # its evaluate embeddings outlive experiments and newer models
    note = gate_note(verdict.passed, verdict.why)
    step(note)
    return note


def commit_and_tag(version: str, note: str) -> str:
    """Commit the release files and tag, locally: nothing is published before `dvc push` succeeded, and if it
    fails, the tree is clean and a rerun finds this tagged commit and finishes its publication."""
    tag = f"{TAG_PREFIX}{version}"
    files = [f for f in RELEASE_FILES + [str(p) for p in dvc_files()] if Path(f).exists()]
    sh("git", "add", "--", *files)
    if sh("git", "diff", "--cached", "--quiet", check=False).returncode != 0:
        sh("git", "commit", "-q", "-m", f"ReleaseRun {tag}\n\n{note}")
    # -f: a same-named local tag can only be an abandoned, unpublished attempt (versions count from origin's tags)
    sh("git", "tag", "-a", "-f", tag, "-m", f"SEM-PCYC {version}\n\n{note}")
    step(f"committed and tagged {tag}")
    return tag


def publish(r: ReleaseRun, branch: str, tag: str) -> None:
    """dvc push, then one atomic git push of branch and tag (both or neither)."""
    remote = r.args.git_remote
    remote_sha = remote_tags(remote).get(tag)
    if remote_sha and remote_sha != sh("git", "rev-parse", "HEAD").stdout.strip():
        raise UserError(f"{tag} already exists on {remote} for another commit; another release "
                        "took this version. Fetch, and release again")
    since = time.perf_counter()
    step("dvc push")
    dvc("push", capture=False)  # the data dvc.lock names, before the branch and tag reach the remote
    r.time("dvc_push", since)
    pushed = sh("git", "push", "--atomic", remote, f"HEAD:refs/heads/{branch}", f"refs/tags/{tag}", check=False)
    if pushed.returncode != 0:
        if remote_commits_missing(remote, branch):
            raise UserError(f"{remote}/{branch} moved while this release ran (another release?); "
                            f"nothing was published. Reset to {remote}/{branch} (the local {tag} and "
                            "release commit can be deleted) and release again")
        detail = " ".join((pushed.stderr or pushed.stdout).split())[-500:]
        raise UserError(f"git push of {branch} and {tag} to {remote} failed, nothing deployed: {detail}; the "
                        f"release commit and {tag} stay here: rerun the release to publish and deploy them")
    step(f"pushed {branch} and {tag} to {remote}")


def deploy_release(r: ReleaseRun, restore: bool) -> str:
    """Deploy HEAD's archive, after its publication: 'ok', 'failed' or 'skipped'. Runs the deploy stage's command
    itself rather than `dvc repro deploy`, which would rewrite dvc.lock after the release commit."""
    if not r.args.deploy:
        return "skipped"
    since = time.perf_counter()
    if restore:
        # not built by this run: the archive and the dataset (the smoke query's sketch; its top-10 is in the
        # committed serve-check report) from the DVC cache or remote, nothing else. A plain `dvc pull` would also
        # want outputs of stages this project never runs (demo-data when data.tar is imported) and fail on them
        command = ["checkout" if r.args.no_push else "pull", "models/sem_pcyc.mar", "data/dataset"]
        step("dvc " + " ".join(command))
        dvc(*command)
    step("deploy")
    proc = sh(str(Path(sys.executable).parent / "sempcyc"), "deploy", "--params", str(r.params_path),
              "--mar", "models/sem_pcyc.mar", "--out", DEPLOY_RECEIPT, check=False, capture=False)
    r.time("deploy", since)
    return "ok" if proc.returncode == 0 else "failed"
