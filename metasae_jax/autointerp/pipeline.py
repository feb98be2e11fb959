"""The autointerp run: stream the store through joint and solo SAEs, pick matched pairs, explain, score, report.

Legend: P = pairs, C = tracked latents, E = examples.
"""

import dataclasses
import logging
import os
import time
from typing import Optional

import numpy as np
from tqdm import tqdm

from metasae_jax.storage import artifact, atomic
from metasae_jax.evaluation import examples as ex
from metasae_jax.autointerp import prompts, report, scorers, selection
from metasae_jax.autointerp.backends import Backend, BackendError, LocalBackend, make_backend
from metasae_jax.autointerp.cache import CachedBackend
from metasae_jax.autointerp.config import AutointerpConfig
from metasae_jax.evaluation.encoder import StreamEncoder
from metasae_jax.storage.loaded_sae import load_sae
from metasae_jax.storage.positions import KeptTokens
from metasae_jax.lm.tokens import Detokenizer
from metasae_jax.core.errors import UserError
from metasae_jax.storage.store import open_store

log = logging.getLogger(__name__)

SAES = artifact.SAE_NAMES
# Random windows drawn once as candidate non-activating contexts, per needed negative.
NEGATIVE_POOL_FACTOR = 8


@dataclasses.dataclass
class LatentExamples:
  """Everything the LLM sees about one latent."""
  sae: str
  latent: int
  num_fired: int
  max_act: float
  explain: list
  held_out: list
  negatives: list


def run_autointerp(cfg: AutointerpConfig, backend: Optional[Backend] = None) -> dict:
  """Runs the whole pipeline; writes run_dir/autointerp/{scores.json, explanations.md}; returns the scores."""
  t0 = time.time()
  out_dir = os.path.join(cfg.run_dir, "autointerp")
  encoders = [StreamEncoder(load_sae(os.path.join(cfg.run_dir, name))) for name in SAES]
  store = open_store(cfg.activations, require_tokens=True)
  for name, enc in zip(SAES, encoders):
    if enc.sae.d_model != store.d_model:
      raise UserError(f"SAE {enc.sae.path} has d_model {enc.sae.d_model} but store {cfg.activations} has "
                      f"{store.d_model}. Pass a store exported from the SAE's model and layer.")
  _warn_source_mismatch(encoders[0].sae.cfg.get("source"), store.source, cfg.activations)
  kept = KeptTokens(store, cfg.skip_first_positions)
  num_kept = kept.num_kept if cfg.num_tokens == 0 else min(cfg.num_tokens, kept.num_kept)
  if num_kept < cfg.num_tokens:
    log.warning("store %s holds only %d tokens after skipping; using all of them", cfg.activations,
                num_kept)
  if num_kept == 0:
    raise UserError(f"store {cfg.activations} has no tokens left after skipping the first "
                    f"{kept.skip} positions of each context.")

  pairs_Px2 = selection.match_pairs(encoders[0].sae.W_dec, encoders[1].sae.W_dec)
  cands_Cx2 = selection.candidate_pairs(pairs_Px2, cfg.num_latents, cfg.candidate_factor, cfg.seed)
  with tqdm(total=num_kept, desc="autointerp: encode", unit="tok", disable=not cfg.progress) as bar:
    pools = ex.stream(store, kept, encoders, [cands_Cx2[:, 0], cands_Cx2[:, 1]], num_kept,
                      cfg.batch_size, cfg.pool_top, cfg.pool_random, cfg.seed, bar.update)
  chosen = selection.choose(cands_Cx2, pools[0].count_N, pools[1].count_N, cfg.min_examples,
                            cfg.num_latents)
  if len(chosen) == 0:
    raise UserError(f"no matched pair among {len(cands_Cx2)} tracked has both latents firing at least "
                    f"{cfg.min_examples} times in {num_kept} tokens. Raise --num_tokens or lower "
                    "--max_examples / --num_score.")
  if len(chosen) < cfg.num_latents:
    log.warning("only %d of %d requested pairs have enough firing examples", len(chosen), cfg.num_latents)

  rng = np.random.default_rng(cfg.seed)
  neg_ranks = rng.choice(num_kept, size=min(num_kept, NEGATIVE_POOL_FACTOR * cfg.num_negative),
                         replace=False)
  neg_ends = kept.kept_to_global(np.sort(neg_ranks))
  per_sae = [_collect(store, kept, cfg, enc, pool, chosen, i, neg_ends, rng, name)
             for i, (name, enc, pool) in enumerate(zip(SAES, encoders, pools))]

  detok = Detokenizer.for_source(cfg.tokenizer or store.source.get("model"), backend)
  llm = CachedBackend(backend or make_backend(cfg.llm, cfg.timeout_s, cfg.retries),
                      os.path.join(out_dir, "cache"))
  calls = sum(1 + 2 * (len(lat.held_out) + len(lat.negatives)) for lats in per_sae for lat in lats)
  results = {name: [] for name in SAES}
  cos = _pair_cosines(encoders, cands_Cx2[chosen])
  with tqdm(total=calls, desc="autointerp: llm", unit="prompt", disable=not cfg.progress) as bar:
    for j in range(len(chosen)):
      for name, lat_exs in zip(SAES, per_sae):
        scored = _explain_and_score(llm, cfg, lat_exs[j], detok, rng, bar)
        scored["pair_cosine"] = float(cos[j])
        results[name].append(scored)

  scores = {
      "llm": llm.name,
      "activations": os.path.abspath(cfg.activations),
      "num_tokens": int(num_kept),
      "skip_first_positions": kept.skip,
      "firing_rule": {name: enc.rule for name, enc in zip(SAES, encoders)},
      "joint": report.sae_summary(results["joint"]),
      "solo": report.sae_summary(results["solo"]),
      "paired": report.paired(results["joint"], results["solo"]),
      "llm_requests": llm.requests,
      "llm_cache_hits": llm.hits,
      "seconds": round(time.time() - t0, 1),
      "config": dataclasses.asdict(cfg),
  }
  atomic.write_json(os.path.join(out_dir, "scores.json"), scores)
  atomic.write_text(os.path.join(out_dir, "explanations.md"), report.explanations_markdown(scores))
  log.info("autointerp: %d pairs scored in %.1f s (%d LLM requests, %d cached)", len(chosen),
           time.time() - t0, llm.requests, llm.hits)
  return scores


def _collect(store, kept, cfg, enc, pools, chosen, i, neg_ends, rng, name) -> list:
  """Examples (explainer, held-out, non-activating) for the chosen latents of one SAE."""
  cols, ends = [], []
  info = []
  for c in chosen:
    rank_P, val_P = pools.pool(int(c))
    explain = ex.sample_top_heavy(len(rank_P), cfg.max_examples, cfg.quantiles, rng)
    held = ex.sample_top_heavy(len(rank_P), cfg.num_score, cfg.quantiles, rng, exclude=explain)
    latent = int(pools.cand_C[c])
    for sel in (explain, held):
      cols.append(latent)
      ends.append(kept.kept_to_global(rank_P[sel]))
    cols.append(latent)
    ends.append(neg_ends)
    info.append((latent, int(pools.count_N[latent]), float(pools.top_val_CxK[c].max())))
  windows = ex.window_examples(store, kept, enc, pools, np.asarray(cols), ends, cfg.window)
  out = []
  for j, (latent, fired, max_act) in enumerate(info):
    explain, held, negs = windows[3 * j:3 * j + 3]
    # Prefer windows where the latent is silent throughout; for frequent latents fall back to
    # windows silent at their last token, fewest firing tokens first.
    silent = sorted((e for e in negs if e.acts[-1] <= 0), key=lambda e: sum(a > 0 for a in e.acts))
    if sum(max(e.acts) <= 0 for e in silent[:cfg.num_negative]) < cfg.num_negative:
      log.warning("%s latent %d: fewer than %d of %d random contexts are fully non-activating", name,
                  latent, cfg.num_negative, len(negs))
    out.append(LatentExamples(name, latent, fired, max_act, explain, held, silent[:cfg.num_negative]))
  return out


def _ask(llm, messages, max_tokens, choices, what) -> Optional[object]:
  try:
    return llm.complete(messages, max_tokens, choices)
  except BackendError as e:
    log.warning("%s: request failed (%s); counted as a failed answer", what, e)
    return None


def _explain_and_score(llm, cfg, lat: LatentExamples, detok, rng, bar) -> dict:
  """One explanation, then both scorers on held-out and non-activating contexts, one example per prompt."""
  what = f"{lat.sae} latent {lat.latent}"
  failed = 0
  shown = [(detok.pieces(e.token_ids), e.acts) for e in lat.explain]
  reply = _ask(llm, prompts.explain_messages(shown, lat.max_act), cfg.explain_max_tokens, (), what)
  bar.update(1)
  explanation = prompts.parse_explanation(reply.text) if reply is not None else None
  if explanation is None:
    failed += 1
    log.warning("%s: no usable explanation in %r", what, None if reply is None else reply.text)
    explanation = "(no explanation)"

  scored = lat.held_out + lat.negatives
  actual = [e.activation for e in scored]
  predicted = []
  for e in scored:
    r = _ask(llm, prompts.strength_messages(explanation, detok.pieces(e.token_ids)),
             cfg.score_max_tokens, prompts.STRENGTHS, what)
    value = None if r is None else scorers.read_strength(r)
    if value is None:
      failed += 1
      log.warning("%s: malformed strength answer %r", what, None if r is None else r.text)
    predicted.append(value)
    bar.update(1)
  rho, defined = scorers.fuzz_spearman(predicted, actual)

  p_yes, labels = [], []
  mark_counts = [max(1, sum(a > 0 for a in e.acts)) for e in lat.held_out] or [1]
  for e, is_active in [(e, True) for e in lat.held_out] + [(e, False) for e in lat.negatives]:
    if is_active:
      marked = [a > 0 for a in e.acts]
    else:
      free = [t for t, a in enumerate(e.acts) if a <= 0]  # marks that are surely wrong
      n = min(len(free), int(rng.choice(mark_counts)))
      where = set(rng.choice(free, size=n, replace=False).tolist())
      marked = [t in where for t in range(len(e.acts))]
    r = _ask(llm, prompts.detection_messages(explanation, detok.pieces(e.token_ids), marked),
             cfg.score_max_tokens, prompts.YES_NO, what)
    value = None if r is None else scorers.read_yes(r)
    if value is None:
      failed += 1
      log.warning("%s: malformed yes/no answer %r", what, None if r is None else r.text)
    p_yes.append(value)
    labels.append(is_active)
    bar.update(1)
  return {"id": lat.latent, "explanation": explanation, "fuzz_spearman": rho,
          "fuzz_balanced_accuracy": scorers.balanced_accuracy(p_yes, labels),
          "fuzz_spearman_defined": defined, "num_fired": lat.num_fired,
          "num_held_out": len(lat.held_out), "num_negative": len(lat.negatives),
          "failed_answers": failed}


def _pair_cosines(encoders, pairs_Px2: np.ndarray) -> np.ndarray:
  a = encoders[0].sae.W_dec[pairs_Px2[:, 0]]
  b = encoders[1].sae.W_dec[pairs_Px2[:, 1]]
  return np.sum(a * b, axis=1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


def _warn_source_mismatch(sae_source, store_source, path) -> None:
  if not isinstance(sae_source, dict) or not store_source:
    return
  for key in ("model", "layer", "site"):
    if key in sae_source and key in store_source and sae_source[key] != store_source[key]:
      log.warning("store %s has %s=%r but the SAEs were trained on %s=%r", path, key, store_source[key],
                  key, sae_source[key])
