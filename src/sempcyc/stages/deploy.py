"""deploy stage: ship the .mar to TorchServe hosts over SSH, register it, smoke-test it, make it the default.

A host gets a slim copy of the checked archive (blobstore.py: the same code, serving.json and gallery manifest,
without the model and gallery shards, and naming the host's blob store) and the large files separately, stored by
sha256 in its blob store, where every version's archive finds them: a release that keeps the model and most
shards sends only the new shards and the slim archive.

Per target, one at a time (rolling; the first failure stops the rollout):
  1. SSH with host-key checking against the target's known_hosts (unknown or changed key: refused);
  2. already live? (same version is the default and the remote slim archive has the same sha256);
  3. blobs: the host's copies are checked (sha256 on the host); missing or damaged ones are uploaded under a
     temporary name, verified and renamed into place; the list of the blobs this archive uses is written;
  4. unless live: the slim archive the same way into the model store; register (management API, synchronous,
     initial workers), query that version directly with the smoke sketch and compare with the offline top-10
     that serve-check recorded for this very archive (its report's "smoke"), set it as default;
  5. retention: unregister versions beyond `keep_versions` and delete their archives and blob lists, then the
     blobs no list names; rewrite the host's TorchServe config (load_models / models) so a restart serves the same
     default;
  6. on a failure in 4: unregister the new version and remove its archive; the previous default keeps serving;
     exit non-zero.
An already-live host still gets 3 (a blob may have gone missing since) and 5: an earlier run may have stopped
between set-default and the config rewrite. Any SSH, SFTP, socket or HTTP error is a failure of that host's step,
with the rollback of 6 and a receipt, never a traceback.
Management and inference calls go through the SSH connection (a direct-tcpip channel) to the URLs as seen from
the host, so TorchServe's APIs can stay bound to the host's 127.0.0.1. Secrets (key passphrase, API tokens) come
from the environment or the ssh-agent only, and are never printed. The receipt is reports/deploy.json.
Under `dvc exp run` (DVC sets DVC_EXP_NAME and DVC_EXP_BASELINE_REV for the stages of an experiment) nothing is
deployed: the receipt says "skipped: experiment" and the stage succeeds, so the experiment is saved. `dvc repro`
and `sempcyc release` deploy.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import posixpath
import stat
import tempfile
import time
import uuid
import zipfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from .. import params as params_mod
from ..blobstore import (
    PARTIAL,
    REFS_SUFFIX,
    Blob,
    archive_blobs,
    plan_uploads,
    refs_name,
    refs_text,
    unused,
    write_slim_archive,
)
from ..errors import UserError
from ..fsutil import atomic_write_json, sha256_file
from ..serving import (
    ReleaseSettings,
    check_response,
    same_ranking,
)
from ..ssh_host import TRANSPORT_ERRORS, HostError, HostSession
from ..targets import DeploySettings, Target, blob_store_of, parse_targets
from ..torchserve_host import TorchServeHost, is_ours, mar_file_name, updated_ts_config, version_key, worker_settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mar", default="models/sem_pcyc.mar", help="archive (default: %(default)s)")
    parser.add_argument("--serve-check", default="reports/serve_check.json", help="serve-check report; deploy "
                        "refuses an archive that did not pass (default: %(default)s)")
    parser.add_argument("--dataset", default="data/dataset", help="dataset (the smoke query's sketch file)")
    parser.add_argument("--out", default="reports/deploy.json", help="receipt (default: %(default)s)")


def mar_version(mar: Path) -> str:
    try:
        with zipfile.ZipFile(mar) as z:
            return json.loads(z.read("MAR-INF/MANIFEST.json"))["model"]["modelVersion"]
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError) as exc:
        raise UserError(f"{mar}: not a TorchServe archive ({exc}); run `dvc repro archive`") from None


@dataclass(frozen=True)
class CheckedArchive:
    """The checked full archive deploy ships: its version, sha256 and large files (blobs)."""
    mar: Path
    version: str
    digest: str
    blobs: list[Blob]


def checked_archive(mar: Path) -> CheckedArchive:
    return CheckedArchive(mar, mar_version(mar), sha256_file(mar), archive_blobs(mar))


@dataclass(frozen=True)
class Shipment:
    """What one host gets: the archive's blobs for its blob store `store`, and the slim archive made for it."""
    archive: CheckedArchive
    store: str
    slim: Path
    digest: str      # the slim archive's sha256: what the host's model store holds


@dataclass
class HostState:
    """What a host serves before the deploy, as deploy_target found it."""
    final: str                    # the archive's path in the model store
    refs: str                     # the list of the blobs it uses, in the blob store
    previous: str | None          # default version
    registered: list[str]
    remote_digest: str | None     # sha256 of `final` on the host, None when absent


class Progress:
    """The step deploy_target is in (a failure names it) and when each step ended (the receipt's timings)."""

    def __init__(self, receipt: dict):
        self.receipt, self.step, self.t0 = receipt, "connect", time.perf_counter()

    def begin(self, step: str) -> None:
        self.step = step

    def done(self, step: str) -> None:
        self.receipt["timings"][step] = round(time.perf_counter() - self.t0, 3)


def deploy_target(target: Target, archive: CheckedArchive, smoke_sketch: bytes, smoke_expected: list[dict],
                  k: int) -> dict:
    """Deploy `archive` to one host as a slim archive + blobs (steps in the module docstring); the receipt says
    what happened, also on failure."""
    store = blob_store_of(target)
    with tempfile.TemporaryDirectory(prefix="sem-pcyc-slim-") as tmp:
        slim = write_slim_archive(archive.mar, store, Path(tmp) / mar_file_name(target.model_name, archive.version))
        shipment = Shipment(archive, store, slim, sha256_file(slim))
        return ship(target, shipment, smoke_sketch, smoke_expected, k)


def ship(target: Target, shipment: Shipment, smoke_sketch: bytes, smoke_expected: list[dict], k: int) -> dict:
    version = shipment.archive.version
    receipt = {"target": target.name, "host": target.host, "version": version, "sha256": shipment.digest,
               "archive_sha256": shipment.archive.digest, "slim_archive_bytes": shipment.slim.stat().st_size,
               "bytes_sent": 0, "status": "failed", "previous_default": None, "timings": {}}
    progress = Progress(receipt)
    session = HostSession(target)
    try:
        session.connect()
        progress.done("connected")
        progress.begin("inspect")
        ts = TorchServeHost(session)
        state = inspect_host(session, ts, version, shipment.digest)
        receipt["previous_default"] = state.previous
        live = state.previous == version and state.remote_digest == shipment.digest
        receipt["blobs"] = sync_blobs(session, shipment, state.refs, progress)
        if live and receipt["blobs"]["sent"]:
            # its workers may have failed to load without them (a restart since): the query waits for TorchServe's
            # next worker start, which now finds every file
            progress.begin("smoke")
            smoke_query(session, ts, version, smoke_sketch, smoke_expected, k)
            progress.done("smoke_ok")
        if not live:
            if state.remote_digest != shipment.digest:
                upload_verified(session, shipment.slim, state.final, shipment.digest, progress)
            promote(session, ts, version, state, smoke_sketch, smoke_expected, k, receipt, progress)
        finish_host(session, ts, version, receipt, progress)
        receipt["status"] = "already live" if live else "deployed"
        if live:
            receipt["message"] = (f"version {version} with this checksum is already the default; " + (
                f"re-sent {len(receipt['blobs']['sent'])} missing or damaged blob(s)" if receipt["blobs"]["sent"]
                else "nothing sent"))
        progress.done("done")
    except (HostError, *TRANSPORT_ERRORS) as exc:
        receipt.update(error=failure_line(target, progress.step, exc), failed_step=progress.step)
        progress.done("failed")
    finally:
        receipt["bytes_sent"] = session.bytes_sent
        session.close()
    return receipt


def failure_line(target: Target, step: str, exc: BaseException) -> str:
    """One line naming the host and the step: a HostError's own advice, or a transport error's type and text."""
    if isinstance(exc, HostError):
        detail = str(exc).removeprefix(f"{target.name}: ")
    elif isinstance(exc, PermissionError):
        detail = (f"{exc}: the SSH user {target.user!r} may not do this on the host; check the permissions of "
                  f"{target.model_store}, {blob_store_of(target)} and {target.ts_config or 'the TorchServe config'}")
    else:
        detail = (f"{type(exc).__name__}: {exc or 'connection closed'}; check the host and the network, then "
                  "rerun the deploy (it resumes: an already-live host only gets retention and the config check)")
    return " ".join(f"{target.name} ({target.host}:{target.port}), step {step}: {detail}".split())


def inspect_host(session: HostSession, ts: TorchServeHost, version: str, digest: str) -> HostState:
    t = session.t
    store = t.model_store.rstrip("/")
    try:
        is_dir = stat.S_ISDIR(session.sftp.stat(store).st_mode or 0)
    except FileNotFoundError:
        raise HostError(f"{t.name}: model store {store} does not exist on the host") from None
    if not is_dir:
        raise HostError(f"{t.name}: model store {store} is not a folder on the host; fix deploy.targets "
                          "model_store (TorchServe's model_store)")
    name = mar_file_name(t.model_name, version)
    final = posixpath.join(store, name)
    state = HostState(final=final, refs=posixpath.join(blob_store_of(t), refs_name(name)),
                      previous=ts.default_version(), registered=ts.versions(), remote_digest=session.sha256(final))
    if version in state.registered and state.remote_digest != digest:
        raise HostError(f"{t.name}: version {version} is registered there with a different archive "
                          f"(sha256 {str(state.remote_digest)[:12]}…); bump archive.version instead of reusing it")
    return state


def sync_blobs(session: HostSession, shipment: Shipment, refs: str, progress: Progress) -> dict:
    """Check the host's copies of the archive's blobs (sha256 on the host), send the missing and damaged ones,
    and record which blobs this archive uses (before the archive is there, so retention never takes them)."""
    progress.begin("blobs")
    blobs, before, store = shipment.archive.blobs, session.bytes_sent, shipment.store
    on_host = session.sha256_many([posixpath.join(store, b.sha256) for b in blobs])
    send, reused = plan_uploads(blobs, {posixpath.basename(p): d for p, d in on_host.items()})
    progress.done("blobs_checked")
    progress.begin("upload")
    if send:
        session.makedirs(store)
        upload_blobs(session, shipment, [b for b, _ in send], progress)
        progress.done("blobs_sent")
    text = refs_text(blobs)
    if not session.exists(refs) or session.read_text(refs) != text:
        session.write_new(refs, text.encode("utf-8"))
    return {"store": store, "bytes_sent": session.bytes_sent - before, "reused": len(reused),
            "reused_bytes": sum(b.size for b in reused),
            "sent": [{"file": b.member, "sha256": b.sha256, "bytes": b.size, "why": why} for b, why in send]}


def upload_blobs(session: HostSession, shipment: Shipment, blobs: list[Blob], progress: Progress) -> None:
    """The blobs, read from the full archive, into the host's blob store under their sha256 names."""
    with zipfile.ZipFile(shipment.archive.mar) as zf:
        upload_checked(session, [(partial(zf.open, blob.member), blob.size, posixpath.join(shipment.store, blob.sha256),
                                  blob.sha256, blob.member) for blob in blobs], progress)


def upload_verified(session: HostSession, mar: Path, final: str, digest: str, progress: Progress) -> None:
    """The slim archive into the model store."""
    upload_checked(session, [(partial(open, mar, "rb"), mar.stat().st_size, final, digest, "the archive")], progress)
    progress.done("verified")


def upload_checked(session: HostSession, files: list[tuple], progress: Progress) -> None:
    """Upload each (opener, size, final path, sha256, what) under a temporary hidden name beside its final path,
    check them all with one sha256 pass on the host (one command per 200 files, not one per file), then rename
    each into place: a final path is absent, the old file or the whole new one, never part of one."""
    tmps: dict[str, tuple[str, str, str]] = {}
    try:
        progress.begin("upload")
        for opener, size, final, digest, what in files:
            tmp = posixpath.join(posixpath.dirname(final),
                                 f".{posixpath.basename(final)}{PARTIAL}{uuid.uuid4().hex[:8]}")
            tmps[tmp] = (final, digest, what)
            with opener() as source:
                session.upload(source, tmp, size)
        progress.begin("verify")
        got = session.sha256_many(list(tmps))
        for tmp, (_, digest, what) in tmps.items():
            if got.get(tmp) != digest:
                raise HostError(f"{session.t.name}: checksum mismatch after uploading {what} (sent {digest[:12]}…, "
                                  f"host has {str(got.get(tmp))[:12]}…); the transfer was damaged, nothing was "
                                  "registered")
        for tmp in list(tmps):
            session.sftp.posix_rename(tmp, tmps.pop(tmp)[0])
    finally:
        for tmp in tmps:
            session.remove_quietly(tmp)


def promote(session: HostSession, ts: TorchServeHost, version: str, state: HostState, smoke_sketch: bytes,
            smoke_expected: list[dict], k: int, receipt: dict, progress: Progress) -> None:
    """Register (if needed), smoke-query that version, set it default; on any failure unregister what was
    registered here, so the previous default keeps serving."""
    registered_here = False
    try:
        if version not in state.registered:
            progress.begin("register")
            registered_here = True  # also when register fails: TorchServe may keep a half-loaded version
            ts.register(posixpath.basename(state.final))
            progress.done("registered")
        progress.begin("smoke")
        smoke_query(session, ts, version, smoke_sketch, smoke_expected, k)
        progress.done("smoke_ok")
        progress.begin("set-default")
        ts.set_default(version)
        progress.done("default_set")
    except (HostError, *TRANSPORT_ERRORS):
        if registered_here:
            rollback(session, ts, version, state, receipt)
        raise


def smoke_query(session: HostSession, ts: TorchServeHost, version: str, smoke_sketch: bytes,
                smoke_expected: list[dict], k: int) -> None:
    """Query that version with the known sketch: a valid answer whose top-10 is the offline one, or HostError."""
    status, answer = ts.predict(version, smoke_sketch)
    problem = check_response(status, answer, k)
    if problem is None and not same_ranking(json.loads(answer)[:10], smoke_expected[:10]):
        problem = "the top-10 differs from the offline answer of the same model"
    if problem:
        raise HostError(f"{session.t.name}: smoke query of version {version} failed: {problem}")


def rollback(session: HostSession, ts: TorchServeHost, version: str, state: HostState, receipt: dict) -> None:
    """Unregister the new version and remove its archive and blob list (its blobs go at the next retention,
    unless the retry needs them)."""
    try:
        ts.unregister(version)
        for path in (state.final, state.refs):
            if session.exists(path):
                session.sftp.remove(path)
        receipt["rolled_back"] = True
    except (HostError, *TRANSPORT_ERRORS) as exc:
        receipt["rollback_error"] = " ".join(f"{type(exc).__name__}: {exc}".split())


def finish_host(session: HostSession, ts: TorchServeHost, version: str, receipt: dict, progress: Progress) -> None:
    """Retention and the config, also on an already-live host: an earlier run may have stopped after set-default
    and before them, and a stale config would bring the old default back at the next TorchServe start."""
    progress.begin("retention")
    receipt["versions_kept"] = apply_retention(session, ts, version)
    receipt["blobs_removed"] = remove_unused_blobs(session, blob_store_of(session.t))
    progress.done("retention")
    if session.t.ts_config:
        progress.begin("config")
        receipt["config_rewritten"] = write_host_config(session, version, receipt["versions_kept"])
        progress.done("config_written")


def apply_retention(session: HostSession, ts: TorchServeHost, version: str) -> list[str]:
    """Unregister versions beyond keep_versions, newest kept, and delete their archives and blob lists; the kept
    versions."""
    t = session.t
    kept = sorted(set(ts.versions()) | {version}, key=version_key, reverse=True)
    keep = [version] + [v for v in kept if v != version][:max(t.keep_versions - 1, 0)]
    for old in kept:
        if old not in keep:
            ts.unregister(old)
            name = mar_file_name(t.model_name, old)
            for path in (posixpath.join(t.model_store.rstrip("/"), name),
                         posixpath.join(blob_store_of(t), refs_name(name))):
                if session.exists(path):
                    session.sftp.remove(path)
    return sorted(keep, key=version_key)


def remove_unused_blobs(session: HostSession, store: str) -> list[str]:
    """Delete the blobs no archive's list names (and leftovers of interrupted uploads); their names. Lists of
    this model's archives that are not in the model store (a deploy that failed before its archive got there)
    are deleted first."""
    t, refs = session.t, []
    for name in session.listdir(store):
        mar = name.removesuffix(REFS_SUFFIX)
        if name == mar:
            continue
        if is_ours(mar, t.model_name) and not session.exists(posixpath.join(t.model_store.rstrip("/"), mar)):
            session.sftp.remove(posixpath.join(store, name))
        else:
            refs.append(session.read_text(posixpath.join(store, name)))
    doomed = unused(session.listdir(store), refs)
    for name in doomed:
        session.sftp.remove(posixpath.join(store, name))
    return doomed


def write_host_config(session: HostSession, default: str, versions: list[str]) -> bool:
    """Bring the host's config up to date; True when it had to be rewritten."""
    t = session.t
    text = session.read_text(t.ts_config) if session.exists(t.ts_config) else ""
    new = updated_ts_config(text, t.model_name, versions, default, worker_settings(t),
                            session.store_entries(t.model_store.rstrip("/")))
    if new == text:
        return False
    session.write_text_atomic(t.ts_config, new)
    return True


def run(args: argparse.Namespace) -> None:
    # paramiko logs the failures reported here (from its transport thread, with tracebacks) and, with no handler
    # configured, logging's last resort prints them to stderr: the receipt and the one-line error say it instead
    logging.getLogger("paramiko").addHandler(logging.NullHandler())
    release, deploy = params_mod.read(args.params, ReleaseSettings, DeploySettings)
    targets = parse_targets(deploy, release.model_name)
    out, mar = Path(args.out), Path(args.mar)
    experiment = os.environ.get("DVC_EXP_NAME") or os.environ.get("DVC_EXP_BASELINE_REV")
    if experiment:
        atomic_write_json(out, {"status": "skipped: experiment", "experiment": experiment, "targets": [],
                                "message": "experiments never deploy; `dvc repro` or `sempcyc release` does"})
        print(f"deploy: skipped: experiment {experiment} (experiments never deploy; `dvc repro` or "
              f"`sempcyc release` does), {len(targets)} target(s) untouched")
        return
    if not targets:
        atomic_write_json(out, {"status": "no targets", "message": "deploy.targets is empty; nothing deployed",
                                "targets": []})
        print("deploy: no targets configured (deploy.targets in params.yaml); nothing to do")
        return
    if not mar.exists():
        raise UserError(f"{mar}: not found; run `dvc repro archive`")
    try:
        check = json.loads(Path(args.serve_check).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{args.serve_check}: not found; run `dvc repro serve-check` first") from None
    if not check.get("passed"):
        raise UserError(f"{args.serve_check}: the archive did not pass serve-check; not deploying")
    archive = checked_archive(mar)
    smoke = smoke_from_check(check, Path(args.serve_check), archive, Path(args.dataset))
    summary = roll_out(targets, archive, smoke)
    atomic_write_json(out, summary)
    if summary["status"] == "failed":
        failed = next(r for r in summary["targets"] if r["status"] == "failed")
        raise UserError(f"deploy failed on {failed['target']}: {failed.get('error')} (receipt: {out}; hosts "
                        f"done: {', '.join(summary['hosts_with_new_version']) or 'none'})")


def smoke_from_check(check: dict, report: Path, archive: CheckedArchive, dataset: Path) -> dict:
    """The smoke query serve-check recorded for this very archive: its sketch (read from the dataset), the offline
    top-10 the served answer matched there, and k."""
    smoke = check.get("smoke") or {}
    if smoke.get("archive_sha256") != archive.digest:
        raise UserError(f"{report}: made for another archive than {archive.mar} (or by an older serve-check); run "
                        "`dvc repro serve-check` first")
    path = dataset / "sketches" / smoke["sketch"]
    try:
        sketch = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: not found (the smoke query's sketch); run `dvc repro extract`") from None
    return {"name": smoke["sketch"], "sketch": sketch, "expected": smoke["top10"], "k": smoke["k"]}


def roll_out(targets: list[Target], archive: CheckedArchive, smoke: dict) -> dict:
    """Deploy to each target in turn, stopping at the first failure; the receipt of the whole rollout."""
    receipts, failed = [], None
    for target in targets:
        if failed is not None:
            receipts.append({"target": target.name, "host": target.host, "status": "not attempted",
                             "reason": f"stopped after the failure on {failed}"})
            continue
        print(f"deploy: {target.name}: v{archive.version} ...", flush=True)
        receipt = deploy_target(target, archive, smoke["sketch"], smoke["expected"], smoke["k"])
        receipts.append(receipt)
        print(f"deploy: {target.name}: {receipt['status']} ({sent_line(receipt)})"
              + (f": {receipt['error']}" if receipt.get("error") else ""), flush=True)
        if receipt["status"] == "failed":
            failed = target.name
    summary = {"version": archive.version, "sha256": archive.digest, "archive": str(archive.mar),
               "smoke_sketch": smoke["name"], "targets": receipts,
               "hosts_with_new_version": [r["target"] for r in receipts if r["status"] in ("deployed", "already live")],
               "status": "failed" if failed else "ok"}
    return summary


def sent_line(receipt: dict) -> str:
    blobs = receipt.get("blobs") or {}
    line = f"{receipt['bytes_sent']:,} bytes sent"
    if blobs:
        line += f"; blobs: {len(blobs['sent'])} sent, {blobs['reused']} already there"
    return line
