"""Evaluating a training run's SAEs (joint, solo) on held-out activations: report.json, report.md, plots.

Legend: T = evaluation tokens, N = latents, D = d_model.
One pass over the store feeds every SAE's reconstruction metrics and sparse firing record; φ,
matching, split candidates, meta FVE and ΔCE are computed from those afterwards.
"""

import dataclasses
import json
import math
import os
import time
from typing import Optional

import numpy as np
from absl import logging
from tqdm import tqdm

from metasae_jax.storage import artifact, atomic, heldout, loaded_sae
from metasae_jax.evaluation import cooccurrence, firings, matching, plots, reconstruction, thresholds
from metasae_jax.core.errors import UserError
from metasae_jax.storage.store import open_store

SAE_NAMES = artifact.SAE_NAMES
PER_SAE_KEYS = ("fvu", "fvu_typical", "outlier_tokens", "mse", "l0", "dead_fraction", "mean_abs_phi", "delta_ce_pct", "ce_clean",
                "ce_spliced", "ce_zero_ablation", "ce_recovered", "meta_fve")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """What `evaluate_run` evaluates and how."""
  run_dir: str
  """Training run directory holding `joint/` and (usually) `solo/` SAE artifacts; outputs go here."""
  activations: str
  """Held-out activation store (same model, layer and site as training)."""
  num_tokens: int = 0
  """Evaluation tokens after skipping attention sinks (0 = the whole store)."""
  model: str = ""
  """Model for ΔCE: "" = the store's source.model, "none" = skip ΔCE."""
  firing: str = "threshold"
  """"threshold": calibrated θ (calibrated here and written into artifacts that lack it); "topk" (per
  token) or "batchtopk" (over each batch of `batch_size`). The report records it."""
  batch_size: int = 4096
  """Tokens per batch (BatchTopK selects over each batch; the training default)."""
  skip_first_positions: int = 1
  """Positions t % context_len < this are skipped (attention sinks, docs/method.md §3.2; 0 keeps all)."""
  ce_contexts: int = 64
  """Whole contexts for ΔCE (each costs 4 model forwards: clean, zero, joint, solo)."""
  ce_batch_contexts: int = 8
  """Contexts per model forward in ΔCE."""
  meta_fve_steps: int = 500
  """Steps of the fresh meta SAE for meta FVE (SAEBench meta_structure); 0 skips it."""
  meta_width_fraction: float = 0.25
  """Fresh meta SAE width as a fraction of the SAE's width (SAEBench: 0.25)."""
  meta_k: int = 4
  """Fresh meta SAE k (SAEBench: 4)."""
  split_phi_threshold: float = 0.2
  """Cross-φ a joint latent needs to count as sharing a solo latent's firing."""
  max_split_candidates: int = 50
  seed: int = 0
  progress: bool = True

  def __post_init__(self):
    if self.firing not in loaded_sae.FIRINGS:
      raise UserError(f"--firing must be one of {loaded_sae.FIRINGS}, got {self.firing!r}.")
    if self.batch_size <= 0 or self.ce_contexts < 0 or self.meta_fve_steps < 0 or self.skip_first_positions < 0:
      raise UserError("--batch_size must be positive; --ce_contexts, --meta_fve_steps and "
                      "--skip_first_positions must be >= 0.")
    if not 0 < self.meta_width_fraction <= 4:
      raise UserError(f"meta_width_fraction must be in (0, 4], got {self.meta_width_fraction}.")


def _clean(obj):
  """JSON without NaN/Inf (null instead) and with numpy scalars as Python numbers."""
  if isinstance(obj, dict):
    return {str(k): _clean(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_clean(v) for v in obj]
  if isinstance(obj, (np.integer,)):
    return int(obj)
  if isinstance(obj, (float, np.floating)):
    return float(obj) if math.isfinite(obj) else None
  return obj


def _pct(a, b):
  if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)) or b == 0:
    return None
  return (a - b) / abs(b) * 100.0


def load_saes(run_dir: str, d_model: int) -> dict:
  """The run's SAE artifacts present among joint/ and solo/ (d_model checked against the store)."""
  if not os.path.isdir(run_dir):
    raise UserError(f"--run_dir {run_dir} does not exist; point it at a directory written by experiments.train.")
  saes = {name: loaded_sae.load_sae(os.path.join(run_dir, name), d_model)
          for name in SAE_NAMES if os.path.isdir(os.path.join(run_dir, name))}
  if not saes:
    raise UserError(f"--run_dir {run_dir} has neither joint/ nor solo/ SAE artifacts; train first "
                    "(experiments.train) or point at the run directory.")
  return saes


def _source_notes(saes: dict, store) -> list:
  notes = []
  for name, sae in saes.items():
    src = sae.cfg.get("source") or {}
    for key in ("model", "layer", "site"):
      if key in src and key in store.source and src[key] != store.source[key]:
        notes.append(f"{name}: cfg.json source.{key} {src[key]!r} differs from the store's {store.source[key]!r}")
  return notes


def _load_model(cfg: EvalConfig, store, notes: list):
  """The model for ΔCE (and the tokenizer for context text), or None with a note why not."""
  name = cfg.model or str(store.source.get("model") or "")
  if name.lower() == "none":
    notes.append("ΔCE skipped: --model none")
    return None, None
  if not name:
    notes.append("ΔCE skipped: the store's source has no model; pass --model")
    return None, None
  if not store.has_tokens or store.context_len < 2:
    notes.append("ΔCE skipped: the store has no token contexts (tokens and context_len > 1 needed)")
    return None, None
  from metasae_jax.lm import models  # torch/transformers only when ΔCE runs
  logging.info("loading %s for ΔCE", name)
  return models.load_model(name), name


def _meta_fve(sae, cfg: EvalConfig) -> Optional[float]:
  from metasae_jax.core import meta
  width = max(1, int(round(cfg.meta_width_fraction * sae.width)))
  params = meta.train_meta_sae(sae.params["W_dec"], width, cfg.meta_k, cfg.meta_fve_steps, seed=cfg.seed)
  return meta.meta_fve(sae.params["W_dec"], params, cfg.meta_k)


def evaluate_run(cfg: EvalConfig) -> dict:
  """Evaluates the run's SAEs; writes report.json, report.md, split_candidates.json and PNGs into run_dir."""
  t0 = time.perf_counter()
  timings = {}
  store = open_store(cfg.activations)
  saes = load_saes(cfg.run_dir, store.d_model)
  num = heldout.resolve_num_tokens(store, cfg.num_tokens, cfg.skip_first_positions)
  notes = _source_notes(saes, store)
  lm, model_name = _load_model(cfg, store, notes)

  if cfg.firing == "threshold":
    for name, sae in list(saes.items()):
      if sae.threshold_N is None:
        logging.info("calibrating thresholds of %s", name)
        theta, record = thresholds.calibrate(
            sae, store, thresholds.CalibrationConfig(num_tokens=num, batch_size=cfg.batch_size,
                                                     skip_first_positions=cfg.skip_first_positions),
            cfg.progress)
        saes[name] = thresholds.write_into_artifact(sae, theta, record)
        notes.append(f"{name}: thresholds calibrated on these held-out tokens and written into {sae.path}")
        if not record["grid_covers_batch_thresholds"]:
          notes.append(f"{name}: batch thresholds {record['batch_threshold_range']} leave the calibration "
                       f"grid {record['bin_range']}; θ of some latents sits on the grid's edge")
  timings["thresholds_s"] = time.perf_counter() - t0

  # One pass over the tokens for every SAE.
  t1 = time.perf_counter()
  accs = {n: reconstruction.Accumulator(s.d_model, s.width) for n, s in saes.items()}
  recs = {n: firings.Recorder(s.width) for n, s in saes.items()}
  for batch in tqdm(heldout.iter_batches(store, cfg.batch_size, num, cfg.skip_first_positions),
                    total=-(-num // cfg.batch_size), desc="evaluate", disable=not cfg.progress):
    for name, sae in saes.items():
      out = sae.forward(batch.acts_BxD, cfg.firing)
      accs[name].add(batch.acts_BxD, out.recon_BxD, out.xs_BxD, out.recon_std_BxD, out.acts_BxN)
      recs[name].add(out.acts_BxN, batch.index_B)
  per_sae = {n: accs[n].result() for n in saes}
  outliers = max(r["outlier_tokens"] for r in per_sae.values())
  if outliers:
    notes.append(f"{outliers} held-out tokens have > {reconstruction.OUTLIER_FACTOR:g}x the median norm "
                 "(attention-sink-like tokens past position 0); fvu is dominated by them, fvu_typical "
                 "leaves them out")
  fired = {n: recs[n].result() for n in saes}
  timings["reconstruction_s"] = time.perf_counter() - t1

  t1 = time.perf_counter()
  phi = {n: cooccurrence.phi_stats(fired[n], seed=cfg.seed, progress=cfg.progress) for n in saes}
  for n in saes:
    per_sae[n].update(phi[n].summary())
  timings["phi_s"] = time.perf_counter() - t1

  decode = None if lm is None else (lambda ids: lm.tokenizer.decode(ids))
  match_summary, candidates, cosine = None, [], None
  if "joint" in saes and "solo" in saes:
    t1 = time.perf_counter()
    m = matching.match_decoders(saes["joint"].params["W_dec"], saes["solo"].params["W_dec"])
    cosine = m.cosine
    cross = cooccurrence.cross_phi(fired["joint"], fired["solo"], threshold=cfg.split_phi_threshold,
                                   pairs_a=m.joint_idx, pairs_b=m.solo_idx, progress=cfg.progress)
    candidates = matching.split_candidates(fired["joint"], fired["solo"], cross, m,
                                           threshold=cfg.split_phi_threshold,
                                           max_candidates=cfg.max_split_candidates, store=store,
                                           decode=decode)
    pair_phi = cross.pair_phi[np.isfinite(cross.pair_phi)]
    match_summary = {"num_pairs": len(m.cosine), "mean_cosine": float(np.mean(m.cosine)),
                     "median_cosine": float(np.median(m.cosine)),
                     "fraction_cosine_above_0.9": float(np.mean(m.cosine > 0.9)),
                     "mean_matched_cross_phi": float(np.mean(pair_phi)) if len(pair_phi) else None,
                     "num_split_candidates_listed": len(candidates),
                     "num_solo_latents_shared_by_2plus": int(np.sum(cross.num_above_S >= 2)),
                     "split_phi_threshold": cfg.split_phi_threshold}
    timings["matching_s"] = time.perf_counter() - t1

  if cfg.meta_fve_steps > 0:
    t1 = time.perf_counter()
    for n, sae in saes.items():
      per_sae[n]["meta_fve"] = _meta_fve(sae, cfg)
    timings["meta_fve_s"] = time.perf_counter() - t1
  else:
    notes.append("meta FVE skipped: --meta_fve_steps 0")

  ce_info = None
  if lm is not None:
    t1 = time.perf_counter()
    from metasae_jax.lm import delta_ce, models  # only here: the rest of evaluation runs without torch
    layer, site = store.source.get("layer"), store.source.get("site", "resid_pre")
    block = delta_ce.block_for(models.decoder_layers(lm.model), layer)
    fns = {n: (lambda x, s=s: np.asarray(s.reconstruct(x, cfg.firing)))
           for n, s in saes.items()}
    ces = delta_ce.cross_entropies(lm.model, block, site, store, fns, cfg.ce_contexts,
                                   cfg.ce_batch_contexts, cfg.skip_first_positions, cfg.progress)
    for n in saes:
      per_sae[n].update(delta_ce.summarize(ces, n))
    ce_info = {"model": model_name, "layer": layer, "site": site, "num_contexts": cfg.ce_contexts,
               "num_predictions": ces["num_predictions"],
               "positions": delta_ce.positions_rule(store.context_len, cfg.skip_first_positions),
               "resid_check_rel_err": ces["resid_check_rel_err"]}
    if ces["resid_check_rel_err"] > 0.05:
      notes.append(f"the model's live residual differs from the stored one by {ces['resid_check_rel_err']:.3g} "
                   "(relative): the store may come from another model, layer or site")
    timings["delta_ce_s"] = time.perf_counter() - t1

  for n in saes:
    for key in PER_SAE_KEYS:
      per_sae[n].setdefault(key, None)
  report = {"run_dir": cfg.run_dir, "activations": store.path, "num_tokens": num, "firing": cfg.firing,
            "batch_size": cfg.batch_size, "skip": heldout.skip_rule(store.context_len, cfg.skip_first_positions),
            **per_sae}
  if "joint" in saes and "solo" in saes:
    j, s = per_sae["joint"], per_sae["solo"]
    welch_t, welch_p = cooccurrence.welch(phi["joint"], phi["solo"])
    report["comparison"] = {
        "mean_abs_phi_pct": _pct(j["mean_abs_phi"], s["mean_abs_phi"]), "fvu_pct": _pct(j["fvu"], s["fvu"]),
        "fvu_typical_pct": _pct(j["fvu_typical"], s["fvu_typical"]), "mse_pct": _pct(j["mse"], s["mse"]),
        "delta_ce_pp": (j["delta_ce_pct"] - s["delta_ce_pct"]) if j["delta_ce_pct"] is not None else None,
        "meta_fve_diff": (j["meta_fve"] - s["meta_fve"]) if j["meta_fve"] is not None else None,
        "welch_t": welch_t, "welch_p": welch_p}
    report["matching"] = match_summary
  report["delta_ce"] = ce_info or {"skipped": True}
  report["meta_fve_config"] = {"steps": cfg.meta_fve_steps, "width_fraction": cfg.meta_width_fraction,
                               "k": cfg.meta_k}
  report["notes"] = notes
  report["plots"] = plots.write_all(cfg.run_dir, phi, per_sae, cosine)
  timings["total_s"] = time.perf_counter() - t0
  report["timings"] = timings
  report = _clean(report)
  atomic.write_json(os.path.join(cfg.run_dir, "split_candidates.json"), _clean(candidates))
  atomic.write_json(os.path.join(cfg.run_dir, "report.json"), report)
  atomic.write_text(os.path.join(cfg.run_dir, "report.md"), markdown(report))
  return report


def _fmt(v) -> str:
  if v is None:
    return "–"
  if isinstance(v, float):
    return f"{v:.4g}"
  return str(v)


def markdown(report: dict) -> str:
  """A human-readable summary of report.json."""
  names = [n for n in SAE_NAMES if n in report]
  lines = [f"# Evaluation of {report['run_dir']}", "",
           f"Held-out store `{report['activations']}`, {report['num_tokens']} tokens, firing "
           f"`{report['firing']}`, batch {report['batch_size']}; {report['skip']['rule']}.", "",
           "| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
  for key in PER_SAE_KEYS:
    lines.append(f"| {key} | " + " | ".join(_fmt(report[n].get(key)) for n in names) + " |")
  if "comparison" in report:
    lines += ["", "## Joint vs solo", ""] + [f"- {k}: {_fmt(v)}" for k, v in report["comparison"].items()]
  if report.get("matching"):
    lines += ["", "## Matching", ""] + [f"- {k}: {_fmt(v)}" for k, v in report["matching"].items()]
  ce = report.get("delta_ce") or {}
  if not ce.get("skipped"):
    lines += ["", "## ΔCE", ""] + [f"- {k}: {_fmt(v)}" for k, v in ce.items()]
  if report.get("notes"):
    lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
  lines += ["", "Plots: " + ", ".join(f"`{p}`" for p in report.get("plots", [])), ""]
  return "\n".join(lines)
