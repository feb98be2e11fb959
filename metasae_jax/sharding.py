"""Data parallelism with JAX's own machinery: one mesh axis `data`, params replicated.

Legend: B = global batch, b = this process's rows of it, D = d_model.
"""

from typing import Optional

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from metasae_jax.errors import UserError

DATA_AXIS = "data"


def initialize_distributed(coordinator_address: Optional[str], num_processes: Optional[int],
                           process_id: Optional[int]) -> None:
  """Joins a multi-process run; CPU processes talk over gloo (must precede initialize)."""
  if not coordinator_address:
    return
  if jax.default_backend() == "cpu" or jax.config.jax_platforms in ("cpu",):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id)


class DataParallel:
  """A 1-D mesh over all devices (of all processes); shardings for state and batches."""

  def __init__(self, batch_size: int, devices=None):
    devices = jax.devices() if devices is None else devices
    if batch_size % len(devices):
      raise UserError(f"--batch_size {batch_size} is not divisible by the device count {len(devices)}. "
                      f"Use a multiple of {len(devices)}.")
    self.mesh = jax.make_mesh((len(devices),), (DATA_AXIS,), devices=devices,
                              axis_types=(jax.sharding.AxisType.Auto,))
    self.replicated = NamedSharding(self.mesh, P())
    self.batch_sharding = NamedSharding(self.mesh, P(DATA_AXIS))
    self.batch_size = batch_size

  def put_state(self, state):
    return jax.device_put(state, self.replicated)

  def put_batch(self, local_bxD: np.ndarray) -> jax.Array:
    """This process's rows → one global [B, D] array sharded over `data`."""
    if jax.process_count() == 1:
      return jax.device_put(local_bxD, self.batch_sharding)
    return jax.make_array_from_process_local_data(self.batch_sharding, local_bxD,
                                                  (self.batch_size,) + local_bxD.shape[1:])
