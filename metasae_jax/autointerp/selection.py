"""Which latent pairs get explained: Hungarian-matched joint <-> solo latents, shuffled with the seed.

Legend: N = latents of each SAE, D = d_model, P = matched pairs.
"""

import numpy as np

from metasae_jax.evaluation import matching
from metasae_jax.core.errors import UserError


def match_pairs(w_dec_joint_NxD: np.ndarray, w_dec_solo_NxD: np.ndarray) -> np.ndarray:
  """Pairs [P, 2] of (joint latent, solo latent): Hungarian matching on decoder cosine (matching.py)."""
  m = matching.match_decoders(w_dec_joint_NxD, w_dec_solo_NxD)
  return np.stack([m.joint_idx, m.solo_idx], axis=1).astype(np.int64)


def candidate_pairs(pairs_Px2: np.ndarray, num_latents: int, factor: int, seed: int) -> np.ndarray:
  """A seeded random subset of pairs to track while streaming (more than needed, so rare ones can drop out)."""
  if len(pairs_Px2) == 0:
    raise UserError("joint and solo SAEs have no matched latents; check the run directory.")
  order = np.random.default_rng(seed).permutation(len(pairs_Px2))
  return pairs_Px2[order[:num_latents * factor]]


def choose(cands_Px2: np.ndarray, count_joint_N: np.ndarray, count_solo_N: np.ndarray,
           min_examples: int, num_latents: int) -> np.ndarray:
  """Positions (into cands) of the first num_latents pairs where both latents fired >= min_examples times."""
  ok = (count_joint_N[cands_Px2[:, 0]] >= min_examples) & (count_solo_N[cands_Px2[:, 1]] >= min_examples)
  return np.nonzero(ok)[0][:num_latents]
