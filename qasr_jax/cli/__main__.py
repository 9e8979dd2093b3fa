"""``python -m qasr_jax.cli``: the ``qasr-jax`` command."""

import sys

from qasr_jax.cli.core import main

sys.exit(main())
