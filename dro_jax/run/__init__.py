"""The main job, `dro-jax run`: its configuration, the stages and their records, the run directory, the report."""
