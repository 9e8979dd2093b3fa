"""Run a notebook's code cells in one namespace, as the tests and the multi-device check do."""

from __future__ import annotations

import json
import os


def run_code_cells(path: str, parameters: str) -> dict:
    """Execute the code cells of the notebook at ``path`` (magic and shell lines dropped, the cell tagged
    "parameters" replaced by ``parameters``, the cell tagged "install" run from the notebook's own folder, where
    Jupyter starts its kernel, so that it finds this checkout) and return the namespace they ran in."""
    with open(path, encoding="utf-8") as f:
        nb = json.load(f)
    namespace: dict = {}
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        tags = cell["metadata"].get("tags", [])
        source = parameters if "parameters" in tags else "".join(cell["source"])
        source = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("%", "!")))
        here = os.getcwd()
        if "install" in tags:
            os.chdir(os.path.dirname(os.path.abspath(path)))
        try:
            exec(compile(source, os.path.basename(path), "exec"), namespace)
        finally:
            os.chdir(here)
    return namespace
