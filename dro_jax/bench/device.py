"""Where a benchmark runs: both sides on the device JAX uses, in one dtype, and that chip's limits.

A speed ratio means something only when dro-jax and transformers compute on
the same device in the same precision: on a GPU both run there in bfloat16
(transformers on CUDA), on a CPU both in float32. Each row's fraction of the
chip's limit is read against its compute peak (matmul FLOP/s in that dtype) or
its memory bandwidth: the vendors' dense figures for known accelerators,
measured here otherwise (always on CPUs, whose figures vary by machine; the datasheets: `dro_jax.parallel.chips`).
"""

from __future__ import annotations

import dataclasses
import jax
import jax.numpy as jnp

from dro_jax.bench.common import best_of
from dro_jax.common.errors import DroJaxError
from dro_jax.parallel.chips import datasheet

DTYPES = ("bfloat16", "float32")


def matmul_peak_gflops(dtype: str = "float32", sizes: tuple[int, ...] = (1024, 2048, 3072), repeats: int = 5) -> float:
    """The device's matmul rate in `dtype` through XLA: the best of large square matmuls."""
    matmul = jax.jit(jnp.matmul)
    best = 0.0
    for size in sizes:
        a = jax.random.normal(jax.random.key(0), (size, size), dtype)
        b = jax.random.normal(jax.random.key(1), (size, size), dtype)
        matmul(a, b).block_until_ready()
        seconds = best_of(repeats, lambda: matmul(a, b).block_until_ready())
        best = max(best, 2 * size**3 / seconds / 1e9)
    return best


def memory_bandwidth_gbs(dtype: str = "float32", megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes read per second by a large matrix-vector product: the access pattern of decoding one token at batch 1."""
    columns = 4096
    matrix = jnp.ones((megabytes * 2**20 // jnp.dtype(dtype).itemsize // columns, columns), dtype)
    vector = jnp.ones((columns,), dtype)
    matvec = jax.jit(jnp.matmul)
    matvec(matrix, vector).block_until_ready()
    seconds = best_of(repeats, lambda: matvec(matrix, vector).block_until_ready())
    return matrix.nbytes / seconds / 1e9


@dataclasses.dataclass(frozen=True)
class BenchDevice:
    """`platform`/`kind`: where JAX runs; `dtype`: what both sides compute in; `torch_device`: where transformers
    runs ("cuda" beside a JAX GPU, else "cpu"); `peak_gflops`/`bandwidth_gbs`: the limits the rows are read
    against, from the vendor's datasheet or measured (`limits_from`)."""

    platform: str
    kind: str
    dtype: str
    torch_device: str
    peak_gflops: float
    bandwidth_gbs: float
    limits_from: str

    def synchronize(self, torch) -> None:
        """Waits for transformers' queued work, so that a timed call counts all of it."""
        if self.torch_device == "cuda":
            torch.cuda.synchronize()

    def describe(self) -> str:
        where = "" if self.torch_device != "cpu" or self.platform == "cpu" else "; transformers on the host CPU (no PyTorch backend for it here)"
        return (f"JAX on {self.platform} ({self.kind}), transformers on {self.torch_device}, both in {self.dtype}{where}; "
                f"limits ({self.limits_from}): {self.peak_gflops:.0f} GFLOP/s matmul peak, {self.bandwidth_gbs:.1f} GB/s memory")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def bench_device(torch, dtype: str | None = None) -> BenchDevice:
    """The device JAX runs on, with `dtype` (default: bfloat16 on accelerators, float32 on CPUs) and the chip's
    limits; transformers goes to CUDA beside a JAX GPU (a PyTorch without CUDA there is an error, not a CPU
    baseline against a GPU)."""
    device = jax.devices()[0]
    platform, kind = device.platform, device.device_kind
    dtype = dtype or ("float32" if platform == "cpu" else "bfloat16")
    if dtype not in DTYPES:
        raise DroJaxError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    torch_device = "cpu"
    if platform == "gpu":
        if not torch.cuda.is_available():
            raise DroJaxError("JAX runs on a GPU but this PyTorch has no CUDA: install a CUDA build of torch, so that both sides run on the GPU")
        torch_device = "cuda"
    sheet = datasheet(kind) if platform != "cpu" and dtype == "bfloat16" else None
    if sheet is not None:
        peak, bandwidth, source = sheet[0] * 1e3, sheet[1] * 1e3, "datasheet"
    else:
        peak, bandwidth, source = matmul_peak_gflops(dtype), memory_bandwidth_gbs(dtype), "measured"
    return BenchDevice(platform, kind, dtype, torch_device, peak, bandwidth, source)
