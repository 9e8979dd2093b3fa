"""The command line (``qasr-jax``): ``core`` builds the parser (``main``) and runs transcribe, align and convert; one
module per other group of subcommands (``language``: detect-language; ``stream``; ``serve``; ``train``: finetune and
evaluate; ``warmup``; ``env``) and ``options``, the flags and checks they share.
"""

from qasr_jax.cli.core import build_parser, main

__all__ = ["build_parser", "main"]
