"""Decoding: the one place that runs the model.

``request`` checks what a user asks for (language, context, hotwords) and prepares it into the one ``Request`` type,
the same for offline transcription, the server and streams; ``engine`` compiles and applies the model (encode,
prefill, step); ``search`` is greedy and beam search over a fixed-size KV cache, asked by ``settings`` (its static
and traced settings, its result type), with ``processors`` (repetition guards, penalties) and ``hotwords`` (a
boosted trie); ``slots`` keeps a batch of decode slots busy with prompt rows (continuous batching); ``pipeline``
turns each audio piece of a request (``Work``) into encoded batches and slot rows; ``buckets`` pads every shape to a
bucket; ``compiles`` counts and caches compilations; ``language`` scores the language prefix; ``longform`` cuts long
audio into pieces.
"""
