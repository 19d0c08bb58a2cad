"""TorchServe on a deploy target, as the deploy stage drives it: its management and inference APIs through the
host's SSH session (TorchServeHost), and the edits to its config.properties that make the default version survive
a restart (load_models / models), keeping what the host's owner wrote there.
"""
from __future__ import annotations

import json
import os
import posixpath
import re
from urllib.parse import quote

from .serving import (
    SEMVER,
    parse_properties,
)
from .ssh_host import HostError, HostSession
from .targets import Target

# Written above load_models when the host's config had load_models=ALL (see updated_ts_config).
ALL_MARKER = ("# load_models was ALL: deploy lists every archive of model_store here at each deploy, the default "
              "version first (delete this line to stop)")


def version_key(version: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"[.\-]", version))


class TorchServeHost:
    """TorchServe's management and inference APIs of one host, reached through its HostSession."""

    def __init__(self, session: HostSession):
        self.s, self.t = session, session.t
        self.tokens = self._tokens()

    def _tokens(self) -> dict:
        tokens = {"management": os.environ.get(self.t.management_token_env),
                  "inference": os.environ.get(self.t.inference_token_env)}
        if self.t.remote_key_file and not all(tokens.values()):
            try:
                keys = json.loads(self.s.read_text(self.t.remote_key_file))
            except (OSError, json.JSONDecodeError) as exc:
                raise HostError(f"{self.t.name}: cannot read TorchServe key file {self.t.remote_key_file}: "
                                  f"{exc}") from None
            tokens["management"] = tokens["management"] or keys.get("management", {}).get("key")
            tokens["inference"] = tokens["inference"] or keys.get("inference", {}).get("key")
        return tokens

    def mgmt(self, method: str, path: str) -> tuple[int, object]:
        status, body = self.s.http(method, self.t.management_url.rstrip("/") + path, token=self.tokens["management"])
        self._check_token(status, body, "management", self.t.management_token_env)
        try:
            return status, json.loads(body) if body else None
        except json.JSONDecodeError:
            return status, body.decode(errors="replace")

    def _check_token(self, status: int, body: bytes, api: str, env: str) -> None:
        # TorchServe answers a missing or stale token with 400 InvalidKeyException (401 in some versions)
        if status in (400, 401) and (b"InvalidKeyException" in body or b"Token Authorization" in body):
            why = "wrong or expired" if self.tokens[api] else "none given"
            raise HostError(f"{self.t.name}: the {api} API refused the token ({why}); set ${env} or "
                              "deploy.targets remote_key_file (TorchServe's key_file.json)")

    def versions(self) -> list[str]:
        status, body = self.mgmt("GET", f"/models/{self.t.model_name}/all")
        if status == 404:
            return []
        if status != 200:
            raise HostError(f"{self.t.name}: listing versions failed ({status}): {body}")
        return [m["modelVersion"] for m in body]

    def default_version(self) -> str | None:
        status, body = self.mgmt("GET", f"/models/{self.t.model_name}")
        if status == 404:
            return None
        if status != 200:
            raise HostError(f"{self.t.name}: describing {self.t.model_name} failed ({status}): {body}")
        return body[0]["modelVersion"] if body else None

    def register(self, mar_name: str) -> None:
        query = (f"url={quote(mar_name)}&model_name={quote(self.t.model_name)}&initial_workers={self.t.workers}"
                 f"&batch_size={self.t.batch_size}&max_batch_delay={self.t.max_batch_delay_ms}&synchronous=true")
        status, body = self.mgmt("POST", f"/models?{query}")
        if status == 405 or (status == 400 and "model api" in str(body).lower()):
            raise HostError(f"{self.t.name}: TorchServe refuses registration (start it with "
                              f"enable_model_api=true): {body}")
        if status != 200:
            raise HostError(f"{self.t.name}: registering {mar_name} failed ({status}): {body}")

    def unregister(self, version: str) -> None:
        status, body = self.mgmt("DELETE", f"/models/{self.t.model_name}/{version}")
        if status not in (200, 404):
            raise HostError(f"{self.t.name}: unregistering version {version} failed ({status}): {body}")

    def set_default(self, version: str) -> None:
        status, body = self.mgmt("PUT", f"/models/{self.t.model_name}/{version}/set-default")
        if status != 200:
            raise HostError(f"{self.t.name}: set-default {version} failed ({status}): {body}")

    def predict(self, version: str, sketch: bytes) -> tuple[int, bytes]:
        url = f"{self.t.inference_url.rstrip('/')}/predictions/{self.t.model_name}/{version}"
        status, body = self.s.http("POST", url, sketch, token=self.tokens["inference"], content_type="image/png")
        self._check_token(status, body, "inference", self.t.inference_token_env)
        return status, body


def mar_file_name(model_name: str, version: str) -> str:
    return f"{model_name}-{version}.mar"


def is_ours(entry: str, model_name: str) -> bool:
    """Whether a load_models entry (`url` or `name=url`, as TorchServe splits it) is one of this model's
    archives as deploy names them: `other=x.mar` or `sem_pcyc-extra-1.0.mar` (another model) are not."""
    name, sep, _ = entry.partition("=")
    if sep:
        return name.strip() == model_name
    base = posixpath.basename(entry.strip())
    prefix = f"{model_name}-"
    return base.startswith(prefix) and base.endswith(".mar") and SEMVER.match(base[len(prefix):-4]) is not None


def updated_ts_config(text: str, model_name: str, versions: list[str], default: str, workers: dict,
                      store_entries: list[str] = ()) -> str:
    """The host's config.properties with this model's load_models/models entries set to `versions`, the
    default's archive first; everything else kept: other settings and comments, other models' entries in their
    order (the first version TorchServe loads of a model is its default, theirs too), extra JSON keys.

    TorchServe 0.12 ignores "defaultVersion" at start-up (the JSON only gives workers) and makes the first
    version it loads the default (measured). load_models=ALL loads the model store in directory order, so the
    default cannot be put first there: ALL becomes the list of what ALL loads now (`store_entries`, in directory
    order), marked with ALL_MARKER so that every later deploy lists the store again."""
    props = parse_properties(text)
    listed = [m.strip() for m in props.get("load_models", "").split(",") if m.strip()]
    expand_all = props.get("load_models", "").upper() == "ALL" or ALL_MARKER in (ln.strip() for ln in text.splitlines())
    others = [e for e in (store_entries if expand_all else listed) if not is_ours(e, model_name)]
    newest_first = sorted(set(versions) - {default}, key=version_key, reverse=True)
    loaded = [mar_file_name(model_name, v) for v in [default, *newest_first]] + others
    new = {"load_models": ",".join(dict.fromkeys(loaded)),
           "models": json.dumps(models_json(props, model_name, versions, default, workers), sort_keys=True)}
    return set_properties(text, new, ALL_MARKER if expand_all else None)


def models_json(props: dict, model_name: str, versions: list[str], default: str, workers: dict) -> dict:
    """The `models` JSON with this model's entry set to `versions`; other models and keys of ours kept. `workers`:
    minWorkers, maxWorkers, batchSize and maxBatchDelay of every version (worker_settings)."""
    try:
        models = json.loads(props.get("models", "{}") or "{}")
    except json.JSONDecodeError:
        models = None
    if not isinstance(models, dict):
        raise HostError("the host's TorchServe config has an unreadable models= line; fix it by hand")
    before = models.get(model_name) if isinstance(models.get(model_name), dict) else {}
    models[model_name] = {v: {"responseTimeout": 120, **(before.get(v) or {}), "defaultVersion": v == default,
                              "marName": mar_file_name(model_name, v), **workers}
                          for v in versions}
    return models


def worker_settings(t: Target) -> dict:
    """A target's workers and batching as TorchServe's models JSON names them."""
    return {"minWorkers": t.workers, "maxWorkers": t.workers, "batchSize": t.batch_size,
            "maxBatchDelay": t.max_batch_delay_ms}


def set_properties(text: str, new: dict, marker: str | None) -> str:
    """`text` with the lines of `new`'s keys replaced in place (appended if absent); `marker` above load_models."""
    out, done = [], set()
    for line in text.splitlines():
        if line.strip() == ALL_MARKER:
            continue  # written again right above load_models when still wanted
        key = line.split("=", 1)[0].strip() if "=" in line and not line.lstrip().startswith("#") else None
        if key in new:
            out += ([marker] if key == "load_models" and marker else []) + [f"{key}={new[key]}"]
            done.add(key)
        else:
            out.append(line)
    for key, value in new.items():
        if key not in done:
            out += ([marker] if key == "load_models" and marker else []) + [f"{key}={value}"]
    return "\n".join(out) + "\n"
