"""The device mesh: a 2-D (data, model) mesh, the state's layout on it, and the per-device step under shard_map.

Legend: B = global batch, b = this process's rows of it, D = d_model, N = primary latents.
The step is written per device (`train_step(..., axis_name, model_axis)`); here
it runs under `jax.shard_map`, so every collective is one the step chose (count
and gradient sums, partial decodes over `model`), never one XLA's partitioner
inferred from a global view (it cannot split a row top_k and would gather the
B x N pre-activations). The primary SAEs' latents are split over `model`
(W_enc's columns, b_enc, W_dec's rows, their Adam moments, the dead counters);
everything else is replicated, and the batch is split over `data`.
"""

import functools
from typing import Optional

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from metasae_jax.core.config import TrainConfig
from metasae_jax.core.errors import UserError
from metasae_jax.core.train_step import init_train_state, train_step

DATA_AXIS = "data"
MODEL_AXIS = "model"
# How each primary SAE tensor (and its Adam moments) is laid out over the model axis.
_PRIMARY_SPECS = {"W_enc": P(None, MODEL_AXIS), "b_enc": P(MODEL_AXIS), "W_dec": P(MODEL_AXIS, None),
                  "b_dec": P(), "since_fired": P(MODEL_AXIS), "log_threshold": P(MODEL_AXIS)}


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


def check_layout(num_devices: int, model_parallel: int, batch_size: int, width: int) -> tuple[int, int]:
  """(data, model) sizes of the mesh, or one error naming the flag to change."""
  if model_parallel < 1 or num_devices % model_parallel:
    raise UserError(f"--model_parallel {model_parallel} must divide the device count {num_devices} "
                    f"(the mesh is data = devices / model_parallel by model = model_parallel).")
  data = num_devices // model_parallel
  if batch_size % data:
    raise UserError(f"--batch_size {batch_size} is not divisible by the data-parallel size {data} "
                    f"({num_devices} devices / --model_parallel {model_parallel}). Use a multiple of {data}.")
  if width % num_devices:
    raise UserError(f"--width {width} is not divisible by the device count {num_devices} (the latents are split "
                    f"over --model_parallel {model_parallel} devices and the meta SAE's rows over all "
                    f"{num_devices}). Use a multiple of {num_devices}.")
  return data, model_parallel


def state_specs(state, model_axis: Optional[str] = MODEL_AXIS):
  """PartitionSpecs of a TrainState (arrays or ShapeDtypeStructs): the primaries' latents over `model_axis`."""

  def spec(path, _):
    names = [getattr(k, "name", getattr(k, "key", None)) for k in path]
    if model_axis is None or names[0] not in ("joint", "solo"):
      return P()
    last = next((n for n in reversed(names) if n in _PRIMARY_SPECS), None)
    if last is None:  # Adam's step count
      return P()
    return _PRIMARY_SPECS[last]

  return jax.tree_util.tree_map_with_path(spec, state)


def host_copy(tree):
  """The whole tree in host memory on every process (gathered when arrays span processes)."""
  def one(a):
    if isinstance(a, jax.Array) and not a.is_fully_addressable and not a.is_fully_replicated:
      return np.asarray(multihost_utils.process_allgather(a, tiled=True))
    return np.asarray(jax.device_get(a))
  return jax.tree.map(one, tree)


class Mesh:
  """A (data, model) mesh over all devices (of all processes): state layout, batches, the compiled step."""

  def __init__(self, config: TrainConfig, model_parallel: int = 1, devices=None):
    devices = jax.devices() if devices is None else devices
    data, model = check_layout(len(devices), model_parallel, config.batch_size, config.width)
    self.mesh = jax.make_mesh((data, model), (DATA_AXIS, MODEL_AXIS), devices=devices,
                              axis_types=(jax.sharding.AxisType.Auto,) * 2)
    self.config = config
    self.data_size, self.model_size = data, model
    self.platform = devices[0].platform
    self.batch_sharding = NamedSharding(self.mesh, P(DATA_AXIS))
    self.replicated = NamedSharding(self.mesh, P())
    self.abstract_state = jax.eval_shape(functools.partial(init_train_state, config))
    self.specs = state_specs(self.abstract_state)
    self.state_shardings = jax.tree.map(lambda s: NamedSharding(self.mesh, s), self.specs)

  def abstract(self):
    """The state's shapes, dtypes and target shardings (what a checkpoint restores onto)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), self.abstract_state,
                        self.state_shardings)

  def init_state(self):
    """A fresh state created directly in its layout (no device ever holds a whole sharded tensor)."""
    return jax.jit(functools.partial(init_train_state, self.config), out_shardings=self.state_shardings)()

  def put_state(self, host_state):
    """A host (numpy) state, the same on every process, into its layout."""
    return jax.device_put(host_state, self.state_shardings)

  def step_fn(self):
    """train_step under shard_map on this mesh, jitted once, the state donated."""
    per_device = functools.partial(train_step, axis_name=DATA_AXIS, model_axis=MODEL_AXIS)
    mapped = jax.shard_map(per_device, mesh=self.mesh, in_specs=(self.specs, P(DATA_AXIS)),
                           out_specs=(self.specs, P()))
    return jax.jit(mapped, in_shardings=(self.state_shardings, self.batch_sharding),
                   out_shardings=(self.state_shardings, self.replicated), donate_argnums=0)

  def process_rows(self) -> tuple[int, int]:
    """(index, count): this process needs slice `index` of the global batch cut into `count` equal slices."""
    b = self.config.batch_size
    rows = sorted({(s[0].start or 0, b if s[0].stop is None else s[0].stop)
                   for s in self.batch_sharding.addressable_devices_indices_map((b, 1)).values()})
    start, stop = rows[0][0], rows[-1][1]
    if any(a[1] != c[0] for a, c in zip(rows, rows[1:])) or b % (stop - start) or start % (stop - start):
      raise UserError(f"this process's devices hold rows {rows} of the batch, not one aligned slice; use a "
                      "--model_parallel that keeps each host's devices on consecutive data rows.")
    return start // (stop - start), b // (stop - start)

  def put_batch(self, local_bxD: np.ndarray) -> jax.Array:
    """This process's rows → one global [B, D] array split over `data` (replicated over `model`)."""
    if jax.process_count() == 1:
      return jax.device_put(local_bxD, self.batch_sharding)
    return jax.make_array_from_process_local_data(self.batch_sharding, local_bxD,
                                                  (self.config.batch_size,) + local_bxD.shape[1:])
