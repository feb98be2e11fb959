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


@dataclasses.dataclass(frozen=True, kw_only=True)
class Spec:
  """What a configuration needs to know about an architecture before JAX is imported (what each architecture
  is: its module's docstring)."""
  inference_firing: str  # how its published SAE fires (storage/loaded_sae.py FIRINGS)
  auxk: bool = True  # trains with the AuxK loss over dead latents
  algorithms: tuple = ("slots", "dense")  # the step's algorithms it implements
  learned_threshold: bool = False  # its artifact carries a trained per-latent threshold
  saelens: str = "batchtopk"  # the SAELens inference architecture of its kind (storage/interop.py)


_SPECS = {
    "batchtopk": Spec(inference_firing="batchtopk"),  # the paper's
    "topk": Spec(inference_firing="topk", saelens="topk"),
    "matryoshka_batchtopk": Spec(algorithms=("dense",), inference_firing="batchtopk"),
    "jumprelu": Spec(auxk=False, algorithms=("dense",), learned_threshold=True, inference_firing="threshold",
                     saelens="jumprelu"),
}


def names() -> tuple:
  """Every registered architecture, the default (batchtopk) first."""
  return tuple(_SPECS)


def spec(name: str) -> Spec:
  if name not in _SPECS:
    raise KeyError(name)
  return _SPECS[name]


def get(name: str):
  """The architecture's `Architecture` object (imports JAX)."""
  spec(name)
  return importlib.import_module(f"metasae_jax.core.architectures.{name}").ARCHITECTURE
