"""Mesh from the config, logical-axis rules → NamedSharding, and per-process batch placement.

Mesh axes are `data`, `fsdp`, `tensor`. Parameters and activations carry logical axis names
(model.py); two rules tables map them onto mesh axes: training's (`config.mesh.logical_axis_rules`,
so a change of parallelism is a config edit) and decoding's (`DECODE_LOGICAL_AXIS_RULES`, used by
`Layout`, which places params and rows for decoding and scoring on any mesh).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXIS = "activation_batch"

# Logical axis (model.py names) → mesh axis, for training: no code names a mesh axis directly, so
# changing the parallelism layout is an edit here or of `config.mesh.logical_axis_rules`.
TRAINING_LOGICAL_AXIS_RULES = (
  # parameters
  ("embed", "fsdp"),
  ("vocab", "tensor"),
  ("heads", "tensor"),
  ("kv_heads", "tensor"),
  ("mlp", "tensor"),
  ("head_dim", None),
  ("norm", None),
  ("cls_out", None),
  ("layers", None),
  # activations
  ("activation_batch", ("data", "fsdp")),
  ("activation_length", None),
  ("activation_embed", None),
  ("activation_heads", "tensor"),
  ("activation_mlp", "tensor"),
  ("activation_vocab", "tensor"),
)

# Decoding: the same parameter and activation rules plus the KV cache's axes (model.CACHE_AXES),
# split like the rows it belongs to and over `tensor` by kv head. Decoding reads every weight at
# every step, so its meshes put weights on `tensor` only (replicated over `data`): a mesh with an
# `fsdp` axis > 1 splits them over it too, but XLA then gathers them whole and keeps them for the
# loop (docs/performance.md, "Decoding on a mesh"): prefer `tensor`.
DECODE_LOGICAL_AXIS_RULES = TRAINING_LOGICAL_AXIS_RULES + (
  ("cache_layers", None),
  ("cache_kv_heads", "tensor"),
  ("cache_slots", None),
  ("cache_head_dim", None),
)

# Decoding's default mesh: every device on `data` (each holds the whole model and its rows).
DATA_PARALLEL = {"data": -1, "fsdp": 1, "tensor": 1}


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, ...]:
  """Axis sizes in MESH_AXES order; at most one axis may be -1 (= the devices left over)."""
  sizes = [int(mesh_config[name]) for name in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1")
  fixed = math.prod(s for s in sizes if s != -1)
  if any(s == 0 or s < -1 for s in sizes) or num_devices % fixed:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} does not fit {num_devices} devices")
  sizes = [num_devices // fixed if s == -1 else s for s in sizes]
  if math.prod(sizes) != num_devices:
    raise ValueError(
      f"mesh {dict(zip(MESH_AXES, sizes))} uses {math.prod(sizes)} devices, "
      f"but {num_devices} are present (use -1 on one axis to absorb the rest)"
    )
  return tuple(sizes)


def make_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_config, len(devices))
  # create_device_mesh orders devices by topology and keeps each process's devices together,
  # which is what lets every process feed one contiguous block of the batch.
  return Mesh(mesh_utils.create_device_mesh(shape, devices), MESH_AXES)


def abstract_mesh(mesh_config, num_devices: int) -> AbstractMesh:
  """A device-free mesh, for sizing a run on hardware that is not here."""
  return AbstractMesh(mesh_shape(mesh_config, num_devices), MESH_AXES)


def logical_specs(boxed_tree: Any, rules) -> Any:
  """PartitionSpec per leaf: boxed (logically named) leaves through the rules, others replicated."""

  def spec(leaf):
    if isinstance(leaf, nn.LogicallyPartitioned):
      return nn.logical_to_mesh_axes(leaf.names, rules)
    return P()

  return jax.tree.map(spec, boxed_tree, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def named_shardings(boxed_tree: Any, mesh, rules) -> Any:
  return jax.tree.map(
    lambda s: NamedSharding(mesh, s), logical_specs(boxed_tree, rules), is_leaf=lambda x: isinstance(x, P)
  )


def batch_spec(rules, ndim: int) -> P:
  """Leading (batch) dim sharded as the rules place `activation_batch`; the rest replicated."""
  return P(*nn.logical_to_mesh_axes((BATCH_AXIS,) + (None,) * (ndim - 1), rules))


def batch_shardings(mesh: Mesh, rules, example_batch: dict) -> dict:
  return {k: NamedSharding(mesh, batch_spec(rules, np.ndim(v))) for k, v in example_batch.items()}


def process_batch_block(mesh: Mesh, rules, global_batch: int) -> tuple[int, int]:
  """(block index, block count): which contiguous rows of the global batch this process feeds.

  Processes whose devices hold the same rows (e.g. across the `tensor` axis) get the same
  block and must load the same data.
  """
  sharding = NamedSharding(mesh, batch_spec(rules, 1))
  mine = jax.process_index()
  rows = set()
  for device, index in sharding.devices_indices_map((global_batch,)).items():
    if device.process_index == mine:
      rows.update(range(*index[0].indices(global_batch)))
  start, stop = min(rows), max(rows) + 1
  size = stop - start
  if len(rows) != size or global_batch % size or start % size:
    raise ValueError(
      f"process {mine} holds batch rows {sorted(rows)}, not one aligned contiguous block; "
      "reorder the mesh or change config.mesh"
    )
  return start // size, global_batch // size


def to_global_batch(local_batch: dict, shardings: dict, global_batch: int) -> dict:
  """Host-local numpy rows → global jax.Arrays laid out by `shardings`."""
  out = {}
  for k, v in local_batch.items():
    v = np.asarray(v)
    out[k] = jax.make_array_from_process_local_data(shardings[k], v, (global_batch,) + v.shape[1:])
  return out


def per_device_bytes(abstract_tree: Any, specs: Any, mesh) -> int:
  """Bytes one device holds for a tree of ShapeDtypeStructs sharded by `specs` over `mesh`."""
  total = 0
  for leaf, spec in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))):
    shard = NamedSharding(mesh, spec).shard_shape(leaf.shape)
    total += math.prod(shard) * np.dtype(leaf.dtype).itemsize
  return total


def batch_shard_count(mesh, rules) -> int:
  """Into how many blocks the rules split the batch dimension on `mesh`."""
  axes = batch_spec(rules, 1)[0]
  axes = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
  return math.prod(mesh.shape[a] for a in axes)


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where decoding and scoring put params and rows: a mesh and its logical-axis rules.

  Hashable, so a compiled program can be cached per layout. Rows (the batch dimension of every
  input, output and the KV cache) are split as the rules place `activation_batch`; params as their
  logical names say (decode rules: replicated over `data`, split over `tensor`).
  """

  mesh: Mesh
  rules: tuple

  @classmethod
  def make(cls, mesh_config, devices: Sequence[jax.Device] | None = None, rules=None) -> Layout:
    rules = DECODE_LOGICAL_AXIS_RULES if rules is None else rules
    return cls(make_mesh(mesh_config, devices), tuple(tuple(r) for r in rules))

  @property
  def row_shards(self) -> int:
    return batch_shard_count(self.mesh, self.rules)

  def pad_rows(self, rows: int) -> int:
    """The smallest batch >= rows that splits evenly into the row shards."""
    k = self.row_shards
    return -(-rows // k) * k

  def rows(self, ndim: int) -> NamedSharding:
    return NamedSharding(self.mesh, batch_spec(self.rules, ndim))

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  def params(self, boxed_abstract: Any) -> Any:
    """NamedShardings for a tree of boxed (logically named) abstract params. A dimension that the
    mesh axes do not divide (a 97-token test vocabulary, 3 kv heads over tensor=2) is replicated
    instead of split: uneven shards cannot be placed."""

    def spec(leaf):
      if not isinstance(leaf, nn.LogicallyPartitioned):
        return NamedSharding(self.mesh, P())
      axes = nn.logical_to_mesh_axes(leaf.names, self.rules)
      shape = leaf.value.shape
      fitted = []
      for dim, ax in zip(shape, tuple(axes) + (None,) * (len(shape) - len(axes))):
        names = () if ax is None else (ax if isinstance(ax, tuple) else (ax,))
        fitted.append(ax if dim % math.prod(self.mesh.shape[n] for n in names) == 0 else None)
      return NamedSharding(self.mesh, P(*fitted))

    return jax.tree.map(spec, boxed_abstract, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))

  def place(self, params: Any, shardings: Any) -> Any:
    """Host or device arrays → global arrays laid out by `shardings`; each device's shard is cut
    from the local copy (`make_array_from_callback`), so no device ever holds a whole tensor it
    does not keep."""

    def put(x, s):
      if isinstance(x, jax.Array) and x.sharding == s:
        return x
      if isinstance(x, jax.Array) and x.is_fully_addressable and s.is_fully_addressable:
        return jax.device_put(x, s)
      # Several processes: every one holds the same host value and places only its own shards.
      host = np.asarray(x)
      return jax.make_array_from_callback(host.shape, s, lambda index: host[index])

    return jax.tree.map(put, params, shardings)

  @contextlib.contextmanager
  def activated(self):
    """The mesh and rules in force while tracing (logical constraints inside the model)."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      yield

  def describe(self) -> str:
    return " × ".join(f"{n}={s}" for n, s in self.mesh.shape.items()) + f" ({self.mesh.size} devices)"
