"""What a search is asked and what it returns: :class:`SearchConfig` (static choices: each distinct value compiles
once), :class:`SearchSettings` (traced values shared by every request: changing them compiles nothing) and
:class:`SearchResult` (per request: the best hypothesis, its score, each token's log-probability).
``qasr_jax.decoding.search`` runs the search itself.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import flax.struct
import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """Static search settings (each distinct value compiles once); the numeric ones live in SearchSettings."""

    pad_id: int  # the tokenizer's <|endoftext|>: fills tokens past each row's end
    beam_size: int = 1
    penalize_repetition: bool = False  # apply SearchSettings.repetition_penalty (off: no history is kept)
    no_repeat_ngram_size: int = 0
    hotword_edges: int = 0  # > 0: requests may carry hotword tries of up to this many edges (hotwords.edge_bucket)
    loop_period: int = 0  # > 0 (greedy only): stop a request whose output ends in a pattern of at most this many
    loop_repeats: int = 20  # tokens repeated this many times back to back (SearchResult.looped)

    def __post_init__(self):
        if self.beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {self.beam_size}")
        if self.no_repeat_ngram_size < 0:
            raise ValueError(f"no_repeat_ngram_size must be >= 0 (0 turns it off), got {self.no_repeat_ngram_size}")
        if self.loop_period < 0 or self.loop_repeats < 2 or (self.loop_period and self.beam_size > 1):
            raise ValueError(f"loop_period must be >= 0 (0 turns the loop guard off; greedy search only, got beam_size="
                             f"{self.beam_size}) and loop_repeats >= 2, got {self.loop_period} and {self.loop_repeats}")


EARLY_STOPPING = {False: 0, True: 1, "never": 2}  # HF's early_stopping values -> SearchSettings.early_stopping


@flax.struct.dataclass
class SearchSettings:
    """Traced search settings shared by every request: changing any of them compiles nothing."""

    eos_ids: jax.Array  # (n_eos,) int32; only n_eos is static
    length_penalty: jax.Array  # () float32: beam scores are sum_logprobs / generated_len ** length_penalty
    repetition_penalty: jax.Array  # () float32, used when SearchConfig.penalize_repetition
    early_stopping: jax.Array  # () int32: EARLY_STOPPING[False | True | "never"] (beam search only)
    suppress_eos: jax.Array  # () bool: EOS scores -inf, so every request runs to its max_new_tokens

    @classmethod
    def make(cls, eos_ids, length_penalty=1.0, repetition_penalty=1.0, early_stopping: bool | str = False,
             suppress_eos=False) -> "SearchSettings":
        """Settings from Python values (HF names and meanings); host arrays, so making them compiles nothing."""
        if early_stopping not in EARLY_STOPPING:
            raise ValueError(f"early_stopping must be False, True or 'never', got {early_stopping!r}")
        if repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1.0 turns it off), got {repetition_penalty}")
        eos = np.asarray(eos_ids, np.int32).reshape(-1)
        if eos.shape[0] == 0:
            raise ValueError("eos_ids is empty: pass at least one EOS id (suppress_eos=True runs to max_new_tokens)")
        return cls(
            eos_ids=eos, length_penalty=np.asarray(length_penalty, np.float32),
            repetition_penalty=np.asarray(repetition_penalty, np.float32),
            early_stopping=np.asarray(EARLY_STOPPING[early_stopping], np.int32),
            suppress_eos=np.asarray(suppress_eos, bool),
        )


class SearchResult(NamedTuple):
    """Per request: the best hypothesis (EOS excluded), its score and each token's log-probability."""

    tokens: jax.Array  # (requests, out_len) int32; positions at and past `lengths` hold pad_id
    lengths: jax.Array  # (requests,) int32 generated tokens, EOS excluded
    scores: jax.Array  # (requests,) float32 sum of log-probs (EOS included) / (lengths + finished) ** length_penalty
    finished: jax.Array  # (requests,) bool: ended with an EOS (False: stopped at max_new_tokens)
    steps: jax.Array  # (requests,) int32: tokens chosen (< max_new_tokens when it stopped early)
    token_logprobs: jax.Array  # (requests, out_len) float32: log-prob of each token of `tokens` (0 past lengths)
    looped: jax.Array  # (requests,) bool: stopped by the loop guard (SearchConfig.loop_period)
