"""The import paths that modules had before 0.2.0, when every module sat at the top of ``qasr_jax``.

Each old path still imports, as the very module at its new path (so ``qasr_jax.engine is
qasr_jax.decoding.engine``), and warns once per process with a ``DeprecationWarning``; they go away in 0.3.0
(CHANGELOG.md). ``qasr_jax.streaming``, ``training``, ``cli`` and ``vad`` became packages of the same name, which
re-export their public names.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {  # old module under qasr_jax. -> its new home under qasr_jax.
    "model": "modeling.model", "encoder": "modeling.encoder", "config": "modeling.config", "axes": "modeling.axes",
    "quant": "modeling.quant", "sharding": "modeling.sharding", "engine": "decoding.engine",
    "search": "decoding.search", "processors": "decoding.processors", "hotwords": "decoding.hotwords",
    "buckets": "decoding.buckets", "slots": "decoding.slots", "pipeline": "decoding.pipeline",
    "compiles": "decoding.compiles", "language": "decoding.language", "longform": "decoding.longform",
    "stream_audio": "streaming.audio", "stream_prompts": "streaming.prompts", "finetune": "training.finetune",
    "data": "training.data", "evaluation": "training.evaluation", "cli_env": "cli.env",
    "cli_language": "cli.language", "cli_options": "cli.options", "cli_stream": "cli.stream",
    "cli_train": "cli.train", "cli_warmup": "cli.warmup", "audio": "io.audio", "tokenizer": "io.tokenizer",
    "prompts": "io.prompts", "units": "io.units", "formats": "io.formats", "results": "io.results", "hub": "io.hub",
    "progress": "io.progress", "vad_rules": "vad.rules", "server.command": "cli.serve",
}


class _OldPaths(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``qasr_jax.<old>`` and loads it as the module at its new path."""

    def find_spec(self, fullname, path=None, target=None):
        old = fullname.partition("qasr_jax.")[2]
        if fullname.startswith("qasr_jax.") and old in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        new = "qasr_jax." + MOVED[spec.name.partition("qasr_jax.")[2]]
        warnings.warn(f"{spec.name} moved to {new} in qasr-jax 0.2.0; the old path goes away in 0.3.0",
                      DeprecationWarning, stacklevel=2)
        module = importlib.import_module(new)
        spec.loader_state = module.__spec__
        return module

    def exec_module(self, module):
        # Importing set the module's __spec__ to the old name's spec: give the module its own back.
        module.__spec__ = module.__spec__.loader_state


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once): before the path finder, which would take the old name
    ``qasr_jax.data`` for the package-data folder of that name."""
    if not any(isinstance(f, _OldPaths) for f in sys.meta_path):
        sys.meta_path.insert(0, _OldPaths())
