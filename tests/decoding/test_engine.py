"""The engine's place in the house: the only module that applies (and so compiles) the model; one parameter tree
that describe() reads on one device; results that carry log-probabilities and say when they were cut short."""

from __future__ import annotations

import ast
import json
import os

import jax
import numpy as np
import pytest

import qasr_jax
from qasr_jax.decoding.pipeline import token_budget
from qasr_jax.io.units import unit_spans
from qasr_jax.modeling import sharding
from qasr_jax.testing import ROOT, speech, synthetic
from qasr_jax.testing.tokenizer_files import with_tokenizer
from qasr_jax.transcribe import Transcriber

PACKAGE_DIRS = ("qasr_jax", "convert", "kernels")


def _sources():
    """(path from the checkout's root, parsed module) of every library module, subpackages included."""
    for d in PACKAGE_DIRS:
        for folder, _, files in sorted(os.walk(os.path.join(ROOT, d))):
            for f in sorted(files):
                if f.endswith(".py"):
                    path = os.path.join(folder, f)
                    with open(path, encoding="utf-8") as fh:
                        yield os.path.relpath(path, ROOT).replace(os.sep, "/"), ast.parse(fh.read())


def test_only_the_engine_applies_the_model():
    """No package module but the engine calls ``.apply`` (the only way to run a Flax module, jitted or not), and
    none but the model and the engine names the model's module class, so no other module can build or compile it.
    The one exception the engine's docstring names: training jits its loss around ``Engine.forward``. Inside the
    model, ``_layer_program`` applies one decoder layer, which the model's own decoder calls (traced once for all)."""
    appliers, builders, forwarders = [], [], []
    for name, tree in _sources():
        inner = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name == "_layer_program"
                 for n in ast.walk(f)} if name == "qasr_jax/modeling/model.py" else set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "apply":
                if id(node) in inner:
                    assert ast.unparse(node.func.value).startswith("DecoderLayer("), ast.unparse(node)
                    continue
                appliers.append(name)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "forward":
                forwarders.append(name)
            if isinstance(node, ast.Name) and node.id == "Qwen3ASRModule":
                builders.append(name)
    assert set(appliers) == {"qasr_jax/decoding/engine.py"}, appliers
    assert set(builders) <= {"qasr_jax/decoding/engine.py", "qasr_jax/modeling/model.py"}, builders
    assert set(forwarders) == {"qasr_jax/training/trainer.py"}, forwarders
    assert "training jits its loss" in qasr_jax.decoding.engine.__doc__


def _docstrings(tree) -> set[int]:
    """ids of the docstring nodes of a module and its classes and functions."""
    owners = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    return {id(o.body[0].value) for o in owners
            if o.body and isinstance(o.body[0], ast.Expr) and isinstance(o.body[0].value, ast.Constant)}


def test_ids_and_limits_are_named_in_the_config_module_only():
    """No special-token id of the released vocabulary (151643 and up), no default hub id and no 1200 s piece limit
    is written as a literal in the library outside ``qasr_jax.modeling.config`` (test support aside): a model with
    another vocabulary takes its ids from its own config and tokenizer."""
    found = []
    for name, tree in _sources():
        if name in ("qasr_jax/modeling/config.py",) or name.startswith("qasr_jax/testing/"):
            continue
        docs = _docstrings(tree)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Constant) or id(node) in docs:
                continue
            v = node.value
            if (isinstance(v, (int, float)) and not isinstance(v, bool) and (v == 1200 or 151643 <= v <= 151705)) \
                    or (isinstance(v, str) and v.startswith("Qwen/Qwen3-")):
                found.append(f"{name}:{node.lineno}: {v!r}")
    assert not found, found


@pytest.fixture(scope="module")
def asr(checkpoints, tmp_path_factory):
    return Transcriber.from_pretrained(with_tokenizer(checkpoints("asr").official, tmp_path_factory, "official"))


def test_describe_reads_the_one_device_tree(asr):
    lines = sharding.describe(asr.model.params)
    names = [line.split()[0] for line in lines]
    assert "decoder/layers_1/qkv/kernel" in names and "audio_tower/layers_0/fc1/bias" in names
    assert len(lines) == len(set(names)) == len(jax.tree_util.tree_leaves(asr.model.params))
    assert all(line.rstrip().endswith("None") for line in lines)  # not on a mesh: no PartitionSpec


def test_results_carry_logprobs_and_say_when_cut_short(asr):
    wave = speech("hello_en.wav")
    (cut,) = asr.transcribe(wave, max_new_tokens=6)
    assert len(cut.token_ids) == len(cut.token_logprobs) == 6 and cut.truncated  # random weights never stop
    assert all(lp <= 0 for lp in cut.token_logprobs)
    assert cut.confidence == pytest.approx(np.mean(cut.token_logprobs))
    d = json.loads(json.dumps(cut.to_dict()))
    assert d["truncated"] is True and d["token_logprobs"] == pytest.approx(cut.token_logprobs, abs=1e-6)
    assert d["confidence"] == pytest.approx(cut.confidence, abs=1e-6)
    # The same piece with a bigger budget: the first six tokens and their log-probabilities are the same.
    (longer,) = asr.transcribe(wave, max_new_tokens=9)
    assert longer.token_ids[:6] == cut.token_ids
    np.testing.assert_allclose(longer.token_logprobs[:6], cut.token_logprobs, rtol=1e-5, atol=1e-6)
    # A piece that ends with EOS is not truncated: make the first generated token an EOS id.
    stop = qasr_jax.Transcriber(asr.model, _EosTokenizer(asr.tokenizer, (*asr.tokenizer.eos_ids, cut.token_ids[0])))
    (ended,) = stop.transcribe(wave, max_new_tokens=6)
    assert ended.token_ids == [] and not ended.truncated and ended.confidence is None


class _EosTokenizer:
    """A tokenizer whose EOS ids include one more id (everything else delegated)."""

    def __init__(self, tok, eos):
        self._tok, self.eos_ids = tok, eos

    def __getattr__(self, name):
        return getattr(self._tok, name)


def test_default_budget_grows_with_duration():
    assert token_budget(0.0) == 32 and token_budget(10.0) == 132
    assert token_budget(1200.0) == 12032  # a 20-minute piece of fast speech (~6 tokens/s) fits with room


def test_unit_spans_find_words_in_the_transcript():
    text = " Hello, U.S.A. don't stop 你好"
    assert unit_spans(text, ["Hello", "USA", "don't", "stop", "你", "好", "gone"]) == [
        (1, 6), (8, 13), (15, 20), (21, 25), (26, 27), (27, 28), None]


def test_words_carry_the_mean_logprob_of_their_tokens(asr):
    """Each aligned word's logprob is the mean of the log-probabilities of the tokens that spell it."""
    from qasr_jax.decoding.longform import Piece
    from qasr_jax.transcribe import _Part, word_logprobs

    tok = asr.tokenizer
    ids = tok.encode("language English") + [tok.asr_text_id] + tok.encode(" Hello world")
    logprobs = [-0.1 * (i + 1) for i in range(len(ids))]
    part = _Part(Piece(synthetic(1.0), 0.0), "English", "Hello world", ids, logprobs, False)
    body = tok.encode(" Hello world")
    start = len(ids) - len(body)
    hello = [k for k in range(len(body)) if "Hello" in tok.decode(body[: k + 1]) and "Hello" not in
             tok.decode(body[:k])]
    got = word_logprobs(tok, part, ["Hello", "world"])
    assert got[0] == pytest.approx(np.mean(logprobs[start : start + hello[0] + 1]), abs=1e-6)
    assert got[1] == pytest.approx(np.mean(logprobs[start + hello[0] + 1 :]), abs=1e-6)


def test_transcription_streams_and_the_server_prepare_requests_with_one_function(asr, monkeypatch):
    """Offline transcription, live streams, the server's form parsing and its realtime sessions each check language,
    context and hotwords through ``qasr_jax.decoding.request.prepare`` and get the same answer from it; the Request
    it returns is the very object the decoding layer runs (each piece's ``Work.request``, a stream's options)."""
    from starlette.datastructures import FormData

    from qasr_jax.decoding import request
    from qasr_jax.decoding.pipeline import Pipeline
    from qasr_jax.server import realtime, transcriptions
    from qasr_jax.server.app import Server, ServerConfig
    from qasr_jax.streaming import driver

    calls, prepared, submitted = [], [], []
    assert realtime.prepare is request.prepare
    for module in (qasr_jax.transcribe, driver, transcriptions):
        assert module.prepare is request.prepare

        def spy(*args, _name=module.__name__, **kwargs):
            calls.append(_name)
            prepared.append(request.prepare(*args, **kwargs))
            return prepared[-1]

        monkeypatch.setattr(module, "prepare", spy)
    submit = Pipeline.submit
    monkeypatch.setattr(Pipeline, "submit", lambda self, work: submitted.append(work.request) or submit(self, work))
    (offline,) = asr.transcribe(speech("hello_en.wav"), language="en", max_new_tokens=2, hotwords=["Qwen"])
    assert submitted and all(r is prepared[0] for r in submitted)
    stream = asr.stream(language="en", hotwords=["Qwen"])
    assert stream._state.opts.request is prepared[1]
    stream.close()
    stream.driver.stream(language="en", hotwords=["Qwen"]).close()
    form = FormData([("language", "en"), ("prompt", "JAX"), ("hotwords", "Qwen")])
    options = transcriptions.parse_options(form, Server(asr, ServerConfig("tiny")))
    assert calls == ["qasr_jax.transcribe", "qasr_jax.transcribe", "qasr_jax.streaming.driver",
                     "qasr_jax.server.transcriptions"]
    assert offline.language == options.request.language == "English" and options.request.hotwords is not None
    assert options.request is prepared[-1] and prepared[0].hotwords is not None
    with pytest.raises(request.RequestError, match="unsupported language 'xx'") as bad:
        asr.transcribe(speech("hello_en.wav"), language="xx")
    assert bad.value.field == "language" and calls[-1] == "qasr_jax.transcribe"
