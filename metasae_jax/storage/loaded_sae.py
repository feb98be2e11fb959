"""An SAE artifact loaded for evaluation, with one jitted forward per firing rule.

Legend: B = tokens in a batch, D = d_model, N = latents.
"""

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from metasae_jax.storage import artifact
from metasae_jax.core import sae as sae_lib
from metasae_jax.core.errors import UserError

FIRINGS = ("threshold", "batchtopk")


@dataclasses.dataclass(frozen=True)
class LoadedSAE:
  """Weights (float32 numpy), cfg and where they came from."""
  path: str
  params: dict
  cfg: dict
  threshold_N: Optional[np.ndarray]
  device_params: dict = dataclasses.field(repr=False, compare=False, default=None)

  @property
  def d_model(self) -> int:
    return int(self.cfg["d_model"])

  @property
  def width(self) -> int:
    return int(self.cfg["width"])

  @property
  def k(self) -> int:
    return int(self.cfg["k"])


def load(path: str, d_model: Optional[int] = None) -> LoadedSAE:
  """Reads an artifact; with `d_model`, a mismatch with the activations is a UserError."""
  tensors, cfg = artifact.load_sae_files(path)
  if d_model is not None and int(cfg["d_model"]) != int(d_model):
    raise UserError(f"SAE artifact {path} has d_model {cfg['d_model']} but the activation store has "
                    f"d_model {d_model}. Evaluate it on activations from the model and layer it was "
                    f"trained on (its cfg.json source: {cfg.get('source')}).")
  threshold = tensors.pop("threshold", None)
  params = {name: tensors[name] for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
  return LoadedSAE(path, params, cfg, threshold, {k: jnp.asarray(v) for k, v in params.items()})


@functools.partial(jax.jit, static_argnames=("k", "activation", "input_norm"))
def _forward(params, x_BxD, threshold_N, k, activation, input_norm):
  return sae_lib.forward(params, x_BxD, k, activation, input_norm, threshold_N=threshold_N)


def check_firing(sae: LoadedSAE, firing: str) -> None:
  if firing not in FIRINGS:
    raise UserError(f"--firing must be one of {FIRINGS}, got {firing!r}.")
  if firing == "threshold" and sae.threshold_N is None:
    raise UserError(f"SAE artifact {sae.path} has no calibrated thresholds; calibrate them "
                    "(metasae_jax.evaluation.thresholds) or pass --firing batchtopk.")


def forward(sae: LoadedSAE, x_BxD: np.ndarray, firing: str) -> sae_lib.Forward:
  """Encodes and decodes a batch: BatchTopK over this batch, or the calibrated thresholds."""
  check_firing(sae, firing)
  threshold = None if firing == "batchtopk" else jnp.asarray(sae.threshold_N)
  # Artifacts trained as "topk" keep their own rule under "batchtopk" firing.
  activation = sae.cfg["activation"] if sae.cfg["activation"] in ("batchtopk", "topk") else "batchtopk"
  return _forward(sae.device_params, jnp.asarray(x_BxD, jnp.float32), threshold, sae.k, activation,
                  sae.cfg["input_norm"])
