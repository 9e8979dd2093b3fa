"""Decoding: the one place that runs the model.

``request`` checks what a user asks for (language, context, hotwords) and prepares it, the same for offline
transcription, the server and streams; ``engine`` compiles and applies the model (encode, prefill, step);
``search`` is greedy and beam search over a fixed-size KV cache, with ``processors`` (repetition guards,
penalties) and ``hotwords`` (a boosted trie); ``slots`` keeps a batch of decode slots busy (continuous batching);
``pipeline`` turns requests into encoded batches and slot requests; ``buckets`` pads every shape to a bucket;
``compiles`` counts and caches compilations; ``language`` scores the language prefix; ``longform`` cuts long
audio into pieces.
"""
