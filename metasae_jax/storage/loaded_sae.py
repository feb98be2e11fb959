"""A finished SAE read from its artifact: `load_sae(path)` → encode / decode / reconstruct under a firing rule.

Legend: B = tokens in a batch, D = d_model, N = latents.
Firing rules (every encode names one; `None` means the default):
  "threshold" — pre > θ_i with θ calibrated on held-out tokens (batch-independent);
  "topk"      — each token's k largest pre-activations (batch-independent);
  "batchtopk" — the k·B largest over the given batch (the training rule; depends on the batch).
Default: "threshold" when the artifact has θ, otherwise "topk", so that by default one token
encodes the same alone as inside any batch. The math is the training forward's own
(`core.sae.encode`, `decode_std`, `unstandardize`): inference and training cannot drift apart.
"""

import dataclasses
import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from metasae_jax.core import sae as sae_lib
from metasae_jax.core.errors import UserError
from metasae_jax.storage import interop, sae_schema

FIRINGS = sae_schema.FIRINGS
INPUT_NORMS = sae_schema.INPUT_NORMS


class Code(NamedTuple):
  """An encoding: latent activations plus each token's standardisation statistics (None without)."""
  acts_BxN: jax.Array
  mean_Bx1: Optional[jax.Array]
  std_Bx1: Optional[jax.Array]


def _rule(firing: str, threshold_N: Optional[jax.Array]) -> dict:
  """`core.sae` keyword arguments of a firing rule."""
  return {"threshold_N": threshold_N} if firing == "threshold" else {"activation": firing}


def encode_traced(params: dict, x_BxD: jax.Array, threshold_N: Optional[jax.Array], *, k: int, firing: str,
                  input_norm: str) -> sae_lib.Encoding:
  """`core.sae.encode` under a firing rule, for use inside other jitted code (the streaming encoder)."""
  return sae_lib.encode(params, x_BxD, k, input_norm=input_norm, **_rule(firing, threshold_N))


@functools.partial(jax.jit, static_argnames=("k", "firing", "input_norm"))
def _encode(params, x_BxD, threshold_N, *, k, firing, input_norm) -> Code:
  enc = encode_traced(params, x_BxD, threshold_N, k=k, firing=firing, input_norm=input_norm)
  return Code(enc.acts_BxN, enc.mean_Bx1, enc.std_Bx1)


@jax.jit
def _decode(params, acts_BxN, mean_Bx1, std_Bx1):
  return sae_lib.unstandardize(sae_lib.decode_std(params, acts_BxN), mean_Bx1, std_Bx1)


@functools.partial(jax.jit, static_argnames=("k", "firing", "input_norm"))
def _forward(params, x_BxD, threshold_N, *, k, firing, input_norm) -> sae_lib.Forward:
  return sae_lib.forward(params, x_BxD, k, input_norm=input_norm, **_rule(firing, threshold_N))


# eq=False: identity comparison (field-wise == of numpy weights is ambiguous).
@dataclasses.dataclass(frozen=True, eq=False)
class LoadedSAE:
  """An SAE artifact: weights (float32 numpy), cfg.json, optional calibrated θ, and where they came from."""
  path: str
  params: dict
  """{"W_enc": [D, N], "b_enc": [N], "W_dec": [N, D], "b_dec": [D]} (SAELens names)."""
  cfg: dict
  threshold_N: Optional[np.ndarray] = None
  """Calibrated firing thresholds θ (+inf for dead latents), or None if never calibrated."""

  def __post_init__(self):
    if self.cfg.get("input_norm") not in INPUT_NORMS:
      raise UserError(f"SAE artifact {self.path}: input_norm {self.cfg.get('input_norm')!r} is not one of "
                      f"{INPUT_NORMS}. Fix cfg.json or re-export the SAE.")

  @property
  def d_model(self) -> int:
    return int(self.cfg["d_model"])

  @property
  def width(self) -> int:
    return int(self.cfg["width"])

  @property
  def k(self) -> int:
    return int(self.cfg["k"])

  @property
  def input_norm(self) -> str:
    return str(self.cfg["input_norm"])

  @property
  def W_dec(self) -> np.ndarray:
    """Decoder rows [N, D]: latent i writes W_dec[i] into the residual stream."""
    return self.params["W_dec"]

  @functools.cached_property
  def device_params(self) -> dict:
    return {name: jnp.asarray(v) for name, v in self.params.items()}

  @functools.cached_property
  def device_threshold_N(self) -> Optional[jax.Array]:
    return None if self.threshold_N is None else jnp.asarray(self.threshold_N)

  @property
  def default_firing(self) -> str:
    """"threshold" when θ is calibrated, else "topk": batch-independent either way."""
    return "threshold" if self.threshold_N is not None else "topk"

  def firing_rule(self, firing: Optional[str] = None) -> str:
    """The rule an encode with `firing` uses (None = the default); unknown or unusable rules are UserErrors."""
    firing = self.default_firing if firing is None else firing
    if firing not in FIRINGS:
      raise UserError(f"--firing must be one of {FIRINGS}, got {firing!r}.")
    if firing in ("topk", "batchtopk") and self.k <= 0:
      raise UserError(f"SAE {self.path} has no k (a JumpReLU/ReLU SAE fires by threshold); use the default "
                      "firing (threshold).")
    if firing == "threshold" and self.threshold_N is None:
      raise UserError(f"SAE artifact {self.path} has no calibrated thresholds; calibrate them "
                      "(experiments.evaluate does) or pass --firing topk or batchtopk.")
    return firing

  def _check(self, x_BxD) -> jax.Array:
    x = jnp.asarray(x_BxD, jnp.float32)
    if x.ndim != 2 or x.shape[1] != self.d_model:
      raise UserError(f"SAE artifact {self.path} expects activations [tokens, {self.d_model}], got "
                      f"{tuple(x.shape)}. Pass activations from the model and layer it was trained on.")
    return x

  def encode_with_stats(self, x_BxD, firing: Optional[str] = None) -> Code:
    """Latent activations [B, N] and the token statistics `decode` needs to map back."""
    firing = self.firing_rule(firing)
    return _encode(self.device_params, self._check(x_BxD), self.device_threshold_N, k=self.k, firing=firing,
                   input_norm=self.input_norm)

  def encode(self, x_BxD, firing: Optional[str] = None) -> jax.Array:
    """Latent activations [B, N] under `firing` (None = `default_firing`)."""
    return self.encode_with_stats(x_BxD, firing).acts_BxN

  def decode(self, acts_BxN, mean_Bx1=None, std_Bx1=None) -> jax.Array:
    """Reconstruction [B, D]; in the input's space when given the statistics from `encode_with_stats`,
    otherwise in the standardised space the SAE works in."""
    return _decode(self.device_params, jnp.asarray(acts_BxN, jnp.float32), mean_Bx1, std_Bx1)

  def forward(self, x_BxD, firing: Optional[str] = None) -> sae_lib.Forward:
    """Everything of one pass (standardised input, pre-activations, codes, both reconstructions)."""
    firing = self.firing_rule(firing)
    return _forward(self.device_params, self._check(x_BxD), self.device_threshold_N, k=self.k, firing=firing,
                    input_norm=self.input_norm)

  def reconstruct(self, x_BxD, firing: Optional[str] = None) -> jax.Array:
    """decode(encode(x)) in the input's space."""
    return self.forward(x_BxD, firing).recon_BxD

  def with_threshold(self, threshold_N: np.ndarray, cfg: dict) -> "LoadedSAE":
    """The same SAE with calibrated θ and the cfg that records them."""
    return LoadedSAE(self.path, self.params, cfg, np.asarray(threshold_N, np.float32))


def load_sae(path: str, d_model: Optional[int] = None) -> LoadedSAE:
  """Reads an SAE directory; with `d_model`, a mismatch is a UserError.

  Accepts our artifacts (cfg.json + sae.safetensors), SAELens directories (cfg.json + sae_weights.safetensors;
  standard, topk, batchtopk, jumprelu) and EleutherAI sparsify directories (cfg.json + sae.safetensors with
  `encoder.weight`); `storage/interop.py` maps their firing and normalisation to ours, exactly.
  """
  tensors, cfg = interop.read_any(path)
  if d_model is not None and int(cfg["d_model"]) != int(d_model):
    raise UserError(f"SAE artifact {path} has d_model {cfg['d_model']} but the activation store has "
                    f"d_model {d_model}. Evaluate it on activations from the model and layer it was "
                    f"trained on (its cfg.json source: {cfg.get('source')}).")
  params = {name: tensors[name] for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
  return LoadedSAE(path, params, cfg, tensors.get("threshold"))
