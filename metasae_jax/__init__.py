"""metasae-jax: joint training of a primary BatchTopK SAE with a meta SAE (MetaSAEs) in JAX.

The public names load on first use (PEP 562), so `import metasae_jax.storage.store` or a binary's flag
check does not pay for importing JAX.
"""

import importlib

# Public name -> the module that defines it.
_EXPORTS = {"TrainConfig": "metasae_jax.core.config", "UserError": "metasae_jax.core.errors",
            "SAEState": "metasae_jax.core.train_step", "TrainState": "metasae_jax.core.train_step",
            "init_train_state": "metasae_jax.core.train_step", "train_step": "metasae_jax.core.train_step",
            "LoadedSAE": "metasae_jax.storage.loaded_sae", "load_sae": "metasae_jax.storage.loaded_sae"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
  if name not in _EXPORTS:
    raise AttributeError(f"module 'metasae_jax' has no attribute {name!r}")
  value = getattr(importlib.import_module(_EXPORTS[name]), name)
  globals()[name] = value
  return value


def __dir__():
  return sorted(list(globals()) + __all__)
