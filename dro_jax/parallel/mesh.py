"""The device mesh: three named axes, `data`, `fsdp` and `model`, any of which may have size 1.

- `data`: the batch is split over it, the weights are copied along it.
- `fsdp`: the batch is split over it too, and every weight matrix is split
  along its hidden (embedding) dimension, gathered one layer at a time when
  used; weight memory per device falls by its size.
- `model`: tensor parallelism; attention heads, the MLP's inner dimension and
  the vocabulary are split over it (Megatron's layout), activations along
  them too.

`--mesh data=2,fsdp=4` on 8 devices is a `MeshShape`; an axis left out is 1,
except `data`, which takes whatever devices remain; `--dcn-mesh` says how
much of each axis spans slices or hosts (`make_mesh`). Which array dimension
goes onto which axis is said once, in `dro_jax.parallel.sharding.AXIS_RULES`.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
from jax.experimental import mesh_utils
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


def _shape(shape: MeshShape | str | None) -> MeshShape:
    return MeshShape.parse(shape) if isinstance(shape, str) else shape or MeshShape()


def make_mesh(shape: MeshShape | str | None = None, devices: list | None = None, dcn: MeshShape | str | None = None) -> Mesh:
    """A (data, fsdp, model) mesh over `devices` (default: every device of every process), laid out by the
    topology: `model`, the innermost axis, on the fastest links (tensor parallelism talks on every layer, data
    parallelism once per step). On TPU that follows the chips' torus (`mesh_utils.create_device_mesh`); on
    GPU and CPU the devices' order, which is grouped by process.

    `dcn` splits each axis further between slices (TPU multi-slice) or, off TPU, between processes, which talk
    over the data-centre network: `--mesh data=4,model=4 --dcn-mesh data=2` over two 8-chip slices puts each
    slice's chips on data=2 x model=4 and the two slices on the data axis.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = _shape(shape).resolve(len(devices))
    try:
        if dcn is None:
            grid = mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
        else:
            on_tpu = devices[0].platform == "tpu"  # a TPU slice shares the fast network; elsewhere a process does
            groups = len({d.slice_index if on_tpu else d.process_index for d in devices})
            try:
                between = _shape(dcn).resolve(groups)
            except DroJaxError:
                raise DroJaxError(f"--dcn-mesh {_shape(dcn).describe()} does not fit the {groups} {'slices' if on_tpu else 'processes'} of the job") from None
            if any(size % ways for size, ways in zip(sizes, between)):
                raise DroJaxError(f"--dcn-mesh {_shape(dcn).describe()} must divide every axis of the mesh {dict(zip(MESH_AXES, sizes))}")
            within = [size // ways for size, ways in zip(sizes, between)]
            grid = mesh_utils.create_hybrid_device_mesh(
                within, between, devices, process_is_granule=not on_tpu, allow_split_physical_axes=True,
            )
    except ValueError as err:  # a shape the topology cannot hold
        raise DroJaxError(f"cannot lay out the mesh {dict(zip(MESH_AXES, sizes))} on these devices: {err}") from None
    return Mesh(grid, MESH_AXES)


def describe_mesh(mesh: Mesh) -> str:
    """The mesh's axis sizes and which device ids sit where along the axes that split, e.g.
    "mesh data=2,fsdp=1,model=4 over 8 device(s) of 2 process(es); device ids by (data, model): [[0 1 2 3] [4 5 6 7]]"."""
    split = [axis for axis in MESH_AXES if mesh.shape[axis] > 1]
    ids = np.vectorize(lambda device: device.id)(mesh.devices).reshape([mesh.shape[axis] for axis in split])
    processes = process_count(mesh)
    grid = " ".join(np.array2string(ids, separator=" ", threshold=64).split())
    return (
        f"mesh {','.join(f'{axis}={mesh.shape[axis]}' for axis in MESH_AXES)} over {mesh.devices.size} device(s) of {processes} "
        f"process(es); device ids by ({', '.join(split)}): {grid}"
    )


def process_count(mesh: Mesh | None) -> int:
    """How many processes own the mesh's devices (1 without a mesh)."""
    return 1 if mesh is None else len({device.process_index for device in mesh.devices.flat})


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
