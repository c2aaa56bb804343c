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
# matches nowhere cannot change the result, so every variant is the same bijection. ASCII text
# also gets ASCII classes, which are several times faster than the unicode letter class and
# identical on ASCII input.
_ALTERNATIVES = {
    # A word repeated MIN_REPEAT+ times with single spaces (case-sensitive, whole words).
    "wrep": r"(?P<wrep>(?<!{L})(?<!['’])(?P<ww>{W})(?: (?P=ww)(?!{L}|['’]{L})){{{R},}})",
    # A word whose first letter is not a-z (may need xxmaj/xxup). The look-behind comes after
    # the first character so the engine can still skip quickly to candidate characters.
    "word": r"(?P<word>{U}(?<!{L}.){L}*(?:['’]{L}+)*)",
    # A non-space character repeated MIN_REPEAT+ times (U+2581 is escaped as a whole instead).
    "rep": r"(?P<rep>(?P<rc>[^\s▁])(?P=rc){{{R},}})",
    # Text that already spells a marker.
    "esc": r"(?P<esc>xx(?={N}))",
    # SentencePiece's space symbol.
    "spm": r"(?P<spm>▁)",
}
_CLASSES = {
    True: {"L": "[A-Za-z]", "U": "[A-Z]"},
    False: {"L": _L, "U": r"[^\W\d_a-z]"},
}
# On ASCII text the regex itself tells Capitalised, ALL-CAPS and other words apart (the same
# classification as _case_of), so the common case costs no Python call per word. Starting the
# pattern with one character class lets the engine skip straight to capital letters.
_ASCII_END = r"(?![A-Za-z]|'[A-Za-z])"
_ASCII_CASE = (
    r"[A-Z](?<![A-Za-z].)(?:"
    rf"(?P<maj>[a-z]*(?:'[a-z]+)*{_ASCII_END})"
    rf"|(?P<up>(?:[A-Z]+(?:'[A-Z]+)*|(?:'[A-Z]+)+){_ASCII_END})"
    r"|(?P<word>[A-Za-z]*(?:'[A-Za-z]+)*))"
)


@functools.lru_cache(maxsize=64)
def _master(ascii_only: bool, kinds: tuple[str, ...]) -> re.Pattern:
    classes = _CLASSES[ascii_only]
    word = r"{L}+(?:['’]{L}+)*".format(**classes)
    parts = [
        _ASCII_CASE
        if ascii_only and kind == "word"
        else _ALTERNATIVES[kind].format(W=word, R=MIN_REPEAT - 1, N=_NAMES, **classes)
        for kind in kinds
    ]
    return re.compile("|".join(parts))


def _has_char_repeat(text: str) -> bool:
    """Whether some code point occurs MIN_REPEAT times in a row (numpy: ~5x faster than re)."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    same = codes[1:] == codes[:-1]
    runs = same[: len(same) - MIN_REPEAT + 2]
    for shift in range(1, MIN_REPEAT - 1):
        runs = runs & same[shift : len(same) - MIN_REPEAT + 2 + shift]
    return bool(runs.any())


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


def _case_of(word: str, ascii_only: bool) -> tuple[str, str]:
    """(marker, lowered word) when the case can be restored exactly, else ("", word)."""
    lowered = word.lower()
    # Some letters change length or class when case-mapped ("İ".lower() is two code points,
    # "ß".upper() is "SS"); such words are left as they are rather than restored wrongly.
    if not ascii_only and (len(lowered) != len(word) or WORD_RE.fullmatch(lowered) is None):
        return "", word
    if len(word) >= 2 and word.isupper() and lowered.upper() == word:
        return UP, lowered
    first = word[0]
    if first != lowered[0] and lowered[0].upper() == first and word[1:] == lowered[1:]:
        return MAJ, lowered
    return "", word


def _normalize_word(word: str, ascii_only: bool, has_repeat: bool) -> tuple[str, str]:
    marker, body = _case_of(word, ascii_only)
    if has_repeat or "xx" in body:
        body = _BODY.sub(_body_sub, body)
    return marker, body


def _has_word_repeat(text: str) -> bool:
    # Four words in a row means the two inner ones are whole whitespace-separated tokens, so
    # two equal neighbouring tokens are a necessary condition for the "wrep" alternative.
    tokens = text.split()
    return any(map(operator.eq, tokens, itertools.islice(tokens, 1, None)))


def normalize(text: str) -> str:
    """Apply the rules; the result starts with ``xxbos`` and :func:`denormalize` inverts it."""
    source = " " + text
    ascii_only = source.isascii()
    lowered = source.lower()
    # Lowercasing keeps equal characters equal, so on ASCII a run in the raw text is a run in
    # ``lowered`` too; runs that only appear once a word is lowercased ("AAaa") count as well.
    has_repeat = _has_char_repeat(lowered) or (not ascii_only and _has_char_repeat(source))
    has_xx = "xx" in lowered
    kinds = tuple(
        kind
        for kind, needed in (
            ("wrep", _has_word_repeat(source)),
            ("word", True),
            ("rep", has_repeat),
            ("esc", has_xx),
            ("spm", not ascii_only and "▁" in source),
        )
        if needed
    )
    out = [BOS]
    position = 0
    for match in _master(ascii_only, kinds).finditer(source):
        start, end = match.span()
        kind = match.lastgroup
        if kind == "maj" or kind == "up":  # ASCII only: lowercasing keeps positions
            marker = MAJ if kind == "maj" else UP
            body = lowered[start:end]
            if has_repeat or (has_xx and "xx" in body):
                body = _BODY.sub(_body_sub, body)
        elif kind == "word":
            word = source[start:end]
            if ascii_only:
                marker, body = "", word
                if has_repeat or (has_xx and "xx" in body):
                    body = _BODY.sub(_body_sub, body)
            else:
                marker, body = _normalize_word(word, ascii_only, has_repeat)
        else:
            out.append(source[position:start])
            if kind == "wrep":
                word = match.group("ww")
                count = (end - start + 1) // (len(word) + 1)
                marker, body = _normalize_word(word, ascii_only, has_repeat)
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
