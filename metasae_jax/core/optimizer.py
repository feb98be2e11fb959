"""Adam with unit-norm decoder rows (the reference's optimiser, plus a post-step renorm).

Legend: N = latents, D = d_model.
"""

import jax
import jax.numpy as jnp
import optax

from metasae_jax.core import sae


def adam(lr: float = 3e-4, b1: float = 0.9, b2: float = 0.99) -> optax.GradientTransformation:
  # eps 1e-8 is torch.optim.Adam's default, which the reference uses.
  return optax.adam(lr, b1=b1, b2=b2, eps=1e-8)


def remove_radial(grad_NxD: jax.Array, w_NxD: jax.Array) -> jax.Array:
  """Removes each row's gradient component along its (unit-norm) decoder row."""
  w_unit = sae.normalize_rows(w_NxD)
  return grad_NxD - jnp.sum(grad_NxD * w_unit, axis=-1, keepdims=True) * w_unit


def apply(tx: optax.GradientTransformation, params: dict, grads: dict, opt_state, train_b_enc: bool = False):
  """One update: project W_dec's gradient, Adam, then renormalise W_dec rows.

  The reference only renormalises before the step, so its rows drift off unit
  norm by O(lr); renormalising after as well makes artifacts exactly unit norm.
  b_enc is not a BatchTopK parameter: its gradient is zeroed so it stays 0
  unless `train_b_enc` (JumpReLU trains it).
  """
  grads = dict(grads, W_dec=remove_radial(grads["W_dec"], params["W_dec"]))
  if not train_b_enc:
    grads["b_enc"] = jnp.zeros_like(grads["b_enc"])
  # optax mixes Python floats with its int32 step count; our own code stays strict.
  with jax.numpy_dtype_promotion("standard"):
    updates, opt_state = tx.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  params = dict(params, W_dec=sae.normalize_rows(params["W_dec"]))
  return params, opt_state
