"""``qasr-jax env``: what a bug report needs, in one paste: versions, devices, installed extras, the compilation
cache."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import re
import sys

PACKAGES = ("qasr-jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "tokenizers", "transformers",
            "torch")
_EXTRA = re.compile(r"""extra\s*==\s*["']([^"']+)["']""")


def version(name: str) -> str | None:
    """The installed version of distribution ``name``, or None when it is not installed."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def extras() -> dict[str, list[str]]:
    """Each extra of qasr-jax -> the distributions it needs that are not installed (empty: the extra is there)."""
    out: dict[str, list[str]] = {}
    for requirement in importlib.metadata.requires("qasr-jax") or []:
        marker = _EXTRA.search(requirement)
        if marker is None:
            continue
        name = re.match(r"[A-Za-z0-9_.\-]+", requirement).group(0)
        missing = out.setdefault(marker.group(1), [])
        if name.lower() != "qasr-jax" and version(name) is None:  # qasr-jax[serve] inside test: listed on its own
            missing.append(name)
    return out


def cache_folder() -> tuple[str | None, str]:
    """The compilation cache the ``qasr-jax`` command uses (None when off) and where that setting comes from."""
    import jax

    from qasr_jax.decoding.compiles import CACHE_ENV, default_cache_dir

    if jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir, "jax_compilation_cache_dir"
    value = os.environ.get(CACHE_ENV)
    if value and value.strip().lower() in ("off", "0", "none", "false"):
        return None, f"{CACHE_ENV}={value}"
    return (os.path.expanduser(value), f"${CACHE_ENV}") if value else (default_cache_dir(), "default")


def folder_size(path: str) -> tuple[int, int]:
    """(files, bytes) under ``path`` (0, 0 when it does not exist)."""
    files = size = 0
    for folder, _, names in os.walk(path):
        for name in names:
            try:
                size += os.path.getsize(os.path.join(folder, name))
                files += 1
            except OSError:  # removed while we walk: another process pruning the cache
                pass
    return files, size


def report() -> list[str]:
    """The lines ``qasr-jax env`` prints."""
    lines = [f"python: {sys.version.split()[0]} ({platform.platform()})"]
    lines += [f"{name}: {version(name) or 'not installed'}" for name in PACKAGES]
    import jax

    lines.append(f"jax backend: {jax.default_backend()}")
    lines += [f"device {d.id}: {d.platform} {d.device_kind}" for d in jax.devices()]
    for extra, missing in sorted(extras().items()):
        lines.append(f"extra {extra}: " + (f"missing {', '.join(missing)}" if missing else "installed"))
    folder, source = cache_folder()
    if folder is None:
        lines.append(f"compilation cache: off ({source})")
    else:
        files, size = folder_size(folder)
        lines.append(f"compilation cache: {folder} ({source}): {files} files, {size / 2**20:.1f} MiB")
    return lines


def run(args: argparse.Namespace) -> int:
    """The ``env`` command."""
    print("\n".join(report()))
    return 0


def add_command(sub) -> None:
    """Add the ``env`` subcommand to the CLI's subparsers."""
    env = sub.add_parser("env", help="print versions, devices, installed extras and the compilation cache (for a "
                                     "bug report)")
    env.set_defaults(func=run)
