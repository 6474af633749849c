"""The `dro-jax` command: `main` parses and dispatches, each other module holds one group of commands."""
