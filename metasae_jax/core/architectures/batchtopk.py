"""BatchTopK (Bussmann et al. 2024; the paper's primary and every meta SAE): the k·B largest pre-activations
of the batch fire. `TopKFamily` also serves per-token TopK (topk.py).

Legend: B = rows on this device, D = input dim, N = latents on this device.
"""

import jax
import jax.numpy as jnp

from metasae_jax.core import dense, sae, slots, topk
from metasae_jax.core.architectures import base
from metasae_jax.core.axes import Axes


class TopKFamily(base.Architecture):
  """A k-sparse rule over ReLU pre-activations, on the slots (CPU) or dense (GPU/TPU) algorithm."""

  def train_forward(self, params, xs_BxD, k, options, axes: Axes, path, compute_dtype) -> base.TrainForward:
    del options
    if path == "dense":
      rec, pre_BxN = dense.reconstruct(params, xs_BxD, k, self.name, axes, compute_dtype)
      events = base.no_events()
    else:
      rec, pre_BxN, events = slots.reconstruct(params, xs_BxD, k, self.name, axes, compute_dtype)
    mse = jnp.mean((rec.recon_std_BxD - xs_BxD) ** 2)
    return base.TrainForward(rec, pre_BxN, events, mse, jnp.zeros_like(mse), {})

  def naive_fire(self, pre_BxN, k):
    raise NotImplementedError

  def naive_forward(self, params, xs_BxD, k, options, compute_dtype):
    del options
    pre = jax.nn.relu(sae.matmul(xs_BxD - params["b_dec"], params["W_enc"], compute_dtype) + params["b_enc"])
    acts = self.naive_fire(pre, k)
    recon_std = sae.matmul(acts, params["W_dec"], compute_dtype) + params["b_dec"]
    return pre, acts, recon_std, jnp.mean((recon_std - xs_BxD) ** 2), {}


class BatchTopK(TopKFamily):
  name = "batchtopk"

  def naive_fire(self, pre_BxN, k):
    return topk.batchtopk_reference(pre_BxN, k)


ARCHITECTURE = BatchTopK()
