"""Using a finished SAE: `load_sae(path)` → encode / decode / reconstruct, batch-independent with thresholds.

Legend: B = tokens, D = d_model, N = latents.
With calibrated per-latent thresholds (written by evaluation) a token's code
depends on that token alone; without them encoding falls back to per-token
top-k, also batch-independent. Input standardisation is applied by `encode`
and undone by `decode` when given the statistics `encode` returned.
"""

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from metasae_jax.storage import loaded_sae
from metasae_jax.core import sae as sae_lib, topk


class Code(NamedTuple):
  """An encoding: latent activations plus each token's standardisation statistics."""
  acts_BxN: jax.Array
  mean_Bx1: Optional[jax.Array]
  std_Bx1: Optional[jax.Array]


@functools.partial(jax.jit, static_argnames=("k", "standardize"))
def _encode(params, x_BxD, threshold_N, k, standardize):
  if standardize:
    xs, mean, std = sae_lib.standardize(x_BxD)
  else:
    xs, mean, std = x_BxD, None, None
  pre = sae_lib.pre_activations(params, xs)
  acts = topk.topk_per_token(pre, k) if threshold_N is None else topk.threshold_activation(pre, threshold_N)
  return Code(acts, mean, std)


@jax.jit
def _decode(params, acts_BxN, mean_Bx1, std_Bx1):
  recon = sae_lib.decode_std(params, acts_BxN)
  return recon if mean_Bx1 is None else sae_lib.unstandardize(recon, mean_Bx1, std_Bx1)


class SAE:
  """A loaded SAE artifact (ours or any with the same layout)."""

  def __init__(self, loaded: loaded_sae.LoadedSAE):
    self.path, self.cfg = loaded.path, loaded.cfg
    self.params = loaded.device_params
    self.threshold_N = None if loaded.threshold_N is None else jnp.asarray(loaded.threshold_N)
    self.k, self.d_model, self.width = loaded.k, loaded.d_model, loaded.width
    self.standardize = loaded.cfg.get("input_norm", "none") == "standardize_per_token"

  @property
  def W_dec(self) -> jax.Array:
    return self.params["W_dec"]

  def encode_with_stats(self, x_BxD) -> Code:
    x = jnp.asarray(x_BxD, jnp.float32)
    if x.ndim != 2 or x.shape[1] != self.d_model:
      raise ValueError(f"expected activations [tokens, {self.d_model}], got {tuple(x.shape)}")
    return _encode(self.params, x, self.threshold_N, self.k, self.standardize)

  def encode(self, x_BxD) -> jax.Array:
    """Latent activations [B, N]; per-token, so one row alone encodes like that row of a batch."""
    return self.encode_with_stats(x_BxD).acts_BxN

  def decode(self, acts_BxN, mean_Bx1=None, std_Bx1=None) -> jax.Array:
    """Reconstruction; in the input's space when given the token statistics from `encode_with_stats`,
    otherwise in the standardised space the SAE works in."""
    return _decode(self.params, jnp.asarray(acts_BxN, jnp.float32), mean_Bx1, std_Bx1)

  def reconstruct(self, x_BxD) -> jax.Array:
    code = self.encode_with_stats(x_BxD)
    return self.decode(*code)


def load_sae(path: str) -> SAE:
  """Loads an SAE artifact directory (cfg.json + sae.safetensors)."""
  return SAE(loaded_sae.load(path))
