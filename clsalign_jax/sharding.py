"""Mesh from the config, logical-axis rules → NamedSharding, and per-process batch placement.

Mesh axes are `data`, `fsdp`, `tensor`. Parameters and activations carry logical axis names
(model.py); the rules table (`config.mesh.logical_axis_rules`) is the only place that maps
them onto mesh axes, so a change of parallelism is a config edit.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXIS = "activation_batch"


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
