"""The engine: every compiled program over the model, on one device or a mesh.

Transcription, alignment, streaming, serving and the benchmarks all run these programs, and no other module
applies the model. The one other module that jits a forward pass is training: training jits its loss and gradients
around :meth:`Engine.forward` (the engine's pure forward function), so the gradients flow through the same code
that decodes (tests/decoding/test_engine.py holds both rules). One device and a mesh are the same code: with a ``layout`` the
programs pin their parameters, batch rows and KV cache to the mesh; without one they are plain jits.

Decoding runs in *slots* (JetStream's engine is the model): a :class:`DecodeState` holds a KV cache of a fixed
number of rows and the search state of one request per slot (``beam_size`` rows per request for beam search).

* :meth:`Engine.insert` prefills new prompts into free slots, each on top of whatever its rows already hold (an
  empty row for a new request; a kept prefix for a stream's next chunk), and picks their first tokens;
* :meth:`Engine.advance` steps every live slot at once, until a request finishes or a step budget is spent;
* :meth:`Engine.release` frees slots (or truncates them to a prefix to keep).

Requests join and leave without compiling anything: slots, cache length, prompt width and output buffer are
fixed per state. :meth:`Engine.generate` is the one-call path: prefill and decode a whole batch to the end in
one program.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from qasr_jax.decoding import search as S
from qasr_jax.decoding.buckets import PREFILL_CHUNK
from qasr_jax.decoding.compiles import jit_with_encoder
from qasr_jax.io.audio import frames_of, log_mel_padded
from qasr_jax.modeling.model import LAYER_MODES, KVCache, Qwen3ASRModule, stack_layers, unstack_layers


@flax.struct.dataclass
class DecodeState:
    """The slots: a KV cache of ``slots`` rows and the search state of ``slots / beam_size`` requests."""

    cache: KVCache
    rows: S.GreedyRows | S.BeamRows


def _copy_rows(x: jax.Array, axis: int, src: jax.Array, dst: jax.Array) -> jax.Array:
    """``x`` with its rows ``dst`` (on ``axis``) set to its rows ``src``."""
    at = (slice(None),) * axis
    return x.at[at + (dst,)].set(x[at + (src,)])


def _device(x, dtype):
    """A device array of ``x`` (a host array is transferred, not converted by a compiled program)."""
    if isinstance(x, jax.Array) and (dtype is None or x.dtype == dtype):
        return x
    return jax.device_put(np.asarray(x, dtype))


class Engine:
    """Every compiled program of one model: encode, embed, full-prompt logits, position scoring (the aligner),
    one-call generation, and the slot programs (insert, advance, release) of continuous batching."""

    def __init__(self, config, params, dtype: str = "float32", attention_impl: str = "auto",
                 interpret: bool = False, layout=None, remat: bool = False, module_transform=None,
                 layers: str = "unrolled", prefill_chunk: int | None = PREFILL_CHUNK, kv_block: int | None = None):
        if layers not in LAYER_MODES:
            raise ValueError(f"layers must be one of {LAYER_MODES}, got {layers!r}")
        self.config = config
        self.dtype = jnp.dtype(dtype)
        self.layout = layout
        self.layers = layers
        # The module of the one parameter tree (layers_0, ...): training, declared_params and forward use it.
        self.module = Qwen3ASRModule(config, self.dtype, attention_impl, interpret, layout, remat, kv_block=kv_block)
        # The compiled programs run this one: the same module tracing one unrolled layer for all (not under a
        # transform, which intercepts each layer in place), or its scanned twin over stack_layers' tree.
        self.runner = self.module.clone(layers=layers, trace_once=module_transform is None)
        # e.g. qwix's LoRA (qasr_jax.training.trainer): the programs run the wrapped module
        if module_transform is not None:
            self.module, self.runner = module_transform(self.module), module_transform(self.runner)
        self.params = params
        vocab = config.num_labels if config.is_aligner else config.text.vocab_size
        mod, text, dt = self.runner, config.text, self.dtype
        # The programs below close over these locals only, never over self: no reference cycle keeps a dropped
        # engine's parameters alive until the garbage collector runs.

        def new_cache(slots, max_len):
            return KVCache.init(text, slots, max_len, dt, stacked=layers == "scan")

        def apply(params, *args, method):
            return mod.apply({"params": params}, *args, method=method)

        def step_fn(params):
            return lambda tokens, active, cache: step(params, tokens, active, cache)

        def prefill(params, embeds, n_new, cache, rows=None):
            """``Qwen3ASRModule.extend``; a prompt wider than ``prefill_chunk`` goes in chunks of that many tokens,
            each on top of the ones before, so attention memory grows linearly with the prompt, not squared."""
            batch, seq, hidden = embeds.shape
            if prefill_chunk is None or seq <= prefill_chunk:
                return apply(params, embeds, n_new, cache, rows, method=Qwen3ASRModule.extend)
            chunks = -(-seq // prefill_chunk)
            embeds = jnp.pad(embeds, ((0, 0), (0, chunks * prefill_chunk - seq), (0, 0)))
            xs = embeds.reshape(batch, chunks, prefill_chunk, hidden).swapaxes(0, 1)  # (chunks, batch, chunk, h)

            def body(carry, chunk):
                logits, cache = carry
                i, x = chunk
                n = jnp.clip(n_new - i * prefill_chunk, 0, prefill_chunk)  # each row's real tokens in this chunk
                new, cache = apply(params, x, n, cache, rows, method=Qwen3ASRModule.extend)
                return (jnp.where((n > 0)[:, None], new, logits), cache), None

            first = jnp.zeros((batch, vocab), jnp.float32)
            (logits, cache), _ = jax.lax.scan(body, (first, cache), (jnp.arange(chunks), xs))
            return logits, cache

        def encode(params, feats, n_frames):
            return apply(params, feats, n_frames, method=Qwen3ASRModule.encode)

        def embed_waves(params, samples, lengths, input_ids, *, frames):
            # Log-mel, its padding, the encoder and the prompts' embedding in one program: the features never leave
            # the device, and a job compiles one program per encoder shape, not also one per prompt shape.
            audio, _ = encode(params, log_mel_padded(samples, lengths, frames), frames_of(lengths))
            return embed(params, input_ids, audio)

        def embed(params, input_ids, audio_embeds):
            return apply(params, input_ids, audio_embeds, method=Qwen3ASRModule.embed)

        def logits(params, input_ids, feats, n_frames, token_mask):
            return apply(params, input_ids, feats, n_frames, token_mask, method=Qwen3ASRModule.__call__)

        def extend(params, embeds, n_new, cache, rows):
            return prefill(params, embeds, n_new, cache, rows)

        def step(params, tokens, active, cache):
            return apply(params, tokens, active, cache, method=Qwen3ASRModule.step)

        def forward_with(module):
            def forward(params, ids, feats, n_frames, token_mask, positions, with_audio=False):
                run = functools.partial(module.apply, {"params": params})
                hidden, audio, n_tokens = run(ids, feats, n_frames, token_mask,
                                              method=Qwen3ASRModule.prompt_hidden_and_audio)
                at = jnp.take_along_axis(hidden, positions[..., None], axis=1)  # (batch, n_positions, hidden)
                logits = run(at, method=Qwen3ASRModule.head)
                return (logits, audio, n_tokens) if with_audio else logits
            return forward

        forward = forward_with(mod)

        def score(params, ids, feats, n_frames, token_mask, positions, classes):
            logits = forward(params, ids, feats, n_frames, token_mask, positions)
            return jnp.argmax(logits, axis=-1).astype(jnp.int32) if classes else logits

        def generate(params, embeds, n_new, max_new, settings, prompt_ids, tries, *, cfg, max_len):
            batch, seq = embeds.shape[:2]
            cache = new_cache(batch, max_len)
            logits, cache = prefill(params, embeds, n_new, cache)
            return S.search(step_fn(params), logits, cache, cache.row_axes(), settings, max_new, out_len=max_len - seq,
                            cfg=cfg, prompt_ids=prompt_ids, prompt_len=n_new, tries=tries)

        def insert(params, state, embeds, n_new, ids, max_new, settings, prompt_ids, rows, tries, *, cfg):
            embeds, n_new = embeds[rows], n_new[rows]  # the batch's rows going into slots `ids`
            prompt_ids = None if prompt_ids is None else prompt_ids[rows]
            beams = cfg.beam_size
            first = ids * beams  # each request's first decoder row
            logits, cache = prefill(params, embeds, n_new, state.cache, first)
            for b in range(1, beams):  # the other beams start as copies of the first
                cache = jax.tree_util.tree_map(lambda axis, x, b=b: _copy_rows(x, axis, first, first + b),
                                               cache.row_axes(), cache)
            rows = S.start(state.rows, ids, max_new, cfg, prompt_ids, None if prompt_ids is None else n_new, tries)
            decoder_rows = (first[:, None] + jnp.arange(beams)).reshape(-1)
            full = jnp.zeros((cache.slots, logits.shape[-1]), logits.dtype).at[decoder_rows].set(
                jnp.repeat(logits, beams, axis=0))
            started = jnp.zeros(rows.done.shape, bool).at[ids].set(True)
            rows = S.pick(rows, full, started & ~rows.done, cfg, settings)
            return DecodeState(cache, rows)

        def advance(params, state, settings, max_steps, *, cfg, until_any_done):
            rows, cache, steps = S.run(step_fn(params), state.rows, state.cache, state.cache.row_axes(), cfg, settings,
                                       max_steps, until_any_done)
            return DecodeState(cache, rows), steps

        def results(rows, settings, *, cfg):
            return S.result(rows, cfg, settings)

        def release(state, ids, keep, *, beams):
            decoder_rows = (ids[:, None] * beams + jnp.arange(beams)).reshape(-1)
            lengths = state.cache.lengths.at[decoder_rows].set(jnp.repeat(keep, beams))
            done = state.rows.done.at[ids].set(True)
            return DecodeState(state.cache.replace(lengths=lengths), state.rows.replace(done=done))

        def new_state(*, slots, max_len, cfg, out_len, history_len):
            rows = S.init_rows(cfg, slots // cfg.beam_size, out_len, vocab, history_len)
            return DecodeState(new_cache(slots, max_len), rows)

        self._forward = forward_with(self.module)  # the one tree's forward (training differentiates it)
        state_sh = self._state_shardings()
        self._encode = jit_with_encoder(encode)
        self._embed_waves = jit_with_encoder(embed_waves, static_argnames="frames")
        self._embed = jax.jit(embed)
        self._logits = jit_with_encoder(logits)
        self._score = jit_with_encoder(score, static_argnames="classes")
        self._generate = jax.jit(generate, static_argnames=("cfg", "max_len"))
        self._extend = jax.jit(extend, donate_argnums=3)
        self._step = jax.jit(step, donate_argnums=3)
        self._insert = jax.jit(insert, static_argnames="cfg", donate_argnums=1, out_shardings=state_sh)
        self._advance = jax.jit(advance, static_argnames=("cfg", "until_any_done"), donate_argnums=1,
                                out_shardings=(state_sh, None) if state_sh is not None else None)
        self._release = jax.jit(release, static_argnames="beams", donate_argnums=0, out_shardings=state_sh)
        self._results = jax.jit(results, static_argnames="cfg")
        self._new_state = jax.jit(new_state, static_argnames=("slots", "max_len", "cfg", "out_len", "history_len"),
                                  out_shardings=state_sh)
        self._init_cache = jax.jit(new_cache, static_argnums=(0, 1), out_shardings=self._cache_shardings())

    @property
    def params(self):
        """The one parameter tree (``layers_0``, ...). With ``layers="scan"`` the programs hold the stacked view and
        this is a per-layer copy made when read."""
        return self._params if self.layers == "unrolled" else unstack_layers(self._params, self.config.text.layers)

    @params.setter
    def params(self, params) -> None:
        """Swap in a parameter tree of the same shapes (compiled programs are reused)."""
        if self.layers == "scan" and params is not None:
            params = stack_layers(params, self.config.text.layers)
        self._params = params

    # -- placement ----------------------------------------------------------------------------------------------
    def _cache_shardings(self):
        if self.layout is None:
            return None
        from qasr_jax.modeling.sharding import cache_shardings

        return cache_shardings(self.layout, self.config, self.layers == "scan")

    def _state_shardings(self):
        if self.layout is None:
            return None
        replicated = jax.sharding.NamedSharding(self.layout.mesh, jax.sharding.PartitionSpec())
        return DecodeState(self._cache_shardings(), replicated)

    @property
    def data_size(self) -> int:
        """Devices along the mesh's data axis (1 without a mesh): batches take a multiple of this many rows."""
        return 1 if self.layout is None else self.layout.data_size

    def put(self, x, dtype=None) -> jax.Array:
        """A batch (rows first) on the devices, in ``dtype`` if given: rows split over the data axis with a mesh.
        Host arrays are transferred, never converted by a compiled program."""
        from qasr_jax.modeling.sharding import put_batch

        if dtype is not None and not (isinstance(x, jax.Array) and x.dtype == dtype):
            x = np.asarray(x, dtype)
        return put_batch(x, self.layout)

    def declared_params(self) -> dict:
        """The parameter tree (ShapeDtypeStructs) as the module declares it, with what a ``module_transform`` adds
        (e.g. LoRA adapters): traced, nothing computed."""
        cfg = self.config
        frames = cfg.audio.chunk_frames

        def init():  # example inputs made inside the trace: nothing compiled
            ids = jnp.full((1, cfg.audio.tokens_per_chunk), cfg.audio_token_id, jnp.int32)
            feats = jnp.zeros((1, cfg.audio.num_mel_bins, frames), jnp.float32)
            return self.module.init(jax.random.PRNGKey(0), ids, feats, jnp.array([frames]),
                                    method=Qwen3ASRModule.prompt_hidden)["params"]

        return jax.eval_shape(init)

    def forward(self, params, input_ids, feats, n_frames, token_mask, positions, with_audio: bool = False):
        """The pure (un-jitted) prompt forward pass that position scoring is built from: right-padded prompts and
        their log-mel -> float32 logits (batch, n_positions, V) at ``positions`` (batch, n_positions) only
        (``with_audio``: also the projector's output and each row's audio token count). Training differentiates it
        inside its own compiled step; for inference call the compiled programs below."""
        return self._forward(params, input_ids, feats, n_frames, token_mask, positions, with_audio)

    # -- one-shot programs --------------------------------------------------------------------------------------
    def encode(self, feats, n_frames) -> tuple[jax.Array, jax.Array]:
        """Padded log-mel (batch, 128, frames), n_frames (batch,) -> (audio embeds (batch, seq, hidden), n_tokens)."""
        return self._encode(self._params, self.put(feats), self.put(n_frames))

    def embed_waves(self, samples, lengths, input_ids, frames: int) -> jax.Array:
        """Zero-padded 16 kHz samples (batch, S) and their lengths (batch,), from ``audio.pad_waves``, and prompt ids
        (batch, seq) holding each audio's ``audio_token_count`` pads -> decoder input embeds: log-mel, encoder and
        :meth:`embed` in one program."""
        return self._embed_waves(self.params, self.put(samples), self.put(lengths, np.int32), self.put(input_ids),
                                 frames=frames)

    def embed(self, input_ids, audio_embeds) -> jax.Array:
        """Prompt ids (batch, seq) + audio embeds (batch, audio_seq, hidden) -> decoder input embeds."""
        return self._embed(self._params, self.put(input_ids), self.put(audio_embeds))

    def logits(self, input_ids, feats, n_frames, token_mask) -> jax.Array:
        """Right-padded prompts + their log-mel -> float32 logits (batch, seq, vocab or classes), no cache."""
        return self._logits(self._params, *(self.put(x) for x in (input_ids, feats, n_frames, token_mask)))

    def score(self, input_ids, feats, n_frames, token_mask, positions, classes: bool = False) -> jax.Array:
        """The head only at ``positions`` (batch, n): float32 logits (batch, n, classes), or with ``classes`` their
        argmax (the aligner's timestamp classes)."""
        args = (self.put(x) for x in (input_ids, feats, n_frames, token_mask, positions))
        return self._score(self._params, *args, classes=classes)

    def generate(self, embeds, n_new, max_new, settings: S.SearchSettings, cfg: S.SearchConfig, max_len: int,
                 prompt_ids=None, tries=None) -> S.SearchResult:
        """Prefill right-padded prompt embeds (batch, seq, hidden) with ``n_new`` (batch,) real tokens and decode
        every row to the end (``max_new`` (batch,) tokens at most, ``max_len - seq`` the buffer), in one program;
        ``tries`` (a ``hotwords.Trie`` of batch rows, with ``cfg.hotword_edges`` edges) biases the search."""
        seq = np.shape(embeds)[1]
        most = int(np.max(max_new))
        if most < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {most}")
        if seq + most > max_len:
            raise ValueError(
                f"max_new_tokens={most} does not fit: the prompt takes {seq} of the KV cache's max_len={max_len} "
                f"positions, leaving {max_len - seq} for new tokens; pass max_len >= {seq + most} or ask for fewer"
            )
        args = (self.put(embeds), self.put(n_new, np.int32), self.put(max_new, np.int32))
        prompt = None if prompt_ids is None else self.put(prompt_ids, np.int32)
        return self._generate(self._params, *args, settings, prompt, tries, cfg=cfg, max_len=max_len)

    # -- the decoder over a cache -------------------------------------------------------------------------------
    def init_cache(self, slots: int, max_len: int) -> KVCache:
        """An empty KV cache of ``slots`` rows of ``max_len`` positions (stacked with ``layers="scan"``; sharded
        with a mesh)."""
        return self._init_cache(slots, max_len)

    def extend(self, cache: KVCache, embeds, n_new, rows=None) -> tuple[jax.Array, KVCache]:
        """Append right-padded token embeds (batch, seq, hidden), ``n_new`` (batch,) real ones, to cache rows
        ``rows`` (None: all) -> (float32 logits after each row's last new token, cache); the cache is donated."""
        rows = None if rows is None else jax.device_put(np.asarray(rows, np.int32))
        return self._extend(self._params, self.put(embeds), self.put(n_new, np.int32), cache, rows)

    def step(self, cache: KVCache, tokens, active=None) -> tuple[jax.Array, KVCache]:
        """One token per cache row (slots,), where ``active`` (default all) -> (logits, cache); cache donated."""
        tokens = self.put(tokens, np.int32)
        active = self.put(np.ones(tokens.shape, bool) if active is None else active, bool)
        return self._step(self._params, tokens, active, cache)

    # -- slots ----------------------------------------------------------------------------------------------------
    def new_state(self, slots: int, max_len: int, cfg: S.SearchConfig, out_len: int,
                  history_len: int = 0) -> DecodeState:
        """Empty slots: ``slots`` cache rows of ``max_len`` positions, an ``out_len`` output buffer per request."""
        if slots % cfg.beam_size or slots % self.data_size:
            raise ValueError(f"slots={slots} must be a multiple of beam_size={cfg.beam_size} and of the mesh's "
                             f"data axis ({self.data_size})")
        return self._new_state(slots=slots, max_len=max_len, cfg=cfg, out_len=out_len, history_len=history_len)

    def insert(self, state: DecodeState, embeds, n_new, ids, max_new, settings: S.SearchSettings,
               cfg: S.SearchConfig, prompt_ids=None, rows=None, tries=None) -> DecodeState:
        """Prefill prompts into requests ``ids`` (k,) on top of what their rows hold, and pick their first tokens.

        ``embeds`` (batch, seq, hidden) with ``n_new`` (batch,) real tokens; ``rows`` (k,) picks the batch rows that
        go into ``ids`` (default: all, in order); ``max_new`` (k,); ``prompt_ids`` (batch, seq) feed the repetition
        guard; ``tries`` (k requests' ``hotwords.Trie``) bias their search. The state is donated.
        """
        ids, max_new = (jax.device_put(np.asarray(x, np.int32)) for x in (ids, max_new))
        rows = np.arange(ids.shape[0], dtype=np.int32) if rows is None else np.asarray(rows, np.int32)
        prompt = None if prompt_ids is None else _device(prompt_ids, np.int32)
        return self._insert(self._params, state, _device(embeds, None), _device(n_new, np.int32), ids, max_new,
                            settings, prompt, jax.device_put(rows), tries, cfg=cfg)

    def advance(self, state: DecodeState, settings: S.SearchSettings, cfg: S.SearchConfig, max_steps: int,
                until_any_done: bool = True) -> tuple[DecodeState, int]:
        """Step every live request until one finishes (``until_any_done``), all are done, or ``max_steps`` steps
        -> (state, steps taken); the state is donated."""
        state, steps = self._advance(self._params, state, settings, np.int32(max_steps), cfg=cfg,
                                     until_any_done=until_any_done)
        return state, int(steps)

    def release(self, state: DecodeState, ids, cfg: S.SearchConfig, keep=None) -> DecodeState:
        """Free requests ``ids`` (k,): their rows keep ``keep`` (k,) tokens (default 0: empty); state donated."""
        ids = np.asarray(ids, np.int32).reshape(-1)
        keep = np.zeros(ids.shape, np.int32) if keep is None else np.asarray(keep, np.int32).reshape(-1)
        k = 1 << max(0, (len(ids) - 1).bit_length())  # padded to a power of two (repeats): few programs
        ids, keep = (np.concatenate([x, np.repeat(x[-1:], k - len(x))]) for x in (ids, keep))
        return self._release(state, jax.device_put(ids), jax.device_put(keep), beams=cfg.beam_size)

    def results(self, state: DecodeState, cfg: S.SearchConfig, settings: S.SearchSettings) -> S.SearchResult:
        """Every request's best hypothesis so far, on the host (numpy)."""
        return jax.device_get(self._results(state.rows, settings, cfg=cfg))

    def done(self, state: DecodeState) -> np.ndarray:
        """(requests,) bool on the host: requests that take no more steps."""
        return np.asarray(state.rows.done)
