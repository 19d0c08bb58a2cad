"""A serving host's TorchServe setup, without a host: the config.properties edits deploy makes
(torchserve_host.updated_ts_config) and docs/torchserve.service.
"""
from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from helpers import REPO, VENV_BIN
from sempcyc import torchserve_host

# a target's workers and batching, as torchserve_host.worker_settings writes them into the models JSON
WORKERS1 = {"minWorkers": 1, "maxWorkers": 1, "batchSize": 2, "maxBatchDelay": 1}
WORKERS2 = {"minWorkers": 2, "maxWorkers": 2, "batchSize": 8, "maxBatchDelay": 5}


def test_updated_ts_config_keeps_other_settings():
    text = "inference_address=http://127.0.0.1:1\nload_models=other.mar,sem_pcyc-0.0.1.mar\n" \
           'models={"other": {"1.0": {"marName": "other.mar", "defaultVersion": true}}}\n'
    out = torchserve_host.updated_ts_config(text, "sem_pcyc", ["0.1.0", "0.2.0"], "0.2.0", WORKERS2)
    props = dict(line.split("=", 1) for line in out.splitlines())
    assert props["inference_address"] == "http://127.0.0.1:1"
    # the default first: TorchServe makes the first version it loads the default, whatever the JSON says
    assert props["load_models"] == "sem_pcyc-0.2.0.mar,sem_pcyc-0.1.0.mar,other.mar"
    models = json.loads(props["models"])
    assert models["other"]["1.0"]["marName"] == "other.mar"
    assert models["sem_pcyc"]["0.2.0"]["defaultVersion"] is True
    assert models["sem_pcyc"]["0.1.0"]["defaultVersion"] is False
    assert all(models["sem_pcyc"][v].items() >= WORKERS2.items() for v in ("0.1.0", "0.2.0"))


def test_updated_ts_config_all_other_models_and_extras():
    store = ["zeta.mar", "sem_pcyc-0.1.0.mar", "models-dir", "sem_pcyc-extra-1.0.mar"]
    text = ("# host\nload_models=ALL\nmodels={\"sem_pcyc\": {\"0.1.0\": {\"batchSize\": 4}}, "
            "\"zeta\": {\"2\": {}}}\n")
    out = torchserve_host.updated_ts_config(text, "sem_pcyc", ["0.1.0", "0.2.0"], "0.2.0", WORKERS1, store)
    props = config_props_text(out)
    assert props["load_models"] == "sem_pcyc-0.2.0.mar,sem_pcyc-0.1.0.mar,zeta.mar,models-dir,sem_pcyc-extra-1.0.mar"
    assert out.splitlines()[1] == torchserve_host.ALL_MARKER and out.startswith("# host\n")
    models = json.loads(props["models"])
    # the target's batching replaces what the host had for our versions; other models are left as they were
    assert models["zeta"] == {"2": {}} and models["sem_pcyc"]["0.1.0"]["batchSize"] == 2
    # idempotent, and the marker keeps listing the store at the next deploy
    assert torchserve_host.updated_ts_config(out, "sem_pcyc", ["0.1.0", "0.2.0"], "0.2.0", WORKERS1, store) == out
    later = torchserve_host.updated_ts_config(out, "sem_pcyc", ["0.2.0", "0.3.0"], "0.3.0", WORKERS1,
                                              store + ["new.mar"])
    assert config_props_text(later)["load_models"].endswith(",new.mar") and later.count(torchserve_host.ALL_MARKER) == 1
    # a plain list keeps other models' entries where and as they were (their first is their default)
    listed = "load_models=b-2.mar,sem_pcyc-0.1.0.mar,b-1.mar,sem_pcyc=x/sem_pcyc-0.0.9.mar,c=c.mar\n"
    out = torchserve_host.updated_ts_config(listed, "sem_pcyc", ["0.2.0"], "0.2.0", WORKERS1, store)
    assert config_props_text(out)["load_models"] == "sem_pcyc-0.2.0.mar,b-2.mar,b-1.mar,c=c.mar"


def config_props_text(text: str) -> dict:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))


def test_systemd_unit_stops_java_with_the_wrapper(tmp_path):
    """docs/torchserve.service: stopping the foreground wrapper alone leaves Java running (bench/torchserve_stop.py
    measures it), so the unit stops TorchServe itself and keeps killing the whole control group."""
    unit = (REPO / "docs/torchserve.service").read_text(encoding="utf-8")
    settings = {}
    for line in unit.splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    assert settings["KillMode"] == ["control-group"]
    assert "--foreground" in settings["ExecStart"][0].split() and "--stop" in settings["ExecStop"][0].split()
    assert any(v.startswith("TMPDIR=") for v in settings["Environment"]) and settings["WorkingDirectory"]
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    local = tmp_path / "torchserve.service"  # with an installed torchserve and an existing user
    local.write_text(unit.replace("/opt/torchserve/bin/torchserve", str(VENV_BIN / "torchserve"))
                     .replace("=torchserve\n", "=root\n"))
    proc = subprocess.run([analyze, "verify", str(local)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr
