"""Fine-tuning runs end to end, on the tiny random-weight checkpoint (tests/reference.py) with Qwen's tokenizer:
manifests checked before training, the Grain pipeline's order and shares, WER and CER, a killed run resumed to the
same weights bit for bit, and docs/finetuning.md's commands and the notebook run as written. (What fine-tuning
teaches a trained model, and its export read by transformers: tests/test_tiny_model.py.)"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf
from safetensors.numpy import load_file

from qasr_jax.cli.core import main
from qasr_jax.testing import DATA, ROOT, synthetic
from qasr_jax.testing.tokenizer_files import with_tokenizer
from qasr_jax.training.data import Loader, ManifestError, epoch_groups, examples_from_records, read_manifest
from qasr_jax.training.evaluation import Scored, normalize, score

NEW_WORDS = os.path.join(DATA, "newwords", "newwords.jsonl")


@pytest.fixture(autouse=True)
def no_disk_cache(monkeypatch):
    monkeypatch.setenv("QASR_JAX_COMPILATION_CACHE", "off")  # keep ~/.cache clean


@pytest.fixture(scope="module")
def tiny(checkpoints, tmp_path_factory) -> str:
    """The tiny random-weight ASR checkpoint (-hf layout) with the official tokenizer files: what runs start from."""
    return with_tokenizer(checkpoints("asr").hf, tmp_path_factory, "official")


# ----------------------------------------------------------------------------------------------------------------
# Manifests


GOOD = '{"audio": "ok.wav", "text": "language English<asr_text>hello"}'
BAD_LINES = [
    ('{"text": "language English<asr_text>hi"}', "line 2: missing 'audio'"),
    ('{"audio": "ok.wav"}', "line 2: missing 'text'"),
    ('{"audio": "ok.wav", "text": "hello there"}', "line 2: 'text' must hold exactly one <asr_text>"),
    ('{"audio": "nowhere.wav", "text": "language English<asr_text>hi"}', "line 2: audio file .*nowhere.wav does not"),
    ('{"audio": "broken.wav", "text": "language English<asr_text>hi"}', "line 2: .*broken.wav: cannot decode"),
    ('{"audio": "ok.wav", "text": "language English<asr_text>hi"', "line 2: not valid JSON"),
    ('["ok.wav", "language English<asr_text>hi"]', "line 2: expected a JSON object"),
]


def manifest(tmp_path, *lines: str) -> str:
    sf.write(tmp_path / "ok.wav", synthetic(1.0), 16000)
    (tmp_path / "broken.wav").write_bytes(b"RIFF....WAVEfmt not really audio")
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize("line,message", BAD_LINES)
def test_bad_manifest_line_is_named(tmp_path, line, message):
    with pytest.raises(ManifestError, match=message):
        read_manifest(manifest(tmp_path, GOOD, line))


def test_every_bad_line_reported_at_once(tmp_path):
    with pytest.raises(ManifestError) as err:
        read_manifest(manifest(tmp_path, GOOD, *(line for line, _ in BAD_LINES)))
    text = str(err.value)
    assert f"{len(BAD_LINES)} bad line(s)" in text
    assert all(f"line {n}:" in text for n in range(2, len(BAD_LINES) + 2))


def test_empty_manifest(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(ManifestError, match="holds no examples"):
        read_manifest(str(path))


@pytest.mark.parametrize("option", [{"save_every": 0}, {"keep": 0}, {"eval_every": -1}])
def test_bad_schedule_options_are_refused_before_anything_runs(tmp_path, option):
    from qasr_jax.training.finetune import finetune
    from qasr_jax.training.trainer import TrainConfig

    with pytest.raises(ValueError, match=f"got .*{list(option.values())[0]}"):
        finetune(None, None, [], str(tmp_path / "run"), TrainConfig(), **option)
    assert not (tmp_path / "run").exists()


def test_finetune_never_starts_on_a_bad_manifest(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["finetune", "--train", manifest(tmp_path, GOOD, BAD_LINES[2][0]), "--model", tiny,
                 "--output", str(out)])
    assert code == 2
    assert "line 2: 'text' must hold exactly one <asr_text>" in capsys.readouterr().err
    assert not out.exists()  # checked before the model was loaded or anything written


def test_manifest_paths_are_relative_to_it(tmp_path):
    examples = read_manifest(manifest(tmp_path, GOOD))
    assert examples[0].audio == os.path.join(str(tmp_path), "ok.wav")
    assert examples[0].seconds == pytest.approx(1.0)
    assert examples[0].language == "English" and examples[0].transcript == "hello"


# ----------------------------------------------------------------------------------------------------------------
# The Grain pipeline


def test_epoch_order_is_seeded_and_length_sorted():
    seconds = list(np.random.default_rng(0).uniform(0.5, 20.0, 103))
    a = epoch_groups(seconds, 8, seed=1, epoch=0, window=4)
    assert a == epoch_groups(seconds, 8, seed=1, epoch=0, window=4)
    assert a != epoch_groups(seconds, 8, seed=2, epoch=0, window=4)
    assert a != epoch_groups(seconds, 8, seed=1, epoch=1, window=4)
    assert sorted(i for g in a for i in g) == list(range(103))  # every example once per epoch
    # Rows batch with rows of similar length: far less padding than a plain shuffle.
    padded = sum(len(g) * max(seconds[i] for i in g) for g in a)
    rng = np.random.default_rng(3).permutation(103)
    plain = sum(len(g) * max(seconds[i] for i in g) for g in (rng[k:k + 8] for k in range(0, 103, 8)))
    assert padded < 0.8 * plain


def test_loader_host_shares_and_saved_position(tok):
    from qasr_jax.modeling.config import preset

    cfg = preset("tiny")
    records = [{"audio": synthetic(0.6 + 0.1 * i, i), "text": f"language English<asr_text>clip {i}"}
               for i in range(10)]
    examples = examples_from_records(records)

    def loader(index=0, count=1):
        return Loader(examples, tok, cfg, batch_size=4, grad_accum=1, steps=7, seed=5, host_index=index,
                      host_count=count, threads=2)

    whole, first, second = loader(), loader(0, 2), loader(1, 2)
    for _ in range(3):  # 3 steps per epoch: 4 + 4 + 2 rows
        w, a, b = next(whole), next(first), next(second)
        assert set(a.lines) | set(b.lines) == set(w.lines) and not set(a.lines) & set(b.lines)
        assert a.ids.shape[1] == 2  # each host its half of the rows
    saved = whole.iterator.get_state()
    later = [next(whole).lines for _ in range(4)]  # into the second epoch: a new shuffle
    resumed = loader()
    resumed.iterator.set_state(saved)
    assert [next(resumed).lines for _ in range(4)] == later
    with pytest.raises(StopIteration):
        next(whole)


# ----------------------------------------------------------------------------------------------------------------
# Scores


def test_score_wer_cer_per_language():
    rows = [Scored("English", normalize("A b, c d."), normalize("a x c d")),
            Scored("Chinese", normalize("你好世界。"), normalize("你好世届"))]
    report = score(rows)
    assert report["n"] == 2
    assert report["per_language"]["English"] == {"n": 1, "wer": 0.25}
    assert report["per_language"]["Chinese"] == {"n": 1, "wer": 1.0, "cer": 0.25}
    assert report["wer"] == pytest.approx(2 / 5)  # 1 of 4 English words, the one Chinese "word"
    assert report["cer"] == 0.25  # Chinese, Japanese, Korean and Cantonese rows only
    assert normalize("Don't STOP—now!") == "don't stop now"


# ----------------------------------------------------------------------------------------------------------------
# Fine-tuning, export and resume


def evaluate_json(capsys, manifest_path: str, model: str) -> dict:
    assert main(["evaluate", manifest_path, "--model", model, "--output-format", "json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def finetune_args(model: str, output: str, *extra: str) -> list[str]:
    return ["finetune", "--train", NEW_WORDS, "--model", model, "--output", output, "--steps", "12", "--batch-size",
            "2", "--grad-accum", "2", "--lr", "1e-3", "--dtype", "float32", "--save-every", "1", "--keep", "2",
            *extra]


def test_killed_run_resumes_bit_for_bit(tiny, tmp_path):
    """A run killed (SIGKILL) after a few checkpoints, resumed with --resume, ends with exactly the weights of an
    uninterrupted run, having read the same rows at every step (8 rows, 4 a step: 6 epochs, each reshuffled)."""
    whole = tmp_path / "whole"
    assert main(finetune_args(tiny, str(whole))) == 0
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": ROOT, "QASR_JAX_COMPILATION_CACHE": "off"}
    proc = subprocess.Popen([sys.executable, "-m", "qasr_jax.cli", *finetune_args(tiny, str(killed))], env=env,
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 600
    while not (killed / "checkpoints" / "3").is_dir():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps_done = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert 3 <= max(steps_done) < 12  # it died mid-run
    assert main(finetune_args(tiny, str(killed), "--resume")) == 0

    a, b = load_file(str(whole / "model-hf" / "model.safetensors")), load_file(str(killed / "model-hf" /
                                                                                     "model.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    read = lambda run: [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]  # noqa
    assert [(m["step"], m["lines"], m["loss"]) for m in read(whole)] == [
        (m["step"], m["lines"], m["loss"]) for m in read(killed)]


# ----------------------------------------------------------------------------------------------------------------
# The docs


def new_words_folder(tmp_path) -> None:
    """The new-words clips with their manifest copied as train.jsonl and dev.jsonl into ``tmp_path``."""
    for name in os.listdir(os.path.dirname(NEW_WORDS)):
        if name.endswith(".wav"):
            shutil.copy(os.path.join(os.path.dirname(NEW_WORDS), name), tmp_path / name)
    for name in ("train.jsonl", "dev.jsonl"):
        shutil.copy(NEW_WORDS, tmp_path / name)


def test_readme_finetuning_commands_run(tiny, tmp_path, monkeypatch, capsys):
    """docs/finetuning.md's commands, with the tiny random-weight checkpoint for the hub id and the new-words
    clips as data."""
    with open(os.path.join(ROOT, "docs", "finetuning.md"), encoding="utf-8") as f:
        page = f.read()
    commands = [shlex.split(line.strip()[2:].replace("Qwen/Qwen3-ASR-0.6B", tiny))
                for block in re.findall(r"```console\n(.*?)```", page, flags=re.S)
                for line in block.splitlines() if line.startswith("$ qasr-jax")]
    assert [c[1] for c in commands] == ["finetune", "finetune", "evaluate"]
    new_words_folder(tmp_path)
    monkeypatch.chdir(tmp_path)
    for argv in commands:
        assert main(argv[1:]) == 0, (argv, capsys.readouterr().err)
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["n"] == 8
    for run in ("run", "run-lora"):
        assert sorted(os.listdir(tmp_path / run / "model-hf")) == sorted(os.listdir(tiny))
