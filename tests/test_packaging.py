"""The checkout's top-level kernels/ and convert/ folders never shadow registry packages of the same names.

transformers >= 5.25 imports the registry package ``kernels``; our ``kernels/`` folder is the source of
``qasr_jax.kernels`` and must only ever be imported under that name. ``python -m pytest`` from the repository root
puts the root first on sys.path (conftest.py takes it off), and benchmarks run as scripts from the root.
"""

from __future__ import annotations

import ast
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


def test_the_library_is_layered_into_documented_subpackages():
    """At most 14 modules at the top of qasr_jax, the rest in at least five subpackages, each saying in its
    docstring what it owns and naming each of its modules."""
    package = os.path.join(ROOT, "qasr_jax")
    top = [f for f in os.listdir(package) if f.endswith(".py")]
    subpackages = sorted(d for d in os.listdir(package) if os.path.isfile(os.path.join(package, d, "__init__.py")))
    assert len(top) <= 14, sorted(top)
    assert {"cli", "decoding", "io", "modeling", "server", "streaming", "training", "vad"} <= set(subpackages)
    for name in subpackages:
        sub = importlib.import_module(f"qasr_jax.{name}")
        modules = [f[:-3] for f in os.listdir(os.path.join(package, name))
                   if f.endswith(".py") and not f.startswith("_")]
        missing = [m for m in modules if f"``{m}``" not in (sub.__doc__ or "")]
        assert not missing, f"qasr_jax.{name}'s docstring does not say what {missing} own"


def test_old_module_paths_are_the_moved_modules_and_warn_once(tmp_path):
    """Research code importing a module by its pre-0.2.0 path gets the very module at its new path, with one
    DeprecationWarning naming the new path; every new path in the table exists."""
    from qasr_jax._moved import MOVED

    for new in MOVED.values():
        assert importlib.import_module(f"qasr_jax.{new}").__name__ == f"qasr_jax.{new}"
    code = "\n".join([
        "import warnings",
        "warnings.simplefilter('always')",
        "with warnings.catch_warnings(record=True) as caught:",
        "    import qasr_jax.engine as old",
        "    from qasr_jax import engine as again",
        "    import qasr_jax.data as data",
        "import qasr_jax.decoding.engine as new, qasr_jax.training.data as new_data",
        "assert old is new is again and data is new_data, (old, new, again, data)",
        "assert new.__spec__.name == 'qasr_jax.decoding.engine'",
        "for w in caught:",
        "    print(w.category.__name__, w.message)",
    ])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "DeprecationWarning qasr_jax.engine moved to qasr_jax.decoding.engine in qasr-jax 0.2.0; the old path goes "
        "away in 0.3.0",
        "DeprecationWarning qasr_jax.data moved to qasr_jax.training.data in qasr-jax 0.2.0; the old path goes away in "
        "0.3.0",
    ]


def test_no_block_of_six_lines_repeats_across_the_library(tmp_path):
    """pylint's duplicate-code check over the library's sources (imports, docstrings and comments ignored): logic
    that repeats is written once and called."""
    folders = [os.path.join(ROOT, d) for d in ("qasr_jax", "convert", "kernels")]
    out = subprocess.run(
        [sys.executable, "-m", "pylint", "--disable=all", "--enable=duplicate-code", "--min-similarity-lines=6",
         "--ignore-imports=yes", "--ignore-docstrings=yes", "--ignore-comments=yes", "--score=no", *folders],
        capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr


# Each part of the library and the rank of its layer: a module may import its own part and parts of lower rank.
LAYERS = {
    "io": 0, "kernels": 1, "modeling": 1, "convert": 2, "decoding": 2, "vad": 3, "streaming": 3, "loading": 3,
    "aligner": 4, "transcribe": 5, "training": 6, "server": 6, "cli": 7, "testing": 8,
}


def _part(module: str) -> str | None:
    """The part of the library a dotted module name under qasr_jax belongs to (None: the package itself)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "qasr_jax" else None


def test_no_module_imports_a_layer_above_its_own():
    """command line -> server, streaming, training -> transcription -> decoding -> model -> text and audio edges:
    every import in the library (function-level ones too) goes down or stays in its part."""
    upward = []
    for folder, part_of in (("qasr_jax", None), ("convert", "convert"), ("kernels", "kernels")):
        for path, _, files in os.walk(os.path.join(ROOT, folder)):
            for f in files:
                if not f.endswith(".py") or f in ("__init__.py", "_moved.py") and path.endswith(folder):
                    continue
                rel = os.path.relpath(os.path.join(path, f), os.path.join(ROOT, folder)).replace(os.sep, "/")
                own = part_of or rel.split("/")[0].removesuffix(".py")
                with open(os.path.join(path, f), encoding="utf-8") as fh:
                    tree = ast.parse(fh.read())
                for node in ast.walk(tree):
                    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("qasr_jax"):
                        names = ([f"{node.module}.{a.name}" for a in node.names] if node.module == "qasr_jax"
                                 else [node.module])
                    elif isinstance(node, ast.Import):
                        names = [a.name for a in node.names if a.name.startswith("qasr_jax")]
                    else:
                        continue
                    for name in names:
                        part = _part(name)
                        if part in LAYERS and part != own and LAYERS[part] > LAYERS[own]:
                            upward.append(f"{folder}/{rel}:{node.lineno} ({own}) imports {name} ({part})")
    assert set(LAYERS) >= {d for d in os.listdir(os.path.join(ROOT, "qasr_jax"))
                           if os.path.isfile(os.path.join(ROOT, "qasr_jax", d, "__init__.py"))}
    assert not upward, "\n".join(upward)
