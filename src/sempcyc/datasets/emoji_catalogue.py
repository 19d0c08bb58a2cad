"""Which emoji are concrete objects, and what their classes are called: the catalogue rules that the demo-data
stage (OpenMoji alone) and the cross-artist builder (several art sets) share.

Which emoji count as "concrete objects" is decided by three rules, applied in order:
  1. the codepoint lies in one of OBJECT_RANGES (blocks of animals, plants, food, objects, vehicles, buildings);
  2. it is not in EXCLUDED_CODEPOINTS (people, body parts and symbols inside those blocks, and near-duplicates
     such as four banknotes or four mailboxes that differ only by a small mark: their sketches would be the same);
  3. no word of its name is in EXCLUDED_WORDS (a safety net for faces, flags, arrows, hearts, signs, ...).

Every range ends at or before Unicode 13.0 (Python 3.10's database): names come from `unicodedata`, whose
version grows with Python, and an emoji that only a newer Python can name would otherwise join the catalogue
there and shift the hash order, giving a different dataset for the same params.
"""
from __future__ import annotations

import hashlib
import re
import unicodedata

OBJECT_RANGES: tuple[tuple[int, int], ...] = (
    (0x1F302, 0x1F302),  # closed umbrella
    (0x1F30B, 0x1F30B),  # volcano
    (0x1F30D, 0x1F30D),  # globe (the other two globes differ only in the continent shown)
    (0x1F321, 0x1F321),  # thermometer
    (0x1F32D, 0x1F393),  # food, plants, celebration objects
    (0x1F396, 0x1F3F0),  # medals, music, sports equipment, buildings
    (0x1F3F5, 0x1F3FA),  # rosette, label, racquet, amphora
    (0x1F400, 0x1F43F),  # animals
    (0x1F451, 0x1F462),  # clothing, bags, shoes
    (0x1F484, 0x1F4FF),  # cosmetics, office and household objects, media
    (0x1F508, 0x1F531),  # speaker, battery, locks, tools
    (0x1F54A, 0x1F54E),  # dove, places of worship, menorah
    (0x1F56F, 0x1F5FF),  # candle, clock, pens, computers, landmarks
    (0x1F680, 0x1F6D7),  # vehicles, household objects
    (0x1F6E0, 0x1F6FC),  # tools, boats, planes, small vehicles
    (0x1F93F, 0x1F945),  # diving mask, drum, glasses, spoon, goal net
    (0x1F947, 0x1F96F),  # medals, sports equipment, food
    (0x1F97B, 0x1F9AF),  # clothing, animals
    (0x1F9B4, 0x1F9B4),  # bone
    (0x1F9BA, 0x1F9BD),  # safety vest, wheelchairs
    (0x1F9C0, 0x1F9CB),  # food and drink
    (0x1F9E2, 0x1F9FF),  # clothing, household objects, tools
    (0x1FA70, 0x1FA74),  # clothing
    (0x1FA79, 0x1FA7A),  # bandage, stethoscope
    (0x1FA80, 0x1FA86),  # toys
    (0x1FA90, 0x1FAA8),  # planet, furniture, tools, instruments
    (0x1FAB0, 0x1FAB6),  # insects, plants, wood, feather
    (0x1FAD0, 0x1FAD6),  # food
    # Single objects among the older symbol blocks.
    (0x231A, 0x231B), (0x2328, 0x2328), (0x23F0, 0x23F2),  # watch, hourglass, keyboard, clocks
    (0x2602, 0x2603), (0x260E, 0x260E), (0x2615, 0x2615), (0x2618, 0x2618),  # umbrella, snowman, phone, cup, shamrock
    (0x2654, 0x2659),  # white chess pieces (the black ones are the same shapes)
    (0x2692, 0x2694), (0x2696, 0x2697), (0x2699, 0x2699),  # hammer and pick, anchor, swords, scales, alembic, gear
    (0x26B0, 0x26B1), (0x26BD, 0x26BE), (0x26CF, 0x26CF), (0x26D1, 0x26D1), (0x26D3, 0x26D3),
    (0x26E9, 0x26EA), (0x26F0, 0x26F0), (0x26F2, 0x26F2), (0x26F4, 0x26F5), (0x26F8, 0x26F8), (0x26FA, 0x26FA),
    (0x26FD, 0x26FD), (0x2702, 0x2702), (0x2708, 0x2709), (0x270F, 0x270F), (0x2712, 0x2712),
)

EXCLUDED_CODEPOINTS: frozenset[int] = frozenset({
    # people, body parts and faces that the word rules below do not catch
    0x1F385, 0x1F3AD, 0x1F3C2, 0x1F3C3, 0x1F3C4, 0x1F3C7, 0x1F3CA, 0x1F3CB, 0x1F3CC, 0x1F43D, 0x1F43E,
    0x1F487, 0x1F4A9, 0x1F4AA, 0x1F575, 0x1F5FF, 0x1F6A3, 0x1F6C0, 0x1F6CC, 0x1F9BB,
    # scenes, events and symbols rather than objects
    0x1F386, 0x1F391, 0x1F3A6, 0x1F3B5, 0x1F3B6, 0x1F3D8, 0x1F3D9, 0x1F3E9, 0x1F492, 0x1F4A7, 0x1F4AE,
    0x1F4B1, 0x1F4F3, 0x1F4F4, 0x1F4F6, 0x1F518, 0x1F52F, 0x1F573, 0x1F5DC, 0x1F6BB, 0x1F6BE, 0x1F6C2,
    0x1F6C3, 0x1F6C4, 0x1F6C5, 0x1F6D0, 0x1F6E3,
    # near-duplicates of another class (in brackets; it may itself be dropped by WEAK_COLOUR_LAYER)
    0x1F34F,                                  # green apple (red apple)
    0x1F425, 0x1F433,                         # front-facing baby chick, spouting whale (baby chick, whale)
    0x1F4B4, 0x1F4B6, 0x1F4B7,                # yen/euro/pound banknotes (dollar banknote)
    0x1F4C0,                                  # dvd (optical disc)
    0x1F4C4, 0x1F4C6,                         # page facing up, tear-off calendar (page with curl, calendar)
    0x1F4D7, 0x1F4D8, 0x1F4D9,                # green/blue/orange book (closed book, books)
    0x1F4E5,                                  # inbox tray (outbox tray)
    0x1F4F8,                                  # camera with flash (camera)
    0x1F507, 0x1F509, 0x1F50A,                # speakers with sound waves (speaker)
    0x1F50E, 0x1F50F, 0x1F510, 0x1F515,       # magnifier, locks, bell variants
    0x1F587, 0x1F5DD, 0x1F5DE,                # linked paperclips, old key, rolled-up newspaper
    0x1F6EB, 0x1F6EC,                         # airplane departure/arriving (airplane)
    0x1F948, 0x1F949,                         # second/third place medal (first place medal)
    0x1F9AE,                                  # guide dog (dog)
})

# Emoji whose colour layer alone does not show the object (a plain disc for a clock or a ball, only the wine of a
# wine glass, grey rectangles for books and phones): their images would teach nothing. Picked by eye from a
# contact sheet of every colour layer in OpenMoji 17.
WEAK_COLOUR_LAYER: frozenset[str] = frozenset("""
    alarm_clock stopwatch timer_clock scales alembic soccer_ball volleyball chains seedling herb cooked_rice
    sake_bottle_and_cup wine_glass cocktail_glass tropical_drink wind_chime film_frames fishing_pole_and_fish
    game_die building_construction stadium ant nail_polish personal_computer page_with_curl card_index
    bookmark_tabs ledger notebook notebook_with_decorative_cover closed_book satellite_antenna outbox_tray
    incoming_envelope newspaper mobile_phone spider spider_web spiral_note_pad wastebasket train shopping_trolley
    scooter drum_with_drumsticks clinking_glasses lacrosse_stick_and_ball glass_of_milk takeout_box cup_with_straw
    cricket mosquito probing_cane manual_wheelchair firecracker safety_pin roll_of_paper receipt stethoscope
    magic_wand pot_of_food
""".split())

# Emoji whose OpenMoji outline layer draws only a small part of the object (a sparkler's stick without its sparks,
# a bouquet's blossoms without the stems): the line layer's bounding box is under 45% of the whole emoji's, measured
# over every catalogue emoji in OpenMoji 17. The cross-artist builder does not take their sketches from OpenMoji.
# (The demo keeps them: changing its catalogue would change data/demo.tar.)
PARTIAL_LINE_LAYER: frozenset[int] = frozenset({
    0x1F38D,  # pine decoration
    0x1F387,  # firework sparkler
    0x1F490,  # bouquet
    0x1F687,  # metro
})

# Whole words (names split at spaces and hyphens), so HAND excludes "raised hand" but not "handbag".
EXCLUDED_WORDS: frozenset[str] = frozenset({
    "FACE", "FACES", "FLAG", "FLAGS", "ARROW", "ARROWS", "HEART", "HEARTS", "SIGN", "SYMBOL", "SYMBOLS",
    "KEYCAP", "LETTER", "LETTERS", "DIGIT", "NUMBERS", "INPUT", "SQUARE", "SQUARED", "CIRCLE",
    "CIRCLED", "TRIANGLE", "SHAPE", "CHART", "SPEECH", "THOUGHT", "BUBBLE", "SILHOUETTE", "ZODIAC",
    "PERSON", "PEOPLE", "MAN", "MEN", "WOMAN", "WOMEN", "BOY", "GIRL", "CHILDREN", "FAMILY", "COUPLE", "KISS",
    "HAND", "HANDS", "FINGER", "FINGERS", "FIST", "BICYCLIST", "PEDESTRIAN", "ONCOMING", "NO", "MODIFIER",
})

# Prefixes that only tell the glyph's rendering in old fonts ("BLACK SCISSORS", "LOWER LEFT BALLPOINT PEN");
# the class name is what a person would call the object.
NAME_PREFIXES_DROPPED = ("BLACK ", "WHITE ", "LOWER LEFT ")

# Animal heads whose animal has no full-body emoji: named after the animal, so they survive the FACE rule.
ANIMAL_FACE_NAMES: dict[int, str] = {
    0x1F438: "frog", 0x1F439: "hamster", 0x1F43A: "wolf", 0x1F43B: "bear", 0x1F43C: "panda",
    0x1F981: "lion", 0x1F984: "unicorn", 0x1F98A: "fox", 0x1F992: "giraffe", 0x1F993: "zebra",
}


def object_name(codepoint: int) -> str | None:
    """The readable name of one concrete-object emoji: its Unicode name lowercased, without the glyph-style
    prefixes (0x1F34E -> "red apple", 0x1F455 -> "t-shirt", 0x2702 -> "scissors"); None when it is not a
    concrete object. Rules 1-3 of the module docstring; WEAK_COLOUR_LAYER is not applied here."""
    if codepoint in ANIMAL_FACE_NAMES:
        return ANIMAL_FACE_NAMES[codepoint]
    if not any(low <= codepoint <= high for low, high in OBJECT_RANGES) or codepoint in EXCLUDED_CODEPOINTS:
        return None
    unicode_name = unicodedata.name(chr(codepoint), "")
    if not unicode_name:
        return None
    if set(re.split(r"[ -]", unicode_name)) & EXCLUDED_WORDS:
        return None
    for prefix in NAME_PREFIXES_DROPPED:
        if unicode_name.startswith(prefix):
            unicode_name = unicode_name[len(prefix):]
    return unicode_name.lower()


def class_name(codepoint: int) -> str | None:
    """The demo's class name of one emoji, e.g. 0x1F34E -> "red_apple": the object name with spaces and hyphens
    as underscores; None when it is not a concrete object or OpenMoji's colour layer does not show it."""
    if codepoint in ANIMAL_FACE_NAMES:
        return ANIMAL_FACE_NAMES[codepoint]
    readable = object_name(codepoint)
    if readable is None:
        return None
    name = re.sub(r"[ -]+", "_", readable)
    return None if name in WEAK_COLOUR_LAYER else name


def catalogue_codepoints() -> list[int]:
    """Every codepoint the rules can accept (the ranges and the named animal heads), in ascending order."""
    return sorted({cp for low, high in OBJECT_RANGES for cp in range(low, high + 1)} | set(ANIMAL_FACE_NAMES))


def catalogue_order_key(name: str) -> str:
    """Classes are taken in this order: a hash mixes animals, food and tools among the first N, and a class's
    place does not depend on which other classes exist, so N+1 classes are N classes plus one."""
    return hashlib.sha256(f"sempcyc-demo-class\0{name}".encode()).hexdigest()
