"""Every code block in README.md and docs/*.md, and every notebook, runs, on tiny local checkpoints.

Hub ids in the examples are replaced by tiny random-weight checkpoint folders (with the real Qwen tokenizer),
commands that name no model get ``--model`` with one (their default is a hub id), and the example audio names
exist in the working directory; nothing else in the text is changed. ``RUNS`` says which test runs each page's
blocks of each language; a block tagged ``text`` is a listing or needs hardware the tests do not have (its page
says so), and is not run. In command blocks, the ``pip install`` commands are not run (CI installs from the
checkout, and ``test_nothing_installs_qasr_jax_from_pypi`` checks what they install), nor is the README's test
command, which is what CI runs.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf

from qasr_jax import cli
from qasr_jax.io.hub import example_audio
from qasr_jax.testing import DATA, ROOT
from qasr_jax.testing.notebook_run import run_code_cells
from qasr_jax.testing.tokenizer_files import with_tokenizer, write_tokenizer
from qasr_jax.training.data import read_manifest
from qasr_jax.testing.docs import (fenced_blocks, is_install, page_blocks, read_page, run_python_blocks, shell_commands,
                                   substitute, with_model)

PAGES = ("README.md", *sorted(f"docs/{n}" for n in os.listdir(os.path.join(ROOT, "docs")) if n.endswith(".md")))
TEST_COMMAND = 'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest -q'

# (page, block language) -> the test that runs those blocks, every one of them.
RUNS = {
    ("README.md", "bash"): "tests/docs/test_docs.py::test_readme_commands_run",
    ("README.md", "python"): "tests/docs/test_docs.py::test_readme_python_examples_run",
    ("docs/cli.md", "bash"): "tests/docs/test_docs.py::test_readme_commands_run",
    ("docs/python_api.md", "python"): "tests/docs/test_docs.py::test_readme_python_examples_run",
    ("docs/serving.md", "bash"): "tests/server/test_server.py::test_readme_serving_examples_run",
    ("docs/serving.md", "python"): "tests/server/test_server.py::test_readme_serving_examples_run",
    ("docs/finetuning.md", "console"): "tests/training/test_finetune.py::test_readme_finetuning_commands_run",
    ("docs/finetuning.md", "python"): "tests/docs/test_docs_pages.py::test_finetuning_page_python_runs",
    ("docs/outputs.md", "console"): "tests/docs/test_docs_pages.py::test_outputs_page_runs",
    ("docs/outputs.md", "python"): "tests/docs/test_docs_pages.py::test_outputs_page_runs",
    ("docs/vad.md", "bash"): "tests/docs/test_docs_pages.py::test_vad_page_runs",
    ("docs/vad.md", "python"): "tests/docs/test_docs_pages.py::test_vad_page_runs",
    ("docs/vad.md", "json"): "tests/vad/test_vad.py::test_docs_turn_detection_event_is_taken",
    ("docs/tiny_model.md", "bash"): "tests/docs/test_docs_pages.py::test_tiny_model_page_runs",
    ("docs/tiny_model.md", "python"): "tests/docs/test_docs_pages.py::test_tiny_model_page_runs",
    ("docs/streaming.md", "console"): "tests/docs/test_docs_pages.py::test_streaming_page_runs",
    ("docs/streaming.md", "python"): "tests/docs/test_docs_pages.py::test_streaming_page_runs",
    ("docs/multi_device.md", "console"): "tests/docs/test_docs_pages.py::test_multi_device_page_runs_on_eight_devices",
    ("docs/multi_device.md", "python"): "tests/docs/test_docs_pages.py::test_multi_device_page_runs_on_eight_devices",
}


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
    models["Qwen/Qwen3-ASR-1.7B"] = models["Qwen/Qwen3-ASR-0.6B"]
    models["path/to/Qwen3-ASR-0.6B"] = models["Qwen/Qwen3-ASR-0.6B"]
    models["tests/data/"] = DATA + os.sep  # the bundled model's clips, named from the checkout's root
    shutil.copy(os.path.join(DATA, "hello_en.wav"), root / "speech.wav")
    shutil.copy(os.path.join(DATA, "zh.wav"), root / "a.wav")
    wave, rate = sf.read(os.path.join(DATA, "long_en.wav"))
    sf.write(root / "b.flac", wave, rate)
    speech, _ = sf.read(os.path.join(DATA, "hello_en.wav"), dtype="float32")
    sf.write(root / "b.wav", speech[: rate // 2], rate)
    sf.write(root / "talk.wav", wave[: 4 * rate], rate)
    sf.write(root / "talk.mp3", wave[: 4 * rate], rate)
    quiet = 0.003 * np.random.default_rng(0).standard_normal(3 * rate // 2).astype(np.float32)
    sf.write(root / "meeting.wav", np.concatenate([quiet, speech, quiet, wave[: 3 * rate], quiet]), rate)
    (root / "transcript.txt").write_text("hello world\n", encoding="utf-8")
    for folder, clips in (("recordings", ("day1/one.wav", "two.flac")), ("calls", ("a.wav", "b.wav"))):
        for clip in clips:
            os.makedirs(os.path.dirname(root / folder / clip), exist_ok=True)
            sf.write(root / folder / clip, speech, rate)
    (root / "corpus.txt").write_text("a.wav\nb.flac\n", encoding="utf-8")  # a manifest: one path a line
    return root, models



def test_readme_python_examples_run(workdir, monkeypatch):
    """README.md's Python example, then docs/python_api.md's blocks in order (each page in its own namespace)."""
    root, models = workdir
    monkeypatch.chdir(root)
    readme, ran = run_python_blocks("README.md", models)
    assert ran >= 1
    namespace, ran = run_python_blocks("docs/python_api.md", models)
    assert ran >= 3
    # The blocks did real work: results, words and logits exist and have the documented shapes.
    for ns in (readme, namespace):
        assert ns["results"][0].token_ids and ns["results"][0].source == "a.wav"
    assert readme["words"] and all(w.end >= w.start for w in readme["words"])
    assert all(w.end >= w.start for w in namespace["r"].words)
    assert namespace["logits"].shape[0] == len(namespace["input_ids"])
    assert namespace["input_ids"].count(namespace["tok"].audio_pad_id) == namespace["audio"].shape[0] > 0


def test_readme_commands_run(workdir, monkeypatch, capsys):
    """README.md's commands and docs/cli.md's: every ``qasr-jax`` command runs and exits 0; the others are the
    install and the test command."""
    root, models = workdir
    monkeypatch.chdir(root)
    # cli.main runs in this process: keep JAX's global config (and ~/.cache) free of the on-disk compilation cache.
    monkeypatch.setenv("QASR_JAX_COMPILATION_CACHE", "off")
    commands = []
    for page in ("README.md", "docs/cli.md"):
        for block in page_blocks(page, "bash"):
            for part in shell_commands(block):
                if part.startswith("qasr-jax"):
                    commands.append(shlex.split(substitute(part, models))[1:])
                else:
                    assert is_install(part) or part == "python -m pytest -q", part
    assert {c[0] for c in commands} == {"transcribe", "align", "convert"}
    for argv in commands:
        argv = with_model(["qasr-jax", *argv], models)[1:]
        assert cli.main(argv) == 0, (argv, capsys.readouterr().err)
    assert sorted(os.listdir(root / "subs")) == ["a.srt", "b.srt"]
    assert os.path.isdir(root / "qwen3-asr-0.6b-jax")


def test_readme_keeps_the_test_command_ci_runs():
    """.ci/run runs the test command written in README.md's "Set up and run", so it stays there word for word."""
    section = read_page("README.md").split("\n## Set up and run\n", 1)[1].split("\n## ", 1)[0]
    assert f"```bash\n{TEST_COMMAND}\n```" in section
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        ci = f.read()
    assert ci.rstrip().endswith("\npython -m pytest -q")
    assert ci.index("pip install -q torch==2.13.0") < ci.index('pip install -q -e ".[test]"')


def test_readme_fits_in_12_kb():
    """The README stays short: other pages hold the prose, the README a line or a table row per subject."""
    assert os.path.getsize(os.path.join(ROOT, "README.md")) < 12 * 1024


def heading_anchors(page: str) -> set[str]:
    """GitHub's anchors for the headings of ``page``: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"(?ms)^```.*?^```$", "", read_page(page))
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"(?m)^#+ (.*)$", text)}


def test_every_link_in_the_readme_and_docs_resolves():
    """Each relative link of README.md and docs/*.md names a file of the checkout (and a heading of it, with
    ``#anchor``), and the README links every docs/ page."""
    linked = set()
    for page in PAGES:
        prose = re.sub(r"(?ms)^```.*?^```$", "", read_page(page))
        for target in re.findall(r"\]\(([^)\s]+)\)", prose):
            if re.match(r"\w+://", target):
                continue
            path, _, anchor = target.partition("#")
            full = os.path.normpath(os.path.join(ROOT, os.path.dirname(page), path)) if path else os.path.join(
                ROOT, page)
            assert os.path.exists(full), (page, target)
            rel = os.path.relpath(full, ROOT).replace(os.sep, "/")
            if anchor:
                assert anchor in heading_anchors(rel), (page, target)
            if page == "README.md":
                linked.add(rel)
    assert {p for p in PAGES if p.startswith("docs/")} <= linked


def test_every_code_block_runs_in_a_test():
    """Every block of README.md and docs/*.md has a language tag; each page's blocks of each language but ``text``
    are run by the test ``RUNS`` names (which exists), and ``RUNS`` names no blocks that are gone."""
    found = set()
    for page in PAGES:
        for tag, _ in fenced_blocks(page):
            assert tag in ("python", "bash", "console", "json", "text"), (page, tag)
            if tag != "text":
                assert (page, tag) in RUNS, f"no test runs {page}'s {tag} blocks: add one to RUNS"
                found.add((page, tag))
    assert found == set(RUNS)
    for test in set(RUNS.values()):
        path, name = test.split("::")
        with open(os.path.join(ROOT, path), encoding="utf-8") as f:
            assert f"\ndef {name}(" in f.read(), test


def notebook_cells(name: str) -> list[tuple[list[str], str]]:
    """(tags, source) of every code cell of notebooks/<name>.ipynb, in order."""
    with open(os.path.join(ROOT, "notebooks", name), encoding="utf-8") as f:
        nb = json.load(f)
    return [(c["metadata"].get("tags", []), "".join(c["source"])) for c in nb["cells"] if c["cell_type"] == "code"]


NOTEBOOKS = ("finetune.ipynb", "quickstart.ipynb", "tpu.ipynb")
NOTEBOOK_PARAMETERS = {  # set after each notebook's own parameters cell, as papermill injects them
    "quickstart.ipynb": {"AUDIO": "speech.wav", "DTYPE": "float32"},
    # made.wav is not there: the notebook writes the example clip there
    "tpu.ipynb": {"AUDIO": ["speech.wav", "made.wav"], "DTYPE": "float32", "BATCH_SIZE": 4, "MAX_NEW_TOKENS": 8},
}  # finetune.ipynb runs in test_finetune_notebook_makes_its_own_data_and_runs (and tests/training/test_finetune.py)


@pytest.mark.parametrize("name", sorted(NOTEBOOK_PARAMETERS))
def test_notebook_runs_from_its_install_cell(name, workdir, monkeypatch, capsys):
    """Every code cell, the install cell first: run from notebooks/ it finds this checkout (already installed, so
    pip is not run); the others run on the tiny checkpoint in the folder holding the example audio."""
    root, models = workdir
    cells = notebook_cells(name)
    assert cells[0][0] == ["install"] and "QASR_JAX_SOURCE" in cells[0][1]
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
        example = sf.read(example_audio())[0]  # written by the notebook, not uploaded
        np.testing.assert_allclose(sf.read(str(root / "made.wav"))[0], example, atol=1e-4)


def test_finetune_notebook_makes_its_own_data_and_runs(checkpoints, tmp_path_factory, tmp_path, monkeypatch):
    """finetune.ipynb in an empty folder: its install cell finds this checkout, it writes a small manifest of its
    own clips where none was uploaded (beside the manifest's path), trains LoRA adapters on it, folds them in,
    exports both layouts and evaluates. (Training every weight: the CLI tests of tests/training/test_finetune.py.)"""
    model = with_tokenizer(checkpoints("asr").hf, tmp_path_factory, "official")
    monkeypatch.setenv("QASR_JAX_COMPILATION_CACHE", "off")
    monkeypatch.chdir(tmp_path)
    namespace = run_code_cells(os.path.join(ROOT, "notebooks", "finetune.ipynb"), (
        f"MODEL = {model!r}\nTRAIN = 'data/train.jsonl'\nEVAL = 'data/dev.jsonl'\nOUTPUT = 'nb'\nSTEPS = 2\n"
        "BATCH_SIZE = 4\nGRAD_ACCUM = 1\nLR = 1e-3\nLORA_RANK = 4\nDTYPE = 'float32'\nMESH = None\n"))
    assert len(read_manifest("data/train.jsonl")) == 16 and namespace["before"]["n"] == namespace["after"]["n"] == 8
    assert int(namespace["state"].step) == 2
    assert namespace["folders"] == [os.path.join("nb", "model-hf"), os.path.join("nb", "model")]


SHIPPED_SOURCE = 'QASR_JAX_SOURCE = "git+https://github.com/<owner>/qasr-jax.git"'


def run_install_cell(name: str, source: str | None, monkeypatch) -> list[list[str]]:
    """Run ``name``'s install cell with QASR_JAX_SOURCE set to ``source`` as a user edits it (None: as shipped)
    -> the pip commands it ran (recorded, not run: no test installs anything)."""
    code = notebook_cells(name)[0][1]
    assert code.count(SHIPPED_SOURCE) == 1
    if source is not None:
        code = code.replace(SHIPPED_SOURCE, f"QASR_JAX_SOURCE = {source!r}")
    calls: list[list[str]] = []
    monkeypatch.setattr(subprocess, "check_call", lambda argv: calls.append(argv[argv.index("install") + 2:]))
    exec(compile(code, name, "exec"), {})
    return calls


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_install_cell_installs_only_the_source_it_is_given(name, tmp_path, monkeypatch):
    """Outside a checkout, as shipped, the install cell stops with what to set; given a folder or a git URL it
    installs that (with the extra it needs: "{folder}[train]", or "qasr-jax[train] @ URL"); a bare name, which pip
    would take from PyPI (where anyone could register it), is refused. It never falls back to the registry."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RuntimeError, match="qasr-jax is not on PyPI: set QASR_JAX_SOURCE"):
        run_install_cell(name, None, monkeypatch)
    for bare in ("qasr-jax", "qasr_jax[train]"):
        with pytest.raises(RuntimeError, match="QASR_JAX_SOURCE must be a git URL .* or a folder"):
            run_install_cell(name, bare, monkeypatch)
    extra = {"finetune.ipynb": "[train]"}.get(name, "")
    also = ["jax[tpu]"] if name == "tpu.ipynb" else []
    url = "git+https://example.org/me/qasr-jax.git"
    assert run_install_cell(name, url, monkeypatch) == [[f"qasr-jax{extra} @ {url}", *also]]
    assert run_install_cell(name, ROOT, monkeypatch) == [[f"{ROOT}{extra}", *also]]


REGISTRY_NAME = re.compile(r"qasr-jax(\[[\w,]*\])?([<>=!~].*)?")
TEMPLATE = re.compile(r"\$\{?(\w+)\}?(\[[\w,]*\])?|\{(\w+)\}(\[[\w,]*\])?")  # $NAME, ${NAME}, {NAME}


def registry_installs(text: str) -> list[str]:
    """The ``pip install`` commands in ``text`` that could install qasr-jax from PyPI: its bare name, or a variable
    other than QASR_JAX_SOURCE (which the docs and notebooks define as a git URL or a folder)."""
    found = []
    for line in text.splitlines():
        for part in re.split(r"&&|\|\||;", line):  # one shell command at a time
            if "pip install" not in part:
                continue
            for word in (w.strip("'\"`") for w in part.split("pip install", 1)[1].split()):
                template = TEMPLATE.fullmatch(word)
                if REGISTRY_NAME.fullmatch(word) or (template and "QASR_JAX_SOURCE" not in template.groups()):
                    found.append(part.strip())
    return found


def test_nothing_installs_qasr_jax_from_pypi():
    """No command of README.md or docs/ and no notebook line runs ``pip install qasr-jax``, nor installs a variable
    that may hold that name (finetune.ipynb's old ``%pip install "{SOURCE}[train]"`` with SOURCE falling back to
    "qasr-jax")."""
    for bad in ('%pip install -q "{SOURCE}[train]"', "pip install qasr-jax", "pip install 'qasr-jax[serve]>=0.1'",
                "pip install -q $SOURCE", "cd x && pip install -U qasr-jax[train]"):
        assert registry_installs(bad), bad
    assert not registry_installs("pip install -q 'jax[tpu]' '$QASR_JAX_SOURCE' && pip install \".[train]\"")
    texts = {page: read_page(page) for page in PAGES}
    texts.update({name: "\n".join(src for _, src in notebook_cells(name)) for name in NOTEBOOKS})
    for name, text in texts.items():
        assert not registry_installs(text), name


def test_readme_layout_lists_every_notebook():
    """The Layout section (docs/internals.md) names every notebook."""
    layout = read_page("docs/internals.md").split("## Layout", 1)[1].split("\n## ", 1)[0]
    assert sorted(os.listdir(os.path.join(ROOT, "notebooks"))) == list(NOTEBOOKS)
    assert all(name in layout for name in NOTEBOOKS)
