"""The README's and docs/ pages' code blocks, as the tests that run them read them."""

from __future__ import annotations

import os
import re

from qasr_jax.testing import ROOT


def substitute(text: str, models: dict[str, str]) -> str:
    for name in sorted(models, key=len, reverse=True):
        text = text.replace(name, models[name])
    return text


def read_page(page: str) -> str:
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        return f.read()


def fenced_blocks(page: str) -> list[tuple[str, str]]:
    """(language tag, text) of every fenced code block of ``page`` (README.md or docs/NAME.md), in order."""
    return re.findall(r"(?ms)^```(.*?)\n(.*?)^```$", read_page(page))


def page_blocks(page: str, lang: str) -> list[str]:
    """The ``lang`` code blocks of ``page``."""
    return [text for tag, text in fenced_blocks(page) if tag == lang]


def shell_commands(block: str, console: bool = False) -> list[str]:
    """The commands of a ``bash`` block (every line) or a ``console`` block (the lines after ``$ ``; the others are
    output), each split at ``&&``; a line ending in a backslash goes on in the next, and ``  # ...`` is a comment."""
    commands, line_so_far = [], None
    for line in block.splitlines():
        if line_so_far is not None:
            line = line_so_far + " " + line.strip()
        elif console:
            if not line.startswith("$ "):
                continue
            line = line[2:]
        if line.endswith("\\"):
            line_so_far = line[:-1].rstrip()
            continue
        line_so_far = None
        commands += [part.strip() for part in line.split("  #")[0].split("&&") if part.strip()]
    return commands


def is_install(command: str) -> bool:
    return command.startswith("pip install ")


def with_model(argv: list[str], models: dict[str, str]) -> list[str]:
    """``qasr-jax`` argv with ``--model`` added where it names none (the default model is a hub id)."""
    if "--model" not in argv:
        if argv[1] in ("transcribe", "detect-language", "stream"):
            return argv + ["--model", models["Qwen/Qwen3-ASR-0.6B"]]
        if argv[1] == "align":
            return argv + ["--model", models["Qwen/Qwen3-ForcedAligner-0.6B"]]
    return argv


def run_python_blocks(page: str, models: dict[str, str]) -> tuple[dict, int]:
    """Every python block of ``page`` in order, in one namespace -> (the namespace, how many blocks ran)."""
    namespace: dict = {}
    blocks = page_blocks(page, "python")
    for block in blocks:
        exec(compile(substitute(block, models), page, "exec"), namespace)
    return namespace, len(blocks)
