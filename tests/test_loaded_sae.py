"""Tests for metasae_jax.storage.loaded_sae: d_model mismatch, missing thresholds and bad cfg are user errors.

Legend: D = d_model, N = latents.
"""

import json

import numpy as np
import pytest

from metasae_jax.storage import artifact, loaded_sae
from metasae_jax.core.errors import UserError


def _sae(tmp_path, d=5, n=12, k=2):
  params = {"W_enc": np.ones((d, n), np.float32), "b_enc": np.zeros(n, np.float32),
            "W_dec": np.ones((n, d), np.float32), "b_dec": np.zeros(d, np.float32)}
  artifact.save_sae(str(tmp_path / "sae"), params, {"k": k, "activation": "batchtopk",
                                                   "input_norm": "standardize_per_token", "source": {}})


def test_d_model_mismatch_is_user_error(tmp_path):
  _sae(tmp_path, d=5)
  with pytest.raises(UserError, match="d_model 5 .* d_model 7"):
    loaded_sae.load_sae(str(tmp_path / "sae"), d_model=7)


def test_threshold_firing_needs_thresholds(tmp_path):
  _sae(tmp_path)
  sae = loaded_sae.load_sae(str(tmp_path / "sae"), d_model=5)
  with pytest.raises(UserError, match="no calibrated thresholds"):
    sae.forward(np.zeros((2, 5), np.float32), "threshold")
  with pytest.raises(UserError, match="--firing"):
    sae.forward(np.zeros((2, 5), np.float32), "jumprelu")


def test_unknown_input_norm_is_user_error(tmp_path):
  _sae(tmp_path)
  path = tmp_path / "sae" / artifact.CFG
  cfg = json.loads(path.read_text())
  path.write_text(json.dumps(dict(cfg, input_norm="layernorm")))
  with pytest.raises(UserError, match="input_norm 'layernorm'"):
    loaded_sae.load_sae(str(tmp_path / "sae"))
