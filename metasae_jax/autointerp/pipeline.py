"""The autointerp run: stream the store through joint and solo SAEs, pick matched pairs, explain, score, report.

Legend: P = pairs, C = tracked latents, E = examples.
"""

import dataclasses
import os
import sys
import time
from typing import Optional

import numpy as np
from tqdm import tqdm

from absl import logging as log

from metasae_jax.storage import artifact, atomic
from metasae_jax.evaluation import examples as ex
from metasae_jax.autointerp import prompts, report, runner, scorers, selection
from metasae_jax.autointerp.backends import Backend, LocalBackend, make_backend
from metasae_jax.autointerp.cache import CachedBackend
from metasae_jax.autointerp.config import SCORERS, AutointerpConfig
from metasae_jax.evaluation.encoder import StreamEncoder
from metasae_jax.storage.loaded_sae import load_sae
from metasae_jax.storage.positions import KeptTokens
from metasae_jax.lm.tokens import Detokenizer
from metasae_jax.core.errors import UserError
from metasae_jax.storage import location
from metasae_jax.storage.store import open_store


SAES = artifact.SAE_NAMES
NO_EXPLANATION = "(no explanation)"
FAILED = object()  # marks an answer whose request failed after retries (distinct from a malformed one)
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
  local = isinstance(backend, LocalBackend) if backend is not None else cfg.is_local
  cfg = cfg.resolve(local)
  if local:
    log.warning("autointerp with the in-process model %s is a pipeline check, not a meaningful explainer: "
                "a small local model writes near-random explanations and scores near chance. Point "
                "--llm_base_url/--llm_model at a strong model (docs/autointerp.md).",
                getattr(backend, "model_name", cfg.llm_spec))
    if cfg.concurrency > 1:  # one in-process model answers one prompt at a time anyway
      log.warning("--concurrency %d ignored for the in-process model", cfg.concurrency)
      cfg = dataclasses.replace(cfg, concurrency=1)
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

  # Before the long stream: the store's token ids must decode with this tokenizer.
  detok = Detokenizer.for_store(store, cfg.tokenizer or store.source.get("model"), backend)

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
  neg_ranks = rng.choice(num_kept, size=min(num_kept, NEGATIVE_POOL_FACTOR * cfg.num_negative_contexts),
                         replace=False)
  neg_ends = kept.kept_to_global(np.sort(neg_ranks))
  per_sae = _collect_pairs(store, kept, cfg, encoders, pools, chosen, neg_ends, rng)

  inner = backend or make_backend(cfg.llm_spec, cfg.timeout_s, cfg.retries, cfg.llm_api_key_env)
  llm = CachedBackend(inner, os.path.join(out_dir, "cache"))
  jobs = [lat for pair in zip(*per_sae) for lat in pair]  # ordered by pair, joint before solo
  counts = cfg.scorer_counts()
  per_latent = [sum(min(a, len(lat.held_out)) + min(n, len(lat.negatives)) for a, n in counts.values())
                for lat in jobs]
  with tqdm(total=len(jobs) + sum(per_latent), desc="autointerp: llm", unit="req", dynamic_ncols=True,
            disable=not cfg.progress) as bar:
    reqs = [runner.Request(prompts.explain_messages([(detok.pieces(e.token_ids), e.acts) for e in lat.explain],
                                                    lat.max_act), cfg.explain_max_tokens)
            for lat in jobs]
    replies = runner.run_requests(llm, reqs, cfg.concurrency, bar)
    explanations = [_explanation(lat, r) for lat, r in zip(jobs, replies)]
    # One generator per latent: its random marks do not depend on which other latents got scored.
    plans = [_score_plan(cfg, lat, expl, detok, np.random.default_rng([cfg.seed, 1, k]))
             if expl is not None else None for k, (lat, expl) in enumerate(zip(jobs, explanations))]
    skipped = sum(k for k, p in zip(per_latent, plans) if p is None)
    if skipped:
      bar.total -= skipped
      bar.refresh()
    flat = [req for plan in plans if plan is not None for _, req, _ in plan]
    answers = iter(runner.run_requests(llm, flat, cfg.concurrency, bar))
    scored = [_score(lat, expl, [(sc, next(answers), label) for sc, _, label in plan])
              if plan is not None else _unscored(lat) for lat, expl, plan in zip(jobs, explanations, plans)]

  cos = _pair_cosines(encoders, cands_Cx2[chosen])
  results = {name: [] for name in SAES}
  for k, lat in enumerate(scored):
    lat["pair_cosine"] = float(cos[k // len(SAES)])
    results[SAES[k % len(SAES)]].append(lat)
  stats = _llm_stats(llm, scored)
  asked = len(jobs) + len(flat)
  if stats["llm_failed_requests"] + stats["llm_malformed_answers"] >= asked:
    # Not one usable answer: scores.json would only hold failures; an earlier good one is left untouched.
    raise UserError(f"none of the {asked} LLM requests to {llm.name} got a usable answer "
                    f"({stats['llm_failed_requests']} failed after retries, {stats['llm_malformed_answers']} "
                    f"malformed; last: {llm.last_problem or 'answers in no format the scorers read'}). Check that "
                    "the server is up and serves /v1/chat/completions for --llm_model, then rerun the same "
                    "command; nothing was written.")
  scores = {
      "llm": llm.name,
      "activations": location.normalize(cfg.activations),
      "num_tokens": int(num_kept),
      "skip_first_positions": kept.skip,
      "firing_rule": {name: enc.rule for name, enc in zip(SAES, encoders)},
      "scorer_counts": {k: {"activating": a, "negative": n} for k, (a, n) in counts.items()},
      "joint": report.sae_summary(results["joint"]),
      "solo": report.sae_summary(results["solo"]),
      "paired": report.paired(results["joint"], results["solo"], seed=cfg.seed),
      "llm_requests": llm.requests,
      "llm_cache_hits": llm.hits,
      **stats,
      "seconds": round(time.time() - t0, 1),
      "config": dataclasses.asdict(cfg),
  }
  atomic.write_json(os.path.join(out_dir, "scores.json"), scores)
  atomic.write_text(os.path.join(out_dir, "explanations.md"), report.explanations_markdown(scores))
  report.write_report(out_dir, scores)
  summary = (f"autointerp: {len(chosen)} pairs in {time.time() - t0:.1f} s; LLM: {llm.requests} requests "
             f"sent, {llm.hits} answered from the cache, {stats['llm_retries']} retries, "
             f"{stats['llm_failed_requests']} failed after retries, {stats['llm_malformed_answers']} "
             f"malformed answers, {stats['unscored_latents']} latents unscored")
  if stats["llm_failed_requests"]:
    log.warning("%s", summary)
  elif cfg.progress:
    print(summary, file=sys.stderr, flush=True)  # stderr: the binary's stdout is JSON
  else:
    log.info("%s", summary)
  return scores


def _collect_pairs(store, kept, cfg, encoders, pools, chosen, neg_ends, rng) -> list:
  """Per SAE, the LatentExamples of each chosen pair; both latents of a pair are scored on the same contexts.

  Each latent's explainer examples come from its own pool. The held-out activating
  contexts are drawn half from each latent's pool (interleaved, never a context either
  explainer saw), and the non-activating ones are random windows silent for both, so
  the paired difference compares explanations, not context draws.
  """
  n_act, n_neg = cfg.num_activating_contexts, cfg.num_negative_contexts
  cols, ends = [[] for _ in SAES], [[] for _ in SAES]
  info = []
  for c in chosen:
    shown, held = [], []
    for i, pool in enumerate(pools):
      rank_P, _ = pool.pool(int(c))
      explain = ex.sample_top_heavy(len(rank_P), cfg.max_examples, cfg.quantiles, rng)
      rest = ex.sample_top_heavy(len(rank_P), n_act, cfg.quantiles, rng, exclude=explain)
      shown.append(kept.kept_to_global(rank_P[explain]))
      held.append(kept.kept_to_global(rank_P[rest]))
    shared = _interleave(held, set(np.concatenate(shown).tolist()), n_act)
    for i, pool in enumerate(pools):
      latent = int(pool.cand_C[c])
      for e in (shown[i], shared, neg_ends):
        cols[i].append(latent)
        ends[i].append(np.asarray(e, np.int64))
    info.append([(int(p.cand_C[c]), int(p.count_N[int(p.cand_C[c])]), float(p.top_val_CxK[c].max()))
                 for p in pools])
  windows = [ex.window_examples(store, kept, enc, pool, np.asarray(cols[i]), ends[i], cfg.window)
             for i, (enc, pool) in enumerate(zip(encoders, pools))]
  out = [[] for _ in SAES]
  for j, lat_info in enumerate(info):
    negs = [w[3 * j + 2] for w in windows]
    # Prefer windows where both latents are silent throughout; for frequent latents fall back to
    # windows silent at their last token, fewest firing tokens first.
    fires = [sum(sum(a > 0 for a in negs[i][t].acts) for i in range(len(SAES))) for t in range(len(neg_ends))]
    ok = [t for t in range(len(neg_ends)) if all(negs[i][t].acts[-1] <= 0 for i in range(len(SAES)))]
    pick = sorted(ok, key=lambda t: (fires[t], t))[:n_neg]
    if sum(fires[t] == 0 for t in pick) < n_neg:
      log.warning("pair %s: fewer than %d of %d random contexts are non-activating for both latents",
                  [l for l, _, _ in lat_info], n_neg, len(neg_ends))
    for i, (latent, fired, max_act) in enumerate(lat_info):
      explain, held = windows[i][3 * j], windows[i][3 * j + 1]
      out[i].append(LatentExamples(SAES[i], latent, fired, max_act, explain, held,
                                   [negs[i][t] for t in pick]))
  return out


def _interleave(held: list, exclude: set, n: int) -> list:
  """Alternates the pair's held-out ends (joint first), skipping repeats and explainer examples, up to n."""
  out, seen = [], set(exclude)
  for k in range(max(len(h) for h in held)):
    for h in held:
      if k < len(h) and int(h[k]) not in seen and len(out) < n:
        seen.add(int(h[k]))
        out.append(int(h[k]))
  return out


def _explanation(lat: LatentExamples, reply) -> Optional[str]:
  """The parsed explanation; "(no explanation)" for an unusable answer; None if the request itself failed."""
  if reply is None:
    log.warning("%s latent %d: explanation request failed after retries; latent unscored", lat.sae,
                lat.latent)
    return None
  explanation = prompts.parse_explanation(reply.text)
  if explanation is None:
    log.warning("%s latent %d: no usable explanation in %r", lat.sae, lat.latent, reply.text)
    return NO_EXPLANATION
  return explanation


def _score_plan(cfg, lat: LatentExamples, explanation: str, detok, rng) -> list:
  """(scorer, request, label) for every scoring prompt of one latent, built in a fixed order.

  Labels: the strength scorer's is the activation at the marked last token; the
  others' is whether the latent fires anywhere in the window. Random marks for the
  fuzzing negatives are drawn here, sequentially, so answers never depend on timing.
  """
  plan = []
  counts = cfg.scorer_counts()
  pieces = {}

  def contexts(scorer):
    a, n = counts[scorer]
    return lat.held_out[:a] + lat.negatives[:n]

  def piece(e):
    if e.end not in pieces:
      pieces[e.end] = detok.pieces(e.token_ids)
    return pieces[e.end]

  for e in contexts("strength"):
    plan.append(("strength", runner.Request(prompts.strength_messages(explanation, piece(e)),
                                            cfg.score_max_tokens, prompts.STRENGTHS), e.activation))
  mark_counts = [sum(a > 0 for a in e.acts) for e in lat.held_out if max(e.acts) > 0] or [1]
  for e in contexts("fuzz"):
    active = max(e.acts) > 0
    if active:
      marked = [a > 0 for a in e.acts]
    else:
      free = [t for t, a in enumerate(e.acts) if a <= 0]  # marks that are surely wrong
      n = min(len(free), int(rng.choice(mark_counts)))
      where = set(rng.choice(free, size=n, replace=False).tolist())
      marked = [t in where for t in range(len(e.acts))]
    plan.append(("fuzz", runner.Request(prompts.fuzz_messages(explanation, piece(e), marked),
                                        cfg.score_max_tokens, prompts.YES_NO), active))
  for e in contexts("detection"):
    plan.append(("detection", runner.Request(prompts.detection_messages(explanation, piece(e)),
                                             cfg.score_max_tokens, prompts.YES_NO), max(e.acts) > 0))
  return plan


def _base(lat: LatentExamples, explanation) -> dict:
  return {"id": lat.latent, "explanation": explanation, "num_fired": lat.num_fired,
          "num_held_out": len(lat.held_out), "num_negative": len(lat.negatives)}


def _unscored(lat: LatentExamples) -> dict:
  """A latent whose explanation request failed: no score at all (never a zero)."""
  return {**_base(lat, None), "scored": False, **{m: None for m in report.METRICS},
          "fuzz_spearman_defined": False, "failed_answers": 0, "failed_requests": 1}


def _score(lat: LatentExamples, explanation: str, answers: list) -> dict:
  """The three scores of one latent; a scorer with a request that failed after retries stays None."""
  failed = int(explanation == NO_EXPLANATION)
  failed_requests = 0
  by = {s: ([], []) for s in SCORERS}
  for scorer, reply, label in answers:
    read = scorers.read_strength if scorer == "strength" else scorers.read_yes
    if reply is None:
      failed_requests += 1
      value = FAILED
    else:
      value = read(reply)
      if value is None:  # the model answered but not in the format: counts against it (DESIGN §2)
        failed += 1
        log.debug("%s latent %d: malformed %s answer %r", lat.sae, lat.latent, scorer, reply.text)
    by[scorer][0].append(value)
    by[scorer][1].append(label)
  out = {**_base(lat, explanation), "scored": True, "fuzz_spearman_defined": False}
  for scorer, metric in zip(SCORERS, report.METRICS):
    values, labels = by[scorer]
    if any(v is FAILED for v in values):
      out[metric] = None
    elif scorer == "strength":
      out[metric], out["fuzz_spearman_defined"] = scorers.fuzz_spearman(values, labels)
    else:
      out[metric] = scorers.balanced_accuracy(values, labels)
  out["contexts"] = {sc: {"total": len(labels), "activating": int(sum(bool(x) for x in labels))
                          if sc != "strength" else int(sum(x > 0 for x in labels))}
                     for sc, (_, labels) in by.items()}
  out["scored"] = any(out[m] is not None for m in report.METRICS)
  out["failed_answers"], out["failed_requests"] = failed, failed_requests
  return out


def _llm_stats(llm: CachedBackend, scored: list) -> dict:
  stats = getattr(llm.inner, "stats", None) or {}
  return {"llm_retries": int(stats.get("retries", 0)),
          "llm_failed_requests": sum(lat["failed_requests"] for lat in scored),
          "llm_malformed_answers": sum(lat["failed_answers"] for lat in scored),
          "unscored_latents": sum(1 for lat in scored if not lat["scored"])}


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
