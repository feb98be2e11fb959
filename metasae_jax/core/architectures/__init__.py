"""SAE architectures as plug-ins: one module per architecture, looked up by name.

`names()` and `spec(name)` are JAX-free (flags and configs are checked before JAX
is imported); `get(name)` imports the architecture's module and returns its
`Architecture` (base.py): initialisation, the training reconstruction and loss
terms on both algorithms, the naive reference, the inference firing rule,
artifact fields and SAELens names. Adding an architecture is one module here,
one `Spec` line below and its tests.
"""

import dataclasses
import importlib


@dataclasses.dataclass(frozen=True)
class Spec:
  """What a configuration needs to know about an architecture before JAX is imported."""
  summary: str
  uses_k: bool = True  # fires the top k (per batch or per token); False: learned thresholds
  auxk: bool = True  # trains with the AuxK loss over dead latents
  algorithms: tuple = ("slots", "dense")  # the step's algorithms it implements
  learned_threshold: bool = False  # its artifact carries a trained per-latent threshold
  inference_firing: str = ""  # how its published SAE fires (storage/loaded_sae.py FIRINGS); "" = its name
  saelens: str = "batchtopk"  # the SAELens inference architecture of its kind (storage/interop.py)


_SPECS = {
    "batchtopk": Spec("BatchTopK (the paper): the top k·B pre-activations of the batch fire"),
    "topk": Spec("TopK: each token's top k pre-activations fire", saelens="topk"),
    "matryoshka_batchtopk": Spec("Matryoshka BatchTopK (Bussmann et al. 2025): nested prefixes of the latents "
                                 "each reconstruct on their own; the loss sums the prefixes' MSEs",
                                 algorithms=("dense",), inference_firing="batchtopk"),
    "jumprelu": Spec("JumpReLU (Rajamanoharan et al. 2024): learned per-latent thresholds, a straight-through "
                     "L0 penalty", uses_k=False, auxk=False, algorithms=("dense",), learned_threshold=True,
                     inference_firing="threshold", saelens="jumprelu"),
}


def names() -> tuple:
  """Every registered architecture, the default (batchtopk) first."""
  return tuple(_SPECS)


def spec(name: str) -> Spec:
  if name not in _SPECS:
    raise KeyError(name)
  s = _SPECS[name]
  return s if s.inference_firing else dataclasses.replace(s, inference_firing=name)


def get(name: str):
  """The architecture's `Architecture` object (imports JAX)."""
  spec(name)
  return importlib.import_module(f"metasae_jax.core.architectures.{name}").ARCHITECTURE
