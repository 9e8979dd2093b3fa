"""The first ``qasr-jax transcribe`` on a fresh machine: wall time of the whole command, nothing cached.

Each run is a new process with an empty numba cache (``NUMBA_CACHE_DIR``) and an empty XLA compilation cache, so
it pays what a new user pays once: imports, any numba compilation, loading, XLA compilation and the transcript.
The model is the tiny random-weight test checkpoint (built here), so the figures are the fixed costs of a run,
not the model's speed. Two inputs: a 16 kHz wav (no resampling) and a 44.1 kHz stereo flac (resampled).

    python benchmarks/bench_first_run.py [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import soundfile as sf

from qasr_jax.modeling.config import preset  # noqa: E402
from qasr_jax.testing import DATA  # noqa: E402
from qasr_jax.testing.reference import build_reference, save_official  # noqa: E402
from qasr_jax.testing.tokenizer_files import write_tokenizer  # noqa: E402

# Prints whether librosa and numba were imported, after the command ran in this same process.
PROBE = ("import sys; from qasr_jax.cli.core import main; code = main(sys.argv[1:]); "
         "print('modules:', 'librosa' in sys.modules, 'numba' in sys.modules, file=sys.stderr); sys.exit(code)")


def first_run(argv: list[str], scratch: str) -> tuple[float, str]:
    """Seconds for one cold ``qasr-jax`` run of ``argv``, and the probe's line (librosa, numba imported)."""
    env = {**os.environ, "NUMBA_CACHE_DIR": tempfile.mkdtemp(dir=scratch),
           "QASR_JAX_COMPILATION_CACHE": tempfile.mkdtemp(dir=scratch)}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PROBE, *argv], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"qasr-jax {' '.join(argv)} failed:\n{proc.stderr[-3000:]}")
    return wall, next(line for line in proc.stderr.splitlines() if line.startswith("modules:"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="cold runs per input (median reported)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        cfg = preset("tiny")
        model = os.path.join(scratch, "tiny")
        save_official(build_reference(cfg), cfg, model)
        write_tokenizer(model, "official")
        wav = os.path.join(DATA, "hello_en.wav")
        mono, _ = sf.read(wav, dtype="float32")
        t44 = np.interp(np.arange(int(len(mono) * 44100 / 16000)) * 16000 / 44100, np.arange(len(mono)), mono)
        flac = os.path.join(scratch, "hello_44k.flac")
        sf.write(flac, np.stack([t44, t44], axis=1), 44100)
        for name, path in (("16 kHz wav", wav), ("44.1 kHz stereo flac", flac)):
            argv = ["transcribe", path, "--model", model, "--max-new-tokens", "8"]
            runs = [first_run(argv, scratch) for _ in range(args.runs)]
            walls = [w for w, _ in runs]
            print(f"{name}: first run {statistics.median(walls):.1f} s (median of {len(walls)}: "
                  f"{', '.join(f'{w:.1f}' for w in walls)}); librosa, numba imported: {runs[0][1][9:]}")


if __name__ == "__main__":
    main()
