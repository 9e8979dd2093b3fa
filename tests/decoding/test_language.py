"""Language probabilities: equal to those from the reference model's logits at the header positions, summing to 1
over the model's languages; scripted decoders whose answer is worked out by hand; batched == one by one; no
transcript decoded; Result fields, JSON and the detect-language command."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import qasr_jax
from qasr_jax import cli
from qasr_jax.decoding import language as L
from qasr_jax.io.audio import load_audio
from qasr_jax.io.prompts import LANGUAGES, build_prompt_ids
from qasr_jax.modeling.config import audio_token_count
from qasr_jax.testing import DATA, synthetic
from qasr_jax.testing.parity import reference_inputs

FILES = ["hello_en.wav", "zh.wav", "long_en.wav"]


@pytest.fixture(scope="module")
def waves():
    return [load_audio(os.path.join(DATA, f)) for f in FILES] + [synthetic(0.4, 3)]


def reference_distribution(ck, tok, wave, context: str = "") -> dict[str, float]:
    """Each language's header ("language {Name}<asr_text>") scored by the reference model's logits, teacher-forced
    after the plain prompt, and normalised over the languages."""
    feats, mask = reference_inputs(wave)
    n_audio = audio_token_count(int(mask.sum()), ck.cfg.audio)
    plain = build_prompt_ids(tok, n_audio, context)
    scores = []
    for name in LANGUAGES:
        ids = build_prompt_ids(tok, n_audio, context, language=name)
        header = ids[len(plain):]
        with torch.no_grad():
            logits = ck.torch_model(input_ids=torch.tensor([ids]), input_features=feats,
                                    input_features_mask=mask).logits[0].double()
        logp = torch.log_softmax(logits, dim=-1)
        scores.append(sum(float(logp[len(plain) + j - 1, t]) for j, t in enumerate(header)))
    p = np.exp(np.array(scores) - max(scores))
    return dict(zip(LANGUAGES, p / p.sum()))


def test_probabilities_equal_the_reference(checkpoints, asr, waves):
    """On the random checkpoint: every language's probability within 1e-5 of the reference's, summing to 1."""
    ck = checkpoints("asr")
    got = asr.detect_language(waves[:2] + waves[3:], context=["", "Qwen, JAX", ""])
    for wave, context, dist in zip(waves[:2] + waves[3:], ["", "Qwen, JAX", ""], got):
        ref = reference_distribution(ck, asr.tokenizer, wave, context)
        assert set(dist) == set(LANGUAGES)  # the tiny config names no support_languages: the built-in 30
        assert sum(dist.values()) == pytest.approx(1.0, abs=1e-9)
        assert max(abs(dist[k] - ref[k]) for k in LANGUAGES) <= 1e-5
        assert list(dist.values()) == sorted(dist.values(), reverse=True)


def test_batch_equals_one_by_one_and_no_transcript_is_decoded(asr, waves):
    """A batch gives each input's distribution alone; the decoder takes one step per header token after the first
    (the longest name here, " Uyghur", is 4 tokens, then <asr_text>), in a batch as alone; scoring the languages
    one at a time (a tiny KV budget) takes one step per header token of each and gives the same numbers."""
    common, rests = L.header_tokens(asr.tokenizer, LANGUAGES)
    depth = max(map(len, rests))
    assert depth == 5 and common == asr.tokenizer.encode("language")
    batch, steps = L.language_distributions(asr.model, asr.tokenizer, waves, batch_size=4)
    assert steps == depth - 1
    for wave, dist in zip(waves, batch):
        alone, steps = L.language_distributions(asr.model, asr.tokenizer, [wave])
        assert steps == depth - 1
        assert list(alone[0]) == list(dist) and np.allclose(list(alone[0].values()), list(dist.values()), atol=1e-6)
    one_each, steps = L.language_distributions(asr.model, asr.tokenizer, waves[:1], kv_bytes=1)
    assert steps == sum(len(r) - 1 for r in rests)
    assert np.allclose([one_each[0][k] for k in LANGUAGES], [batch[0][k] for k in LANGUAGES], atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# A scripted decoder: logits as a function of the header written so far, over a small vocabulary.
# ----------------------------------------------------------------------------------------------------------------

END = 9  # the scripted "<asr_text>"
# Three names: "ab" (tokens 1 2), "a" (token 1, a prefix of "ab"'s tokens) and "c" (token 3 4 5).
RESTS = [[1, 2, END], [1, END], [3, 4, 5, END]]


def scripted(table: dict[tuple, list[float]], vocab: int = 10):
    """(step_fn, repeat_rows) over a state of header prefixes; ``table`` maps a prefix to its next-token
    probabilities (missing tokens share what is left), so every probability is known by hand."""

    def logits_of(prefix):
        p = np.full(vocab, 1e-3)
        for tok, q in enumerate(table.get(tuple(prefix), [])):
            if q > 0:
                p[tok] = q
        return np.log(p / p.sum())

    def step_fn(tokens, active, state):
        state = [prefix + [int(t)] if a else prefix + [0] for prefix, t, a in zip(state, np.asarray(tokens),
                                                                                   np.asarray(active))]
        return jnp.asarray(np.stack([logits_of(s) for s in state])), state

    def repeat_rows(state, k):
        return [list(s) for s in state for _ in range(k)]

    return logits_of, step_fn, repeat_rows


def by_hand(table, rest) -> float:
    """Product of a header's probabilities under ``table`` (normalised as ``scripted`` does)."""
    logits_of = scripted(table)[0]
    return float(np.exp(sum(logits_of(rest[:j])[t] for j, t in enumerate(rest))))


TABLES = [
    {(): [0, 0.7, 0, 0.3], (1,): [0, 0, 0.45, 0, 0, 0, 0, 0, 0, 0.55], (1, 2): [0] * 9 + [0.99],
     (3,): [0, 0, 0, 0, 0.9], (3, 4): [0, 0, 0, 0, 0, 0.95], (3, 4, 5): [0] * 9 + [0.97]},
    {(): [0, 0.2, 0, 0.8], (1,): [0, 0, 0.9, 0, 0, 0, 0, 0, 0, 0.1], (1, 2): [0] * 9 + [0.5],
     (3,): [0, 0, 0, 0, 0.99], (3, 4): [0, 0, 0, 0, 0, 0.99], (3, 4, 5): [0] * 9 + [0.99]},
]


@pytest.mark.parametrize("table", TABLES)
@pytest.mark.parametrize("group", [None, 1, 2])
def test_scripted_probabilities_are_the_header_products(table, group):
    """A name that begins another ("a" in "ab") keeps only its own probability (its <asr_text> included); each
    score is the product worked out by hand, whatever the grouping, in (depth - 1) steps per group."""
    logits_of, step_fn, repeat_rows = scripted(table)
    first = jnp.asarray(np.stack([logits_of([]), logits_of([])]))  # two rows, the same prompt
    scores, steps = L.header_logprobs(first, [[], []], step_fn, repeat_rows, RESTS, group)
    expected = [by_hand(table, r) for r in RESTS]
    assert np.allclose(np.exp(scores), [expected, expected], rtol=1e-6)  # float32 log-softmax
    assert steps == {None: 3, 1: 2 + 1 + 3, 2: 2 + 3}[group]  # each group: its longest header's length - 1
    dist = L.normalise(scores, ["ab", "a", "c"])[0]
    assert sum(dist.values()) == pytest.approx(1.0)
    # The decoder writing greedily from the same logits writes the most probable name.
    prefix: list[int] = []
    while not prefix or prefix[-1] != END:
        prefix.append(int(np.argmax(logits_of(prefix))))
    written = {tuple(r): n for r, n in zip(RESTS, ["ab", "a", "c"])}[tuple(prefix)]
    assert written == next(iter(dist))


def test_transcribe_fills_result_fields_and_json(asr, asr_dir, waves, capsys, monkeypatch):
    """``language_probabilities=True``: the top 5 of detect_language and the written language's probability (None
    without a header or with a forced language); ``qasr-jax transcribe --output-format json`` writes them, and
    ``qasr-jax detect-language`` prints one line per file."""
    detected = asr.detect_language(waves[:2])
    results = asr.transcribe(waves[:2], max_new_tokens=6, language_probabilities=True)
    for r, dist in zip(results, detected):
        assert r.language_probabilities == L.top(dist) and len(r.language_probabilities) == 5
        assert r.language_probability == (None if r.language is None else round(dist.get(r.language, 0.0), 6))
    forced = asr.transcribe(waves[0], language="en", max_new_tokens=4, language_probabilities=True)[0]
    assert forced.language_probability is None and forced.language_probabilities is None
    plain = asr.transcribe(waves[0], max_new_tokens=6)[0]
    assert plain.language_probabilities is None and plain.token_ids == results[0].token_ids

    monkeypatch.setenv("QASR_JAX_COMPILATION_CACHE", "off")  # cli.main runs here: keep ~/.cache clean
    path = os.path.join(DATA, FILES[0])
    assert cli.main(["transcribe", path, "--model", asr_dir, "--max-new-tokens", "6", "--output-format", "json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["language_probabilities"] == pytest.approx(L.top(asr.detect_language(path)), abs=1e-6)
    paths = [os.path.join(DATA, f) for f in FILES[:2]]
    assert cli.main(["detect-language", *paths, "--model", asr_dir]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    for line, path, dist in zip(lines, paths, asr.detect_language(paths)):
        name, p = next(iter(dist.items()))
        assert line.startswith(f"{path}\t{name}\t{p:.3f}")
    assert cli.main(["detect-language", *paths, "--model", asr_dir, "--output-format", "json"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["file"] for r in rows] == paths
    assert rows[0]["language_probabilities"] == pytest.approx(asr.detect_language(paths[0]), abs=1e-6)
    assert qasr_jax.detect_language(paths[0], model=asr) == asr.detect_language(paths[0])
