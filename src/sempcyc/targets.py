"""The `deploy` params section: the TorchServe hosts a release is deployed to, one `Target` each.

Every target setting comes from `deploy.defaults`, overridden per target; `name` defaults to host:port and
`model_name` to release.model_name, an empty `blob_store` is <model_store>/.sem-pcyc-blobs. Secrets never go here:
keys that look like one are refused.
"""
from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from typing import ClassVar

from .errors import UserError
from .params import read_mapping, setting

SECRET_KEYS = re.compile(r"pass|secret|token(?!_env)|password|private", re.I)
# Hidden: load_models=ALL skips hidden entries of the model store (TorchServe 0.12 ModelServer: File.isHidden()).
DEFAULT_BLOB_DIR = ".sem-pcyc-blobs"


@dataclass(frozen=True)
class DeploySettings:
    SECTION: ClassVar[str] = "deploy"
    defaults: dict = setting()
    targets: list = setting()


@dataclass(frozen=True)
class Target:
    name: str = setting()
    host: str = setting()
    model_store: str = setting()
    blob_store: str | None = setting()         # the host's folder for large files by sha256; None: the default
    port: int = setting(min=1, max=65535)
    user: str = setting()
    key_file: str | None = setting()           # private key file on this machine; empty -> ssh-agent
    known_hosts: str = setting()
    ts_config: str | None = setting()          # the host's config.properties, kept current for restarts
    management_url: str = setting()
    inference_url: str = setting()
    tunnel: bool = setting()                   # reach the URLs through the SSH connection (as seen from the host)
    model_name: str = setting()
    workers: int = setting(min=1)
    batch_size: int = setting(min=1, max=256)  # TorchServe batching of the version (registration and config)
    max_batch_delay_ms: int = setting(min=0)
    keep_versions: int = setting(min=1)
    management_token_env: str = setting()
    inference_token_env: str = setting()
    remote_key_file: str | None = setting()    # the host's TorchServe key_file.json, read over SSH if set
    passphrase_env: str = setting()
    connect_timeout: float = setting(above=0.0)
    request_timeout: float = setting(above=0.0)  # one API call or remote command (registration loads workers)


def parse_targets(settings: DeploySettings, model_name: str) -> list[Target]:
    """The targets of the deploy section, each merged over deploy.defaults and checked."""
    targets = []
    for i, item in enumerate(settings.targets):
        where = f"params.yaml: deploy.targets[{i}]"
        if not isinstance(item, dict):
            raise UserError(f"{where} must be a mapping (host, model_store, ...)")
        _refuse_secrets(item, where)
        _refuse_secrets(settings.defaults, "params.yaml: deploy.defaults")
        for key in ("host", "model_store"):
            if not isinstance(item.get(key), str) or not item.get(key):
                raise UserError(f"{where}.{key} is required (a string)")
        values = {**settings.defaults, **item}
        values.setdefault("name", f"{values['host']}:{values.get('port')}")
        values.setdefault("model_name", model_name)
        target = read_mapping(values, Target, where)
        if not blob_store_of(target).startswith("/"):
            raise UserError(f"{where}: the blob store {blob_store_of(target)!r} must be an absolute path (the "
                            "handler on the host reads it); give model_store or blob_store as /absolute/path")
        targets.append(target)
    return targets


def blob_store_of(target: Target) -> str:
    """The host's blob store: `blob_store`, else a hidden folder inside the model store."""
    return (target.blob_store or posixpath.join(target.model_store, DEFAULT_BLOB_DIR)).rstrip("/") or "/"


def _refuse_secrets(item: dict, where: str) -> None:
    secrets = [k for k in item if SECRET_KEYS.search(k) and not k.endswith("_env")]
    if secrets:
        raise UserError(f"{where}: {', '.join(secrets)} looks like a secret; secrets never go in params.yaml. "
                        "Put them in environment variables (see *_env settings) or the ssh-agent")
