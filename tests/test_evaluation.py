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
  assert report["num_tokens"] == 200 and report["skip"]["skip_first_positions"] == 1
  assert set(report["comparison"]) >= {"mean_abs_phi_pct", "fvu_pct", "mse_pct", "delta_ce_pp", "welch_t", "welch_p"}
  assert report["delta_ce"] == {"skipped": True}
  for f in ("report.json", "report.md", "split_candidates.json", "phi_hist.png", "metrics.png",
            "matched_cosine.png"):
    assert os.path.isfile(os.path.join(run, f)), f
  assert json.load(open(os.path.join(run, "report.json")))["num_tokens"] == 200
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
  monkeypatch.setattr(evaluation, "_load_model", lambda cfg, store, notes: (loaded, "tiny"))
  report = evaluation.evaluate_run(evaluation.EvalConfig(
      run_dir=run, activations=st.path, firing="batchtopk", batch_size=16, ce_contexts=4, ce_batch_contexts=3,
      meta_fve_steps=0, progress=False))
  for name in ("joint", "solo"):
    r = report[name]
    assert r["ce_clean"] > 0 and r["ce_spliced"] is not None and r["ce_zero_ablation"] is not None
    np.testing.assert_allclose(r["delta_ce_pct"], (r["ce_spliced"] - r["ce_clean"]) / r["ce_clean"] * 100)
  assert report["delta_ce"]["num_predictions"] == 4 * (L - 2)
  assert report["delta_ce"]["resid_check_rel_err"] < 1e-5
  assert report["comparison"]["delta_ce_pp"] is not None
  cands = json.load(open(os.path.join(run, "split_candidates.json")))
  assert all("«" in c["text"] for cand in cands for c in cand["solo_top_contexts"])
