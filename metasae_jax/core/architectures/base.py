"""What an architecture module provides: the training forward on both algorithms, its naive reference and
the inference firing rule; everything else (step, validation, artifacts, evaluation) asks it.

Legend: B = rows on this device, D = input dim, N = latents on this device.
"""

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from metasae_jax.core import dense, sae, slots
from metasae_jax.core.architectures import Spec, spec
from metasae_jax.core.axes import Axes


class Options(NamedTuple):
  """The architecture-specific hyperparameters of a TrainConfig (static in the step)."""
  matryoshka_widths: tuple = ()
  l0_coefficient: float = 1.0
  jumprelu_bandwidth: float = 0.001
  jumprelu_init_threshold: float = 0.001

  @classmethod
  def of(cls, config) -> "Options":
    return cls(**{name: getattr(config, name) for name in cls._fields})


class TrainForward(NamedTuple):
  """One training forward of a primary SAE, in standardised space."""
  recon: dense.Recon  # the full reconstruction and what fired
  pre_BxN: jax.Array  # pre-activations AuxK picks its dead latents from (slots: gradient-free; dense: with it)
  events: slots.Events  # the slots path's slow-path events (zeros elsewhere)
  mse: jax.Array  # the reconstruction loss: this device's rows' mean over rows and D
  extra: jax.Array  # further loss, already weighted (JumpReLU's L0 penalty); 0 for most
  terms: dict  # named scalar metrics of this forward (e.g. each Matryoshka prefix's MSE)


def no_events() -> slots.Events:
  return slots.Events(jnp.zeros((), jnp.int32), jnp.zeros((), bool))


class Architecture:
  """Base: the reference initialisation, b_enc frozen at 0, no threshold in the artifact."""
  name: str = ""
  trains_b_enc: bool = False  # BatchTopK/TopK keep b_enc at 0 (the paper); JumpReLU trains it

  @property
  def spec(self) -> Spec:
    return spec(self.name)

  def init_params(self, rng: jax.Array, d_model: int, width: int, options: Options) -> dict:
    del options
    return sae.init_params(rng, d_model, width)

  def train_forward(self, params: dict, xs_BxD: jax.Array, k: int, options: Options, axes: Axes, path: str,
                    compute_dtype: str) -> TrainForward:
    raise NotImplementedError

  def naive_forward(self, params: dict, xs_BxD: jax.Array, k: int, options: Options, compute_dtype: str):
    """The straightforward form (dense, global top-k over the flattened batch): (pre, acts, recon_std, loss
    without AuxK, named terms). The tests hold `train_forward` to it."""
    raise NotImplementedError

  def firing(self, params: dict) -> dict:
    """The inference rule (`spec.inference_firing`) as `sae.encode` keywords: {"activation": ...} or
    {"threshold_N": θ}."""
    rule = self.spec.inference_firing
    return {"threshold_N": self.artifact_threshold(params)} if rule == "threshold" else {"activation": rule}

  def artifact_threshold(self, params: dict) -> Optional[jax.Array]:
    """A trained per-latent threshold the published artifact carries (None: the rule needs none)."""
    del params
    return None
