"""Alignment units per language and the repair of timestamps that go backwards.

Hand-made cases have their answers worked out here from the rule (longest non-decreasing run kept, 1-2 outliers
snapped to the nearer kept neighbour, longer runs interpolated and truncated); random cases are checked against
transformers' ``_fix_timestamps`` and ``split_words_for_alignment``.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
from transformers.models.qwen3_asr import processing_qwen3_asr as ref

from qasr_jax.io import units
from qasr_jax.io.units import UnsupportedLanguageError, fix_timestamps, split_units

ELEVEN = ["Chinese", "English", "Cantonese", "French", "German", "Italian", "Japanese", "Korean", "Portuguese",
          "Russian", "Spanish"]


# ----------------------------------------------------------------------------------------------------------------
# Repair


@pytest.mark.parametrize(
    "raw, fixed",
    [
        ([], []),
        ([400], [400]),
        ([0, 80, 160, 240], [0, 80, 160, 240]),
        # One outlier between 80 and 160: the run 0,80,160,240 is kept (first of the two longest), 40 snaps left.
        ([0, 80, 40, 160, 240], [0, 80, 80, 160, 240]),
        # An outlier before every kept value has no left neighbour: it takes the right one.
        ([500, 0, 80, 160], [0, 0, 80, 160]),
        # An outlier after every kept value takes the left one.
        ([0, 80, 160, 10], [0, 80, 160, 160]),
        # Equal values are non-decreasing: 80, 80, 80 is kept and the 0 between snaps to 80.
        ([80, 80, 0, 80], [80, 80, 80, 80]),
        # Two runs of length 4 (0,100,900,950 and 0,100,200,300): the one ending first wins; 200, 300 take 950.
        ([0, 100, 900, 950, 200, 300], [0, 100, 900, 950, 950, 950]),
        # Add 400 and the low run is longest; the block 900, 950 splits: the first is nearer 100, the second 200.
        ([0, 100, 900, 950, 200, 300, 400], [0, 100, 100, 200, 200, 300, 400]),
        # Three outliers between 100 and 400: interpolated in steps of (400 - 100) / 4 = 75.
        ([0, 100, 900, 950, 990, 400, 500, 600, 700], [0, 100, 175, 250, 325, 400, 500, 600, 700]),
        # Five outliers between 80 and 160: steps of 80 / 6, truncated: 93.3, 106.7, 120, 133.3, 146.7.
        ([80, 900, 800, 700, 600, 500, 160, 240, 320], [80, 93, 106, 120, 133, 146, 160, 240, 320]),
        # Three outliers at the start: no left value, so all take the first kept one.
        ([900, 950, 990, 10, 20, 30, 40], [10, 10, 10, 10, 20, 30, 40]),
    ],
)
def test_fix_timestamps_hand_cases(raw, fixed):
    assert fix_timestamps(np.asarray(raw, np.float32)) == fixed
    assert fix_timestamps(raw) == fixed


def _random_sequence(rng: np.random.Generator) -> np.ndarray:
    n = int(rng.integers(1, 60))
    kind = rng.integers(3)
    if kind == 0:  # anything
        classes = rng.integers(0, 50, n)
    elif kind == 1:  # rising with a few jumps back and forth
        classes = np.sort(rng.integers(0, 400, n))
        bad = rng.random(n) < 0.2
        classes[bad] = rng.integers(0, 400, int(bad.sum()))
    else:  # rising with a whole block replaced
        classes = np.sort(rng.integers(0, 400, n))
        a = int(rng.integers(0, n))
        b = int(rng.integers(a, min(n, a + 8) + 1))
        classes[a:b] = rng.integers(0, 400, b - a)
    return classes.astype(np.float32) * np.float32(80.0)  # milliseconds, as the reference computes them


def test_fix_timestamps_agrees_with_transformers():
    rng = np.random.default_rng(0)
    for _ in range(400):
        ms = _random_sequence(rng)
        assert fix_timestamps(ms) == ref._fix_timestamps(ms), ms.tolist()


def test_fix_timestamps_output_never_decreases():
    rng = np.random.default_rng(1)
    for _ in range(200):
        out = fix_timestamps(_random_sequence(rng))
        assert all(a <= b for a, b in zip(out, out[1:]))


# ----------------------------------------------------------------------------------------------------------------
# Units


@pytest.mark.parametrize(
    "text, language, expected",
    [
        ("Hello, world! Don't stop rock'n'roll.", "English", ["Hello", "world", "Don't", "stop", "rock'n'roll"]),
        ("U.S.A. e-mail 3.14 50%", "en", ["USA", "email", "314", "50"]),
        ("  tabs\tand\nnewlines  ", "English", ["tabs", "and", "newlines"]),
        ("你好，世界。", "Chinese", ["你", "好", "世", "界"]),
        ("我用JAX写code。", "zh", ["我", "用", "JAX", "写", "code"]),
        ("2024年3月5日", "Chinese", ["2024", "年", "3", "月", "5", "日"]),
        ("Il était une fois l'été.", "French", ["Il", "était", "une", "fois", "l'été"]),
        ("Straße, Größe!", "de", ["Straße", "Größe"]),
        ("Привет, мир!", "Russian", ["Привет", "мир"]),
        ("¿Qué tal?", "Spanish", ["Qué", "tal"]),
        ("我哋去飲茶 OK?", "Cantonese", ["我", "哋", "去", "飲", "茶", "OK"]),
    ],
)
def test_split_units(text, language, expected):
    assert split_units(text, language) == expected


AGREEMENT_TEXTS = [
    "Hello, world! Don't stop rock'n'roll.",
    "The quick brown fox -- jumps; over (the) lazy dog...",
    "don\u2019t \u201cquote\u201d",  # curly apostrophe and quotes are punctuation: dropped
    "你好，世界。我用JAX写code，版本2.0！",
    "混合text中文mixed 文字",
    "São Paulo é ótimo, não?",
    "Ça va? Très bien, merci!",
    "Grüß Gott, wie geht's?",
    "Это тест: 123 456.",
    "¡Hola! ¿Cómo estás? 3,5 %",
    "\u3400\u4dbf\U00020000 \U0002f800x",  # CJK extension A, B and compatibility-supplement ideographs
    "e\u0301te\u0301 naïve",  # combining accents are marks (Mn): dropped
    "    ",
    "...!!!",
    "a_b c-d e/f g+h",
    "Ⅻ ½ ²",  # letter-like and other numbers
]


@pytest.mark.parametrize("language", ["English", "Chinese", "French", "German", "Russian", "Spanish", "Cantonese"])
def test_split_units_agrees_with_transformers(language):
    proc = object.__new__(ref.Qwen3ASRProcessor)  # split_words_for_alignment needs no tokenizer
    for text in AGREEMENT_TEXTS:
        assert split_units(text, language) == proc.split_words_for_alignment(text, language), text


@pytest.mark.parametrize("language", ["Arabic", "Klingon", "th", ""])
def test_unsupported_language_lists_the_eleven(language):
    with pytest.raises(UnsupportedLanguageError) as err:
        split_units("hello", language)
    for name in ELEVEN:
        assert name in str(err.value)
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize("code, name", [("EN", "English"), ("zh-CN", "Chinese"), ("yue", "Cantonese"),
                                        ("pt_BR", "Portuguese"), ("korean", "Korean")])
def test_aligner_language_accepts_codes_and_any_case(code, name):
    assert units.aligner_language(code) == name


def test_japanese_without_nagisa_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "nagisa", None)  # makes `import nagisa` raise ImportError
    with pytest.raises(ImportError, match=r'pip install "qasr-jax\[ja\]"'):
        split_units("東京へ行く", "Japanese")


def test_korean_without_soynlp_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "soynlp", None)
    monkeypatch.setitem(sys.modules, "soynlp.tokenizer", None)
    units._korean_tokenizer.cache_clear()
    with pytest.raises(ImportError, match=r'pip install "qasr-jax\[ko\]"'):
        split_units("안녕하세요 세계", "ko")
    units._korean_tokenizer.cache_clear()


JAPANESE = ["今日は良い天気ですね。東京タワーへ行きましょう！", "  東京へ、行く。 ", "私はJAXで「速い」コードを書いた。",
            "ラーメン、寿司、そして天ぷら…", "2024年3月15日に会議があります"]
KOREAN = ["안녕하세요! 세계.", "오늘은 날씨가 좋네요, 그렇죠?", "서울에서 JAX로 코드를 작성했습니다.", "123번 버스를 타세요"]


def _kept(text: str) -> str:
    """The text's letters and digits in order: what the units of any segmentation must spell together."""
    return "".join(ch for ch in text if ch.isalnum())


def test_japanese_units_are_nagisa_words_as_transformers_splits_them():
    """The real nagisa segmenter (the ja extra): the same units as transformers, punctuation and spaces removed."""
    proc = object.__new__(ref.Qwen3ASRProcessor)
    for text in JAPANESE:
        got = split_units(text, "ja")
        assert got == proc.split_words_for_alignment(text, "Japanese"), text
        assert "".join(got) == _kept(text) and len(got) > 2, got  # words, neither the whole text nor empty


def test_korean_units_are_soynlp_words_as_transformers_splits_them(monkeypatch):
    """The real soynlp LTokenizer (the ko extra), unscored without the official word list, as transformers."""
    proc = object.__new__(ref.Qwen3ASRProcessor)
    monkeypatch.setattr(units, "korean_dictionary_path", lambda: None)  # as if qwen-asr were not installed
    units._korean_tokenizer.cache_clear()
    try:
        for text in KOREAN:
            got = split_units(text, "Korean")
            assert got == proc.split_words_for_alignment(text, "Korean"), text
            assert "".join(got) == _kept(text), got
    finally:
        units._korean_tokenizer.cache_clear()


def test_korean_word_list_scores_split_words(monkeypatch, tmp_path):
    """With the official toolkit's word list (here a stand-in file in its format: word, count, tag), every listed
    word scores 1.0, so soynlp splits it off the front of a longer word."""
    path = tmp_path / "korean_dict_jieba.dict"
    monkeypatch.setattr(units, "korean_dictionary_path", lambda: str(path) if path.exists() else None)
    units._korean_tokenizer.cache_clear()
    assert split_units("안녕하세요! 세계.", "Korean") == ["안녕하세요", "세계"]  # unscored: whole words
    path.write_text("안녕 10 x\n\n세계 3 n\n", encoding="utf-8")
    units._korean_tokenizer.cache_clear()
    try:
        assert split_units("안녕하세요! 세계.", "Korean") == ["안녕", "하세요", "세계"]
    finally:
        units._korean_tokenizer.cache_clear()
