"""Matryoshka BatchTopK (Bussmann et al. 2025): the latents are nested prefixes m_1 < ... < m_P = N, and the
reconstruction from each prefix alone is trained too, so general features settle in the first latents and
specific ones cannot absorb them.

Legend: B = rows on this device, D = input dim, N = latents (on this device), P = prefixes.
Firing is BatchTopK over all N latents (as SAELens' matryoshka_batchtopk); the
prefix m_j reconstructs with the active latents among its first m_j. The loss
is the sum of the P prefixes' MSEs with equal weights (the paper's sum; the
full width is the last prefix), plus AuxK on the full residual. Dense
algorithm only: with the latents unsplit the prefixes are P slices whose
products add up to one decoder; split over a model axis, each prefix is a
masked decoder (P decoders' cost).
"""

import jax
import jax.numpy as jnp

from metasae_jax.core import dense, sae, topk
from metasae_jax.core.architectures import base
from metasae_jax.core.axes import Axes


def _prefix_recons(acts_BxN, w_dec_NxD, b_dec_D, widths, axes: Axes, compute_dtype):
  """[x̂'_{m_1}, ..., x̂'_{m_P}]: each prefix's reconstruction (global prefix widths)."""
  n = acts_BxN.shape[1]
  if not axes.latent:
    out, partial, start = [], 0.0, 0
    for m in widths:  # slices of one decoder: the P products cost one B x N x D product
      partial = partial + sae.matmul(acts_BxN[:, start:m], w_dec_NxD[start:m], compute_dtype)
      out.append(partial + b_dec_D)
      start = m
    return out
  index_N = jax.lax.axis_index(axes.latent) * n + jnp.arange(n)
  return [axes.psum_latent(sae.matmul(jnp.where(index_N < m, acts_BxN, 0.0), w_dec_NxD, compute_dtype)) + b_dec_D
          for m in widths]


def _loss(recons, xs_BxD, widths):
  mses = [jnp.mean((r - xs_BxD) ** 2) for r in recons]
  terms = {f"prefix_mse/{m}": v for m, v in zip(widths[:-1], mses[:-1])}
  return mses[-1], sum(mses[:-1], jnp.zeros_like(mses[-1])), terms


class MatryoshkaBatchTopK(base.Architecture):
  name = "matryoshka_batchtopk"

  def train_forward(self, params, xs_BxD, k, options, axes: Axes, path, compute_dtype) -> base.TrainForward:
    del path  # dense only (the registry's spec)
    pre_BxN = sae.pre_activations(params, xs_BxD, compute_dtype)
    vals_BxN = jax.lax.stop_gradient(pre_BxN)
    on_BxN = (vals_BxN >= topk.batchtopk_threshold_dense(vals_BxN, k, axes)) & (vals_BxN > 0)
    acts_BxN = jnp.where(on_BxN, pre_BxN, 0.0)
    widths = options.matryoshka_widths
    recons = _prefix_recons(acts_BxN, params["W_dec"], params["b_dec"], widths, axes, compute_dtype)
    rec = dense.Recon(recons[-1], jnp.sum(on_BxN, axis=0, dtype=jnp.int32), jnp.sum(on_BxN, dtype=jnp.int32))
    mse, extra, terms = _loss(recons, xs_BxD, widths)
    return base.TrainForward(rec, pre_BxN, base.no_events(), mse, extra, terms)

  def naive_forward(self, params, xs_BxD, k, options, compute_dtype):
    pre = jax.nn.relu(sae.matmul(xs_BxD - params["b_dec"], params["W_enc"], compute_dtype) + params["b_enc"])
    acts = topk.batchtopk_reference(pre, k)
    widths = options.matryoshka_widths
    recons = [sae.matmul(acts[:, :m], params["W_dec"][:m], compute_dtype) + params["b_dec"] for m in widths]
    mse, extra, terms = _loss(recons, xs_BxD, widths)
    return pre, acts, recons[-1], mse + extra, terms


ARCHITECTURE = MatryoshkaBatchTopK()
