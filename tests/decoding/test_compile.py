"""Compiling once: decoder layers scanned or unrolled (one parameter tree, the same numbers; unrolled ones traced
once for all), prompt prefill in
chunks (memory linear in the prompt), the programs a CLI job compiles (a pinned count; none on a second run with
the persistent cache, and none after ``qasr-jax warmup``), and no program of another jaxlib loaded from the cache."""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile as sf

import qasr_jax
from qasr_jax.decoding.engine import Engine
from qasr_jax.modeling import sharding
from qasr_jax.modeling.config import preset
from qasr_jax.modeling.model import DecoderLayer, KVCache, param_shapes
from qasr_jax.testing import speech, synthetic
from qasr_jax.testing.tokenizer_files import with_tokenizer
from qasr_jax.transcribe import Transcriber
from qasr_jax.testing.parity import reference_prompt_logits, rel

TOL = 1e-4


@pytest.fixture(scope="module")
def asr_dir(checkpoints, tmp_path_factory):
    return with_tokenizer(checkpoints("asr").official, tmp_path_factory, "official")


@pytest.fixture(scope="module")
def pair(asr_dir):
    """The same checkpoint loaded with scanned and with unrolled decoder layers."""
    return {mode: Transcriber.from_pretrained(asr_dir, layers=mode) for mode in ("scan", "unrolled")}


def test_scanned_layers_match_the_reference(checkpoints, pair):
    wave = speech("hello_en.wav")
    ids, ref = reference_prompt_logits(checkpoints("asr"), wave)
    model = pair["scan"].model
    assert model.layers == "scan" and pair["unrolled"].model.layers == "unrolled"
    out = model.logits(ids, model.log_mel(wave))
    assert rel(out, ref) <= TOL
    assert (out.argmax(-1) == ref.argmax(-1)).all()


def test_scan_and_unrolled_share_one_tree_and_give_the_same_ids(pair):
    scan, unrolled = pair["scan"].model, pair["unrolled"].model
    flat = dict(jax.tree_util.tree_flatten_with_path(unrolled.params)[0])
    other = dict(jax.tree_util.tree_flatten_with_path(scan.params)[0])
    assert flat.keys() == other.keys() and any("layers_1" in jax.tree_util.keystr(k) for k in flat)
    assert all(np.array_equal(flat[k], other[k]) for k in flat)
    assert [line.split()[0] for line in sharding.describe(scan.params)] == \
        [line.split()[0] for line in sharding.describe(unrolled.params)]
    waves = [speech("hello_en.wav"), speech("long_en.wav"), synthetic(0.4, 7)]
    got = {mode: [r.token_ids for r in asr.transcribe(waves, max_new_tokens=12, batch_size=2)]
           for mode, asr in pair.items()}
    assert got["scan"] == got["unrolled"] and all(len(ids) > 0 for ids in got["scan"])
    with pytest.raises(ValueError, match="layers must be one of"):
        qasr_jax.Model(unrolled.config, unrolled.params, layers="rolled")


def test_chunked_prefill_equals_one_pass(pair):
    """A 300-token prompt (of two rows, different lengths) prefilled 64 tokens at a time: the same logits, cache and
    greedy continuation as in one pass."""
    model = pair["unrolled"].model
    cfg = model.config
    chunked = Engine(cfg, model.params, prefill_chunk=64)
    whole = Engine(cfg, model.params, prefill_chunk=None)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 151600, (2, 300)).astype(np.int32)
    n_new = np.array([300, 171], np.int32)
    embeds = whole.embed(ids, jnp.zeros((2, 1, cfg.text.hidden_size)))
    out = {}
    for name, eng in (("chunked", chunked), ("whole", whole)):
        logits, cache = eng.extend(eng.init_cache(2, 320), embeds, n_new)
        steps = [np.asarray(logits)]
        for _ in range(4):
            logits, cache = eng.step(cache, np.argmax(steps[-1], -1))
            steps.append(np.asarray(logits))
        out[name] = steps, np.asarray(cache.lengths)
    assert (out["chunked"][1] == out["whole"][1]).all() and out["whole"][1].tolist() == [304, 175]
    for a, b in zip(out["chunked"][0], out["whole"][0]):
        assert rel(a, b) <= TOL and (a.argmax(-1) == b.argmax(-1)).all()


def test_the_programs_trace_one_decoder_layer_for_all(pair):
    """A new process traced every unrolled decoder layer in each program it made (0.45 s of the 0.6B's first step);
    the engine's prefill and step now trace one layer and replay it for the others (not under a module transform,
    which intercepts each layer in place), with the same logits bit for bit."""
    model = pair["unrolled"].model
    cfg = model.config
    each = Engine(cfg, model.params, module_transform=lambda module: module, kv_block=model.engine.module.kv_block)
    engines = {"once": model.engine, "each": each}
    traced = collections.Counter()

    def count(next_fun, args, kwargs, context):
        if isinstance(context.module, DecoderLayer) and context.method_name == "__call__":
            traced[name] += 1
        return next_fun(*args, **kwargs)

    rng = np.random.default_rng(3)
    embeds = 0.02 * rng.standard_normal((2, 37, cfg.text.hidden_size)).astype(np.float32)
    out = {}
    for name, eng in engines.items():
        with nn.intercept_methods(count):  # a cache width no other test uses: these programs are traced here
            logits, cache = eng.extend(eng.init_cache(2, 173), embeds, np.array([37, 20], np.int32))
            steps = [np.asarray(logits)]
            for _ in range(3):
                logits, cache = eng.step(cache, np.argmax(steps[-1], -1).astype(np.int32))
                steps.append(np.asarray(logits))
        out[name] = np.stack(steps)
    assert traced == {"once": 2, "each": 2 * cfg.text.layers}  # the prefill's program and the step's
    assert np.array_equal(out["once"], out["each"])


def _prefill_temp_bytes(seq: int, chunk: int | None) -> int:
    cfg = dataclasses.replace(preset("tiny"), text=dataclasses.replace(preset("tiny").text, vocab_size=4096))
    eng = Engine(cfg, None, prefill_chunk=chunk)
    cache = jax.eval_shape(lambda: KVCache.init(cfg.text, 1, seq + 64))
    args = (param_shapes(cfg), jax.ShapeDtypeStruct((1, seq, cfg.text.hidden_size), jnp.float32),
            jax.ShapeDtypeStruct((1,), jnp.int32), cache, None)
    return eng._extend.lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_prefill_memory_grows_linearly_with_the_prompt():
    """Peak temporary memory of the compiled prefill: doubling a long prompt about doubles it in chunks (the one-pass
    program, which holds every query's scores over every key, about quadruples)."""
    chunked = [_prefill_temp_bytes(n, 256) for n in (2048, 4096)]
    whole = [_prefill_temp_bytes(n, None) for n in (2048, 4096)]
    assert chunked[1] / chunked[0] < 2.5, chunked
    assert whole[1] / whole[0] > 3.5, whole  # what the chunks avoid: the check above would catch it
    assert chunked[1] < whole[1] / 4


# -- the programs of a CLI job -------------------------------------------------------------------------------------

# One CLI transcription of 20 files of mixed lengths (0.4-16 s, tiny model, --batch-size 8, default budgets): one
# decode group (new_state, advance, results once: narrower groups fill the widest group's slots), embed_waves (log-mel
# + encoder + prompt embedding, one per encoder batch shape and prompt width) and insert shapes; 22 in all (30 before
# issue 24, 24 with three decode groups, 31 with one group and embedding in a program of its own). See RESULTS.md
# "Compile". A change shows here.
# Without the guards: random weights repeat one token, so the loop stop would end every piece after 20 tokens (fewer
# groups), and they fail every fallback threshold, so the fallback would decode each piece three times, in groups
# of other shapes. A trained model's held-out pieces pass both (tests/test_tiny_model.py); warm-up
# compiles the fallback's programs too (test_warmup_fills_the_cache_for_a_later_job).
CLI_JOB_PROGRAMS = 22
_PROBE = ("import sys, json, jax; from qasr_jax.cli.core import main; from qasr_jax.decoding.compiles import count_compilations\n"
          "with count_compilations() as c:\n    code = main(sys.argv[1:])\n"
          "print('PROGRAMS', json.dumps({'count': c.count, 'compiled': c.compiled, 'names': c.names}), file=sys.stderr)\n"
          "sys.exit(code)")


def _cli(args, cache, probe=_PROBE):
    """Run ``qasr-jax ARGS`` with the compilation cache in ``cache`` -> (its programs, the process)."""
    env = {**os.environ, "QASR_JAX_COMPILATION_CACHE": str(cache)}
    proc = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stderr.splitlines() if x.startswith("PROGRAMS "))
    return json.loads(line[len("PROGRAMS "):]), proc


@pytest.fixture(scope="module")
def job_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("job")
    seconds = [0.4, 1.3, 2.2, 3.1, 4.7, 5.5, 6.9, 7.4, 8.8, 9.6, 10.2, 11.5, 12.9, 13.3, 14.8, 15.2, 1.9, 3.6, 6.1, 16.0]
    paths = []
    for i, s in enumerate(seconds):
        path = folder / f"clip{i:02d}.wav"
        sf.write(path, synthetic(s, i), 16000)
        paths.append(str(path))
    return paths


def test_cli_job_compiles_a_pinned_count_and_nothing_the_second_time(asr_dir, job_files, tmp_path):
    cache = tmp_path / "xla"
    args = ["transcribe", *job_files, "--model", asr_dir, "--batch-size", "8", "--no-fallback", "--no-stop-loops",
            "--output-dir", str(tmp_path / "out")]
    first, _ = _cli(args, cache)
    assert first["compiled"] == first["count"] == CLI_JOB_PROGRAMS, sorted(collections.Counter(first["names"]).items())
    assert len(os.listdir(cache)) > 0
    again, _ = _cli(args + ["--output-dir", str(tmp_path / "again")], cache)
    assert again["compiled"] == 0 and again["count"] == first["count"], again
    # Another jaxlib (an upgrade) has another cache key (its version is part of it): nothing stale is loaded.
    patch = "import jax._src.cache_key as k; k.jaxlib_version_str = 'upgraded-' + k.jaxlib_version_str\n"
    upgraded, _ = _cli(args + ["--output-dir", str(tmp_path / "upgraded")], cache, probe=patch + _PROBE)
    assert upgraded["compiled"] == upgraded["count"] == first["count"], upgraded


def test_warmup_fills_the_cache_for_a_later_job(asr_dir, tmp_path):
    cache = tmp_path / "xla"
    stats, proc = _cli(["warmup", "--model", asr_dir, "--batch-sizes", "1", "--max-seconds", "2",
                        "--stream-seconds", "0"], cache)
    assert stats["compiled"] > 0 and "warm-up done" in proc.stderr and "1 x 2 s" in proc.stderr
    clip = tmp_path / "two.wav"
    sf.write(clip, synthetic(2.0, 3), 16000)
    job, _ = _cli(["transcribe", str(clip), "--model", asr_dir, "--batch-size", "1"], cache)
    assert job["count"] > 0 and job["compiled"] == 0, job
    bad = subprocess.run([sys.executable, "-m", "qasr_jax.cli", "warmup", "--model", asr_dir, "--batch-sizes", "x"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--batch-sizes" in bad.stderr
