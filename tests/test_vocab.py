"""A checkpoint whose vocabulary is not Qwen's: a 4,096-token BPE with the special tokens right after it
(``<|endoftext|>`` 4096, ``<|im_end|>`` 4098, ``<|audio_pad|>`` 4129), 4,160 embedding rows. Every id the library
uses must come from its tokenizer and config.json: greedy and beam search give transformers' ids, nothing
non-finite and no id outside the vocabulary comes out, the exported -hf config stops where the tokenizer says,
and streaming runs.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os

import numpy as np
import pytest
import torch

from qasr_jax.io.prompts import build_prompt_ids
from qasr_jax.io.tokenizer import Tokenizer
from qasr_jax.modeling.config import audio_token_count, load_config
from qasr_jax.testing import speech, synthetic, tiny_variant
from qasr_jax.testing.reference import build_reference, save_hf, save_official
from qasr_jax.testing.tokenizer_files import write_small_tokenizer
from qasr_jax.transcribe import Transcriber
from qasr_jax.testing.parity import reference_inputs

VOCAB = 4160  # the small tokenizer's 4,159 ids, padded
NEW = 12
STOP = 3009  # a token this random model writes third for some clips, later or never for others


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """(tokenizer, torch reference, -hf folder, official folder) of a tiny model on the small vocabulary."""
    root = tmp_path_factory.mktemp("small-vocab")
    hf, official = str(root / "hf"), str(root / "official")
    tok = Tokenizer.from_dir(write_small_tokenizer(hf, "hf"))
    write_small_tokenizer(official, "official")
    base = tiny_variant("asr-untied")
    text = dataclasses.replace(base.text, vocab_size=VOCAB)
    cfg = dataclasses.replace(base, text=text, audio_token_id=tok.audio_pad_id)
    ref = build_reference(cfg, seed=11, tok=tok)
    with torch.no_grad():  # <|im_end|> where STOP would win: clips end at different steps, finished rows get pads
        ref.lm_head.weight[tok.im_end_id] = 1.05 * ref.lm_head.weight[STOP]
    save_hf(ref, hf)
    save_official(ref, cfg, official)
    return tok, ref, hf, official


@pytest.fixture(scope="module")
def asr(small):
    return Transcriber.from_pretrained(small[2])


def test_ids_are_the_small_tokenizers(small):
    tok, _, hf, official = small
    assert (tok.endoftext_id, tok.im_end_id, tok.audio_pad_id, tok.asr_text_id) == (4096, 4098, 4129, 4157)
    for folder in (hf, official):
        cfg = load_config(folder)
        assert (cfg.text.vocab_size, cfg.audio_token_id, cfg.timestamp_token_id) == (VOCAB, 4129, None)


def theirs(small, asr, wave, **kw) -> list[int]:
    """transformers' generate on the prompt the Transcriber builds -> ids before the first EOS."""
    tok, ref, _, _ = small
    feats, mask = reference_inputs(wave)
    ids = torch.tensor([build_prompt_ids(tok, audio_token_count(int(mask.sum()), asr.model.config.audio))])
    with torch.no_grad():
        out = ref.generate(input_ids=ids, input_features=feats, input_features_mask=mask,
                           attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW, **kw)
    return list(itertools.takewhile(lambda t: t not in tok.eos_ids, out[0, ids.shape[1]:].tolist()))


SEARCHES = [{}, {"num_beams": 4}, {"repetition_penalty": 1.3}, {"no_repeat_ngram_size": 2}]


@pytest.mark.parametrize("options", SEARCHES, ids=str)
def test_search_matches_transformers(small, asr, options):
    """Greedy, beam 4, the repetition penalty and no-repeat n-grams (whose history is padded with the pad id) on
    four clips, two to a batch, rows finishing at different steps."""
    ours = {"beam_size": options.get("num_beams", 1), **{k: v for k, v in options.items() if k != "num_beams"}}
    waves = [speech("hello_en.wav"), speech("zh.wav"), synthetic(0.7, 1), synthetic(1.3, 2)]
    results = asr.transcribe(waves, max_new_tokens=NEW, batch_size=2, **ours)
    for wave, r in zip(waves, results):
        assert r.token_ids == theirs(small, asr, wave, **options)
        assert all(0 <= t < VOCAB for t in r.token_ids) and np.isfinite(r.token_logprobs).all()
    if "repetition_penalty" not in options:  # (the penalty keeps <|im_end|>, seen in the prompt, from winning)
        assert 0 < sum(len(r.token_ids) < NEW for r in results) < len(waves), "some clips end early, some run on"


def test_export_writes_the_tokenizers_ids(small, tmp_path):
    from qasr_jax.convert.export import export_checkpoint

    tok, _, hf, _ = small
    model = Transcriber.from_pretrained(hf).model
    dst = export_checkpoint(model.params, model.config, str(tmp_path / "out"), "hf", "float32", hf)
    with open(os.path.join(dst, "config.json")) as f:
        config = json.load(f)
    assert sorted(config["eos_token_id"]) == [4096, 4098] and config["pad_token_id"] == 4098
    assert (config["audio_token_id"], config["text_config"]["vocab_size"]) == (4129, VOCAB)
    assert load_config(dst) == model.config


def test_streaming_runs(small):
    asr = Transcriber.from_pretrained(small[3])
    wave = speech("hello_en.wav")
    stream = asr.stream(chunk_seconds=0.5)
    for start in range(0, len(wave), 8000):
        stream.feed(wave[start : start + 8000])
        assert all(0 <= t < VOCAB for t in stream.generated_ids)
    result = stream.finish()
    assert all(0 <= t < VOCAB for t in result.token_ids)


def test_loss_and_gradients_equal_transformers(small):
    """Training on the small vocabulary: rows are padded with its own <|endoftext|> (an id outside the table made
    every loss NaN), and the loss and every gradient equal transformers'."""
    from types import SimpleNamespace

    import qasr_jax
    from qasr_jax.training.trainer import loss_and_grads
    from qasr_jax.testing.parity import assert_grads_close, reference_loss_and_grads

    tok, ref, hf, _ = small
    batch = [{"audio": speech("hello_en.wav"), "text": "language English<asr_text>hello world", "prompt": ""},
             {"audio": synthetic(2.7, 1), "text": "language English<asr_text>a longer line of text", "prompt": "x"}]
    loss, grads = loss_and_grads(qasr_jax.load(hf), batch)
    want, ref_grads = reference_loss_and_grads(SimpleNamespace(torch_model=ref, cfg=load_config(hf)), hf, batch)
    assert np.isfinite(loss) and abs(loss - want) <= 1e-5 * abs(want)
    assert_grads_close(grads, ref_grads, 1e-4)
