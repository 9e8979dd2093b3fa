"""SRT, WebVTT, JSON, TSV and text writers: what they write parses back to the same times and text."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from qasr_jax.formats import FORMATS, format_timestamp, render, to_json, to_srt, to_tsv, to_txt, to_vtt


@dataclasses.dataclass
class Seg:
    text: str
    start: float
    end: float


SEGMENTS = [
    Seg("Hello", 0.0, 0.4),
    Seg("world", 0.4, 1.2494),  # rounds down to 1.249
    Seg("你好", 59.9996, 60.0),  # rounds up across a minute
    Seg("R&D <b>tags</b>", 3599.5, 3725.125),  # past an hour; markup characters
    Seg("two\n\nlines", 3725.125, 3725.125),  # a blank line inside the text must not end the cue
]


def parse_time(stamp: str, marker: str) -> float:
    m = re.fullmatch(r"(\d{2,}):(\d{2}):(\d{2})" + re.escape(marker) + r"(\d{3})", stamp)
    assert m, stamp
    h, mi, s, ms = map(int, m.groups())
    assert mi < 60 and s < 60
    return h * 3600 + mi * 60 + s + ms / 1000


def parse_srt(text: str) -> list[tuple[float, float, str]]:
    out = []
    for n, block in enumerate(text.strip("\n").split("\n\n"), start=1):
        lines = block.split("\n")
        assert lines[0] == str(n)
        start, end = lines[1].split(" --> ")
        out.append((parse_time(start, ","), parse_time(end, ","), "\n".join(lines[2:])))
    return out


def parse_vtt(text: str) -> list[tuple[float, float, str]]:
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


def expected():
    return [(round(s.start, 3), round(s.end, 3), s.text.replace("\n\n", "\n")) for s in SEGMENTS]


def test_srt_parses_back():
    assert parse_srt(to_srt(SEGMENTS)) == expected()


def test_vtt_parses_back():
    assert parse_vtt(to_vtt(SEGMENTS)) == expected()


def test_timestamp_rounding_and_hours():
    assert format_timestamp(0) == "00:00:00,000"
    assert format_timestamp(59.9996) == "00:01:00,000"
    assert format_timestamp(3725.125, ".") == "01:02:05.125"
    assert format_timestamp(360000.0) == "100:00:00,000"
    with pytest.raises(ValueError):
        format_timestamp(-0.5)


def test_json_round_trip_keeps_fields():
    data = json.loads(to_json(SEGMENTS + [{"text": "x", "start": 1, "end": 2, "speaker": 3}]))
    assert [(d["start"], d["end"], d["text"]) for d in data[:-1]] == [(s.start, s.end, s.text) for s in SEGMENTS]
    assert data[-1] == {"text": "x", "start": 1.0, "end": 2.0, "speaker": 3}


def test_tsv_and_txt():
    rows = to_tsv(SEGMENTS).splitlines()
    assert rows[0] == "start\tend\ttext"
    assert rows[1:3] == ["0\t400\tHello", "400\t1249\tworld"]
    assert rows[5] == "3725125\t3725125\ttwo lines"
    assert to_txt(SEGMENTS).splitlines() == ["Hello", "world", "你好", "R&D <b>tags</b>", "two lines"]


def test_render_dispatch_and_errors():
    assert set(FORMATS) == {"json", "srt", "vtt", "tsv", "txt"}
    assert render(iter(SEGMENTS), "srt") == to_srt(SEGMENTS)
    with pytest.raises(ValueError, match="json, srt, vtt"):
        render(SEGMENTS, "docx")
    with pytest.raises(ValueError, match="start <= end"):
        to_srt([Seg("bad", 2.0, 1.0)])
    assert to_srt([]) == ""
    assert to_vtt([]) == "WEBVTT\n"
