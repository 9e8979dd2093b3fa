"""The ``qasr-jax`` command as a user meets it: the bar and the results on one terminal, labels and input order,
flag errors by flag name, warnings, --version, convert's guard, and a job killed mid-way that resumes."""

from __future__ import annotations

import fcntl
import importlib.metadata
import io
import json
import os
import pty
import re
import shutil
import signal
import struct
import subprocess
import sys
import termios
import time
import tomllib

import pytest
import soundfile as sf

from qasr_jax import cli
from qasr_jax.cli import core as cli_main
from qasr_jax.io import progress
from qasr_jax.io.tokenizer import Tokenizer
from qasr_jax.testing import DATA, ROOT, synthetic
from qasr_jax.testing.tokenizer_files import with_tokenizer
from qasr_jax.transcribe import Result

NEW = 8  # new tokens per input


@pytest.fixture
def no_disk_cache(monkeypatch):
    # cli.main runs in this process: keep JAX's global config (and ~/.cache) free of the on-disk compilation cache.
    monkeypatch.setenv("QASR_JAX_COMPILATION_CACHE", "off")


def run_main(argv, capsys) -> tuple[int, str, str]:
    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "qasr_jax.cli", *args]


ENV = {**os.environ, "QASR_JAX_COMPILATION_CACHE": "off"}


# ----------------------------------------------------------------------------------------------------------------
# One terminal for the bar and the results


def run_in_terminal(argv: list[str], columns: int = 110) -> tuple[int, str]:
    """Run ``argv`` with stdin, stdout and stderr on one pseudo-terminal ``columns`` wide; (exit code, bytes seen)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=ENV, close_fds=True)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 1 << 16)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return proc.wait(timeout=600), b"".join(chunks).decode("utf-8", errors="replace")


def screen(raw: str) -> list[str]:
    """What a terminal shows after ``raw``: carriage returns rewrite a line, newlines move down, cursor-up and
    erase-line sequences are obeyed (enough for tqdm); lines are not wrapped."""
    lines: list[list[str]] = [[]]
    row = col = 0
    i = 0
    while i < len(raw):
        csi = re.match(r"\x1b\[(\d*)([A-Za-z])", raw[i:])
        if csi:
            n = int(csi.group(1) or 1)
            if csi.group(2) == "A":
                row = max(0, row - n)
            elif csi.group(2) == "K":
                del lines[row][col:]
            i += csi.end()
            continue
        ch = raw[i]
        if ch == "\r":
            col = 0
        elif ch == "\n":
            row += 1
            lines.extend([] for _ in range(row + 1 - len(lines)))
        else:
            line = lines[row]
            line.extend(" " for _ in range(col + 1 - len(line)))
            line[col] = ch
            col += 1
        i += 1
    return ["".join(line).rstrip() for line in lines]


def test_bar_and_labelled_results_share_a_terminal_in_input_order(asr_dir, asr):
    """Two files on one terminal: each transcript whole under its '==> path <==' line, in the order given (the
    short file first, although the long one finishes first), and the bar left at exactly its total."""
    files = [os.path.join(DATA, "hello_en.wav"), os.path.join(DATA, "long_en.wav")]
    expected = asr.transcribe(files, max_new_tokens=NEW)
    code, raw = run_in_terminal(command("transcribe", *files, "--model", asr_dir, "--max-new-tokens", str(NEW),
                                        "--batch-size", "1", "--no-fallback"))  # random text: the fallback fires
    assert code == 0, raw
    shown = screen(raw)
    bars = [line for line in shown if line.startswith("transcribing:")]
    warned = [line for line in shown if line.startswith("qasr-jax transcribe: warning:")]
    assert len(warned) == 2  # random weights never stop: both transcripts are cut at --max-new-tokens
    text = [line for line in shown if not line.startswith(("transcribing:", "qasr-jax transcribe: warning:"))]
    while text and not text[-1]:
        text.pop()
    want = f"==> {files[0]} <==\n{expected[0].text}\n\n==> {files[1]} <==\n{expected[1].text}".split("\n")
    assert text == [line.rstrip() for line in want], raw
    total = sum(r.duration for r in expected)
    assert len(bars) == 1, raw
    m = re.search(r" (\d+%)\|.*\| ([\d.]+)/([\d.]+) s of audio \[", bars[0])
    assert m and m.group(1) == "100%" and m.group(2) == m.group(3) == f"{total:.1f}", bars[0]


def test_progress_bar_counts_samples_to_its_total():
    """Odd piece lengths end the bar at exactly its total; an hour or more of audio is shown in hours."""
    pieces = [16007, 3, 12345, 99999]
    out = io.StringIO()
    bar = progress.audio_progress(sum(pieces), 16000, True, file=out)
    for n in pieces:
        bar.update(n)
    bar.close()
    last = screen(out.getvalue())[-2]  # the bar's final state, then the newline close() ends it with
    seconds = f"{sum(pieces) / 16000:.1f}"
    assert re.search(rf"100%\|#+\| {seconds}/{seconds} s of audio \[", last), last
    out = io.StringIO()
    bar = progress.audio_progress(3 * 3600 * 16000, 16000, True, file=out)
    bar.update(3600 * 16000)
    bar.close()
    assert re.search(r" 33%\|.*\| 1\.00/3\.00 h of audio \[", screen(out.getvalue())[-2])
    assert not isinstance(progress.audio_progress(100, 16000, False), progress.AudioBar)


def test_json_to_stdout_is_one_object_a_line_in_input_order(asr_dir, asr):
    files = [os.path.join(DATA, f) for f in ("zh.wav", "long_en.wav", "hello_en.wav")]
    proc = subprocess.run(command("transcribe", *files, "--model", asr_dir, "--max-new-tokens", str(NEW),
                                  "--batch-size", "1", "--output-format", "json", "--no-fallback"),
                          capture_output=True, text=True, env=ENV)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    expected = asr.transcribe(files, max_new_tokens=NEW)
    assert [json.loads(line)["file"] for line in lines] == files
    assert [json.loads(line)["token_ids"] for line in lines] == [r.token_ids for r in expected]
    assert "==>" not in proc.stdout


# ----------------------------------------------------------------------------------------------------------------
# Flags, warnings, --version, convert


def test_version_matches_the_distribution(capsys):
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        version = tomllib.load(f)["project"]["version"]
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out == f"qasr-jax {version}\n"


def test_bad_flags_are_named_before_anything_loads(capsys, no_disk_cache, tmp_path):
    missing_model = str(tmp_path / "no-model-here")  # never opened: the flags fail first
    code, out, err = run_main(["transcribe", "a.wav", "--model", missing_model, "--beam-size", "0", "--batch-size",
                               "-2", "--max-new-tokens", "0", "--max-audio-seconds", "-5"], capsys)
    assert code == 2 and out == ""
    assert err.startswith("qasr-jax transcribe: error: ")
    for part in ("--beam-size must be >= 1, got 0", "--batch-size must be >= 1, got -2",
                 "--max-new-tokens must be >= 1, got 0", "--max-audio-seconds must be a positive number of seconds, "
                 "got -5"):
        assert part in err
    assert "beam_size" not in err and "max_seconds" not in err and "no-model-here" not in err
    code, _, err = run_main(["transcribe", "a.wav", "--model", missing_model, "--max-audio-seconds", "nan"], capsys)
    assert code == 2 and "--max-audio-seconds must be a positive number of seconds, got nan" in err
    code, _, err = run_main(["transcribe", "a.wav", "--model", missing_model, "--timestamps"], capsys)
    assert code == 2 and "--timestamps needs a forced aligner: add --aligner Qwen/Qwen3-ForcedAligner-0.6B" in err
    code, _, err = run_main(["transcribe", "a.wav", "--model", missing_model, "--skip-existing"], capsys)
    assert code == 2 and "--skip-existing needs --output-dir" in err
    code, _, err = run_main(["transcribe", "a.wav", "--model", missing_model, "--process-id", "3"], capsys)
    assert code == 2 and "--process-id needs --distributed" in err
    code, _, err = run_main(["transcribe", "a.wav", "--model", missing_model, "--distributed", "--num-processes",
                             "2", "--process-id", "2"], capsys)
    assert code == 2 and "--process-id must be in 0..1" in err


def test_limits_that_need_the_model_name_the_flag(asr_dir, capsys, no_disk_cache):
    wav = os.path.join(DATA, "hello_en.wav")
    code, out, err = run_main(["transcribe", wav, "--model", asr_dir, "--max-new-tokens", "1000000"], capsys)
    assert code == 2 and out == "" and "--max-new-tokens must be at most" in err and "max_new_tokens" not in err


def weightless(model_dir: str, folder) -> str:
    """``model_dir``'s config and tokenizer without its weights: a command that got as far as loading the model
    would fail on them, so an error naming a flag shows that the flag was checked first."""
    os.makedirs(folder)
    for name in os.listdir(model_dir):
        if not name.startswith("model"):  # model*.safetensors and their index
            shutil.copy(os.path.join(model_dir, name), folder)
    return str(folder)


def test_flags_checked_against_the_model_name_the_flag_before_it_loads(asr_dir, checkpoints, tmp_path_factory,
                                                                      capsys, no_disk_cache, tmp_path):
    model = weightless(asr_dir, tmp_path / "asr")
    wav = os.path.join(DATA, "hello_en.wav")
    code, out, err = run_main(["transcribe", wav, "--model", model, "--language", "xx"], capsys)
    assert code == 2 and out == "" and "error: --language: unsupported language 'xx'" in err
    words = ["name"] * 10_001  # one token each after the first
    assert len(Tokenizer.from_dir(model).encode(" ".join(words))) == 10_001  # counted by the real tokenizer
    for command in ("transcribe", "stream"):
        code, _, err = run_main([command, wav, "--model", model, "--context", " ".join(words)], capsys)
        assert code == 2 and "--context is 10,001 tokens, over the limit of 10,000" in err, err
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a folder")
    code, _, err = run_main(["transcribe", wav, "--model", str(tmp_path / "nowhere"), "--output-dir",
                             str(a_file / "subs")], capsys)
    assert code == 2 and f"--output-dir {a_file / 'subs'}: {a_file} is a file, not a folder" in err
    aligner = weightless(with_tokenizer(checkpoints("aligner").official, tmp_path_factory, "official"),
                         tmp_path / "aligner")
    code, _, err = run_main(["transcribe", wav, "--model", aligner], capsys)
    assert code == 2 and "is a forced aligner, not an ASR model; pass it as --aligner" in err and "aligner=" not in err


@pytest.mark.parametrize("command,module", [("evaluate", "jiwer"), ("finetune", "grain"), ("finetune", "qwix")])
def test_a_missing_train_extra_is_named_with_its_install_line_first(command, module, capsys, monkeypatch,
                                                                    no_disk_cache, tmp_path):
    monkeypatch.setitem(sys.modules, module, None)  # what an environment without the train extra imports
    argv = ["evaluate", str(tmp_path / "dev.jsonl")] if command == "evaluate" else [
        "finetune", "--train", str(tmp_path / "train.jsonl"), "--output", str(tmp_path / "run")]
    code, out, err = run_main(argv + ["--model", str(tmp_path / "no-model-here")], capsys)
    assert code == 2 and out == ""
    assert f"error: No module named '{module}': {command} needs the train extra: pip install \".[train]\"" in err
    assert "no-model-here" not in err and "jsonl" not in err  # checked before the manifest or the model


@pytest.fixture
def no_jax_cache_setting():
    """JAX's own cache setting unset for the test: an earlier test in this process (a worker runs several files)
    may have turned it on, and it wins over $QASR_JAX_COMPILATION_CACHE."""
    import jax

    previous = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", None)
    yield
    jax.config.update("jax_compilation_cache_dir", previous)


def test_env_prints_what_a_bug_report_needs(capsys, monkeypatch, tmp_path, no_jax_cache_setting):
    import jax

    cache = tmp_path / "xla"
    cache.mkdir()
    (cache / "program").write_bytes(b"x" * 2**20)
    monkeypatch.setenv("QASR_JAX_COMPILATION_CACHE", str(cache))
    code, out, _ = run_main(["env"], capsys)
    lines = out.splitlines()
    assert code == 0
    for name in ("qasr-jax", "jax", "jaxlib", "flax", "transformers"):
        assert f"{name}: {importlib.metadata.version(name)}" in lines
    assert f"device 0: {jax.devices()[0].platform} {jax.devices()[0].device_kind}" in lines
    assert {"extra serve: installed", "extra train: installed"} <= set(lines)
    assert f"compilation cache: {cache} ($QASR_JAX_COMPILATION_CACHE): 1 files, 1.0 MiB" in lines
    monkeypatch.setenv("QASR_JAX_COMPILATION_CACHE", "off")
    assert run_main(["env"], capsys)[1].splitlines()[-1] == "compilation cache: off (QASR_JAX_COMPILATION_CACHE=off)"


def test_aligner_without_timestamps_warns_and_is_not_loaded(asr_dir, asr, capsys, no_disk_cache, tmp_path):
    wav = os.path.join(DATA, "hello_en.wav")
    code, out, err = run_main(["transcribe", wav, "--model", asr_dir, "--max-new-tokens", str(NEW), "--no-fallback",
                               "--aligner", str(tmp_path / "no-aligner-here")], capsys)
    assert code == 0, err
    assert "qasr-jax transcribe: warning: --aligner is ignored without --timestamps; add --timestamps" in err
    assert out == asr.transcribe(wav, max_new_tokens=NEW)[0].text + "\n"


def test_a_truncated_result_is_reported_with_the_flag_to_raise(asr_dir, capsys, no_disk_cache):
    """Random weights never emit EOS, so 3 tokens cut every transcript short: the CLI says so and how to fix it;
    json carries the flag."""
    wav = os.path.join(DATA, "hello_en.wav")
    code, out, err = run_main(["transcribe", wav, "--model", asr_dir, "--max-new-tokens", "3",
                               "--output-format", "json"], capsys)
    assert code == 0, err
    assert f"warning: {wav}: the transcript stopped at --max-new-tokens 3" in err and "raise --max-new-tokens" in err
    assert json.loads(out)["truncated"] is True
    args = cli.build_parser().parse_args(["transcribe", "ok.wav"])
    assert cli_main.report_result(Result("ok.wav", text="fine"), args) is False and capsys.readouterr().err == ""


def test_convert_refuses_a_folder_that_is_not_empty(checkpoints, capsys, tmp_path):
    src = checkpoints("asr").official
    dst = tmp_path / "export"
    dst.mkdir()
    (dst / "notes.txt").write_text("keep me", encoding="utf-8")
    code, out, err = run_main(["convert", src, str(dst)], capsys)
    assert code == 2 and out == "" and str(dst) in err and "not empty" in err and "--force" in err
    assert sorted(os.listdir(dst)) == ["notes.txt"]
    code, out, err = run_main(["convert", src, str(dst), "--force"], capsys)
    assert code == 0, err
    assert {"notes.txt", "params", "qasr_config.json"} <= set(os.listdir(dst))  # the export, beside what was there
    code, _, err = run_main(["convert", src, str(dst / "notes.txt")], capsys)
    assert code == 2 and "is a file" in err
    assert run_main(["convert", src, str(tmp_path / "new")], capsys)[0] == 0


# ----------------------------------------------------------------------------------------------------------------
# A job killed mid-way resumes


def test_killed_job_resumes_with_skip_existing(asr_dir, tmp_path):
    """20 clips to --output-dir: a run killed with SIGKILL once some outputs exist, then rerun with
    --skip-existing, leaves exactly the 20 outputs of an uninterrupted run, byte for byte."""
    clips = tmp_path / "clips"
    clips.mkdir()
    for i in range(20):  # 0.5 to 2.4 s: three frame buckets, so the run compiles (pauses) between some outputs
        sf.write(clips / f"clip{i:02d}.wav", synthetic(0.5 + 0.1 * i, seed=i), 16000)
    names = sorted(f"clip{i:02d}.json" for i in range(20))

    def job(out_dir, *extra):
        return command("transcribe", str(clips), "--model", asr_dir, "--max-new-tokens", "16", "--batch-size", "1",
                       "--output-format", "json", "--output-dir", str(out_dir), *extra)

    whole = tmp_path / "whole"
    proc = subprocess.run(job(whole), capture_output=True, text=True, env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(whole)) == names

    resumed = tmp_path / "resumed"
    killed = subprocess.Popen(job(resumed, "--skip-existing"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env=ENV)
    deadline = time.monotonic() + 300
    while not (resumed.is_dir() and any(n.endswith(".json") for n in os.listdir(resumed))):
        assert killed.poll() is None and time.monotonic() < deadline, "the job ended before writing any output"
        time.sleep(0.002)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    done_before = [n for n in os.listdir(resumed) if n.endswith(".json")]
    assert 1 <= len(done_before) < 20, done_before
    for name in done_before:  # whatever was there when it died is whole
        assert (resumed / name).read_bytes() == (whole / name).read_bytes()

    proc = subprocess.run(job(resumed, "--skip-existing"), capture_output=True, text=True, env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert f"skipping {len(done_before)} of 20 inputs whose output is already in {resumed}" in proc.stderr
    outputs = sorted(n for n in os.listdir(resumed) if not n.startswith("."))
    assert outputs == names  # a temporary file left by the kill is hidden, never taken for an output
    assert all(re.fullmatch(r"\.clip\d\d\.json\.[0-9a-f]{12}\.tmp", n) for n in os.listdir(resumed) if n not in names)
    for name in names:
        assert (resumed / name).read_bytes() == (whole / name).read_bytes(), name
    # Everything done: a third run loads no model and writes nothing.
    stamp = {n: os.stat(resumed / n).st_mtime_ns for n in names}
    proc = subprocess.run(job(resumed, "--skip-existing", "--model", str(tmp_path / "no-model")),
                          capture_output=True, text=True, env=ENV)
    assert proc.returncode == 0 and "skipping 20 of 20" in proc.stderr, proc.stderr
    assert {n: os.stat(resumed / n).st_mtime_ns for n in names} == stamp


def test_write_atomic_leaves_the_old_file_or_the_new_one(tmp_path):
    target = tmp_path / "sub" / "a.txt"
    cli_main.write_atomic(str(target), "first\n")
    assert target.read_text() == "first\n" and os.listdir(target.parent) == ["a.txt"]
    with pytest.raises(TypeError):
        cli_main.write_atomic(str(target), None)  # fails while writing the temporary file
    assert target.read_text() == "first\n" and os.listdir(target.parent) == ["a.txt"]
    assert oct(os.stat(target).st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
