"""Validation during training: joint and solo on a fixed held-out sample, one jitted pass per eval step.

Legend: S = sample tokens, D = d_model, N = latents, W = latents in a row block of the φ computation.
Metrics per SAE (prefix `val/joint/`, `val/solo/`): `fvu` (Σ||x − x̂||² / Σ||x − mean_S(x)||², in the
input's space), `mse` (on standardised inputs, as the training loss), `l0` (active latents per token),
`dead_fraction` (latents that fire on no sample token) and `mean_abs_phi` (mean |φ| over all N(N−1)/2
pairs, a pair with a latent whose φ is undefined counting 0, the convention of
`evaluation/cooccurrence.py`). The sample is encoded as one batch under the training rule, so BatchTopK
keeps k·S activations over the sample.
"""

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from metasae_jax.core import architectures
from metasae_jax.core import sae as sae_lib
from metasae_jax.core.errors import UserError
from metasae_jax.storage import heldout, location
from metasae_jax.storage import store as store_lib

HELDOUT_VIEW = "heldout"
PHI_BLOCK = 512


def heldout_store_path(activations: str, explicit: Optional[str]) -> Optional[str]:
  """The held-out store for validation: `explicit`, else the training store's held-out view, else None.

  The exporter's split puts views STORE/train and STORE/heldout inside the store (a view's manifest says
  `view_of`), so training on STORE or STORE/train validates on STORE/heldout. A manifest may also name its
  held-out store as `"heldout": PATH` or `"views": {"heldout": PATH}` (PATH relative to the store).
  """
  if explicit:
    return explicit
  manifest = store_lib.read_manifest(activations)
  entry = manifest.get(HELDOUT_VIEW)
  if entry is None and isinstance(manifest.get("views"), dict):
    entry = manifest["views"].get(HELDOUT_VIEW)
  if isinstance(entry, dict):
    entry = entry.get("path")
  if isinstance(entry, str) and entry:
    return location.resolve(activations, entry)
  view = location.join(store_lib.base_of(activations, manifest), HELDOUT_VIEW)
  if store_lib.exists(view) and location.normalize(view) != location.normalize(activations):
    return view
  return None


def load_sample(path: str, num_tokens: int, skip_first_positions: int, d_model: int) -> np.ndarray:
  """The first `num_tokens` kept tokens of the held-out store, float32 [S, D] (fixed for the whole run)."""
  store = store_lib.open_store(path)
  if store.d_model != d_model:
    raise UserError(f"--eval_activations {path} has d_model {store.d_model}, the training store "
                    f"{d_model}. Use a held-out store of the same model and layer.")
  have = heldout.available_tokens(store, skip_first_positions)
  num = min(num_tokens, have)
  if num < 2:
    raise UserError(f"--eval_activations {path} holds {have} usable tokens; validation needs at least 2.")
  return np.concatenate([b.acts_BxD for b in heldout.iter_batches(store, num, num, skip_first_positions)])


def mean_abs_phi(fired_SxN: jax.Array, block: int = PHI_BLOCK) -> jax.Array:
  """Mean |φ| over all unordered pairs of latents, undefined φ (dead or always-on latent) counted as 0."""
  s, n = fired_SxN.shape
  w = min(block, n)
  pad = -n % w
  f = jnp.pad(fired_SxN.astype(jnp.float32), ((0, 0), (0, pad)))
  p_N = jnp.mean(f, axis=0)  # probabilities, not counts: float32 stays exact-enough for any S
  live_N = (p_N > 0) & (p_N < 1)
  sd_N = jnp.sqrt(jnp.where(live_N, p_N * (1 - p_N), 1.0))
  cols_N = jnp.arange(n + pad)

  def one_block(start):
    f_SxW = jax.lax.dynamic_slice_in_dim(f, start, w, axis=1)
    p11_WxN = f_SxW.T @ f / s
    p_W = jax.lax.dynamic_slice_in_dim(p_N, start, w)
    phi_WxN = (p11_WxN - p_W[:, None] * p_N[None, :]) / (
        jax.lax.dynamic_slice_in_dim(sd_N, start, w)[:, None] * sd_N[None, :])
    rows_W = start + jnp.arange(w)
    keep = ((cols_N[None, :] > rows_W[:, None]) & jax.lax.dynamic_slice_in_dim(live_N, start, w)[:, None]
            & live_N[None, :])
    return jnp.sum(jnp.where(keep, jnp.abs(phi_WxN), 0.0))

  total = jnp.sum(jax.lax.map(one_block, jnp.arange(0, n + pad, w)))
  return total / (n * (n - 1) / 2)


def sae_metrics(params: dict, x_SxD: jax.Array, k: int, architecture: str) -> dict:
  """Validation metrics of one SAE on the sample (see the module docstring), firing by the architecture's
  inference rule (BatchTopK over the sample; JumpReLU by its trained θ)."""
  fwd = sae_lib.forward(params, x_SxD, k, **architectures.get(architecture).firing(params))
  fired_SxN = fwd.acts_BxN > 0
  err = jnp.sum((x_SxD - fwd.recon_BxD) ** 2)
  var = jnp.sum((x_SxD - jnp.mean(x_SxD, axis=0)) ** 2)
  return {"fvu": err / var, "mse": jnp.mean((fwd.recon_std_BxD - fwd.xs_BxD) ** 2),
          "l0": jnp.mean(jnp.sum(fired_SxN, axis=1).astype(jnp.float32)),
          "dead_fraction": jnp.mean((~jnp.any(fired_SxN, axis=0)).astype(jnp.float32)),
          "mean_abs_phi": mean_abs_phi(fired_SxN)}


@functools.partial(jax.jit, static_argnames=("k", "architecture"))
def _evaluate(joint_params, solo_params, x_SxD, *, k, architecture) -> dict:
  out = {f"val/joint/{name}": v for name, v in sae_metrics(joint_params, x_SxD, k, architecture).items()}
  if solo_params is not None:
    out.update({f"val/solo/{name}": v for name, v in sae_metrics(solo_params, x_SxD, k, architecture).items()})
  return out


class Validator:
  """Holds the sample on the device; `__call__(state)` returns host floats (the only device→host read)."""

  def __init__(self, sample_SxD: np.ndarray, k: int, architecture: str):
    self.x_SxD = jnp.asarray(sample_SxD, jnp.float32)
    self.k, self.architecture = k, architecture

  def __call__(self, state) -> dict:
    solo = None if state.solo is None else state.solo.params
    out = _evaluate(state.joint.params, solo, self.x_SxD, k=self.k, architecture=self.architecture)
    return {name: float(v) for name, v in jax.device_get(out).items()}
