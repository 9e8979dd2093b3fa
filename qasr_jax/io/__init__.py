"""The text and audio edges: reading audio and the log-mel front end (``audio``), the BPE (``tokenizer``), the
official prompts and language names (``prompts``), word units for alignment (``units``), results and transcript
formats (``results``, ``formats``: txt, json, srt, vtt, tsv), model folders, hub ids and the files the package ships
(``hub``) and progress bars (``progress``). Nothing here knows the model.
"""
