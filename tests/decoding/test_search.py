"""Greedy and beam search: known answers on a scripted Markov-chain decoder, and token ids identical to
transformers' ``generate`` on the tiny random reference (greedy, beams 2 and 4, length penalty, EOS, early
stopping, repetition penalty, no-repeat n-grams, suppressed EOS); batched == single; one compilation per bucket.
"""

from __future__ import annotations

import copy
import functools
import itertools
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import LogitsProcessorList
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

import qasr_jax
from qasr_jax.decoding import search as S
from qasr_jax.decoding.buckets import cache_length
from qasr_jax.decoding.compiles import count_compilations
from qasr_jax.io.audio import log_mel_batch
from qasr_jax.testing import speech, synthetic
from qasr_jax.testing.reference import save_hf
from qasr_jax.testing.parity import PREFIX, SUFFIX, reference_inputs

# ----------------------------------------------------------------------------------------------------------------
# A scripted decoder: a Markov chain over 6 tokens whose log-probs are worked out by hand below.
# ----------------------------------------------------------------------------------------------------------------

EOS, A, B, C, D, E = range(6)
PAD = EOS  # the chains' pad id, as <|endoftext|> is both
_T = 1e-6  # "never" (kept finite so that sums stay comparable)
CHAINS = {
    # Greedy takes A (0.5) then a flat continuation; beams find B (0.4) then C (0.9). After C: EOS 0.5 or D 0.45,
    # and D repeats itself with 0.97, so a long B C D D D D beats a short B C <eos> only when length counts.
    "misleading": {
        "first": [0.01, 0.5, 0.4, 0.04, 0.03, 0.02],
        A: [0.01, 0.17, 0.22, 0.21, 0.2, 0.19],
        B: [0.02, 0.02, 0.02, 0.9, 0.02, 0.02],
        C: [0.5, 0.0125, 0.0125, 0.0125, 0.45, 0.0125],
        D: [0.01, 0.005, 0.005, 0.005, 0.97, 0.005],
        E: [1 / 6] * 6,
        EOS: [1 / 6] * 6,
    },
    # EOS first (0.6); every later token: EOS 0.5, A 0.3, B 0.2. The empty hypothesis wins and, with two beams and
    # early_stopping=False, nothing can beat it once two hypotheses are kept after the second token.
    "eos-first": {
        "first": [0.6, 0.3, 0.1, _T, _T, _T],
        **{tok: [0.5, 0.3, 0.2, _T, _T, _T] for tok in (A, B, C, D, E)},
        EOS: [1 / 6] * 6,
    },
}


def _log_probs(chain: dict) -> tuple[np.ndarray, np.ndarray]:
    """(first (V,), table (V, V)) normalised log-probs; table[prev] is the distribution after token prev."""
    norm = lambda p: np.log(np.asarray(p, np.float64) / np.sum(p))  # noqa: E731
    return norm(chain["first"]), np.stack([norm(chain[tok]) for tok in range(6)])


FIRST, TABLE = (np.stack(x).astype(np.float32) for x in zip(*(_log_probs(c) for c in CHAINS.values())))


def path_logprob(chain: str, tokens: list[int]) -> float:
    """Sum of log-probs of a token path under a chain (float64)."""
    first, table = _log_probs(CHAINS[chain])
    total, prev = first[tokens[0]], tokens[0]
    for tok in tokens[1:]:
        total, prev = total + table[prev, tok], tok
    return float(total)


def _chain_step(tokens, active, state):
    return jnp.asarray(TABLE)[state["chain"], tokens], {**state, "calls": state["calls"] + 1}


CHAIN_AXES = {"chain": 0, "calls": None}  # each row's chain on axis 0; a step counter shared by all rows


def _chain_state(chains: list[str]) -> dict:
    return {"chain": jnp.asarray([list(CHAINS).index(c) for c in chains]), "calls": jnp.zeros((), jnp.int32)}


@functools.lru_cache(maxsize=None)
def _chain_search(beam_size: int, out_len: int):
    def run(logits, state, z, max_new):
        return S.search(_chain_step, logits, state, CHAIN_AXES, z, max_new, out_len=out_len,
                        cfg=S.SearchConfig(PAD, beam_size=beam_size))

    return jax.jit(run)


def scripted(chains: list[str], max_new_tokens: int, beam_size: int = 1, out_len: int = 8, **settings):
    """Run the search core on the chains (one batch row each) -> SearchResult as numpy."""
    state = _chain_state(chains)
    z = S.SearchSettings.make(eos_ids=(EOS,), **settings)
    run = _chain_search(beam_size, out_len)
    return jax.device_get(run(jnp.asarray(FIRST)[state["chain"]], state, z, max_new_tokens))


def hyp(result, row: int = 0) -> list[int]:
    return result.tokens[row, : result.lengths[row]].tolist()


def test_scripted_greedy_is_misled_and_beams_are_not():
    # Two tokens: greedy A then B (0.5 * 0.22); beams B then C (0.4 * 0.9), score = sum / 2 at the length limit.
    g = scripted(["misleading"], 2)
    assert hyp(g) == [A, B] and not g.finished[0]
    for beams in (2, 4):
        r = scripted(["misleading"], 2, beam_size=beams)
        assert hyp(r) == [B, C] and not r.finished[0] and r.steps == 2
        np.testing.assert_allclose(r.scores[0], path_logprob("misleading", [B, C]) / 2, rtol=1e-6)
    # Six tokens: greedy A B C then EOS (0.5 > 0.45); the score counts EOS in the sum and the length.
    g = scripted(["misleading"], 6)
    assert hyp(g) == [A, B, C] and g.finished[0] and g.steps == 4
    np.testing.assert_allclose(g.scores[0], path_logprob("misleading", [A, B, C, EOS]) / 4, rtol=1e-6)
    # Padding past the length, and max_new_tokens = 0.
    assert (g.tokens[0, 3:] == PAD).all()
    z = scripted(["misleading"], 0, beam_size=2)
    assert z.lengths[0] == 0 and z.steps == 0
    # The core cuts max_new_tokens to its static buffer (generate raises instead, see below).
    cut = scripted(["misleading"], 50, out_len=3)
    assert hyp(cut) == [A, B, C] and cut.steps == 3 and not cut.finished[0]


@pytest.mark.parametrize("beams", [2, 4])
def test_scripted_length_penalty_picks_short_or_long(beams):
    # length_penalty 0: B C <eos> (sum -1.714) is the best of all sequences and is kept at step 3.
    r = scripted(["misleading"], 6, beam_size=beams, length_penalty=0.0)
    assert hyp(r) == [B, C] and r.finished[0]
    np.testing.assert_allclose(r.scores[0], path_logprob("misleading", [B, C, EOS]), rtol=1e-6)
    # length_penalty 1: B C D D D D (-1.910 / 6) beats B C <eos> (-1.714 / 3); it ends at the length limit.
    r = scripted(["misleading"], 6, beam_size=beams, length_penalty=1.0)
    assert hyp(r) == [B, C, D, D, D, D] and not r.finished[0] and r.steps == 6
    np.testing.assert_allclose(r.scores[0], path_logprob("misleading", [B, C, D, D, D, D]) / 6, rtol=1e-6)


def test_scripted_early_stopping():
    # Two beams keep B C <eos> (step 3) and A B C <eos> (step 4); early_stopping=True stops there.
    r = scripted(["misleading"], 6, beam_size=2, early_stopping=True)
    assert hyp(r) == [B, C] and r.finished[0] and r.steps == 4
    # "eos-first": <eos> (log 0.6) and A <eos> (log 0.15 / 2 = -0.949) are kept after two tokens. The best live
    # beam, A A, has log(0.09) / 2 = -1.20 < -0.949, so False stops after 2 steps. "never" divides the live beam
    # A^k by max_new_tokens = 8 instead: 6 log(0.3) / 8 = -0.90 goes on, 7 log(0.3) / 8 = -1.05 stops, after 7.
    for stopping, steps in ((False, 2), (True, 2), ("never", 7)):
        r = scripted(["eos-first"], 8, beam_size=2, early_stopping=stopping)
        assert hyp(r) == [] and r.finished[0] and r.steps == steps, stopping
        np.testing.assert_allclose(r.scores[0], np.log(0.6), rtol=1e-5)


def test_scripted_batch_rows_are_independent():
    """In one batch a row that stops early changes nothing for the others, for greedy and beams."""
    for beams, kw in ((1, {}), (2, {}), (4, {"length_penalty": 0.0}), (2, {"early_stopping": "never"})):
        both = scripted(["misleading", "eos-first"], 6, beam_size=beams, **kw)
        for row, chain in enumerate(["misleading", "eos-first"]):
            alone = scripted([chain], 6, beam_size=beams, **kw)
            assert hyp(both, row) == hyp(alone) and both.finished[row] == alone.finished[0]
            np.testing.assert_allclose(both.scores[row], alone.scores[0], rtol=1e-6)


def test_scripted_suppress_eos_and_one_beam():
    # EOS suppressed: greedy runs to the limit, A B C D D D.
    g = scripted(["misleading", "eos-first"], 6, suppress_eos=True)
    assert hyp(g, 0) == [A, B, C, D, D, D] and (g.lengths == 6).all() and not g.finished.any()
    assert (g.tokens[:, :6] != EOS).all()
    # With nothing ending early, one beam takes the argmax every step, as greedy does.
    z = S.SearchSettings.make(eos_ids=(EOS,), suppress_eos=True)
    cfg = S.SearchConfig(PAD, beam_size=1)

    def one_beam(logits, state):
        rows = S.start(S._beam_init(cfg, 2, 8, 6, 0), jnp.arange(2), jnp.full((2,), 6), cfg)
        rows = S.pick(rows, logits, ~rows.done, cfg, z)
        rows, _, _ = S.run(_chain_step, rows, state, CHAIN_AXES, cfg, z, 8)
        return S.result(rows, cfg, z)

    one = jax.jit(one_beam)(jnp.asarray(FIRST), _chain_state(["misleading", "eos-first"]))
    assert isinstance(S.init_rows(S.SearchConfig(PAD, beam_size=2), 1, 8, 6), S.BeamRows)
    np.testing.assert_array_equal(one.tokens, g.tokens)


# ----------------------------------------------------------------------------------------------------------------
# The tiny random reference. Its logits are scaled down (final norm x 0.3) so that beams disagree with greedy.
# ----------------------------------------------------------------------------------------------------------------

WIDTH = 64  # every prompt padded to one bucket
N = 8


@pytest.fixture(scope="module")
def tiny(checkpoints, tok, tmp_path_factory):
    ck = checkpoints("asr")
    ref = copy.deepcopy(ck.torch_model)
    with torch.no_grad():
        ref.model.language_model.norm.weight.mul_(0.3)
    model = qasr_jax.load(save_hf(ref, str(tmp_path_factory.mktemp("flat-asr"))))
    waves = [speech("hello_en.wav"), synthetic(0.7, 1), speech("zh.wav")]
    feats, n_frames = log_mel_batch(waves)
    audio, n_tok = model.engine.encode(jnp.asarray(feats), jnp.asarray(n_frames))
    prompts = [PREFIX + [151676] * int(n) + SUFFIX for n in n_tok]
    ids = np.full((len(waves), WIDTH), tok.endoftext_id, np.int32)
    mask = np.zeros((len(waves), WIDTH), bool)
    for i, p in enumerate(prompts):
        ids[i, : len(p)], mask[i, : len(p)] = p, True
    embeds = model.engine.embed(jnp.asarray(ids), audio)
    return SimpleNamespace(ref=ref, model=model, waves=waves, prompts=prompts, ids=ids, mask=mask, embeds=embeds,
                           eos=tok.eos_ids, pad=tok.endoftext_id)


def ours(tiny, rows=None, max_new_tokens=N, beam_size=1, repetition_penalty=1.0, no_repeat_ngram_size=0,
         with_prompt=False, max_len=None, **settings):
    """The engine's one-call generate on the padded batch (or some rows of it) -> token lists, and the result."""
    rows = list(range(len(tiny.waves))) if rows is None else rows
    cfg = S.SearchConfig(tiny.pad, beam_size, repetition_penalty != 1.0, no_repeat_ngram_size)
    z = S.SearchSettings.make(settings.pop("eos_ids", tiny.eos), repetition_penalty=repetition_penalty, **settings)
    r = jax.device_get(tiny.model.engine.generate(
        tiny.embeds[np.asarray(rows)], tiny.mask[rows].sum(1), np.full(len(rows), max_new_tokens), z, cfg,
        max_len or cache_length(WIDTH, max_new_tokens), tiny.ids[rows] if with_prompt else None))
    return [r.tokens[i, : r.lengths[i]].tolist() for i in range(len(rows))], r


def theirs(tiny, row: int, eos=None, **kw) -> tuple[list[int], float | None]:
    """transformers' generate on one row alone -> (ids before the first EOS, sequences_scores or None)."""
    eos = tiny.eos if eos is None else eos
    feats, fmask = reference_inputs(tiny.waves[row])
    ids = torch.tensor([tiny.prompts[row]])
    out = tiny.ref.generate(
        input_ids=ids, input_features=feats, input_features_mask=fmask, attention_mask=torch.ones_like(ids),
        do_sample=False, max_new_tokens=kw.pop("max_new_tokens", N), eos_token_id=list(eos), pad_token_id=tiny.pad,
        return_dict_in_generate=True, output_scores=True, **kw,
    )
    new = out.sequences[0, ids.shape[1]:].tolist()
    score = None if out.get("sequences_scores") is None else float(out.sequences_scores[0])
    return list(itertools.takewhile(lambda t: t not in eos, new)), score


def assert_matches(tiny, got, result, **hf_kw):
    for row, tokens in enumerate(got):
        want, score = theirs(tiny, row, **hf_kw)
        assert tokens == want, (row, hf_kw)
        if score is not None:  # beam search: HF's length-penalised score of the best hypothesis
            np.testing.assert_allclose(result.scores[row], score, rtol=1e-4)


def test_greedy_matches_transformers(tiny):
    got, r = ours(tiny)
    assert_matches(tiny, got, r)
    assert all(len(t) == N for t in got) and not r.finished.any()
    # EOS handling: a token the model emits first in rows 0 and 2, and never in row 1.
    eos = (got[0][0], 151645)
    assert got[0][0] not in got[1]
    got_e, r_e = ours(tiny, eos_ids=eos)
    assert_matches(tiny, got_e, r_e, eos=eos)
    assert r_e.finished.tolist() == [True, False, True] and r_e.lengths.tolist() == [0, N, 0]
    # suppress_eos: every row runs to max_new_tokens and never emits an EOS (HF: suppress_tokens).
    got_s, r_s = ours(tiny, eos_ids=eos, suppress_eos=True)
    assert_matches(tiny, got_s, r_s, eos=eos, suppress_tokens=list(eos))
    assert (r_s.lengths == N).all() and not np.isin(r_s.tokens[:, :N], eos).any()


def test_batched_equals_single_and_compiles_once_per_bucket(tiny):
    """Rows alone equal the batch; other max_new_tokens and prompt lengths in the same bucket compile nothing."""
    batch, _ = ours(tiny)
    alone, _ = ours(tiny, rows=[0])
    assert alone[0] == batch[0]
    with count_compilations() as compiled:
        for row, n in ((1, 7), (2, 5), (1, 1)):
            assert len(tiny.prompts[row]) != len(tiny.prompts[0])
            alone, r = ours(tiny, rows=[row], max_new_tokens=n)
            assert alone[0] == batch[row][:n] and r.steps == n
    assert compiled.count == 0


def test_generate_rejects_too_many_tokens(tiny):
    with pytest.raises(ValueError, match=r"max_len=80.*max_len >= 81"):
        ours(tiny, max_new_tokens=17, max_len=WIDTH + 16)
    with pytest.raises(ValueError, match="early_stopping"):
        ours(tiny, beam_size=2, early_stopping="sometimes")


@pytest.mark.parametrize("beams", [2, 4])
def test_beam_search_matches_transformers(tiny, beams):
    greedy, _ = ours(tiny)
    got, r = ours(tiny, beam_size=beams)
    assert_matches(tiny, got, r, num_beams=beams)
    assert got != greedy  # the beams find something greedy does not
    # length_penalty 0 with a likely EOS: short finished hypotheses win (traced settings: no new compilation).
    eos = (45764, 151645)
    got, r = ours(tiny, beam_size=beams, length_penalty=0.0, eos_ids=eos)
    assert_matches(tiny, got, r, num_beams=beams, length_penalty=0.0, eos=eos)
    assert r.finished.any()


def test_beam_search_with_ngram_guard_matches_transformers(tiny):
    """Four beams, no-repeat bigrams over prompt + output, EOS mid-sequence, each early_stopping mode."""
    eos = (51529, 151645)
    for lp, stopping in ((0.5, False), (1.0, True), (0.5, "never")):
        got, r = ours(tiny, beam_size=4, length_penalty=lp, early_stopping=stopping, eos_ids=eos,
                      no_repeat_ngram_size=2, with_prompt=True)
        assert_matches(tiny, got, r, num_beams=4, length_penalty=lp, early_stopping=stopping, eos=eos,
                       no_repeat_ngram_size=2)
        if stopping is False:
            assert r.finished.tolist() == [True, False, True] and 0 < r.lengths[0] < N


def test_greedy_repetition_guard_matches_transformers(tiny):
    plain, _ = ours(tiny)
    # Penalty and no-repeat bigrams over prompt + output (HF semantics), then an EOS mid-row.
    got, r = ours(tiny, repetition_penalty=1.3, no_repeat_ngram_size=2, with_prompt=True)
    assert_matches(tiny, got, r, repetition_penalty=1.3, no_repeat_ngram_size=2)
    assert got != plain
    stop = next(i for i, t in enumerate(got[1]) if i >= 2 and t not in got[1][:i])  # a new token mid-row
    eos = (got[1][stop], 151645)
    got, r = ours(tiny, repetition_penalty=1.3, no_repeat_ngram_size=2, with_prompt=True, eos_ids=eos)
    assert_matches(tiny, got, r, repetition_penalty=1.3, no_repeat_ngram_size=2, eos=eos)
    assert r.lengths[1] == stop and r.finished[1]
    # Without prompt_ids only the generated tokens count: HF's prompt_ignore_length.
    got, r = ours(tiny, repetition_penalty=1.3)
    assert got != plain
    for row, tokens in enumerate(got):
        skip = RepetitionPenaltyLogitsProcessor(1.3, prompt_ignore_length=len(tiny.prompts[row]))
        assert tokens == theirs(tiny, row, logits_processor=LogitsProcessorList([skip]))[0]


# ----------------------------------------------------------------------------------------------------------------
# The loop guard (SearchConfig.loop_period): a decoder forced to write given sequences, one per row.
# ----------------------------------------------------------------------------------------------------------------


def forced(seqs: list[list[int]], cfg: S.SearchConfig, vocab: int, max_new: int, eos: int = EOS) -> S.SearchResult:
    """Greedy search over a decoder whose row r writes seqs[r] then ``eos`` (its logits one-hot at the next token)."""
    width = max(map(len, seqs)) + 1
    table = jnp.asarray([s + [eos] * (width - len(s)) for s in seqs], jnp.int32)  # (rows, width)

    def logits_at(t):
        return jnp.where(jnp.arange(vocab)[None, :] == table[jnp.arange(len(seqs)), t][:, None], 0.0, -30.0)

    def step_fn(tokens, active, t):
        t = jnp.minimum(t + active, width - 1)
        return logits_at(t), t

    z = S.SearchSettings.make(eos_ids=(eos,))
    run = jax.jit(lambda: S.search(step_fn, logits_at(jnp.zeros(len(seqs), jnp.int32)),
                                   jnp.zeros(len(seqs), jnp.int32), 0, z, max_new, out_len=max_new, cfg=cfg))
    return jax.device_get(run())


def thue_morse(n: int) -> list[int]:
    """A over B Thue-Morse sequence: it holds no block repeated three times back to back (cube-free)."""
    return [A + bin(i).count("1") % 2 for i in range(n)]


def test_loop_guard_stops_a_looping_row_and_no_other():
    """A row looping a 3-token pattern stops once the pattern has been written ``loop_repeats`` times (15 tokens),
    marked looped and not finished; a row beside it that never repeats runs on; with the guard off both run on."""
    cfg = S.SearchConfig(PAD, loop_period=4, loop_repeats=5)
    seqs = [[A, B, C] * 20, thue_morse(40)]
    r = forced(seqs, cfg, vocab=6, max_new=48)
    assert hyp(r, 0) == [A, B, C] * 5 and r.looped[0] and not r.finished[0] and r.steps[0] == 15
    assert hyp(r, 1) == thue_morse(40) and r.finished[1] and not r.looped[1]
    off = forced(seqs, S.SearchConfig(PAD), vocab=6, max_new=48)
    assert hyp(off, 0) == [A, B, C] * 16 and not off.looped.any()
    # A period longer than loop_period is not a loop the guard looks for; one token repeated is (period 1).
    longer = forced([[A, B, C, D, E] * 8, [D] * 30], cfg, vocab=6, max_new=48)
    assert hyp(longer, 0) == [A, B, C, D, E] * 8 and not longer.looped[0]
    assert hyp(longer, 1) == [D] * 5 and longer.looped[1]
    with pytest.raises(ValueError, match="greedy search only"):
        S.SearchConfig(PAD, beam_size=2, loop_period=4)


@pytest.mark.parametrize("name", ["prose_en.txt", "prose_zh.txt"])
def test_loop_guard_defaults_never_fire_on_prose(tok, name):
    """The default guard (patterns of up to 20 tokens, 20 times) lets thousands of words of natural text through,
    tokenized with the real vocabulary, and stops the loop of QwenLM/Qwen3-ASR#129 ("I think" over and over)."""
    import os

    from qasr_jax.decoding import processors as P
    from qasr_jax.testing import DATA

    with open(os.path.join(DATA, name), encoding="utf-8") as f:
        ids = tok.encode(f.read())
    cfg = S.SearchConfig(tok.endoftext_id, loop_period=P.LOOP_PERIOD, loop_repeats=P.LOOP_REPEATS)
    loop = tok.encode("So I think" + " I think" * 40)
    r = forced([ids, loop], cfg, vocab=152064, max_new=len(ids) + 8, eos=tok.eos_ids[0])
    assert hyp(r, 0) == ids and r.finished[0] and not r.looped[0]
    assert r.looped[1] and r.lengths[1] < len(loop) and tok.decode(hyp(r, 1)).endswith(" I think" * 20)


# ----------------------------------------------------------------------------------------------------------------
# The guards through transcription, on the tiny random checkpoint (which loops on one token, as broken models do)
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(checkpoints, tmp_path_factory):
    from qasr_jax.testing.tokenizer_files import with_tokenizer

    return with_tokenizer(checkpoints("asr").official, tmp_path_factory, "official")


@pytest.fixture(scope="module")
def tiny_asr(tiny_dir):
    return qasr_jax.Transcriber.from_pretrained(tiny_dir)


def first_loop_end(ids: list[int], max_period: int = 20, repeats: int = 20) -> int | None:
    """The first length at which ``ids`` end in a pattern of <= max_period ids written ``repeats`` times."""
    for n in range(1, len(ids) + 1):
        for k in range(1, max_period + 1):
            tail = ids[n - k * repeats : n] if n >= k * repeats else None
            if tail is not None and tail == tail[:k] * repeats:
                return n
    return None


def test_transcribe_stop_loops_and_fallback(tiny_asr, tiny_dir, capsys, monkeypatch):
    """stop_loops cuts a looping piece where the loop guard's rule says (worked out here on the unguarded ids) and
    marks it; the fallback keeps the first of plain, penalised and beam decodes that passes Whisper's thresholds
    (else the last), and changes nothing when no decode is rejected; the CLI's flags do the same."""
    import json
    import zlib

    from qasr_jax import cli
    from qasr_jax.io.audio import load_audio
    from qasr_jax.testing import DATA
    from qasr_jax.transcribe import Fallback

    monkeypatch.setenv("QASR_JAX_COMPILATION_CACHE", "off")  # cli.main runs here: keep ~/.cache clean
    path = f"{DATA}/hello_en.wav"
    wave = load_audio(path)
    new = 64
    plain = tiny_asr.transcribe(wave, max_new_tokens=new)[0]
    cut = first_loop_end(plain.token_ids)
    assert cut is not None and cut < new  # the random model loops: the case the guard is for
    guarded = tiny_asr.transcribe(wave, max_new_tokens=new, stop_loops=True)[0]
    assert guarded.token_ids == plain.token_ids[:cut] and guarded.repetition_stopped and not guarded.truncated
    assert plain.truncated and not plain.repetition_stopped

    def passes(r) -> bool:
        raw = r.text.encode()
        ratio = len(raw) / len(zlib.compress(raw)) if raw else 0.0
        return ratio <= 2.4 and (not r.token_logprobs or np.mean(r.token_logprobs) >= -1.0)

    stages = [plain, tiny_asr.transcribe(wave, max_new_tokens=new, repetition_penalty=1.2)[0],
              tiny_asr.transcribe(wave, max_new_tokens=new, repetition_penalty=1.2, beam_size=4)[0]]
    assert not passes(plain)
    expected = next((r for r in stages[:2] if passes(r)), stages[2])
    got = tiny_asr.transcribe(wave, max_new_tokens=new, fallback=Fallback())[0]
    assert got.token_ids == expected.token_ids and got.text == expected.text
    lax = Fallback(compression_ratio_threshold=float("inf"), logprob_threshold=float("-inf"))
    assert tiny_asr.transcribe(wave, max_new_tokens=new, fallback=lax)[0].token_ids == plain.token_ids
    both = tiny_asr.transcribe(wave, max_new_tokens=new, stop_loops=True, fallback=Fallback())[0]
    argv = ["transcribe", path, "--model", tiny_dir, "--max-new-tokens", str(new), "--output-format", "json"]
    assert cli.main(argv) == 0  # both guards are the CLI's default
    d = json.loads(capsys.readouterr().out)
    assert d["token_ids"] == both.token_ids and d["repetition_stopped"] == both.repetition_stopped
    assert cli.main(argv + ["--stop-loops", "--no-fallback"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["token_ids"] == guarded.token_ids and d["repetition_stopped"]
