"""Which latents fired on which evaluation tokens, kept sparse (CSR: one row per token).

Legend: T = evaluation tokens, N = latents, F = total firings (~T·k), B = tokens in a batch.
Never a dense T x N matrix: each token fires ~k of N latents.
"""

import dataclasses

import numpy as np
import scipy.sparse as sp


@dataclasses.dataclass(frozen=True)
class Firings:
  """Active latents (and their activations) per token, plus each token's global store index."""
  indptr_T1: np.ndarray   # int64 [T + 1]
  latents_F: np.ndarray   # int32 [F], sorted within a row
  values_F: np.ndarray    # float32 [F] activation values
  index_T: np.ndarray     # int64 [T] global token index in the store
  width: int

  @property
  def num_tokens(self) -> int:
    return len(self.index_T)

  def csr(self, values: bool = False) -> sp.csr_matrix:
    """T x N CSR of int32 ones (or the activation values)."""
    data = self.values_F if values else np.ones(len(self.latents_F), np.int32)
    return sp.csr_matrix((data, self.latents_F, self.indptr_T1), shape=(self.num_tokens, self.width))

  def counts_N(self) -> np.ndarray:
    """How many tokens each latent fired on."""
    return np.bincount(self.latents_F, minlength=self.width).astype(np.int64)


def from_index_lists(latents_per_token: list, width: int) -> Firings:
  """Builds a record from a list of per-token index arrays (tests and benchmarks)."""
  lens = np.array([len(x) for x in latents_per_token], np.int64)
  indptr = np.concatenate([[0], np.cumsum(lens)])
  lat = (np.concatenate([np.sort(np.asarray(x, np.int32)) for x in latents_per_token])
         if len(latents_per_token) else np.zeros(0, np.int32))
  return Firings(indptr, lat.astype(np.int32), np.ones(len(lat), np.float32),
                 np.arange(len(lens), dtype=np.int64), width)


class Recorder:
  """Appends the nonzero entries of each batch's activations."""

  def __init__(self, width: int):
    self.width = width
    self._lens, self._lat, self._val, self._idx = [], [], [], []

  def add(self, acts_BxN: np.ndarray, index_B: np.ndarray) -> None:
    acts_BxN = np.asarray(acts_BxN)
    rows, cols = np.nonzero(acts_BxN)  # row-major: cols sorted within each row
    self._lens.append(np.bincount(rows, minlength=acts_BxN.shape[0]))
    self._lat.append(cols.astype(np.int32))
    self._val.append(acts_BxN[rows, cols].astype(np.float32))
    self._idx.append(np.asarray(index_B, np.int64))

  def result(self) -> Firings:
    lens = np.concatenate(self._lens) if self._lens else np.zeros(0, np.int64)
    cat = lambda xs, dt: np.concatenate(xs) if xs else np.zeros(0, dt)
    return Firings(np.concatenate([[0], np.cumsum(lens)]).astype(np.int64), cat(self._lat, np.int32),
                   cat(self._val, np.float32), cat(self._idx, np.int64), self.width)
