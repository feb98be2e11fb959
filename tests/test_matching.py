"""Tests for metasae_jax.evaluation.matching: Hungarian vs brute-force permutations, split candidates on planted data.

Legend: T = tokens, N = joint latents, M = solo latents, D = d_model.
"""

import itertools

import numpy as np

from metasae_jax.evaluation import cooccurrence, matching
from metasae_jax.storage import store
from metasae_jax.evaluation.firings import Firings, from_index_lists


def test_hungarian_matches_brute_force():
  rng = np.random.default_rng(0)
  for _ in range(5):
    wj, ws = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
    got = matching.match_decoders(wj, ws)
    cos = np.array([[a @ b / np.linalg.norm(a) / np.linalg.norm(b) for b in ws] for a in wj])
    best = max(sum(cos[i, p[i]] for i in range(5)) for p in itertools.permutations(range(5)))
    np.testing.assert_allclose(got.cosine.sum(), best, rtol=1e-5)
    np.testing.assert_allclose(got.cosine, cos[got.joint_idx, got.solo_idx], rtol=1e-5)


def test_planted_split_is_found(tmp_path):
  # Solo latent 0 fires on tokens of two kinds; joint latents 3 and 4 each fire on one kind.
  rng = np.random.default_rng(1)
  t = 200
  kind = rng.integers(0, 3, t)  # 0, 1: the two halves of solo latent 0; 2: neither
  solo_lists, joint_lists = [], []
  for c in kind:
    noise = list(rng.choice(np.arange(1, 6), 1))
    solo_lists.append(([0] if c < 2 else []) + noise)
    joint_lists.append(([3] if c == 0 else [4] if c == 1 else []) + list(rng.choice([0, 1, 2, 5], 1)))
  solo = from_index_lists(solo_lists, 6)
  joint = from_index_lists(joint_lists, 6)
  tokens = np.arange(t, dtype=np.int32) % 50
  st = store.write_store(str(tmp_path / "s"), np.zeros((t, 2), np.float32), tokens, context_len=10)
  cross = cooccurrence.cross_phi(joint, solo, top=4, threshold=0.2)
  cands = matching.split_candidates(joint, solo, cross, threshold=0.2, store=st,
                                    decode=lambda ids: " ".join(map(str, ids)))
  assert [c["solo_latent"] for c in cands] == [0]
  assert sorted(p["joint_latent"] for p in cands[0]["joint_partners"]) == [3, 4]
  assert cands[0]["coverage"] == 1.0
  ctx = cands[0]["solo_top_contexts"][0]
  assert "«" in ctx["text"] and ctx["token_ids"][ctx["position"] - max(0, ctx["position"] - 12)] == \
      tokens[ctx["token_index"]]


def test_top_contexts_ordered_by_activation():
  f = Firings(np.array([0, 1, 2, 3]), np.array([0, 0, 0], np.int32), np.array([0.5, 2.0, 1.0], np.float32),
              np.array([10, 11, 12]), 1)
  got = matching.top_contexts(None, f, 0, num=2)
  assert [g["token_index"] for g in got] == [11, 12]
