"""SAELens / sparsify exports: layouts, refusals, numerics against our forward, real-package round trips.

Legend: B = tokens, D = d_model, N = latents.
"""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from metasae_jax.storage import artifact, interop
from metasae_jax.core import sae
from metasae_jax.core.errors import UserError
from tests.conftest import REPO

D, N, K = 16, 64, 4


def _params(seed=0) -> dict:
  rng = np.random.default_rng(seed)
  w_dec = rng.normal(size=(N, D)).astype(np.float32)
  w_dec /= np.linalg.norm(w_dec, axis=1, keepdims=True)
  return {"W_enc": rng.normal(size=(D, N)).astype(np.float32) * 0.5,
          "b_enc": rng.normal(size=(N,)).astype(np.float32) * 0.1,
          "W_dec": w_dec, "b_dec": rng.normal(size=(D,)).astype(np.float32) * 0.1}


def _cfg(activation="batchtopk", input_norm="standardize_per_token"):
  return {"k": K, "activation": activation, "input_norm": input_norm, "context_len": 8,
          "skip_first_positions": 1, "source": {"model": "m", "layer": 3, "site": "resid_pre"}}


def _theta():
  theta = np.random.default_rng(1).uniform(0.2, 1.0, size=N).astype(np.float32)
  theta[5] = np.inf  # a dead latent
  return theta


@pytest.fixture
def run_dir(tmp_path):
  """A run directory whose joint SAE has calibrated thresholds and whose solo SAE has none."""
  root = tmp_path / "run"
  artifact.save_sae(str(root / "joint"), _params(0), _cfg(), threshold_N=_theta())
  artifact.save_sae(str(root / "solo"), _params(2), _cfg())
  return str(root)


def _x(b=24, seed=3):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(b, D)) * 3 + rng.normal(size=(b, 1)) * 5).astype(np.float32)


def _ours(params, x, activation="batchtopk", input_norm="standardize_per_token", threshold=None):
  out = sae.forward({k: jnp.asarray(v) for k, v in params.items()}, jnp.asarray(x), K, activation, input_norm,
                    threshold_N=None if threshold is None else jnp.asarray(threshold))
  return np.asarray(out.acts_BxN), np.asarray(out.recon_BxD)


def _layer_norm(x):
  mean = x.mean(-1, keepdims=True)
  std = x.std(-1, keepdims=True, ddof=1)
  return (x - mean) / (std + 1e-5), mean, std


def _saelens_forward(path, x):
  """SAELens >= 6 inference semantics (SAE.encode/decode), re-implemented in numpy from its docs and code."""
  cfg = json.load(open(os.path.join(path, "cfg.json")))
  t = load_file(os.path.join(path, interop.SAELENS_WEIGHTS))
  xs, mean, std = _layer_norm(x) if cfg["normalize_activations"] == "layer_norm" else (x, 0.0, 1.0)
  h = (xs - t["b_dec"] * cfg["apply_b_dec_to_input"]) @ t["W_enc"] + t["b_enc"]
  if cfg["architecture"] == "jumprelu":
    acts = np.maximum(h, 0) * (h > t["threshold"])
  else:
    keep = np.argsort(-h, axis=-1)[:, :cfg["k"]]
    acts = np.zeros_like(h)
    np.put_along_axis(acts, keep, np.maximum(np.take_along_axis(h, keep, -1), 0), -1)
  return acts, (acts @ t["W_dec"] + t["b_dec"]) * std + mean


def _sparsify_forward(path, x):
  """sparsify's SparseCoder.encode/decode semantics in numpy: per-token TopK of ReLU((x - b_dec) W^T + b)."""
  cfg = json.load(open(os.path.join(path, "cfg.json")))
  t = load_file(os.path.join(path, interop.SPARSIFY_WEIGHTS))
  h = np.maximum((x - t["b_dec"]) @ t["encoder.weight"].T + t["encoder.bias"], 0)
  keep = np.argsort(-h, axis=-1)[:, :cfg["k"]]
  acts = np.zeros_like(h)
  np.put_along_axis(acts, keep, np.take_along_axis(h, keep, -1), -1)
  return acts, acts @ t["W_dec"] + t["b_dec"]


def test_saelens_jumprelu_layout_and_numerics(run_dir, tmp_path):
  out = str(tmp_path / "out")
  caveats = interop.export_sae(os.path.join(run_dir, "joint"), out, "saelens")
  assert caveats == [] and sorted(os.listdir(out)) == ["cfg.json", "sae_weights.safetensors"]
  cfg = json.load(open(os.path.join(out, "cfg.json")))
  assert cfg["architecture"] == "jumprelu" and cfg["normalize_activations"] == "layer_norm"
  assert (cfg["d_in"], cfg["d_sae"], cfg["apply_b_dec_to_input"]) == (D, N, True)
  assert cfg["metadata"]["hook_name"] == "blocks.3.hook_resid_pre" and cfg["metadata"]["model_name"] == "m"
  assert cfg["metadata"]["seqpos_slice"] == [1, None]
  t = load_file(os.path.join(out, interop.SAELENS_WEIGHTS))
  assert {k: v.shape for k, v in t.items()} == {"W_enc": (D, N), "b_enc": (N,), "W_dec": (N, D), "b_dec": (D,),
                                                "threshold": (N,)}
  x = _x()
  acts, recon = _saelens_forward(out, x)
  want_acts, want_recon = _ours(_params(0), x, threshold=_theta())
  assert (want_acts > 0).any() and not want_acts[:, 5].any()
  np.testing.assert_allclose(acts, want_acts, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(recon, want_recon, rtol=1e-5, atol=1e-4)


def test_batchtopk_without_thresholds_exports_topk_with_caveat_into_hook_folders(run_dir, tmp_path):
  written = interop.export_run(run_dir, str(tmp_path / "out"), "saelens")
  hook = "blocks.3.hook_resid_pre"
  assert written["joint"] == (str(tmp_path / "out" / "joint" / hook), [])
  assert written["solo"].path == str(tmp_path / "out" / "solo" / hook)
  assert "per-token TopK" in written["solo"].caveats[0]
  cfg = json.load(open(tmp_path / "out" / "solo" / hook / "cfg.json"))
  assert cfg["architecture"] == "topk" and cfg["k"] == K
  x = _x()
  acts, recon = _saelens_forward(written["solo"].path, x)
  want_acts, want_recon = _ours(_params(2), x, activation="topk")
  np.testing.assert_allclose(acts, want_acts, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(recon, want_recon, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name,want", [("smollm2-135m-gguf", "HuggingFaceTB/SmolLM2-135M-Instruct"),
                                       ("gpt2", "gpt2"), ("EleutherAI/pythia-70m", "EleutherAI/pythia-70m")])
def test_model_name_is_a_hub_id(name, want, tmp_path):
  hub, meta = interop.model_id(name)
  assert hub == want
  assert ("Q4_1" in meta.get("model_quantization", "")) == (name == "smollm2-135m-gguf")


def test_local_model_dir_maps_to_its_recorded_hub_id(tmp_path):
  (tmp_path / "m").mkdir()
  assert interop.model_id(str(tmp_path / "m")) == (None, {"model_path": str(tmp_path / "m")})
  (tmp_path / "m" / "config.json").write_text(json.dumps({"_name_or_path": "openai-community/gpt2"}))
  assert interop.model_id(str(tmp_path / "m"))[0] == "openai-community/gpt2"


def test_builtin_model_exports_its_hub_id(tmp_path):
  cfg = dict(_cfg(), source={"model": "smollm2-135m-gguf", "layer": 15, "site": "resid_pre"})
  artifact.save_sae(str(tmp_path / "run" / "joint"), _params(0), cfg, threshold_N=_theta())
  written = interop.export_run(str(tmp_path / "run"), str(tmp_path / "out"), "saelens")
  assert written["joint"].path.endswith(os.path.join("joint", "blocks.15.hook_resid_pre"))
  meta = json.load(open(os.path.join(written["joint"].path, "cfg.json")))["metadata"]
  assert meta["model_name"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and "GGUF" in meta["model_quantization"]


def test_sparsify_refuses_standardised_sae_and_exports_exact_topk(tmp_path):
  src = str(tmp_path / "std")
  artifact.save_sae(src, _params(0), _cfg())
  with pytest.raises(UserError, match="no input normalisation.*--allow_approximate"):
    interop.export_sae(src, str(tmp_path / "a"), "sparsify")
  # Approximate export: caller standardises, as the caveat in cfg.json says; then TopK equals ours.
  caveats = interop.export_sae(src, str(tmp_path / "a"), "sparsify", allow_approximate=True)
  assert len(caveats) == 2 and json.load(open(tmp_path / "a" / "cfg.json"))["metasae"]["export_caveats"] == caveats
  x = _x()
  xs, mean, std = _layer_norm(x)
  acts, recon_std = _sparsify_forward(str(tmp_path / "a"), xs)
  want_acts, want_recon = _ours(_params(0), x, activation="topk")
  np.testing.assert_allclose(acts, want_acts, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(recon_std * std + mean, want_recon, rtol=1e-5, atol=1e-4)

  exact = str(tmp_path / "raw")
  artifact.save_sae(exact, _params(4), _cfg(activation="topk", input_norm="none"))
  assert interop.export_sae(exact, str(tmp_path / "b"), "sparsify") == []
  t = load_file(str(tmp_path / "b" / interop.SPARSIFY_WEIGHTS))
  assert {k: v.shape for k, v in t.items()} == {"encoder.weight": (N, D), "encoder.bias": (N,), "W_dec": (N, D),
                                                "b_dec": (D,)}
  cfg = json.load(open(tmp_path / "b" / "cfg.json"))
  assert (cfg["d_in"], cfg["num_latents"], cfg["k"], cfg["activation"]) == (D, N, K, "topk")
  acts, recon = _sparsify_forward(str(tmp_path / "b"), x)
  want_acts, want_recon = _ours(_params(4), x, activation="topk", input_norm="none")
  np.testing.assert_allclose(acts, want_acts, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(recon, want_recon, rtol=1e-5, atol=1e-4)


def test_real_saelens_round_trip(run_dir, tmp_path):
  sae_lens = pytest.importorskip("sae_lens")
  torch = pytest.importorskip("torch")
  written = interop.export_run(run_dir, str(tmp_path / "out"), "saelens")
  x = _x()
  for name, params, kw in (("joint", _params(0), {"threshold": _theta()}), ("solo", _params(2), {"activation": "topk"})):
    loaded = sae_lens.SAE.load_from_disk(written[name].path)
    with torch.no_grad():
      acts = loaded.encode(torch.from_numpy(x)).numpy()
      recon = loaded(torch.from_numpy(x)).numpy()
    want_acts, want_recon = _ours(params, x, **kw)
    np.testing.assert_allclose(acts, want_acts, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(recon, want_recon, rtol=1e-5, atol=1e-4)


def test_real_sparsify_round_trip(tmp_path):
  sparsify = pytest.importorskip("sparsify")
  if not hasattr(sparsify, "SparseCoder"):
    pytest.skip("the installed `sparsify` is not EleutherAI's (pip install eai-sparsify)")
  torch = pytest.importorskip("torch")
  src = str(tmp_path / "raw")
  artifact.save_sae(src, _params(4), _cfg(activation="topk", input_norm="none"))
  interop.export_sae(src, str(tmp_path / "out"), "sparsify")
  coder = sparsify.SparseCoder.load_from_disk(str(tmp_path / "out"))
  x = _x()
  with torch.no_grad():
    top_acts, top_idx, _ = coder.encode(torch.from_numpy(x))
    recon = coder.decode(top_acts, top_idx).numpy()
  acts = np.zeros((x.shape[0], N), np.float32)
  np.put_along_axis(acts, top_idx.numpy(), top_acts.numpy(), -1)
  want_acts, want_recon = _ours(_params(4), x, activation="topk", input_norm="none")
  np.testing.assert_allclose(acts, want_acts, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(recon, want_recon, rtol=1e-5, atol=1e-4)


def test_binary_exports_and_refuses_in_one_line(run_dir, tmp_path):
  def run(*flags):
    return subprocess.run([sys.executable, "-m", "experiments.export_sae", f"--run_dir={run_dir}", *flags],
                          cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  bad = run("--format=sparsify", f"--out={tmp_path / 'x'}")
  assert bad.returncode == 1 and "Traceback" not in bad.stderr
  assert bad.stderr.strip().splitlines()[-1].startswith("error: SAE ") and not os.path.exists(tmp_path / "x")
  ok = run("--format=saelens", f"--out={tmp_path / 'x'}")
  assert ok.returncode == 0, ok.stderr
  assert sorted(os.listdir(tmp_path / "x")) == [interop.EXPORT_MARKER, "joint", "solo"]
  assert os.listdir(tmp_path / "x" / "solo") == ["blocks.3.hook_resid_pre"]
  assert "approximate" in ok.stdout and str(tmp_path / "x" / "joint" / "blocks.3.hook_resid_pre") in ok.stdout

