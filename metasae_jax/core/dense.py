"""The accelerator algorithm: exact thresholds by bisection and masked dense products, nothing scattered.

Legend: B = rows on this device, D = input dim, N = latents on this device.
On GPU/TPU a matrix unit runs the dense B x N x D decoder and its gradients
far faster than the memory-bound gathers and scatters a slot decoder needs
(an H100 does ~1 PFLOP/s bf16 against ~3 TB/s), so this path keeps the
pre-activations dense: BatchTopK's global threshold and AuxK's per-row
thresholds come from bisections that count (one scalar or B-vector sum per
pass crosses devices), the mask is applied in place (`where`, never a scatter
into a zero B x N matrix), and autodiff of the masked products gives the
gradients: 3 products forward (encoder, decoder, AuxK decoder) and 5 backward.
Ties at a threshold all fire (the slots path, like `lax.top_k`, breaks them by
index); with real-valued pre-activations ties do not occur.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from metasae_jax.core import sae, topk
from metasae_jax.core.axes import Axes


class Recon(NamedTuple):
  """A reconstruction in standardised space and what fired."""
  recon_std_BxD: jax.Array
  active_N: jax.Array  # int32: rows of this device's batch on which each (local) latent fired
  l0_sum: jax.Array  # active entries on this device


def decode(params: dict, pre_BxN: jax.Array, on_BxN: jax.Array, compute_dtype: str, axes: Axes) -> Recon:
  """x̂' = (pre masked to `on`) W_dec + b_dec, the partial products summed over the latent axis."""
  acts_BxN = jnp.where(on_BxN, pre_BxN, 0.0)
  recon_BxD = axes.psum_latent(sae.matmul(acts_BxN, params["W_dec"], compute_dtype)) + params["b_dec"]
  return Recon(recon_BxD, jnp.sum(on_BxN, axis=0, dtype=jnp.int32), jnp.sum(on_BxN, dtype=jnp.int32))


def reconstruct(params: dict, xs_BxD: jax.Array, k: int, activation: str, axes: Axes,
                compute_dtype: str = "float32") -> tuple[Recon, jax.Array]:
  """The SAE's reconstruction, differentiable in params and inputs; also returns the pre-activations."""
  pre_BxN = sae.pre_activations(params, xs_BxD, compute_dtype)
  vals_BxN = jax.lax.stop_gradient(pre_BxN)
  if activation == "batchtopk":
    thresh = topk.batchtopk_threshold_dense(vals_BxN, k, axes)
  elif activation == "topk":
    thresh = topk.row_threshold(vals_BxN, k, axes, dense=True)
  else:
    raise ValueError(f"unknown activation {activation!r}; use 'batchtopk' or 'topk'")
  on_BxN = (vals_BxN >= thresh) & (vals_BxN > 0)
  return decode(params, pre_BxN, on_BxN, compute_dtype, axes), pre_BxN


def auxk(params: dict, pre_BxN: jax.Array, dead_N: jax.Array, residual_BxD: jax.Array, aux_k: int,
         detach: bool, compute_dtype: str, axes: Axes) -> jax.Array:
  """MSE of reconstructing the residual from each row's top aux_k dead latents (over all latent shards).

  Only positive entries fire, so a row with fewer than aux_k positive dead
  entries uses all of them: the reference's min(aux_k, #dead), whose extra
  picks are zeros.
  """
  vals_BxN = jax.lax.stop_gradient(pre_BxN)
  dead_vals_BxN = jnp.where(dead_N, vals_BxN, 0.0)
  width = pre_BxN.shape[1] * axes.latent_shards()
  t_B = topk.row_kth_largest(dead_vals_BxN, min(aux_k, width), axes.latent)
  on_BxN = (dead_vals_BxN >= t_B[:, None]) & (dead_vals_BxN > 0)
  acts_BxN = jnp.where(on_BxN, pre_BxN, 0.0)
  recon_BxD = axes.psum_latent(sae.matmul(acts_BxN, params["W_dec"], compute_dtype))
  target_BxD = jax.lax.stop_gradient(residual_BxD) if detach else residual_BxD
  return jnp.mean((recon_BxD - target_BxD) ** 2)
