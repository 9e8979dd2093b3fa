"""Writers for timed text: SRT and WebVTT subtitles, JSON, TSV and plain text; ``render`` serves every output.

A segment is anything with ``start`` and ``end`` (seconds) and ``text``: an aligner ``Word``, a transcription
segment, a dict with those keys, or any object with those attributes. Times are written to the millisecond.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any


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


FORMATS: dict[str, Callable[[Iterable[Any]], str]] = {
    "json": to_json,
    "srt": to_srt,
    "vtt": to_vtt,
    "tsv": to_tsv,
    "txt": to_txt,
}


def render(item: Any, fmt: str) -> str:
    """A transcription ``Result`` or a list of segments (e.g. aligned words) written in ``fmt`` (one of ``FORMATS``).

    A Result is written as one line of ``Result.to_dict()`` JSON, as its text (txt), or as subtitle / TSV cues:
    its words when it has word timestamps, else its segments. Segments are written by the writer of ``fmt``.
    The text always ends with a newline, except subtitles with no cue (an empty SRT is empty).
    """
    try:
        writer = FORMATS[fmt]
    except KeyError:
        raise ValueError(f"unknown output format {fmt!r}; use one of {', '.join(FORMATS)}") from None
    if hasattr(item, "to_dict"):  # a transcription Result
        if fmt == "json":
            return json.dumps(item.to_dict(), ensure_ascii=False) + "\n"
        if fmt == "txt":
            return item.text + "\n"
        item = item.words if item.words is not None else item.segments
    return writer(list(item))
