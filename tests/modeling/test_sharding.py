"""Scale-out: the sharding tables, meshes, host shares and CLI inputs here; sharded runs in subprocesses.

A forced device count must be set before jax is imported, and this process already runs jax on one device, so the
8-device facts come from ``tests/multidevice_check.py`` run once in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``; the tests below assert on its report. The many-host test
starts two CLI processes joined by ``jax.distributed`` on this machine.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys

import jax
import pytest
from jax.sharding import AbstractMesh, AxisType, PartitionSpec

from qasr_jax.cli.options import expand_inputs
from qasr_jax.modeling import sharding
from qasr_jax.modeling.config import load_config, preset
from qasr_jax.modeling.model import param_shapes
from qasr_jax.testing import DATA, ROOT, tiny_variant
from qasr_jax.testing.tokenizer_files import write_tokenizer

EIGHT = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}


def _param_count(cfg) -> int:
    """Parameters of a tied-head ASR model, counted by hand: per encoder layer q, k, v, o, fc1, fc2 kernels and
    biases plus two LayerNorms' scale and bias; three convs' kernel and bias, conv_out, ln_post, the projector's
    two Linears; per decoder layer qkv, o, gate_up, down and four norm scales; the embedding and the final norm."""
    return cfg.audio.layers * (12 + 4) + 6 + 1 + 2 + 4 + cfg.text.layers * 8 + 2


N_PARAMS = _param_count(tiny_variant("asr"))


def abstract_layout(data: int, model: int, preset_name: str) -> sharding.Layout:
    """A Layout on an abstract mesh: specs need only the axis sizes, not devices."""
    mesh = AbstractMesh((data, model), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 2)
    return sharding.Layout(mesh, sharding.PRESETS[preset_name])


def flat_specs(cfg, layout) -> dict[str, PartitionSpec]:
    specs = sharding.param_specs(param_shapes(cfg), layout, cfg)
    return {sharding.param_path(p): s for p, s in jax.tree_util.tree_flatten_with_path(
        specs, is_leaf=lambda x: isinstance(x, PartitionSpec))[0]}


# ----------------------------------------------------------------------------------------------------------------
# Tables, meshes, shares and inputs (this process, one device)
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny", "asr-0.6b", "asr-1.7b", "aligner-0.6b"])
def test_every_parameter_has_exactly_one_logical_axes_entry(name):
    cfg = preset(name)
    for path, x in jax.tree_util.tree_flatten_with_path(param_shapes(cfg))[0]:
        key = sharding.param_path(path)
        matches = [axes for pattern, axes in sharding.PARAM_AXES if re.fullmatch(pattern, key)]
        assert len(matches) == 1, (key, matches)
        assert len(matches[0]) == x.ndim, (key, matches[0], x.shape)
    for kind in ("asr-untied", "aligner"):
        flat_specs(tiny_variant(kind), abstract_layout(2, 4, "tensor"))  # lm_head and score are covered too


def test_presets_on_the_released_sizes():
    """Heads split only by whole heads: the 0.6B encoder's 14 heads stay whole over 4 devices, the 1.7B's 16 split;
    the decoder's 8 KV heads split over 8; FSDP adds the embedding width over data; "data" replicates all."""
    s06 = flat_specs(preset("asr-0.6b"), abstract_layout(2, 4, "tensor"))
    assert s06["audio_tower/layers_3/q/kernel"] == PartitionSpec(None, None)
    assert s06["audio_tower/layers_3/fc1/kernel"] == PartitionSpec(None, "model")
    assert s06["decoder/layers_5/qkv/kernel"] == PartitionSpec(None, "model", None, None)  # by kv head
    assert s06["decoder/layers_5/o/kernel"] == PartitionSpec("model", None)
    assert s06["decoder/layers_5/down/kernel"] == PartitionSpec("model", None)
    assert s06["decoder/embed/embedding"] == PartitionSpec("model", None)
    s17 = flat_specs(preset("asr-1.7b"), abstract_layout(1, 8, "tensor"))
    assert s17["audio_tower/layers_0/q/kernel"] == PartitionSpec(None, "model")
    assert s17["decoder/layers_27/qkv/kernel"] == PartitionSpec(None, "model", None, None)
    assert flat_specs(preset("aligner-0.6b"), abstract_layout(2, 4, "tensor"))["score/kernel"] == PartitionSpec(
        None, "model")
    fsdp = flat_specs(preset("asr-1.7b"), abstract_layout(4, 2, "fsdp"))
    assert fsdp["decoder/layers_0/gate_up/kernel"] == PartitionSpec("data", None, "model")
    assert fsdp["decoder/embed/embedding"] == PartitionSpec("model", "data")
    assert fsdp["decoder/layers_0/q_norm/scale"] == PartitionSpec(None)
    assert all(s == PartitionSpec(*[None] * len(s)) for s in
               flat_specs(preset("asr-1.7b"), abstract_layout(8, 1, "data")).values())
    # Activations: batch on data; a dim that does not divide stays whole; a mesh axis is used once.
    layout = abstract_layout(4, 2, "fsdp")
    assert layout.spec(("batch", "length", "embed"), (8, 10, 48)) == PartitionSpec("data", None, None)
    assert layout.spec(("batch", "length", "kv_heads", None), (6, 10, 3, 16)) == PartitionSpec(None, None, None, None)


def test_mesh_strings_and_errors():
    assert sharding.parse_mesh_spec("data=4,model=2") == {"data": 4, "model": 2}
    assert sharding.parse_mesh_spec(" model=2 ") == {"model": 2}
    for bad, words in [("gpu=2", "data=N"), ("data=x", "not an integer"), ("data=0", "positive"), ("", "empty"),
                       ("data=2,data=2", "each once")]:
        with pytest.raises(ValueError, match=words):
            sharding.parse_mesh_spec(bad)
    mesh = sharding.make_mesh(None)  # this process: one CPU device
    assert dict(mesh.shape) == {"data": 1, "model": 1} and mesh.axis_types == (AxisType.Auto,) * 2
    with pytest.raises(ValueError, match="needs 2 devices"):
        sharding.make_mesh("data=2")
    with pytest.raises(ValueError, match="only one axis"):
        sharding.make_mesh("data=-1,model=-1")
    with pytest.raises(ValueError, match="unknown sharding preset 'bogus'"):
        sharding.make_layout("data=1", "bogus")
    explicit = jax.make_mesh((1,), ("data",), axis_types=(AxisType.Explicit,))
    layout = sharding.make_layout(explicit)  # a user's mesh: the missing model axis added, Auto mode
    assert layout.mesh.axis_names == sharding.MESH_AXES and layout.mesh.axis_types == (AxisType.Auto,) * 2
    assert layout.rules == sharding.PRESETS["data"]


def test_host_shares_are_disjoint_and_cover_the_inputs():
    items = [f"f{i}.wav" for i in range(11)]
    shares = [sharding.host_share(items, i, 4) for i in range(4)]
    assert sorted(sum(shares, [])) == sorted(items) and [len(s) for s in shares] == [3, 3, 3, 2]
    assert sharding.host_share(items) == items  # one process
    with pytest.raises(ValueError, match="outside"):
        sharding.host_share(items, 4, 4)


def test_cli_inputs_from_folders_and_manifests(tmp_path):
    (tmp_path / "rec" / "day1").mkdir(parents=True)
    for name in ("rec/day1/a.wav", "rec/b.flac", "rec/notes.md", "x.mp3"):
        (tmp_path / name).write_bytes(b"")
    manifest = tmp_path / "list.txt"
    manifest.write_text("# corpus\nx.mp3\n\nrec/b.flac\n")
    got = expand_inputs([str(tmp_path / "rec"), str(manifest), str(tmp_path / "x.mp3")])
    assert got == [(str(tmp_path / "rec/b.flac"), "b"), (str(tmp_path / "rec/day1/a.wav"), os.path.join("day1", "a")),
                   (str(tmp_path / "x.mp3"), "x"), (str(tmp_path / "rec/b.flac"), os.path.join("rec", "b")),
                   (str(tmp_path / "x.mp3"), "x")]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no audio files"):
        expand_inputs([str(tmp_path / "empty")])


# ----------------------------------------------------------------------------------------------------------------
# 8 forced CPU devices (subprocess)
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(checkpoints, tmp_path_factory):
    """The tiny ASR checkpoint (official layout, 2 shards) with the real tokenizer, and its Orbax export."""
    root = tmp_path_factory.mktemp("sharded")
    folder = str(root / "ckpt")
    shutil.copytree(checkpoints("asr").official, folder)
    write_tokenizer(folder, "official")
    from qasr_jax.convert.checkpoint import load_hf_params
    from qasr_jax.convert.orbax_io import save_orbax

    cfg = load_config(folder)
    save_orbax(str(root / "orbax"), load_hf_params(folder, cfg), cfg, copy_from=folder)
    return root


@pytest.fixture(scope="module")
def report(model_dir):
    """tests/multidevice_check.py's report (see its docstring), from one run on 8 forced CPU devices."""
    out = model_dir / "report.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests", "multidevice_check.py"), str(model_dir / "ckpt"),
         str(model_dir / "orbax"), str(model_dir), str(out)],
        env={**os.environ, **EIGHT}, capture_output=True, text=True, timeout=900, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(out) as f:
        return json.load(f)


def test_sharded_token_ids_equal_one_device(report):
    """data=8, data=4 x model=2 and data=2 x model=4, data-parallel, tensor-parallel and FSDP, from safetensors and
    from Orbax: the same token ids as one device for 8 inputs (divide every data axis) and 5 (divide none: padded,
    padding dropped), greedy and beam; encoder outputs and prompt logits agree to float32 rounding."""
    assert report["devices"] == 8
    single = report["single"]
    assert len(single["divides"]) == 8 and len(single["ragged"]) == 5 and all(single["divides"])
    seen = set()
    for m in report["meshes"]:
        seen.add((m["mesh"], m["preset"]))
        assert m["divides"] == single["divides"], m["mesh"]
        assert m["ragged"] == single["ragged"], m["mesh"]
        assert m["encoder_rel_err"] <= 1e-5 and m["logits_rel_err"] <= 1e-5, m
        assert m["data_size"] == int(m["mesh"].split(",")[0].split("=")[1])
    assert {("data=8", "data"), ("data=4,model=2", "tensor"), ("data=2,model=4", "tensor"),
            ("data=4,model=2", "data"), ("data=4,model=2", "fsdp")} <= seen
    tp = next(m for m in report["meshes"] if "beam" in m)
    assert tp["beam"] == report["single_beam"]
    assert tp["one_input_rel_err"] <= 1e-5  # Model.logits on one input: weights split, the row whole
    assert report["orbax"]["ids"] == single["divides"]


def test_every_parameter_sharding_matches_the_rules_table(report):
    """Each loaded array's ``.sharding.spec`` equals the spec derived from PARAM_AXES and the preset's rules (by
    tests/multidevice_check.py's own derivation); anchors for the tiny model (4 heads, 2 KV heads) spelled out."""
    entries = [(m["mesh"], m["preset"], m["params"]) for m in report["meshes"]]
    entries.append(("data=2,model=4", "tensor (orbax)", report["orbax"]["params"]))
    for mesh, preset_name, params in entries:
        assert len(params) == N_PARAMS
        for name, p in params.items():
            assert p["spec"] == p["table"], (mesh, preset_name, name, p)
            assert p["mesh"] == {"model": 1, **sharding.parse_mesh_spec(mesh)}, (mesh, p["mesh"])
    tp = next(m["params"] for m in report["meshes"] if (m["mesh"], m["preset"]) == ("data=2,model=4", "tensor"))
    assert tp["decoder/layers_1/qkv/kernel"]["spec"] == []  # q|k|v by kv head: 2 KV heads do not split 4 ways
    assert tp["decoder/layers_1/o/kernel"]["spec"] == ["model"]  # 4 heads over 4 devices
    assert tp["decoder/layers_0/gate_up/kernel"]["spec"] == [None, None, "model"]
    assert tp["decoder/embed/embedding"]["spec"] == ["model"]
    assert tp["audio_tower/layers_0/fc1/bias"]["spec"] == ["model"]
    fsdp = next(m["params"] for m in report["meshes"] if m["preset"] == "fsdp")
    assert fsdp["decoder/layers_0/gate_up/kernel"]["spec"] == ["data", None, "model"]
    assert fsdp["decoder/layers_0/qkv/kernel"]["spec"] == ["data", "model"]  # 2 KV heads over model=2
    # describe() prints the same layout, one line per parameter, on every mesh.
    for m in report["meshes"]:
        lines = {line.split()[0]: line for line in m["describe"]}
        assert len(lines) == N_PARAMS
        for name, p in m["params"].items():
            assert lines[name].endswith(p["spec_str"]), (m["mesh"], name)
    dp = next(m["params"] for m in report["meshes"] if m["mesh"] == "data=8")
    assert all(p["spec"] == [] for p in dp.values())


def test_loading_never_puts_a_whole_parameter_on_one_device(report):
    """CPU devices report no memory_stats, so the proof is by instrumentation of ``qasr_jax.load(mesh=...)``:
    every parameter is created by ``jax.make_array_from_callback`` (one callback per device, each asking only for
    that device's own shard, sliced from the host numpy array; one for a replicated parameter, which jax copies
    to each device), nothing calls ``jax.device_put``, no live single-device array ever has the shape of a sharded
    parameter, and the bytes each device holds, summed over all live arrays before every shard callback and after
    every parameter, never exceed what it holds at the end: its own shards (a quarter of the model for tensor
    parallel over 4, an eighth for FSDP over 8)."""
    for load in report["loading"]:
        assert len(load["leaves"]) == load["n_params"] == N_PARAMS
        for leaf in load["leaves"]:  # jax reads a replicated parameter once and copies it to each device
            assert leaf["asked_only_own_shards"] and leaf["devices"] == 8
            assert leaf["calls"] == (1 if leaf["replicated"] else 8)
        assert sum(not leaf["replicated"] for leaf in load["leaves"]) >= 12
        assert load["device_puts"] == [] and load["whole_on_one_device"] == []
        assert load["peak"] == load["final"]
        share = {"tensor": 4, "fsdp": 8}[load["preset"]]
        assert max(load["final"]) < load["model_bytes"] / share * 1.05


def test_one_compilation_per_bucket_per_mesh(report):
    """Per mesh: the log-mel + encoder + embedding program and the slot programs compile once for the first batch; a
    second batch in the same bucket (new lengths, 5 inputs padded to the same 8 rows) compiles nothing at all."""
    programs = {f"jit({p})" for p in ("embed_waves", "new_state", "insert", "advance", "results", "release")}
    for m in report["meshes"]:
        first = m["compiles_first"]
        assert {p: first.get(p) for p in programs} == {p: 1 for p in programs}, (m["mesh"], first)
        assert set(first) <= programs | {"jit(_multi_slice)"}, first
        assert m["compiles_second"] == {}, (m["mesh"], m["compiles_second"])


def test_kv_cache_and_logits_are_sharded(report):
    """Engine.init_cache / extend / step (explicit in/out shardings) on data=4 x model=2: the cache has rows on data
    and its 2 KV heads on model; logits have rows on data and the vocabulary on model; a batch of 3 rows is
    refused with a message that says to pad."""
    cache = next(m["cache"] for m in report["meshes"] if "cache" in m)
    # each layer's (slots, kv_heads, ...) buffer, or scan mode's one (layers, slots, kv_heads, ...) with layers whole
    assert cache["kv"] and all(s[-2:] == ["data", "model"] and not any(s[:-2]) for s in cache["kv"])
    assert cache["lengths"] == ["data"]
    assert cache["logits"] == cache["step_logits"] == ["data", "model"]
    assert "3 rows does not divide" in cache["ragged_batch_error"] and "pad" in cache["ragged_batch_error"]


def test_pallas_attention_runs_per_shard(report):
    """The Pallas encoder kernel (interpreted on CPU) under a data=4 x model=2 mesh runs inside shard_map, one
    piece of rows and heads per device, and matches XLA attention on one device."""
    assert report["pallas_max_rel_err"] <= 1e-5


def test_tpu_notebook_runs_on_eight_devices(report):
    nb = report["notebook"]
    assert nb["mesh"] == {"data": 4, "model": 2} and nb["data_size"] == 4
    assert len(nb["ids"]) == 8 and nb["ids"] == nb["single"] and nb["throughput"] > 0
    assert sum(os.path.basename(s).startswith("clip") for s in nb["sources"]) == 4  # the folder was read


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_distributed_cli_each_process_transcribes_its_share(report, model_dir):
    """Two processes joined by jax.distributed (2 CPU devices each, default mesh: data=2 over local devices) read a
    manifest and a folder; each prints exactly its share, and the token ids equal one device's."""
    manifest = model_dir / "inputs.txt"
    manifest.write_text(f"{os.path.join(DATA, 'hello_en.wav')}\n{os.path.join(DATA, 'zh.wav')}\n")
    inputs = [str(manifest), str(model_dir / "clips")]
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "qasr_jax.cli", "transcribe", *inputs, "--model", str(model_dir / "ckpt"),
             "--max-new-tokens", "6", "--output-format", "json", "--no-fallback", "--distributed", "--coordinator",
             f"localhost:{port}", "--num-processes", "2", "--process-id", str(i)],
            env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "PYTHONPATH": ROOT},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    every = [path for path, _ in expand_inputs(inputs)]
    single = dict(zip(report["notebook"]["sources"], report["notebook"]["single"]))
    for i, (out, _) in enumerate(outs):
        got = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        assert sorted(r["file"] for r in got) == sorted(every[i::2])
        assert all(r["token_ids"] == single[r["file"]] for r in got)
