"""Hotword biasing inside the compiled search: the scripted decoder of test_search, where the answers are known,
then the whole transcription path on the tiny model."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qasr_jax.decoding import hotwords as hw
from qasr_jax.decoding import search as S
from qasr_jax.decoding.compiles import count_compilations
from qasr_jax.testing import speech
from qasr_jax.transcribe import Transcriber
from test_search import CHAIN_AXES, EOS, FIRST, PAD, A, B, C, D, E, _chain_state, _chain_step, path_logprob
from qasr_jax.testing.tokenizer_files import with_tokenizer

LETTERS = {"A": A, "B": B, "C": C, "D": D, "E": E}
EDGES = 64


def encode(word: str) -> list[int]:
    """Scripted 'tokenizer': one token per letter, case and spaces ignored."""
    return [LETTERS[ch.upper()] for ch in word if ch.strip()]


@functools.lru_cache(maxsize=None)
def _run(beam_size: int, out_len: int, edges: int):
    def run(logits, state, z, max_new, tries):
        cfg = S.SearchConfig(PAD, beam_size=beam_size, hotword_edges=edges)
        return S.search(_chain_step, logits, state, CHAIN_AXES, z, max_new, out_len=out_len, cfg=cfg, tries=tries)

    return jax.jit(run)


def scripted(chains, max_new, words=None, beam_size=1, boost=2.0, **settings) -> S.SearchResult:
    """The search on the chains, each row with its own hotwords (None: no biasing at all, edges 0)."""
    state = _chain_state(chains)
    z = S.SearchSettings.make(eos_ids=(EOS,), **settings)
    tries = None
    if words is not None:
        tries = hw.pack([hw.build_trie(w, encode) for w in words], [boost] * len(words), EDGES)
    run = _run(beam_size, 8, 0 if words is None else EDGES)
    return jax.device_get(run(jnp.asarray(FIRST)[state["chain"]], state, z, max_new, tries))


def hyp(r, row=0) -> list[int]:
    return r.tokens[row, : r.lengths[row]].tolist()


def contains(seq: list[int], part: list[int]) -> bool:
    return any(seq[i : i + len(part)] == part for i in range(len(seq) - len(part) + 1))


@pytest.mark.parametrize("beams", [1, 2])
def test_biasing_finds_the_hotword_the_plain_search_misses(beams):
    plain = scripted(["misleading"], 4, beam_size=beams)
    assert not contains(hyp(plain), [A, E])
    found = scripted(["misleading"], 4, [["AE"]], beam_size=beams)
    assert contains(hyp(found), [A, E])
    # Log-probabilities stay the model's own: biasing changes what is chosen, never what it is said to cost.
    tokens = hyp(found)
    steps = [path_logprob("misleading", tokens[: i + 1]) - path_logprob("misleading", tokens[:i]) if i else
             path_logprob("misleading", tokens[:1]) for i in range(len(tokens))]
    np.testing.assert_allclose(found.token_logprobs[0, : len(tokens)], steps, rtol=1e-5, atol=1e-6)
    # An empty list, and a boost too small to change any choice, leave tokens and scores exactly as they were.
    for words, boost in (([[]], 2.0), ([["EEEE"]], 1e-3)):
        same = scripted(["misleading"], 4, words, beam_size=beams, boost=boost)
        assert hyp(same) == hyp(plain) and np.array_equal(same.scores, plain.scores)


@pytest.mark.parametrize("beams", [2, 4])
def test_a_broken_partial_match_scores_exactly_as_without_biasing(beams):
    """B C D is pulled towards (B, then C, get bonuses) but the search ends after two tokens: the unfinished prefix
    keeps no bonus, so tokens and score are bit for bit those of the unbiased search."""
    plain = scripted(["misleading"], 2, beam_size=beams)
    partial = scripted(["misleading"], 2, [["BCD"]], beam_size=beams)
    assert hyp(partial) == hyp(plain) == [B, C]
    assert np.array_equal(partial.scores, plain.scores)
    np.testing.assert_allclose(plain.scores[0], path_logprob("misleading", [B, C]) / 2, rtol=1e-6)
    # With room to finish it, the hotword is completed and keeps its bonus (3 tokens x 2.0 over 3 tokens).
    done = scripted(["misleading"], 3, [["BCD"]], beam_size=beams)
    assert hyp(done) == [B, C, D]
    np.testing.assert_allclose(done.scores[0], (path_logprob("misleading", [B, C, D]) + 3 * 2.0) / 3, rtol=1e-6)


@pytest.mark.parametrize("beams", [1, 2])
def test_rows_with_their_own_lists_equal_each_row_alone_without_compiling(beams):
    chains, words = ["misleading", "misleading", "eos-first"], [["AE"], ["DD", "CE"], ["BB"]]
    both = scripted(chains, 5, words, beam_size=beams)
    for row, (chain, w) in enumerate(zip(chains, words)):
        alone = scripted([chain, chain, chain], 5, [w, w, w], beam_size=beams)
        assert hyp(both, row) == hyp(alone) and both.scores[row] == alone.scores[0]
    with count_compilations() as compiled:
        scripted(chains, 5, [["EA"], ["BD", "C"], ["AAA", "EE"]], beam_size=beams)
    assert compiled.count == 0


def test_the_trie_holds_every_spelling_and_where_words_end():
    words = ["New", "New York"]
    parent, token, depth, term = hw.build_trie(words, lambda w: [ord(c) for c in w])
    assert " new york" in hw.variants("New York") and "New York" in hw.variants("new york")
    assert len(parent) == len(token) == len(depth) - 1 == len(term) - 1
    # Follow " New York" through the arrays: every prefix is a node, " New" is a complete word on the way.
    node, seen = 0, []
    for ch in " New York":
        node = 1 + next(e for e in range(len(parent)) if parent[e] == node and token[e] == ord(ch))
        seen.append((int(depth[node]), int(term[node])))
    assert seen[3] == (4, 4) and seen[5] == (6, 4) and seen[-1] == (9, 9)
    assert hw.edge_bucket(1) == 64 and hw.edge_bucket(65) == 128
    with pytest.raises(ValueError, match="does not fit"):
        hw.pack([hw.build_trie(["x" * 70], lambda w: [ord(c) for c in w])], [1.0], 64)


@pytest.fixture(scope="module")
def folder(checkpoints, tmp_path_factory):
    return with_tokenizer(checkpoints("asr").official, tmp_path_factory, "official")


@pytest.fixture(scope="module")
def asr(folder):
    return Transcriber.from_pretrained(folder)


def test_transcriber_steers_the_tiny_model_to_a_hotword(asr):
    """Random weights never say "Pallas"; a boost large enough for this model (its next-token distributions are
    nearly one-hot: log-probabilities of -16 to -56 for the hotword's tokens) makes the search spell it, the
    model's own log-probabilities of those tokens are reported, and the context is left alone when asked."""
    wave = speech("hello_en.wav")
    (plain,) = asr.transcribe(wave, max_new_tokens=8)
    (steered,) = asr.transcribe(wave, max_new_tokens=8, hotwords=["Pallas"], hotword_boost=300.0,
                                hotwords_in_context=False)
    spellings = [asr.tokenizer.encode(v) for v in hw.variants("Pallas")]
    assert not any(contains(plain.token_ids, s) for s in spellings)
    assert any(contains(steered.token_ids, s) for s in spellings)
    assert all(lp <= 0 for lp in steered.token_logprobs) and min(steered.token_logprobs) < -10
    # Several inputs, each with its own list, in one call; a bad argument is named.
    two = asr.transcribe([wave, wave], max_new_tokens=8, hotwords=[["Pallas"], []], hotword_boost=300.0,
                         hotwords_in_context=False)
    assert two[0].token_ids == steered.token_ids and two[1].token_ids == plain.token_ids
    with pytest.raises(TypeError, match="list of words"):
        asr.transcribe(wave, hotwords="Pallas")


def test_cli_hotwords_from_the_flag_and_a_file(asr, folder, tmp_path, capsys, monkeypatch):
    import json

    import soundfile as sf

    from qasr_jax import cli
    from qasr_jax.cli.options import read_hotwords

    words = tmp_path / "words.txt"
    words.write_text("Pallas  # the library\n\nQwen\nPallas\n", encoding="utf-8")
    assert read_hotwords("JAX, Qwen,,", str(words)) == ["JAX", "Qwen", "Pallas"]
    with pytest.raises(ValueError, match="--hotwords-file .*missing.txt"):
        read_hotwords(None, str(tmp_path / "missing.txt"))
    monkeypatch.setenv("QASR_JAX_COMPILATION_CACHE", "off")
    wav = str(tmp_path / "clip.wav")
    sf.write(wav, speech("hello_en.wav"), 16000)
    code = cli.main(["transcribe", wav, "--model", folder, "--max-new-tokens", "8", "--hotwords-file", str(words),
                     "--hotword-boost", "300", "--output-format", "json", "--no-fallback"])
    ids = json.loads(capsys.readouterr().out)["token_ids"]
    (want,) = asr.transcribe(wav, max_new_tokens=8, hotwords=["Pallas", "Qwen"], hotword_boost=300.0)
    assert code == 0 and ids == want.token_ids
    assert cli.main(["transcribe", wav, "--model", folder, "--hotword-boost", "-1"]) == 2
    assert "--hotword-boost must be a non-negative number" in capsys.readouterr().err
