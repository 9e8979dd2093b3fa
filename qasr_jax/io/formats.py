"""Writers for timed text: SRT and WebVTT subtitles, JSON, TSV and plain text; ``render`` serves every output.

A segment is anything with ``start`` and ``end`` (seconds) and ``text``: an aligner ``Word``, a transcription
segment, a dict with those keys, or any object with those attributes. Times are written to the millisecond.
Subtitles of a transcription Result are cut into cues that read well (``CueLimits``, ``result_cues``).
"""

from __future__ import annotations

import dataclasses
import json
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from qasr_jax.io.results import Segment
from qasr_jax.io.units import is_cjk_char, unit_spans


def _fields(seg: Any) -> tuple[float, float, str]:
    if isinstance(seg, Mapping):
        start, end, text = seg["start"], seg["end"], seg["text"]
    else:
        start, end, text = seg.start, seg.end, seg.text
    start, end = float(start), float(end)
    if not (0.0 <= start <= end):
        raise ValueError(f"segment times must satisfy 0 <= start <= end, got start={start}, end={end} for {text!r}")
    return start, end, str(text)


def format_timestamp(seconds: float, decimal_marker: str = ",") -> str:
    """Seconds -> ``HH:MM:SS,mmm`` (SRT; ``decimal_marker="."`` for VTT), rounded to the millisecond."""
    if seconds < 0:
        raise ValueError(f"timestamps must be non-negative, got {seconds}")
    ms = int(round(seconds * 1000))
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal_marker}{ms:03d}"


def _cue_text(text: str) -> str:
    # A blank line ends a cue in SRT and VTT: keep the text's line breaks but never an empty line.
    return "\n".join(line.strip() for line in text.strip().splitlines() if line.strip())


def to_srt(segments: Iterable[Any]) -> str:
    """SubRip: numbered cues ``HH:MM:SS,mmm --> HH:MM:SS,mmm`` then the text, separated by blank lines."""
    cues = []
    for n, seg in enumerate(segments, start=1):
        start, end, text = _fields(seg)
        cues.append(f"{n}\n{format_timestamp(start)} --> {format_timestamp(end)}\n{_cue_text(text)}\n")
    return "\n".join(cues)


def _vtt_escape(text: str) -> str:
    # Cue text is markup: & and < must be escaped; "-->" may not appear.
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def to_vtt(segments: Iterable[Any]) -> str:
    """WebVTT: a ``WEBVTT`` header, then cues ``HH:MM:SS.mmm --> HH:MM:SS.mmm`` and their (escaped) text."""
    out = ["WEBVTT\n"]
    for seg in segments:
        start, end, text = _fields(seg)
        stamp = f"{format_timestamp(start, '.')} --> {format_timestamp(end, '.')}"
        out.append(f"{stamp}\n{_vtt_escape(_cue_text(text))}\n")
    return "\n".join(out)


def _as_json(seg: Any) -> dict:
    start, end, text = _fields(seg)
    if dataclasses.is_dataclass(seg) and not isinstance(seg, type):
        obj = dataclasses.asdict(seg)
    elif isinstance(seg, Mapping):
        obj = dict(seg)
    else:
        obj = {}
    obj.update(text=text, start=start, end=end)
    return obj


def to_json(segments: Iterable[Any]) -> str:
    """A JSON list of objects with ``text``, ``start`` and ``end`` (seconds), plus a dataclass's or dict's other fields."""
    return json.dumps([_as_json(s) for s in segments], ensure_ascii=False, indent=2) + "\n"


def to_tsv(segments: Iterable[Any]) -> str:
    """Tab-separated ``start``, ``end`` (integer milliseconds) and ``text``, with a header row."""
    rows = ["start\tend\ttext"]
    for seg in segments:
        start, end, text = _fields(seg)
        clean = " ".join(text.replace("\t", " ").split())
        rows.append(f"{int(round(start * 1000))}\t{int(round(end * 1000))}\t{clean}")
    return "\n".join(rows) + "\n"


def to_txt(segments: Iterable[Any]) -> str:
    """The text alone, one segment per line."""
    return "".join(" ".join(_fields(s)[2].split()) + "\n" for s in segments)


# ----------------------------------------------------------------------------------------------------------------
# Subtitle cues that read well: at most max_line_count lines of at most max_line_width characters, breaking at
# sentence ends, pauses and the cue-length limit, never inside a word. Cues are filled greedily: a word joins the
# current line when it fits, else a new line of the cue, else a new cue; a cue also ends after a sentence end,
# before a pause longer than pause_seconds, and before a word that would make it longer than max_cue_seconds. A
# single word wider than the width stands alone in its cue. Widths count characters (a CJK character counts one).
# With word timestamps each cue runs from its first word's start to its last word's end (the words' punctuation
# and spacing are read back from the transcript); without them a segment's text is cut into words whose times are
# spread over the segment by their length.
# ----------------------------------------------------------------------------------------------------------------

LATIN_LINE_WIDTH = 42  # Netflix, BBC and SubtitleEdit's line limit for Latin scripts
CJK_LINE_WIDTH = 16  # Netflix's limit for Chinese, Japanese and Korean (SubtitleEdit: 16-20)
SENTENCE_ENDS = ".!?。！？…;；"


@dataclasses.dataclass(frozen=True)
class CueLimits:
    """Limits of one subtitle cue; ``max_line_width=None`` picks 42 characters, or 16 for mostly-CJK text."""

    max_line_width: int | None = None
    max_line_count: int = 2
    max_words_per_line: int | None = None  # None: as many as fit the width
    max_cue_seconds: float = 7.0  # the usual longest cue on screen
    pause_seconds: float = 1.0  # a silence longer than this ends a cue

    def __post_init__(self):
        problems = []
        for name in ("max_line_width", "max_line_count", "max_words_per_line"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                problems.append(f"{name} must be a whole number >= 1, got {value!r}")
        for name in ("max_cue_seconds", "pause_seconds"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value > 0 and value != float("inf")):
                problems.append(f"{name} must be a positive number of seconds, got {value!r}")
        if problems:
            raise ValueError("; ".join(problems))


def _is_wide(char: str) -> bool:
    # A CJK ideograph or a Japanese kana: a word of its own when lines are cut.
    return is_cjk_char(char) or 0x3040 <= ord(char) <= 0x30FF


def _spaced(before: str, after: str) -> bool:
    """Whether a space goes between two words of unknown spacing: not between CJK characters or kana."""
    last = [c for c in before if c.isalnum()][-1:] or ["a"]
    return not (_is_wide(last[0]) and _is_wide(after[:1] or "a"))


@dataclasses.dataclass
class _Piece:
    text: str  # as shown, punctuation included
    start: float
    end: float
    space_before: bool  # a space separates it from the piece before it on the same line


def _split_text(text: str) -> list[tuple[str, bool]]:
    """Text -> (word, space before it): whitespace separates words, each CJK character or kana is a word of its
    own, and punctuation stays with the word before it (after CJK, opening punctuation with the word after it)."""
    words: list[tuple[str, bool]] = []
    current, space, after_space = "", False, False
    for char in text:
        if char.isspace():
            if current:
                words.append((current, space))
            current, after_space = "", True
            continue
        kept = char == "'" or unicodedata.category(char)[0] in "LN"
        opening = unicodedata.category(char) in ("Ps", "Pi")
        starts_word = _is_wide(char) or ((kept or opening) and any(_is_wide(c) for c in current))
        if starts_word and any(c.isalnum() for c in current):  # opening punctuation waits for its word
            words.append((current, space))
            current, space = "", False
        if not current:
            space = after_space and bool(words)
        current += char
        after_space = False
    if current:
        words.append((current, space))
    return words


def _segment_pieces(segments: Iterable[Any]) -> list[_Piece]:
    # Without word times: each segment's words get times spread over the segment by their length.
    pieces: list[_Piece] = []
    for seg in segments:
        start, end, text = _fields(seg)
        words = _split_text(text)
        weights = [max(1, sum(c.isalnum() for c in w)) for w, _ in words]
        total, done = sum(weights), 0
        for k, ((word, space), weight) in enumerate(zip(words, weights)):
            a = start + (end - start) * done / total
            done += weight
            if k == 0 and pieces:  # a segment's first word: spaced as its language spaces words
                space = _spaced(pieces[-1].text, word)
            pieces.append(_Piece(word, a, start + (end - start) * done / total, space))
    return pieces


def _word_pieces(words: Sequence[Any], text: str | None) -> list[_Piece]:
    # With word times: each word's shown text is its stretch of the transcript, up to the next word's (whose
    # leading quotes and brackets after a space stay with it), so punctuation and spacing are the transcript's.
    times = [_fields(w) for w in words]
    spans = unit_spans(text, [t for _, _, t in times]) if text else [None]
    if text and all(s is not None for s in spans):
        bounds = [0]
        for (_, prev_end), (next_start, _) in zip(spans, spans[1:]):
            gap = text[prev_end:next_start]
            ws = max((i for i, c in enumerate(gap) if c.isspace()), default=-1)
            bounds.append(next_start if ws < 0 else prev_end + ws + 1)
        bounds.append(len(text))
        shown = [(text[a:b].strip(), i > 0 and text[a - 1 : a].isspace()) for i, (a, b) in
                 enumerate(zip(bounds, bounds[1:]))]
    else:
        shown = [(t, i > 0 and _spaced(times[i - 1][2], t)) for i, (_, _, t) in enumerate(times)]
    return [_Piece(s or t, a, b, space) for (s, space), (a, b, t) in zip(shown, times)]


def _line_text(line: list[_Piece]) -> str:
    return "".join((" " if p.space_before and i else "") + p.text for i, p in enumerate(line))


def _cut(pieces: list[_Piece], limits: CueLimits, width: int) -> list[Segment]:
    cues: list[Segment] = []
    lines: list[list[_Piece]] = []

    def close():
        if lines:
            first, last = lines[0][0], lines[-1][-1]
            start = max(first.start, cues[-1].end if cues else 0.0)  # aligner times may overlap: keep cues in order
            cues.append(Segment(round(start, 3), round(max(last.end, start), 3),
                                "\n".join(_line_text(line) for line in lines)))
            lines.clear()

    def fits(line: list[_Piece], piece: _Piece) -> bool:
        words_ok = limits.max_words_per_line is None or len(line) < limits.max_words_per_line
        return words_ok and len(_line_text(line + [piece])) <= width

    for piece in pieces:
        if lines:
            prev = lines[-1][-1]
            if (prev.text[-1] in SENTENCE_ENDS or piece.start - prev.end > limits.pause_seconds
                    or piece.end - lines[0][0].start > limits.max_cue_seconds):
                close()
        if lines and fits(lines[-1], piece):
            lines[-1].append(piece)
        elif lines and len(lines) < limits.max_line_count and fits([], piece):
            lines.append([piece])
        else:
            close()
            lines.append([piece])
            if not fits([], piece):  # a word wider than a line: a cue of its own
                close()
    close()
    return cues


def _line_width(text: str, limits: CueLimits) -> int:
    # The limits' own width, else 16 for text mostly in CJK characters or kana, else 42.
    if limits.max_line_width is not None:
        return limits.max_line_width
    letters = [c for c in text if c.isalnum()]
    wide = sum(_is_wide(c) for c in letters)
    return CJK_LINE_WIDTH if letters and 2 * wide > len(letters) else LATIN_LINE_WIDTH


def build_cues(items: Iterable[Any], limits: CueLimits = CueLimits(), *, words: bool = False,
               text: str | None = None) -> list[Segment]:
    """Subtitle cues from timed words (``words=True``; ``text``: the transcript they come from, for punctuation)
    or from segments (each cut into words spread over its time)."""
    items = list(items)
    pieces = _word_pieces(items, text) if words else _segment_pieces(items)
    pieces = [p for p in pieces if p.text]
    return _cut(pieces, limits, _line_width("".join(p.text for p in pieces), limits))


def result_cues(result: Any, limits: CueLimits = CueLimits()) -> list[Segment]:
    """A transcription Result's cues: from its word timestamps when it has them, else from its segments."""
    if result.words:
        return build_cues(result.words, limits, words=True, text=result.text)
    return build_cues(result.segments, limits)


FORMATS: dict[str, Callable[[Iterable[Any]], str]] = {
    "json": to_json,
    "srt": to_srt,
    "vtt": to_vtt,
    "tsv": to_tsv,
    "txt": to_txt,
}


def render(item: Any, fmt: str, *, max_line_width: int | None = None, max_line_count: int | None = None,
           max_words_per_line: int | None = None, max_cue_seconds: float | None = None) -> str:
    """A transcription ``Result`` or a list of segments (e.g. aligned words) written in ``fmt`` (one of ``FORMATS``).

    A Result is written as one line of ``Result.to_dict()`` JSON, as its text (txt), as TSV rows of its words (or
    segments), or as SRT / VTT cues cut to the cue options (``CueLimits``: by default two lines of at most 42
    characters, 16 for CJK text, and at most 7 s; from its word timestamps when it has them). A list of segments
    is written an item per cue or row, unless a cue option is given. The text always ends with a newline, except
    subtitles with no cue (an empty SRT is empty).
    """
    try:
        writer = FORMATS[fmt]
    except KeyError:
        raise ValueError(f"unknown output format {fmt!r}; use one of {', '.join(FORMATS)}") from None
    options = {"max_line_width": max_line_width, "max_line_count": max_line_count,
               "max_words_per_line": max_words_per_line, "max_cue_seconds": max_cue_seconds}
    limits = CueLimits(**{k: v for k, v in options.items() if v is not None})
    subtitles = fmt in ("srt", "vtt")
    if hasattr(item, "to_dict"):  # a transcription Result
        if fmt == "json":
            return json.dumps(item.to_dict(), ensure_ascii=False) + "\n"
        if fmt == "txt":
            return item.text + "\n"
        item = result_cues(item, limits) if subtitles else item.words if item.words is not None else item.segments
    elif subtitles and any(v is not None for v in options.values()):
        item = build_cues(item, limits)
    return writer(list(item))
