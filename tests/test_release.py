"""The release end to end, exactly as the workflow runs it (`bash scripts/release.sh`, RELEASE_* env), on 127.0.0.1.

  moto_server (S3)  <- registry-bucket: the data registry's DVC remote (endpointurl committed in its .dvc/config)
                    <- project-bucket:  the project's DVC remote
  registry (git + DVC, data.tar)  --dvc import file://...-->  project (a copy of this repo's pipeline)
  origin (bare git)  <- the release pushes its commit and tag here
  sshd + a TorchServe "serving host" (tests/hosts.py)  <- the release deploys here

Small everywhere: 12 classes x 4 images x 4 sketches, tiny CNN, 32-px arrays, a few iterations, one torch thread.
The story test (first release, then three new unseen classes -> second release without retraining, then both
releases' archives fetched with `dvc artifacts get`) comes first;
the safety tests work on fresh clones of origin with the same S3, registry, host and DVC cache. The release's pure
core (versions, leftovers of an unfinished release) has its unit tests at the end; the quality gate's are in
test_gate.py.
"""
from __future__ import annotations

import fcntl
import hashlib
import http.client
import http.server
import json
import os
import re
import shutil
import stat
import subprocess
import threading
import time
import zipfile
from pathlib import Path

import boto3
import pytest
import yaml

from helpers import (
    CLASSES,
    PER_CLASS,
    PIPELINE_OVERRIDES,
    REPO,
    SALT,
    TEST_FRACTION,
    VENV_BIN,
    class_files,
    merged,
    write_tar,
)
from hosts import Host, target_dict, wait_port
from sempcyc.commands.release import gate_note, next_version, real_changes, set_release_version
from sempcyc.errors import UserError
from sempcyc.runtime.search import SketchSearch
from sempcyc.serving import same_ranking
from sempcyc.split import hash_unit
from sempcyc.torchserve import free_port
from sempcyc.vcs import parse_tags

TOP_K = 64  # >= the whole gallery (15 classes x 4 images): each answer is the full ranking (see test_release_story)
THREADS = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
PROJECT_FILES = ["dvc.yaml", "params.yaml", "pyproject.toml", "requirements.lock", "Makefile", ".dvcignore",
                 ".gitignore", "src", "scripts"]
RELEASE_TIMEOUT = 600


def unseen_new_classes(n: int = 3) -> list[str]:
    """n new class names the project's hash split puts on the unseen side (and class_files draws differently)."""
    sums = {sum(map(ord, c)) for c in CLASSES}
    picked = []
    for name in ("jeep", "nose", "frog", "knife", "lamp", "star", "snail", "tulip", "zebra", "violin"):
        s = sum(map(ord, name))
        if hash_unit(name, SALT) < TEST_FRACTION and s not in sums:
            picked.append(name)
            sums.add(s)
        if len(picked) == n:
            return picked
    raise AssertionError("not enough candidate classes on the unseen side")


NEW_CLASSES = unseen_new_classes()

# the tiny pipeline of test_pipeline, reading the imported registry data, plus release and serving settings
PARAMS = merged(PIPELINE_OVERRIDES, {
    "demo": {"classes": 4, "images_per_class": 2, "sketches_per_class": 2, "size": 32},  # never built here
    "data": {"tar": "data/registry.tar"},
    # no tolerance: when classes are added the release scores the last release's model on the new test set, and
    # a release that did not retrain has exactly its figures (a comparison across test sets, 3 -> 6 unseen
    # classes, moves the tiny model's by noise). The no-training-baseline check stays on (release_through_gate).
    "release": {"gate_tolerance": 0.0},
    "serve": {"top_k": TOP_K, "check_requests": 8, "threads": 1, "batch_size": 4, "ready_timeout_s": 120},
})


# -------------------------------------------------------------------------------------------------- helpers

def run(cmd: list[str], cwd: Path, env: dict, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}) in {cwd}:\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


def git(cwd: Path, env: dict, *args: str, check: bool = True) -> str:
    return run(["git", *args], cwd, env, check=check).stdout.strip()


def dvc(cwd: Path, env: dict, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run([str(VENV_BIN / "dvc"), *args], cwd, env, check=check)


def registry_files(classes: list[str]) -> dict[str, bytes]:
    return class_files({c: (PER_CLASS, PER_CLASS) for c in classes})


def remote_tags(origin: Path, env: dict) -> dict[str, str]:
    """tag -> commit it points at (peeled), as `git ls-remote --tags` reports them."""
    out = git(origin.parent, env, "ls-remote", "--tags", str(origin))
    refs = dict(reversed(line.split("\t")) for line in out.splitlines())
    return {ref[len("refs/tags/"):]: refs.get(f"{ref}^{{}}", sha) for ref, sha in refs.items()
            if not ref.endswith("^{}")}


def origin_head(origin: Path, env: dict) -> str:
    return git(origin, env, "rev-parse", "refs/heads/main")


def lock_stage_out(lock_text: str, stage: str, path: str) -> str:
    for out in yaml.safe_load(lock_text)["stages"][stage]["outs"]:
        if out["path"] == path:
            return out["md5"]
    raise KeyError(f"{stage}: {path}")


def ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


class S3Proxy:
    """An HTTP proxy in front of moto that can refuse writes (403 AccessDenied, as S3 does for a key without
    s3:PutObject) while reads such as the release's bucket check still pass: a `dvc push` that fails mid-release."""

    def __init__(self, upstream_port: int):
        self.fail_writes = True
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if proxy.fail_writes and self.command in ("PUT", "POST", "DELETE"):
                    payload = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>'
                               b"<Message>Access Denied</Message></Error>")
                    self.send_response(403)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection",)}
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for key, value in resp.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length", "date", "server"):
                        self.send_header(key, value)
                # a HEAD answer has no body but the object's size (s3fs reads it from there)
                self.send_header("Content-Length", resp.getheader("Content-Length", "0") if self.command == "HEAD"
                                 else str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


# ------------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("release")


@pytest.fixture(scope="module")
def env(base) -> dict:
    """The environment of every command: S3 credentials (moto takes any), private DVC state, one torch thread."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "DVC_", "GIT_", "RELEASE_"))}
    return dict(clean, **THREADS, PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                AWS_CONFIG_FILE=str(base / "no-aws-config"), AWS_SHARED_CREDENTIALS_FILE=str(base / "no-aws-creds"),
                AWS_EC2_METADATA_DISABLED="true",
                DVC_NO_ANALYTICS="1", DVC_SITE_CACHE_DIR=str(base / "dvc-site-cache"),
                GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t",
                SEM_PCYC_DVC_CACHE=str(base / "dvc-cache"))


@pytest.fixture(scope="module")
def moto(base, env):
    port = free_port()
    log = open(base / "moto.log", "wb")
    proc = subprocess.Popen([str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], stdout=log,
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_port(port, 30)
        url = f"http://127.0.0.1:{port}"
        s3 = boto3.client("s3", endpoint_url=url, aws_access_key_id="testing", aws_secret_access_key="testing",
                          region_name="us-east-1")
        for bucket in ("registry-bucket", "project-bucket"):
            s3.create_bucket(Bucket=bucket)
        yield {"port": port, "url": url, "s3": s3}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


@pytest.fixture(scope="module")
def registry(base, env, moto) -> Path:
    """The data registry: its own git + DVC project, data.tar on s3://registry-bucket/store (endpoint committed)."""
    reg = base / "registry"
    reg.mkdir()
    git(reg, env, "init", "-q", "-b", "main")
    dvc(reg, env, "init", "-q")
    dvc(reg, env, "remote", "add", "-d", "store", "s3://registry-bucket/store")
    dvc(reg, env, "remote", "modify", "store", "endpointurl", moto["url"])
    write_tar(reg / "data.tar", registry_files(CLASSES))
    dvc(reg, env, "add", "-q", "data.tar")
    dvc(reg, env, "push", "-q")
    git(reg, env, "add", "-A")
    git(reg, env, "commit", "-qm", "data registry: 12 classes")
    assert "endpointurl" in (reg / ".dvc/config").read_text()
    return reg


@pytest.fixture(scope="module")
def host(base):
    h = Host(base / "host").start()
    yield h
    h.stop()


def link_venv(proj: Path) -> None:
    """A .venv that scripts/setup.sh finds up to date: this checkout's interpreter and packages by symlink, and the
    stamp setup.sh writes after installing (the hash of requirements.lock + pyproject.toml, identical copies here).
    Nothing is written into the shared .venv."""
    venv = proj / ".venv"
    venv.mkdir()
    real = Path(VENV_BIN).parent
    for name in os.listdir(real):
        if not name.startswith("."):
            (venv / name).symlink_to(real / name)
    want = hashlib.sha256((proj / "requirements.lock").read_bytes() + (proj / "pyproject.toml").read_bytes())
    (venv / ".installed-lock").write_text(want.hexdigest() + "\n")


@pytest.fixture(scope="module")
def origin(base, env, moto, registry, host, sshd) -> Path:
    """origin (bare) holding the project: this repo's pipeline, tiny params, the registry's data.tar imported by a
    file:// URL, the project's S3 remote and one deploy target; no release yet."""
    bare = base / "origin.git"
    git(base, env, "init", "-q", "--bare", "-b", "main", str(bare))
    proj = base / "seed"
    proj.mkdir()
    for name in PROJECT_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, proj / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy(src, proj / name)
    params = yaml.safe_load((proj / "params.yaml").read_text())
    for section, values in PARAMS.items():
        params.setdefault(section, {}).update(values)
    params["deploy"]["targets"] = [dict(target_dict(host, sshd, name="host-a"), workers=1, keep_versions=2)]
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git(proj, env, "init", "-q", "-b", "main")
    dvc(proj, env, "init", "-q")
    dvc(proj, env, "remote", "add", "-d", "storage", "s3://project-bucket/cache")
    dvc(proj, env, "remote", "modify", "storage", "endpointurl", moto["url"])
    (proj / "data").mkdir()
    dvc(proj, env, "import", "-q", registry.as_uri(), "data.tar", "-o", "data/registry.tar")
    meta = yaml.safe_load((proj / "data/registry.tar.dvc").read_text())
    assert meta["deps"][0]["repo"]["url"] == registry.as_uri()
    git(proj, env, "add", "-A")
    git(proj, env, "commit", "-qm", "SEM-PCYC pipeline, registry data imported")
    git(proj, env, "remote", "add", "origin", str(bare))
    git(proj, env, "push", "-q", "origin", "main")
    return bare


@pytest.fixture(scope="module")
def project(base, env, origin) -> Path:
    """The release checkout of the story test (a clone of origin, as the runner's actions/checkout makes)."""
    return clone(base, env, origin, "project")


def clone(base: Path, env: dict, origin: Path, name: str) -> Path:
    proj = base / name
    git(base, env, "clone", "-q", str(origin), str(proj))
    link_venv(proj)
    return proj


def release(proj: Path, env: dict, timeout: float = RELEASE_TIMEOUT, **extra: str):
    """`bash scripts/release.sh` as the workflow's one run step calls it: (process, wall seconds)."""
    started = time.perf_counter()
    proc = subprocess.run(["bash", "scripts/release.sh"], cwd=proj, env=dict(env, **extra), capture_output=True,
                          text=True, timeout=timeout)
    return proc, time.perf_counter() - started


def release_through_gate(proj: Path, env: dict, origin: Path, host: Host, **extra: str):
    """A release with the workflow's default inputs. The tiny model may lose to the no-training baseline; then the
    quality gate must stop it cleanly (one line, nothing deployed, pushed or tagged) and the rerun the message
    advises (override_gate) must accept the stopped release's leftovers and finish. (process, wall s, gate note)"""
    tags, default = remote_tags(origin, env), host.default()
    proc, took = release(proj, env, **extra)
    if proc.returncode == 0 or "quality gate:" not in proc.stderr:
        return proc, took, "gate passed"
    one_error_line(proc, "quality gate", "--override-gate")
    assert remote_tags(origin, env) == tags and host.default() == default
    assert "params.yaml" in git(proj, env, "status", "--porcelain", "--untracked-files=no")
    rerun, took2 = release(proj, env, **extra, RELEASE_OVERRIDE_GATE="true")
    assert "continuing after an unfinished release" in rerun.stdout, show(rerun)
    # the stages ran in the stopped release (the rerun finds them cached): keep its log for `ran()`
    rerun.stdout, rerun.stderr = proc.stdout + rerun.stdout, proc.stderr + rerun.stderr
    return rerun, took2, f"gate stopped it in {took:.1f} s, rerun with override_gate"


def show(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}"


def assert_published(proj: Path, env: dict, origin: Path, tag: str) -> None:
    """The tag is on origin, on origin's branch head, which is this checkout's HEAD (same dvc.lock), and every
    file dvc.lock names is in the S3 remote."""
    tags = remote_tags(origin, env)
    assert tag in tags, tags
    head = git(proj, env, "rev-parse", "HEAD")
    assert tags[tag] == head == origin_head(origin, env)
    assert git(origin, env, "show", "main:dvc.lock") == (proj / "dvc.lock").read_text().strip()
    assert git(origin, env, "show", f"{tag}:params.yaml").count(f"version: {tag.split('@v')[1]}") == 1
    status = dvc(proj, env, "data", "status", "--not-in-remote", "--json")
    missing = json.loads(status.stdout or "{}").get("not_in_remote")
    assert not missing, status.stdout
    cloud = dvc(proj, env, "status", "--cloud", "--json")
    assert json.loads(cloud.stdout or "{}") == {}, cloud.stdout


def predict(host: Host, sketch: bytes, version: str | None = None) -> list[dict]:
    url = f"{host.ts.inference_url}/predictions/sem_pcyc" + (f"/{version}" if version else "")
    status, body = host.ts.request("POST", url, sketch, {"Content-Type": "image/png"}, timeout=60)
    assert status == 200, body[:500]
    return json.loads(body)


# ------------------------------------------------------------------------------------------------ the story

@pytest.mark.integration
def test_release_story(base, env, registry, origin, project, host):
    files_v1 = registry_files(CLASSES)

    # ---- 1. first release
    first, took, gate = release_through_gate(project, env, origin, host, RELEASE_BUMP="minor", RELEASE_DEPLOY="true")
    print(f"\nfirst release: {took:.1f} s ({gate})")
    assert first.returncode == 0, show(first)
    assert_published(project, env, origin, "sem-pcyc@v0.1.0")
    v1_lock = git(origin, env, "show", "sem-pcyc@v0.1.0:dvc.lock")
    assert host.default() == "0.1.0"
    answer = predict(host, files_v1["ds/sketches/bear/000.png"])
    assert len(answer) == len(CLASSES) * PER_CLASS  # top_k >= gallery: the whole gallery, ranked
    assert {"image", "class", "score"} <= set(answer[0])
    assert not {a["class"] for a in answer} & set(NEW_CLASSES)

    # ---- 2. three new (unseen-side) classes in the registry
    write_tar(registry / "data.tar", registry_files(CLASSES + NEW_CLASSES))
    dvc(registry, env, "add", "-q", "data.tar")
    dvc(registry, env, "push", "-q")
    git(registry, env, "commit", "-qam", f"data registry: add {', '.join(NEW_CLASSES)}")

    second, took, gate = release_through_gate(project, env, origin, host, RELEASE_BUMP="minor",
                                              RELEASE_DEPLOY="true")
    print(f"second release (release overhead figure): {took:.1f} s ({gate}); steps: "
          f"{json.loads((project / 'reports/release.json').read_text())['timings_s']}")
    assert second.returncode == 0, show(second)
    assert_published(project, env, origin, "sem-pcyc@v0.2.0")
    v2_lock = git(origin, env, "show", "sem-pcyc@v0.2.0:dvc.lock")
    log = second.stdout + second.stderr
    # the gate compared with the last release's model on this release's test set (the same model: equal figures)
    assert "the test set changed since sem-pcyc@v0.1.0: scoring sem-pcyc@v0.1.0's model on this one" in log, log
    assert "below the last release" not in log, log[-3000:]
    # zero-shot: the new classes are served without retraining
    assert not {"features", "train"} & ran(log), sorted(ran(log))
    assert {"extract", "prepare", "gallery", "archive", "serve-check"} <= ran(log), sorted(ran(log))
    # deployed after the publication, by the deploy stage's own command (dvc.lock stays the published one)
    assert "deploy: host-a: deployed" in log and log.index("pushed main and sem-pcyc@v0.2.0") < \
        log.index("deploy: host-a: deployed"), log[-3000:]
    assert lock_stage_out(v1_lock, "train", "models/sem_pcyc.pt") == lock_stage_out(v2_lock, "train",
                                                                                     "models/sem_pcyc.pt")
    assert lock_stage_out(v1_lock, "features", "models/features") == lock_stage_out(v2_lock, "features",
                                                                                    "models/features")
    assert lock_stage_out(v1_lock, "gallery", "models/gallery") != lock_stage_out(v2_lock, "gallery",
                                                                                  "models/gallery")
    imported = yaml.safe_load(git(origin, env, "show", "sem-pcyc@v0.2.0:data/registry.tar.dvc"))
    assert imported["deps"][0]["repo"]["rev_lock"] == git(registry, env, "rev-parse", "HEAD")

    # the host serves 0.2.0 by default; for the new classes' sketches it returns the new classes' images, ranked
    # exactly as the released model and gallery rank them offline. (Whether an own-class image makes the top 5
    # is the tiny model's luck, so that is printed, not asserted: see the ranks below.)
    offline = SketchSearch.load(project / "models/sem_pcyc.pt", project / "models/gallery", top_k=TOP_K,
                                max_pixels=16_000_000)
    assert host.default() == "0.2.0"
    assert host.versions() == ["0.1.0", "0.2.0"]
    files_v2 = registry_files(CLASSES + NEW_CLASSES)
    new_images = {p.split("/", 2)[2] for p in files_v2 if p.startswith("ds/images/")
                  and p.split("/")[2] in NEW_CLASSES}
    ranks = []
    for cls in NEW_CLASSES:
        for i in range(PER_CLASS):
            sketch = files_v2[f"ds/sketches/{cls}/{i:03d}.png"]
            answer = predict(host, sketch)
            served = [a["image"] for a in answer]
            assert new_images <= set(served), sorted(new_images - set(served))
            assert same_ranking(answer[:10], offline.search([sketch])[0][:10]), (answer[:10], cls, i)
            ranks.append(min(j for j, a in enumerate(answer) if a["class"] == cls))
            old = predict(host, sketch, "0.1.0")  # the previous version is still there, without them
            assert not {a["class"] for a in old} & set(NEW_CLASSES)
    print(f"rank of the first image of the sketch's own (new) class, over {len(ranks)} sketches: {ranks}")

    # ---- 3. each release's archive, as DVC users fetch it (dvc.yaml's `artifacts:` entry, the GTO tags, S3)
    fetched = {}
    for version in ("0.1.0", "0.2.0"):
        out = base / f"fetched-{version}.mar"
        dvc(base, env, "artifacts", "get", str(origin), "sem-pcyc", "--rev", f"v{version}", "-o", str(out))
        with zipfile.ZipFile(out) as zf:
            fetched[version] = (json.loads(zf.read("MAR-INF/MANIFEST.json"))["model"]["modelVersion"],
                                out.read_bytes())
    assert {v: manifest for v, (manifest, _) in fetched.items()} == {"0.1.0": "0.1.0", "0.2.0": "0.2.0"}
    assert fetched["0.1.0"][1] != fetched["0.2.0"][1]
    assert fetched["0.2.0"][1] == (project / "models/sem_pcyc.mar").read_bytes()


# --------------------------------------------------------------------------------------- bad inputs, safety

def one_error_line(proc: subprocess.CompletedProcess, *words: str) -> str:
    assert proc.returncode != 0, show(proc)
    assert "Traceback" not in proc.stdout + proc.stderr, show(proc)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("sempcyc release: error:")]
    assert len(errors) == 1, show(proc)
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


@pytest.mark.integration
def test_missing_credentials_is_one_clear_line(base, env, origin):
    proj = clone(base, env, origin, "no-credentials")
    tags_before = remote_tags(origin, env)
    no_creds = {k: v for k, v in env.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    proc, _ = release(proj, no_creds, RELEASE_BUMP="minor", RELEASE_DEPLOY="true")
    line = one_error_line(proc, "AWS credentials")
    assert "AWS_ACCESS_KEY_ID" in line
    assert remote_tags(origin, env) == tags_before
    assert set(git(proj, env, "tag", "--list").split()) == set(tags_before)
    assert "Running stage" not in proc.stdout + proc.stderr
    assert not git(proj, env, "status", "--porcelain", "--untracked-files=no")


@pytest.mark.integration
def test_dirty_work_tree_is_refused(base, env, origin):
    proj = clone(base, env, origin, "dirty")
    tags_before = remote_tags(origin, env)
    params = proj / "params.yaml"
    params.write_text(params.read_text().replace("lr: 0.0001", "lr: 0.0003", 1))
    proc, _ = release(proj, env, RELEASE_BUMP="minor", RELEASE_DEPLOY="true")
    one_error_line(proc, "uncommitted changes", "params.yaml")
    assert remote_tags(origin, env) == tags_before
    assert "lr: 0.0003" in params.read_text()  # the person's edit is left alone


@pytest.mark.integration
def test_second_release_at_once_stops(base, env, origin):
    proj = clone(base, env, origin, "locked")
    tags_before = remote_tags(origin, env)
    lock = proj / ".git" / "sem-pcyc-release.lock"
    with open(lock, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a release in progress in this checkout
        handle.write("pid 4242 (the test)")
        handle.flush()
        started = time.monotonic()
        proc, _ = release(proj, env, RELEASE_BUMP="minor", RELEASE_DEPLOY="true")
        assert time.monotonic() - started < 60
        one_error_line(proc, "another release is running")
    assert remote_tags(origin, env) == tags_before
    assert set(git(proj, env, "tag", "--list").split()) == set(tags_before)


def next_commit(proj: Path, env: dict) -> None:
    """A new commit to release: a release is made from a commit, and a published release at HEAD with the same
    data is only (re)deployed."""
    git(proj, env, "commit", "-q", "--allow-empty", "-m", "next release")


def without_venv(env: dict) -> dict:
    """The environment of a shell where the venv is not activated: its bin/ is not on PATH."""
    path = [p for p in env["PATH"].split(os.pathsep) if p and Path(p).resolve() != VENV_BIN.resolve()]
    bare = dict(env, PATH=os.pathsep.join(path))
    assert shutil.which("sempcyc", path=bare["PATH"]) is None
    return bare


@pytest.mark.integration
def test_two_checkouts_releasing_at_once_never_share_a_version(base, env, origin):
    """Two runners (the workflow's concurrency group is per repository, a person may run the script locally)
    check out the same commit: the first publishes the next version; the second finds origin ahead of it and
    stops with a clear line before doing any work, so origin never has one version twice or a tag moved.
    The first runs `.venv/bin/sempcyc release` itself, without the venv on PATH: the stage commands DVC runs
    (`sempcyc <stage>`) must still be found."""
    a = clone(base, env, origin, "race-a")
    b = clone(base, env, origin, "race-b")
    for proj in (a, b):
        next_commit(proj, env)
    tags_before = remote_tags(origin, env)
    dvc(a, env, "cache", "dir", "--local", env["SEM_PCYC_DVC_CACHE"])  # what scripts/release.sh does first
    started = time.perf_counter()
    won = run([str(a / ".venv/bin/sempcyc"), "release", "--bump", "minor", "--no-deploy", "--override-gate"], a,
              without_venv(env), check=False, timeout=RELEASE_TIMEOUT)
    print(f"\nrelease from checkout A: {time.perf_counter() - started:.1f} s")
    assert won.returncode == 0, show(won)
    assert "command not found" not in won.stderr
    new = sorted(set(remote_tags(origin, env)) - set(tags_before))
    assert len(new) == 1, new
    winner = remote_tags(origin, env)[new[0]]
    lost, took = release(b, env, RELEASE_BUMP="minor", RELEASE_DEPLOY="false", RELEASE_OVERRIDE_GATE="true")
    print(f"release from checkout B (same version): {took:.1f} s")
    one_error_line(lost, "origin/", "another release", "git pull --ff-only")
    assert remote_tags(origin, env) == dict(tags_before, **{new[0]: winner})
    assert origin_head(origin, env) == winner


def tag_message(origin: Path, env: dict, tag: str) -> str:
    return git(origin, env, "for-each-ref", f"refs/tags/{tag}", "--format=%(contents)")


@pytest.mark.integration
def test_release_deploys_only_what_is_published_and_reruns_finish_the_job(base, env, origin, moto, host):
    """build -> gate -> commit+tag -> dvc push -> git push -> deploy. A failed dvc push, then a rejected git push,
    leave origin and the host as they were; a deploy failure after the publication leaves the release published
    and says so; each rerun of the same command takes the job one step further, the last one only deploys."""
    proj = clone(base, env, origin, "push-fails")
    next_commit(proj, env)
    tags_before, head_before, default_before = remote_tags(origin, env), origin_head(origin, env), host.default()
    inputs = {"RELEASE_BUMP": "patch", "RELEASE_DEPLOY": "true", "RELEASE_OVERRIDE_GATE": "true"}
    proxy = S3Proxy(moto["port"])
    hook = origin / "hooks" / "pre-receive"
    try:
        # 1. this checkout's remote goes through a proxy that refuses writes: the bucket check passes, dvc push fails
        dvc(proj, env, "remote", "modify", "--local", "storage", "endpointurl", f"http://127.0.0.1:{proxy.port}")
        failed, took = release(proj, env, **inputs)
        print(f"\nrelease with a failing dvc push: {took:.1f} s")
        assert failed.returncode != 0 and "Traceback" not in failed.stderr, show(failed)
        assert (remote_tags(origin, env), origin_head(origin, env)) == (tags_before, head_before)
        assert host.default() == default_before  # nothing deployed before the data is on the remote
        # ... and the data the release made is indeed not in the remote (the checks assert_published makes can fail)
        assert json.loads(dvc(proj, env, "status", "--cloud", "--json").stdout or "{}")
        not_in_remote = dvc(proj, env, "data", "status", "--not-in-remote", "--json").stdout
        assert json.loads(not_in_remote).get("not_in_remote"), not_in_remote
        verdict = re.search(r"quality gate (passed|OVERRIDDEN): .*", failed.stdout).group(0)

        # 2. the remote takes writes again, but origin refuses the git push: still nothing deployed
        proxy.fail_writes = False
        hook.write_text("#!/bin/sh\necho 'refused by a hook' >&2\nexit 1\n")
        hook.chmod(hook.stat().st_mode | stat.S_IXUSR)
        rejected, _ = release(proj, env, **inputs)
        assert "finishing its publication" in rejected.stdout, show(rejected)
        one_error_line(rejected, "git push", "nothing deployed", "rerun")
        assert (remote_tags(origin, env), origin_head(origin, env)) == (tags_before, head_before)
        assert host.default() == default_before
        hook.unlink()

        # 3. published, but TorchServe is down on the host: the release says so and exits non-zero
        host.stop()
        try:
            half, _ = release(proj, env, **inputs)
        finally:
            host.start()
        one_error_line(half, "is released", "deploy failed", "rerun")
        tag = json.loads((proj / "reports/release.json").read_text())["tag"]
        assert json.loads((proj / "reports/release.json").read_text())["deploy"] == "failed"
        receipt = json.loads((proj / "reports/deploy.json").read_text())["targets"][0]
        assert receipt["status"] == "failed" and receipt["failed_step"] == "inspect", receipt
        assert_published(proj, env, origin, tag)
        assert verdict in tag_message(origin, env, tag)  # an override stays on record
        assert host.default() == default_before

        # 4. the same command again: the release at HEAD is published and nothing changed, so it only deploys
        again, took = release(proj, env, **inputs)
        print(f"rerun that finishes the deploy: {took:.1f} s")
        assert again.returncode == 0, show(again)
        assert "finishing its deploy" in again.stdout and "Running stage" not in again.stdout, show(again)
    finally:
        proxy.close()
        hook.unlink(missing_ok=True)
    assert remote_tags(origin, env) == dict(tags_before, **{tag: remote_tags(origin, env)[tag]})
    assert host.default() == tag.split("@v")[1]
    dvc(proj, env, "remote", "modify", "--local", "storage", "--unset", "endpointurl")
    assert_published(proj, env, origin, tag)


# ----------------------------------------------------------------------------------------- release.py's core (unit)

@pytest.mark.parametrize("tags, bump, expected", [
    ([], "minor", "0.1.0"),
    ([], "major", "0.1.0"),
    ([], "patch", "0.1.0"),
    (["sem-pcyc@v0.1.0"], "minor", "0.2.0"),
    (["sem-pcyc@v0.1.0"], "patch", "0.1.1"),
    (["sem-pcyc@v0.1.0"], "major", "1.0.0"),
    (["sem-pcyc@v1.2.3"], "major", "2.0.0"),
    (["sem-pcyc@v1.2.3"], "minor", "1.3.0"),
    (["sem-pcyc@v1.2.3"], "patch", "1.2.4"),
    # numeric, not lexical, order: 0.10.0 is newer than 0.9.0
    (["sem-pcyc@v0.9.0", "sem-pcyc@v0.10.0", "sem-pcyc@v0.2.5"], "minor", "0.11.0"),
    # malformed tags and other models' tags are ignored
    (["sem-pcyc@v1.2", "other@v9.9.9", "v5.0.0", "sem-pcyc@v2.0.0-rc1", "sem-pcyc@vx.y.z", "sem-pcyc@v0.3.0"],
     "minor", "0.4.0"),
    (["sem-pcyc@v1.2", "other@v9.9.9"], "minor", "0.1.0"),
])
def test_next_version(tags, bump, expected):
    assert next_version(tags, bump) == expected


def test_parse_tags_sorts_numerically():
    assert parse_tags(["sem-pcyc@v0.10.0", "sem-pcyc@v0.9.1", "junk"]) == [(0, 9, 1), (0, 10, 0)]


PARAMS_TEXT = """\
# top comment
serve:
  version: 9.9.9            # not the release block
release:
  model_name: sem_pcyc      # TorchServe model name
  version: 0.0.0            # written by `sempcyc release`
  gate_tolerance: 0.02      # tolerance
deploy:
  targets: []
"""


def test_set_release_version_changes_only_release_version():
    out = set_release_version(PARAMS_TEXT, "0.3.0")
    before, after = PARAMS_TEXT.splitlines(), out.splitlines()
    assert len(before) == len(after)
    changed = [(a, b) for a, b in zip(before, after) if a != b]
    assert changed == [("  version: 0.0.0            # written by `sempcyc release`",
                        "  version: 0.3.0            # written by `sempcyc release`")]
    assert yaml.safe_load(out)["release"]["version"] == "0.3.0"
    assert yaml.safe_load(out)["serve"]["version"] == "9.9.9"
    assert set_release_version(out, "0.3.0") == out  # idempotent


def test_set_release_version_on_the_project_params():
    text = (REPO / "params.yaml").read_text(encoding="utf-8")
    out = set_release_version(text, "1.2.3")
    assert yaml.safe_load(out)["release"]["version"] == "1.2.3"
    assert [line for line in text.splitlines() if "version:" not in line] == \
        [line for line in out.splitlines() if "version:" not in line]
    assert out.count("#") == text.count("#")


def test_set_release_version_without_a_release_version_is_a_user_error():
    with pytest.raises(UserError, match="release.version"):
        set_release_version("serve:\n  version: 1.0.0\n", "0.1.0")


def test_gate_note_records_an_override():
    assert gate_note(False, "unseen mAP@all 0.1 is below the baseline 0.2") == \
        "quality gate OVERRIDDEN: unseen mAP@all 0.1 is below the baseline 0.2"
    assert gate_note(True, "unseen mAP@all 0.3").startswith("quality gate passed: ")


# A release stopped before its commit (quality gate, a failed stage or deploy) leaves release.version, dvc.lock,
# metrics and the updated import behind; the advised rerun must accept exactly those, and nothing a person changed.
HEAD_PARAMS = PARAMS_TEXT.replace("0.0.0", "0.1.0")
LEFTOVER_PARAMS = HEAD_PARAMS.replace("version: 0.1.0 ", "version: 0.2.0 ")
IMPORTED = {"data/registry.tar.dvc"}


@pytest.mark.parametrize("dirty, work_params, real", [
    (["params.yaml"], LEFTOVER_PARAMS, []),
    (["params.yaml", "dvc.lock", "data/registry.tar.dvc", "reports/eval/metrics.json", "reports/serve_check.json",
      "reports/deploy.json", "dvclive/metrics.json", "dvclive/plots/metrics/train/gen.tsv"], LEFTOVER_PARAMS, []),
    (["params.yaml"], LEFTOVER_PARAMS.replace("gate_tolerance: 0.02", "gate_tolerance: 0.5"), ["params.yaml"]),
    (["params.yaml"], LEFTOVER_PARAMS.replace("version: 9.9.9", "version: 9.9.8"), ["params.yaml"]),
    (["params.yaml"], None, ["params.yaml"]),                                   # deleted
    (["params.yaml"], "release: [", ["params.yaml"]),                          # not a release block any more
    (["dvc.lock", "src/sempcyc/stages/train.py"], LEFTOVER_PARAMS, ["src/sempcyc/stages/train.py"]),
    (["data/other.tar.dvc", "reports/evaluation.txt", "dvclive.yaml"], HEAD_PARAMS,
     ["data/other.tar.dvc", "reports/evaluation.txt", "dvclive.yaml"]),
])
def test_real_changes_tells_leftovers_from_edits(dirty, work_params, real):
    assert real_changes(dirty, "params.yaml", HEAD_PARAMS, work_params, IMPORTED) == real
