"""Memory and time of ``qasr_jax.load``: peak resident memory against the loaded parameters' bytes (issue 17).

Random-weight checkpoints of the real sizes (tests/reference.py), saved as the releases are: bf16 safetensors in
the -hf layout and in the official layout (sharded), and a float32 Orbax export made by ``qasr-jax convert``.
Each load runs in a fresh process, which reports

- its resident memory before loading (the runtime: python, jax, the CPU client) and at its peak (VmHWM),
- the bytes of the parameters it ended with (once, and as held by all devices: on a mesh a parameter replicated
  over the data axis is held once per replica), its resident memory after loading, and the seconds ``load`` took;

the target is a peak within 1.3x of the parameters held plus the runtime's own footprint.

    python benchmarks/bench_load.py [--presets asr-0.6b,asr-1.7b] [--work /tmp/qasr_bench_load]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from bench_slots import cpu_name

CHILD = r"""
import json, os, sys, time
import jax, jax.numpy as jnp

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
jax.device_put(jnp.zeros(1)).block_until_ready()  # the CPU client exists before the baseline is read
import qasr_jax
base = rss("VmRSS")
path, dtype, mesh = sys.argv[1], sys.argv[2], sys.argv[3] or None
t = time.perf_counter()
model = qasr_jax.load(path, dtype=dtype, mesh=mesh)
jax.block_until_ready(model.params)
seconds = time.perf_counter() - t
leaves = jax.tree_util.tree_leaves(model.params)
size = sum(x.size * x.dtype.itemsize for x in leaves)
held = sum(s.data.nbytes for x in leaves for s in x.addressable_shards)  # replicas on every device they live on
print(json.dumps({"base": base, "peak": rss("VmHWM"), "after": rss("VmRSS"), "params": size, "held": held,
                  "seconds": seconds}))
"""


BUILD = r"""
import sys
import torch
from qasr_jax.modeling.config import preset
from qasr_jax.testing.reference import build_reference, save_hf, save_official
cfg = preset(sys.argv[1])
ref = build_reference(cfg, seed=0)
save_hf(ref, sys.argv[2], dtype=torch.bfloat16)
save_official(ref, cfg, sys.argv[3], dtype=torch.bfloat16, shards=4)
"""


def checkpoints(preset: str, work: str) -> dict[str, str]:
    """The preset's -hf (bf16, one file), official (bf16, 4 shards) and Orbax (float32) folders, made if absent."""
    folder = os.path.join(work, preset)
    out = {name: os.path.join(folder, name) for name in ("hf", "official", "orbax")}
    if all(os.path.isdir(p) for p in out.values()):
        return out
    os.makedirs(work, exist_ok=True)
    # Each step in its own process, so that no two of the model's copies (torch's, the converter's) meet in memory.
    subprocess.run([sys.executable, "-c", BUILD, preset, out["hf"], out["official"]], check=True, cwd=work)
    subprocess.run([sys.executable, "-m", "qasr_jax.cli", "convert", out["hf"], out["orbax"], "--force"],
                   check=True, cwd=work)
    return out


def measure(path: str, dtype: str, mesh: str | None) -> dict:
    env = dict(os.environ)
    if mesh:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    # cwd: `python -c` puts it first on sys.path, and the checkout's kernels/ must not shadow the registry's.
    run = subprocess.run([sys.executable, "-c", CHILD, path, dtype, mesh or ""], env=env, cwd=os.path.dirname(path),
                         capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(f"loading {path} ({dtype}, mesh {mesh}) failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="asr-0.6b,asr-1.7b")
    parser.add_argument("--work", default="/tmp/qasr_bench_load", help="where the checkpoints are made and kept")
    args = parser.parse_args()
    gib = 2**30
    print(f"{cpu_name()}; jax {__import__('jax').__version__}; {time.strftime('%Y-%m-%d')}")
    print("| model | source | dtype | mesh | parameters (held) | runtime | peak | after | peak / (held + runtime) "
          "| load |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for preset in args.presets.split(","):
        ck = checkpoints(preset, args.work)
        # Meshes of 8 host devices; data=4 holds 4 replicas, which for the 1.7B would not fit 24 GiB of RAM.
        mesh = "data=4,model=2" if preset == "asr-0.6b" else "data=1,model=8"
        cases = [("hf", "float32", None), ("official", "float32", None), ("orbax", "float32", None),
                 ("hf", "bfloat16", None), ("orbax", "bfloat16", None), ("hf", "float32", mesh),
                 ("orbax", "float32", mesh)]
        for source, dtype, mesh in cases:
            r = measure(ck[source], dtype, mesh)
            ratio = r["peak"] / (r["held"] + r["base"])
            print(f"| {preset} | {source} | {dtype} | {mesh or '1 device'} | {r['params'] / gib:.2f} GiB "
                  f"({r['held'] / gib:.2f}) | {r['base'] / gib:.2f} GiB | {r['peak'] / gib:.2f} GiB | "
                  f"{r['after'] / gib:.2f} GiB | {ratio:.2f} | {r['seconds']:.1f} s |", flush=True)


if __name__ == "__main__":
    main()
