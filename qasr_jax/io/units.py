"""Alignment units and timestamp repair for Qwen3-ForcedAligner.

The aligner gives one start and one end time per *unit*. Units follow the official toolkit (``qwen_asr``
``Qwen3ForceAlignProcessor``, mirrored by transformers' ``Qwen3ASRProcessor.split_words_for_alignment``):

- Japanese: words from the ``nagisa`` segmenter (extra ``qasr-jax[ja]``);
- Korean: words from ``soynlp``'s ``LTokenizer`` (extra ``qasr-jax[ko]``); scored with the official toolkit's
  Korean dictionary when the ``qwen-asr`` package is installed (as the official toolkit does), unscored
  otherwise (as transformers does);
- every other language: whitespace-separated words with punctuation removed (letters, digits and apostrophes
  kept: "don't" and "rock'n'roll" stay whole, "U.S.A." becomes "USA"), and every CJK ideograph a unit of its
  own, also inside mixed text ("用JAX写" -> 用, JAX, 写).

``fix_timestamps`` repairs predicted times that go backwards with the official rule (transformers'
``_fix_timestamps``): keep the longest non-decreasing subsequence, snap blocks of 1-2 outliers to the nearer kept
neighbour, interpolate longer blocks linearly between the kept values around them, truncate to integers.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import unicodedata
from collections.abc import Sequence

import numpy as np

from qasr_jax.io.prompts import ALIGNER_LANGUAGES, normalize_language

# Code point ranges of CJK ideographs: the unified block, extensions A-E and both compatibility blocks.
_CJK_RANGES = (
    (0x4E00, 0x9FFF),
    (0x3400, 0x4DBF),
    (0x20000, 0x2A6DF),
    (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F),
    (0x2B820, 0x2CEAF),
    (0xF900, 0xFAFF),
    (0x2F800, 0x2FA1F),
)


class UnsupportedLanguageError(ValueError):
    """A language the forced aligner was not trained on."""


def is_cjk_char(char: str) -> bool:
    """True for a CJK ideograph (Chinese hanzi, Japanese kanji, Korean hanja), which is always a unit of its own."""
    code = ord(char)
    return any(lo <= code <= hi for lo, hi in _CJK_RANGES)


def _is_kept(char: str) -> bool:
    # Letters (L*), numbers (N*) and the apostrophe survive; punctuation, symbols and marks are dropped.
    return char == "'" or unicodedata.category(char)[0] in "LN"


def unit_spans(text: str, units: Sequence[str]) -> list[tuple[int, int] | None]:
    """Where each unit (as ``split_units`` made it, in order) lies in ``text``: (start, end) character offsets, the
    characters it dropped (punctuation inside "U.S.A.") spanned too; None for a unit not found after the last."""
    spans: list[tuple[int, int] | None] = []
    pos = 0
    for unit in units:
        found = None
        start = text.find(unit[:1], pos) if unit else -1
        while start >= 0 and found is None:
            i, k = start, 0
            while k < len(unit) and i < len(text):
                if text[i] == unit[k]:
                    k += 1
                elif _is_kept(text[i]):
                    break
                i += 1
            if k == len(unit):
                found = (start, i)
            else:
                start = text.find(unit[:1], start + 1)
        spans.append(found)
        if found is not None:
            pos = found[1]
    return spans


def _clean(words: Sequence[str]) -> list[str]:
    """Each word reduced to its kept characters; words left empty are dropped."""
    out = []
    for word in words:
        kept = "".join(c for c in word if _is_kept(c))
        if kept:
            out.append(kept)
    return out


def aligner_language(language: str) -> str:
    """Canonical name ("English") of an aligner language given as a name or ISO code; else UnsupportedLanguageError."""
    supported = ", ".join(ALIGNER_LANGUAGES)
    try:
        name = normalize_language(language)
    except ValueError:
        name = None
    if name not in ALIGNER_LANGUAGES:
        raise UnsupportedLanguageError(
            f"the forced aligner does not support language {language!r}; it aligns these 11 languages "
            f"(names or ISO codes, any case): {supported}"
        )
    return name


def split_units(text: str, language: str) -> list[str]:
    """Alignment units of ``text`` in ``language`` (name or ISO code of one of the aligner's 11 languages)."""
    name = aligner_language(language)
    text = text.strip()
    if name == "Japanese":
        return _clean(_nagisa().tagging(text).words)
    if name == "Korean":
        return _clean(_korean_tokenizer().tokenize(text))
    units: list[str] = []
    for word in text.split():
        run: list[str] = []  # kept non-CJK characters of the current word
        for char in word:
            if is_cjk_char(char):
                if run:
                    units.append("".join(run))
                    run = []
                units.append(char)
            elif _is_kept(char):
                run.append(char)
        if run:
            units.append("".join(run))
    return units


def _require(module: str, language: str, extra: str):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"aligning {language} splits words with the {module!r} package, which is not installed; "
            f'install it with: pip install "qasr-jax[{extra}]"'
        ) from exc


def _nagisa():
    return _require("nagisa", "Japanese", "ja")


def korean_dictionary_path() -> str | None:
    """Path of the official toolkit's Korean word list when the ``qwen-asr`` package is installed, else None."""
    spec = importlib.util.find_spec("qwen_asr")  # located without importing it (its import pulls in torch)
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = os.path.join(root, "inference", "assets", "korean_dict_jieba.dict")
        if os.path.isfile(path):
            return path
    return None


@functools.lru_cache(maxsize=1)
def _korean_tokenizer():
    soynlp_tokenizer = _require("soynlp.tokenizer", "Korean", "ko")
    scores = {}
    path = korean_dictionary_path()
    if path is not None:
        with open(path, encoding="utf-8") as f:
            # One entry per line, the word first; every listed word scores 1.0, as in the official toolkit.
            scores = {line.split()[0]: 1.0 for line in f if line.strip()}
    return soynlp_tokenizer.LTokenizer(scores=scores)


# ----------------------------------------------------------------------------------------------------------------
# Timestamp repair


def _longest_non_decreasing(values: np.ndarray) -> np.ndarray:
    """Bool mask of the longest non-decreasing subsequence; ties go to the earliest end and earliest predecessors."""
    n = len(values)
    length = np.ones(n, np.int64)  # longest chain ending at i
    parent = np.full(n, -1, np.int64)
    for i in range(1, n):
        # Among earlier j with values[j] <= values[i], the longest chain; argmax picks the first such j.
        cand = np.where(values[:i] <= values[i], length[:i], 0)
        j = int(np.argmax(cand))
        if cand[j] > 0:
            length[i] = cand[j] + 1
            parent[i] = j
    keep = np.zeros(n, bool)
    i = int(np.argmax(length))
    while i >= 0:
        keep[i] = True
        i = int(parent[i])
    return keep


def fix_timestamps(values: Sequence[float]) -> list[int]:
    """Make predicted times (e.g. milliseconds) non-decreasing with the official repair; returns integers."""
    data = np.asarray(values, np.float64).reshape(-1)
    n = len(data)
    if n == 0:
        return []
    keep = _longest_non_decreasing(data)
    kept_idx = np.flatnonzero(keep)
    out = data.copy()
    i = 0
    while i < n:
        if keep[i]:
            i += 1
            continue
        j = i
        while j < n and not keep[j]:
            j += 1  # [i, j) is a block of outliers
        left_pos = kept_idx[kept_idx < i]
        right_pos = kept_idx[kept_idx >= j]
        left = data[left_pos[-1]] if len(left_pos) else None
        right = data[right_pos[0]] if len(right_pos) else None
        if left is None or right is None:
            out[i:j] = right if left is None else left  # the LIS is never empty, so one side exists
        elif j - i <= 2:
            for k in range(i, j):
                # Distance to the kept value just before the block vs just after it; a tie goes left.
                out[k] = left if (k - i + 1) <= (j - k) else right
        else:
            step = (right - left) / (j - i + 1)
            out[i:j] = [left + step * (k - i + 1) for k in range(i, j)]
        i = j
    return [int(v) for v in out]  # truncation toward zero, as the reference's int()
