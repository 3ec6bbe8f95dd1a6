"""Text processing: pure functions, tested on hand-made inputs.

- :func:`wikifil`: Mahoney's wikifil filter (the one that made text8).
- :func:`split_ranges`, :func:`split_bytes`: in-order train/validation/test splits (enwik8 style).
- :func:`split_by_hash`: order-independent splits of keyed items, by a hash of the key.
- :func:`passages`, :func:`clean_line`: paragraphs and single lines with whitespace collapsed.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping, Sequence

SPLITS = ("train", "validation", "test")
CHAR_FRACTIONS = (0.9, 0.05, 0.05)  # enwik8 / text8: 90M / 5M / 5M
PASSAGE_CHARS = 1000  # word-level passages longer than this are cut at sentence ends


_DIGITS = {str(i).encode(): f" {w} ".encode() for i, w in enumerate(
    "zero one two three four five six seven eight nine".split())}
_KEEP = bytes(range(ord("a"), ord("z") + 1))
_TO_SPACE = bytes(b if b in _KEEP else ord(" ") for b in range(256))
_UPPER_TO_LOWER = bytes.maketrans(bytes(range(65, 91)), bytes(range(97, 123)))

# The substitutions of wikifil.pl, in its order; each applies to one ">"-terminated record.
_WIKIFIL_SUBS: tuple[tuple[re.Pattern, bytes, int], ...] = tuple(
    (re.compile(p, f), r, n) for p, r, f, n in [
        (rb"<.*>", b"", 0, 1),  # first xml tag (and all up to the record's last '>' on that line)
        (rb"&amp;", b"&", 0, 0),
        (rb"&lt;", b"<", 0, 0),
        (rb"&gt;", b">", 0, 0),
        (rb"<ref[^<]*</ref>", b"", 0, 0),  # references
        (rb"<[^>]*>", b"", 0, 0),  # xhtml tags
        (rb"\[http:[^\] ]*", b"[", 0, 0),  # urls, keeping their visible text
        (rb"\|thumb", b"", re.I, 0),  # image options, keeping the caption
        (rb"\|left", b"", re.I, 0),
        (rb"\|right", b"", re.I, 0),
        (rb"\|\d+px", b"", re.I, 0),
        (rb"\[\[image:[^\[\]]*\|", b"", re.I, 0),
        (rb"\[\[category:([^|\]]*)[^\]]*\]\]", rb"[[\1]]", re.I, 0),  # categories, no markup
        (rb"\[\[[a-z\-]*:[^\]]*\]\]", b"", 0, 0),  # interlanguage links
        (rb"\[\[[^\|\]]*\|", b"[[", 0, 0),  # link targets, keeping the visible text
        (rb"\{\{[^}]*\}\}", b"", 0, 0),  # templates
        (rb"\{[^}]*\}", b"", 0, 0),  # tables
        (rb"\[", b"", 0, 0),
        (rb"\]", b"", 0, 0),
        (rb"&[^;]*;", b" ", 0, 0),  # remaining entities
    ]
)
_DIGIT_RE = re.compile(rb"[0-9]")
_SPACES_RE = re.compile(rb" +")


def wikifil(xml: bytes | str) -> str:
    """text8-style text of a MediaWiki XML export, as Mahoney's ``wikifil.pl`` makes it.

    Reads the input as records ending in ``>`` (the script's record separator), keeps the text
    of ``<text ...>`` elements (not of redirects), strips markup, spells digits, lowercases
    A-Z, and squeezes every run of other characters into one space. The result has only
    ``[a-z ]`` and starts with a space, as text8 does.
    """
    data = xml.encode() if isinstance(xml, str) else bytes(xml)
    out = []
    in_text = False
    for record in re.split(rb"(?<=>)", data):
        if not record:
            continue
        if b"<text " in record:
            in_text = True
        if re.search(rb"#redirect", record, re.I):
            in_text = False
        if not in_text:
            continue
        if b"</text>" in record:
            in_text = False
        for pattern, repl, count in _WIKIFIL_SUBS:
            record = pattern.sub(repl, record, count=count)
        record = b" " + record + b" "
        record = record.translate(_UPPER_TO_LOWER)
        record = _DIGIT_RE.sub(lambda m: _DIGITS[m.group(0)], record)
        record = _SPACES_RE.sub(b" ", record.translate(_TO_SPACE))
        out.append(record[:-1])  # drop the trailing space (the script's `chop`)
    return b"".join(out).decode("ascii")


def split_ranges(n: int, fractions: Sequence[float] = CHAR_FRACTIONS) -> dict[str, tuple[int, int]]:
    """``[start, end)`` of each split when ``n`` items are cut in order by ``fractions``.

    enwik8 and text8 (10^8 bytes) give train [0, 9e7), validation [9e7, 9.5e7), test [9.5e7, 1e8).
    """
    if len(fractions) != len(SPLITS) or abs(sum(fractions) - 1.0) > 1e-9:
        raise ValueError(f"fractions must be {len(SPLITS)} numbers summing to 1, got {fractions}")
    bounds, acc = [0], 0.0
    for f in fractions[:-1]:
        acc += f
        bounds.append(int(round(n * acc)))
    bounds.append(n)
    return {s: (bounds[i], bounds[i + 1]) for i, s in enumerate(SPLITS)}


def split_bytes(data: bytes | str, fractions: Sequence[float] = CHAR_FRACTIONS) -> dict:
    """``data`` cut in order into train/validation/test by ``fractions`` (enwik8 style)."""
    return {s: data[a:b] for s, (a, b) in split_ranges(len(data), fractions).items()}


def _stable_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def split_by_hash(items: Mapping[str, object], fractions: Sequence[float],
                  weight: Callable[[object], float] | None = None) -> dict[str, list[str]]:
    """Assigns the keys of ``items`` to splits: keys sorted by a hash of the key, then cut so that
    each split gets about its fraction of the total weight (default: one per item).

    Independent of the input order. With at least three items every split gets one.
    """
    keys = sorted(items, key=lambda k: (_stable_hash(k), k))
    w = [float(weight(items[k])) if weight else 1.0 for k in keys]
    total = sum(w)
    out: dict[str, list[str]] = {}
    i = len(keys)
    # Cut test, then validation, from the end; an item is taken while at least half of it fits.
    for split, frac in zip(SPLITS[:0:-1], fractions[:0:-1]):
        want, got, taken = frac * total, 0.0, []
        while i > 1 and (not taken or got + w[i - 1] / 2 <= want):
            i -= 1
            got += w[i]
            taken.append(keys[i])
        out[split] = taken[::-1]
    out["train"] = keys[:i]
    return out


_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+")
_WS = re.compile(r"\s+")


def passages(text: str, max_chars: int = PASSAGE_CHARS) -> list[str]:
    """Paragraphs of ``text`` (blocks between blank lines) with whitespace collapsed; those longer
    than ``max_chars`` are cut at sentence ends into pieces of at most about ``max_chars``."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").lstrip("\ufeff")
    out = []
    for block in re.split(r"\n\s*\n", text):
        para = _WS.sub(" ", block).strip()
        if not para:
            continue
        if len(para) <= max_chars:
            out.append(para)
            continue
        piece = ""
        for sent in _SENTENCE_END.split(para):
            if piece and len(piece) + 1 + len(sent) > max_chars:
                out.append(piece)
                piece = sent
            else:
                piece = f"{piece} {sent}" if piece else sent
        if piece:
            out.append(piece)
    return out


def clean_line(text: str) -> str:
    """One line of text: whitespace (tabs, newlines) collapsed to single spaces."""
    return _WS.sub(" ", text).strip()
