"""PyTorch and the transformers model of the same checkpoint: the baseline of the benchmarks and the reference of the
parity checks. PyTorch is an optional dependency, imported only here and only when asked for."""

from __future__ import annotations

from dro_jax.common.errors import DroJaxError


def import_torch(threads: int, needed_by: str = "python -m dro_jax.bench"):
    """torch with `threads` threads; PyTorch is an optional dependency, needed only for the baselines and parity checks."""
    try:
        import torch
    except ImportError:
        raise DroJaxError(f"{needed_by} needs PyTorch: pip install torch==2.13.0 'accelerate>=1.0'") from None
    torch.set_num_threads(threads)
    return torch


def load_torch_model(model_source: str, torch, dtype: str = "float32", device: str = "cpu"):
    """The same checkpoint in transformers, in `dtype` on `device`, for the baseline rows."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    path = Path(model_source)
    if path.suffix.lower() == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=getattr(torch, dtype))
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype))
    return model.to(device).eval()
