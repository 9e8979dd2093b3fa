"""An OpenAI-compatible transcription server over the engine's slots (``qasr-jax serve``; the ``serve`` extra).

``transcriptions`` reads OpenAI's form fields and answers in OpenAI's formats (``openai_format`` writes them and its
errors), ``realtime`` runs OpenAI's realtime transcription WebSocket on the streaming engine, ``scheduler`` is the
engine thread that decodes every request in shared steps, ``app`` holds the routes, ``metrics`` the Prometheus
counters, and ``heap`` bounds the process's C heap (fewer malloc arenas, freed memory handed back after compiles).
Its command line is ``qasr_jax.cli.serve``.
"""
