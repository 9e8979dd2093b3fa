"""An OpenAI-compatible transcription server over the engine's slots (``qasr-jax serve``; the ``serve`` extra).

``transcriptions`` reads OpenAI's form fields and answers in its formats, ``realtime`` runs OpenAI's realtime
transcription WebSocket on the streaming engine, ``scheduler`` is the engine thread that decodes every request in
shared steps, ``app`` holds the routes, ``metrics`` the Prometheus counters, ``command`` the command line.
"""
