"""JumpReLU (Rajamanoharan et al. 2024, the Gemma Scope SAEs): latent i fires when its pre-activation z_i
exceeds a learned threshold θ_i; an L0 penalty trains θ through straight-through estimators.

Legend: B = rows on this device, D = input dim, N = latents (on this device).
Forward: f = z · H(z - θ); loss = MSE + λ/D · mean_b ||f_b||_0 (the paper's
||x - x̂||² + λ||f||_0 with our MSE a mean over D, so λ keeps the paper's and
SAELens' units). The gradient with respect to θ is the paper's pseudo-
derivative with a rectangle kernel K of width ε (the bandwidth):
∂f/∂θ = -(θ/ε) K((z - θ)/ε), ∂H/∂θ = -(1/ε) K((z - θ)/ε); z gets H(z - θ)
from f and nothing from H. θ is stored as log θ (positive by construction, as
the paper's code). b_enc is trained; no AuxK (the L0 penalty sets sparsity,
not k). Dense algorithm only.
"""

import functools
import math

import jax
import jax.numpy as jnp

from metasae_jax.core import dense, sae
from metasae_jax.core.architectures import base
from metasae_jax.core.axes import Axes, sum_like


def _rectangle(u):
  return ((u > -0.5) & (u < 0.5)).astype(jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def jump(z_BxN: jax.Array, theta_N: jax.Array, bandwidth: float) -> jax.Array:
  """z · H(z - θ)."""
  del bandwidth
  return jnp.where(z_BxN > theta_N, z_BxN, 0.0)


def _jump_fwd(z, theta, bandwidth):
  return jump(z, theta, bandwidth), (z, theta)


def _jump_bwd(bandwidth, res, g_BxN):
  z, theta = res
  d_theta = -(theta / bandwidth) * jnp.sum(_rectangle((z - theta) / bandwidth) * g_BxN, axis=0)
  return jnp.where(z > theta, g_BxN, 0.0), sum_like(d_theta, theta)


jump.defvjp(_jump_fwd, _jump_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def step(z_BxN: jax.Array, theta_N: jax.Array, bandwidth: float) -> jax.Array:
  """H(z - θ) as float32."""
  del bandwidth
  return (z_BxN > theta_N).astype(jnp.float32)


def _step_fwd(z, theta, bandwidth):
  return step(z, theta, bandwidth), (z, theta)


def _step_bwd(bandwidth, res, g_BxN):
  z, theta = res
  d_theta = -(1.0 / bandwidth) * jnp.sum(_rectangle((z - theta) / bandwidth) * g_BxN, axis=0)
  return jnp.zeros_like(z), sum_like(d_theta, theta)


step.defvjp(_step_fwd, _step_bwd)


class JumpReLU(base.Architecture):
  name = "jumprelu"
  trains_b_enc = True

  def init_params(self, rng, d_model, width, options):
    params = sae.init_params(rng, d_model, width)
    params["log_threshold"] = jnp.full((width,), math.log(options.jumprelu_init_threshold), jnp.float32)
    return params

  def train_forward(self, params, xs_BxD, k, options, axes: Axes, path, compute_dtype) -> base.TrainForward:
    del k, path  # sparsity comes from θ; dense only
    z_BxN = sae.pre_activations(params, xs_BxD, compute_dtype)
    theta_N = jnp.exp(params["log_threshold"])
    bw = options.jumprelu_bandwidth
    acts_BxN = jump(z_BxN, theta_N, bw)
    on_BxN = jax.lax.stop_gradient(z_BxN) > jax.lax.stop_gradient(theta_N)
    recon_BxD = axes.psum_latent(sae.matmul(acts_BxN, params["W_dec"], compute_dtype)) + params["b_dec"]
    rec = dense.Recon(recon_BxD, jnp.sum(on_BxN, axis=0, dtype=jnp.int32), jnp.sum(on_BxN, dtype=jnp.int32))
    l0_B = axes.psum_latent(jnp.sum(step(z_BxN, theta_N, bw), axis=1))
    mse = jnp.mean((recon_BxD - xs_BxD) ** 2)
    l0_penalty = options.l0_coefficient / xs_BxD.shape[1] * jnp.mean(l0_B)
    return base.TrainForward(rec, jax.lax.stop_gradient(z_BxN), base.no_events(), mse, l0_penalty,
                             {"l0_penalty": l0_penalty})

  def naive_forward(self, params, xs_BxD, k, options, compute_dtype):
    del k
    # The pseudo-derivatives written as zero-valued surrogates: c · (θ - sg(θ)) has value 0 and gradient c.
    sg = jax.lax.stop_gradient
    z = jax.nn.relu(sae.matmul(xs_BxD - params["b_dec"], params["W_enc"], compute_dtype) + params["b_enc"])
    theta = jnp.exp(params["log_threshold"])
    bw = options.jumprelu_bandwidth
    window = sg(jnp.abs((z - theta) / bw) < 0.5).astype(jnp.float32)
    acts = jnp.where(sg(z > theta), z, 0.0) + sg(-(theta / bw) * window) * (theta - sg(theta))
    l0 = jnp.sum(sg(z > theta).astype(jnp.float32) + sg(-window / bw) * (theta - sg(theta)), axis=1)
    recon_std = sae.matmul(acts, params["W_dec"], compute_dtype) + params["b_dec"]
    l0_penalty = options.l0_coefficient / xs_BxD.shape[1] * jnp.mean(l0)
    return z, acts, recon_std, jnp.mean((recon_std - xs_BxD) ** 2) + l0_penalty, {"l0_penalty": l0_penalty}

  def artifact_threshold(self, params):
    return jnp.exp(params["log_threshold"])


ARCHITECTURE = JumpReLU()
