"""Example extraction on a tiny synthetic store + SAE, checked against dense encoding of the same batches."""

import os

import jax.numpy as jnp
import numpy as np
import pytest

from metasae_jax.core import sae
from metasae_jax.evaluation import examples as ex
from metasae_jax.evaluation.encoder import StreamEncoder
from metasae_jax.storage.loaded_sae import load_sae
from metasae_jax.storage.positions import KeptTokens
from tests import autointerp_util as util

BATCH = 100  # does not divide the 15 kept tokens per context: batches straddle contexts and shards


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("ex")
  store = util.make_store(str(root / "store"), "m", num_contexts=24)
  util.make_run(str(root / "run"), threshold_solo=True)
  return store, str(root / "run")


def test_layout_skips_first_position_and_round_trips(setup):
  store, _ = setup
  layout = KeptTokens(store, 1)
  assert layout.num_kept == 24 * (util.CTX - 1)
  g = layout.kept_to_global(np.arange(layout.num_kept))
  assert np.all(g % util.CTX != 0) and np.all(np.diff(g) > 0)
  assert np.array_equal(layout.global_to_kept(g), np.arange(layout.num_kept))
  assert np.all(layout.global_to_kept(np.arange(0, store.num_tokens, util.CTX)) == -1)
  assert np.array_equal(layout.context_start(np.array([0, 17, 175])), [0, 16, 160])
  assert KeptTokens(store, 0).num_kept == store.num_tokens


def _dense(enc: StreamEncoder, store, layout, num_kept):
  """Acts [kept, N] encoded batch by batch exactly like the stream, by the training forward (checking only)."""
  out = []
  s = enc.sae
  for start in range(0, num_kept, BATCH):
    x = store.gather_acts(layout.kept_to_global(np.arange(start, min(start + BATCH, num_kept))))
    if enc.rule == "threshold":
      f = sae.forward(s.params, jnp.asarray(x), s.k, input_norm=s.input_norm, threshold_N=s.threshold_N)
    else:
      f = sae.forward(s.params, jnp.asarray(x), s.k, enc.rule, s.input_norm)
    out.append(np.asarray(f.acts_BxN))
  return np.concatenate(out)


# joint has no θ (default: per-token top-k; BatchTopK on request), solo has calibrated θ.
@pytest.mark.parametrize("name,firing,rule", [("joint", None, "topk"), ("joint", "batchtopk", "batchtopk"),
                                              ("solo", None, "threshold"), ("solo", "topk", "topk")])
def test_pools_match_dense_encoding(setup, name, firing, rule):
  store, run = setup
  layout = KeptTokens(store, 1)
  enc = StreamEncoder(load_sae(os.path.join(run, name)), firing)
  assert enc.rule == rule
  num_kept = layout.num_kept - 7
  cand = np.array([0, 5, 7, 11, 23])
  (pools,) = ex.stream(store, layout, [enc], [cand], num_kept, BATCH, top=6, reservoir=5, seed=0)
  dense = _dense(enc, store, layout, num_kept)
  assert np.array_equal(pools.count_N, (dense > 0).sum(0))
  for c, latent in enumerate(cand):
    col = dense[:, latent]
    want = np.sort(col[col > 0])[::-1][:6]
    got = pools.top_val_CxK[c][pools.top_val_CxK[c] > 0]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(col[pools.top_rank_CxK[c][:len(got)]], got, rtol=1e-5)
    res = pools.res_key_CxR[c] < 1
    assert res.sum() == min(5, (col > 0).sum())
    np.testing.assert_allclose(col[pools.res_rank_CxR[c][res]], pools.res_val_CxR[c][res], rtol=1e-5)
    rank_P, val_P = pools.pool(c)
    assert len(set(rank_P.tolist())) == len(rank_P) and np.all(np.diff(val_P) <= 0)


@pytest.mark.parametrize("firing", ["batchtopk", "topk"])
def test_windows_carry_exact_activations_within_context(setup, firing):
  store, run = setup
  layout = KeptTokens(store, 1)
  enc = StreamEncoder(load_sae(os.path.join(run, "joint")), firing)
  num_kept = layout.num_kept
  (pools,) = ex.stream(store, layout, [enc], [np.arange(util.N)], num_kept, BATCH, 8, 8, 0)
  dense = _dense(enc, store, layout, num_kept)
  latent = int(np.argmax((dense > 0).sum(0)))
  rank_P, _ = pools.pool(latent)
  ends = layout.kept_to_global(rank_P[:6])
  window = 10
  (exs,) = ex.window_examples(store, layout, enc, pools, np.array([latent]), [ends], window)
  tokens = store.read_tokens(0, store.num_tokens)
  for e, end in zip(exs, ends):
    assert e.end == end and len(e.acts) == len(e.token_ids) <= window
    start = end - len(e.acts) + 1
    assert start // util.CTX == end // util.CTX  # never crosses its context
    assert list(e.token_ids) == tokens[start:end + 1].tolist()
    ranks = layout.global_to_kept(np.arange(start, end + 1))
    want = np.where(ranks >= 0, dense[np.maximum(ranks, 0), latent], 0.0)
    np.testing.assert_allclose(e.acts, want, rtol=1e-5, atol=1e-6)
    assert e.activation > 0


def test_sample_top_heavy():
  rng = np.random.default_rng(0)
  got = ex.sample_top_heavy(40, 10, 4, rng)
  assert len(set(got)) == 10 and all(0 <= g < 40 for g in got)
  bins = np.bincount(np.asarray(got) // 10, minlength=4)
  assert bins[0] >= bins[3] and bins[0] >= 3
  rest = ex.sample_top_heavy(40, 50, 4, rng, exclude=got)
  assert len(rest) == 30 and not set(rest) & set(got)
  assert ex.sample_top_heavy(3, 5, 4, rng) == [0, 1, 2]


def test_pairs_follow_hungarian_matching(tmp_path):
  from metasae_jax.autointerp import selection
  perm = util.make_run(str(tmp_path / "run"))
  joint, solo = (load_sae(str(tmp_path / "run" / n)) for n in ("joint", "solo"))
  pairs = selection.match_pairs(joint.W_dec, solo.W_dec)
  assert sorted(map(tuple, pairs.tolist())) == sorted((int(perm[j]), j) for j in range(util.N))
  cands = selection.candidate_pairs(pairs, 3, 2, seed=0)
  assert len(cands) == 6 and len({tuple(c) for c in cands.tolist()}) == 6
  counts = np.zeros(util.N, np.int64)
  counts[cands[1:, 0]] = 10
  counts_solo = np.full(util.N, 10)
  assert selection.choose(cands, counts, counts_solo, 5, 3).tolist() == [1, 2, 3]
