"""Steering a live `transformers` model with SAE latents at the SAE's layer (PyTorch side).

Legend: B = batch, L = positions in this forward call, D = d_model, N = latents.
Modes per latent i:
  add    — add α · w_i (its decoder row) to the residual stream;
  clamp  — encode, set latent i to a value, decode, and add the SAE's error term
           back, so every other latent and the unexplained part stay untouched;
  ablate — clamp to 0.
Clamping encodes each token under `firing` (None = the SAE's default: calibrated θ, else
per-token top-k), so a token's code never depends on the other tokens of the forward call.
The first `skip_first_positions` positions of the sequence (attention sinks the
SAE never saw) are left alone, also across cached generation steps.
"""

import contextlib
from typing import Optional

import numpy as np
import torch

from metasae_jax.lm import models
from metasae_jax.lm.edit import MODES, Edit  # noqa: F401  (public here too)
from metasae_jax.lm.delta_ce import register_residual_edit
from metasae_jax.core.errors import UserError
from metasae_jax.storage.loaded_sae import LoadedSAE

def _check(sae: LoadedSAE, edits) -> None:
  for e in edits:
    e.check_width(sae.width)


def edit_activations(sae: LoadedSAE, x_MxD: np.ndarray, edits, firing: Optional[str] = None) -> np.ndarray:
  """The edited residual for M token vectors (numpy in, numpy out)."""
  x = np.asarray(x_MxD, np.float32)
  out = x.copy()
  adds = [e for e in edits if e.mode == "add"]
  for e in adds:
    out += e.value * np.asarray(sae.W_dec[e.latent])
  clamps = [e for e in edits if e.mode != "add"]
  if clamps:
    code = sae.encode_with_stats(x, firing)
    acts = np.array(code.acts_BxN)
    for e in clamps:
      acts[:, e.latent] = 0.0 if e.mode == "ablate" else e.value
    before = np.asarray(sae.decode(code.acts_BxN, code.mean_Bx1, code.std_Bx1))
    after = np.asarray(sae.decode(acts, code.mean_Bx1, code.std_Bx1))
    out += after - before  # x - recon (the error term) is unchanged
  return out


@contextlib.contextmanager
def steer(model: torch.nn.Module, sae: LoadedSAE, layer: int, site: str, edits, skip_first_positions: int = 1,
          firing: Optional[str] = None):
  """Within the block, forward passes of `model` run with the edits applied at (layer, site)."""
  _check(sae, edits)
  if any(e.mode != "add" for e in edits):
    sae.firing_rule(firing)  # an unusable rule fails here, not inside the model's forward
  block = models.decoder_layers(model)[layer]
  seen = {"positions": 0}

  def edit(h_BxLxD: torch.Tensor) -> torch.Tensor:
    length = h_BxLxD.shape[1]
    start = max(0, skip_first_positions - seen["positions"])
    seen["positions"] += length
    if not edits or start >= length:
      return h_BxLxD
    part = h_BxLxD[:, start:]
    flat = part.reshape(-1, part.shape[-1]).detach().float().cpu().numpy()
    new = torch.from_numpy(edit_activations(sae, flat, edits, firing)).to(h_BxLxD.dtype).reshape(part.shape)
    return torch.cat([h_BxLxD[:, :start], new.to(h_BxLxD.device)], dim=1)

  handle = register_residual_edit(block, site, edit)
  try:
    yield
  finally:
    handle.remove()


def generate(model, tokenizer, prompt: str, max_new_tokens: int, sae: Optional[LoadedSAE] = None,
             layer: int = 0, site: str = "resid_pre", edits=(), skip_first_positions: int = 1,
             firing: Optional[str] = None) -> str:
  """Greedy continuation of `prompt`, steered when `edits` are given."""
  ids = tokenizer(prompt, return_tensors="pt").input_ids
  ctx = steer(model, sae, layer, site, list(edits), skip_first_positions, firing) if edits else contextlib.nullcontext()
  with torch.inference_mode(), ctx:
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
  return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
