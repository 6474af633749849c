"""The accelerators whose limits are known from their vendors' datasheets, for reading a rate against its chip.

A CPU's figures vary by machine and are measured where they are needed
(`dro_jax.bench.device`); an accelerator's dense bfloat16 matmul peak and
memory bandwidth are the vendor's.
"""

from __future__ import annotations

import jax

# device_kind fragment -> (dense bfloat16 TFLOP/s, memory TB/s), the vendors' datasheet figures; the first match wins.
DATASHEETS = {
    "H100 PCIe": (756.0, 2.0),
    "H100": (989.0, 3.35),
    "H200": (989.0, 4.8),
    "A100": (312.0, 2.0),
    "L4": (121.0, 0.3),
    "TPU v4": (275.0, 1.2),
    "TPU v5 lite": (197.0, 0.82),
    "TPU v5": (459.0, 2.76),
    "TPU v6 lite": (918.0, 1.64),
}


def datasheet(kind: str) -> tuple[float, float] | None:
    """(bfloat16 TFLOP/s, TB/s) of a known accelerator by jax's `device_kind`, or None."""
    return next((figures for fragment, figures in DATASHEETS.items() if fragment in kind), None)


def bfloat16_peak_tflops(dtype: str, device: jax.Device | None = None) -> float | None:
    """The dense bfloat16 TFLOP/s of `device` (default: JAX's first) when a model computes in bfloat16 there and the
    chip is in DATASHEETS; None otherwise (a CPU, an unknown chip, or float32, whose rate depends on --precision)."""
    device = device or jax.devices()[0]
    sheet = datasheet(device.device_kind) if device.platform != "cpu" and dtype == "bfloat16" else None
    return None if sheet is None else sheet[0]
