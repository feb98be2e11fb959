"""load_sae: batch-independent encoding (thresholds or per-token top-k), decode, reconstruct."""

import jax
import numpy as np
import pytest

import metasae_jax
from metasae_jax.storage import artifact
from metasae_jax.core import sae


@pytest.fixture
def sae_dir(tmp_path):
  params = jax.device_get(sae.init_params(jax.random.PRNGKey(0), 16, 64))
  threshold = np.random.default_rng(0).uniform(0.1, 0.5, size=64).astype(np.float32)
  cfg = {"k": 4, "activation": "batchtopk", "input_norm": "standardize_per_token", "source": {}}
  artifact.save_sae(str(tmp_path / "thr"), params, cfg, threshold_N=threshold)
  artifact.save_sae(str(tmp_path / "plain"), params, cfg)
  return tmp_path, params, threshold


def test_encode_is_batch_independent_with_thresholds(sae_dir):
  path, params, threshold = sae_dir
  s = metasae_jax.load_sae(str(path / "thr"))
  x = np.random.default_rng(1).normal(size=(32, 16)).astype(np.float32)
  batch = np.asarray(s.encode(x))
  for i in (0, 7, 31):
    np.testing.assert_array_equal(np.asarray(s.encode(x[i:i + 1]))[0], batch[i])
  # Numpy reference of the JumpReLU-style rule on standardised inputs.
  xs = (x - x.mean(1, keepdims=True)) / (x.std(1, ddof=1, keepdims=True) + 1e-5)
  pre = np.maximum((xs - params["b_dec"]) @ params["W_enc"] + params["b_enc"], 0)
  np.testing.assert_allclose(batch, np.where(pre > threshold, pre, 0), atol=1e-5)


def test_without_thresholds_per_token_topk(sae_dir):
  path, _, _ = sae_dir
  s = metasae_jax.load_sae(str(path / "plain"))
  x = np.random.default_rng(2).normal(size=(8, 16)).astype(np.float32)
  acts = np.asarray(s.encode(x))
  np.testing.assert_array_equal((acts > 0).sum(1), 4)
  np.testing.assert_array_equal(np.asarray(s.encode(x[3:4]))[0], acts[3])


def test_reconstruct_equals_decode_of_encode_and_training_forward(sae_dir):
  path, params, threshold = sae_dir
  s = metasae_jax.load_sae(str(path / "thr"))
  x = np.random.default_rng(3).normal(size=(8, 16)).astype(np.float32)
  code = s.encode_with_stats(x)
  np.testing.assert_allclose(s.reconstruct(x), s.decode(*code), atol=1e-6)
  ref = sae.forward(params, x, 4, threshold_N=threshold)
  np.testing.assert_allclose(s.reconstruct(x), ref.recon_BxD, atol=1e-5)
  np.testing.assert_allclose(s.decode(code.acts_BxN), ref.recon_std_BxD, atol=1e-5)


def test_wrong_width_input_is_refused(sae_dir):
  path, _, _ = sae_dir
  with pytest.raises(ValueError, match="16"):
    metasae_jax.load_sae(str(path / "thr")).encode(np.zeros((2, 8), np.float32))
