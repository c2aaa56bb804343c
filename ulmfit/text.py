"""Text normalisation rules that can be undone exactly (ULMFiT Sec. 3 / fastai's rules; MultiFiT).

The paper tokenises with special tokens for document start, capitalisation and repetition, so the
language model sees ``the`` and ``The`` as one word plus a flag. MultiFiT (Eisenschlos et al., 2019)
keeps these rules in front of a SentencePiece subword vocabulary. We apply them to the raw string
(before subword encoding) and make them an exact bijection, so ``denormalize(normalize(t)) == t``
for every string ``t``: decoded model output and stored token files show the user's exact text.

Markers (each a single SentencePiece piece, see :data:`MARKERS`):

- ``xxbos``  document start; ``normalize`` returns ``"xxbos" + rules(" " + text)``.
- ``xxmaj``  the next word was Capitalised (first letter upper, rest lower); the word is lowercased.
- ``xxup``   the next word was ALL CAPS with at least 2 letters; the word is lowercased.
- ``xxrep N c``   the non-space character ``c`` repeated ``N >= 4`` times.
- ``xxwrep N w``  the word ``w`` repeated ``N >= 4`` times, separated by single spaces.
- ``xxspm``  a literal ``U+2581`` (SentencePiece's own space symbol, which it cannot round-trip).
- ``xxesc``  ``"xxesc" + "xx"`` is a literal ``"xx"``: text that already spells a marker is escaped.

The case markers are zero-width: when the word follows a space, the marker goes *before* that
space (``"sat. The"`` -> ``"sat.xxmaj the"``), so the subword model still sees the common piece
``"▁the"`` and no stray ``"▁"`` piece is spent on the marker.
"""

from __future__ import annotations

import functools
import itertools
import operator
import re

import numpy as np

BOS = "xxbos"
MAJ = "xxmaj"
UP = "xxup"
REP = "xxrep"
WREP = "xxwrep"
SPM = "xxspm"
ESC = "xxesc"

#: Every marker, in a fixed order (the tokenizer registers them as user-defined pieces).
MARKERS: tuple[str, ...] = (BOS, MAJ, UP, REP, WREP, SPM, ESC)

#: Minimum run length for ``xxrep`` / ``xxwrep``.
MIN_REPEAT = 4

# A letter is a word character that is neither a digit nor an underscore (unicode aware).
_L = r"[^\W\d_]"
# A word: letters, optionally joined by apostrophes ("don't", "O'Neil").
_WORD = rf"{_L}+(?:['’]{_L}+)*"
WORD_RE = re.compile(_WORD)
# The names after "xx"; none contains an "x", which keeps the escape rule simple: a marker can
# never begin inside literal text and end inside a marker we inserted.
_NAMES = "bos|maj|up|rep|wrep|spm|esc"

# Normalisation is one regex pass over the raw text, built from the alternatives below. The
# alternatives that cannot fire anywhere in a document (checked by cheap C-level tests first) are
# left out of its pattern: Python's regex engine pays for every alternative at every position,
# and plain lowercase prose needs only the capitalisation rule. Dropping an alternative that
# matches nowhere cannot change the result, so every variant is the same bijection. Likewise
# the repetition rule only looks at the characters that do occur in runs, and a text whose
# letters are all ASCII or plain Latin-1 gets explicit classes, several times faster than the
# unicode letter class and identical on such text.
_ALTERNATIVES = {
    # A word repeated MIN_REPEAT+ times with single spaces (case-sensitive, whole words).
    "wrep": r"(?P<wrep>(?<!{L})(?<!['’])(?P<ww>{W})(?: (?P=ww)(?!{L}|['’]{L})){{{R},}})",
    # A word whose first letter is not a-z (may need xxmaj/xxup). The look-behind comes after
    # the first character so the engine can still skip quickly to candidate characters.
    "word": r"(?P<word>{U}(?<!{L}.){L}*(?:['’]{L}+)*)",
    # A character of the class {C} (those seen in runs) repeated MIN_REPEAT+ times.
    "rep": r"(?P<rep>(?P<rc>[{C}])(?P=rc){{{R},}})",
    # Text that already spells a marker.
    "esc": r"(?P<esc>xx(?={N}))",
    # SentencePiece's space symbol.
    "spm": r"(?P<spm>▁)",
}
# Latin-1 letters whose case maps one to one like ASCII (À..Þ <-> à..þ); ß, ÿ, µ, ª and º
# are left to the unicode path.
_LATIN_UPPER = "A-ZÀ-ÖØ-Þ"
_LATIN_LOWER = "a-zà-öø-þ"
_LATIN_LETTER = _LATIN_UPPER + _LATIN_LOWER
# Like the unicode class [^\W\d_a-z]: every letter but a-z may start a word the rule looks at
# (a word starting with "é" is taken whole, so capitals inside it are left alone).
_LATIN_START = _LATIN_UPPER + "à-öø-þ"
_CLASSES = {
    True: {"L": f"[{_LATIN_LETTER}]", "U": f"[{_LATIN_START}]"},
    False: {"L": _L, "U": r"[^\W\d_a-z]"},
}
# With such letters the regex itself tells Capitalised, ALL-CAPS and other words apart (the
# same classification as _case_of), so the common case costs no Python call per word.
_LATIN_END = rf"(?![{_LATIN_LETTER}]|['’][{_LATIN_LETTER}])"
_LATIN_CASE = (
    rf"[{_LATIN_START}](?<![{_LATIN_LETTER}].)(?:"
    rf"(?<=[{_LATIN_UPPER}])(?P<maj>[{_LATIN_LOWER}]*(?:['’][{_LATIN_LOWER}]+)*{_LATIN_END})"
    rf"|(?<=[{_LATIN_UPPER}])"
    rf"(?P<up>(?:[{_LATIN_UPPER}]+(?:['’][{_LATIN_UPPER}]+)*|(?:['’][{_LATIN_UPPER}]+)+)"
    rf"{_LATIN_END})"
    rf"|(?P<word>[{_LATIN_LETTER}]*(?:['’][{_LATIN_LETTER}]+)*))"
)
_NON_ASCII = re.compile(r"[^\x00-\x7f]+")
_OTHER_LETTER = re.compile(rf"(?![{_LATIN_LETTER}]){_L}")


@functools.lru_cache(maxsize=256)
def _master(latin: bool, kinds: tuple[str, ...], repeated: str) -> re.Pattern:
    classes = _CLASSES[latin]
    word = r"{L}+(?:['’]{L}+)*".format(**classes)
    parts = [
        _LATIN_CASE
        if latin and kind == "word"
        else _ALTERNATIVES[kind].format(
            W=word, R=MIN_REPEAT - 1, N=_NAMES, C=re.escape(repeated), **classes
        )
        for kind in kinds
    ]
    if len(parts) == 1:
        return re.compile(parts[0])
    # A look-ahead for the characters any alternative can start with: one class test rejects
    # most positions, instead of one test per alternative.
    others = re.escape(repeated) + ("x" if "esc" in kinds else "") + ("▁" if "spm" in kinds else "")
    if latin:
        first = f"[{_LATIN_LETTER if 'wrep' in kinds else _LATIN_START}{others}]"
    else:
        first = (_L if "wrep" in kinds else classes["U"]) + (f"|[{others}]" if others else "")
    return re.compile(f"(?={first})(?:{'|'.join(parts)})")


def _runs(text: str) -> np.ndarray:
    """Boolean mask of the positions that start a run of at least MIN_REPEAT equal code points
    (numpy: several times faster than a regex with a back-reference)."""
    if text.isascii():
        codes = np.frombuffer(text.encode("ascii"), dtype=np.uint8)
    else:
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    same = codes[1:] == codes[:-1]
    runs = same[: len(same) - MIN_REPEAT + 2]
    for shift in range(1, MIN_REPEAT - 1):
        runs = runs & same[shift : len(same) - MIN_REPEAT + 2 + shift]
    return runs


# The same rules inside one word that the master pattern matched as a whole.
_BODY = re.compile(
    rf"(?P<rep>(?P<rc>[^\s▁])(?P=rc){{{MIN_REPEAT - 1},}})|(?P<esc>xx(?={_NAMES}))|(?P<spm>▁)"
)
# What denormalize parses. Literal-producing tokens (esc, rep, spm) are resolved in place.
_TOKEN = re.compile(
    r"xx(?:(?P<esc>escxx)|(?P<case>maj|up)|rep (?P<rn>[0-9]+) (?P<rc>.)|wrep (?P<wn>[0-9]+) "
    r"|(?P<spm>spm)|(?P<bos>bos))",
    re.DOTALL,
)


def _body_sub(match: re.Match) -> str:
    kind = match.lastgroup
    if kind == "esc":
        return ESC + "xx"
    if kind == "spm":
        return SPM
    run = match.group("rep")
    return f"{REP} {len(run)} {run[0]}"


def _case_of(word: str, latin: bool) -> tuple[str, str]:
    """(marker, lowered word) when the case can be restored exactly, else ("", word)."""
    lowered = word.lower()
    # Some letters change length or class when case-mapped ("İ".lower() is two code points,
    # "ß".upper() is "SS"); such words are left as they are rather than restored wrongly.
    if not latin and (len(lowered) != len(word) or WORD_RE.fullmatch(lowered) is None):
        return "", word
    if len(word) >= 2 and word.isupper() and lowered.upper() == word:
        return UP, lowered
    first = word[0]
    if first != lowered[0] and lowered[0].upper() == first and word[1:] == lowered[1:]:
        return MAJ, lowered
    return "", word


def _normalize_word(word: str, latin: bool, has_repeat: bool) -> tuple[str, str]:
    marker, body = _case_of(word, latin)
    if has_repeat or "xx" in body:
        body = _BODY.sub(_body_sub, body)
    return marker, body


def _has_word_repeat(text: str) -> bool:
    # In "w w w w" the inner words are whole whitespace-separated tokens, equal to each other,
    # with a token ending in w before them and one starting with w after them: a necessary
    # condition for the "wrep" alternative that plain str/list operations test quickly.
    tokens = text.split()
    if not any(map(operator.eq, tokens, itertools.islice(tokens, 1, None))):
        return False  # most texts: no two equal neighbours at all
    return any(
        tokens[i] == tokens[i + 1]
        and tokens[i - 1].endswith(tokens[i])
        and tokens[i + 2].startswith(tokens[i])
        for i in range(1, len(tokens) - 2)
    )


def normalize(text: str) -> str:
    """Apply the rules; the result starts with ``xxbos`` and :func:`denormalize` inverts it."""
    return _normalize(text)


def _normalize(text: str, fast_classes: bool = True) -> str:
    source = " " + text
    lowered = source.lower()
    ascii_only = source.isascii()
    # Explicit Latin-1 classes serve any text whose letters are ASCII or plain Latin-1 letters
    # (accents, curly quotes, dashes and emoji are common in reviews), provided lowercasing keeps
    # every position (then ``lowered[i]`` is the lowercase of ``source[i]``).
    latin = fast_classes and (
        ascii_only
        or (
            len(lowered) == len(source)
            and _OTHER_LETTER.search("".join(_NON_ASCII.findall(source))) is None
        )
    )
    # Runs in the raw text decide the "rep" alternative; runs that appear once a word is
    # lowercased ("AAaa") are marked inside that word.
    # On ASCII a run in the raw text is a run in ``lowered`` too, so an ASCII text without runs
    # in ``lowered`` (most texts) needs only that one check. (Not so in general: "ΣΣΣΣ".lower()
    # is "σσσς".)
    has_repeat = bool(_runs(lowered).any())
    starts = np.flatnonzero(_runs(source)).tolist() if has_repeat or not ascii_only else []
    has_repeat = has_repeat or len(starts) > 0
    repeated = "".join(sorted({source[i] for i in starts} - {"▁"}))
    repeated = "".join(c for c in repeated if not c.isspace())
    has_xx = "xx" in lowered
    kinds = tuple(
        kind
        for kind, needed in (
            ("wrep", _has_word_repeat(source)),
            ("word", True),
            ("rep", bool(repeated)),
            ("esc", has_xx),
            ("spm", not ascii_only and "▁" in source),
        )
        if needed
    )
    out = [BOS]
    position = 0
    for match in _master(latin, kinds, repeated).finditer(source):
        start, end = match.span()
        kind = match.lastgroup
        if kind == "maj" or kind == "up":  # Latin classes: lowercasing keeps positions
            marker = MAJ if kind == "maj" else UP
            body = lowered[start:end]
            if has_repeat or (has_xx and "xx" in body):
                body = _BODY.sub(_body_sub, body)
        elif kind == "word":
            word = source[start:end]
            if latin:
                marker, body = "", word
                if has_repeat or (has_xx and "xx" in body):
                    body = _BODY.sub(_body_sub, body)
            else:
                marker, body = _normalize_word(word, latin, has_repeat)
        else:
            out.append(source[position:start])
            if kind == "wrep":
                word = match.group("ww")
                count = (end - start + 1) // (len(word) + 1)
                marker, body = _normalize_word(word, latin, has_repeat)
                out.append(f"{WREP} {count} {marker}{body}")
            elif kind == "rep":
                out.append(f"{REP} {end - start} {source[start]}")
            elif kind == "esc":
                out.append(ESC + "xx")
            else:
                out.append(SPM)
            position = end
            continue
        if marker and start > position and source[start - 1] == " ":
            # The marker goes in front of the space, so the word keeps its "▁word" piece.
            out.append(source[position : start - 1])
            out.append(marker + " " + body)
        else:
            out.append(source[position:start])
            out.append(marker + body)
        position = end
    out.append(source[position:])
    return "".join(out)


def _apply_case(kind: str, word: str) -> str:
    if kind == "maj":
        return word[0].upper() + word[1:]
    if kind == "up":
        return word.upper()
    return word


def denormalize(normalized: str) -> str:
    """Undo :func:`normalize` exactly.

    Also accepts text that ``normalize`` did not produce (for example sampled model output): a
    marker with nothing to act on is dropped, and an ``xxbos`` inside the text (a document
    boundary in a stream of documents) becomes a blank line.
    """
    body = normalized
    leading = body.startswith(BOS)
    if leading:
        body = body[len(BOS) :]
    # Pass 1: resolve literal-producing tokens and collect operators between literal strings.
    items: list[str | tuple[str, object]] = []
    buffer: list[str] = []
    position = 0
    for match in _TOKEN.finditer(body):
        if match.start() > position:
            buffer.append(body[position : match.start()])
        position = match.end()
        if match.group("esc") is not None:
            buffer.append("xx")
        elif match.group("rc") is not None:
            buffer.append(match.group("rc") * int(match.group("rn")))
        elif match.group("spm") is not None:
            buffer.append("▁")
        elif match.group("bos") is not None:
            buffer.append("\n\n")
        else:
            if buffer:
                items.append("".join(buffer))
                buffer = []
            if match.group("case") is not None:
                items.append(("case", match.group("case")))
            else:
                items.append(("wrep", int(match.group("wn"))))
    buffer.append(body[position:])
    items.append("".join(buffer))
    # Pass 2: a case marker acts on the word that follows it (after at most one space, which
    # it was moved in front of); a word repetition repeats the (case-restored) word after it.
    out: list[str] = []
    case: str | None = None
    repeat: int | None = None
    for item in items:
        if isinstance(item, tuple):
            if item[0] == "case":
                case = item[1]  # type: ignore[assignment]
            else:
                repeat = item[1]  # type: ignore[assignment]
            continue
        if case is not None or repeat is not None:
            start = 1 if case is not None and repeat is None and item.startswith(" ") else 0
            word = WORD_RE.match(item, start)
            if word is not None:
                restored = _apply_case(case or "", word.group())
                if repeat is not None:
                    restored = " ".join([restored] * repeat)
                item = item[:start] + restored + item[word.end() :]
            case = repeat = None
        out.append(item)
    text = "".join(out)
    if leading and text.startswith(" "):
        text = text[1:]
    return text
