"""load_sae → LoadedSAE: every firing rule against a numpy brute force, the default rule, decode, old artifacts.

Legend: B = tokens, D = d_model, N = latents.
"""

import json
import os

import jax
import numpy as np
import pytest

import metasae_jax
from metasae_jax.core import sae
from metasae_jax.core.errors import UserError
from metasae_jax.storage import artifact, loaded_sae

D, N, K = 16, 64, 4


@pytest.fixture
def sae_dir(tmp_path):
  params = jax.device_get(sae.init_params(jax.random.PRNGKey(0), D, N))
  params["b_dec"] = np.random.default_rng(5).normal(size=D).astype(np.float32) * 0.1
  threshold = np.random.default_rng(0).uniform(0.1, 0.5, size=N).astype(np.float32)
  cfg = {"k": K, "activation": "batchtopk", "input_norm": "standardize_per_token", "source": {}}
  artifact.save_sae(str(tmp_path / "thr"), params, cfg, threshold_N=threshold)
  artifact.save_sae(str(tmp_path / "plain"), params, cfg)
  return tmp_path, {k: np.asarray(v, np.float64) for k, v in params.items()}, threshold


def _pre(params, x, standardize=True):
  """Brute-force pre-activations in float64 (unbiased std + 1e-5, as the reference)."""
  x = np.asarray(x, np.float64)
  if standardize:
    x = (x - x.mean(1, keepdims=True)) / (x.std(1, ddof=1, keepdims=True) + 1e-5)
  return np.maximum((x - params["b_dec"]) @ params["W_enc"] + params["b_enc"], 0)


def _brute(pre, rule, threshold=None):
  """Each rule written out by sorting."""
  out = np.zeros_like(pre)
  if rule == "threshold":
    return np.where(pre > threshold, pre, 0)
  if rule == "topk":
    for b, row in enumerate(pre):
      top = np.argsort(-row)[:K]
      out[b, top] = row[top]
  else:  # batchtopk: the K*B largest entries of the whole batch
    flat = np.argsort(-pre.reshape(-1))[:K * pre.shape[0]]
    out.reshape(-1)[flat] = pre.reshape(-1)[flat]
  return np.where(pre > 0, out, 0)


@pytest.mark.parametrize("rule", loaded_sae.FIRINGS)
def test_encode_under_each_rule_equals_brute_force(sae_dir, rule):
  path, params, threshold = sae_dir
  s = metasae_jax.load_sae(str(path / "thr"))
  x = np.random.default_rng(1).normal(size=(32, D)).astype(np.float32)
  got = np.asarray(s.encode(x, rule))
  want = _brute(_pre(params, x), rule, threshold)
  np.testing.assert_array_equal(got > 0, want > 0)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  assert s.firing_rule(rule) == rule


def test_default_rule_is_threshold_with_theta_else_per_token_topk(sae_dir):
  path, params, threshold = sae_dir
  x = np.random.default_rng(2).normal(size=(8, D)).astype(np.float32)
  with_theta, plain = metasae_jax.load_sae(str(path / "thr")), metasae_jax.load_sae(str(path / "plain"))
  assert (with_theta.default_firing, plain.default_firing) == ("threshold", "topk")
  assert (with_theta.firing_rule(), plain.firing_rule()) == ("threshold", "topk")
  np.testing.assert_allclose(with_theta.encode(x), _brute(_pre(params, x), "threshold", threshold),
                             rtol=1e-4, atol=1e-5)
  acts = np.asarray(plain.encode(x))
  np.testing.assert_allclose(acts, _brute(_pre(params, x), "topk"), rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal((acts > 0).sum(1), K)


@pytest.mark.parametrize("name", ["thr", "plain"])
def test_default_rule_is_batch_independent(sae_dir, name):
  path, _, _ = sae_dir
  s = metasae_jax.load_sae(str(path / name))
  x = np.random.default_rng(3).normal(size=(32, D)).astype(np.float32)
  batch = np.asarray(s.encode(x))
  for i in (0, 7, 31):
    np.testing.assert_allclose(np.asarray(s.encode(x[i:i + 1]))[0], batch[i], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rule", loaded_sae.FIRINGS)
def test_reconstruct_is_decode_of_encode_and_the_training_forward(sae_dir, rule):
  path, params, threshold = sae_dir
  s = metasae_jax.load_sae(str(path / "thr"))
  x = np.random.default_rng(4).normal(size=(8, D)).astype(np.float32)
  code = s.encode_with_stats(x, rule)
  np.testing.assert_allclose(s.reconstruct(x, rule), s.decode(*code), atol=1e-5)
  # Brute force: decode in standardised space, then map back with the token's mean/std (no eps).
  acts = _brute(_pre(params, x), rule, threshold)
  xd = np.asarray(x, np.float64)
  recon_std = acts @ params["W_dec"] + params["b_dec"]
  recon = recon_std * xd.std(1, ddof=1, keepdims=True) + xd.mean(1, keepdims=True)
  np.testing.assert_allclose(s.decode(code.acts_BxN), recon_std, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(s.reconstruct(x, rule), recon, rtol=1e-4, atol=1e-4)
  if rule != "threshold":
    ref = sae.forward({k: v.astype(np.float32) for k, v in params.items()}, x, K, rule)
    np.testing.assert_allclose(s.reconstruct(x, rule), ref.recon_BxD, atol=1e-5)


def test_unstandardised_artifact(tmp_path):
  rng = np.random.default_rng(6)
  params = {"W_enc": rng.normal(size=(D, N)).astype(np.float32), "b_enc": np.zeros(N, np.float32),
            "W_dec": rng.normal(size=(N, D)).astype(np.float32), "b_dec": rng.normal(size=D).astype(np.float32)}
  artifact.save_sae(str(tmp_path / "s"), params, {"k": K, "activation": "topk", "input_norm": "none"})
  s = metasae_jax.load_sae(str(tmp_path / "s"))
  x = rng.normal(size=(5, D)).astype(np.float32)
  p64 = {k: v.astype(np.float64) for k, v in params.items()}
  acts = _brute(_pre(p64, x, standardize=False), "topk")
  np.testing.assert_allclose(s.encode(x), acts, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(s.reconstruct(x), acts @ p64["W_dec"] + p64["b_dec"], rtol=1e-4, atol=1e-3)


def test_old_artifact_without_b_enc_or_threshold_flag_loads(tmp_path, sae_dir):
  """Artifacts written before `b_enc` / `has_threshold` existed keep loading (b_enc = 0)."""
  path, params, _ = sae_dir
  old = tmp_path / "old"
  os.makedirs(old)
  from safetensors.numpy import save_file
  save_file({k: params[k].astype(np.float32) for k in ("W_enc", "W_dec", "b_dec")}, str(old / artifact.WEIGHTS))
  with open(old / artifact.CFG, "w") as f:
    json.dump({"d_model": D, "width": N, "k": K, "activation": "batchtopk",
               "input_norm": "standardize_per_token"}, f)
  s = metasae_jax.load_sae(str(old))
  assert s.threshold_N is None and s.default_firing == "topk" and (s.d_model, s.width, s.k) == (D, N, K)
  x = np.random.default_rng(7).normal(size=(4, D)).astype(np.float32)
  np.testing.assert_allclose(s.encode(x), _brute(_pre(params, x), "topk"), rtol=1e-4, atol=1e-5)


def test_bad_inputs_are_user_errors(sae_dir):
  path, _, _ = sae_dir
  s = metasae_jax.load_sae(str(path / "plain"))
  with pytest.raises(UserError, match=str(D)):
    s.encode(np.zeros((2, 8), np.float32))
  with pytest.raises(UserError, match="no calibrated thresholds"):
    s.encode(np.zeros((2, D), np.float32), "threshold")
  with pytest.raises(UserError, match="--firing"):
    s.encode(np.zeros((2, D), np.float32), "jumprelu")
