"""End-to-end test of metasae_jax.evaluation.evaluate / experiments.evaluate on a tiny synthetic run directory.

Legend: T = tokens, D = d_model, N = latents.
"""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from metasae_jax.storage import artifact, store
from metasae_jax.evaluation import evaluate as evaluation
from metasae_jax.core.errors import UserError

D, N, K, L = 8, 16, 3, 8


def _run_dir(tmp_path, d=D):
  rng = np.random.default_rng(0)
  for i, name in enumerate(("joint", "solo")):
    w_dec = rng.normal(size=(N, d)).astype(np.float32)
    w_dec /= np.linalg.norm(w_dec, axis=1, keepdims=True)
    params = {"W_enc": w_dec.T.copy(), "b_enc": np.zeros(N, np.float32), "W_dec": w_dec,
              "b_dec": np.zeros(d, np.float32)}
    artifact.save_sae(str(tmp_path / "run" / name), params,
                      {"k": K, "activation": "batchtopk", "input_norm": "standardize_per_token",
                       "source": {"model": "tiny", "layer": 0, "site": "resid_pre"}})
  x = rng.normal(size=(L * 40, D)).astype(np.float32)
  tokens = rng.integers(0, 30, L * 40).astype(np.int32)
  store.write_store(str(tmp_path / "store"), x, tokens, context_len=L,
                    source={"model": "tiny", "layer": 0, "site": "resid_pre"})
  return str(tmp_path / "run"), str(tmp_path / "store")


def test_evaluate_run_end_to_end(tmp_path):
  run, st = _run_dir(tmp_path)
  cfg = evaluation.EvalConfig(run_dir=run, activations=st, num_tokens=200, model="none", batch_size=32,
                              meta_fve_steps=3, progress=False)
  report = evaluation.evaluate_run(cfg)
  for name in ("joint", "solo"):
    r = report[name]
    assert 0 < r["fvu"] < 2 and r["mse"] > 0 and r["l0"] > 0 and 0 <= r["dead_fraction"] < 1
    assert r["mean_abs_phi"] > 0 and r["meta_fve"] is not None and r["delta_ce_pct"] is None
    assert os.path.isfile(os.path.join(run, name, "cfg.json"))
    cfg_json = json.load(open(os.path.join(run, name, "cfg.json")))
    assert cfg_json["has_threshold"] and cfg_json["threshold_calibration"]["num_tokens"] == 200
  assert report["num_tokens"] == 200 and report["skip"]["skip_first_positions"] == 0
  assert set(report["comparison"]) >= {"mean_abs_phi_pct", "mean_abs_phi_live_pct", "fvu_pct", "mse_pct",
                                       "delta_ce_pp", "welch_t", "welch_p"}
  boot = report["comparison"]["bootstrap"]
  for key in ("mean_abs_phi_pct", "mse_pct", "fvu_pct"):
    assert boot[key]["low"] <= boot[key]["estimate"] <= boot[key]["high"], key
  np.testing.assert_allclose(boot["fvu_pct"]["estimate"], report["comparison"]["fvu_pct"], rtol=1e-9)
  np.testing.assert_allclose(boot["mse_pct"]["estimate"], report["comparison"]["mse_pct"], rtol=1e-6)
  np.testing.assert_allclose(boot["mean_abs_phi_pct"]["estimate"], report["comparison"]["mean_abs_phi_pct"],
                             rtol=1e-9)
  assert report["delta_ce"] == {"skipped": True}
  for f in ("report.json", "report.md", "split_candidates.json", "phi_hist.png", "metrics.png",
            "matched_cosine.png"):
    assert os.path.isfile(os.path.join(run, f)), f
  written = json.load(open(os.path.join(run, "report.json")))
  assert written["num_tokens"] == 200
  import hashlib
  for name in ("joint", "solo"):  # the report records the bytes it describes (thresholds included)
    with open(os.path.join(run, name, "sae.safetensors"), "rb") as f:
      assert written["artifact_sha256"][name] == hashlib.sha256(f.read()).hexdigest()
  # Second run uses the thresholds now stored in the artifacts.
  again = evaluation.evaluate_run(dataclasses.replace(cfg, meta_fve_steps=0))
  assert again["joint"]["fvu"] == pytest.approx(report["joint"]["fvu"])


def test_d_model_mismatch_is_user_error(tmp_path):
  run, _ = _run_dir(tmp_path, d=D)
  x = np.zeros((16, D + 1), np.float32)
  store.write_store(str(tmp_path / "other"), x, context_len=L)
  with pytest.raises(UserError, match="d_model"):
    evaluation.evaluate_run(evaluation.EvalConfig(run_dir=run, activations=str(tmp_path / "other"),
                                                  model="none", progress=False))


def test_binary_prints_one_line_error(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "experiments.evaluate", f"--run_dir={tmp_path}/nope",
                         f"--activations={tmp_path}/nope"], capture_output=True, text=True,
                        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert proc.returncode == 1
  assert proc.stderr.strip().startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1


def test_delta_ce_wired_through_evaluation(tmp_path, monkeypatch):
  import torch
  import transformers
  from metasae_jax.lm import models
  run, _ = _run_dir(tmp_path)
  torch.manual_seed(0)
  lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=30, hidden_size=D, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
      num_key_value_heads=2, max_position_embeddings=32)).eval()
  ids = np.random.default_rng(2).integers(0, 30, (12, L))
  acts = models.capture_residual(lm, torch.from_numpy(ids), 0, "resid_pre").numpy().reshape(-1, D)
  st = store.write_store(str(tmp_path / "lmstore"), acts, ids.reshape(-1).astype(np.int32), context_len=L,
                         source={"model": "tiny", "layer": 0, "site": "resid_pre"})

  class Tok:
    def decode(self, ids):
      return "".join(chr(97 + i % 26) for i in ids)
  loaded = models.LoadedModel(lm, Tok(), "tiny", D, 1)
  monkeypatch.setattr(evaluation, "_load_model", lambda name: loaded)
  monkeypatch.setattr(evaluation, "_load_decode", lambda name, store: Tok().decode)
  report = evaluation.evaluate_run(evaluation.EvalConfig(
      run_dir=run, activations=st.path, firing="batchtopk", batch_size=16, ce_contexts=4, ce_batch_contexts=3,
      meta_fve_steps=0, bootstrap_replicates=0, progress=False))
  for name in ("joint", "solo"):
    r = report[name]
    assert r["ce_clean"] > 0 and r["ce_spliced"] is not None and r["ce_zero_ablation"] is not None
    np.testing.assert_allclose(r["delta_ce_pct"], (r["ce_spliced"] - r["ce_clean"]) / r["ce_clean"] * 100)
  assert report["delta_ce"]["num_predictions"] == 4 * (L - 2)
  assert report["joint"]["delta_ce_pct_se"] > 0 and report["comparison"]["delta_ce_pp_se"] > 0
  assert report["delta_ce"]["resid_check_rel_err"] < 1e-5
  assert report["comparison"]["delta_ce_pp"] is not None
  cands = json.load(open(os.path.join(run, "split_candidates.json")))
  assert all("«" in c["text"] for cand in cands for c in cand["solo_top_contexts"])


def _brute_metrics(x, recon, context_len):
  """FVU over all tokens and without each context's first position, by hand."""
  fvu = lambda m: np.square(x[m] - recon[m]).sum() / np.square(x[m] - x[m].mean(0)).sum()
  later = np.arange(len(x)) % context_len != 0
  return fvu(np.ones(len(x), bool)), fvu(later)


def test_report_fvu_positions_and_phi_means(tmp_path):
  run, st = _run_dir(tmp_path)
  cfg = evaluation.EvalConfig(run_dir=run, activations=st, model="none", firing="batchtopk", batch_size=32,
                              meta_fve_steps=0, bootstrap_replicates=20, progress=False)
  report = evaluation.evaluate_run(cfg)
  s = store.open_store(st)
  x = s.read_acts(0, int(s.segment_offsets[1]))
  from metasae_jax.storage import loaded_sae
  for name in ("joint", "solo"):
    sae = loaded_sae.load_sae(os.path.join(run, name), D)
    recon = np.concatenate([np.asarray(sae.forward(x[a:a + 32], "batchtopk").recon_BxD)
                            for a in range(0, len(x), 32)])
    acts = np.concatenate([np.asarray(sae.forward(x[a:a + 32], "batchtopk").acts_BxN)
                           for a in range(0, len(x), 32)])
    fvu, fvu_excl = _brute_metrics(x.astype(np.float64), recon.astype(np.float64), L)
    r = report[name]
    np.testing.assert_allclose([r["fvu"], r["fvu_excl_first"]], [fvu, fvu_excl], rtol=1e-4)
    f = acts != 0
    with np.errstate(invalid="ignore", divide="ignore"):
      c = np.abs(np.corrcoef(f.T.astype(float))[np.triu_indices(N, 1)])
    np.testing.assert_allclose(r["mean_abs_phi"], np.nan_to_num(c, nan=0.0).mean(), rtol=1e-8)
    np.testing.assert_allclose(r["mean_abs_phi_live"], np.nanmean(c), rtol=1e-8)
    counts = f.sum(0)
    assert r["num_dead"] == int((counts == 0).sum())
    assert r["num_live"] == int(((counts > 0) & (counts < len(f))).sum())
  md = open(os.path.join(run, "report.md")).read()
  assert "fvu_excl_first" in md and "mean_abs_phi_live" in md and "dependent pairs as independent" in md
  assert "bootstrap intervals" in md


def test_report_names_the_part_of_raw_fvu_from_high_norm_tokens(tmp_path):
  run, _ = _run_dir(tmp_path)
  rng = np.random.default_rng(3)
  x = rng.normal(size=(L * 40, D)).astype(np.float32)
  x[[L * 3 + 1, L * 17 + 5]] *= 300.0  # two sink-like tokens past position 0
  st = str(tmp_path / "store_sinks")
  store.write_store(st, x, rng.integers(0, 30, L * 40).astype(np.int32), context_len=L,
                    source={"model": "tiny", "layer": 0, "site": "resid_pre"})
  cfg = evaluation.EvalConfig(run_dir=run, activations=st, model="none", firing="batchtopk", batch_size=64,
                              meta_fve_steps=0, bootstrap_replicates=0, progress=False)
  report = evaluation.evaluate_run(cfg)
  from metasae_jax.storage import loaded_sae
  x64 = x.astype(np.float64)
  denom_T = np.square(x64 - x64.mean(0)).sum(1)
  norms = np.linalg.norm(x64, axis=1)
  out = norms > 10 * np.median(norms[:64])
  assert out.sum() == 2
  md = open(os.path.join(run, "report.md")).read()
  assert f"hold {denom_T[out].sum() / denom_T.sum():.0%} of the raw variance" in md
  for name in ("joint", "solo"):
    sae = loaded_sae.load_sae(os.path.join(run, name), D)
    recon = np.concatenate([np.asarray(sae.forward(x[a:a + 64], "batchtopk").recon_BxD)
                            for a in range(0, len(x), 64)]).astype(np.float64)
    err_T = np.square(x64 - recon).sum(1)
    r = report[name]
    np.testing.assert_allclose(r["fvu_outliers"], err_T[out].sum() / denom_T.sum(), rtol=1e-4)
    np.testing.assert_allclose(r["outlier_variance_share"], denom_T[out].sum() / denom_T.sum(), rtol=1e-6)
    share = f"{name} {r['fvu_outliers']:.3g} of {r['fvu']:.3g} ({r['fvu_outliers'] / r['fvu']:.0%})"
    assert share in md
    assert f"| fvu_outliers |" in md


def test_dead_gap_warning():
  from metasae_jax.evaluation import report as report_lib
  per = {"joint": {"num_dead": 10}, "solo": {"num_dead": 30}}
  assert report_lib.dead_gap_note(per, 1000) and "WARNING" in report_lib.dead_gap_note(per, 1000)[0]
  assert not report_lib.dead_gap_note(per, 2001)


def test_ce_firing_batchtopk_splices_over_each_hooked_batch(tmp_path, monkeypatch):
  import torch
  import transformers
  from metasae_jax.lm import delta_ce, models
  from metasae_jax.storage import loaded_sae
  run, _ = _run_dir(tmp_path)
  torch.manual_seed(1)
  lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=30, hidden_size=D, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
      num_key_value_heads=2, max_position_embeddings=32)).eval()
  ids = np.random.default_rng(3).integers(0, 30, (10, L))
  acts = models.capture_residual(lm, torch.from_numpy(ids), 0, "resid_pre").numpy().reshape(-1, D)
  st = store.write_store(str(tmp_path / "lmstore"), acts, ids.reshape(-1).astype(np.int32), context_len=L,
                         source={"model": "tiny", "layer": 0, "site": "resid_pre"})
  monkeypatch.setattr(evaluation, "_load_model", lambda name: models.LoadedModel(lm, None, "tiny", D, 1))
  monkeypatch.setattr(evaluation, "_load_decode", lambda name, store: None)
  report = evaluation.evaluate_run(evaluation.EvalConfig(
      run_dir=run, activations=st.path, firing="threshold", ce_firing="batchtopk", ce_include_first_position=True,
      batch_size=16, ce_contexts=4, ce_batch_contexts=2, meta_fve_steps=0, bootstrap_replicates=0,
      progress=False))
  assert report["delta_ce"]["firing"] == "batchtopk" and report["delta_ce"]["num_predictions"] == 4 * (L - 1)
  # The same splice by hand: BatchTopK over the 2 x L residuals of each hooked batch.
  saes = {n: loaded_sae.load_sae(os.path.join(run, n), D) for n in ("joint", "solo")}
  fns = {n: (lambda x, s=s: np.asarray(s.forward(x, "batchtopk").recon_BxD)) for n, s in saes.items()}
  seen = []
  fns["probe"] = lambda x: seen.append(x.shape) or x
  ces = delta_ce.cross_entropies(lm, models.decoder_layers(lm)[0], "resid_pre", st, fns, 4, 2, 0, False, True)
  assert seen == [(2 * L, D), (2 * L, D)]
  for n in ("joint", "solo"):
    np.testing.assert_allclose(report[n]["ce_spliced"], ces[n], rtol=1e-6)
    np.testing.assert_allclose(report[n]["delta_ce_pct_se"], delta_ce.summarize(ces, n)["delta_ce_pct_se"], rtol=1e-6)
  # With the calibrated thresholds instead, the spliced CE differs (the flag changes the rule).
  thr = {n: (lambda x, s=s: np.asarray(s.forward(x, "threshold").recon_BxD))
         for n, s in ((n, loaded_sae.load_sae(os.path.join(run, n), D)) for n in ("joint", "solo"))}
  ces_thr = delta_ce.cross_entropies(lm, models.decoder_layers(lm)[0], "resid_pre", st, thr, 4, 2, 0, False, True)
  assert any(abs(ces_thr[n] - ces[n]) > 1e-6 for n in ("joint", "solo"))
