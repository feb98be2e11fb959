"""Tests for metasae_jax.lm.delta_ce on a tiny random Llama (no downloads) with hand-built SAEs.

Legend: C = contexts, L = context_len, D = d_model, N = latents.
"""

import numpy as np
import pytest
import torch
import transformers

from metasae_jax.storage import artifact, loaded_sae, store
from metasae_jax.lm import delta_ce, models

L, D, V = 8, 16, 24


@pytest.fixture(scope="module")
def model():
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
  m = transformers.LlamaForCausalLM(cfg)
  # A few steps on a counting pattern, so the model predicts something and ablation hurts.
  ids = (torch.arange(L)[None] + torch.arange(16)[:, None]) % V
  opt = torch.optim.Adam(m.parameters(), 3e-2)
  for _ in range(15):
    loss = m(input_ids=ids, labels=ids).loss
    opt.zero_grad()
    loss.backward()
    opt.step()
  return m.eval()


def _store(tmp_path, model, site, layer=1):
  ids = (np.arange(L)[None] + np.arange(6)[:, None] * 3) % V
  acts = models.capture_residual(model, torch.from_numpy(ids), layer, site).numpy().reshape(-1, D)
  return store.write_store(str(tmp_path / f"store_{site}"), acts.astype(np.float32),
                           ids.reshape(-1).astype(np.int32), context_len=L,
                           source={"model": "tiny", "layer": layer, "site": site})


def _identity_sae(tmp_path):
  eye = np.eye(D, dtype=np.float32)
  params = {"W_enc": np.concatenate([eye, -eye], 1), "b_enc": np.zeros(2 * D, np.float32),
            "W_dec": np.concatenate([eye, -eye], 0), "b_dec": np.zeros(D, np.float32)}
  artifact.save_sae(str(tmp_path / "sae"), params, {"k": 2 * D, "activation": "batchtopk",
                                                   "input_norm": "none", "source": {}})
  return loaded_sae.load_sae(str(tmp_path / "sae"), D)


@pytest.mark.parametrize("site", ["resid_pre", "resid_post"])
def test_identity_sae_has_zero_delta_ce(tmp_path, model, site):
  st = _store(tmp_path, model, site)
  sae = _identity_sae(tmp_path)
  recon = lambda x: np.asarray(sae.reconstruct(x, "batchtopk"))
  half = lambda x: 0.5 * x
  block = models.decoder_layers(model)[1]
  ces = delta_ce.cross_entropies(model, block, site, st, {"sae": recon, "half": half}, num_contexts=5,
                                 batch_contexts=2, skip_first_positions=1, progress=False)
  assert ces["num_predictions"] == 5 * (L - 2)
  assert ces["resid_check_rel_err"] < 1e-5
  s = delta_ce.summarize(ces, "sae")
  assert abs(s["delta_ce_pct"]) < 1e-3
  np.testing.assert_allclose(s["ce_recovered"], 1.0, atol=1e-4)
  assert s["ce_zero_ablation"] > s["ce_clean"] + 0.1
  assert ces["half"] > ces["clean"]

  # Clean CE by hand over predictions from positions 1..L-2.
  ids = torch.from_numpy(np.asarray(st.read_tokens(0, 5 * L), np.int64).reshape(5, L))
  with torch.no_grad():
    logits = model(input_ids=ids).logits
  want = torch.nn.functional.cross_entropy(logits[:, 1:-1].reshape(-1, V), ids[:, 2:].reshape(-1))
  np.testing.assert_allclose(ces["clean"], float(want), rtol=1e-5)


def test_zero_ablation_matches_manual_hook(tmp_path, model):
  st = _store(tmp_path, model, "resid_pre", layer=0)
  block = models.decoder_layers(model)[0]
  ces = delta_ce.cross_entropies(model, block, "resid_pre", st, {}, num_contexts=2, batch_contexts=2,
                                 skip_first_positions=0, progress=False, include_first_position=True)
  assert ces["num_predictions"] == 2 * (L - 1)
  ids = torch.from_numpy(np.asarray(st.read_tokens(0, 2 * L), np.int64).reshape(2, L))

  def zero(_, args, kwargs):
    return (torch.zeros_like(args[0]),) + args[1:], kwargs if args else (args, kwargs)
  h = block.register_forward_pre_hook(zero, with_kwargs=True)
  with torch.no_grad():
    logits = model(input_ids=ids).logits
  h.remove()
  want = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
  np.testing.assert_allclose(ces["zero_ablation"], float(want), rtol=1e-5)


def test_standard_error_matches_numpy_on_per_context_values(tmp_path, model):
  st = _store(tmp_path, model, "resid_pre")
  block = models.decoder_layers(model)[1]
  half = lambda x: 0.5 * x
  noisy = lambda x: x + np.random.default_rng(0).normal(size=x.shape).astype(np.float32)
  ces = delta_ce.cross_entropies(model, block, "resid_pre", st, {"half": half, "noisy": noisy}, num_contexts=6,
                                 batch_contexts=4, skip_first_positions=0, progress=False)
  assert ces["num_contexts"] == 6 and ces["num_predictions"] == 6 * (L - 2)  # position 0 not scored

  # Per-context CE by hand for the clean model and the "half" splice (a hook written here).
  ids = torch.from_numpy(np.asarray(st.read_tokens(0, 6 * L), np.int64).reshape(6, L))
  def per_context_ce(hook=None):
    h = block.register_forward_pre_hook(hook, with_kwargs=True) if hook else None
    with torch.no_grad():
      logits = model(input_ids=ids).logits
    if h:
      h.remove()
    nll = torch.nn.functional.cross_entropy(logits[:, 1:-1].reshape(-1, V), ids[:, 2:].reshape(-1),
                                            reduction="none").reshape(6, L - 2)
    return nll.mean(1).double().numpy()
  clean_C = per_context_ce()
  half_C = per_context_ce(lambda _, a, kw: ((0.5 * a[0],) + a[1:], kw) if a else
                          (a, dict(kw, hidden_states=0.5 * kw["hidden_states"])))
  np.testing.assert_allclose(ces["per_context"]["clean"], clean_C, rtol=1e-5)
  np.testing.assert_allclose(ces["per_context"]["half"], half_C, rtol=1e-5)
  s = delta_ce.summarize(ces, "half")
  d = half_C - clean_C
  np.testing.assert_allclose(s["delta_ce_pct"], d.mean() / clean_C.mean() * 100, rtol=1e-4)
  np.testing.assert_allclose(s["delta_ce_pct_se"], d.std(ddof=1) / np.sqrt(6) / clean_C.mean() * 100, rtol=1e-4)
  pair = delta_ce.paired_difference(ces, "half", "noisy")
  dd = ces["per_context"]["half"] - ces["per_context"]["noisy"]
  np.testing.assert_allclose(pair["delta_ce_pp"], s["delta_ce_pct"] - delta_ce.summarize(ces, "noisy")["delta_ce_pct"],
                             rtol=1e-6)
  np.testing.assert_allclose(pair["delta_ce_pp_se"], dd.std(ddof=1) / np.sqrt(6) / clean_C.mean() * 100, rtol=1e-6)


def test_store_without_tokens_is_user_error(tmp_path, model):
  from metasae_jax.core.errors import UserError
  st = store.write_store(str(tmp_path / "notok"), np.zeros((16, D), np.float32), context_len=L)
  with pytest.raises(UserError, match="no tokens"):
    delta_ce.cross_entropies(model, models.decoder_layers(model)[0], "resid_pre", st, {}, 1,
                             progress=False)
