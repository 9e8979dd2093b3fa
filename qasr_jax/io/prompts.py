"""Qwen3-ASR prompts, language names and output parsing.

The prompt for one audio clip (``N`` = audio tokens the encoder produces) is

    <|im_start|>system\\n{context}<|im_end|>\\n<|im_start|>user\\n
    <|audio_start|>{<|audio_pad|> x N}<|audio_end|><|im_end|>\\n<|im_start|>assistant\\n

(one line, broken here for width), and a forced language appends ``language {Name}<asr_text>``. Unforced, the
model writes that header itself: ``language {Name}<asr_text>{transcript}`` then ``<|im_end|>``; silent audio gives
``language None<asr_text>``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from qasr_jax.io.tokenizer import Tokenizer

# The longest context (system prompt text: --context, prompt=, hotwords joined to it) accepted, in tokens: the
# official maintainers budget hotword context at up to 10,000 tokens; longer ones are refused before the model runs.
MAX_CONTEXT_TOKENS = 10_000

# Language names the model was trained with (the spelling in "language {Name}"), keyed by ISO 639 code.
# The 30 of transformers' Qwen3-ASR processor plus Uyghur, which the official qwen-asr package also accepts.
LANGUAGE_CODES: dict[str, str] = {
    "ar": "Arabic",
    "yue": "Cantonese",
    "zh": "Chinese",
    "cs": "Czech",
    "da": "Danish",
    "nl": "Dutch",
    "en": "English",
    "fil": "Filipino",
    "fi": "Finnish",
    "fr": "French",
    "de": "German",
    "el": "Greek",
    "hi": "Hindi",
    "hu": "Hungarian",
    "id": "Indonesian",
    "it": "Italian",
    "ja": "Japanese",
    "ko": "Korean",
    "mk": "Macedonian",
    "ms": "Malay",
    "fa": "Persian",
    "pl": "Polish",
    "pt": "Portuguese",
    "ro": "Romanian",
    "ru": "Russian",
    "es": "Spanish",
    "sv": "Swedish",
    "th": "Thai",
    "tr": "Turkish",
    "ug": "Uyghur",
    "vi": "Vietnamese",
}

LANGUAGES: tuple[str, ...] = tuple(LANGUAGE_CODES.values())

# Languages Qwen3-ForcedAligner-0.6B aligns.
ALIGNER_LANGUAGES: tuple[str, ...] = (
    "Chinese", "English", "Cantonese", "French", "German", "Italian",
    "Japanese", "Korean", "Portuguese", "Russian", "Spanish",
)  # fmt: skip

_LANGUAGE_PREFIX = "language "


def supported_languages(extra: Iterable[str] | None = None) -> tuple[str, ...]:
    """Built-in language names followed by ``extra`` ones (e.g. a config's ``support_languages``), without repeats."""
    names = list(LANGUAGES)
    seen = {n.casefold() for n in names}
    for name in extra or ():
        name = str(name).strip()
        if name and name.casefold() not in seen:
            names.append(name)
            seen.add(name.casefold())
    return tuple(names)


def normalize_language(lang: str, supported: Iterable[str] | None = None) -> str:
    """Canonical name ("English") of a name or ISO code in any case ("english", "EN", "en-US"); else ValueError."""
    names = supported_languages(supported)
    key = str(lang).strip().casefold()
    by_name = {n.casefold(): n for n in names}
    if key in by_name:
        return by_name[key]
    code = key.replace("_", "-")
    for candidate in (code, code.split("-", 1)[0]):  # "zh-CN" falls back to "zh"
        if candidate in LANGUAGE_CODES:
            return LANGUAGE_CODES[candidate]
    raise ValueError(
        f"unsupported language {lang!r}; use one of these names (case-insensitive): {', '.join(names)}; "
        f"or one of these codes: {', '.join(LANGUAGE_CODES)}"
    )


def context_problem(tok: Tokenizer, context: str, name: str = "context") -> str | None:
    """Why ``context`` is refused (more than ``MAX_CONTEXT_TOKENS`` tokens), naming it ``name``; None when it fits."""
    n = len(tok.encode(context)) if context else 0
    if n <= MAX_CONTEXT_TOKENS:
        return None
    return (f"{name} is {n:,} tokens, over the limit of {MAX_CONTEXT_TOKENS:,} "
            "(qasr_jax.io.prompts.MAX_CONTEXT_TOKENS); "
            "shorten it to the names and terms the audio may hold")


def build_prompt_ids(
    tok: Tokenizer,
    n_audio_tokens: int,
    context: str = "",
    language: str | None = None,
    supported: Iterable[str] | None = None,
) -> list[int]:
    """Prompt ids for one clip with ``n_audio_tokens`` pads; a ``language`` appends ``language {Name}<asr_text>``."""
    if int(n_audio_tokens) != n_audio_tokens or n_audio_tokens < 0:
        raise ValueError(f"n_audio_tokens must be a non-negative integer, got {n_audio_tokens!r}")
    # Text goes through the plain encoder, so control-token strings inside `context` stay text; each text run is
    # encoded whole, exactly as a tokenizer would encode the rendered chat template between control tokens.
    assistant = "assistant\n"
    forced = language is not None and str(language).strip() != ""
    if forced:
        assistant += f"{_LANGUAGE_PREFIX}{normalize_language(language, supported)}"
    ids = [tok.im_start_id, *tok.encode(f"system\n{context}"), tok.im_end_id, *tok.encode("\n")]
    ids += [tok.im_start_id, *tok.encode("user\n"), tok.audio_start_id]
    ids += [tok.audio_pad_id] * int(n_audio_tokens)
    ids += [tok.audio_end_id, tok.im_end_id, *tok.encode("\n")]
    ids += [tok.im_start_id, *tok.encode(assistant)]
    if forced:
        ids.append(tok.asr_text_id)
    return ids


def _strip_at_eos(ids: Sequence[int], eos: Iterable[int]) -> list[int]:
    stop = set(eos)
    out = []
    for i in ids:
        if i in stop:
            break
        out.append(i)
    return out


def _header_language(header: str, supported: Iterable[str] | None) -> str | None:
    """Language named by a ``language X`` header, or None for ``language None`` or a header without one."""
    for line in header.splitlines():
        line = line.strip()
        if not line:
            continue
        if not line.casefold().startswith(_LANGUAGE_PREFIX):
            return None
        value = line[len(_LANGUAGE_PREFIX) :].strip()
        if not value or value.casefold() == "none":
            return None
        try:
            return normalize_language(value, supported)
        except ValueError:
            return value  # a name the model knows but this table does not (e.g. a dialect): keep its spelling
    return None


def _is_partial_header(text: str) -> bool:
    """True for what the model writes before ``<asr_text>`` when cut off early: "lang", "language", "language Eng"."""
    text = text.strip()
    if not text:
        return True
    if _LANGUAGE_PREFIX.startswith(text):  # "l" ... "language"
        return True
    return re.fullmatch(r"language \S*", text) is not None


def parse_output(
    token_ids: Iterable[int],
    tok: Tokenizer,
    language: str | None = None,
    *,
    supported: Iterable[str] | None = None,
    fix_repetitions: bool = False,
) -> tuple[str | None, str]:
    """``(language, text)`` from generated ids (prompt excluded); pass ``language`` when the prompt forced one."""
    ids = _strip_at_eos([int(i) for i in token_ids], tok.eos_ids)
    asr_text = tok.asr_text_id
    # As the official parse_asr_output: only the first <asr_text> ends the header; a later one (or any when the
    # language was forced) is transcript and stays in the text as written.
    if language is not None and str(language).strip():
        # The prompt already held the header, so every generated id is transcript.
        lang, body = normalize_language(language, supported), ids
    elif asr_text in ids:
        cut = ids.index(asr_text)
        lang = _header_language(tok.decode(ids[:cut]), supported)
        body = ids[cut + 1 :]
    else:
        text = tok.decode(ids)
        if _is_partial_header(text):  # stopped before the header was complete: no transcript yet
            return None, ""
        lang, body = None, ids  # no header at all: everything is transcript
    text = tok.decode(body).strip()
    if fix_repetitions:
        text = collapse_repetitions(text)
    return lang, text


def _collapse_char_runs(text: str, times: int) -> str:
    # A character repeated more than `times` times in a row becomes one copy.
    return re.sub(r"(.)\1{%d,}" % times, r"\1", text, flags=re.DOTALL)


def _first_repeat(text: str, start: int, times: int, max_len: int) -> int:
    """Length of the shortest pattern at ``start`` repeated ``times`` times back to back, or 0."""
    n = len(text)
    for k in range(1, max_len + 1):
        if start + k * times > n:
            return 0
        unit = text[start : start + k]
        if text.startswith(unit * times, start):
            return k
    return 0


def collapse_repetitions(text: str, times: int = 20, max_len: int = 20) -> str:
    """Undo decoding loops like the reference: a character or pattern (<= max_len) looping times+ times -> once."""
    text = _collapse_char_runs(text, times)
    out: list[str] = []
    while True:
        # Like the reference, only positions that leave at least 2 * times characters are tried.
        start, found = 0, 0
        while start <= len(text) - 2 * times:
            found = _first_repeat(text, start, times, max_len)
            if found:
                break
            start += 1
        if not found:
            out.append(text)
            return "".join(out)
        unit = text[start : start + found]
        end = start + found * times
        while text.startswith(unit, end):
            end += found
        out.append(text[:start] + unit)
        text = text[end:]  # the rest is cleaned on its own, positions counted afresh
