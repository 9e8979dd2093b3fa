"""The checkout's top-level kernels/ and convert/ folders never shadow registry packages of the same names.

transformers >= 5.25 imports the registry package ``kernels``; our ``kernels/`` folder is the source of
``qasr_jax.kernels`` and must only ever be imported under that name. ``python -m pytest`` from the repository root
puts the root first on sys.path (conftest.py takes it off), and benchmarks run as scripts from the root.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys

from qasr_jax.testing import ROOT


def _inside_our_folder(path: str | None, folder: str) -> bool:
    # A virtual environment may live inside the checkout (CI's .venv-ci does): only our own folder is a shadow.
    return path is not None and os.path.abspath(path).startswith(os.path.join(ROOT, folder, ""))


def test_test_process_resolves_registry_kernels_not_our_folder():
    assert ROOT not in [os.path.abspath(p or os.curdir) for p in sys.path]
    hub_kernels = importlib.import_module("transformers.integrations.hub_kernels")  # the import that broke
    kernels = sys.modules.get("kernels") or importlib.import_module("kernels")
    assert not _inside_our_folder(kernels.__file__, "kernels"), kernels.__file__
    assert hasattr(kernels, "CUDAProperties") and hub_kernels is not None
    spec = importlib.util.find_spec("convert")
    assert spec is None or not any(_inside_our_folder(p, "convert")
                                   for p in [spec.origin, *(spec.submodule_search_locations or [])])
    # Our folders are reached only through the package names they are installed as.
    for name, folder in (("qasr_jax.kernels.windowed_attention", "kernels"), ("qasr_jax.convert.checkpoint", "convert")):
        module = importlib.import_module(name)
        assert os.path.dirname(os.path.abspath(module.__file__)) == os.path.join(ROOT, folder)


def test_benchmark_process_from_the_root_imports_the_reference():
    # bench_transcribe imports the transformers reference at module level, which imports the registry's kernels.
    proc = subprocess.run([sys.executable, os.path.join("benchmarks", "bench_transcribe.py"), "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "usage" in proc.stdout
