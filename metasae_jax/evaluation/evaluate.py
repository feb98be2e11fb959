"""Evaluating a training run's SAEs (joint, solo) on held-out activations: report.json, report.md, plots.

Legend: T = evaluation tokens, N = latents, D = d_model, C = contexts.
Stages, each a function with typed inputs and outputs: open → calibrate θ → one streaming pass
(reconstruction, firings, per-block sums) → pairwise statistics (φ, matching, split candidates) →
meta FVE → ΔCE (the only stage that loads the language model) → bootstrap → report and plots.
"""

import importlib.util
import os
import time
from typing import Callable, NamedTuple, Optional

import numpy as np
from absl import logging
from tqdm import tqdm

from metasae_jax.core.errors import UserError
from metasae_jax.evaluation.config import EvalConfig  # noqa: F401  (the public name stays here too)
from metasae_jax.evaluation import (bootstrap, cooccurrence, firings, matching, plots, reconstruction, report,
                                    thresholds)
from metasae_jax.evaluation.report import PER_SAE_KEYS, SAE_NAMES, markdown  # noqa: F401  (public names)
from metasae_jax.storage import heldout, loaded_sae
from metasae_jax.storage.store import Store, open_store


class Inputs(NamedTuple):
  """The held-out store, the run's SAEs (name -> LoadedSAE) and the tokens evaluated."""
  store: Store
  saes: dict
  num_tokens: int
  notes: list


class Streamed(NamedTuple):
  """Outputs of the one pass over the tokens, per SAE name."""
  metrics: dict        # name -> reconstruction metrics (fvu, fvu_excl_first, mse, l0, ...)
  fired: dict          # name -> firings.Firings
  blocks: dict         # name -> bootstrap.ReconBlocks
  layout: bootstrap.BlockLayout


class Pairwise(NamedTuple):
  """φ statistics per SAE, and joint-vs-solo matching (None / [] without both SAEs)."""
  phi: dict            # name -> cooccurrence.PhiStats
  matching: Optional[dict]
  candidates: list
  cosine: Optional[np.ndarray]


class DeltaCE(NamedTuple):
  """ΔCE metrics per SAE, the run-level record, and the joint-solo paired difference."""
  per_sae: dict
  info: dict
  pair: dict


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


def _forward(sae, x_BxD, firing: str):
  """The one place evaluation runs an SAE."""
  return sae.forward(x_BxD, firing)


def open_inputs(cfg: EvalConfig) -> Inputs:
  """Opens the store and the SAEs; notes where their recorded source or training rule differs."""
  store = open_store(cfg.activations)
  saes = load_saes(cfg.run_dir, store.d_model)
  num = heldout.resolve_num_tokens(store, cfg.num_tokens, cfg.skip_first_positions)
  notes = []
  for name, sae in saes.items():
    src = sae.cfg.get("source") or {}
    for key in ("model", "layer", "site"):
      if key in src and key in store.source and src[key] != store.source[key]:
        notes.append(f"{name}: cfg.json source.{key} {src[key]!r} differs from the store's {store.source[key]!r}")
    trained_skip = int(sae.cfg.get("skip_first_positions") or 0)
    if trained_skip > cfg.skip_first_positions and store.context_len > 1:
      notes.append(f"{name} was trained skipping the first {trained_skip} position(s) of every context; fvu, mse "
                   "and ΔCE here include positions it never saw (fvu_excl_first leaves position 0 out)")
  return Inputs(store, saes, num, notes)


def calibrate_stage(cfg: EvalConfig, inputs: Inputs) -> Inputs:
  """Calibrates θ of SAEs that lack it, when a threshold firing rule is used; writes θ into their artifacts."""
  if "threshold" not in (cfg.firing, cfg.ce_firing_rule):
    return inputs
  saes, notes = dict(inputs.saes), list(inputs.notes)
  for name, sae in inputs.saes.items():
    if sae.threshold_N is not None:
      continue
    logging.info("calibrating thresholds of %s", name)
    theta, record = thresholds.calibrate(
        sae, inputs.store, thresholds.CalibrationConfig(num_tokens=inputs.num_tokens, batch_size=cfg.batch_size,
                                                        skip_first_positions=cfg.skip_first_positions),
        cfg.progress)
    saes[name] = thresholds.write_into_artifact(sae, theta, record)
    notes.append(f"{name}: thresholds calibrated on these held-out tokens and written into {sae.path}")
    if not record["grid_covers_batch_thresholds"]:
      notes.append(f"{name}: batch thresholds {record['batch_threshold_range']} leave the calibration "
                   f"grid {record['bin_range']}; θ of some latents sits on the grid's edge")
  return inputs._replace(saes=saes, notes=notes)


def stream_stage(cfg: EvalConfig, inputs: Inputs) -> Streamed:
  """One pass over the evaluation tokens feeding every SAE's metrics, firing record and block sums."""
  store, saes, num = inputs.store, inputs.saes, inputs.num_tokens
  layout = bootstrap.BlockLayout(store, num, cfg.skip_first_positions, cfg.bootstrap_blocks)
  accs = {n: reconstruction.Accumulator(s.d_model, s.width) for n, s in saes.items()}
  recs = {n: firings.Recorder(s.width) for n, s in saes.items()}
  blocks = {n: bootstrap.ReconBlocks(layout, s.d_model) for n, s in saes.items()}
  for batch in tqdm(heldout.iter_batches(store, cfg.batch_size, num, cfg.skip_first_positions),
                    total=-(-num // cfg.batch_size), desc="evaluate", disable=not cfg.progress):
    for name, sae in saes.items():
      out = _forward(sae, batch.acts_BxD, cfg.firing)
      accs[name].add(batch.acts_BxD, out.recon_BxD, out.xs_BxD, out.recon_std_BxD, out.acts_BxN)
      recs[name].add(out.acts_BxN, batch.index_B)
      blocks[name].add(batch.index_B, batch.acts_BxD, out.recon_BxD, out.xs_BxD, out.recon_std_BxD)
  metrics = {}
  for n in saes:
    metrics[n] = accs[n].result()
    metrics[n]["fvu_excl_first"] = blocks[n].metrics(exclude_first=True)["fvu"]
  return Streamed(metrics, {n: recs[n].result() for n in saes}, blocks, layout)


def pairwise_stage(cfg: EvalConfig, inputs: Inputs, streamed: Streamed,
                   decode: Optional[Callable[[list], str]] = None) -> Pairwise:
  """mean |φ| per SAE; decoder matching, cross-φ and split candidates between joint and solo."""
  fired = streamed.fired
  phi = {n: cooccurrence.phi_stats(fired[n], seed=cfg.seed, progress=cfg.progress) for n in fired}
  if not ("joint" in fired and "solo" in fired):
    return Pairwise(phi, None, [], None)
  joint, solo = inputs.saes["joint"], inputs.saes["solo"]
  m = matching.match_decoders(joint.params["W_dec"], solo.params["W_dec"])
  cross = cooccurrence.cross_phi(fired["joint"], fired["solo"], threshold=cfg.split_phi_threshold,
                                 pairs_a=m.joint_idx, pairs_b=m.solo_idx, progress=cfg.progress)
  candidates = matching.split_candidates(fired["joint"], fired["solo"], cross, m, threshold=cfg.split_phi_threshold,
                                         max_candidates=cfg.max_split_candidates, store=inputs.store,
                                         decode=decode)
  pair_phi = cross.pair_phi[np.isfinite(cross.pair_phi)]
  summary = {"num_pairs": len(m.cosine), "mean_cosine": float(np.mean(m.cosine)),
             "median_cosine": float(np.median(m.cosine)),
             "fraction_cosine_above_0.9": float(np.mean(m.cosine > 0.9)),
             "mean_matched_cross_phi": float(np.mean(pair_phi)) if len(pair_phi) else None,
             "num_split_candidates_listed": len(candidates),
             "num_solo_latents_shared_by_2plus": int(np.sum(cross.num_above_S >= 2)),
             "split_phi_threshold": cfg.split_phi_threshold}
  return Pairwise(phi, summary, candidates, m.cosine)


def meta_fve_stage(cfg: EvalConfig, saes: dict) -> dict:
  """Meta FVE per SAE: variance of its decoder rows explained by a fresh small meta SAE (SAEBench)."""
  from metasae_jax.core import meta
  out = {}
  for name, sae in saes.items():
    width = max(1, int(round(cfg.meta_width_fraction * sae.width)))
    params = meta.train_meta_sae(sae.params["W_dec"], width, cfg.meta_k, cfg.meta_fve_steps, seed=cfg.seed)
    out[name] = meta.meta_fve(sae.params["W_dec"], params, cfg.meta_k)
  return out


def ce_model_name(cfg: EvalConfig, store: Store, notes: list) -> Optional[str]:
  """The model ΔCE will load, or None with a note why ΔCE is skipped (nothing is loaded here)."""
  name = cfg.model or str(store.source.get("model") or "")
  if name.lower() == "none":
    notes.append("ΔCE skipped: --model none")
    return None
  if not name:
    notes.append("ΔCE skipped: the store's source has no model; pass --model")
    return None
  if not store.has_tokens or store.context_len < 2:
    notes.append("ΔCE skipped: the store has no token contexts (tokens and context_len > 1 needed)")
    return None
  if cfg.ce_contexts == 0:
    notes.append("ΔCE skipped: --ce_contexts 0")
    return None
  if not all(importlib.util.find_spec(m) for m in ("torch", "transformers")):
    notes.append("ΔCE skipped: torch / transformers are not installed (pip install '.[lm]')")
    return None
  return name


def _load_model(name: str):
  from metasae_jax.lm import models  # torch/transformers only when ΔCE runs
  logging.info("loading %s for ΔCE", name)
  return models.load_model(name)


def _load_decode(name: Optional[str], store: Store) -> Optional[Callable[[list], str]]:
  """Token-id decoding for split-candidate contexts: the tokenizer only, never the weights.

  Loaded before the long stages, with every token id of the store checked against its vocabulary, so that a
  model ΔCE cannot load, or a store from another tokenizer, fails the run at once (UserError).
  """
  if name is None:
    return None
  from metasae_jax.lm import models, tokens
  tokenizer = models.load_tokenizer(name)
  tokens.check_ids(store, len(tokenizer), f"the tokenizer of {name}")
  return lambda ids: tokenizer.decode(ids)


def delta_ce_stage(cfg: EvalConfig, inputs: Inputs, name: str) -> DeltaCE:
  """Loads the model and measures clean / zero-ablation / spliced CE; ΔCE % ± SE per SAE."""
  from metasae_jax.lm import delta_ce, models
  store, saes = inputs.store, inputs.saes
  lm = _load_model(name)
  layer, site = store.source.get("layer"), store.source.get("site", "resid_pre")
  block = delta_ce.block_for(models.decoder_layers(lm.model), layer)
  rule = cfg.ce_firing_rule
  fns = {n: (lambda x, s=s: np.asarray(_forward(s, x, rule).recon_BxD)) for n, s in saes.items()}
  ces = delta_ce.cross_entropies(lm.model, block, site, store, fns, cfg.ce_contexts, cfg.ce_batch_contexts,
                                 cfg.skip_first_positions, cfg.progress, cfg.ce_include_first_position)
  per_sae = {n: delta_ce.summarize(ces, n) for n in saes}
  info = {"model": name, "layer": layer, "site": site, "num_contexts": ces["num_contexts"],
          "num_predictions": ces["num_predictions"], "firing": rule,
          "tokens_per_hooked_batch": cfg.ce_batch_contexts * store.context_len,
          "positions": delta_ce.positions_rule(store.context_len, cfg.skip_first_positions,
                                               cfg.ce_include_first_position),
          "resid_check_rel_err": ces["resid_check_rel_err"]}
  if ces["resid_check_rel_err"] > 0.05:
    inputs.notes.append(f"the model's live residual differs from the stored one by {ces['resid_check_rel_err']:.3g} "
                        "(relative): the store may come from another model, layer or site")
  pair = delta_ce.paired_difference(ces, "joint", "solo") if {"joint", "solo"} <= set(saes) else {}
  return DeltaCE(per_sae, info, pair)


def bootstrap_stage(cfg: EvalConfig, streamed: Streamed) -> dict:
  """Block-bootstrap intervals of the joint-vs-solo differences (comparison.bootstrap)."""
  bcfg = bootstrap.BootstrapConfig(replicates=cfg.bootstrap_replicates, num_blocks=cfg.bootstrap_blocks,
                                   seed=cfg.seed)
  block_of = lambda f: streamed.layout.block_of(f.index_T)
  pb = {n: bootstrap.phi_blocks(streamed.fired[n], block_of(streamed.fired[n]), streamed.layout.num_blocks,
                                bcfg.max_pair_entries) for n in ("joint", "solo")}
  return bootstrap.compare(streamed.blocks["joint"], streamed.blocks["solo"], pb["joint"], pb["solo"], bcfg)


def evaluate_run(cfg: EvalConfig) -> dict:
  """Evaluates the run's SAEs; writes report.json, report.md, split_candidates.json and PNGs into run_dir."""
  timings, t0 = {}, time.perf_counter()

  def timed(key, fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    timings[key] = time.perf_counter() - start
    return out

  inputs = open_inputs(cfg)
  model_name = ce_model_name(cfg, inputs.store, inputs.notes)
  decode = _load_decode(model_name, inputs.store)
  inputs = timed("thresholds_s", calibrate_stage, cfg, inputs)
  streamed = timed("reconstruction_s", stream_stage, cfg, inputs)
  per_sae = streamed.metrics
  inputs.notes.extend(report.outlier_note(per_sae, reconstruction.OUTLIER_FACTOR))
  pair = timed("phi_s", pairwise_stage, cfg, inputs, streamed, decode)
  for n in per_sae:
    per_sae[n].update(pair.phi[n].summary())
  if cfg.meta_fve_steps > 0:
    for n, fve in timed("meta_fve_s", meta_fve_stage, cfg, inputs.saes).items():
      per_sae[n]["meta_fve"] = fve
  else:
    inputs.notes.append("meta FVE skipped: --meta_fve_steps 0")
  ce = timed("delta_ce_s", delta_ce_stage, cfg, inputs, model_name) if model_name else None
  for n in per_sae:
    per_sae[n].update(ce.per_sae[n] if ce else {})
    for key in PER_SAE_KEYS:
      per_sae[n].setdefault(key, None)

  out = {"run_dir": cfg.run_dir, "activations": inputs.store.path, "num_tokens": inputs.num_tokens,
         "firing": cfg.firing, "batch_size": cfg.batch_size,
         "skip": heldout.skip_rule(inputs.store.context_len, cfg.skip_first_positions), **per_sae}
  if "joint" in per_sae and "solo" in per_sae:
    out["comparison"] = report.comparison(per_sae, cooccurrence.welch(pair.phi["joint"], pair.phi["solo"]),
                                          ce.pair if ce else {})
    out["comparison"]["bootstrap"] = (timed("bootstrap_s", bootstrap_stage, cfg, streamed)
                                      if cfg.bootstrap_replicates else {"skipped": "--bootstrap_replicates 0"})
    out["matching"] = pair.matching
    inputs.notes.extend(report.dead_gap_note(per_sae, inputs.saes["joint"].width))
  out["delta_ce"] = ce.info if ce else {"skipped": True}
  out["meta_fve_config"] = {"steps": cfg.meta_fve_steps, "width_fraction": cfg.meta_width_fraction, "k": cfg.meta_k}
  out["notes"] = inputs.notes
  out["plots"] = timed("plots_s", plots.write_all, cfg.run_dir, pair.phi, per_sae, pair.cosine, out.get("comparison"))
  timings["total_s"] = time.perf_counter() - t0
  out["timings"] = timings
  return report.write(cfg.run_dir, out, pair.candidates)
