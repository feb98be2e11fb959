"""SAE training losses: reconstruction MSE, AuxK over dead latents, batch metrics.

Legend: B = batch, D = input dim, N = latents.
"""

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from metasae_jax import sae, topk


class SAELoss(NamedTuple):
  """Loss pieces and batch statistics of one SAE forward (everything a scalar but fired_N)."""
  mse: jax.Array
  aux: jax.Array
  fvu: jax.Array
  l0: jax.Array
  fired_N: jax.Array  # bool: latent fired somewhere in the (global) batch


def _pmean(x, axis_name):
  return x if axis_name is None else jax.lax.pmean(x, axis_name)


def _psum(x, axis_name):
  return x if axis_name is None else jax.lax.psum(x, axis_name)


def auxk_loss(pre_BxN: jax.Array, dead_N: jax.Array, w_dec_NxD: jax.Array, residual_BxD: jax.Array,
              aux_k: int) -> jax.Array:
  """MSE of reconstructing the detached residual from each token's top aux_k dead latents.

  Usually few latents are dead, so when at most `dead_cap(N)` are, only their
  columns are gathered (M = cap): the aux decode is B x M x D instead of
  B x N x D. With more dead latents the full-width path runs. Both are exact.
  """
  n = pre_BxN.shape[-1]
  target_BxD = jax.lax.stop_gradient(residual_BxD)
  cap = dead_cap(n)

  def full():
    # Live latents are zeroed, so when fewer than aux_k latents are dead the extra
    # picks are zeros and contribute nothing: the reference's min(aux_k, #dead).
    masked_BxN = jnp.where(dead_N, pre_BxN, 0.0)
    aux_BxN = topk.topk_per_token(masked_BxN, min(aux_k, n))
    return jnp.mean((aux_BxN @ w_dec_NxD - target_BxD) ** 2)

  def capped():
    _, idx_M = jax.lax.top_k(dead_N.astype(jnp.float32), cap)  # every dead latent, padded with live ones
    masked_BxM = jnp.where(dead_N[idx_M], pre_BxN[:, idx_M], 0.0)
    aux_BxM = topk.topk_per_token(masked_BxM, min(aux_k, cap))
    return jnp.mean((aux_BxM @ w_dec_NxD[idx_M] - target_BxD) ** 2)

  if cap >= n:
    return full()
  return jax.lax.cond(jnp.sum(dead_N) <= cap, capped, full)


def dead_cap(n: int) -> int:
  """How many dead latents the gathered AuxK path handles (static)."""
  return min(n, max(1024, n // 8))


def sae_loss(params: dict, x_BxD: jax.Array, dead_N: jax.Array, k: int, activation: str, aux_k: int,
             aux_coeff: float, axis_name: Optional[str] = None) -> tuple[jax.Array, SAELoss]:
  """MSE on standardised inputs + aux_coeff * AuxK (only when some latent is dead)."""
  out = sae.forward(params, x_BxD, k, activation, axis_name=axis_name)
  mse = jnp.mean((out.recon_std_BxD - out.xs_BxD) ** 2)
  residual = out.xs_BxD - out.recon_std_BxD
  aux = jax.lax.cond(jnp.any(dead_N),
                     lambda: auxk_loss(out.pre_BxN, dead_N, params["W_dec"], residual, aux_k),
                     # zeros_like, not zeros: under shard_map both branches must vary over the axis alike.
                     lambda: jnp.zeros_like(mse))
  fired_N = _psum(jnp.sum(out.acts_BxN > 0, axis=0), axis_name) > 0
  x = jax.lax.stop_gradient(x_BxD)
  # FVU over the (global) batch, in the input's own space.
  count = _psum(x.shape[0], axis_name)
  mean_D = _psum(jnp.sum(x, axis=0), axis_name) / count
  err = _psum(jnp.sum((x - jax.lax.stop_gradient(out.recon_BxD)) ** 2), axis_name)
  var = _psum(jnp.sum((x - mean_D) ** 2), axis_name)
  l0 = _pmean(jnp.mean(jnp.sum(out.acts_BxN > 0, axis=-1).astype(jnp.float32)), axis_name)
  stats = SAELoss(mse=mse, aux=aux, fvu=err / var, l0=l0, fired_N=fired_N)
  return mse + aux_coeff * aux, stats


def update_since_fired(since_fired_N: jax.Array, fired_N: jax.Array) -> jax.Array:
  """Counts batches since each latent last fired (reset to 0 when it fires)."""
  return jnp.where(fired_N, 0, since_fired_N + 1)
