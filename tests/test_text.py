"""Normalisation rules: exact round trip on hand cases and on many random strings."""

from __future__ import annotations

import random

import pytest

from ulmfit.text import MARKERS, _normalize, denormalize, normalize

HAND_CASES = [
    "",
    " ",
    "The cat sat on the mat.",
    "I said NO. I mean it, OK?",
    "McDonald's iPhone eBay O'Neil o'Neil DON'T",
    "Sooooo goooood!!!!! 1000000 ....",
    "the the the the end",
    "The The The The end",
    "ha ha ha ha ha, HA HA HA HA",
    "  leading and trailing  ",
    "line one\nline two\r\n\n\ttabbed\u3000ideographic space",
    "emoji 😀😀😀😀 and 👍🏽 family 👨‍👩‍👧",
    "İstanbul STRASSE straße ẞ ǅemal Σίσυφος ΣΊΣΥΦΟΣ",
    "literal markers: xxbos xxmaj xxup xxrep 4 x xxwrep 5 w xxesc xxspm",
    "XXMAJ Xxmaj xXmaj xxxmaj xxxxmaj xxescxx xxxxxxxx",
    "SentencePiece's space ▁ and ▁▁▁▁ runs",
    "é (e + combining accent) and Ñandú",
    "\x00control\x1bchars\x7f",
    "a" * 5 + "A" * 5 + "aAaAaA",
]


@pytest.mark.parametrize("text", HAND_CASES)
def test_round_trip_hand_cases(text: str) -> None:
    normalized = normalize(text)
    assert normalized.startswith("xxbos")
    assert denormalize(normalized) == text


def test_rules_mark_case_and_repetition() -> None:
    assert normalize("The DOG") == "xxbosxxmaj thexxup dog"
    assert normalize("Wow!!!!!") == "xxbosxxmaj wowxxrep 5 !"
    assert normalize("go go go go") == "xxbos xxwrep 4 go"
    # mixed case and repetition below the threshold are left alone
    assert normalize("McDonald aaa") == "xxbos McDonald aaa"
    # single capital letter is a Capitalised word; "ß".upper() is "SS", so no xxup there
    assert normalize("I") == "xxbosxxmaj i"
    assert normalize("STRAßE") == "xxbos STRAßE"
    # a run survives in the raw text even where lowercasing breaks it ("ΣΣΣΣ" -> "σσσς")
    assert normalize("aΣΣΣΣ") == "xxbos axxrep 4 Σ"


def test_literal_markers_are_escaped() -> None:
    normalized = normalize("xxmaj")
    # the literal text is not read as a capitalisation marker
    assert denormalize(normalized) == "xxmaj"
    assert "xxesc" in normalized


def _random_text(rng: random.Random) -> str:
    """Strings biased towards the hard cases: markers, x runs, case mixes, repeats, whitespace."""
    atoms = [
        "a", "b", "x", "xx", "X", "XX", "The", "THE", "the", "McD", "I", "o'", "'", "’", "ß",
        "İ", "é", "Σ", "ǅ", "é", "😀", "👍🏽", "▁", " ", "  ", "\n", "\t", "\r\n", "\u3000",
        ".", "!", "0", "1", "_", "-", "maj", "bos", "up", "rep", "wrep", "esc", "spm",
        *MARKERS, "xxrep 4 ", "xxwrep 5 ", " 12 ", "\x00",
    ]  # fmt: skip
    parts = []
    for _ in range(rng.randint(0, 25)):
        atom = rng.choice(atoms)
        roll = rng.random()
        if roll < 0.1:
            atom = atom * rng.randint(2, 7)
        elif roll < 0.2:
            atom = " ".join([atom] * rng.randint(2, 6))
        elif roll < 0.3:
            atom = atom.upper()
        elif roll < 0.35:
            atom = atom.capitalize()
        parts.append(atom)
    return "".join(parts)


def test_round_trip_random_strings() -> None:
    rng = random.Random(0)
    for _ in range(10_000):
        text = _random_text(rng)
        assert denormalize(normalize(text)) == text, repr(text)


def test_round_trip_random_unicode() -> None:
    rng = random.Random(1)
    alphabet = [chr(c) for c in range(0x20, 0x250)] + ["\n", "\t", "▁", "😀", "x", "X", " "] * 20
    for _ in range(5_000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        assert denormalize(normalize(text)) == text, repr(text)


def test_denormalize_tolerates_free_model_output() -> None:
    # a case marker with no word after it, and a document boundary in the middle of a stream
    assert denormalize("xxbos hello xxmaj") == "hello "
    assert denormalize("xxbos a.xxbos b") == "a.\n\n b"


def test_ascii_fast_path_agrees_with_unicode_path() -> None:
    # ASCII documents take faster ASCII-only patterns; one non-ASCII character elsewhere in the
    # document must not change how the ASCII words are normalised.
    rng = random.Random(2)
    ascii_atoms = ["The", "THE", "the", "I", "I'M", "McD", "o'Neil", "DON'T", "Ab'Cd", "x", "xx"]
    ascii_atoms += ["maj", "aaaa", "AAAA", "Aaaa", "!!!!", " ", "  ", "\n", ".", "'", "0"]
    for _ in range(5_000):
        text = "".join(rng.choice(ascii_atoms) for _ in range(rng.randint(0, 15)))
        assert normalize(text + " é") == normalize(text) + " é", repr(text)


def test_latin_classes_agree_with_unicode_classes() -> None:
    # Texts whose letters are all ASCII or plain Latin-1 use explicit regex classes, even when
    # they hold curly quotes, dashes or emoji; the result must equal the unicode-class result.
    rng = random.Random(5)
    atoms = ["The", "THE", "the", "I", "I’M", "Don’t", "DON’T", "O’Neil", "McD", "xx", "maj"]
    atoms += ["’", "“", "”", "—", "…", "😀", "▁", " ", "  ", "\n", ".", "!!!!", "————", "0"]
    atoms += ["aaaa", "AAAA", "’’’’", "the the the the", "’s", "A’B", "x", "X", "▁▁▁▁"]
    atoms += ["Émile", "ÉTÉ", "café", "Ærø", "ÀÀÀÀ", "àààà", "ß", "ÿ", "µ", "ª", "İ", "Σ", "½"]
    for _ in range(5_000):
        text = "".join(rng.choice(atoms) for _ in range(rng.randint(0, 15)))
        assert _normalize(text) == _normalize(text, fast_classes=False), repr(text)
