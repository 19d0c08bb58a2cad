"""One deploy target's SSH connection: commands, SFTP with verified uploads, and HTTP to the host's own URLs
through a direct-tcpip channel, so TorchServe's APIs can stay bound to the host's 127.0.0.1. Host keys are checked
against the target's known_hosts (unknown or changed: refused); every failure is a HostError naming the host and
what to do.
"""
from __future__ import annotations

import http.client
import os
import posixpath
import shlex
import stat
import uuid
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit

import paramiko

from .blobstore import (
    PARTIAL,
)
from .targets import Target


class HostError(Exception):
    """A failure on one host; the message names the host and what to do."""


# What talking to a host can raise besides HostError: paramiko's SSH errors (ChannelException when the host
# cannot reach a URL), OSError (SFTP refusals such as PermissionError, socket timeouts, dropped connections),
# http.client's protocol errors, and EOFError (a connection closed mid-answer).
TRANSPORT_ERRORS = (paramiko.SSHException, OSError, http.client.HTTPException, EOFError)


LOADABLE = (".mar", ".model", ".tar.gz")  # what TorchServe's load_models=ALL loads from the store, with folders


class HostSession:
    """SSH, SFTP and HTTP-through-SSH to one target."""

    def __init__(self, target: Target):
        self.t = target
        self.client = None
        self.sftp = None
        self.bytes_sent = 0

    def connect(self) -> HostSession:
        t = self.t
        known_hosts = Path(os.path.expanduser(t.known_hosts))
        client = paramiko.SSHClient()
        if not known_hosts.exists():
            raise HostError(f"{t.name}: known_hosts file {known_hosts} not found; add the host's key with "
                              f"`ssh-keyscan -p {t.port} {t.host} >> {known_hosts}` after checking its fingerprint")
        try:
            client.load_host_keys(str(known_hosts))
        except (OSError, paramiko.SSHException) as exc:
            raise HostError(f"{t.name}: cannot read known_hosts {known_hosts}: {exc}") from None
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        key_file = os.path.expanduser(t.key_file) if t.key_file else None
        if key_file and not Path(key_file).exists():
            raise HostError(f"{t.name}: SSH key file {key_file} not found (deploy.targets key_file)")
        try:
            client.connect(t.host, port=t.port, username=t.user, key_filename=key_file,
                           passphrase=os.environ.get(t.passphrase_env) or None,
                           allow_agent=key_file is None, look_for_keys=False, timeout=t.connect_timeout,
                           banner_timeout=t.connect_timeout, auth_timeout=t.connect_timeout)
        except paramiko.BadHostKeyException:
            raise HostError(f"{t.name}: the host key CHANGED since it was recorded in {known_hosts}; refusing "
                              "to connect (possible man-in-the-middle). If the host was really reinstalled, "
                              f"verify the new fingerprint and update {known_hosts}") from None
        except paramiko.AuthenticationException:
            raise HostError(f"{t.name}: SSH authentication failed for user {t.user!r} "
                              f"({'key ' + key_file if key_file else 'ssh-agent'}); check the key is in the "
                              "host's authorized_keys") from None
        except paramiko.PasswordRequiredException:
            raise HostError(f"{t.name}: the key {key_file} is encrypted; set its passphrase in "
                              f"${t.passphrase_env} or load it into ssh-agent") from None
        except paramiko.SSHException as exc:
            if "not found in known_hosts" in str(exc):
                raise HostError(f"{t.name}: unknown host key (not in {known_hosts}); refusing to connect. Add "
                                  f"it after checking its fingerprint: ssh-keyscan -p {t.port} {t.host}") from None
            raise HostError(f"{t.name}: SSH error: {exc}") from None
        except TimeoutError:
            raise HostError(f"{t.name}: no SSH answer within {t.connect_timeout:.0f} s; check host, port "
                              "and firewall") from None
        except OSError as exc:
            raise HostError(f"{t.name}: cannot connect to {t.host}:{t.port} ({exc.strerror or exc}); is sshd "
                              "running and the port right?") from None
        self.client = client
        self.sftp = client.open_sftp()
        return self

    def close(self) -> None:
        for thing in (self.sftp, self.client):
            try:
                if thing is not None:
                    thing.close()
            except Exception:
                pass

    def run(self, command: str, check: bool = True) -> str:
        _, stdout, stderr = self.client.exec_command(command, timeout=self.t.request_timeout)
        out = stdout.read().decode(errors="replace")
        rc = stdout.channel.recv_exit_status()
        if check and rc != 0:
            detail = stderr.read().decode(errors="replace")[:300]
            raise HostError(f"{self.t.name}: `{command}` failed ({rc}): {detail}")
        return out

    def exists(self, path: str) -> bool:
        try:
            self.sftp.stat(path)
            return True
        except FileNotFoundError:
            return False

    def sha256(self, path: str) -> str | None:
        if not self.exists(path):
            return None
        return self.run(f"sha256sum {shlex.quote(path)}").split()[0]

    def upload(self, source: BinaryIO, remote: str, size: int) -> None:
        """Send `size` bytes read from `source` to `remote`; bytes_sent counts every byte sent to this host."""
        before = self.bytes_sent

        def count(done: int, _total: int) -> None:
            self.bytes_sent = before + done
        self.sftp.putfo(source, remote, file_size=size, callback=count, confirm=True)

    def sha256_many(self, paths: list[str]) -> dict[str, str]:
        """path -> sha256 of those of `paths` that exist on the host (one remote command per 200)."""
        found = {}
        for start in range(0, len(paths), 200):
            quoted = " ".join(shlex.quote(p) for p in paths[start:start + 200])
            for line in self.run(f"sha256sum -- {quoted} 2>/dev/null", check=False).splitlines():
                digest, _, path = line.partition("  ")
                found[path] = digest
        return found

    def listdir(self, folder: str) -> list[str]:
        try:
            return self.sftp.listdir(folder)
        except FileNotFoundError:
            return []

    def makedirs(self, folder: str) -> None:
        """Create `folder` and its missing parents over SFTP (a read-only SFTP server refuses it)."""
        path = "/" if folder.startswith("/") else ""
        for part in [p for p in folder.split("/") if p]:
            path = posixpath.join(path, part) if path else part
            if not self.exists(path):
                self.sftp.mkdir(path)

    def read_text(self, path: str) -> str:
        with self.sftp.open(path, "r") as handle:
            return handle.read().decode("utf-8")

    def remove_quietly(self, path: str) -> None:
        """Remove a leftover if it is there; cleanup never hides the error that made it necessary."""
        try:
            if self.exists(path):
                self.sftp.remove(path)
        except TRANSPORT_ERRORS:
            pass

    def store_entries(self, store: str) -> list[str]:
        """What TorchServe's load_models=ALL would load from `store`, in the directory's own order (both read
        it with readdir): archives and folders, hidden names skipped."""
        entries = []
        for attr in self.sftp.listdir_attr(store):
            name = attr.filename
            if not name.startswith(".") and (stat.S_ISDIR(attr.st_mode or 0) or name.endswith(LOADABLE)):
                entries.append(name)
        return entries

    def write_new(self, path: str, data: bytes) -> None:
        """Replace `path` atomically by a new file of `data` (a file of deploy's own: mode and owner are the
        SSH user's defaults)."""
        tmp = f"{posixpath.dirname(path)}/.{posixpath.basename(path)}{PARTIAL}{uuid.uuid4().hex[:8]}"
        try:
            with self.sftp.open(tmp, "w") as handle:
                handle.write(data)
            self.sftp.posix_rename(tmp, path)
        finally:
            self.remove_quietly(tmp)

    def write_text_atomic(self, path: str, text: str) -> None:
        """Replace `path` by a new file with the old one's mode and owner. When the SSH user may not create a
        file there or give it that owner (not root), the old file is rewritten in place instead: same inode, so
        mode and owner stay, at the cost of atomicity (one small write; TorchServe reads it only at start)."""
        data = text.encode("utf-8")
        try:
            old = self.sftp.stat(path)
        except FileNotFoundError:
            old = None
        tmp = f"{path}.partial-{uuid.uuid4().hex[:8]}"
        try:
            with self.sftp.open(tmp, "w") as handle:
                handle.write(data)
            if old is not None:
                self.sftp.chmod(tmp, stat.S_IMODE(old.st_mode))
                new = self.sftp.stat(tmp)
                if (new.st_uid, new.st_gid) != (old.st_uid, old.st_gid):
                    self.sftp.chown(tmp, old.st_uid, old.st_gid)
            self.sftp.posix_rename(tmp, path)
        except PermissionError:
            if old is None:
                raise
            with self.sftp.open(path, "w") as handle:
                handle.write(data)
        finally:
            self.remove_quietly(tmp)

    def http(self, method: str, url: str, body: bytes | None = None, token: str | None = None,
             content_type: str | None = None) -> tuple[int, bytes]:
        parts = urlsplit(url)
        port = parts.port or 80
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        conn = http.client.HTTPConnection(parts.hostname, port, timeout=self.t.request_timeout)
        if self.t.tunnel:
            try:
                channel = self.client.get_transport().open_channel(
                    "direct-tcpip", (parts.hostname, port), ("127.0.0.1", 0), timeout=self.t.connect_timeout)
            except paramiko.SSHException as exc:
                raise HostError(f"{self.t.name}: the host cannot connect to {parts.netloc} for {method} "
                                  f"{parts.path} ({exc}); is TorchServe running there and the URL right "
                                  "(management_url / inference_url, as seen from the host)?") from None
            channel.settimeout(self.t.request_timeout)
            conn.sock = channel
        headers = {}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if content_type:
            headers["Content-Type"] = content_type
        try:
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read()
        except (OSError, http.client.HTTPException) as exc:
            raise HostError(f"{self.t.name}: {method} {parts.scheme}://{parts.netloc}{parts.path} failed: "
                              f"{exc}; is TorchServe running on the host?") from None
        finally:
            conn.close()
