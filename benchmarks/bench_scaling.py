"""Scaling of batch transcription over devices: audio-seconds per second on 1, 2, 4 and 8 devices, data parallel
(``data=n``) and tensor parallel (``data=n/2,model=2``), the same clips and random weights for every run.

Weak scaling: the global batch is ``--batch-per-device`` rows for every device, all clips in one shape bucket and
decoding exactly ``--max-new-tokens`` tokens (random weights never say EOS), so every run does the same work per
device. Each run is checked against one device (token ids of the shared clips must be identical) and counts its
compilations: the warm-up compiles once per program, the timed calls (new lengths, same bucket) compile nothing.
Per device it prints the rows it holds and, where the backend reports memory (GPU, TPU), bytes in use and peak.

On CPU the 8 devices are forced (``--xla_force_host_platform_device_count=8``, set here before jax loads) and
share the same cores, so CPU figures show correctness and compile counts, not speed-up.

    python benchmarks/bench_scaling.py                         # tiny random model (a smoke run anywhere)
    python benchmarks/bench_scaling.py --preset asr-0.6b --batch-per-device 16 --seconds 20 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402


from qasr_jax.decoding.compiles import COMPILE_EVENT  # noqa: E402
from qasr_jax.io.tokenizer import Tokenizer  # noqa: E402
from qasr_jax.loading import Model  # noqa: E402
from qasr_jax.modeling.config import preset  # noqa: E402
from qasr_jax.modeling.model import param_shapes  # noqa: E402
from qasr_jax.modeling.sharding import make_mesh  # noqa: E402
from qasr_jax.transcribe import Transcriber  # noqa: E402



def random_params(cfg, dtype: str, seed: int = 0) -> dict:
    """Host numpy params of the config's shapes: normal(0, 0.02) weights, unit norm scales, zero biases."""
    rng = np.random.default_rng(seed)
    np_dtype = np.dtype(jax.numpy.dtype(dtype))

    def make(path, x):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        if name.endswith("scale"):
            return np.ones(x.shape, np_dtype)
        if name.endswith("bias"):
            return np.zeros(x.shape, np_dtype)
        return (0.02 * rng.standard_normal(x.shape, np.float32)).astype(np_dtype)

    return jax.tree_util.tree_map_with_path(make, param_shapes(cfg, dtype))


def clips(count: int, seconds: float, seed: int) -> list[np.ndarray]:
    """Noise + chirp clips of 0.6-1.0 x ``seconds`` (so all share one bucket), different for each seed."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        n = int(seconds * rng.uniform(0.6, 1.0) * 16000)
        t = np.arange(n) / 16000
        out.append((0.3 * np.sin(2 * np.pi * (200 + 900 * t) * t) + 0.05 * rng.standard_normal(n)).astype(np.float32))
    return out


class Compiles:
    """Counts backend compilations while registered."""

    def __init__(self):
        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event, duration, **kwargs):
        if event == COMPILE_EVENT:
            self.count += 1

    def take(self) -> int:
        n, self.count = self.count, 0
        return n


def memory(devices) -> str:
    """Per-device GB in use / peak, where the backend reports it."""
    stats = [d.memory_stats() for d in devices]
    if any(s is None for s in stats):
        return "n/a on " + devices[0].platform
    return " ".join(f"{s.get('bytes_in_use', 0) / 1e9:.2f}/{s.get('peak_bytes_in_use', 0) / 1e9:.2f}" for s in stats)


def run(asr: Transcriber, warm, timed, args, compiles: Compiles) -> dict:
    kw = dict(max_new_tokens=args.max_new_tokens, batch_size=len(warm))
    compiles.take()
    start = time.perf_counter()
    first = asr.transcribe(warm, **kw)
    compile_s = time.perf_counter() - start
    warm_compiles = compiles.take()
    walls = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        asr.transcribe(timed, **kw)
        walls.append(time.perf_counter() - start)
    audio = sum(w.shape[0] for w in timed) / 16000
    return {"ids": [r.token_ids for r in first], "rate": audio / min(walls), "wall": min(walls),
            "first_call": compile_s, "warm_compiles": warm_compiles, "timed_compiles": compiles.take()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", help="model config: tiny, asr-0.6b, asr-1.7b")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--devices", default="1,2,4,8", help="device counts to run (those present)")
    parser.add_argument("--batch-per-device", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=6.0, help="clip length (0.6-1.0 x this)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    from qasr_jax.testing.tokenizer_files import write_tokenizer

    devices = jax.local_devices()
    counts = [n for n in map(int, args.devices.split(",")) if n <= len(devices)]
    cfg = preset(args.preset)
    params = random_params(cfg, args.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer(tmp, "official")
        tok = Tokenizer.from_dir(tmp)
    print(f"# {args.preset} {args.dtype}, random weights; {len(devices)} x {devices[0].device_kind} "
          f"({jax.default_backend()}), {platform.processor() or platform.machine()}, jax {jax.__version__}")
    print(f"# weak scaling: {args.batch_per_device} rows per device, clips {0.6 * args.seconds:.1f}-"
          f"{args.seconds:.1f} s, {args.max_new_tokens} new tokens each; best of {args.repeats}")
    compiles = Compiles()
    most = args.batch_per_device * max(counts)
    warm_all, timed_all = clips(most, args.seconds, 1), clips(most, args.seconds, 2)
    # The reference: one device, no mesh, batches of --batch-per-device rows.
    single = Transcriber(Model(cfg, params, dtype=args.dtype), tok)
    baseline = [r.token_ids for r in single.transcribe(warm_all, max_new_tokens=args.max_new_tokens,
                                                       batch_size=args.batch_per_device)]
    del single
    print(f"{'devices':>7} {'mesh':>16} {'preset':>7} {'rows':>5} {'rows/dev':>8} {'audio-s/s':>10} "
          f"{'per device':>10} {'scaling':>7} {'1st call s':>10} {'compiles':>8} {'timed':>5} {'ids':>4}  "
          "memory GB in use/peak per device")
    one_device_rate = None
    for n in counts:
        for preset_name, spec in (("data", f"data={n}"), ("tensor", f"data={n // 2},model=2")):
            if preset_name == "tensor" and n < 2:
                continue
            mesh = make_mesh(spec, devices)
            asr = Transcriber(Model(cfg, params, dtype=args.dtype, mesh=mesh, sharding=preset_name), tok)
            rows = args.batch_per_device * n
            result = run(asr, warm_all[:rows], timed_all[:rows], args, compiles)
            if one_device_rate is None:
                one_device_rate = result["rate"] / n
            same = result["ids"] == baseline[:rows]
            print(f"{n:>7} {spec:>16} {preset_name:>7} {rows:>5} {rows // mesh.shape['data']:>8} "
                  f"{result['rate']:>10.1f} {result['rate'] / n:>10.1f} {result['rate'] / (n * one_device_rate):>7.2f} "
                  f"{result['first_call']:>10.1f} {result['warm_compiles']:>8} {result['timed_compiles']:>5} "
                  f"{'same' if same else 'DIFF':>4}  {memory(list(mesh.devices.flat))}", flush=True)
            del asr
    print("# scaling: audio-s/s over (devices x the 1-device audio-s/s); compiles: in the first call (all programs "
          "of the bucket); timed: in the timed calls (new lengths, same bucket; 0 expected); ids: token ids equal "
          "to one device without a mesh")


if __name__ == "__main__":
    main()
