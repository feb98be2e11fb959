"""Ground-truth benchmark: generator statistics, scorers on hand-built dictionaries, verdicts, a tiny study."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from metasae_jax.core import sae
from metasae_jax.core.errors import UserError
from metasae_jax.workflows.groundtruth import report, scenarios, scores, study

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T = 40000


def _rate_ok(on_T, p, t=T):
  """Empirical rate within 5 binomial standard errors of p."""
  return abs(on_T.mean() - p) <= 5 * np.sqrt(p * (1 - p) / t) + 1e-12


def _cfg(kind, **kw):
  return scenarios.ScenarioConfig(kind=kind, d_model=24, **kw)


def test_independent_rates_magnitudes_norms_and_noise():
  cfg = _cfg("independent", num_features=10, p_fire=0.1, mag_low=0.5, mag_high=2.0, noise=0.05)
  tr = scenarios.generate(cfg, T, seed=1)
  on = tr.codes_TxF > 0
  assert all(_rate_ok(on[:, f], 0.1) for f in range(10))
  mags = tr.codes_TxF[on]
  assert mags.min() >= 0.5 and mags.max() <= 2.0 and abs(mags.mean() - 1.25) < 0.02
  np.testing.assert_allclose(np.linalg.norm(tr.features_FxD, axis=1), 1.0, atol=1e-6)
  resid = tr.x_TxD - tr.codes_TxF @ tr.features_FxD
  assert abs(resid.std() - 0.05) < 0.002
  # Independence: co-firing of two features matches the product of rates.
  assert _rate_ok(on[:, 0] & on[:, 1], 0.01)


def test_hierarchy_parent_iff_one_child():
  cfg = _cfg("hierarchy", num_features=2, num_groups=3, group_size=4, p_group=0.2)
  tr = scenarios.generate(cfg, T, seed=2)
  on = tr.codes_TxF > 0
  for g in range(3):
    parent, children = on[:, g * 5], on[:, g * 5 + 1:g * 5 + 5]
    assert _rate_ok(parent, 0.2)
    assert all(_rate_ok(children[:, c], 0.05) for c in range(4))
    np.testing.assert_array_equal(children.sum(1), parent.astype(int))  # exactly one child iff the parent
    for c in range(4):
      assert tr.parent_of[g * 5 + 1 + c] == g * 5
  assert tr.roles[:5] == ("parent", "child", "child", "child", "child")
  assert len(tr.pairs) == 12


def test_blended_only_inside_exclusive_orthogonal_contexts():
  cfg = _cfg("blended", num_features=3, num_groups=2, group_size=3, p_group=0.1, p_conditional=0.4)
  tr = scenarios.generate(cfg, T, seed=3)
  on = tr.codes_TxF > 0
  for g in range(2):
    b, ctx = on[:, g * 4], on[:, g * 4 + 1:g * 4 + 4]
    assert ctx.sum(1).max() == 1  # contexts are exclusive
    assert all(_rate_ok(ctx[:, c], 0.1) for c in range(3))
    assert not np.any(b & ~ctx.any(1))  # never outside a context
    for c in range(3):
      assert _rate_ok(b[ctx[:, c]], 0.4, ctx[:, c].sum())
    gram = tr.features_FxD[g * 4:g * 4 + 4] @ tr.features_FxD[g * 4:g * 4 + 4].T
    np.testing.assert_allclose(gram, np.eye(4), atol=1e-5)


def test_composition_pair_and_alone_rates():
  cfg = _cfg("composition", num_features=0, num_groups=2, p_group=0.15, p_alone=0.05)
  tr = scenarios.generate(cfg, T, seed=4)
  on = tr.codes_TxF > 0
  for g in range(2):
    a, b = on[:, 2 * g], on[:, 2 * g + 1]
    assert _rate_ok(a & b, 0.15) and _rate_ok(a & ~b, 0.05) and _rate_ok(b & ~a, 0.05)
  assert tr.pairs == ((0, 1), (2, 3))


def test_superposition_needs_more_features_than_latents(tmp_path):
  sup = dict(scenarios.defaults())["superposition"]
  assert sup.num_true_features > 64
  small = scenarios.ScenarioConfig(kind="superposition", d_model=16, num_features=8)
  with pytest.raises(UserError, match="more true features"):
    study.StudyConfig(out_dir=str(tmp_path), scenarios=(("s", small),), train=dict(width=16, k=3, meta_width=4, meta_k=2))


def test_standardized_directions_match_the_sae_standardisation():
  rng = np.random.default_rng(0)
  f = rng.normal(size=(5, 12)).astype(np.float32)
  xs, _, _ = sae.standardize(jnp.asarray(2.5 * f))  # a token made of one feature, any positive magnitude
  xs = np.asarray(xs, np.float64)
  np.testing.assert_allclose(scenarios.standardized_directions(f), xs / np.linalg.norm(xs, axis=1, keepdims=True),
                             atol=1e-5)


def _hier():
  cfg = _cfg("hierarchy", num_features=4, num_groups=2, group_size=2, p_group=0.2, p_fire=0.1)
  tr = scenarios.generate(cfg, 4000, seed=5)
  return tr, scenarios.standardized_directions(tr.features_FxD), tr.codes_TxF > 0


def test_exact_dictionary_scores_perfect():
  tr, truth, on = _hier()
  s = scores.score(tr.features_FxD, on, truth, on, tr.pairs, tr.parent_of)
  assert s["recovery"] == 1.0 and s["atoms_recovered"] == truth.shape[0]
  assert s["purity"] == 1.0 and s["purity_weighted"] == 1.0
  assert s["pure_fraction"] == 1.0 and s["clean_fraction"] == 1.0
  assert s["composite_latents"] == 0 and s["absorbing_latents"] == 0 and s["split_features"] == 0
  assert s["dead_fraction"] == 0.0
  np.testing.assert_allclose(s["mean_max_cos"], 1.0, atol=1e-9)
  assert s["l0"] == pytest.approx(on.sum() / on.shape[0])


def test_permuted_rescaled_dictionary_scores_the_same():
  tr, truth, on = _hier()
  rng = np.random.default_rng(1)
  # A mediocre dictionary: truth plus noise, and a few latents firing on the wrong tokens.
  dec = tr.features_FxD + rng.uniform(0, 0.3, (len(truth), 1)) * rng.normal(size=tr.features_FxD.shape)
  fired = on ^ (rng.random(on.shape) < 0.02)
  base = scores.score(dec, fired, truth, on, tr.pairs, tr.parent_of, mse=0.5)
  assert 0 < base["recovery"] < 1 and 0 < base["purity"] < 1 and base["mean_abs_phi"] > 0
  perm = rng.permutation(dec.shape[0])
  scale = rng.uniform(0.1, 10, size=(dec.shape[0], 1))
  moved = scores.score(dec[perm] * scale, fired[:, perm], truth, on, tr.pairs, tr.parent_of, mse=0.5)
  for key, v in base.items():
    assert moved[key] == pytest.approx(v, abs=1e-9), key


def test_composite_dictionary_scores_as_composite():
  tr, truth, on = _hier()
  f = tr.features_FxD
  # Children fused with their parent (absorption), and two unrelated independent features fused.
  rows = [f[1] + f[0], f[2] + f[0], f[4] + f[3], f[5] + f[3], f[6] + f[7]]
  fired = np.stack([on[:, 1], on[:, 2], on[:, 4], on[:, 5], on[:, 6] | on[:, 7]], 1)
  s = scores.score(np.stack(rows), fired, truth, on, tr.pairs, tr.parent_of)
  assert s["atoms_recovered"] == 0
  assert s["composite_latents"] == 5
  assert s["structured_composites"] == 4  # the four child+parent rows are this scenario's pairs
  assert s["absorbing_latents"] == 4


def test_absorbing_child_that_is_still_an_atom():
  tr, truth, on = _hier()
  # Mostly the child, a little of its parent: cosine to the child stays > 0.9, but it absorbs.
  row = scenarios.standardized_directions(tr.features_FxD[1:2])[0] + 0.3 * truth[0]
  s = scores.score(row[None], on[:, 1:2], truth, on, tr.pairs, tr.parent_of)
  assert s["atoms_recovered"] == 1 and s["absorbing_latents"] == 1 and s["composite_latents"] == 0


def test_split_and_purity_by_hand():
  on = np.zeros((100, 1), bool)
  on[:40, 0] = True
  truth = np.eye(1, 8)
  fired = np.zeros((100, 3), bool)
  fired[:20, 0] = True            # half of the feature's firings
  fired[20:40, 1] = True          # the other half: the feature is split in two
  fired[30:60, 2] = True          # a third of its firings on the feature: purity 1/3
  s = scores.score(np.tile(truth, (3, 1)), fired, truth, on)
  assert s["split_features"] == 1 and s["clean_features"] == 0
  assert s["purity"] == pytest.approx((1 + 1 + 1 / 3) / 3)
  assert s["purity_weighted"] == pytest.approx((20 + 20 + 10) / (20 + 20 + 30))
  assert s["latents_per_feature"] == 2  # latent 2 is owned by nobody (< half its firings on the feature)


def test_mean_abs_phi_brute_force():
  rng = np.random.default_rng(2)
  fired = rng.random((300, 6)) < 0.2
  fired[:, 3] = False   # dead: its pairs count 0
  fired[:, 4] |= fired[:, 0]
  vals = []
  for i in range(6):
    for j in range(i + 1, 6):
      a, b = fired[:, i], fired[:, j]
      vals.append(0.0 if a.std() == 0 or b.std() == 0 else abs(np.corrcoef(a, b)[0, 1]))
  assert scores.mean_abs_phi(fired) == pytest.approx(np.mean(vals), rel=1e-9)


def test_paired_interval_and_verdicts():
  j, s = [0.9, 0.8, 0.85, 0.95], [0.7, 0.7, 0.72, 0.74]
  d = report.paired(j, s)
  diff = np.subtract(j, s)
  half = scipy.stats.t.ppf(0.975, 3) * diff.std(ddof=1) / 2
  assert d["lo"] == pytest.approx(diff.mean() - half) and d["hi"] == pytest.approx(diff.mean() + half)
  assert d["p"] == pytest.approx(scipy.stats.ttest_rel(j, s).pvalue) and d["effect"] == 1
  assert report.paired(s, j)["effect"] == -1
  assert report.paired([1, 2, 3], [1.5, 1.2, 3.4])["effect"] == 0
  assert report.paired([1, 1], [1, 1])["effect"] == 0
  assert report._verdict_word([0, 1]) == "penalty helps"
  assert report._verdict_word([-1, 0]) == "penalty hurts"
  assert report._verdict_word([0, 0]) == "no detectable effect at 95 %"
  assert report._verdict_word([1, -1]).startswith("mixed")


def test_scenario_overrides():
  (name, cfg), = scenarios.select(["hierarchy"], overrides="hierarchy.p_group=0.3,hierarchy.group_size=5")
  assert name == "hierarchy" and cfg.p_group == 0.3 and cfg.group_size == 5
  for bad, msg in (("hierarchy.nope=1", "no field"), ("blended.p_group=0.1", "not among"),
                   ("hierarchy.group_size=2.5", "not a valid"), ("p_group=0.1", "name.field=value")):
    with pytest.raises(UserError, match=msg):
      scenarios.select(["hierarchy"], overrides=bad)
  with pytest.raises(UserError, match="unknown"):
    scenarios.select(["nope"])


def _tiny(out_dir, **kw):
  sc = scenarios.ScenarioConfig(kind="hierarchy", d_model=12, num_features=4, num_groups=2, group_size=2,
                                p_group=0.2, p_fire=0.1)
  train = dict(width=16, k=2, meta_width=4, meta_k=2, batch_size=64, aux_k=4, n_primary_steps=4, n_meta_steps=2,
               lr=1e-3)
  train.update(kw.pop("train", {}))
  args = dict(out_dir=str(out_dir), scenarios=(("hier", sc),), lambda2s=(0.0, 1.0), seeds=2, steps=40,
              train=train, train_tokens=512, heldout_tokens=256, matryoshka_fractions=())
  args.update(kw)
  return study.StudyConfig(**args)


def test_tiny_study_end_to_end_resumes_and_refuses_other_config(tmp_path):
  cfg = _tiny(tmp_path / "gt")
  rep = study.run_study(cfg, progress=False)
  out = tmp_path / "gt"
  for f in ("report.json", "report.md", "plots/hier.png", "results/hier/lam1_seed0.npz",
            "data/hier/train/zarr.json", "data/hier/train/true_features.npy", "data/hier/train/generator.json", "data/hier/heldout/true_codes.npy"):
    assert (out / f).exists(), f
  s = rep["scenarios"]["hier"]
  assert s["control_max_abs_delta"] == 0.0  # λ₂ = 0: joint and solo are the same training
  assert [p["lambda2"] for p in s["points"]] == [0.0, 1.0] and len(rep["points"]) == 4
  assert s["generator"]["group_size"] == 2
  for p in rep["points"]:
    for which in ("joint", "solo"):
      assert 0 <= p[which]["recovery"] <= 1 and p[which]["l0"] > 0
  # The lambda2 > 0 joint SAE really differs from its solo twin.
  p1 = [p for p in rep["points"] if p["lambda2"] == 1.0][0]
  assert p1["joint"] != p1["solo"]
  with open(out / "report.json") as f:
    assert json.load(f)["scenarios"]["hier"]["verdict"] == s["verdict"]
  md = (out / "report.md").read_text()
  assert "| hier | 1 |" in md and s["verdict"] in md and "## hier" in md
  # Rerun: nothing retrains (result files untouched), same report.
  res = out / "results" / "hier" / "lam1_seed0.json"
  mtime = os.stat(res).st_mtime_ns
  rep2 = study.run_study(cfg, progress=False)
  assert os.stat(res).st_mtime_ns == mtime and rep2["points"] == rep["points"]
  with pytest.raises(UserError, match="different config .*seeds"):
    study.run_study(_tiny(out, seeds=3), progress=False)


def test_binary_refuses_mixed_directory_in_one_line(tmp_path):
  study.claim(_tiny(tmp_path / "gt"))
  env = dict(os.environ, PYTHONPATH=REPO)
  r = subprocess.run([sys.executable, "-m", "experiments.groundtruth", f"--out_dir={tmp_path / 'gt'}",
                      "--scenarios=independent", "--noprogress"], cwd=REPO, env=env, capture_output=True,
                     text=True, timeout=120)
  assert r.returncode == 1
  assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: ") and "different config" in r.stderr


def test_train_overrides_reach_every_arm(tmp_path):
  cfg = _tiny(tmp_path / "a", train=dict(penalty_grad="through", auxk_detach=True),
              matryoshka_fractions=(0.25, 0.5))
  tc = cfg.train_config(0.3, 2, 12)
  assert tc.penalty_grad == "through" and tc.auxk_detach and tc.lambda2 == 0.3 and tc.seed == 2 and tc.baseline
  mc = cfg.train_config(0.3, 2, 12, arm="matryoshka")
  assert mc.architecture == "matryoshka_batchtopk" and mc.matryoshka_widths == (4, 8, 16)
  assert mc.lambda2 == 0 and not mc.baseline and mc.seed == 2
  shared = {f: getattr(tc, f) for f in cfg.shared_train()}
  assert shared == {f: getattr(mc, f) for f in cfg.shared_train()}  # same width, k, lr, batch, ... as solo


def test_study_config_declares_no_train_field(tmp_path):
  """Each hyperparameter has one default (TrainConfig's): StudyConfig re-declares none of its fields."""
  train_fields = {f.name for f in study.dataclasses.fields(study.TrainConfig)}
  study_fields = {f.name for f in study.dataclasses.fields(study.StudyConfig)}
  assert not train_fields & study_fields, train_fields & study_fields
  # What the study's train dict leaves out is TrainConfig's default, not another one.
  cfg = study.StudyConfig(out_dir=str(tmp_path), train=dict(k=3, meta_k=2), scale=1)
  tc = cfg.train_config(0.3, 0, 48)
  for f in study.dataclasses.fields(study.TrainConfig):
    if f.name not in ("d_model", "width", "k", "meta_width", "meta_k", "lambda2", "seed", "baseline"):
      assert getattr(tc, f.name) == f.default, f.name
  assert tc.width == 64 and tc.k == 3
  for bad, msg in ((dict(nope=1), "no field"), (dict(lambda2=0.3), "sets lambda2 itself"),
                   (dict(k=64), "k must be in")):
    with pytest.raises(UserError, match=msg):
      study.StudyConfig(out_dir=str(tmp_path), train=bad)
  with pytest.raises(UserError, match="matryoshka_fractions"):
    study.StudyConfig(out_dir=str(tmp_path), train=dict(k=3, meta_k=2), matryoshka_fractions=(0.5, 0.25))


def test_preset_config_file_holds_the_published_choices():
  from experiments.configs import groundtruth as preset  # pylint: disable=g-import-not-at-top
  c = preset.get_config()
  assert {k: c.train[k] for k in ("k", "lr", "batch_size", "aux_k", "meta_k")} == dict(
      k=3, lr=1e-3, batch_size=256, aux_k=32, meta_k=2)
  cfg = study.StudyConfig(out_dir="unused", **preset.study_kwargs(c))
  tc = cfg.train_config(0.3, 0, 48)
  assert (tc.width, tc.k, tc.meta_width, tc.batch_size, tc.lr, tc.aux_k) == (64, 3, 6, 256, 1e-3, 32)


def test_tiny_study_matryoshka_arm(tmp_path):
  """The third arm: a solo Matryoshka BatchTopK SAE per seed, same width and k, scored like the other arms."""
  cfg = _tiny(tmp_path / "gt", lambda2s=(0.0, 1.0), matryoshka_fractions=(0.25, 0.5))
  rep = study.run_study(cfg, progress=False)
  out = tmp_path / "gt"
  mats = [p for p in rep["points"] if p.get("arm") == "matryoshka"]
  assert [p["seed"] for p in mats] == [0, 1]
  for p in mats:
    # What trained is a Matryoshka SAE with nested prefixes 4, 8, 16, no penalty, at the study's width and k.
    assert p["train"] == {"architecture": "matryoshka_batchtopk", "matryoshka_widths": [4, 8, 16], "width": 16,
                          "k": 2, "lambda2": 0.0}
    assert p["matryoshka"]["l0"] == pytest.approx(2, abs=0.05)  # BatchTopK firing: k per token on average
  # Its scores are recomputed from its own saved parameters, and they are not the solo SAE's.
  saved = np.load(out / "results" / "hier" / "matryoshka_seed0.npz")
  params = {k[len("matryoshka_"):]: saved[k] for k in saved.files}
  x_held = np.asarray(study.store.open_store(str(out / "data/hier/heldout")).read_acts(0, 256))
  fired, mse, _ = study.fire(params, x_held, 2, 64, "matryoshka_batchtopk")
  assert mse == pytest.approx(mats[0]["matryoshka"]["mse"], rel=1e-5)
  assert fired.sum() / fired.shape[0] == pytest.approx(mats[0]["matryoshka"]["l0"])
  solo0 = [p for p in rep["points"] if p.get("arm") is None and p["seed"] == 0][0]["solo"]
  assert mats[0]["matryoshka"]["mse"] != solo0["mse"]
  m = rep["scenarios"]["hier"]["matryoshka"]
  assert m["seeds"] == [0, 1] and m["scores"]["recovery"]["n"] == 2 and m["delta"]["mse"]["n"] == 2
  assert m["verdict"].startswith(("matryoshka", "no detectable"))
  md = (out / "report.md").read_text()
  assert "| hier | solo Matryoshka |" in md and "| hier | joint MetaSAE λ₂=1 |" in md
  # Resume: the arm's files are reused.
  res = out / "results" / "hier" / "matryoshka_seed1.json"
  mtime = os.stat(res).st_mtime_ns
  assert study.run_study(cfg, progress=False)["points"] == rep["points"] and os.stat(res).st_mtime_ns == mtime


def test_binary_flags_and_config_file_reach_the_study(tmp_path):
  """The short flags researchers' scripts use still set their fields; --config.* reaches any field; the file's
  values fill the rest; a short flag that disagrees with a --config override is one error line."""
  code = ("import json, sys\nfrom absl import flags\nfrom experiments import groundtruth\n"
          "flags.FLAGS(sys.argv)\nprint(json.dumps(groundtruth.study_config().identity()))\n")
  env = dict(os.environ, PYTHONPATH=REPO)
  argv = [f"--out_dir={tmp_path / 'gt'}", "--k=4", "--lr=0.002", "--seeds=4", "--lambda2=0,0.5",
          "--penalty_grad=through", "--auxk_detach=true", "--matryoshka_fractions=0.25,0.5",
          "--config.train.sigma_sq=3", "--config.study.data_seed=7", "--scenarios=hierarchy"]
  r = subprocess.run([sys.executable, "-c", code, *argv], cwd=REPO, env=env, capture_output=True, text=True,
                     timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]
  ident = json.loads(r.stdout.strip().splitlines()[-1])
  t = ident["train"]
  assert (t["k"], t["lr"], t["penalty_grad"], t["auxk_detach"], t["sigma_sq"]) == (4, 0.002, "through", True, 3.0)
  assert (t["batch_size"], t["aux_k"], t["meta_k"], t["width"]) == (256, 32, 2, 64)  # the config file's
  assert ident["seeds"] == 4 and ident["lambda2s"] == [0.0, 0.5] and ident["data_seed"] == 7
  assert ident["matryoshka_fractions"] == [0.25, 0.5] and list(ident["scenarios"]) == ["hierarchy"]
  r = subprocess.run([sys.executable, "-m", "experiments.groundtruth", f"--out_dir={tmp_path / 'x'}", "--k=4",
                      "--config.train.k=5"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == (
      "error: --k=4 and --config.train.k=5 disagree; pass one of them.")
