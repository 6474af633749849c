"""The device mesh: three named axes, `data`, `fsdp` and `model`, any of which may have size 1.

- `data`: the batch is split over it, the weights are copied along it.
- `fsdp`: the batch is split over it too, and every weight matrix is split
  along its hidden (embedding) dimension, gathered one layer at a time when
  used; weight memory per device falls by its size.
- `model`: tensor parallelism; attention heads, the MLP's inner dimension and
  the vocabulary are split over it (Megatron's layout), activations along
  them too.

`--mesh data=2,fsdp=4` on 8 devices is a `MeshShape`; an axis left out is 1,
except `data`, which takes whatever devices remain. Which array dimension
goes onto which axis is said once, in `dro_jax.parallel.sharding.AXIS_RULES`.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
from jax.sharding import Mesh

from dro_jax.common.errors import DroJaxError

MESH_AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")  # the mesh axes the batch is split over


@dataclasses.dataclass(frozen=True)
class MeshShape:
    """Devices per mesh axis; `data=None` means "the devices the other axes leave"."""

    data: int | None = None
    fsdp: int = 1
    model: int = 1

    def __post_init__(self) -> None:
        for axis in MESH_AXES:
            size = getattr(self, axis)
            if size is not None and size < 1:
                raise DroJaxError(f"mesh axis {axis} must be at least 1, got {size}")

    @classmethod
    def parse(cls, text: str) -> "MeshShape":
        """'data=2,fsdp=4' (any subset of the axes, in any order) -> MeshShape(2, 4, 1)."""
        sizes: dict[str, int] = {}
        for part in filter(None, (piece.strip() for piece in text.split(","))):
            axis, equals, value = part.partition("=")
            axis = axis.strip()
            if not equals or axis not in MESH_AXES or not value.strip().isdigit():
                raise DroJaxError(f"--mesh takes AXIS=SIZE pairs with axes {', '.join(MESH_AXES)}, e.g. data=2,model=4; got {text!r}")
            if axis in sizes:
                raise DroJaxError(f"--mesh names axis {axis} twice: {text!r}")
            sizes[axis] = int(value)
        return cls(**sizes)

    def resolve(self, num_devices: int) -> tuple[int, int, int]:
        """(data, fsdp, model) sizes whose product is `num_devices`."""
        others = self.fsdp * self.model
        data = num_devices // others if self.data is None else self.data
        if data < 1 or data * others != num_devices:
            raise DroJaxError(
                f"mesh {self.describe()} needs {'a multiple of ' + str(others) if self.data is None else data * others} devices, "
                f"there are {num_devices}"
            )
        return data, self.fsdp, self.model

    def describe(self) -> str:
        return ",".join(f"{axis}={getattr(self, axis) if getattr(self, axis) is not None else '*'}" for axis in MESH_AXES)


def make_mesh(shape: MeshShape | str | None = None, devices: list | None = None) -> Mesh:
    """A (data, fsdp, model) mesh over `devices` (default: every device of every process).

    Devices are laid out in the order given (`jax.devices()` is grouped by
    process), so `model`, the innermost axis, stays within a host when it can:
    tensor parallelism talks on every layer, data parallelism once per step.
    """
    shape = MeshShape.parse(shape) if isinstance(shape, str) else shape or MeshShape()
    devices = list(jax.devices() if devices is None else devices)
    sizes = shape.resolve(len(devices))
    return Mesh(np.asarray(devices, dtype=object).reshape(sizes), MESH_AXES)


def data_mesh(devices: list | None = None) -> Mesh:
    """Every (or the given) device on the `data` axis: the weights copied, the batch split."""
    return make_mesh(MeshShape(), devices)


def local_mesh(num_devices: int | None = None, shape: MeshShape | None = None) -> Mesh:
    """A mesh over this process's first `num_devices` devices (default: all of them).

    Local, so that with several processes each one runs its own share of the work.
    """
    devices = jax.local_devices()
    if num_devices is not None and not 1 <= num_devices <= len(devices):
        raise DroJaxError(f"asked for {num_devices} devices, but this process has {len(devices)}")
    return make_mesh(shape, devices[:num_devices])


def batch_devices(mesh: Mesh) -> int:
    """How many ways the batch is split: the product of the batch axes' sizes."""
    return math.prod(mesh.shape[axis] for axis in BATCH_AXES if axis in mesh.shape)
