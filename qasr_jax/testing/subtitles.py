"""SRT and WebVTT read back into (start, end, text) cues, to check what the writers wrote."""

from __future__ import annotations

import re


def parse_time(stamp: str, marker: str) -> float:
    """HH:MM:SS{marker}mmm -> seconds."""
    m = re.fullmatch(r"(\d{2,}):(\d{2}):(\d{2})" + re.escape(marker) + r"(\d{3})", stamp)
    assert m, stamp
    h, mi, s, ms = map(int, m.groups())
    assert mi < 60 and s < 60
    return h * 3600 + mi * 60 + s + ms / 1000


def parse_srt(text: str) -> list[tuple[float, float, str]]:
    """SRT text -> cues; asserts the numbering and the time format."""
    out = []
    for n, block in enumerate(text.strip("\n").split("\n\n"), start=1):
        lines = block.split("\n")
        assert lines[0] == str(n)
        start, end = lines[1].split(" --> ")
        out.append((parse_time(start, ","), parse_time(end, ","), "\n".join(lines[2:])))
    return out


def parse_vtt(text: str) -> list[tuple[float, float, str]]:
    """WebVTT text -> cues (entities decoded); asserts the header and that no markup is left."""
    blocks = text.strip("\n").split("\n\n")
    assert blocks[0] == "WEBVTT"
    out = []
    for block in blocks[1:]:
        lines = block.split("\n")
        start, end = lines[0].split(" --> ")
        body = "\n".join(lines[1:])
        assert "<" not in body and "-->" not in body
        body = body.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
        out.append((parse_time(start, "."), parse_time(end, "."), body))
    return out
