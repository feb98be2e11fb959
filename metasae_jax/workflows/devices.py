"""What the compiled multi-device step costs per device, read from XLA's own compiled program (no timing).

Legend: B = global batch, D = d_model, N = width.
For a mesh of `data x model` devices the step is lowered and compiled (never
run), then read: XLA's cost analysis (FLOPs, bytes accessed), its memory
analysis (arguments, temporaries, outputs per device) and every collective in
the optimised HLO with its shape. This is how the scaling claims are checked
without accelerators; the figures are XLA:CPU's for its own compilation, an
accelerator's compiler fuses and schedules differently.
"""

import dataclasses
import math
import re
from typing import Optional

import jax
import numpy as np

from metasae_jax.core.config import TrainConfig
from metasae_jax.training import sharding

COLLECTIVES = ("all-reduce", "all-gather", "all-to-all", "collective-permute", "reduce-scatter")
GATHERS = ("all-gather", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4,
                "s64": 8, "u64": 8, "f64": 8}
# `%name = SHAPE op(` where SHAPE is `f32[4,8]{1,0}` or a tuple of them; async pairs count at their -start.
_INSTRUCTION = re.compile(r"=\s*(\(.*?\)|\w+\[[\d,]*\](?:\{[^}]*\})?)\s+(" + "|".join(COLLECTIVES) +
                          r")(?:-start)?\(")
_ARRAY = re.compile(r"(\w+)\[([\d,]*)\]")


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective of the compiled step: its op and the arrays it moves (dtype, shape)."""
  op: str
  arrays: tuple

  @property
  def elements(self) -> int:
    return sum(math.prod(shape) for _, shape in self.arrays)

  @property
  def bytes(self) -> int:
    return sum(_DTYPE_BYTES.get(dtype, 4) * math.prod(shape) for dtype, shape in self.arrays)


def collectives(hlo_text: str) -> list:
  """Every collective instruction of an optimised HLO module (fusion bodies hold none)."""
  out = []
  for line in hlo_text.splitlines():
    found = _INSTRUCTION.search(line)
    if not found:
      continue
    arrays = tuple((dtype, tuple(int(d) for d in dims.split(",") if d))
                   for dtype, dims in _ARRAY.findall(found.group(1)))
    out.append(Collective(found.group(2), arrays))
  return out


def compile_step(config: TrainConfig, data: int, model: int = 1, devices: Optional[list] = None):
  """The trainer's step for a (data, model) mesh, lowered and compiled (not run)."""
  devices = jax.devices()[:data * model] if devices is None else devices
  mesh = sharding.Mesh(config, model, devices=devices)
  batch = jax.ShapeDtypeStruct((config.batch_size, config.d_model), np.float16, sharding=mesh.batch_sharding)
  return mesh.step_fn().lower(mesh.abstract(), batch).compile()


def analyze(config: TrainConfig, data: int, model: int = 1) -> dict:
  """Per-device FLOPs, bytes, memory and collectives of the compiled step on a data x model mesh."""
  compiled = compile_step(config, data, model)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  mem = compiled.memory_analysis()
  found = collectives(compiled.as_text())
  batch_dim = config.batch_size
  return {
      "data": data, "model": model, "devices": data * model,
      "gflops_per_device": float(cost.get("flops", 0.0)) / 1e9,
      "gbytes_accessed_per_device": float(cost.get("bytes accessed", 0.0)) / 1e9,
      "argument_mb": mem.argument_size_in_bytes / 2**20, "temp_mb": mem.temp_size_in_bytes / 2**20,
      "output_mb": mem.output_size_in_bytes / 2**20,
      "collectives": [{"op": c.op, "arrays": [f"{d}{list(s)}" for d, s in c.arrays], "mb": c.bytes / 2**20}
                      for c in found],
      "collective_mb": sum(c.bytes for c in found) / 2**20,
      "largest_collective_mb": max((c.bytes for c in found), default=0) / 2**20,
      # Gathers and permutes of an array with the global batch as a dimension and >= B*128 elements (what
      # XLA's partitioner emits to gather the B x N pre-activations for a row top_k).
      "batch_sized_gathers": [f"{c.op} {c.arrays}" for c in found if c.op in GATHERS and any(
          batch_dim in s and math.prod(s) >= batch_dim * 128 for _, s in c.arrays)],
  }



def mesh_shapes(counts) -> list:
  """Every (data, model) mesh over each device count, data-parallel first."""
  return [(n // m, m) for n in counts for m in range(1, n + 1) if n % m == 0]


def markdown(rows: list) -> str:
  """The devices table as docs/performance.md shows it."""
  lines = ["| devices | data x model | GFLOP / device | GB accessed / device | arguments MB | temporaries MB "
           "| collectives MB (largest) | batch-sized gathers |", "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['devices']} | {r['data']} x {r['model']} | {r['gflops_per_device']:.0f} | "
                 f"{r['gbytes_accessed_per_device']:.1f} | {r['argument_mb']:.0f} | {r['temp_mb']:.0f} | "
                 f"{r['collective_mb']:.0f} ({r['largest_collective_mb']:.0f}) | {len(r['batch_sized_gathers'])} |")
  return "\n".join(lines)
