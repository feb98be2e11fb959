"""metasae-jax: joint training of a primary BatchTopK SAE with a meta SAE (MetaSAEs) in JAX."""

from metasae_jax.core.config import TrainConfig
from metasae_jax.core.errors import UserError
from metasae_jax.core.train_step import SAEState, TrainState, init_train_state, train_step
from metasae_jax.storage.loaded_sae import LoadedSAE, load_sae

__all__ = ["LoadedSAE", "load_sae", "TrainConfig", "TrainState", "SAEState", "UserError", "init_train_state",
           "train_step"]
