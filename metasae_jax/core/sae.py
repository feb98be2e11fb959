"""The BatchTopK sparse autoencoder (primary and meta share it): init, encode, decode.

Legend: B = batch (tokens, or decoder rows for the meta SAE), D = input dim,
N = latents.
Params are a plain dict {"W_enc": [D, N], "b_enc": [N], "W_dec": [N, D], "b_dec": [D]},
the SAELens tensor names, so what `train_step` sees is an ordinary pytree.
"""

import functools
from typing import NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from metasae_jax.core import topk
from metasae_jax.core.axes import sum_like

# The reference adds this to the (unbiased) std before dividing.
STD_EPS = 1e-5


def standardize(x_BxD: jax.Array):
  """Per-vector standardisation over D with the unbiased std (the reference's rule)."""
  mean_Bx1 = jnp.mean(x_BxD, axis=-1, keepdims=True)
  std_Bx1 = jnp.std(x_BxD, axis=-1, keepdims=True, ddof=1)
  return (x_BxD - mean_Bx1) / (std_Bx1 + STD_EPS), mean_Bx1, std_Bx1


def unstandardize(xs_BxD: jax.Array, mean_Bx1: Optional[jax.Array], std_Bx1: Optional[jax.Array]) -> jax.Array:
  """Maps back with x' * std + mean (identity without statistics, i.e. input_norm "none").

  The reference leaves the eps out here (the golden rows pin it).
  """
  return xs_BxD if mean_Bx1 is None else xs_BxD * std_Bx1 + mean_Bx1


def normalize_rows(w_NxD: jax.Array) -> jax.Array:
  return w_NxD / jnp.linalg.norm(w_NxD, axis=-1, keepdims=True)


class _Params(nn.Module):
  """Declares the four SAE parameters with the reference initialisation; no forward pass (see `forward`)."""
  d_model: int
  width: int

  @nn.compact
  def __call__(self) -> None:
    # torch's kaiming_uniform_ on a [D, N] tensor: fan_in = N, gain sqrt(2),
    # bound sqrt(6 / N). W_dec starts as W_enc^T with unit-norm rows.
    bound = (6.0 / self.width) ** 0.5
    w_enc = self.param("W_enc", _uniform(bound), (self.d_model, self.width))
    self.param("b_enc", nn.initializers.zeros, (self.width,))
    self.param("W_dec", lambda _rng, _shape: normalize_rows(w_enc.T), (self.width, self.d_model))
    self.param("b_dec", nn.initializers.zeros, (self.d_model,))


def _uniform(bound):
  def init(rng, shape, dtype=jnp.float32):
    return jax.random.uniform(rng, shape, dtype, -bound, bound)
  return init


def init_params(rng: jax.Array, d_model: int, width: int) -> dict:
  """Reference initialisation as a plain dict of float32 arrays."""
  variables = _Params(d_model, width).init(rng)
  return dict(variables["params"])


class Forward(NamedTuple):
  """Outputs of one forward pass; `_std` quantities live in standardised space."""
  xs_BxD: jax.Array
  pre_BxN: jax.Array
  acts_BxN: jax.Array
  recon_std_BxD: jax.Array
  recon_BxD: jax.Array


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _low_matmul(a_BxK: jax.Array, b_KxN: jax.Array, dtype: str) -> jax.Array:
  return jnp.matmul(a_BxK.astype(dtype), b_KxN.astype(dtype), preferred_element_type=jnp.float32)


def _low_matmul_fwd(a, b, dtype):
  return _low_matmul(a, b, dtype), (a.astype(dtype), b.astype(dtype))


def _low_matmul_bwd(dtype, res, g_BxN):
  # Both backward products also take low-precision inputs and accumulate in float32,
  # and the float32 results reach the float32 master weights unrounded (autodiff of
  # astype would round each gradient to the low dtype on its way back).
  a, b = res
  g = g_BxN.astype(dtype)
  return (sum_like(jnp.matmul(g, b.T, preferred_element_type=jnp.float32), a),
          sum_like(jnp.matmul(a.T, g, preferred_element_type=jnp.float32), b))


_low_matmul.defvjp(_low_matmul_fwd, _low_matmul_bwd)


def matmul(a_BxK: jax.Array, b_KxN: jax.Array, compute_dtype: str = "float32") -> jax.Array:
  """a @ b with inputs in `compute_dtype` and a float32 result (float32: the plain product)."""
  if compute_dtype == "float32":
    return a_BxK @ b_KxN
  return _low_matmul(a_BxK, b_KxN, compute_dtype)


def pre_activations(params: dict, xs_BxD: jax.Array, compute_dtype: str = "float32") -> jax.Array:
  """ReLU((x' - b_dec) W_enc + b_enc); b_enc is zero and frozen in our training (BatchTopK has none).

  Written as x' W_enc - b_dec W_enc so that b_dec's gradient through the encoder
  is a [D, N] x [N] product of the summed gradient, not a sixth B x N x D matmul.
  """
  return jax.nn.relu(matmul(xs_BxD, params["W_enc"], compute_dtype) - params["b_dec"] @ params["W_enc"]
                     + params["b_enc"])


def decode_std(params: dict, acts_BxN: jax.Array, compute_dtype: str = "float32") -> jax.Array:
  return matmul(acts_BxN, params["W_dec"], compute_dtype) + params["b_dec"]


class Encoding(NamedTuple):
  """The encoder half of a forward pass (`mean`/`std` are None without input standardisation)."""
  xs_BxD: jax.Array
  mean_Bx1: Optional[jax.Array]
  std_Bx1: Optional[jax.Array]
  pre_BxN: jax.Array
  acts_BxN: jax.Array


def encode(params: dict, x_BxD: jax.Array, k: int, activation: str = "batchtopk",
           input_norm: str = "standardize_per_token", axis_name: Optional[str] = None,
           threshold_N: Optional[jax.Array] = None) -> Encoding:
  """Standardises, computes pre-activations and fires them: by `activation`, or by `threshold_N` when given."""
  if input_norm == "standardize_per_token":
    xs, mean, std = standardize(x_BxD)
  elif input_norm == "none":
    xs, mean, std = x_BxD, None, None
  else:
    raise ValueError(f"unknown input_norm {input_norm!r}")
  pre = pre_activations(params, xs)
  if threshold_N is not None:
    acts = topk.threshold_activation(pre, threshold_N)
  else:
    acts = topk.activate(pre, activation, k, axis_name)
  return Encoding(xs, mean, std, pre, acts)


def forward(params: dict, x_BxD: jax.Array, k: int, activation: str = "batchtopk",
            input_norm: str = "standardize_per_token", axis_name: Optional[str] = None,
            threshold_N: Optional[jax.Array] = None) -> Forward:
  """Encodes and decodes a batch. With `threshold_N`, fires by calibrated thresholds instead."""
  enc = encode(params, x_BxD, k, activation, input_norm, axis_name, threshold_N)
  recon_std = decode_std(params, enc.acts_BxN)
  recon = unstandardize(recon_std, enc.mean_Bx1, enc.std_Bx1)
  return Forward(enc.xs_BxD, enc.pre_BxN, enc.acts_BxN, recon_std, recon)
