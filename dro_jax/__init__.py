"""dro-jax: Directed Representation Optimization (DRO) for safety prompts, in JAX/Flax.

The package follows the pipeline, one folder per stage, each importing only
the stages before it:

    models -> loading -> inference -> anchors -> dro -> evaluation -> run -> cli

with `common` (errors, files, tables), `data` (query sets) and `parallel`
(meshes, hosts) shared underneath, and `parity` / `bench` (PyTorch checks and
benchmarks) on top. The entry points most users call are re-exported here and
imported on first use, so `import dro_jax` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "DroJaxError": "dro_jax.common.errors",
    "forward": "dro_jax.models",
    "load_model": "dro_jax.loading",
    "dro_loss": "dro_jax.dro.loss",
    "RunConfig": "dro_jax.run.config",
    "run_pipeline": "dro_jax.run.pipeline",
}
__all__ = list(_EXPORTS)

if TYPE_CHECKING:
    from dro_jax.common.errors import DroJaxError
    from dro_jax.dro.loss import dro_loss
    from dro_jax.loading import load_model
    from dro_jax.models import forward
    from dro_jax.run.config import RunConfig
    from dro_jax.run.pipeline import run_pipeline


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dro_jax' has no attribute {name!r}")
