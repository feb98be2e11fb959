"""Which latents the browser shows: split-candidate latents, scored ones, the most frequent, and their matched partners.

Legend: N = latents of one SAE.
"""

from typing import Optional, Sequence

import numpy as np

from metasae_jax.storage.artifact import SAE_NAMES as SAES


def other(sae: str) -> str:
  return "solo" if sae == "joint" else "joint"


def partner_maps(joint_idx: np.ndarray, solo_idx: np.ndarray) -> dict:
  """{sae: {latent: matched latent in the other SAE}} from a one-to-one matching."""
  return {"joint": {int(j): int(s) for j, s in zip(joint_idx, solo_idx)},
          "solo": {int(s): int(j) for j, s in zip(joint_idx, solo_idx)}}


def priority(splits: Sequence[dict], scored: dict, counts: dict) -> list:
  """(sae, latent) in the order they should be included.

  Split-candidate latents first (the splits view needs them all), then latents
  autointerp scored, then live latents by firing count, alternating SAEs.
  """
  out = []
  for entry in splits:
    out.append(("solo", int(entry["solo_latent"])))
    out += [("joint", int(p["joint_latent"])) for p in entry.get("joint_partners", [])]
  for sae in SAES:
    out += [(sae, int(i)) for i in scored.get(sae, ())]
  orders = {sae: [int(i) for i in np.argsort(-counts[sae], kind="stable") if counts[sae][i] > 0]
            for sae in SAES}
  for r in range(max(len(o) for o in orders.values())):
    out += [(sae, orders[sae][r]) for sae in SAES if r < len(orders[sae])]
  return out


def choose(order: Sequence[tuple], partners: dict, cap: int,
           widths: Optional[dict] = None) -> dict:
  """Up to `cap` latents per SAE, walking `order` and adding each latent's matched partner with it."""
  chosen = {sae: {} for sae in SAES}  # an insertion-ordered set

  def add(sae, i):
    if i not in chosen[sae] and len(chosen[sae]) < cap and (widths is None or 0 <= i < widths[sae]):
      chosen[sae][i] = None

  for sae, i in order:
    if all(len(chosen[s]) >= cap for s in SAES):
      break
    add(sae, i)
    if i in chosen[sae] and i in partners[sae]:
      add(other(sae), partners[sae][i])
  return {sae: list(chosen[sae]) for sae in SAES}
