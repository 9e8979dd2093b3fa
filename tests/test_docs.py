"""Every example in README.md and every notebook runs, on tiny local checkpoints.

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
from qasr_jax.testing import DATA
from qasr_jax.testing.tokenizer_files import write_tokenizer

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


def readme_blocks(lang: str, serving: bool = False) -> list[str]:
    """The README's ``lang`` code blocks: those of the "Serving" section (which need a running server;
    tests/test_server.py runs them against one) or, by default, all the others."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        sections = re.split(r"(?m)^## ", f.read())
    text = "".join(s for s in sections if s.startswith("Serving\n") == serving)
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


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
    assert namespace["input_ids"].count(namespace["tok"].audio_pad_id) == namespace["audio"].shape[0] > 0


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


def notebook_cells(name: str) -> list[tuple[list[str], str]]:
    """(tags, source) of every code cell of notebooks/<name>.ipynb, in order."""
    with open(os.path.join(ROOT, "notebooks", name), encoding="utf-8") as f:
        nb = json.load(f)
    return [(c["metadata"].get("tags", []), "".join(c["source"])) for c in nb["cells"] if c["cell_type"] == "code"]


NOTEBOOK_PARAMETERS = {  # set after each notebook's own parameters cell, as papermill injects them
    "quickstart.ipynb": {"AUDIO": "speech.wav", "DTYPE": "float32"},
    "tpu.ipynb": {"AUDIO": ["speech.wav", "a.wav"], "DTYPE": "float32", "BATCH_SIZE": 4, "MAX_NEW_TOKENS": 8},
}


@pytest.mark.parametrize("name", sorted(NOTEBOOK_PARAMETERS))
def test_notebook_runs_from_its_install_cell(name, workdir, monkeypatch, capsys):
    """Every code cell, the install cell first: run from notebooks/ it finds this checkout (already installed, so
    pip is not run); the others run on the tiny checkpoint in the folder holding the example audio."""
    root, models = workdir
    cells = notebook_cells(name)
    assert "pip" in cells[0][1] and "QASR_JAX_SOURCE" in cells[0][1]
    namespace: dict = {}
    monkeypatch.chdir(os.path.join(ROOT, "notebooks"))  # where Jupyter starts a notebook's kernel
    exec(compile(cells[0][1], name, "exec"), namespace)
    assert f"qasr-jax is installed from this checkout ({ROOT})" in capsys.readouterr().out
    monkeypatch.chdir(root)
    ran = 1
    for tags, source in cells[1:]:
        exec(compile(source, name, "exec"), namespace)
        if "parameters" in tags:
            namespace.update(MODEL=models["Qwen/Qwen3-ASR-0.6B"], **NOTEBOOK_PARAMETERS[name])
        ran += 1
    assert ran == len(cells) >= 6
    if name == "quickstart.ipynb":
        assert namespace["result"].token_ids and namespace["forced"].language == "English"
        assert np.all([r.error is None for r in namespace["asr"].transcribe(["speech.wav"])])
    else:
        results = namespace["results"]
        assert len(results) == 4 and all(r.error is None and r.token_ids for r in results)
        assert namespace["throughput"] > 0


def test_install_cell_outside_a_checkout_asks_for_the_source(tmp_path, monkeypatch):
    """Outside a checkout, with QASR_JAX_SOURCE left as shipped, the install cell stops with what to set: it never
    falls back to a package of that name on PyPI (which anyone could register)."""
    monkeypatch.chdir(tmp_path)
    for name in NOTEBOOK_PARAMETERS:
        with pytest.raises(RuntimeError, match="qasr-jax is not on PyPI: set QASR_JAX_SOURCE"):
            exec(compile(notebook_cells(name)[0][1], name, "exec"), {})


def test_nothing_installs_qasr_jax_from_pypi():
    """No README command or notebook cell runs ``pip install qasr-jax`` (the name is not ours on PyPI)."""
    texts = {"README.md": open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()}
    texts.update({name: "\n".join(src for _, src in notebook_cells(name)) for name in NOTEBOOK_PARAMETERS})
    for name, text in texts.items():
        for line in text.splitlines():
            for part in re.split(r"&&|\|\||;", line):  # one shell command at a time
                if "pip install" not in part:
                    continue
                words = [w.strip("'\"`") for w in part.split("pip install", 1)[1].split()]
                assert not any(re.fullmatch(r"qasr-jax(\[[\w,]*\])?([<>=!~].*)?", w) for w in words), (name, part)
