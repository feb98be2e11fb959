"""Data parallelism with JAX's own machinery: one mesh axis `data`, params replicated.

Legend: B = global batch, b = this process's rows of it, D = d_model.
"""

from typing import Optional

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from metasae_jax.core.errors import UserError

DATA_AXIS = "data"


def initialize_distributed(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
                           process_id: Optional[int] = None, auto: bool = False) -> None:
  """Joins a multi-process run: explicit coordinator flags, or `auto` detection (TPU pods, SLURM, ...).

  Must run before anything touches a JAX backend. CPU processes exchange
  collectives over gloo; the setting only affects the CPU client, so it is
  set unconditionally (asking for the backend first would initialise it too early).
  """
  if not coordinator_address and not auto:
    if num_processes is not None or process_id is not None:
      raise UserError("--num_processes/--process_id need --coordinator_address (host:port of process 0), "
                      "or use --distributed to auto-detect the cluster.")
    return
  if coordinator_address and auto:
    raise UserError("pass either --distributed (auto-detect) or --coordinator_address, not both.")
  if coordinator_address and (num_processes is None or process_id is None):
    raise UserError("--coordinator_address needs --num_processes and --process_id too.")
  if coordinator_address and not 0 <= process_id < num_processes:
    raise UserError(f"--process_id {process_id} must be in [0, --num_processes={num_processes}).")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    if auto:
      jax.distributed.initialize()
    else:
      jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                 process_id=process_id)
  except (RuntimeError, ValueError) as e:
    how = "--distributed (auto-detection)" if auto else f"--coordinator_address {coordinator_address}"
    raise UserError(f"could not join the multi-process run with {how}: {e}") from e


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
    # Via host memory: a restored checkpoint is committed to one local device, and
    # device_put from it to a mesh spanning processes would be a cross-host transfer.
    return jax.device_put(jax.device_get(state), self.replicated)

  def put_batch(self, local_bxD: np.ndarray) -> jax.Array:
    """This process's rows → one global [B, D] array sharded over `data`."""
    if jax.process_count() == 1:
      return jax.device_put(local_bxD, self.batch_sharding)
    return jax.make_array_from_process_local_data(self.batch_sharding, local_bxD,
                                                  (self.batch_size,) + local_bxD.shape[1:])
