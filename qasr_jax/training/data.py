"""Fine-tuning data: the official JSONL manifests, checked whole before training starts, and a Grain pipeline that
turns them into padded step batches.

A manifest line is ``{"audio": "clips/a.wav", "text": "language English<asr_text>hello world", "prompt": ""}``
(``prompt`` optional: context text for the system turn); audio paths are relative to the manifest. Each row of a
batch is the inference prompt (``qasr_jax.io.prompts.build_prompt_ids`` with the prompt as context) followed by the
target tokens: ``language X`` + ``<asr_text>`` + transcript + ``<|im_end|>``. Rows are right-padded and the loss
reads the target positions of each row by index, so padding never shifts a label (the official collator masks by
column and gets left-padded batches wrong).

The pipeline (:class:`Loader`): one epoch's order is a seeded shuffle, cut into windows of step groups whose rows
are sorted by length (short rows batch with short rows), the groups shuffled again; each host reads its own share
of every group; audio is read and resampled in Grain's worker threads; the iterator's position is saved with the
train state, so a resumed run reads exactly the batches the killed one would have.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
from collections.abc import Sequence

import numpy as np

from qasr_jax.decoding.buckets import frame_bucket, prompt_width, target_width
from qasr_jax.io.audio import SAMPLE_RATE, AudioError, load_audio, log_mel_batch, n_frames
from qasr_jax.io.prompts import build_prompt_ids
from qasr_jax.io.tokenizer import ASR_TEXT, Tokenizer
from qasr_jax.modeling.config import ModelConfig, audio_token_count

MANIFEST_EXAMPLE = '{"audio": "clips/a.wav", "text": "language English<asr_text>hello world", "prompt": ""}'
MAX_REPORTED = 20  # problems listed in one ManifestError


class ManifestError(ValueError):
    """A manifest with bad lines: names every line (up to a limit) and what to write instead."""


@dataclasses.dataclass(frozen=True)
class Example:
    """One training or evaluation row: audio (a path or a 16 kHz waveform), target text, context prompt."""

    audio: str | np.ndarray
    text: str
    prompt: str = ""
    seconds: float = 0.0  # audio length, for length bucketing
    where: str = ""  # "train.jsonl line 3": names the row in errors

    @property
    def language(self) -> str:
        """The target's language name (the ``language X`` header; "None" when the header says so)."""
        head = self.text.split(ASR_TEXT, 1)[0].strip()
        return head[len("language "):].strip() if head.startswith("language ") else head

    @property
    def transcript(self) -> str:
        """The target's text after ``<asr_text>``."""
        return self.text.split(ASR_TEXT, 1)[1].strip()


def check_target(text, where: str) -> str | None:
    """The problem with a target string, or None: it must be text holding exactly one ``<asr_text>``."""
    if not isinstance(text, str) or not text.strip():
        return f"{where}: 'text' must be a non-empty string, got {text!r}"
    count = text.count(ASR_TEXT)
    if count != 1:
        return (f"{where}: 'text' must hold exactly one {ASR_TEXT} tag (found {count}): write it as "
                f"'language English{ASR_TEXT}the transcript' (or 'language None{ASR_TEXT}...' when unknown)")
    return None


def _audio_seconds(path: str, where: str) -> float:
    """Length of an audio file in seconds, from its header where soundfile reads it, else by decoding it."""
    import soundfile

    if not os.path.isfile(path):
        raise AudioError(f"{where}: audio file {path} does not exist; paths are relative to the manifest's folder")
    try:
        info = soundfile.info(path)
        if info.frames > 0:
            return info.frames / info.samplerate
    except Exception:  # not a format libsndfile reads: decode it (mp3, m4a, ... through librosa)
        pass
    return load_audio(path, name=f"{where}: {path}").shape[0] / SAMPLE_RATE


def _line_record(line: str, where: str) -> tuple[dict | None, str | None]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        return None, f"{where}: not valid JSON ({e.msg} at column {e.colno}); write one object a line: {MANIFEST_EXAMPLE}"
    if not isinstance(record, dict):
        return None, f"{where}: expected a JSON object, got {type(record).__name__}; write {MANIFEST_EXAMPLE}"
    return record, None


def _resolve(records: Sequence[dict], wheres: Sequence[str], root: str,
             check_audio: bool) -> tuple[list[Example], list[str]]:
    """(examples, problems) of manifest records; files are opened in threads to prove them readable."""
    problems: list[str] = []
    rows: list[tuple[str, dict]] = []
    for record, where in zip(records, wheres):
        missing = [k for k in ("audio", "text") if k not in record]
        if missing:
            problems.append(f"{where}: missing {' and '.join(repr(k) for k in missing)}; write {MANIFEST_EXAMPLE}")
            continue
        problem = check_target(record["text"], where)
        prompt = record.get("prompt") or ""
        audio = record["audio"]
        if problem is None and not isinstance(prompt, str):
            problem = f"{where}: 'prompt' must be a string (context text), got {type(prompt).__name__}"
        if problem is None and not isinstance(audio, (str, os.PathLike, np.ndarray)):
            problem = f"{where}: 'audio' must be a file path or a 16 kHz waveform, got {type(audio).__name__}"
        if problem is None and isinstance(audio, str) and not audio.strip():
            problem = f"{where}: 'audio' is empty; give the path of an audio file (relative to the manifest)"
        if problem:
            problems.append(problem)
        else:
            rows.append((where, record))

    def resolve(where: str, record: dict) -> Example:
        audio = record["audio"]
        if isinstance(audio, np.ndarray):
            audio = load_audio(audio, name=where)
            seconds = audio.shape[0] / SAMPLE_RATE
        else:
            audio = os.path.join(root, os.fspath(audio))
            seconds = _audio_seconds(audio, where) if check_audio else 0.0
        return Example(audio, record["text"], record.get("prompt") or "", seconds, where)

    examples: list[Example] = []
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for future in [pool.submit(resolve, where, record) for where, record in rows]:
            try:
                examples.append(future.result())
            except AudioError as e:
                problems.append(str(e))
    return examples, problems


def _raise(problems: list[str], source: str) -> None:
    shown = "\n  - ".join(problems[:MAX_REPORTED])
    more = f"\n  ... and {len(problems) - MAX_REPORTED} more" if len(problems) > MAX_REPORTED else ""
    raise ManifestError(f"{source}: {len(problems)} bad line(s), nothing was trained:\n  - {shown}{more}")


def examples_from_records(records: Sequence[dict], root: str = ".", check_audio: bool = True,
                          source: str = "batch") -> list[Example]:
    """Manifest-style records ({"audio": path or 16 kHz waveform, "text", "prompt"?}) -> Examples; every problem
    is reported at once (ManifestError naming each row); paths are relative to ``root``."""
    examples, problems = _resolve(records, [f"{source} row {i}" for i in range(len(records))], root, check_audio)
    if problems:
        _raise(problems, source)
    if not examples:
        raise ManifestError(f"{source}: no examples given; pass a list of {MANIFEST_EXAMPLE}")
    return examples


def read_manifest(path: str | os.PathLike, check_audio: bool = True) -> list[Example]:
    """Every row of a JSONL manifest, checked (JSON, keys, <asr_text> tag, readable audio) before any is used."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ManifestError(f"manifest {path} does not exist")
    records, wheres, problems = [], [], []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path} line {number}"
            record, problem = _line_record(line, where)
            if problem:
                problems.append(problem)
            else:
                records.append(record)
                wheres.append(where)
    if not records and not problems:
        raise ManifestError(f"{path} holds no examples (empty or blank lines only); write one JSON object a line: "
                            f"{MANIFEST_EXAMPLE}")
    examples, more = _resolve(records, wheres, os.path.dirname(os.path.abspath(path)), check_audio)
    problems += more
    if problems:
        _raise(sorted(problems, key=_line_number), path)
    return examples


def _line_number(problem: str) -> int:
    head = problem.split(":", 1)[0]
    return int(head.rsplit(" ", 1)[1]) if head.rsplit(" ", 1)[-1].isdigit() else 0


# ----------------------------------------------------------------------------------------------------------------
# Token rows and padded batches


def target_ids(tok: Tokenizer, text: str) -> list[int]:
    """Target tokens of ``language X<asr_text>transcript``: the header, ``<asr_text>``, the transcript, ``<|im_end|>``."""
    head, body = text.split(ASR_TEXT, 1)
    return tok.encode(head) + [tok.asr_text_id] + tok.encode(body) + [tok.im_end_id]


@dataclasses.dataclass
class Batch:
    """A padded batch (numpy, rows first): prompts + targets right-padded, log-mel, and the target positions.

    The logits at ``positions[r, j]`` predict ``targets[r, j]``; ``weights`` is 1 at real targets and 0 at
    padding (and on padding rows).
    """

    ids: np.ndarray  # (rows, seq) int32
    token_mask: np.ndarray  # (rows, seq) bool
    feats: np.ndarray  # (rows, mels, frames) float32
    n_frames: np.ndarray  # (rows,) int32
    positions: np.ndarray  # (rows, targets) int32
    targets: np.ndarray  # (rows, targets) int32
    weights: np.ndarray  # (rows, targets) float32
    seconds: float = 0.0  # audio in the real rows
    lines: tuple[str, ...] = ()  # the rows' ``where``


    ctc_labels: np.ndarray | None = None  # (rows, labels) int32: each row's transcript tokens (an encoder CTC loss)
    ctc_paddings: np.ndarray | None = None  # (rows, labels) float32: 1 past each row's transcript


ARRAYS = ("ids", "token_mask", "feats", "n_frames", "positions", "targets", "weights", "ctc_labels", "ctc_paddings")


@dataclasses.dataclass(frozen=True)
class Augment:
    """Training-time noise, all off by default (a from-scratch recipe turns it on; fine-tuning rarely needs it).

    ``spec_augment``: SpecAugment on the log-mel, ``freq_masks`` bands of up to ``freq_width`` bins and
    ``time_masks`` spans of up to ``time_fraction`` of each row's frames, set to the features' mean.
    ``token_noise``: the fraction of teacher-forced transcript tokens (the decoder's inputs, never its labels)
    replaced by random BPE tokens, so the decoder learns to read the audio rather than only its own history.
    """

    spec_augment: bool = False
    freq_masks: int = 2
    freq_width: int = 20
    time_masks: int = 2
    time_fraction: float = 0.05
    token_noise: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.token_noise < 1.0 or not 0.0 <= self.time_fraction < 1.0:
            raise ValueError(f"token_noise and time_fraction must lie in [0, 1), got {self.token_noise} and "
                             f"{self.time_fraction}")

    @property
    def active(self) -> bool:
        return self.spec_augment or self.token_noise > 0

    def mask_features(self, feats: np.ndarray, valid: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """SpecAugment of log-mel (rows, mels, frames) whose rows hold ``valid`` real frames (a copy)."""
        feats = feats.copy()
        mels = feats.shape[1]
        for r, n in enumerate(valid):
            fill = feats[r, :, :n].mean()
            for _ in range(self.freq_masks):
                w = int(rng.integers(0, self.freq_width + 1))
                f0 = int(rng.integers(0, max(mels - w, 0) + 1))
                feats[r, f0:f0 + w, :n] = fill
            for _ in range(self.time_masks):
                w = int(rng.integers(0, int(self.time_fraction * n) + 1))
                t0 = int(rng.integers(0, max(int(n) - w, 0) + 1))
                feats[r, :, t0:t0 + w] = fill
        return feats

    def noise_tokens(self, ids: np.ndarray, spans: Sequence[tuple[int, int]], bpe_size: int,
                     rng: np.random.Generator) -> np.ndarray:
        """``ids`` (rows, seq) with each transcript input in ``spans`` [start, stop) per row replaced by a random
        id below ``bpe_size`` with probability ``token_noise`` (a copy)."""
        ids = ids.copy()
        for r, (start, stop) in enumerate(spans):
            hit = np.nonzero(rng.random(stop - start) < self.token_noise)[0] + start
            ids[r, hit] = rng.integers(0, bpe_size, hit.size)
        return ids


def collate(waves: Sequence[np.ndarray], examples: Sequence[Example], tok: Tokenizer, cfg: ModelConfig,
            rows: int | None = None, frames: int | None = None, seq: int | None = None, width: int | None = None,
            real: int | None = None, augment: Augment | None = None, rng: np.random.Generator | None = None) -> Batch:
    """Padded arrays for (waveform, example) pairs; ``rows``/``frames``/``seq``/``width`` force larger shapes.

    Only the first ``real`` examples (default all) count; padding rows repeat the first row with zero weights, so
    every row holds real audio. ``augment`` (with ``rng``) adds training noise to the features and inputs.
    """
    n = len(examples)
    real = n if real is None else real
    rows = max(rows or n, n)
    order = list(range(n)) + [0] * (rows - n)
    counts = [n_frames(w.shape[0]) for w in waves]
    frames = max(frames or 0, frame_bucket(max(counts), cfg.audio))
    feats, valid = log_mel_batch([waves[i] for i in order], pad_to=frames)
    prompts = [build_prompt_ids(tok, audio_token_count(c, cfg.audio), ex.prompt) for c, ex in zip(counts, examples)]
    targets = [target_ids(tok, ex.text) for ex in examples]
    seq = max(seq or 0, prompt_width(max(len(p) + len(t) for p, t in zip(prompts, targets))))
    width = max(width or 0, target_width(max(len(t) for t in targets)))
    pad = tok.endoftext_id  # the checkpoint's own id: one outside its vocabulary would embed as NaN
    ids = np.full((rows, seq), pad, np.int32)
    mask = np.zeros((rows, seq), bool)
    positions = np.zeros((rows, width), np.int32)
    target = np.full((rows, width), pad, np.int32)
    weights = np.zeros((rows, width), np.float32)
    bodies = [t[t.index(tok.asr_text_id) + 1:-1] for t in targets]  # the transcript's tokens
    labels = np.zeros((rows, width), np.int32)
    label_pad = np.ones((rows, width), np.float32)
    spans = []
    for r, i in enumerate(order):
        p, t = prompts[i], targets[i]
        ids[r, : len(p) + len(t)] = p + t
        mask[r, : len(p) + len(t)] = True
        positions[r, : len(t)] = np.arange(len(p) - 1, len(p) + len(t) - 1)  # each logit predicts the next token
        target[r, : len(t)] = t
        weights[r, : len(t)] = 1.0 if r < real else 0.0
        labels[r, : len(bodies[i])] = bodies[i]
        label_pad[r, : len(bodies[i])] = 0.0
        spans.append((len(p) + len(t) - 1 - len(bodies[i]), len(p) + len(t) - 1))  # transcript inputs
    if augment is not None and augment.active:
        rng = rng or np.random.default_rng()
        if augment.spec_augment:
            feats = augment.mask_features(np.asarray(feats), np.asarray(valid), rng)
        if augment.token_noise:
            ids = augment.noise_tokens(ids, spans, tok.endoftext_id, rng)  # the BPE ends where special ids begin
    if int(ids.max()) >= cfg.text.vocab_size:
        raise ValueError(f"token id {int(ids.max())} of {tok!r} lies outside the model's vocabulary of "
                         f"{cfg.text.vocab_size}: the tokenizer does not belong to this checkpoint")
    return Batch(ids, mask, np.asarray(feats), np.asarray(valid, np.int32), positions, target, weights,
                 sum(w.shape[0] for w in waves[:real]) / SAMPLE_RATE, tuple(ex.where for ex in examples[:real]),
                 labels, label_pad)


def batch_shapes(batches: Sequence[Batch]) -> tuple[int, int, int]:
    """(frames, seq, width) that fit every batch: micro-batches of one step share one program."""
    return (max(b.feats.shape[2] for b in batches), max(b.ids.shape[1] for b in batches),
            max(b.positions.shape[1] for b in batches))


def stack(batches: Sequence[Batch]) -> Batch:
    """Micro-batches of equal shapes -> one Batch with a leading accumulation axis (accum, rows, ...)."""
    arrays = {f: np.stack([getattr(b, f) for b in batches]) for f in ARRAYS}
    return Batch(**arrays, seconds=sum(b.seconds for b in batches),
                 lines=tuple(line for b in batches for line in b.lines))


def read_waves(examples: Sequence[Example]) -> list[np.ndarray]:
    """The 16 kHz mono waveforms of examples (files decoded and resampled, arrays as they are)."""
    return [load_audio(ex.audio, name=ex.where) for ex in examples]


def step_batch(examples: Sequence[Example], tok: Tokenizer, cfg: ModelConfig, rows: int, accum: int,
               filler: Example | None = None, augment: Augment | None = None,
               rng: np.random.Generator | None = None) -> Batch:
    """One optimizer step's rows: ``accum`` micro-batches of ``rows`` rows with shared shapes, stacked.

    A micro-batch left without examples (the short last group of an epoch) holds ``filler`` (default: the first
    example) at zero weight. ``augment`` draws its noise from ``rng``.
    """
    filler = filler or examples[0]
    waves = read_waves(examples)
    parts = []
    for i in range(accum):
        mine = list(examples[i::accum])
        parts.append((waves[i::accum], mine, len(mine)) if mine else (read_waves([filler]), [filler], 0))
    first = [collate(w, ex, tok, cfg, rows, real=k) for w, ex, k in parts]
    frames, seq, width = batch_shapes(first)
    return stack([collate(w, ex, tok, cfg, rows, frames, seq, width, real=k, augment=augment, rng=rng)
                  for w, ex, k in parts])


# ----------------------------------------------------------------------------------------------------------------
# The Grain pipeline


def epoch_groups(seconds: Sequence[float], group: int, seed: int, epoch: int, window: int = 16) -> list[list[int]]:
    """One epoch's step groups of example indices: a seeded shuffle, windows of ``window`` groups sorted by length
    and cut into groups of ``group`` (the last may be short), the groups shuffled again."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(seconds))
    lengths = np.asarray(seconds)
    groups: list[list[int]] = []
    span = group * window
    for start in range(0, len(order), span):
        chunk = order[start:start + span]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        groups.extend(chunk[i:i + group].tolist() for i in range(0, len(chunk), group))
    return [groups[i] for i in rng.permutation(len(groups))]


class Loader:
    """Step batches of a manifest through Grain: ``next(loader)`` -> a stacked Batch (accum, rows, ...) for this
    host; ``loader.iterator`` is the Grain iterator whose state the train checkpoints hold.

    ``batch_size`` is the global rows of one micro-batch (all hosts and devices), ``grad_accum`` micro-batches make
    a step, ``steps`` the length of the run (epochs repeat with new shuffles); ``augment`` adds training noise,
    seeded by step. Host ``host_index`` of
    ``host_count`` reads rows ``host_index::host_count`` of every step group.
    """

    def __init__(self, examples: Sequence[Example], tok: Tokenizer, cfg: ModelConfig, batch_size: int,
                 grad_accum: int, steps: int, seed: int = 0, host_index: int = 0, host_count: int = 1,
                 threads: int = 4, prefetch: int = 4, augment: Augment | None = None):
        import grain

        if not examples:
            raise ValueError("no training examples")
        if batch_size % host_count:
            raise ValueError(f"batch_size={batch_size} must divide over the {host_count} hosts")
        self.examples = list(examples)
        self.group = batch_size * grad_accum
        self.rows = batch_size // host_count
        self.accum = grad_accum
        self.seed = seed
        self.steps_per_epoch = -(-len(self.examples) // self.group)
        self.host = (host_index, host_count)
        self._seconds = [ex.seconds for ex in self.examples]
        self._epochs: dict[int, list[list[int]]] = {}
        self._tok, self._cfg, self._augment = tok, cfg, augment
        self.dataset = (grain.MapDataset.range(steps).map(lambda i: self._load(int(i)))
                        .to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch)))
        self.iterator = iter(self.dataset)

    def group_of(self, step: int) -> list[int]:
        """Example indices of step ``step``'s whole group (every host's rows)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        if epoch not in self._epochs:  # threads may race here; both compute the same list
            self._epochs[epoch] = epoch_groups(self._seconds, self.group, self.seed, epoch)
        return self._epochs[epoch][k]

    def _load(self, step: int) -> Batch:
        index, count = self.host
        group = self.group_of(step)
        mine = [self.examples[i] for i in group[index::count]]
        rng = np.random.default_rng([self.seed, step, index])  # a step's noise is the same when resumed
        return step_batch(mine, self._tok, self._cfg, self.rows, self.accum, self.examples[group[0]], self._augment,
                          rng)

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        return next(self.iterator)
