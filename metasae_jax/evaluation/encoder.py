"""A loaded SAE as a jitted streaming encoder: firing counts, per-latent top/reservoir candidates, window activations.

Legend: B = tokens in a batch, D = d_model, N = latents, C = tracked (candidate)
latents, K = top tokens kept per latent, R = reservoir size, W = window tokens.
Encoding is `LoadedSAE`'s own (`loaded_sae.encode_traced`, i.e. the training forward's encode);
this module only reduces each batch's codes to what the example streamer keeps.
"""

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from metasae_jax.storage.loaded_sae import LoadedSAE, encode_traced

# Reservoir key of a token where the latent does not fire: above every uniform key in [0, 1).
NOT_FIRING_KEY = 2.0


class BatchStats(NamedTuple):
  """What one batch contributes; indices are positions within the batch."""
  count_N: jax.Array
  threshold: jax.Array
  top_val_CxK: jax.Array
  top_pos_CxK: jax.Array
  res_key_CxR: jax.Array
  res_val_CxR: jax.Array
  res_pos_CxR: jax.Array


class StreamEncoder:
  """One loaded SAE under one firing rule (None = the SAE's default: θ if calibrated, else per-token top-k)."""

  def __init__(self, sae: LoadedSAE, firing: Optional[str] = None):
    self.sae = sae
    self.rule = sae.firing_rule(firing)

  @property
  def width(self) -> int:
    return self.sae.width

  def _static(self) -> dict:
    return dict(k=self.sae.k, rule=self.rule, input_norm=self.sae.input_norm)

  def batch_stats(self, x_BxD: np.ndarray, cand_C: np.ndarray, rng: jax.Array, top: int,
                  reservoir: int) -> BatchStats:
    return _batch_stats(self.sae.device_params, self.sae.device_threshold_N, jnp.asarray(x_BxD, jnp.float32),
                        jnp.asarray(cand_C), rng, top=min(top, x_BxD.shape[0]),
                        reservoir=min(reservoir, x_BxD.shape[0]), **self._static())

  def window_acts(self, x_WxD: np.ndarray, batch_threshold_W: np.ndarray,
                  cols_C: np.ndarray) -> np.ndarray:
    """Activations [W, C] of latents `cols_C` on arbitrary tokens, each under the threshold of its batch."""
    out = _window_acts(self.sae.device_params, self.sae.device_threshold_N, jnp.asarray(x_WxD, jnp.float32),
                       jnp.asarray(batch_threshold_W, jnp.float32), jnp.asarray(cols_C), **self._static())
    return np.asarray(out)


@functools.partial(jax.jit, static_argnames=("k", "rule", "input_norm", "top", "reservoir"))
def _batch_stats(params, threshold_N: Optional[jax.Array], x_BxD, cand_C, rng, *, k, rule,
                 input_norm, top, reservoir) -> BatchStats:
  acts_BxN = encode_traced(params, x_BxD, threshold_N, k=k, firing=rule, input_norm=input_norm).acts_BxN
  if rule == "batchtopk":
    # The batch's smallest selected value: "pre >= it" reselects exactly this batch's firings, so
    # window activations can later be recomputed token by token (+inf if nothing fired).
    thresh = jnp.min(jnp.where(acts_BxN > 0, acts_BxN, jnp.inf))
  else:
    thresh = jnp.float32(jnp.nan)
  count_N = jnp.sum(acts_BxN > 0, axis=0, dtype=jnp.int32)
  acts_CxB = acts_BxN[:, cand_C].T
  top_val, top_pos = jax.lax.top_k(acts_CxB, top)
  # Bottom-`reservoir` uniform keys over firing tokens = a uniform sample without
  # replacement; merged across batches by keeping the smallest keys.
  keys_CxB = jnp.where(acts_CxB > 0, jax.random.uniform(rng, acts_CxB.shape), NOT_FIRING_KEY)
  neg_key, res_pos = jax.lax.top_k(-keys_CxB, reservoir)
  res_val = jnp.take_along_axis(acts_CxB, res_pos, axis=1)
  return BatchStats(count_N, thresh, top_val, top_pos, -neg_key, res_val, res_pos)


@functools.partial(jax.jit, static_argnames=("k", "rule", "input_norm"))
def _window_acts(params, threshold_N, x_WxD, batch_threshold_W, cols_C, *, k, rule, input_norm):
  if rule == "batchtopk":
    # Each token fires where pre >= its batch's threshold t, i.e. pre > the float just below t:
    # the calibrated-θ rule with a per-token θ.
    threshold_N, rule = jnp.nextafter(batch_threshold_W, -jnp.inf)[:, None], "threshold"
  acts_WxN = encode_traced(params, x_WxD, threshold_N, k=k, firing=rule, input_norm=input_norm).acts_BxN
  return acts_WxN[:, cols_C]
