"""Every example in README.md and notebooks/quickstart.ipynb runs, on tiny local checkpoints.

Hub ids in the examples are replaced by tiny random-weight checkpoint folders (with the real Qwen tokenizer),
and the example audio names exist in the working directory; nothing else in the text is changed.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil

import numpy as np
import pytest
import soundfile as sf

from qasr_jax import cli
from tests.conftest import DATA
from tests.tokenizer_files import write_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def workdir(checkpoints, tmp_path_factory):
    """A folder holding the example audio files and tiny stand-ins for every model the docs name."""
    root = tmp_path_factory.mktemp("docs")
    models = {}
    for kind, name in (("asr", "Qwen/Qwen3-ASR-0.6B"), ("aligner", "Qwen/Qwen3-ForcedAligner-0.6B")):
        folder = str(root / kind)
        shutil.copytree(checkpoints(kind).official, folder)
        write_tokenizer(folder, "official")
        models[name] = folder
    models["path/to/Qwen3-ASR-0.6B"] = models["Qwen/Qwen3-ASR-0.6B"]
    shutil.copy(os.path.join(DATA, "hello_en.wav"), root / "speech.wav")
    shutil.copy(os.path.join(DATA, "zh.wav"), root / "a.wav")
    wave, rate = sf.read(os.path.join(DATA, "long_en.wav"))
    sf.write(root / "b.flac", wave, rate)
    return root, models


def substitute(text: str, models: dict[str, str]) -> str:
    for name in sorted(models, key=len, reverse=True):
        text = text.replace(name, models[name])
    return text


def readme_blocks(lang: str) -> list[str]:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return re.findall(rf"```{lang}\n(.*?)```", f.read(), flags=re.S)


def test_readme_python_examples_run(workdir, monkeypatch):
    root, models = workdir
    monkeypatch.chdir(root)
    blocks = readme_blocks("python")
    assert len(blocks) >= 3
    namespace: dict = {}
    for block in blocks:
        exec(compile(substitute(block, models), "README.md", "exec"), namespace)
    # The blocks did real work: results, words and logits exist and have the documented shapes.
    assert namespace["results"][0].token_ids and namespace["results"][0].source == "a.wav"
    assert all(w.end >= w.start for w in namespace["r"].words)
    assert namespace["logits"].shape[0] == len(namespace["input_ids"])


def test_readme_commands_run(workdir, monkeypatch, capsys):
    root, models = workdir
    monkeypatch.chdir(root)
    # cli.main runs in this process: keep JAX's global config (and ~/.cache) free of the on-disk compilation cache.
    monkeypatch.setenv("QASR_JAX_COMPILATION_CACHE", "off")
    commands = []
    for block in readme_blocks("bash"):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            for part in line.split("&&"):
                if part.strip().startswith("qasr-jax"):
                    commands.append(shlex.split(substitute(part, models))[1:])
    assert {c[0] for c in commands} == {"transcribe", "align", "convert"}
    for argv in commands:
        if argv[0] == "transcribe" and "--model" not in argv:
            argv += ["--model", models["Qwen/Qwen3-ASR-0.6B"]]  # the default model is a hub id
        if argv[0] == "align" and "--model" not in argv:
            argv += ["--model", models["Qwen/Qwen3-ForcedAligner-0.6B"]]
        assert cli.main(argv) == 0, (argv, capsys.readouterr().err)
    assert sorted(os.listdir(root / "subs")) == ["a.srt", "b.srt"]
    assert os.path.isdir(root / "qwen3-asr-0.6b-jax")


def test_quickstart_notebook_runs(workdir, monkeypatch):
    root, models = workdir
    monkeypatch.chdir(root)
    with open(os.path.join(ROOT, "notebooks", "quickstart.ipynb"), encoding="utf-8") as f:
        nb = json.load(f)
    namespace: dict = {}
    ran = 0
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        source = "".join(cell["source"])
        if "parameters" in cell["metadata"].get("tags", []):
            source = f'MODEL = {models["Qwen/Qwen3-ASR-0.6B"]!r}\nAUDIO = "speech.wav"\nDTYPE = "float32"\n'
        # Shell and magic lines (the install cell) are Colab's business, not Python's.
        source = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("%", "!")))
        exec(compile(source, "quickstart.ipynb", "exec"), namespace)
        ran += 1
    assert ran >= 6
    assert namespace["result"].token_ids and namespace["forced"].language == "English"
    assert np.all([r.error is None for r in namespace["asr"].transcribe(["speech.wav"])])
