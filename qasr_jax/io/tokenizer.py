"""Qwen's byte-level BPE tokenizer with the Qwen3-ASR control tokens.

A checkpoint folder holds the tokenizer in one of two layouts, and both load:

- ``tokenizer.json`` (transformers-native ``-hf`` repos), a complete HF ``tokenizers`` file;
- ``vocab.json`` + ``merges.txt`` + ``tokenizer_config.json`` (the official ``Qwen/Qwen3-ASR-*`` repos); the
  pre-tokenizer, normaliser and decoder are then rebuilt here to match ``Qwen2Tokenizer``, and the added tokens
  (chat, audio, ``<asr_text>``, ...) come from ``tokenizer_config.json``'s ``added_tokens_decoder``.

``encode`` treats its input as plain text: a string such as ``"<|im_end|>"`` inside a user's context is spelled out
in BPE pieces and never becomes a control token. Prompts place control tokens by id (see ``qasr_jax.io.prompts``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as _HFTokenizer

# Qwen2Tokenizer's split pattern: contractions, letter runs with one leading non-letter, single digits,
# punctuation runs, newlines, and whitespace (trailing whitespace kept apart from the next word).
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
AUDIO_START = "<|audio_start|>"
AUDIO_END = "<|audio_end|>"
AUDIO_PAD = "<|audio_pad|>"
NON_SPEECH = "<non_speech>"
ASR_TEXT = "<asr_text>"
TIMESTAMP = "<timestamp>"

# Tokens every Qwen3-ASR / ForcedAligner checkpoint needs to build a prompt; checked when loading.
REQUIRED_TOKENS = (ENDOFTEXT, IM_START, IM_END, AUDIO_START, AUDIO_END, AUDIO_PAD)


class TokenizerError(ValueError):
    """A tokenizer folder is incomplete or inconsistent."""


def _qwen2_backend(model: models.Model) -> _HFTokenizer:
    """A ``tokenizers.Tokenizer`` around ``model`` with Qwen2's normaliser, pre-tokenizer and decoder."""
    tk = _HFTokenizer(model)
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tk.decoder = decoders.ByteLevel()
    return tk


def _added_tokens_from_config(config_path: Path) -> list[tuple[int, AddedToken]]:
    """``(id, AddedToken)`` pairs from ``added_tokens_decoder`` in a ``tokenizer_config.json``, sorted by id."""
    with open(config_path, encoding="utf-8") as f:
        cfg = json.load(f)
    decoder = cfg.get("added_tokens_decoder") or {}
    out = []
    for key, entry in decoder.items():
        if isinstance(entry, str):  # some writers store just the content
            entry = {"content": entry}
        out.append(
            (
                int(key),
                AddedToken(
                    entry["content"],
                    single_word=bool(entry.get("single_word", False)),
                    lstrip=bool(entry.get("lstrip", False)),
                    rstrip=bool(entry.get("rstrip", False)),
                    normalized=bool(entry.get("normalized", False)),
                    special=bool(entry.get("special", False)),
                ),
            )
        )
    return sorted(out, key=lambda pair: pair[0])


def _add_tokens_at_ids(tk: _HFTokenizer, tokens: list[tuple[int, AddedToken]], where: str) -> None:
    """Add the tokens ``tk`` lacks, in id order, and check each lands on the id the config gives it."""
    for token_id, token in tokens:
        have = tk.token_to_id(token.content)
        if have is None:
            tk.add_tokens([token])
            have = tk.token_to_id(token.content)
        if have != token_id:
            # tokenizers numbers new tokens consecutively, so a gap in the config's ids cannot be represented.
            raise TokenizerError(
                f"{where}: token {token.content!r} should have id {token_id} but the vocabulary gives it {have}"
            )


class Tokenizer:
    """Encode text to Qwen token ids and decode ids back to text; knows the ASR control token ids."""

    def __init__(self, backend: _HFTokenizer, source: str = "<memory>"):
        """Wrap a ``tokenizers.Tokenizer`` that already holds Qwen's added tokens (use ``from_dir`` normally)."""
        self._tk = backend
        self._source = source
        # Same BPE model without the added tokens: encodes user text without matching control-token strings.
        self._plain = _HFTokenizer(backend.model)
        self._plain.normalizer = backend.normalizer
        self._plain.pre_tokenizer = backend.pre_tokenizer
        self._plain.decoder = backend.decoder
        self._vocab_size = backend.get_vocab_size(with_added_tokens=True)
        added = backend.get_added_tokens_decoder()  # {id: AddedToken}
        self._special_ids = frozenset(i for i, t in added.items() if t.special)
        self._added_ids = frozenset(added)
        missing = [t for t in REQUIRED_TOKENS if backend.token_to_id(t) is None]
        if missing:
            raise TokenizerError(
                f"{source}: tokenizer lacks the Qwen3-ASR control tokens {missing}; for vocab.json + merges.txt "
                "they must be listed in tokenizer_config.json's added_tokens_decoder"
            )

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> Tokenizer:
        """Load from a checkpoint folder: tokenizer.json, else vocab.json + merges.txt + tokenizer_config.json."""
        folder = Path(path)
        if not folder.is_dir():
            raise TokenizerError(f"tokenizer folder {str(folder)!r} does not exist")
        config = folder / "tokenizer_config.json"
        if (folder / "tokenizer.json").is_file():
            backend = _HFTokenizer.from_file(str(folder / "tokenizer.json"))
            if config.is_file():  # transformers adds these on top of tokenizer.json too
                _add_tokens_at_ids(backend, _added_tokens_from_config(config), str(folder))
            return cls(backend, str(folder))
        needed = ("vocab.json", "merges.txt", "tokenizer_config.json")
        missing = [name for name in needed if not (folder / name).is_file()]
        if missing:
            raise TokenizerError(
                f"no tokenizer in {str(folder)!r}: it needs tokenizer.json, or vocab.json + merges.txt + "
                f"tokenizer_config.json; missing: {', '.join(missing)}"
            )
        bpe = models.BPE.from_file(
            str(folder / "vocab.json"),
            str(folder / "merges.txt"),
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
        backend = _qwen2_backend(bpe)
        _add_tokens_at_ids(backend, _added_tokens_from_config(config), str(folder))
        return cls(backend, str(folder))

    def save_json(self, path: str | os.PathLike) -> None:
        """Write the whole tokenizer (BPE and added tokens) as one ``tokenizer.json`` (the -hf layout's file)."""
        self._tk.save(str(path), pretty=False)

    def __repr__(self) -> str:
        return f"Tokenizer(source={self._source!r}, vocab_size={self._vocab_size})"

    # --- text <-> ids ------------------------------------------------------------------------------------------

    def encode(self, text: str, *, parse_special: bool = False) -> list[int]:
        """Token ids of ``text`` (NFC, no BOS); ``parse_special=True`` also maps added-token strings to their ids."""
        tk = self._tk if parse_special else self._plain
        return tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` as one byte string, so characters spanning tokens come out whole; unknown ids are dropped."""
        n = self._vocab_size
        clean = [i for i in (int(x) for x in ids) if 0 <= i < n]
        return self._tk.decode(clean, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """Id of a token string (BPE piece or added token), or None if the vocabulary lacks it."""
        return self._tk.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """Token string of an id (BPE pieces use the byte-level alphabet, e.g. 'Ġ' for a space), or None."""
        return self._tk.id_to_token(int(token_id))

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer knows, added tokens included (smaller than the model's padded vocab)."""
        return self._vocab_size

    def is_special(self, token_id: int) -> bool:
        """True for ids that ``decode(skip_special_tokens=True)`` drops (``<asr_text>`` is not one of them)."""
        return int(token_id) in self._special_ids

    def is_added(self, token_id: int) -> bool:
        """True for ids of added tokens (control tokens, special or not), False for BPE pieces."""
        return int(token_id) in self._added_ids

    # --- control token ids -------------------------------------------------------------------------------------

    def _required_id(self, token: str) -> int:
        token_id = self._tk.token_to_id(token)
        if token_id is None:
            raise TokenizerError(f"{self._source}: tokenizer has no {token} token")
        return token_id

    @property
    def endoftext_id(self) -> int:
        """Id of ``<|endoftext|>`` (151643), an end-of-sequence and padding id."""
        return self._required_id(ENDOFTEXT)

    @property
    def im_start_id(self) -> int:
        """Id of ``<|im_start|>`` (151644)."""
        return self._required_id(IM_START)

    @property
    def im_end_id(self) -> int:
        """Id of ``<|im_end|>`` (151645), the end-of-turn id the model stops on."""
        return self._required_id(IM_END)

    @property
    def audio_start_id(self) -> int:
        """Id of ``<|audio_start|>`` (151669)."""
        return self._required_id(AUDIO_START)

    @property
    def audio_end_id(self) -> int:
        """Id of ``<|audio_end|>`` (151670)."""
        return self._required_id(AUDIO_END)

    @property
    def audio_pad_id(self) -> int:
        """Id of ``<|audio_pad|>`` (151676), whose embeddings the audio encoder's outputs replace."""
        return self._required_id(AUDIO_PAD)

    @property
    def non_speech_id(self) -> int:
        """Id of ``<non_speech>`` (151675)."""
        return self._required_id(NON_SPEECH)

    @property
    def asr_text_id(self) -> int:
        """Id of ``<asr_text>`` (151704), which separates ``language X`` from the transcript."""
        return self._required_id(ASR_TEXT)

    @property
    def timestamp_id(self) -> int:
        """Id of ``<timestamp>`` (151705), the forced aligner's slot marker."""
        return self._required_id(TIMESTAMP)

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Ids that end generation: ``<|im_end|>`` then ``<|endoftext|>``."""
        return (self.im_end_id, self.endoftext_id)


class IncrementalDecoder:
    """Turns a stream of ids into text pieces, holding back a character until all its bytes have arrived."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        """Start an empty stream decoded with ``tokenizer``."""
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._pending: list[int] = []  # ids whose text is not all emitted yet
        self._emitted = 0  # characters of decode(_pending) already returned

    def push(self, ids: Iterable[int]) -> str:
        """Add ids and return the newly completed text (possibly empty)."""
        self._pending.extend(int(i) for i in ids)
        text = self._tok.decode(self._pending, self._skip)
        # An unfinished UTF-8 sequence decodes to U+FFFD at the end; everything before it is final.
        stable = text.rstrip("\ufffd")
        piece = stable[self._emitted :]
        if len(stable) == len(text):
            self._pending.clear()
            self._emitted = 0
        else:
            self._emitted = len(stable)
        return piece

    def flush(self) -> str:
        """Return what is held back (U+FFFD for bytes that never completed) and reset the stream."""
        text = self._tok.decode(self._pending, self._skip)[self._emitted :]
        self._pending.clear()
        self._emitted = 0
        return text
