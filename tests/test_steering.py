"""Steering a tiny random Llama with SAE latents: off is bit-identical, add raises, clamp keeps the error term."""

import jax
import numpy as np
import pytest
import torch
import transformers

import metasae_jax
from metasae_jax.storage import artifact
from metasae_jax.lm import models, steering
from metasae_jax.core import sae

LAYER = 1


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
  model = transformers.LlamaForCausalLM(cfg).eval()
  params = jax.device_get(sae.init_params(jax.random.PRNGKey(0), 32, 96))
  path = str(tmp_path_factory.mktemp("sae") / "joint")
  artifact.save_sae(path, params, {"k": 8, "activation": "batchtopk", "input_norm": "standardize_per_token",
                                   "source": {"layer": LAYER, "site": "resid_pre"}})
  ids = torch.randint(0, 64, (2, 12))
  return model, metasae_jax.load_sae(path), ids


def _resid(model, ids):
  with torch.inference_mode():
    return model(input_ids=ids, output_hidden_states=True).hidden_states[LAYER].numpy()


def test_steering_off_is_bit_identical(setup):
  model, s, ids = setup
  with torch.inference_mode():
    clean = model(input_ids=ids).logits
    with steering.steer(model, s, LAYER, "resid_pre", []):
      hooked = model(input_ids=ids).logits
  assert torch.equal(clean, hooked)


def test_add_raises_the_latent_and_changes_outputs(setup):
  model, s, ids = setup
  x = _resid(model, ids)[:, 1:].reshape(-1, 32)
  latent = int(np.argmin(np.asarray(s.encode(x)).sum(0)))  # a latent that barely fires here
  edited = steering.edit_activations(s, x, [steering.Edit(latent, "add", 8.0)])
  assert np.asarray(s.encode(edited))[:, latent].mean() > np.asarray(s.encode(x))[:, latent].mean() + 0.5
  with torch.inference_mode():
    clean = model(input_ids=ids).logits
    with steering.steer(model, s, LAYER, "resid_pre", [steering.Edit(latent, "add", 8.0)]):
      steered = model(input_ids=ids).logits
  assert torch.equal(clean[:, 0], steered[:, 0])  # the skipped sink position sees no edit
  assert not torch.allclose(clean[:, 1:], steered[:, 1:])


def test_clamp_to_zero_removes_the_latent_and_keeps_the_error_term(setup):
  model, s, ids = setup
  x = _resid(model, ids)[:, 1:].reshape(-1, 32)
  code = s.encode_with_stats(x)
  acts = np.asarray(code.acts_BxN)
  latent = int(np.argmax((acts > 0).sum(0)))
  edited = steering.edit_activations(s, x, [steering.Edit(latent, "ablate")])
  clamped = acts.copy()
  clamped[:, latent] = 0.0
  err_before = x - np.asarray(s.decode(acts, code.mean_Bx1, code.std_Bx1))
  err_after = edited - np.asarray(s.decode(clamped, code.mean_Bx1, code.std_Bx1))
  np.testing.assert_allclose(err_after, err_before, atol=1e-5)
  # The latent's contribution, a_i * w_i in standardised space, is what was removed.
  removed = acts[:, latent:latent + 1] * np.asarray(s.W_dec[latent]) * np.asarray(code.std_Bx1)
  np.testing.assert_allclose(x - edited, removed, atol=1e-4)


def test_generation_is_deterministic_and_steerable(setup):
  model, s, ids = setup

  class Tok:
    pad_token_id, eos_token_id = 0, 0

    def __call__(self, text, return_tensors):
      return type("T", (), {"input_ids": ids[:1]})()

    def decode(self, t, skip_special_tokens):
      return " ".join(map(str, t.tolist()))

  a = steering.generate(model, Tok(), "p", 6)
  b = steering.generate(model, Tok(), "p", 6)
  c = steering.generate(model, Tok(), "p", 6, sae=s, layer=LAYER, edits=[steering.Edit(3, "add", 50.0)])
  assert a == b and a != c


def test_bad_latent_is_refused(setup):
  model, s, _ = setup
  with pytest.raises(metasae_jax.UserError, match="out of range"):
    with steering.steer(model, s, LAYER, "resid_pre", [steering.Edit(999, "add", 1.0)]):
      pass


@pytest.mark.parametrize("firing", ["topk", "batchtopk"])
def test_clamp_encodes_under_the_requested_firing_rule(setup, firing):
  model, s, ids = setup
  x = _resid(model, ids)[:, 1:].reshape(-1, 32)
  pre = np.asarray(s.forward(x, firing).pre_BxN, np.float64)
  if firing == "topk":  # brute force: each row's 8 largest
    keep = pre >= np.sort(pre, axis=1)[:, -8:][:, :1]
  else:  # the 8 * B largest entries of the whole batch
    keep = pre >= np.sort(pre.reshape(-1))[-8 * len(pre)]
  acts = np.where(keep & (pre > 0), pre, 0.0)
  latent = int(np.argmax((acts > 0).sum(0)))
  edited = steering.edit_activations(s, x, [steering.Edit(latent, "ablate")], firing)
  std = np.asarray(s.encode_with_stats(x, firing).std_Bx1)
  np.testing.assert_allclose(x - edited, acts[:, latent:latent + 1] * s.W_dec[latent] * std, atol=1e-4)
  with pytest.raises(metasae_jax.UserError, match="no calibrated thresholds"):
    with steering.steer(model, s, LAYER, "resid_pre", [steering.Edit(latent, "ablate")], firing="threshold"):
      pass
