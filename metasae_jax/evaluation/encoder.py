"""One SAE artifact as a jitted streaming encoder: firing counts, per-latent top/reservoir candidates, window activations.

Legend: B = tokens in a batch, D = d_model, N = latents, C = tracked (candidate)
latents, K = top tokens kept per latent, R = reservoir size, W = window tokens.
"""

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from metasae_jax.storage import artifact
from metasae_jax.core import sae, topk
from metasae_jax.core.errors import UserError

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


class SaeEncoder:
  """Encodes with calibrated thresholds when the artifact has them, else with its training rule (BatchTopK)."""

  def __init__(self, path: str):
    tensors, cfg = artifact.load_sae_files(path)
    self.path = path
    self.cfg = cfg
    self.k = int(cfg["k"])
    self.activation = str(cfg["activation"])
    self.input_norm = str(cfg["input_norm"])
    if self.activation not in ("batchtopk", "topk"):
      raise UserError(f"SAE artifact {path}: activation {self.activation!r} is not supported by "
                      "autointerp (use 'batchtopk' or 'topk', or calibrate a 'threshold' tensor).")
    if self.input_norm not in ("standardize_per_token", "none"):
      raise UserError(f"SAE artifact {path}: unknown input_norm {self.input_norm!r}.")
    self.params = {name: jnp.asarray(tensors[name]) for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    self.threshold_N = jnp.asarray(tensors["threshold"]) if "threshold" in tensors else None
    self.d_model, self.width = tensors["W_enc"].shape
    self.w_dec_NxD = tensors["W_dec"]

  @property
  def rule(self) -> str:
    """How latents fire: 'threshold' (calibrated, batch-independent), 'batchtopk' or 'topk'."""
    return "threshold" if self.threshold_N is not None else self.activation

  def batch_stats(self, x_BxD: np.ndarray, cand_C: np.ndarray, rng: jax.Array, top: int,
                  reservoir: int) -> BatchStats:
    return _batch_stats(self.params, self.threshold_N, jnp.asarray(x_BxD), jnp.asarray(cand_C), rng,
                        k=self.k, rule=self.rule, input_norm=self.input_norm,
                        top=min(top, x_BxD.shape[0]), reservoir=min(reservoir, x_BxD.shape[0]))

  def window_acts(self, x_WxD: np.ndarray, batch_threshold_W: np.ndarray,
                  cols_C: np.ndarray) -> np.ndarray:
    """Activations [W, C] of latents `cols_C` on arbitrary tokens, each under the threshold of its batch."""
    out = _window_acts(self.params, self.threshold_N, jnp.asarray(x_WxD),
                       jnp.asarray(batch_threshold_W, jnp.float32), jnp.asarray(cols_C),
                       k=self.k, rule=self.rule, input_norm=self.input_norm)
    return np.asarray(out)


def _pre(params: dict, x_BxD: jax.Array, input_norm: str) -> jax.Array:
  xs_BxD = sae.standardize(x_BxD)[0] if input_norm == "standardize_per_token" else x_BxD
  return sae.pre_activations(params, xs_BxD)


@functools.partial(jax.jit, static_argnames=("k", "rule", "input_norm", "top", "reservoir"))
def _batch_stats(params, threshold_N: Optional[jax.Array], x_BxD, cand_C, rng, *, k, rule,
                 input_norm, top, reservoir) -> BatchStats:
  pre_BxN = _pre(params, x_BxD, input_norm)
  if rule == "threshold":
    acts_BxN = topk.threshold_activation(pre_BxN, threshold_N)
    thresh = jnp.float32(jnp.nan)
  elif rule == "batchtopk":
    # The same selection as topk.batchtopk; the batch's threshold is kept so that
    # window activations can later be recomputed exactly, token by token.
    thresh = topk.batchtopk_threshold(pre_BxN, k)
    acts_BxN = jnp.where((pre_BxN >= thresh) & (pre_BxN > 0), pre_BxN, 0.0)
  else:
    acts_BxN = topk.topk_per_token(pre_BxN, k)
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
  pre_WxN = _pre(params, x_WxD, input_norm)
  if rule == "threshold":
    acts_WxN = topk.threshold_activation(pre_WxN, threshold_N)
  elif rule == "batchtopk":
    thresh_Wx1 = batch_threshold_W[:, None]
    acts_WxN = jnp.where((pre_WxN >= thresh_Wx1) & (pre_WxN > 0), pre_WxN, 0.0)
  else:
    acts_WxN = topk.topk_per_token(pre_WxN, k)
  return acts_WxN[:, cols_C]
