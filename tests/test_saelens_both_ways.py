"""SAELens both ways with the real package: SAEs that SAELens saved load into `load_sae` with SAELens' own
encode/decode; our export loads back into SAELens and into `load_sae` unchanged; sparsify directories load.

Legend: B = tokens, D = d_model, N = latents.
"""

import json
import os

import numpy as np
import pytest

from metasae_jax.core.errors import UserError
from metasae_jax.storage import artifact, interop
from metasae_jax.storage.loaded_sae import load_sae

sae_lens = pytest.importorskip("sae_lens")  # pinned in requirements-test.txt
torch = pytest.importorskip("torch")

D, N, K, B = 16, 48, 5, 32


def _x(seed=0):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(B, D)) * 2 + rng.normal(size=(B, 1)) * 4).astype(np.float32)


def _randomise(sae, seed):
  """Random weights (SAELens initialises b_enc/b_dec to zero, which would hide bias handling)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in sae.named_parameters():
      p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if name.startswith("b_") else 0.5))
    if hasattr(sae, "threshold"):
      sae.threshold.copy_(torch.rand(N, generator=gen) * 0.8)


def _saelens_out(sae, x):
  with torch.no_grad():
    acts = sae.encode(torch.from_numpy(x))
    return acts.numpy(), sae.decode(acts).numpy()


def _ours(path, x):
  loaded = load_sae(path)
  code = loaded.encode_with_stats(x)
  return loaded, np.asarray(code.acts_BxN), np.asarray(loaded.decode(code.acts_BxN, code.mean_Bx1, code.std_Bx1))


CASES = [
    ("topk", dict(k=K), "layer_norm", True),
    ("topk", dict(k=K, rescale_acts_by_decoder_norm=True), "none", False),
    ("jumprelu", {}, "layer_norm", True),
    ("jumprelu", {}, "none", False),
    ("standard", {}, "layer_norm", False),
]


@pytest.mark.parametrize("arch,extra,norm,b_dec_in", CASES)
def test_saelens_saved_sae_loads_with_matching_outputs(arch, extra, norm, b_dec_in, tmp_path):
  sae_cls, cfg_cls = {"topk": (sae_lens.TopKSAE, sae_lens.TopKSAEConfig),
                      "jumprelu": (sae_lens.JumpReLUSAE, sae_lens.JumpReLUSAEConfig),
                      "standard": (sae_lens.StandardSAE, sae_lens.StandardSAEConfig)}[arch]
  theirs = sae_cls(cfg_cls(d_in=D, d_sae=N, normalize_activations=norm, apply_b_dec_to_input=b_dec_in, **extra))
  _randomise(theirs, seed=len(arch) + b_dec_in)
  theirs.save_model(str(tmp_path / "sl"))
  want_acts, want_recon = _saelens_out(theirs, _x())
  loaded, acts, recon = _ours(str(tmp_path / "sl"), _x())
  assert (want_acts > 0).sum() > B and loaded.width == N and loaded.d_model == D
  assert loaded.default_firing == ("topk" if arch == "topk" else "threshold")
  np.testing.assert_allclose(acts, want_acts, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(recon, want_recon, rtol=1e-5, atol=1e-4)


def test_saelens_batchtopk_training_sae_loads_as_its_inference_jumprelu(tmp_path):
  cfg = sae_lens.BatchTopKTrainingSAEConfig(d_in=D, d_sae=N, k=K, normalize_activations="layer_norm")
  trained = sae_lens.BatchTopKTrainingSAE(cfg)
  _randomise(trained, seed=7)
  with torch.no_grad():
    trained.topk_threshold.fill_(0.4)
  trained.save_model(str(tmp_path / "train"))
  trained.save_inference_model(str(tmp_path / "infer"))  # SAELens' own BatchTopK -> JumpReLU conversion
  want_acts, want_recon = _saelens_out(_saelens_load(tmp_path / "infer"), _x())
  loaded, acts, recon = _ours(str(tmp_path / "train"), _x())
  assert loaded.cfg["activation"] == "batchtopk" and loaded.default_firing == "threshold"
  np.testing.assert_allclose(acts, want_acts, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(recon, want_recon, rtol=1e-5, atol=1e-4)


def _saelens_load(path):
  return sae_lens.SAE.load_from_disk(str(path))


def _our_artifact(path, activation, threshold=None, seed=0, input_norm="standardize_per_token"):
  rng = np.random.default_rng(seed)
  w_dec = rng.normal(size=(N, D)).astype(np.float32)
  params = {"W_enc": rng.normal(size=(D, N)).astype(np.float32) * 0.5, "b_enc": np.zeros(N, np.float32),
            "W_dec": w_dec / np.linalg.norm(w_dec, axis=1, keepdims=True),
            "b_dec": rng.normal(size=D).astype(np.float32) * 0.2}
  cfg = {"k": K, "activation": activation, "input_norm": input_norm, "context_len": 8,
         "source": {"model": "smollm2-135m-gguf", "layer": 15, "site": "resid_pre"}}
  artifact.save_sae(str(path), params, cfg, threshold_N=threshold)


@pytest.mark.parametrize("with_theta", [True, False])
def test_our_export_loads_in_saelens_and_back_into_ours(with_theta, tmp_path):
  theta = np.random.default_rng(1).uniform(0.1, 0.9, N).astype(np.float32) if with_theta else None
  _our_artifact(tmp_path / "run" / "joint", "batchtopk", theta)
  written = interop.export_run(str(tmp_path / "run"), str(tmp_path / "out"), "saelens")
  path = written["joint"].path
  assert os.path.basename(path) == "blocks.15.hook_resid_pre" and bool(written["joint"].caveats) != with_theta
  theirs = _saelens_load(path)
  assert theirs.cfg.metadata.model_name == "HuggingFaceTB/SmolLM2-135M-Instruct"
  assert theirs.cfg.metadata.hook_name == "blocks.15.hook_resid_pre"
  want_acts, want_recon = _saelens_out(theirs, _x(1))
  original = load_sae(str(tmp_path / "run" / "joint"))  # default firing: θ if calibrated, else TopK(k)
  code = original.encode_with_stats(_x(1))
  np.testing.assert_allclose(np.asarray(code.acts_BxN), want_acts, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(original.decode(code.acts_BxN, code.mean_Bx1, code.std_Bx1)), want_recon,
                             rtol=1e-5, atol=1e-4)
  back, acts, recon = _ours(path, _x(1))
  assert back.cfg["source"]["layer"] == 15 and back.input_norm == "standardize_per_token"
  np.testing.assert_allclose(acts, want_acts, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(recon, want_recon, rtol=1e-5, atol=1e-4)


def test_sparsify_directory_loads_with_its_semantics(tmp_path):
  _our_artifact(tmp_path / "raw", "topk", input_norm="none", seed=3)
  interop.export_sae(str(tmp_path / "raw"), str(tmp_path / "sp"), "sparsify")
  assert interop.detect_format(str(tmp_path / "sp")) == "sparsify"
  t, _ = artifact.load_sae_files(str(tmp_path / "raw"))
  x = _x(2)
  # sparsify's encode in numpy: per-token TopK of ReLU((x − b_dec)·encoderᵀ + bias), decode acts·W_dec + b_dec.
  h = np.maximum((x - t["b_dec"]) @ t["W_enc"] + t["b_enc"], 0)
  keep = np.argsort(-h, axis=1)[:, :K]
  want = np.zeros_like(h)
  np.put_along_axis(want, keep, np.take_along_axis(h, keep, 1), 1)
  loaded, acts, recon = _ours(str(tmp_path / "sp"), x)
  assert loaded.input_norm == "none" and loaded.default_firing == "topk"
  np.testing.assert_allclose(acts, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(recon, want @ t["W_dec"] + t["b_dec"], rtol=1e-5, atol=1e-4)


def test_unsupported_saelens_settings_are_refused(tmp_path):
  theirs = sae_lens.StandardSAE(sae_lens.StandardSAEConfig(d_in=D, d_sae=N))
  theirs.save_model(str(tmp_path / "sl"))
  cfg = json.load(open(tmp_path / "sl" / "cfg.json"))
  for key, value, match in (("normalize_activations", "expected_average_only_in", "normalize_activations"),
                            ("architecture", "gated", "architecture 'gated'")):
    json.dump(dict(cfg, **{key: value}), open(tmp_path / "sl" / "cfg.json", "w"))
    with pytest.raises(UserError, match=match):
      load_sae(str(tmp_path / "sl"))
  json.dump(cfg, open(tmp_path / "sl" / "cfg.json", "w"))
  jump = load_sae(str(tmp_path / "sl"))
  with pytest.raises(UserError, match="has no k"):
    jump.encode(_x(), firing="topk")


@pytest.fixture(scope="module")
def trained_runs(tmp_path_factory):
  """One short joint run (penalty on) per architecture, trained by the real trainer on a synthetic store."""
  from metasae_jax.core import architectures  # pylint: disable=g-import-not-at-top
  from metasae_jax.core.config import TrainConfig  # pylint: disable=g-import-not-at-top
  from metasae_jax.storage import synthetic  # pylint: disable=g-import-not-at-top
  from metasae_jax.training.trainer import RunConfig, train_and_save  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("arch_runs")
  store = synthetic.write_sparse_store(str(root / "store"), 64 * 8, D, num_features=40)
  extra = {"matryoshka_batchtopk": {"matryoshka_widths": (12, 24)},
           "jumprelu": {"jumprelu_init_threshold": 0.3, "jumprelu_bandwidth": 0.2}}
  runs = {}
  for name in architectures.names():
    config = TrainConfig(d_model=D, width=N, k=K, meta_width=6, meta_k=2, batch_size=64, lambda2=0.3, lr=1e-3,
                         n_primary_steps=2, architecture=name, **extra.get(name, {}))
    out = str(root / name)
    metrics = train_and_save(config, RunConfig(activations=store.path, out_dir=out, progress=False))
    assert metrics["penalty"] > 0
    runs[name] = out
  return runs


@pytest.mark.parametrize("name", ["batchtopk", "topk", "matryoshka_batchtopk", "jumprelu"])
def test_every_trained_architecture_exports_to_saelens_and_fires_alike(trained_runs, name, tmp_path):
  run = trained_runs[name]
  ours = load_sae(os.path.join(run, "joint"))
  assert ours.cfg["activation"] == name
  written = interop.export_run(run, str(tmp_path / "out"), "saelens")
  theirs = _saelens_load(written["joint"].path)
  # JumpReLU keeps its trained θ (SAELens' jumprelu); the k-sparse ones become per-token TopK(k) without θ.
  assert theirs.cfg.architecture() == ("jumprelu" if name == "jumprelu" else "topk")
  assert ours.default_firing == ("threshold" if name == "jumprelu" else "topk")
  x = _x(3)
  want_acts, want_recon = _saelens_out(theirs, x)
  code = ours.encode_with_stats(x)
  assert (want_acts > 0).sum() >= B
  np.testing.assert_allclose(np.asarray(code.acts_BxN), want_acts, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(ours.decode(code.acts_BxN, code.mean_Bx1, code.std_Bx1)), want_recon,
                             rtol=1e-5, atol=1e-4)
  back = load_sae(written["joint"].path)  # and SAELens' folder back into ours
  assert back.cfg["activation"] == ("jumprelu" if name == "jumprelu" else "topk")
  np.testing.assert_allclose(np.asarray(back.encode_with_stats(x).acts_BxN), want_acts, rtol=1e-5, atol=1e-5)
