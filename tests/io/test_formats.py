"""SRT, WebVTT, JSON, TSV and text writers: what they write parses back to the same times and text."""

from __future__ import annotations

import dataclasses
import json

import pytest

from qasr_jax.io.formats import FORMATS, format_timestamp, render, to_json, to_srt, to_tsv, to_txt, to_vtt


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


# ----------------------------------------------------------------------------------------------------------------
# Subtitle cues (CueLimits): checked against the rules they promise, not against the builder's own output
# ----------------------------------------------------------------------------------------------------------------

from qasr_jax.aligner import Word  # noqa: E402
from qasr_jax.io.formats import CueLimits, build_cues, result_cues  # noqa: E402
from qasr_jax.io.results import Result, Segment  # noqa: E402
from qasr_jax.io.units import is_cjk_char, split_units  # noqa: E402
from qasr_jax.testing.subtitles import parse_srt, parse_vtt

ENDS = ".!?。！？"


def timed_words(text: str, language: str, step: float = 0.5, gaps: dict | None = None) -> list[Word]:
    """The aligner's units of ``text``, one every ``step`` seconds (0.8 step long), with extra silence before the
    units numbered in ``gaps``."""
    words, t = [], 0.0
    for i, unit in enumerate(split_units(text, language)):
        t += (gaps or {}).get(i, 0.0)
        words.append(Word(unit, round(t, 3), round(t + 0.8 * step, 3)))
        t += step
    return words


def split_shown(text: str) -> list[str]:
    out: list[str] = []
    for chunk in text.split():
        fresh = True
        for char in chunk:
            cjk, word_char = is_cjk_char(char), char.isalnum() or char == "'"
            if fresh or cjk or (word_char and is_cjk_char(out[-1][-1])):
                out.append(char)
            else:
                out[-1] += char
            fresh = False
    return out


def joined(a: str, b: str) -> str:
    return a + ("" if is_cjk_char(a[-1]) or is_cjk_char(b[0]) else " ") + b


def check_cues(srt: str, words: list[Word], text: str, limits: CueLimits, width: int, duration: float):
    """Every promise of the cue builder, on its SRT output."""
    cues = parse_srt(srt)
    shown = split_shown(text)
    assert len(shown) == len(words)
    i, prev_end = 0, 0.0
    bounds = []
    for start, end, body in cues:
        lines = body.split("\n")
        assert 1 <= len(lines) <= limits.max_line_count
        first = i
        line_words = []
        for line in lines:
            n, built = 0, ""
            while built.replace(" ", "") != line.replace(" ", ""):
                built = shown[i] if not built else joined(built, shown[i])
                i, n = i + 1, n + 1
            assert built == line  # words whole, in order, spaced as the language spaces them
            assert len(line) <= width or n == 1  # only a lone word may be wider than a line
            assert limits.max_words_per_line is None or n <= limits.max_words_per_line
            line_words.append((first + sum(k for _, k in line_words), n))
        for (a, n), (b, _) in zip(line_words, line_words[1:]):  # greedy lines: the next word did not fit
            too_wide = len(joined(line_text(shown, a, n), shown[b])) > width
            assert too_wide or (limits.max_words_per_line is not None and n == limits.max_words_per_line)
        assert start == pytest.approx(words[first].start, abs=1e-3)  # a cue starts at its first word's start
        assert end == pytest.approx(words[i - 1].end, abs=1e-3)
        assert prev_end - 1e-3 <= start <= end <= duration + 1e-3
        prev_end = end
        bounds.append((first, i, line_words))
    assert i == len(words)  # every word is in a cue
    for (a, b, lines), _ in zip(bounds, bounds[1:]):  # greedy cues: each ends for one of its reasons
        last_a, last_n = lines[-1]
        reasons = [
            shown[b - 1][-1] in ENDS,
            words[b].start - words[b - 1].end > limits.pause_seconds,
            words[b].end - words[a].start > limits.max_cue_seconds,
            len(lines) == limits.max_line_count and (
                len(joined(line_text(shown, last_a, last_n), shown[b])) > width
                or last_n == limits.max_words_per_line),
            len(shown[b]) > width or (b - a == 1 and len(shown[a]) > width),
        ]
        assert any(reasons), (shown[a:b], shown[b])
    return cues


def line_text(shown: list[str], a: int, n: int) -> str:
    out = shown[a]
    for w in shown[a + 1 : a + n]:
        out = joined(out, w)
    return out


ENGLISH = ("Hello there, my friend. This is a test of the cue builder, which cuts long transcripts into short "
           "cues that read well! Does it break at questions? It should also break at long pauses and keep every "
           "line within its limit.")
CHINESE = "今天天气很好。我们用JAX写一个语音识别的程序，它能把很长的中文句子切成好读的字幕！你觉得怎么样？"
LONG_WORD = "Pneumonoultramicroscopicsilicovolcanoconiosis is a long word, and antidisestablishmentarianism too."

CASES = [  # (text, language, limits, width the limits give, gaps before word i)
    (ENGLISH, "English", CueLimits(), 42, None),
    (ENGLISH, "English", CueLimits(max_line_width=20, max_line_count=1), 20, None),
    (ENGLISH, "English", CueLimits(max_words_per_line=3), 42, {5: 1.5, 20: 3.0}),
    (ENGLISH, "English", CueLimits(max_cue_seconds=2.0, max_line_count=3), 42, None),
    (LONG_WORD, "English", CueLimits(max_line_width=20), 20, None),
    (CHINESE, "Chinese", CueLimits(), 16, {10: 2.0}),
    (CHINESE, "Chinese", CueLimits(max_line_width=8, max_line_count=1), 8, None),
    (CHINESE, "Chinese", CueLimits(max_cue_seconds=3.0), 16, None),
]


@pytest.mark.parametrize("text,language,limits,width,gaps", CASES)
def test_cues_from_word_timestamps_keep_every_rule(text, language, limits, width, gaps):
    words = timed_words(text, language, gaps=gaps)
    duration = words[-1].end + 0.5
    r = Result("x", language=language, text=text, duration=duration, words=words,
               segments=[Segment(0.0, duration, text)])
    srt = render(r, "srt", **{k: v for k, v in dataclasses.asdict(limits).items() if k != "pause_seconds"})
    cues = check_cues(srt, words, text, limits, width, duration)
    assert len(cues) > 1
    assert to_srt(result_cues(r, limits)) == srt


def test_cues_hand_worked():
    """Two small examples worked out by hand: punctuation counts towards the width, a sentence end closes a cue,
    a full cue closes before the next word."""
    text = "Hello there, my friend. This is a test of the cue builder."
    words = timed_words(text, "English")
    cues = build_cues(words, CueLimits(max_line_width=20), words=True, text=text)
    assert [(c.start, c.end, c.text) for c in cues] == [
        (0.0, 1.9, "Hello there, my\nfriend."), (2.0, 5.9, "This is a test of\nthe cue builder.")]
    text = "今天天气很好。我们去公园散步吧！"
    words = timed_words(text, "Chinese", step=0.25)
    cues = build_cues(words, CueLimits(max_line_width=4), words=True, text=text)
    assert [c.text for c in cues] == ["今天天气\n很好。", "我们去公\n园散步", "吧！"]
    assert [(c.start, c.end) for c in cues] == [(0.0, 1.45), (1.5, 3.2), (3.25, 3.45)]
    # Without word times: an opening quote stays with the character after it, a closing one with the one before.
    cues = build_cues([Seg("我说「你好」。", 0.0, 3.0)], CueLimits(max_line_width=3, max_line_count=1))
    assert [c.text for c in cues] == ["我说", "「你", "好」。"]


@pytest.mark.parametrize("first,text,width", [("Short first segment.", ENGLISH, 42), ("你好。", CHINESE, 16)])
def test_cues_without_word_timestamps_share_the_segment(first, text, width):
    """Without word times the text is wrapped to the limits inside its segment's time, words whole and in order."""
    segments = [Segment(1.0, 4.0, first), Segment(5.0, 25.0, text)]
    cues = parse_srt(render(Result("x", text=text, segments=segments), "srt"))
    assert cues[0] == (1.0, 4.0, first)
    rest = cues[1:]
    assert rest[0][0] == 5.0 and rest[-1][1] == 25.0
    assert all(a <= b for a, b, _ in rest) and all(x[1] <= y[0] for x, y in zip(rest, rest[1:]))
    assert "".join(t.replace("\n", "").replace(" ", "") for *_, t in rest) == text.replace(" ", "")
    for *_, body in rest:
        assert all(len(line) <= width for line in body.split("\n")) and len(body.split("\n")) <= 2
    assert [w for *_, t in rest for w in split_shown(t)] == split_shown(text)  # no word was split


def test_cue_options_on_plain_segments_and_bad_values():
    """A list of segments keeps one cue per item unless a cue option is given; bad limits name the option."""
    assert render(SEGMENTS[:2], "srt") == to_srt(SEGMENTS[:2])
    words = [Seg("one", 0.0, 0.3), Seg("two", 0.4, 0.7), Seg("three", 0.8, 1.0)]
    assert parse_srt(render(words, "srt", max_line_width=8, max_line_count=1)) == [
        (0.0, 0.7, "one two"), (0.8, 1.0, "three")]
    assert parse_srt(render(words, "srt", max_line_width=8)) == [(0.0, 1.0, "one two\nthree")]
    assert parse_vtt(render(words, "vtt", max_words_per_line=1, max_line_count=3)) == [(0.0, 1.0, "one\ntwo\nthree")]
    for bad, name in (({"max_line_width": 0}, "max_line_width"), ({"max_line_count": 1.5}, "max_line_count"),
                      ({"max_cue_seconds": -1.0}, "max_cue_seconds")):
        with pytest.raises(ValueError, match=name):
            render(words, "srt", **bad)


def test_cli_srt_honours_max_line_width(checkpoints, tmp_path_factory, capsys, monkeypatch):
    """``qasr-jax transcribe --output-format srt --max-line-width 20`` on a long clip (cut into pieces): no line
    wider than 20 unless it is one word, at most two lines a cue, cues in order and inside the audio, the whole
    transcript kept; a bad limit is refused by its flag name before anything loads."""
    import os

    from qasr_jax import cli
    from qasr_jax.testing import DATA
    from qasr_jax.testing.tokenizer_files import with_tokenizer

    monkeypatch.setenv("QASR_JAX_COMPILATION_CACHE", "off")  # cli.main runs here: keep ~/.cache clean
    model = with_tokenizer(checkpoints("asr").official, tmp_path_factory, "official")
    path = os.path.join(DATA, "long_en.wav")
    args = ["transcribe", path, "--model", model, "--max-new-tokens", "40", "--max-audio-seconds", "6"]
    assert cli.main(args + ["--output-format", "json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert cli.main(args + ["--output-format", "srt", "--max-line-width", "20"]) == 0
    cues = parse_srt(capsys.readouterr().out)
    assert len(cues) > len(result["segments"])
    for start, end, body in cues:
        lines = body.split("\n")
        assert len(lines) <= 2
        assert all(len(line) <= 20 or (" " not in line and not any(map(is_cjk_char, line[1:]))) for line in lines)
    assert all(a[1] <= b[0] for a, b in zip(cues, cues[1:])) and 0 <= cues[0][0] and cues[-1][1] <= result["duration"]
    assert "".join("".join(t for *_, t in cues).split()) == "".join(result["text"].split())
    assert cli.main(args + ["--output-format", "srt", "--max-line-count", "0"]) == 2
    assert "--max-line-count must be a whole number >= 1" in capsys.readouterr().err
