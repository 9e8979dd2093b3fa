"""The code blocks of docs/*.md pages run, on tiny local checkpoints (tests/docs/test_docs.py's ``RUNS`` lists which
test runs which page; the substitutions are test_docs.py's).

``qasr-jax`` commands run in this process through ``cli.main``, except pipelines, which run in bash as written
with two stand-ins first on ``PATH``: ``ffmpeg`` and ``arecord`` (there is no microphone here, and no ffmpeg need
be installed) write the named or the example audio as the 16 kHz s16le their arguments ask for, after checking
those arguments. docs/multi_device.md runs in a process that sees 8 CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``, as tests/modeling/test_sharding.py does).
"""

from __future__ import annotations

import json
import math
import os
import shlex
import stat
import subprocess
import sys

import numpy as np
import soundfile as sf
from safetensors.numpy import load_file

from qasr_jax import cli
from qasr_jax.io.hub import data_path
from qasr_jax.vad.network import WEIGHTS_FILE
from qasr_jax.testing.docs import is_install, page_blocks, run_python_blocks, shell_commands, substitute, with_model
from test_docs import workdir  # noqa: F401  (the fixture: example audio and tiny checkpoints)

FAKE_FFMPEG = """
import sys

import numpy as np, soundfile as sf, soxr

args = sys.argv[1:]
value = lambda flag: args[args.index(flag) + 1]
assert (value("-f"), value("-ac"), value("-ar"), args[-1]) == ("s16le", "1", "16000", "-"), args
wave, rate = sf.read(value("-i"), dtype="float32", always_2d=True)
wave = soxr.resample(wave.mean(axis=1), rate, 16000)
sys.stdout.buffer.write((np.clip(wave, -1, 32767 / 32768) * 32768).astype("<i2").tobytes())
"""
FAKE_ARECORD = """
import sys

import soundfile as sf

args = sys.argv[1:]
value = lambda flag: args[args.index(flag) + 1]
assert (value("-f"), value("-c"), value("-r")) == ("S16_LE", "1", "16000"), args
wave, rate = sf.read("speech.wav", dtype="int16")  # what the microphone heard, then it stopped
assert rate == 16000 and wave.ndim == 1
sys.stdout.buffer.write(wave.astype("<i2").tobytes())
"""


def run_commands(page: str, lang: str, models: dict[str, str], capsys, pipeline=None,
                 others: dict | None = None) -> list[tuple[str, str]]:
    """Every command of ``page``'s ``lang`` blocks but the installs: ``qasr-jax`` ones through ``cli.main``,
    pipelines by ``pipeline``, and ``others`` (a command -> how to run it) -> (command, what it printed) of each."""
    ran = []
    for block in page_blocks(page, lang):
        for command in shell_commands(block, console=lang == "console"):
            if is_install(command):
                continue
            if others and command in others:
                out = others[command](command)
            elif "|" in command and pipeline is not None:
                out = pipeline(command)
            else:
                assert command.startswith("qasr-jax "), f"no way to run {command!r} of {page}"
                argv = with_model(shlex.split(substitute(command, models)), models)
                assert cli.main(argv[1:]) == 0, (argv, capsys.readouterr().err)
                out = capsys.readouterr().out
            ran.append((command, out))
    assert ran, (page, lang)
    return ran


def shell(tmp_path, root, models):
    """A function that runs a pipeline in bash as written (``--model`` added to its last command, ``qasr-jax``), the
    stand-ins first on PATH -> what it printed."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, code in (("ffmpeg", FAKE_FFMPEG), ("arecord", FAKE_ARECORD)):
        (bin_dir / name).write_text(f"#!{sys.executable}\n{code}", encoding="utf-8")
        (bin_dir / name).chmod((bin_dir / name).stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "PATH": os.pathsep.join([str(bin_dir), os.path.dirname(sys.executable),
                                                 os.environ.get("PATH", "")]),
           "QASR_JAX_COMPILATION_CACHE": str(tmp_path / "xla")}

    def run(command: str) -> str:
        last = command.rsplit("|", 1)[1].strip()
        assert last.startswith("qasr-jax ") and "--model" not in last, command
        full = substitute(command, models) + " --model " + shlex.quote(models["Qwen/Qwen3-ASR-0.6B"])
        done = subprocess.run(["bash", "-o", "pipefail", "-c", full], cwd=root, env=env, capture_output=True,
                              text=True, timeout=1200)
        assert done.returncode == 0, (command, done.stderr[-3000:])
        return done.stdout

    return run


def test_outputs_page_runs(workdir, monkeypatch, capsys):
    """docs/outputs.md: the cue options, word-timed cues, detect-language; formats and language probabilities."""
    root, models = workdir
    monkeypatch.chdir(root)
    monkeypatch.setenv("QASR_JAX_COMPILATION_CACHE", "off")
    outs = dict(run_commands("docs/outputs.md", "console", models, capsys))
    assert len(outs) == 5
    srt, vtt, aligned, detected, detected_json = outs.values()
    assert " --> " in srt and vtt.startswith("WEBVTT") and " --> " in aligned
    assert [line.split("\t")[0] for line in detected.splitlines()] == ["a.wav", "b.flac"]
    assert {json.loads(line)["file"] for line in detected_json.splitlines()} == {
        os.path.join("recordings", "day1", "one.wav"), os.path.join("recordings", "two.flac")}
    namespace, ran = run_python_blocks("docs/outputs.md", models)
    assert ran == 2
    assert " --> " in namespace["srt"] and all(c.end >= c.start for c in namespace["cues"])
    r = namespace["r"]
    top = list(r.language_probabilities.values())
    assert len(top) == 5 and top == sorted(top, reverse=True)  # the top 5, best first
    assert math.isclose(sum(namespace["asr"].detect_language("speech.wav").values()), 1.0, rel_tol=1e-3)


def test_vad_page_runs(workdir, tmp_path, monkeypatch, capsys):
    """docs/vad.md: transcription of speech only, and the weights' export (written to a temporary file, not into
    the package) gives the shipped file; the Python blocks give results, probabilities, segments and streams."""
    root, models = workdir
    monkeypatch.chdir(root)
    monkeypatch.setenv("QASR_JAX_COMPILATION_CACHE", "off")
    shipped = "qasr_jax/data/silero_vad_16k.safetensors"
    exported = str(tmp_path / "exported.safetensors")

    def export(command: str) -> str:
        assert command.startswith("python -c ") and command.count(shipped) == 1
        env = {**os.environ, "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]])}
        done = subprocess.run(["bash", "-c", command.replace(shipped, exported)], cwd=root, env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    (export_command,) = [c for b in page_blocks("docs/vad.md", "bash") for c in shell_commands(b) if shipped in c]
    outs = run_commands("docs/vad.md", "bash", models, capsys, others={export_command: export})
    assert len(outs) == 3 and " --> " in outs[0][1]
    want, got = load_file(data_path(WEIGHTS_FILE)), load_file(exported)
    assert want.keys() == got.keys() and all(np.array_equal(want[k], got[k]) for k in want)
    namespace, ran = run_python_blocks("docs/vad.md", models)
    assert ran == 2
    assert len(namespace["results"]) == 2 and all(r.error is None for r in namespace["results"])
    frames = lambda wave: math.ceil(len(wave) / 512)  # noqa: E731  (one per 32 ms, the last one padded)
    assert namespace["probs"].shape == (frames(namespace["wave"]),)
    assert [len(p) for p in namespace["many"]] == [frames(namespace[k]) for k in ("w1", "w2", "w3")]
    assert namespace["spans"] and all(0 <= start < end for start, end in namespace["spans"])
    assert [len(p) for p in (namespace["p1"], namespace["p2"])] == [2, 1]


def test_tiny_model_page_runs(workdir, monkeypatch, capsys):
    """docs/tiny_model.md: the bundled tiny-en transcribes a held-out clip from the command line and in Python."""
    root, models = workdir
    monkeypatch.chdir(root)
    monkeypatch.setenv("QASR_JAX_COMPILATION_CACHE", "off")
    ((_, printed),) = run_commands("docs/tiny_model.md", "bash", models, capsys)
    namespace, ran = run_python_blocks("docs/tiny_model.md", models)
    assert ran == 1 and printed.strip()
    assert capsys.readouterr().out.strip()


def test_streaming_page_runs(workdir, tmp_path, monkeypatch, capsys):
    """docs/streaming.md: a stream and a driver of two in Python; from the command line a file, an ffmpeg pipe and
    a microphone pipe, whose last line is the final transcript of the audio the microphone heard."""
    root, models = workdir
    monkeypatch.chdir(root)
    monkeypatch.setenv("QASR_JAX_COMPILATION_CACHE", "off")
    namespace, ran = run_python_blocks("docs/streaming.md", models)
    assert ran == 1 and namespace["final"].token_ids and len(namespace["finished"]) == 2
    assert set(namespace["partials"]) == {namespace["left"], namespace["right"]}
    outs = run_commands("docs/streaming.md", "console", models, capsys, pipeline=shell(tmp_path, root, models))
    assert len(outs) == 3 and all(out.splitlines() for _, out in outs)
    stream = namespace["asr"].stream()
    stream.feed(sf.read("speech.wav", dtype="int16")[0])
    assert outs[2][1].splitlines()[-1] == " ".join(stream.finish().text.splitlines()).strip()


DRIVER = """
import json, sys

import jax

from qasr_jax import cli

job = json.load(open(sys.argv[1]))
namespace = {}
for block in job["python"]:
    exec(compile(block, "docs/multi_device.md", "exec"), namespace)
codes = [cli.main(argv) for argv in job["commands"]]
mesh = namespace["asr_mesh"].model.mesh
json.dump({"devices": jax.device_count(), "n": namespace["n"], "mesh": dict(mesh.shape), "codes": codes,
           "ids": [r.token_ids for r in namespace["many"]]}, open(sys.argv[2], "w"))
"""


def test_multi_device_page_runs_on_eight_devices(workdir, tmp_path):
    """docs/multi_device.md on 8 CPU devices: the Python example puts all 8 on ``data``; the commands transcribe a
    folder and a manifest (the default mesh) and a folder on data=4 x model=2, writing every output file."""
    root, models = workdir
    commands = []
    for block in page_blocks("docs/multi_device.md", "console"):
        for command in shell_commands(block, console=True):
            if not is_install(command):
                assert command.startswith("qasr-jax transcribe "), command
                # Random weights' text fails the fallback's thresholds on every piece, which would compile and run
                # two more searches (beam 4) on each mesh: 40 s -> 350 s. The fallback is tested on tiny-en.
                commands.append(with_model(shlex.split(substitute(command, models)), models)[1:] + ["--no-fallback"])
    assert len(commands) == 3 and any("model=2" in " ".join(c) for c in commands)
    job = {"python": [substitute(b, models) for b in page_blocks("docs/multi_device.md", "python")],
           "commands": commands}
    (tmp_path / "job.json").write_text(json.dumps(job), encoding="utf-8")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "QASR_JAX_COMPILATION_CACHE": "off"}
    done = subprocess.run([sys.executable, "-c", DRIVER, str(tmp_path / "job.json"), str(tmp_path / "report.json")],
                          cwd=root, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["devices"] == report["n"] == 8 and report["mesh"] == {"data": 8, "model": 1}
    assert report["codes"] == [0, 0, 0], done.stderr[-3000:]
    assert len(report["ids"]) == 16 and all(report["ids"])
    written = sorted(os.path.relpath(os.path.join(d, f), root) for top in ("transcripts", "out")
                     for d, _, files in os.walk(root / top) for f in files)
    assert written == sorted([os.path.join("transcripts", "a.txt"), os.path.join("transcripts", "b.txt"),
                              os.path.join("transcripts", "day1", "one.txt"), os.path.join("transcripts", "two.txt"),
                              os.path.join("out", "a.json"), os.path.join("out", "b.json")])


def test_finetuning_page_python_runs(workdir, monkeypatch):
    """docs/finetuning.md's Python block: the loss of a batch and gradients in the checkpoint's names and shapes."""
    root, models = workdir
    monkeypatch.chdir(root)
    namespace, ran = run_python_blocks("docs/finetuning.md", models)
    assert ran == 1 and np.isfinite(float(namespace["loss"]))
    grads, model = namespace["grads"], namespace["model"]
    embed = grads["model.language_model.embed_tokens.weight"]
    assert embed.shape == (model.config.text.vocab_size, model.config.text.hidden_size)
    assert np.abs(np.asarray(embed)).sum() > 0
