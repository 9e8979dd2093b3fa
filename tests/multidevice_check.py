"""Facts about sharded runs on 8 forced CPU devices, written as one JSON report for tests/modeling/test_sharding.py.

The device count must be forced (``XLA_FLAGS=--xla_force_host_platform_device_count=8``) before jax is imported,
and the pytest process has already imported jax with one device, so the tests run this file in a subprocess:

    python tests/multidevice_check.py MODEL_DIR ORBAX_DIR WORK_DIR REPORT.json

It records facts, and the tests assert on them: token ids per mesh and preset next to the single-device ones,
every parameter's PartitionSpec next to the one derived here from the tables, per-device bytes during an
instrumented sharded load, compile events per program, the KV cache's shardings, and the TPU notebook's results.
"""

from __future__ import annotations

import collections
import json
import math
import os
import sys

if "xla_force_host_platform_device_count=8" not in os.environ.get("XLA_FLAGS", ""):
    sys.exit("run with XLA_FLAGS=--xla_force_host_platform_device_count=8 (set before jax is imported)")

import jax  # noqa: E402
import numpy as np  # noqa: E402


import qasr_jax  # noqa: E402
from qasr_jax.modeling import sharding  # noqa: E402
from qasr_jax.decoding.compiles import COMPILE_EVENT  # noqa: E402
from qasr_jax.testing import DATA, speech, synthetic  # noqa: E402
from qasr_jax.testing.notebook_run import run_code_cells  # noqa: E402
from qasr_jax.transcribe import Transcriber  # noqa: E402

NEW = 6  # new tokens per input
# (mesh, preset): the meshes the issue names, both presets on data=4,model=2, and FSDP.
CONFIGS = [("data=8", "data"), ("data=4,model=2", "data"), ("data=4,model=2", "tensor"), ("data=2,model=4", "tensor"),
           ("data=4,model=2", "fsdp")]


def batches() -> dict[str, list[np.ndarray]]:
    """Two batches inside one shape bucket (longest clip 7-8 s: 8 chunks of frames): 8 inputs (divides every data
    axis) and 5 (divides none)."""
    clips = [speech("hello_en.wav"), speech("zh.wav")] + [synthetic(s, i) for i, s in enumerate(
        (0.4, 1.0, 2.7, 3.3, 5.1, 7.9, 1.6, 7.6, 0.9))]
    return {"divides": clips[:8], "ragged": clips[8:] + clips[:2]}


class CompileLog:
    """Backend compile events by function name (jax passes fun_name to duration listeners)."""

    def __init__(self):
        self.names: list[str] = []
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event, duration, **kwargs):
        if event == COMPILE_EVENT:
            self.names.append(str(kwargs.get("fun_name")))

    def take(self) -> dict[str, int]:
        counts = collections.Counter(self.names)
        self.names.clear()
        return dict(counts)


def expected_spec(path: str, shape, mesh_shape: dict[str, int], rules, cfg) -> list:
    """The PartitionSpec the tables ask for, derived here independently of Layout.spec: logical axes from
    PARAM_AXES, mesh axes from the preset's rules; a dim is split only over mesh axes of size > 1 not used by an
    earlier dim, and only when its unit count (heads for fused head dims, else its size) divides."""
    axes = sharding.logical_axes(path, len(shape))
    heads = {"heads": cfg.text.heads, "kv_heads": cfg.text.kv_heads, "audio_heads": cfg.audio.heads}
    table = dict(rules)
    used, out = set(), []
    for dim, name in zip(shape, axes):
        target = table.get(name)
        if target is None or target in used or mesh_shape[target] == 1 or heads.get(name, dim) % mesh_shape[target]:
            out.append(None)
        else:
            used.add(target)
            out.append(target)
    while out and out[-1] is None:
        out.pop()
    return out


def spec_list(spec) -> list:
    out = [s if s is None or isinstance(s, str) else list(s) for s in spec]
    while out and out[-1] is None:
        out.pop()
    return out


def device_bytes() -> collections.Counter:
    """Bytes each device holds across every live jax array (from each array's shard shapes)."""
    held: collections.Counter = collections.Counter()
    for a in jax.live_arrays():
        shard = math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize
        for d in a.sharding.addressable_devices:
            held[d.id] += shard
    return held


def instrumented_load(model_dir: str, mesh: str, preset: str) -> dict:
    """``qasr_jax.load`` with jax.make_array_from_callback and jax.device_put wrapped: per-device bytes sampled
    before every shard callback and after every leaf (the peak, over a baseline taken before loading), the
    callback indices each leaf asked for, any device_put, and any single-device array as large as a whole sharded
    parameter."""
    real_make, real_put = jax.make_array_from_callback, jax.device_put
    base = device_bytes()
    peak: collections.Counter = collections.Counter()
    leaves, puts, whole_on_one = [], [], []
    sharded_shapes: set = set()

    def sample():
        now = device_bytes()
        for d in jax.devices():
            peak[d.id] = max(peak[d.id], now[d.id] - base[d.id])
        for a in jax.live_arrays():
            if len(a.sharding.device_set) == 1 and tuple(a.shape) in sharded_shapes:
                whole_on_one.append(str(a.shape))

    def make(shape, shard_to, callback, dtype=None):
        if not shard_to.is_fully_replicated:
            sharded_shapes.add(tuple(shape))
        asked = []

        def each(index):
            asked.append(str(index))
            sample()
            return callback(index)

        out = real_make(shape, shard_to, each, dtype)
        sample()
        wanted = {str(i) for i in shard_to.addressable_devices_indices_map(tuple(shape)).values()}
        leaves.append({"calls": len(asked), "devices": len(shard_to.addressable_devices),
                       "replicated": shard_to.is_fully_replicated, "asked_only_own_shards": set(asked) == wanted})
        return out

    def put(*args, **kwargs):
        puts.append(repr([getattr(a, "shape", None) for a in args])[:100])
        return real_put(*args, **kwargs)

    jax.make_array_from_callback, jax.device_put = make, put
    try:
        model = qasr_jax.load(model_dir, mesh=mesh, sharding=preset)
    finally:
        jax.make_array_from_callback, jax.device_put = real_make, real_put
    flat = jax.tree_util.tree_leaves(model.params)
    final: collections.Counter = collections.Counter()
    for p in flat:
        for d in p.sharding.addressable_devices:
            final[d.id] += math.prod(p.sharding.shard_shape(p.shape)) * p.dtype.itemsize
    return {
        "mesh": mesh, "preset": preset, "n_params": len(flat), "leaves": leaves, "device_puts": puts,
        "whole_on_one_device": whole_on_one, "peak": [peak[d.id] for d in jax.devices()],
        "final": [final[d.id] for d in jax.devices()], "model_bytes": sum(p.nbytes for p in flat),
    }


def param_report(model) -> dict:
    layout = model.layout
    rules = layout.rules
    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(model.params)[0]:
        name = sharding.param_path(path)
        out[name] = {"spec": spec_list(x.sharding.spec), "spec_str": str(x.sharding.spec), "shape": list(x.shape),
                     "table": expected_spec(name, x.shape, dict(layout.mesh.shape), rules, model.config),
                     "mesh": {k: int(v) for k, v in x.sharding.mesh.shape.items()}}
    return out


def ids(asr, waves, **kwargs) -> list[list[int]]:
    return [r.token_ids for r in asr.transcribe(waves, max_new_tokens=NEW, batch_size=8, **kwargs)]


def prompt_numerics(asr, waves) -> tuple[np.ndarray, np.ndarray]:
    """Encoder output and prefill logits for 8 rows through the Model's batched programs (sharded with a mesh)."""
    from qasr_jax.io.audio import log_mel_batch
    from qasr_jax.io.prompts import build_prompt_ids

    model = asr.model
    feats, n_frames = log_mel_batch(waves, pad_to=800)
    audio, n_tok = model.engine.encode(np.asarray(feats), n_frames)
    prompts = [build_prompt_ids(asr.tokenizer, int(n)) for n in np.asarray(n_tok)]
    ids = np.zeros((len(waves), 160), np.int32)
    mask = np.zeros(ids.shape, bool)
    for r, p in enumerate(prompts):
        ids[r, : len(p)], mask[r, : len(p)] = p, True
    logits, _ = model.engine.extend(model.engine.init_cache(len(waves), 224), model.engine.embed(ids, audio),
                                   np.asarray(mask).sum(1))
    return np.asarray(audio), np.asarray(logits)


def max_rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def one_input_logits(model) -> np.ndarray:
    """Model.logits on one input (batch 1: rows cannot split over data, weights still split over model)."""
    from qasr_jax.modeling.config import audio_token_count

    feats = model.log_mel(speech("hello_en.wav"))
    n = audio_token_count(feats.shape[1], model.config.audio)
    input_ids = [151644, 8948, 198, 151645, 198, 151644, 872, 198, 151669] + [151676] * n + [151670, 151645, 198]
    return model.logits(input_ids, feats)


def cache_report(model) -> dict:
    """Shardings of the KV cache and logits through the engine's explicitly sharded programs (batch of 8)."""
    cache = model.engine.init_cache(8, 96)
    embeds = np.zeros((8, 32, model.config.text.hidden_size), np.float32)
    mask = np.ones((8, 32), bool)
    logits, cache = model.engine.extend(cache, embeds, mask.sum(1))
    step_logits, cache = model.engine.step(cache, np.zeros(8, np.int32))
    try:
        model.engine.encode(np.zeros((3, 128, 800), np.float32), np.full(3, 800, np.int32))
        ragged = "no error"
    except ValueError as e:
        ragged = str(e)
    return {"kv": [spec_list(t.sharding.spec) for t in cache.k + cache.v],
            "lengths": spec_list(cache.lengths.sharding.spec),
            "logits": spec_list(logits.sharding.spec), "step_logits": spec_list(step_logits.sharding.spec),
            "ragged_batch_error": ragged}


def run_notebook(path: str, model_dir: str, audio: list[str], mesh: str) -> dict:
    """Execute the notebook's code cells (magics and shell lines dropped, the parameters cell replaced)."""
    namespace = run_code_cells(path, f"MODEL = {model_dir!r}\nAUDIO = {audio!r}\nMESH = {mesh!r}\nDTYPE = 'float32'\n"
                                     f"BATCH_SIZE = 8\nMAX_NEW_TOKENS = {NEW}\n")
    return {"sources": [r.source for r in namespace["results"]], "ids": [r.token_ids for r in namespace["results"]],
            "throughput": namespace["throughput"], "mesh": dict(namespace["mesh"].shape),
            "data_size": namespace["asr"].model.data_size}


def main(model_dir: str, orbax_dir: str, work_dir: str, report_path: str) -> None:
    report: dict = {"devices": jax.device_count()}
    # Loading first, while nothing else lives on the devices.
    report["loading"] = [instrumented_load(model_dir, "data=2,model=4", "tensor"),
                         instrumented_load(model_dir, "data=4,model=2", "fsdp")]
    log = CompileLog()
    data = batches()
    single = Transcriber.from_pretrained(model_dir)
    report["single"] = {name: ids(single, waves) for name, waves in data.items()}
    report["single_beam"] = ids(single, data["ragged"][:3], beam_size=2)
    want_audio, want_logits = prompt_numerics(single, data["divides"])
    log.take()
    report["meshes"] = []
    for mesh, preset in CONFIGS:
        asr = Transcriber.from_pretrained(model_dir, mesh=mesh, sharding=preset)
        log.take()  # loading may compile small helpers; count the transcription programs only
        entry = {"mesh": mesh, "preset": preset, "data_size": asr.model.data_size}
        entry["divides"] = ids(asr, data["divides"])
        entry["compiles_first"] = log.take()
        entry["ragged"] = ids(asr, data["ragged"])  # 5 inputs -> 8 rows: same bucket, padding rows dropped
        entry["compiles_second"] = log.take()
        entry["params"] = param_report(asr.model)
        entry["describe"] = sharding.describe(asr.model.params)
        audio, logits = prompt_numerics(asr, data["divides"])
        entry["encoder_rel_err"] = max_rel_err(audio, want_audio)
        entry["logits_rel_err"] = max_rel_err(logits, want_logits)
        if (mesh, preset) == ("data=4,model=2", "tensor"):
            entry["beam"] = ids(asr, data["ragged"][:3], beam_size=2)
            entry["cache"] = cache_report(asr.model)
            entry["one_input_rel_err"] = max_rel_err(one_input_logits(asr.model), one_input_logits(single.model))
        report["meshes"].append(entry)
        del asr
    orbax = Transcriber.from_pretrained(orbax_dir, mesh="data=2,model=4", sharding="tensor")
    report["orbax"] = {"ids": ids(orbax, data["divides"]), "params": param_report(orbax.model)}
    del orbax

    # The Pallas kernel (interpreted on CPU) under a mesh runs per shard (shard_map) and matches XLA on one device.
    from qasr_jax.io.audio import log_mel_batch
    from qasr_jax.modeling.config import load_config
    from qasr_jax.convert.checkpoint import load_hf_params
    from qasr_jax.loading import Model

    cfg = load_config(model_dir)
    feats, n_frames = log_mel_batch(data["divides"], pad_to=800)
    pallas = Model(cfg, load_hf_params(model_dir, cfg), attention_impl="pallas", interpret=True,
                   mesh="data=4,model=2", sharding="tensor")
    got, _ = pallas.engine.encode(np.asarray(feats), n_frames)
    want, _ = single.model.engine.encode(feats, n_frames)
    report["pallas_max_rel_err"] = float(np.abs(np.asarray(got) - np.asarray(want)).max() / np.abs(want).max())

    # The TPU notebook, run on this machine's 8 CPU devices with the tiny model.
    audio = [os.path.join(DATA, f) for f in ("hello_en.wav", "zh.wav")] + [os.path.join(work_dir, "clips")]
    os.makedirs(audio[-1], exist_ok=True)
    import soundfile as sf

    for i, wave in enumerate(data["ragged"][:2]):
        sf.write(os.path.join(audio[-1], f"clip{i}.wav"), wave, 16000)
    nb_path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks", "tpu.ipynb")
    report["notebook"] = run_notebook(nb_path, model_dir, audio, "data=4,model=2")
    report["notebook"]["single"] = ids(single, report["notebook"]["sources"])
    with open(report_path, "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main(*sys.argv[1:5])
