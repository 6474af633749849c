"""`python -m dro_jax.cli ...` runs the `dro-jax` command."""

import sys

from dro_jax.cli.main import main

sys.exit(main())
