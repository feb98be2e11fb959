"""Synthetic activations with known sparse structure, for tests and quick checks.

Legend: T = tokens, D = d_model, F = ground-truth features.
Each token is a sum of a few unit-norm feature directions with positive
magnitudes plus a small isotropic noise, so a good SAE reaches low FVU at small k.
"""

import numpy as np

from metasae_jax.storage import store


def sparse_activations(num_tokens: int, d_model: int, num_features: int = 512, active: int = 4,
                       noise: float = 0.02, seed: int = 0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  feats_FxD = rng.normal(size=(num_features, d_model))
  feats_FxD /= np.linalg.norm(feats_FxD, axis=1, keepdims=True)
  # Zipf-like feature frequencies, as in real models: a few common, many rare.
  freq_F = 1.0 / np.arange(1, num_features + 1) ** 0.5
  freq_F /= freq_F.sum()
  idx_TxA = np.stack([rng.choice(num_features, size=active, replace=False, p=freq_F)
                      for _ in range(num_tokens)])
  mags_TxA = rng.exponential(1.0, size=(num_tokens, active)) + 0.5
  x_TxD = np.empty((num_tokens, d_model), np.float32)
  for s in range(0, num_tokens, 4096):  # chunks keep the gathered [chunk, A, D] block small
    x_TxD[s:s + 4096] = np.einsum("ta,tad->td", mags_TxA[s:s + 4096], feats_FxD[idx_TxA[s:s + 4096]])
  x_TxD += (noise * rng.normal(size=x_TxD.shape)).astype(np.float32)
  return x_TxD


def write_sparse_store(path: str, num_tokens: int, d_model: int, seed: int = 0, context_len: int = 1,
                       shard_tokens: int = 65536, fmt: str = "zarr", **kwargs) -> store.Store:
  acts = sparse_activations(num_tokens, d_model, seed=seed, **kwargs)
  return store.write_store(path, acts, None, context_len=context_len,
                           source={"model": "synthetic", "layer": 0, "site": "synthetic", "seed": seed},
                           shard_tokens=shard_tokens, fmt=fmt)
