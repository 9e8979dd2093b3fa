"""Continuous batching: requests joining and leaving the engine's slots give what each gives decoded alone, in
fewer decode steps than fixed batches, compiling nothing as they come and go; token log-probabilities are the
reference's log-softmax at the chosen tokens."""

from __future__ import annotations

import copy

import jax
import numpy as np
import pytest
import torch

import qasr_jax
from qasr_jax.decoding import search as S
from qasr_jax.decoding.buckets import cache_length, prompt_width
from qasr_jax.decoding.compiles import count_compilations
from qasr_jax.decoding.pipeline import DecodeOptions, Pipeline, Work
from qasr_jax.decoding.slots import Prompts, Row, SlotBatcher
from qasr_jax.io.audio import log_mel_batch
from qasr_jax.testing import speech, synthetic
from qasr_jax.testing.reference import save_hf
from qasr_jax.testing.tokenizer_files import with_tokenizer
from qasr_jax.transcribe import Transcriber
from qasr_jax.testing.parity import PREFIX, SUFFIX, reference_inputs

EOS_IDS, PAD = (151645, 151643), 151643  # the tiny checkpoint's (Qwen) <|im_end|>, <|endoftext|>
MAX_NEW = [4, 96, 9, 33, 70, 5, 12, 50, 7, 88, 16, 24]  # per request: 12 requests, 3x the 4 request slots
SECONDS = [0.6, 3.1, 1.2, 2.2, 0.9, 4.0, 1.7, 2.8, 0.7, 3.5, 1.4, 2.5]


@pytest.fixture(scope="module")
def tiny(checkpoints, tmp_path_factory):
    """The tiny random ASR with its logits scaled down (final norm x 0.3) so that beams disagree with greedy and
    an early EOS is likely for some prompts; 12 prompts of mixed audio lengths, embedded as one batch."""
    ck = checkpoints("asr")
    ref = copy.deepcopy(ck.torch_model)
    with torch.no_grad():
        ref.model.language_model.norm.weight.mul_(0.3)
    model = qasr_jax.load(save_hf(ref, str(tmp_path_factory.mktemp("slots-asr"))))
    waves = [synthetic(s, i) for i, s in enumerate(SECONDS)]
    waves[1], waves[6] = speech("hello_en.wav"), speech("zh.wav")
    feats, n_frames = log_mel_batch(waves)
    audio, n_tok = model.engine.encode(feats, n_frames)
    prompts = [PREFIX + [151676] * int(n) + SUFFIX for n in np.asarray(n_tok)]
    width = prompt_width(max(map(len, prompts)))
    ids = np.zeros((len(waves), width), np.int32)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = p
    lengths = np.array([len(p) for p in prompts], np.int32)
    batch = Prompts(model.engine.embed(ids, audio), lengths, jax.numpy.asarray(ids))
    return model, ref, waves, prompts, batch


def alone(model, batch: Prompts, row: int, max_new: int, cfg, z) -> S.SearchResult:
    """Row ``row`` decoded by itself with the one-call program."""
    out_len = max(MAX_NEW)
    res = model.engine.generate(batch.embeds[row : row + 1], batch.lengths[row : row + 1], [max_new], z, cfg,
                                max_len=cache_length(batch.embeds.shape[1], out_len),
                                prompt_ids=None if cfg.no_repeat_ngram_size == 0 else batch.ids[row : row + 1])
    return jax.device_get(res)


def run_slots(model, batch: Prompts, cfg, z, request_slots: int = 4, order=None):
    out_len = max(MAX_NEW)
    slots = SlotBatcher(model.engine, request_slots * cfg.beam_size, cache_length(batch.embeds.shape[1], out_len),
                        out_len, cfg, z, history_len=batch.embeds.shape[1] + out_len)
    for row in order or range(len(MAX_NEW)):
        slots.submit(Row(batch, row, MAX_NEW[row], tag=row))
    outs = slots.drain()
    return {o.row.tag: o for o in outs}, slots.steps


@pytest.mark.parametrize("beams,guard", [(1, 0), (2, 0), (1, 2)])
def test_requests_in_slots_equal_each_request_alone(tiny, beams, guard):
    """Three times as many requests as slots, audio of 0.6-4 s, max_new_tokens 4 to 96: every request's ids equal
    the request decoded alone and its log-probabilities agree; fewer decode steps than fixed batches of 4."""
    model, _, _, _, batch = tiny
    cfg = S.SearchConfig(PAD, beam_size=beams, no_repeat_ngram_size=guard)
    probe = alone(model, batch, 3, 40, S.SearchConfig(PAD), S.SearchSettings.make(EOS_IDS))
    # An EOS id the model emits early for some requests and not others: slots then free at different times.
    z = S.SearchSettings.make(eos_ids=(int(probe.tokens[0, 5]), 151645), length_penalty=0.7)
    outs, steps = run_slots(model, batch, cfg, z)
    assert sorted(outs) == list(range(len(MAX_NEW)))
    ended_early = 0
    for row, o in outs.items():
        want = alone(model, batch, row, MAX_NEW[row], cfg, z)
        n = int(want.lengths[0])
        assert o.token_ids == want.tokens[0, :n].tolist(), (row, beams)
        np.testing.assert_allclose(o.token_logprobs, want.token_logprobs[0, :n], rtol=1e-5, atol=1e-5)
        assert o.finished == bool(want.finished[0]) and len(o.token_ids) <= MAX_NEW[row]
        ended_early += o.finished
    assert 0 < ended_early < len(MAX_NEW)  # a mix of EOS and max_new_tokens endings
    # Fixed batches of 4 in the same order each run until their longest request ends; the prompt's own logits
    # give the first token, so a batch takes (its longest request's tokens - 1) steps.
    per_request = [outs[r].steps for r in range(len(MAX_NEW))]
    fixed = sum(max(per_request[i : i + 4]) - 1 for i in range(0, len(MAX_NEW), 4))
    assert steps < fixed, (steps, fixed)


def test_joining_and_leaving_compiles_nothing(tiny):
    model, _, _, _, batch = tiny
    cfg, z = S.SearchConfig(PAD), S.SearchSettings.make(EOS_IDS)
    run_slots(model, batch, cfg, z)
    with count_compilations() as compiled:
        outs, _ = run_slots(model, batch, cfg, z, order=list(reversed(range(len(MAX_NEW)))))
    assert compiled.count == 0 and len(outs) == len(MAX_NEW)


def test_held_slot_extends_its_kept_prefix(tiny):
    """A held slot keeps a prefix of its cache between requests: the prompt's first part, then the rest inserted
    on top of it, decodes exactly as the whole prompt inserted at once."""
    model, _, _, prompts, batch = tiny
    cfg, z = S.SearchConfig(PAD), S.SearchSettings.make(EOS_IDS)
    row, cut = 2, 20
    width = batch.embeds.shape[1]
    out_len = 16
    slots = SlotBatcher(model.engine, 2, cache_length(width, out_len), out_len, cfg, z)
    mine = slots.reserve()
    head = Prompts(batch.embeds[row : row + 1], np.array([cut], np.int32))  # the first 20 tokens...
    slots.submit(Row(head, 0, 3, slot=mine))
    slots.drain()
    slots.truncate(mine, cut)  # ...kept, the 3 generated ones dropped
    rest = np.zeros((1, width, batch.embeds.shape[2]), np.float32)
    n_rest = int(batch.lengths[row]) - cut
    rest[0, :n_rest] = np.asarray(batch.embeds[row, cut : cut + n_rest])
    slots.submit(Row(Prompts(jax.numpy.asarray(rest), np.array([n_rest], np.int32)), 0, 10, slot=mine))
    (got,) = slots.drain()
    want = alone(model, batch, row, 10, cfg, z)
    assert got.token_ids == want.tokens[0, : want.lengths[0]].tolist()
    np.testing.assert_allclose(got.token_logprobs, want.token_logprobs[0, : want.lengths[0]], rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="all 2 slots"):
        slots.reserve(), slots.reserve()
    slots.give_back(mine)


def test_token_logprobs_are_the_reference_log_softmax(tiny):
    """Greedy: each generated token's log-probability equals log_softmax of transformers' logits at that step."""
    model, ref, waves, prompts, batch = tiny
    row, new = 4, 12
    got = alone(model, batch, row, new, S.SearchConfig(PAD), S.SearchSettings.make(EOS_IDS))
    new = int(got.lengths[0])
    assert new >= 6
    tokens = got.tokens[0, :new].tolist()
    feats, fmask = reference_inputs(waves[row])
    ids = torch.tensor([prompts[row] + tokens])
    with torch.no_grad():
        logits = ref(input_ids=ids, input_features=feats, input_features_mask=fmask).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    start = len(prompts[row]) - 1
    want = [float(logp[start + i, t]) for i, t in enumerate(tokens)]
    np.testing.assert_allclose(got.token_logprobs[0, :new], want, rtol=1e-4, atol=1e-4)
    assert int(logp[start].argmax()) == tokens[0]


def test_partial_tokens_grow_into_the_result_and_cancel_frees_the_slot(tiny):
    """``partial`` gives each decoding request's tokens so far (a prefix of what it ends with); ``cancel`` of a
    decoding and of a queued request takes them out, and the others still decode as if alone."""
    model, _, _, _, batch = tiny
    cfg, z = S.SearchConfig(PAD), S.SearchSettings.make(EOS_IDS)
    out_len = max(MAX_NEW)
    slots = SlotBatcher(model.engine, 2, cache_length(batch.embeds.shape[1], out_len), out_len, cfg, z)
    reqs = {row: Row(batch, row, MAX_NEW[row], tag=row) for row in (1, 9, 3, 7)}  # 96, 88, 33, 50 tokens
    for req in reqs.values():
        slots.submit(req)
    assert slots.run(max_steps=5) == []
    seen = {req.tag: (ids, lps) for req, ids, lps in slots.partial()}
    assert sorted(seen) == [1, 9] and all(len(ids) == len(lps) == 6 for ids, lps in seen.values())
    slots.cancel(reqs[9])  # decoding: its slot goes to the next in the queue
    slots.cancel(reqs[3])  # queued: never starts
    assert [r.tag for r in slots.queue] == [7] and slots.free == [1]
    outs = {o.row.tag: o for o in slots.drain()}
    assert sorted(outs) == [1, 7]
    for row, o in outs.items():
        want = alone(model, batch, row, MAX_NEW[row], cfg, z)
        assert o.token_ids == want.tokens[0, : want.lengths[0]].tolist()
    assert outs[1].token_ids[:6] == seen[1][0]
    np.testing.assert_allclose(outs[1].token_logprobs[:6], seen[1][1], rtol=1e-5, atol=1e-6)
    assert slots.idle and sorted(slots.free) == [0, 1]


def test_freed_slots_wait_for_a_wave_and_outputs_do_not_change(tiny):
    """With ``refill=2``, one freed slot stays empty (its queued request waits) until a second is free, then both
    are filled by one insert; every request still decodes exactly as if alone."""
    model, _, _, _, batch = tiny
    cfg, z = S.SearchConfig(PAD), S.SearchSettings.make(EOS_IDS, suppress_eos=True)
    out_len = max(MAX_NEW)
    slots = SlotBatcher(model.engine, 4, cache_length(batch.embeds.shape[1], out_len), out_len, cfg, z, refill=2)
    for row in range(8):
        slots.submit(Row(batch, row, MAX_NEW[row], tag=row))
    outs = slots.run()  # rows 0-3 decode; row 0 (4 tokens) ends first
    assert [o.row.tag for o in outs] == [0] and len(slots.queue) == 4 and len(slots.live) == 3
    outs += slots.run()  # the one free slot waited: row 2 (9 tokens) ends next
    assert [o.row.tag for o in outs] == [0, 2] and len(slots.queue) == 4 and len(slots.free) == 2
    outs += slots.run()  # two free: rows 4 and 5 go in together (row 5, 5 tokens, then ends first)
    assert len(slots.queue) == 2 and [o.row.tag for o in outs] == [0, 2, 5] and len(slots.live) == 3
    outs += slots.drain()
    assert sorted(o.row.tag for o in outs) == list(range(8))
    for o in outs:
        want = alone(model, batch, o.row.tag, MAX_NEW[o.row.tag], cfg, z)
        assert o.token_ids == want.tokens[0, : want.lengths[0]].tolist()


def test_offline_pipeline_decodes_a_mixed_batch_as_one(checkpoints, tmp_path_factory):
    """Pieces whose caches differ (100 and 10 new tokens: two output buffers, two groups) share one batch offline:
    the decode takes as many steps as the longest piece (not the sum of two batches'), and each piece's ids are
    those it gets transcribed alone. Their audio (5-6 s and 1 s) is encoded in two batches, not padded to 6 s."""
    asr = Transcriber.from_pretrained(with_tokenizer(checkpoints("asr").official, tmp_path_factory, "official"))
    waves = [synthetic(s, i) for i, s in enumerate([6.0, 1.0, 5.0, 0.8])]
    budgets = [100, 10, 100, 10]
    options = DecodeOptions.for_tokenizer(asr.tokenizer, suppress_eos=True)
    pipe = Pipeline(asr.model, asr.tokenizer, options, batch_size=4)
    works = [Work(i, w, b) for i, (w, b) in enumerate(zip(waves, budgets))]
    for work in works:
        pipe.submit(work)
    assert len(pipe.groups) == 2
    longest_first = [works[i] for i in (0, 2, 1, 3)]
    assert [[w.key for w in part] for part in pipe._encoder_batches(longest_first, 4)] == [[0, 2], [1, 3]]
    assert len(pipe._encoder_batches(longest_first[:2], 4)) == 1  # 5 and 6 s: one octave, one batch
    got = {}
    while pipe.busy:
        got.update({work.key: out.token_ids for work, out in pipe.step()})
    assert pipe.steps == max(budgets) - 1  # the prefill picks each piece's first token
    for i, (w, b) in enumerate(zip(waves, budgets)):
        assert got[i] == asr.transcribe(w, max_new_tokens=b, batch_size=1, suppress_eos=True)[0].token_ids


def test_encode_rows_caps_the_rows_of_each_encoder_call(checkpoints, tmp_path_factory, monkeypatch):
    """``encode_rows=2`` (what a server on CPU sets to bound its activation memory): six pieces of one group, eight
    slots, are encoded (and prefilled) two at a time, yet decode together in one batch (as many steps as the longest
    piece), each with the ids it gets without the cap."""
    asr = Transcriber.from_pretrained(with_tokenizer(checkpoints("asr").official, tmp_path_factory, "official"))
    waves = [synthetic(s, i) for i, s in enumerate([3.0, 2.5, 3.5, 2.0, 3.2, 2.8])]
    options = DecodeOptions.for_tokenizer(asr.tokenizer, suppress_eos=True)
    rows = []
    encode = asr.model.engine.embed_waves
    monkeypatch.setattr(asr.model.engine, "embed_waves",
                        lambda samples, *a, **k: rows.append(samples.shape[0]) or encode(samples, *a, **k))
    got = {}
    for cap in (None, 2):
        pipe = Pipeline(asr.model, asr.tokenizer, options, batch_size=8, encode_rows=cap)
        for i, w in enumerate(waves):
            pipe.submit(Work(i, w, 6))
        rows.clear()
        outs = {}
        while pipe.busy:
            outs.update({work.key: out.token_ids for work, out in pipe.step()})
        got[cap] = outs
        assert pipe.steps == 5  # one batch: the prefill picks the first token, then five steps for all
    assert rows == [2, 2, 2]  # the last run's encoder calls
    assert got[2] == got[None] and len(got[2]) == 6
    with pytest.raises(ValueError, match="encode_rows"):
        Pipeline(asr.model, asr.tokenizer, options, encode_rows=0)


def test_groups_side_by_side_share_the_kv_budget(checkpoints, tmp_path_factory):
    """A server's pipeline (side by side) with ``kv_bytes`` for three slots of its first group: the first group
    takes them, a second group decoding beside it gets the one slot left (at least one), not a budget of its own;
    once a group is done its cache is freed, and both groups' pieces come out with the ids they get alone."""
    asr = Transcriber.from_pretrained(with_tokenizer(checkpoints("asr").official, tmp_path_factory, "official"))
    options = DecodeOptions.for_tokenizer(asr.tokenizer, suppress_eos=True)
    waves = [synthetic(s, i) for i, s in enumerate([2.0, 2.2, 2.4, 1.0, 1.2])]
    budgets = [100, 100, 100, 10, 10]  # two output buffers: two groups
    probe = Pipeline(asr.model, asr.tokenizer, options)
    works = [Work(i, w, b) for i, (w, b) in enumerate(zip(waves, budgets))]
    keys = [probe._group_of(w) for w in works]
    first, second = keys[0], keys[3]
    assert first != second and first[:2] > second[:2]
    kv = 3 * probe._slot_bytes(*first[:2]) + probe._slot_bytes(*second[:2]) // 2
    pipe = Pipeline(asr.model, asr.tokenizer, options, batch_size=8, kv_bytes=kv, side_by_side=True)
    for work in works:
        pipe.submit(work)
    got = {work.key: out.token_ids for work, out in pipe.step(max_steps=1)}
    assert pipe.groups[first].batcher.requests == 3 and pipe.groups[second].batcher.requests == 1
    assert pipe.kv_held() <= kv + probe._slot_bytes(*second[:2])
    while pipe.busy:
        got.update({work.key: out.token_ids for work, out in pipe.step()})
    assert all(g.batcher is None for g in pipe.groups.values()) and pipe.kv_held() == 0
    for i, (w, b) in enumerate(zip(waves, budgets)):
        assert got[i] == asr.transcribe(w, max_new_tokens=b, batch_size=1, suppress_eos=True)[0].token_ids
