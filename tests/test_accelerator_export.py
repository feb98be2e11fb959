"""What GPU/TPU run: the public train_step exported for `tpu` and `cuda` from this CPU host, read as StableHLO.

Legend: B = batch, D = d_model, N = width. No accelerator here: the exported
module is the program an accelerator would compile, so its ops are checked
directly (custom calls, scatters, sorts, dots and their dtypes).
"""

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import pytest

from metasae_jax.core.config import TrainConfig
from metasae_jax.core.train_step import init_train_state, train_step

B, D, N = 256, 32, 1024
CFG = TrainConfig(d_model=D, width=N, k=8, meta_width=48, meta_k=4, batch_size=B, n_primary_steps=2,
                  n_meta_steps=1)
_DOT = re.compile(r"stablehlo\.dot_general .*contracting_dims = \[([\d, ]*)\] x \[([\d, ]*)\].*"
                  r": \(tensor<([^>]*)>, tensor<([^>]*)>\) -> tensor<([^>]*)>")
_SCATTER = re.compile(r"stablehlo\.scatter.*-> tensor<([^>]*)>")


def _dims(tensor_type: str) -> tuple:
  return tuple(int(d) for d in tensor_type.split("x")[:-1])


def _dtype(tensor_type: str) -> str:
  return tensor_type.split("x")[-1]


def _export(config: TrainConfig, platform: str) -> str:
  state = init_train_state(config)
  batch = jax.ShapeDtypeStruct((B, D), jnp.float16)
  return jax.export.export(jax.jit(train_step), platforms=[platform])(state, batch).mlir_module()


def _dots(module: str) -> list:
  """(lhs type, rhs type, result type, flops) of every dot in the module."""
  out = []
  for lhs_c, rhs_c, lhs, rhs, res in _DOT.findall(module):
    rhs_dims = _dims(rhs)
    contracted = math.prod(rhs_dims[int(i)] for i in rhs_c.split(",") if i.strip())
    out.append((lhs, rhs, res, 2 * math.prod(_dims(lhs)) * math.prod(rhs_dims) // contracted))
  return out


@pytest.fixture(scope="module", params=["tpu", "cuda"])
def exported(request):
  return request.param, _export(CFG, request.param)


def test_accelerator_step_has_no_custom_call_scatter_sort_or_top_k(exported):
  platform, module = exported
  assert "stablehlo.custom_call" not in module, platform  # the CPU kernels' branch is dropped
  big = [t for t in _SCATTER.findall(module) if math.prod(_dims(t)) >= B * N // 4]
  assert not big, (platform, big)
  assert "top_k" not in module and "stablehlo.sort" not in module, platform
  assert "stablehlo.case" in module or "stablehlo.while" in module  # sanity: the whole step is there


def test_accelerator_step_runs_bf16_dense_products_with_f32_accumulation(exported):
  platform, module = exported
  dots = _dots(module)
  # Every B x N x D product (encoder, decoder, AuxK decoder and their gradients): 3 forward + 5 backward
  # per primary SAE, joint and solo, nothing scattered into B x N first.
  big = [d for d in dots if d[3] == 2 * B * N * D]
  assert len(big) == 16, (platform, [d[:3] for d in big])
  for lhs, rhs, res, _ in big:
    assert _dtype(lhs) == _dtype(rhs) == "bf16" and _dtype(res) == "f32", (platform, lhs, rhs, res)
  # The meta SAE too: its N x D x M encoder product runs in bf16.
  assert any(_dims(lhs) == (N, D) and _dtype(lhs) == "bf16" and _dims(res) == (N, 48) for lhs, _, res, _ in dots)


def test_float32_when_asked_for():
  module = _export(dataclasses.replace(CFG, compute_dtype="float32"), "tpu")
  dots = _dots(module)
  assert dots and not [d for d in dots if "bf16" in d[0] + d[1]]
  assert len([d for d in dots if d[3] == 2 * B * N * D]) == 16


def test_cpu_lowering_keeps_the_slot_kernels():
  """The same `auto` step lowered for the CPU takes the slots path (native kernels when built)."""
  from metasae_jax.core import native  # pylint: disable=g-import-not-at-top
  if not native.available():
    pytest.skip("native kernels not built here")
  text = jax.jit(train_step).lower(init_train_state(CFG), jnp.zeros((B, D), jnp.float16)).as_text()
  assert "metasae_row_top_k" in text and "metasae_slot_gather_sum" in text


@pytest.mark.parametrize("architecture,extra", [("matryoshka_batchtopk", {"matryoshka_widths": (128, 512)}),
                                                ("jumprelu", {})])
def test_dense_only_architectures_export_without_sorts_and_at_one_decoders_cost(architecture, extra):
  """Matryoshka's prefixes are slices of one decoder (their products add up to B x N x D, not P times it);
  JumpReLU has no AuxK (5 products per SAE instead of 8). No sort, top_k, custom call or B x N scatter."""
  module = _export(dataclasses.replace(CFG, architecture=architecture, **extra), "tpu")
  assert "stablehlo.custom_call" not in module and "top_k" not in module and "stablehlo.sort" not in module
  assert not [t for t in _SCATTER.findall(module) if math.prod(_dims(t)) >= B * N // 4]
  batch_flops = sum(d[3] for d in _dots(module) if B in _dims(d[0]) or B in _dims(d[1]))
  per_sae = {"matryoshka_batchtopk": 8, "jumprelu": 5}[architecture]
  assert batch_flops == pytest.approx(2 * per_sae * 2 * B * N * D, rel=0.02), batch_flops / (2 * B * N * D)
