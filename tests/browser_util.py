"""A tiny run for the browser tests: joint/solo SAEs, a token store with markup-like tokens, report/splits/scores files."""

import json
import os

import numpy as np

from tests import autointerp_util as au

# Tokens a page must show as text, never interpret as HTML.
NASTY = ('<b>&"', "</script>", "<img/src=x/onerror=alert(1)>")
SPLIT_SOLO, SPLIT_JOINT = 3, (5, 7)
SCORED = {"joint": (0, 1), "solo": (2,)}


def make_browser_run(root: str) -> tuple[str, str]:
  """Writes root/model, root/store, root/run; returns (run_dir, store_dir)."""
  model_dir = au.make_model_dir(os.path.join(root, "model"), extra_words=NASTY)
  store_dir = os.path.join(root, "store")
  au.make_store(store_dir, model_dir, extra_words=len(NASTY))
  run_dir = os.path.join(root, "run")
  au.make_run(run_dir, threshold_solo=True)
  joint = {"fvu": 0.21, "mse": 0.2, "l0": 3.0, "dead_fraction": 0.0, "mean_abs_phi": 0.011,
           "delta_ce_pct": None, "ce_clean": None, "ce_spliced": None, "ce_zero_ablation": None,
           "ce_recovered": None, "meta_fve": 0.31, "num_tokens": 480, "var_abs_phi": 1e-4,
           "num_pairs": 276, "num_live": 24}
  solo = dict(joint, fvu=0.2, mse=0.19, mean_abs_phi=0.012, meta_fve=0.35)
  report = {"run_dir": run_dir, "activations": store_dir, "num_tokens": 480, "firing": "threshold",
            "batch_size": 128, "skip": {"skip_first_positions": 1, "context_len": au.CTX, "applied": True,
                                        "rule": f"tokens at position t % {au.CTX} < 1 are skipped"},
            "joint": joint, "solo": solo,
            "comparison": {"mean_abs_phi_pct": -8.3, "fvu_pct": 5.0, "mse_pct": 5.2, "delta_ce_pp": None,
                           "meta_fve_diff": -0.04, "welch_t": -2.1, "welch_p": 0.036},
            "matching": {"num_pairs": au.N, "mean_cosine": 0.99, "median_cosine": 0.99,
                         "fraction_cosine_above_0.9": 1.0, "mean_matched_cross_phi": 0.8,
                         "num_split_candidates_listed": 1, "num_solo_latents_shared_by_2plus": 1,
                         "split_phi_threshold": 0.2},
            "delta_ce": {"skipped": True}, "meta_fve_config": {"steps": 10, "width_fraction": 0.25, "k": 4},
            "notes": ["hand-made report for a test"], "plots": [], "timings": {}}
  splits = [{"solo_latent": SPLIT_SOLO, "solo_frequency": 0.1,
             "joint_partners": [{"joint_latent": j, "cross_phi": 0.4 - 0.1 * i}
                                for i, j in enumerate(SPLIT_JOINT)],
             "coverage": 0.9, "matched_joint_latent": SPLIT_JOINT[0], "matched_cosine": 0.5,
             "solo_top_contexts": [], "joint_top_contexts": {str(j): [] for j in SPLIT_JOINT}}]

  def scored(name, i, text):
    return {"id": i, "explanation": text, "fuzz_spearman": 0.1 * (i + 1), "fuzz_balanced_accuracy": 0.6,
            "fuzz_spearman_defined": True, "num_fired": 10, "num_held_out": 5, "num_negative": 5,
            "failed_answers": 0, "pair_cosine": 0.99}

  latents = {name: [scored(name, i, f"{name} words about <i>cats</i> & dogs {i}") for i in ids]
             for name, ids in SCORED.items()}
  scores = {"llm": "fake", "activations": store_dir, "num_tokens": 480, "skip_first_positions": 1,
            "firing_rule": {"joint": "topk", "solo": "threshold"},
            **{name: {"fuzz_spearman": 0.15, "fuzz_balanced_accuracy": 0.6, "num_latents": len(lat),
                      "latents": lat} for name, lat in latents.items()},
            "paired": {"num_pairs": 1}, "llm_requests": 0, "llm_cache_hits": 0, "seconds": 0.0, "config": {}}
  os.makedirs(os.path.join(run_dir, "autointerp"), exist_ok=True)
  for path, obj in ((os.path.join(run_dir, "report.json"), report),
                    (os.path.join(run_dir, "split_candidates.json"), splits),
                    (os.path.join(run_dir, "autointerp", "scores.json"), scores)):
    with open(path, "w") as f:
      json.dump(obj, f)
  return run_dir, store_dir


def shown_text(ctx: dict, vocab: dict) -> str:
  """What the page shows for a context (newlines and tabs made visible like app.js does)."""
  return "".join(vocab[str(t)].replace("\n", "↵").replace("\t", "⇥") for t in ctx["tokens"])


def dense_acts(run_dir: str, store_dir: str, batch_size: int) -> dict:
  """{sae: acts [T, N] over all store tokens}, encoded in the streamer's batches (0 at skipped positions)."""
  from metasae_jax.storage import loaded_sae, store as store_lib
  store = store_lib.open_store(store_dir)
  acts = store.read_acts(0, store.num_tokens)
  kept = np.flatnonzero(np.arange(len(acts)) % store.context_len >= 1)
  out = {}
  # The page's default rule: joint has no θ (per-token top-k), solo has calibrated θ.
  for name, firing in (("joint", "topk"), ("solo", "threshold")):
    sae = loaded_sae.load_sae(os.path.join(run_dir, name))
    dense = np.zeros((len(acts), sae.width), np.float32)
    for s in range(0, len(kept), batch_size):
      idx = kept[s:s + batch_size]
      dense[idx] = np.asarray(sae.encode(acts[idx], firing))
    out[name] = dense
  return out
