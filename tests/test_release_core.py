"""The release's pure core (unit): the next version from the tags, release.version written into params.yaml and
nothing else, and the leftovers of an unfinished release told from a person's edits.
"""
from __future__ import annotations

import pytest
import yaml

from helpers import REPO
from sempcyc.commands.release import next_version, real_changes, set_release_version
from sempcyc.errors import UserError
from sempcyc.gate import gate_note
from sempcyc.vcs import parse_tags

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


def test_gate_note_records_an_override():
    assert gate_note(False, "unseen mAP@all 0.1 is below the baseline 0.2") == \
        "quality gate OVERRIDDEN: unseen mAP@all 0.1 is below the baseline 0.2"
    assert gate_note(True, "unseen mAP@all 0.3").startswith("quality gate passed: ")
