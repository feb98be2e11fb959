"""Tests for metasae_jax.evaluation.bootstrap: exact replicate statistics, and coverage / width on synthetic firings.

Legend: C = contexts, L = context_len, T = tokens, N = latents, D = d_model, G = blocks, R = replicates.
"""

import types

import numpy as np

from metasae_jax.evaluation import bootstrap, cooccurrence
from metasae_jax.evaluation.firings import from_index_lists


def _fake_store(num_tokens, context_len, shard_tokens):
  sizes = [min(shard_tokens, num_tokens - a) for a in range(0, num_tokens, shard_tokens)]
  return types.SimpleNamespace(context_len=context_len,
                               segment_offsets=np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))


def _all_pairs_mean(f_TxN):
  with np.errstate(invalid="ignore", divide="ignore"):
    r = np.corrcoef(f_TxN.T.astype(float))
  return np.nan_to_num(np.abs(r[np.triu_indices(f_TxN.shape[1], 1)]), nan=0.0).mean()


def _firings(f_TxN):
  return from_index_lists([np.flatnonzero(r) for r in f_TxN], f_TxN.shape[1])


def test_layout_blocks_hold_whole_contexts():
  # Shards of 20 tokens with context_len 8: contexts restart at each shard (the last one is partial).
  store = _fake_store(60, 8, 20)
  lay = bootstrap.BlockLayout(store, 60, 0, num_blocks=4)
  assert lay.contexts_per_block == 3 and lay.num_blocks == 3  # 9 contexts
  assert bootstrap.BlockLayout(store, 50, 1, num_blocks=4).num_blocks == 3  # last used token: 58, context 8
  assert bootstrap.BlockLayout(store, 30, 1, num_blocks=5).contexts_per_block == 1  # 30 kept tokens span contexts 0..4
  idx = np.arange(60)
  want_ctx = (idx // 20) * 3 + (idx % 20) // 8
  np.testing.assert_array_equal(lay.context_of(idx), want_ctx)
  np.testing.assert_array_equal(lay.block_of(idx), want_ctx // lay.contexts_per_block)
  np.testing.assert_array_equal(lay.is_first(idx), (idx % 20) % 8 == 0)


def test_replicate_statistics_equal_recomputation_on_resampled_data():
  rng = np.random.default_rng(0)
  c, l, n, d = 12, 5, 9, 4
  t = c * l
  f_TxN = rng.random((t, n)) < np.linspace(0.05, 0.5, n)
  f_TxN[:, 0] = False  # a dead latent
  lay = bootstrap.BlockLayout(_fake_store(t, l, t), t, 0, num_blocks=6)
  block_T = lay.block_of(np.arange(t))
  pb = bootstrap.phi_blocks(_firings(f_TxN), block_T, lay.num_blocks, max_pair_entries=10**9)
  x = rng.normal(size=(t, d)) * np.where(np.arange(t) % l == 0, 20.0, 1.0)[:, None]
  recon = x + rng.normal(size=(t, d)) * 0.3
  xs, rs = rng.normal(size=(t, d)), rng.normal(size=(t, d))
  rec = bootstrap.ReconBlocks(lay, d)
  for a in range(0, t, 7):  # batches that straddle blocks
    sl = slice(a, a + 7)
    rec.add(np.arange(t)[sl], x[sl], recon[sl], xs[sl], rs[sl])

  # Observed data: the phi_stats headline, FVU / MSE by hand, and without first positions.
  np.testing.assert_allclose(bootstrap.mean_abs_phi(pb, np.ones(lay.num_blocks))[0],
                             cooccurrence.phi_stats(_firings(f_TxN)).mean_abs_phi, rtol=1e-10)
  fvu = lambda m: np.square(x[m] - recon[m]).sum() / np.square(x[m] - x[m].mean(0)).sum()
  everything, later = np.ones(t, bool), np.arange(t) % l != 0
  np.testing.assert_allclose(rec.metrics()["fvu"], fvu(everything), rtol=1e-10)
  np.testing.assert_allclose(rec.metrics(np.ones((1, lay.num_blocks)), exclude_first=True)["fvu"][0],
                             fvu(later), rtol=1e-10)
  np.testing.assert_allclose(rec.metrics()["mse"], np.square(xs - rs).mean(), rtol=1e-10)

  # A replicate = the data with each block repeated w_g times.
  w_RxG = bootstrap.block_weights(lay.num_blocks, 3, seed=1)
  reps = bootstrap.mean_abs_phi(pb, w_RxG)
  rec_reps = rec.metrics(w_RxG)
  for r, w in enumerate(w_RxG):
    rows = np.concatenate([np.repeat(np.flatnonzero(block_T == g)[None], int(k), 0).ravel()
                           for g, k in enumerate(w) if k])
    np.testing.assert_allclose(reps[r], _all_pairs_mean(f_TxN[rows]), rtol=1e-9)
    np.testing.assert_allclose(rec_reps["fvu"][r], fvu(rows), rtol=1e-9)
    np.testing.assert_allclose(rec_reps["mse"][r], np.square(xs[rows] - rs[rows]).mean(), rtol=1e-9)


def _simulate(rng, num_contexts, l, n):
  """Paired joint / solo firings driven by a shared per-token factor z; the coupling depends on the context.

  In 60 % of contexts (at random) solo latents follow z more closely than joint ones, in the rest the
  other way round; so tokens of a context are dependent and the effect varies between contexts (a
  token-level bootstrap would be too narrow here). Overall solo's mean |φ| is higher: a known effect.
  """
  solo_tighter_Cx1 = (rng.random(num_contexts) < 0.6)[:, None]
  z = rng.random((num_contexts, l)) < 0.4
  tight, loose = np.where(z, 0.8, 0.05), np.where(z, 0.35, 0.2)
  p_joint = np.where(solo_tighter_Cx1, loose, tight).reshape(-1, 1)
  p_solo = np.where(solo_tighter_Cx1, tight, loose).reshape(-1, 1)
  return rng.random((num_contexts * l, n)) < p_joint, rng.random((num_contexts * l, n)) < p_solo


def test_interval_covers_true_difference_with_nominal_width():
  # Assumption the test encodes: contexts are i.i.d. and tokens inside a context are dependent (shared
  # rate), so the spread of the statistic over independent held-out sets is the truth the block
  # bootstrap must reproduce. The true Δ is estimated on a large independent sample.
  rng = np.random.default_rng(0)
  l, n, num_contexts = 16, 6, 60
  big_j, big_s = _simulate(rng, 20000, l, n)
  true_pct = (_all_pairs_mean(big_j) - _all_pairs_mean(big_s)) / _all_pairs_mean(big_s) * 100
  assert true_pct < -10  # the effect is there (about -27 %)

  t = num_contexts * l
  lay = bootstrap.BlockLayout(_fake_store(t, l, t), t, 0, num_blocks=30)
  block_T = lay.block_of(np.arange(t))
  cfg = bootstrap.BootstrapConfig(replicates=400, num_blocks=30, seed=0)
  covered, widths, points = {"percentile": 0, "BCa": 0}, {"percentile": [], "BCa": []}, []
  for s in range(40):
    fj, fs = _simulate(rng, num_contexts, l, n)
    pj = bootstrap.phi_blocks(_firings(fj), block_T, lay.num_blocks, 10**9)
    ps = bootstrap.phi_blocks(_firings(fs), block_T, lay.num_blocks, 10**9)
    w = bootstrap.block_weights(lay.num_blocks, cfg.replicates, seed=s)
    ones = np.ones(lay.num_blocks)
    point = (bootstrap.mean_abs_phi(pj, ones)[0] / bootstrap.mean_abs_phi(ps, ones)[0] - 1) * 100
    reps = (bootstrap.mean_abs_phi(pj, w) / bootstrap.mean_abs_phi(ps, w) - 1) * 100
    wj = bootstrap.jackknife_weights(np.arange(lay.num_blocks), lay.num_blocks)
    jack = (bootstrap.mean_abs_phi(pj, wj) / bootstrap.mean_abs_phi(ps, wj) - 1) * 100
    for iv in (bootstrap.interval(point, reps, cfg.level), bootstrap.interval(point, reps, cfg.level, jack)):
      covered[iv["method"]] += iv["low"] <= true_pct <= iv["high"]
      widths[iv["method"]].append(iv["high"] - iv["low"])
    points.append(point)
  # 95 % nominal: 40 sets cover >= 33 times unless the interval is off (P(X <= 32) < 1 % at 0.95).
  # Resampling single tokens instead of blocks of contexts fails here (measured: 29 of 40, width 0.52x).
  nominal_width = 2 * 1.96 * np.std(points, ddof=1)
  for method in ("percentile", "BCa"):
    assert covered[method] >= 33, (method, covered)
    assert 0.7 < np.mean(widths[method]) / nominal_width < 1.4, (method, np.mean(widths[method]), nominal_width)


def test_bca_interval_equals_scipy_bca():
  """Our BCa from replicates + jackknife values against scipy.stats.bootstrap's BCa on a skewed statistic.

  The variance of 30 exponential draws: biased and skewed, so z0 and the acceleration both matter
  (the percentile interval is visibly off). Both use 40,000 resamples (their own draws), so the ends
  agree up to Monte Carlo noise, well below the shift BCa makes.
  """
  from scipy import stats
  rng = np.random.default_rng(1)
  x = rng.exponential(size=30)
  r = 40_000
  w_RxT = rng.multinomial(len(x), np.full(len(x), 1 / len(x)), size=r).astype(float)
  mean_R = w_RxT @ x / len(x)
  reps = w_RxT @ x ** 2 / len(x) - mean_R ** 2
  jack = np.array([np.var(np.delete(x, i)) for i in range(len(x))])
  ours = bootstrap.interval(float(np.var(x)), reps, 0.95, jack)
  pct = bootstrap.interval(float(np.var(x)), reps, 0.95)
  want = stats.bootstrap((x,), np.var, method="BCa", n_resamples=r, confidence_level=0.95,
                         random_state=np.random.default_rng(2)).confidence_interval
  width = want.high - want.low
  assert ours["method"] == "BCa" and pct["method"] == "percentile"
  np.testing.assert_allclose([ours["low"], ours["high"]], [want.low, want.high], atol=0.03 * width)
  assert abs(pct["high"] - want.high) > 0.1 * width  # the correction is large here, so the check has teeth
  assert ours["bias"] < 0  # the plug-in variance is biased low, and its replicates lower still


def test_compare_reports_three_intervals():
  rng = np.random.default_rng(3)
  l, n, d, num_contexts = 8, 5, 3, 40
  t = num_contexts * l
  fj, fs = _simulate(rng, num_contexts, l, n)
  lay = bootstrap.BlockLayout(_fake_store(t, l, t), t, 0, num_blocks=10)
  block_T = lay.block_of(np.arange(t))
  x = rng.normal(size=(t, d))
  recs = {}
  for name, noise in (("joint", 0.2), ("solo", 0.3)):
    recs[name] = bootstrap.ReconBlocks(lay, d)
    recs[name].add(np.arange(t), x, x + noise * rng.normal(size=(t, d)), x, x + noise * rng.normal(size=(t, d)))
  pb = [bootstrap.phi_blocks(_firings(f), block_T, lay.num_blocks, 10**9) for f in (fj, fs)]
  out = bootstrap.compare(recs["joint"], recs["solo"], *pb, bootstrap.BootstrapConfig(replicates=100, num_blocks=10))
  for key in ("mean_abs_phi_pct", "mse_pct", "fvu_pct"):
    iv = out[key]
    assert iv["low"] < iv["estimate"] < iv["high"] and iv["se"] > 0, (key, iv)
  assert out["fvu_pct"]["high"] < 0 and out["mean_abs_phi_pct"]["high"] < 0
  assert out["num_blocks"] == lay.num_blocks == 10 and out["mean_abs_phi_num_tokens"] == t
