"""The browser's page data: per chosen latent its contexts, activation histogram, explanation and matched partner.

Legend: C = chosen (tracked) latents of one SAE, K = top tokens kept, R = reservoir
of firing tokens, E = example contexts, W = window tokens, H = histogram bins.
Contexts come from the shared example streamer (evaluation/examples.py, bounded memory): a first pass counts
every latent's firings to rank them, a second tracks the chosen latents' top
tokens and a uniform sample of their firings.
"""

import json
import os
import time
from typing import Optional

import numpy as np
from tqdm import tqdm

from metasae_jax.evaluation import matching
from metasae_jax.evaluation import examples as ex
from metasae_jax.evaluation.encoder import StreamEncoder
from metasae_jax.browser.config import BrowserConfig  # noqa: F401  (the public name stays here too)
from metasae_jax.storage.loaded_sae import load_sae
from metasae_jax.storage.positions import KeptTokens
from metasae_jax.lm.tokens import Detokenizer
from metasae_jax.browser import select
from metasae_jax.core.errors import UserError
from metasae_jax.storage import location
from metasae_jax.storage.store import open_store


SAES = select.SAES
SUMMARY_KEYS = ("fvu", "mse", "l0", "dead_fraction", "mean_abs_phi", "meta_fve", "delta_ce_pct",
                "ce_recovered")


def read_json(path: str, what: str) -> Optional[object]:
  """A run file if present (None if absent); a damaged one is a UserError naming it."""
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise UserError(f"{path} is not valid JSON ({e}). Rerun {what} to rewrite it, or delete it.")


def build(cfg: BrowserConfig, detokenizer: Optional[Detokenizer] = None) -> dict:
  """Streams the store through both SAEs and returns the page data (plain JSON types)."""
  t0 = time.time()
  for name in SAES:
    if not os.path.isdir(os.path.join(cfg.run_dir, name)):
      raise UserError(f"--run_dir {cfg.run_dir} has no {name}/ SAE; the browser compares joint and solo "
                      "SAEs of one training run (experiments.train with --baseline).")
  encoders = {name: StreamEncoder(load_sae(os.path.join(cfg.run_dir, name)), cfg.firing or None)
              for name in SAES}
  store = open_store(cfg.activations, require_tokens=True)
  for enc in encoders.values():
    if enc.sae.d_model != store.d_model:
      raise UserError(f"SAE {enc.sae.path} has d_model {enc.sae.d_model} but store {cfg.activations} has "
                      f"{store.d_model}. Pass a store exported from the SAE's model and layer.")
  kept = KeptTokens(store, cfg.skip_first_positions)
  num_kept = kept.num_kept if cfg.num_tokens == 0 else min(cfg.num_tokens, kept.num_kept)
  if num_kept == 0:
    raise UserError(f"store {cfg.activations} has no tokens left after skipping the first "
                    f"{kept.skip} positions of each context.")
  # Before the long stream: the store's token ids must decode with this tokenizer.
  detok = detokenizer or Detokenizer.for_store(store, cfg.tokenizer or store.source.get("model"))
  report = read_json(os.path.join(cfg.run_dir, "report.json"), "experiments.evaluate")
  splits = read_json(os.path.join(cfg.run_dir, "split_candidates.json"), "experiments.evaluate") or []
  scores = read_json(os.path.join(cfg.run_dir, "autointerp", "scores.json"), "experiments.autointerp")
  scored = {name: {int(lat["id"]): lat for lat in (scores or {}).get(name, {}).get("latents", [])}
            for name in SAES}

  m = matching.match_decoders(encoders["joint"].sae.W_dec, encoders["solo"].sae.W_dec)
  partners = select.partner_maps(m.joint_idx, m.solo_idx)
  cosine = {"joint": {int(j): float(c) for j, c in zip(m.joint_idx, m.cosine)},
            "solo": {int(s): float(c) for s, c in zip(m.solo_idx, m.cosine)}}

  encs = [encoders[name] for name in SAES]
  none = np.zeros(0, np.int64)
  with tqdm(total=2 * num_kept, desc="browse: encode", unit="tok", disable=not cfg.progress) as bar:
    counting = ex.stream(store, kept, encs, [none, none], num_kept, cfg.batch_size, 1, 1, cfg.seed,
                         bar.update)
    counts = {name: p.count_N for name, p in zip(SAES, counting)}
    chosen = select.choose(select.priority(splits, scored, counts), partners, cfg.num_latents,
                           {name: enc.width for name, enc in encoders.items()})
    pools = ex.stream(store, kept, encs, [np.asarray(chosen[n], np.int64) for n in SAES], num_kept,
                      cfg.batch_size, cfg.num_top, cfg.reservoir, cfg.seed, bar.update)

  rng = np.random.default_rng(cfg.seed)
  latents, token_ids = {}, set()
  for name, enc, pool in zip(SAES, encs, pools):
    latents[name] = _latents(cfg, store, kept, enc, pool, num_kept, partners[name], cosine[name],
                             scored[name], rng)
    for lat in latents[name].values():
      for ctx in _contexts_of(lat):
        token_ids.update(ctx["tokens"])
  vocab = {str(t): detok.piece(t) for t in sorted(token_ids)}
  return {
      "title": os.path.basename(os.path.normpath(cfg.run_dir)),
      "meta": {"run_dir": os.path.abspath(cfg.run_dir), "activations": location.normalize(cfg.activations),
               "source": store.source, "num_tokens": int(num_kept), "skip_first_positions": kept.skip,
               "context_len": store.context_len,
               "firing_rule": {name: enc.rule for name, enc in encoders.items()},
               "widths": {name: int(enc.width) for name, enc in encoders.items()},
               "autointerp_llm": (scores or {}).get("llm"), "seconds": round(time.time() - t0, 1)},
      "summary": _summary(report, scores),
      "vocab": vocab,
      "saes": {name: {"width": int(encoders[name].width), "latents": latents[name]} for name in SAES},
      "splits": [_split(entry) for entry in splits],
  }


def _contexts_of(lat: dict) -> list:
  return lat["top"] + [c for q in lat["quantiles"] for c in q["contexts"]]


def _latents(cfg, store, kept, enc, pool, num_kept, partner, cosine, scored, rng) -> dict:
  """Page entries of one SAE's tracked latents."""
  ranks, cols, picks = [], [], []
  for c, latent in enumerate(pool.cand_C):
    top = pool.top_val_CxK[c] > 0
    top_rank = pool.top_rank_CxK[c][top][:cfg.num_top]
    res = pool.res_key_CxR[c] < 1.0
    res_rank, res_val = pool.res_rank_CxR[c][res], pool.res_val_CxR[c][res]
    order = np.argsort(-res_val, kind="stable")
    res_rank, res_val = res_rank[order], res_val[order]
    shown = set(top_rank.tolist())
    ranks.append(top_rank)
    cols.append(int(latent))
    bins = []
    for q, idx in enumerate(np.array_split(np.arange(len(res_rank)), cfg.num_quantiles)):
      free = [i for i in idx if res_rank[i] not in shown]
      take = sorted(rng.choice(free, size=min(cfg.per_quantile, len(free)), replace=False).tolist())
      bins.append((q, idx))
      ranks.append(res_rank[take])
      cols.append(int(latent))
    picks.append((int(latent), c, res_val, bins))

  ends, focus = [], []
  for r in ranks:
    g = kept.kept_to_global(np.asarray(r, np.int64))
    end = np.minimum(g + cfg.after, kept.context_end(g))
    ends.append(end)
    focus.append(end - g)
  windows = ex.window_examples(store, kept, enc, pool, np.asarray(cols, np.int64), ends,
                               cfg.before + cfg.after + 1)
  out, w = {}, 0
  for latent, c, res_val, bins in picks:
    top = [_context(e, f) for e, f in zip(windows[w], focus[w])]
    w += 1
    quantiles = []
    for q, idx in bins:
      vals = res_val[idx]
      quantiles.append({"label": _quantile_label(q, cfg.num_quantiles),
                        "lo": _r(vals.min()) if len(vals) else None,
                        "hi": _r(vals.max()) if len(vals) else None,
                        "contexts": [_context(e, f) for e, f in zip(windows[w], focus[w])]})
      w += 1
    count = int(pool.count_N[latent])
    max_act = float(pool.top_val_CxK[c].max())
    entry = {"id": latent, "count": count, "frequency": count / num_kept, "max_act": _r(max_act),
             "partner": partner.get(latent), "partner_cosine": _r(cosine.get(latent)),
             "top": top, "quantiles": quantiles, "histogram": _histogram(res_val, max_act, cfg.histogram_bins)}
    if latent in scored:
      s = scored[latent]
      entry.update({"explanation": s.get("explanation"), "fuzz_spearman": _r(s.get("fuzz_spearman")),
                    "fuzz_balanced_accuracy": _r(s.get("fuzz_balanced_accuracy"))})
    out[str(latent)] = entry
  return out


def _context(e: ex.Example, from_end: int) -> dict:
  """One window: token ids, activations, and where the example token sits."""
  return {"tokens": list(e.token_ids), "acts": [_r(a) for a in e.acts],
          "focus": len(e.token_ids) - 1 - int(from_end), "end": int(e.end)}


def _histogram(vals_R: np.ndarray, max_act: float, bins: int) -> dict:
  """Counts of the sampled firing activations in equal bins over (0, max_act]."""
  hi = max(max_act, float(vals_R.max()) if len(vals_R) else 0.0)
  counts_H = np.histogram(vals_R, bins=bins, range=(0.0, hi if hi > 0 else 1.0))[0]
  return {"lo": 0.0, "hi": _r(hi), "counts": counts_H.tolist(), "sampled": int(len(vals_R))}


def _quantile_label(q: int, n: int) -> str:
  hi, lo = 100 - round(100 * q / n), 100 - round(100 * (q + 1) / n)
  return f"Firings between the {lo}th and {hi}th percentile"


def _r(x) -> Optional[float]:
  """A finite float at 4 significant digits (keeps the page small); None otherwise."""
  if x is None or not np.isfinite(x):
    return None
  return float(f"{float(x):.4g}")


def _split(entry: dict) -> dict:
  keep = ("solo_latent", "solo_frequency", "coverage", "matched_joint_latent", "matched_cosine")
  out = {k: entry.get(k) for k in keep}
  out["joint_partners"] = [{"joint_latent": int(p["joint_latent"]), "cross_phi": p.get("cross_phi")}
                           for p in entry.get("joint_partners", [])]
  return out


def _summary(report: Optional[dict], scores: Optional[dict]) -> Optional[dict]:
  """The run's headline numbers: report.json per-SAE metrics, comparison, matching; autointerp means."""
  if report is None and scores is None:
    return None
  out = {"rows": [], "comparison": {}, "matching": {}, "notes": [], "info": {}}
  if report is not None:
    for key in SUMMARY_KEYS:
      vals = [report.get(name, {}).get(key) for name in SAES]
      if any(v is not None for v in vals):
        out["rows"].append([key] + vals)
    out["comparison"] = report.get("comparison") or {}
    out["matching"] = report.get("matching") or {}
    out["notes"] = report.get("notes") or []
    out["info"] = {k: report.get(k) for k in ("num_tokens", "firing", "activations")}
    # The evaluation's own position rule: the page's examples may skip positions the summary's numbers include.
    out["info"]["skip"] = (report.get("skip") or {}).get("rule")
  if scores is not None:
    for key in ("fuzz_spearman", "fuzz_balanced_accuracy"):
      vals = [scores.get(name, {}).get(key) for name in SAES]
      if any(v is not None for v in vals):
        out["rows"].append([f"autointerp {key}"] + vals)
  return out
