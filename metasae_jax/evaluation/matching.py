"""Joint ↔ solo latents: Hungarian matching on decoder cosine, and split candidates from cross-φ.

Legend: N = joint latents, M = solo latents, D = d_model, K = partners kept per solo latent.
A split candidate is a solo latent whose firing is shared by >= 2 joint latents (cross-φ above a
threshold): the joint SAE may have split one solo feature into more atomic ones.
"""

from typing import Callable, NamedTuple, Optional

import numpy as np
import scipy.optimize

from metasae_jax.storage import heldout
from metasae_jax.evaluation.cooccurrence import CrossPhi
from metasae_jax.evaluation.firings import Firings
from metasae_jax.storage.store import Store


class Matching(NamedTuple):
  """Pairs (joint_idx[i], solo_idx[i]) maximising the summed decoder cosine."""
  joint_idx: np.ndarray
  solo_idx: np.ndarray
  cosine: np.ndarray


def cosine_matrix(w_dec_NxD: np.ndarray, w_dec_MxD: np.ndarray) -> np.ndarray:
  a = w_dec_NxD / np.maximum(np.linalg.norm(w_dec_NxD, axis=1, keepdims=True), 1e-12)
  b = w_dec_MxD / np.maximum(np.linalg.norm(w_dec_MxD, axis=1, keepdims=True), 1e-12)
  return (a @ b.T).astype(np.float32)


def match_decoders(w_dec_joint_NxD: np.ndarray, w_dec_solo_MxD: np.ndarray) -> Matching:
  """One-to-one matching (min(N, M) pairs) maximising total cosine similarity."""
  cos_NxM = cosine_matrix(w_dec_joint_NxD, w_dec_solo_MxD)
  rows, cols = scipy.optimize.linear_sum_assignment(cos_NxM, maximize=True)
  return Matching(rows.astype(np.int64), cols.astype(np.int64), cos_NxM[rows, cols].astype(np.float64))


def _token_sets(firings: Firings):
  """Per latent, the sorted row numbers (tokens) it fired on, and the activation values."""
  csc = firings.csr(values=True).tocsc()
  csc.sort_indices()
  return csc


def top_contexts(store: Optional[Store], firings: Firings, latent: int, num: int = 5,
                 decode: Optional[Callable[[list], str]] = None, before: int = 12, after: int = 3,
                 _csc=None) -> list:
  """The `num` tokens where `latent` fired hardest, with their context as text (or token ids)."""
  csc = _token_sets(firings) if _csc is None else _csc
  rows = csc.indices[csc.indptr[latent]:csc.indptr[latent + 1]]
  vals = csc.data[csc.indptr[latent]:csc.indptr[latent + 1]]
  out = []
  for i in np.argsort(-vals, kind="stable")[:num]:
    g = int(firings.index_T[rows[i]])
    item = {"token_index": g, "activation": float(vals[i])}
    if store is not None and store.has_tokens:
      ids, pos = heldout.context_of(store, g)
      window = ids[max(0, pos - before):pos + after + 1].tolist()
      at = pos - max(0, pos - before)
      item["token_ids"] = window
      item["position"] = int(pos)
      if decode is not None:
        item["text"] = (decode(window[:at]) + "«" + decode(window[at:at + 1]) + "»"
                        + decode(window[at + 1:]))
    out.append(item)
  return out


def split_candidates(joint: Firings, solo: Firings, cross: CrossPhi, matching: Optional[Matching] = None,
                     min_partners: int = 2, threshold: float = 0.2, max_candidates: int = 50,
                     store: Optional[Store] = None, decode: Optional[Callable[[list], str]] = None,
                     num_contexts: int = 5) -> list:
  """Solo latents with cross-φ >= threshold to >= `min_partners` joint latents, strongest first.

  Each entry lists the partner joint latents with their cross-φ, the fraction of the solo latent's
  firings on which at least one partner fires (coverage), its matched joint latent, and top contexts.
  """
  partners_ok = np.where(np.isnan(cross.top_phi_SxK), -np.inf, cross.top_phi_SxK) >= threshold
  num_partners = partners_ok.sum(1)
  cand = np.flatnonzero(num_partners >= min_partners)
  score = np.where(partners_ok, cross.top_phi_SxK, 0).sum(1)
  cand = cand[np.argsort(-score[cand], kind="stable")][:max_candidates]
  solo_csc, joint_csc = _token_sets(solo), _token_sets(joint)
  match_of_solo = {} if matching is None else {int(s): (int(j), float(c)) for j, s, c in zip(*matching)}
  counts_s = solo.counts_N()
  out = []
  for s in cand:
    s = int(s)
    partners = [int(j) for j, ok in zip(cross.top_idx_SxK[s], partners_ok[s]) if ok]
    fired = solo_csc.indices[solo_csc.indptr[s]:solo_csc.indptr[s + 1]]
    union = np.unique(np.concatenate([joint_csc.indices[joint_csc.indptr[j]:joint_csc.indptr[j + 1]]
                                      for j in partners]))
    entry = {"solo_latent": s, "solo_frequency": float(counts_s[s] / max(solo.num_tokens, 1)),
             "joint_partners": [{"joint_latent": j, "cross_phi": float(p)}
                                for j, p in zip(partners, cross.top_phi_SxK[s][partners_ok[s]])],
             "coverage": float(np.isin(fired, union).mean()) if len(fired) else float("nan")}
    if s in match_of_solo:
      entry["matched_joint_latent"], entry["matched_cosine"] = match_of_solo[s]
    entry["solo_top_contexts"] = top_contexts(store, solo, s, num_contexts, decode, _csc=solo_csc)
    entry["joint_top_contexts"] = {str(j): top_contexts(store, joint, j, max(1, num_contexts // 2), decode,
                                                        _csc=joint_csc) for j in partners}
    out.append(entry)
  return out
