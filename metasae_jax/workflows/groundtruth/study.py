"""The ground-truth study: synthetic stores per scenario, lockstep joint/solo training over λ₂ × seeds, a solo
Matryoshka SAE per seed, scores.

Legend: T = tokens, D = d_model, F = true features, N = SAE latents, S = steps in one compiled chunk,
B = batch.
Layout of `out_dir`:
  study.json                          the study's config (a rerun with another config is refused)
  data/<scenario>/train/              activation store (manifest.json + shards), true_features.npy,
                                      generator.json
  data/<scenario>/heldout/            held-out store + true_codes.npy (which true features are on per token)
  results/<scenario>/lam<λ₂>_seed<s>.json   scores of the joint SAE and its lockstep solo SAE
  results/<scenario>/lam<λ₂>_seed<s>.npz    their parameters (joint_W_dec, solo_W_dec, ...) for rescoring
  results/<scenario>/matryoshka_seed<s>.json/.npz   the matryoshka arm (independent of λ₂: trained once per seed)
  report.json, report.md, plots/<scenario>.png
Finished points are kept, so an interrupted study resumes where it stopped.
"""

import dataclasses
import functools
import io
import json
import os
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from metasae_jax.core import architectures, sae
from metasae_jax.core.config import TrainConfig
from metasae_jax.core.errors import UserError
from metasae_jax.core.train_step import init_train_state, train_step
from metasae_jax.storage import atomic, store
from metasae_jax.workflows.groundtruth import scenarios, scores
from metasae_jax.workflows.groundtruth.config import StudyConfig  # noqa: F401  (the study's config lives there)

STUDY = "study.json"
TRUE_FEATURES = "true_features.npy"
TRUE_CODES = "true_codes.npy"
GENERATOR = "generator.json"
CHUNK_STEPS = 100


def point_name(lambda2: float, seed: int) -> str:
  return f"lam{lambda2:g}_seed{seed}"


def matryoshka_name(seed: int) -> str:
  return f"matryoshka_seed{seed}"


def claim(config: StudyConfig) -> None:
  """Creates the study directory or checks it holds this very study; refuses anything else in one line."""
  path = os.path.join(config.out_dir, STUDY)
  ident = config.identity()
  if os.path.exists(path):
    try:
      with open(path) as f:
        old = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      raise UserError(f"{path} is unreadable ({e}); use a new --out_dir.") from None
    if old != ident:
      diff = sorted(k for k in set(old) | set(ident) if old.get(k) != ident.get(k))
      raise UserError(f"{config.out_dir} holds a ground-truth study with a different config (differs in: "
                      f"{', '.join(diff)}); use a new --out_dir or rerun with the same flags to resume.")
    return
  if os.path.isdir(config.out_dir) and os.listdir(config.out_dir):
    raise UserError(f"{config.out_dir} is not empty and holds no {STUDY}; use a new --out_dir.")
  os.makedirs(config.out_dir, exist_ok=True)
  atomic.write_json(path, ident)


def prepare_data(config: StudyConfig, name: str, sc: scenarios.ScenarioConfig) -> tuple:
  """Writes (once) the scenario's training and held-out stores with the truth beside each manifest."""
  root = os.path.join(config.out_dir, "data", name)
  train_dir, held_dir = os.path.join(root, "train"), os.path.join(root, "heldout")
  done = os.path.join(held_dir, TRUE_CODES)
  if not os.path.exists(done):
    truth = scenarios.generate(sc, config.train_tokens + config.heldout_tokens, config.data_seed)
    source = {"model": "synthetic-groundtruth", "layer": 0, "site": name, "kind": sc.kind,
              "seed": config.data_seed}
    generator = {"name": name, "params": sc.to_dict(), "seed": config.data_seed, "roles": list(truth.roles),
                 "pairs": [list(p) for p in truth.pairs],
                 "parent_of": {str(c): p for c, p in truth.parent_of.items()}}
    cut = config.train_tokens
    for path, sl in ((train_dir, slice(0, cut)), (held_dir, slice(cut, None))):
      store.write_store(path, truth.x_TxD[sl], None, context_len=1, source=source)
      atomic.save_npy(os.path.join(path, TRUE_FEATURES), truth.features_FxD)
      atomic.write_json(os.path.join(path, GENERATOR), generator)
    # Written last: its presence marks the scenario's data as complete.
    atomic.save_npy(done, truth.codes_TxF[cut:])
  return store.open_store(train_dir), store.open_store(held_dir)


def _read_store(s: store.Store) -> np.ndarray:
  return s.read_acts(0, s.num_tokens)


@functools.partial(jax.jit, donate_argnums=0)
def _train_chunk(state, batches_SxBxD):
  def body(s, batch_BxD):
    s, m = train_step(s, batch_BxD)
    return s, jnp.stack([m[key] for key in sorted(m) if key.endswith("/loss")])
  return jax.lax.scan(body, state, batches_SxBxD)


def train_pair(tc: TrainConfig, x_TxD: np.ndarray, steps: int, on_chunk: Callable[[int], None] = lambda n: None):
  """Trains a joint SAE (+ meta SAE) and, with tc.baseline, its lockstep solo SAE on shuffled passes over x.

  The batch order depends on the seed only, so every arm of a seed sees the same batches. Returns the state.
  """
  rng = np.random.default_rng(tc.seed + 1_000_003)
  # The seed only matters for the init; the config is static in the jitted step, so every seed shares one
  # compiled program once the state carries the seed-0 config.
  state = init_train_state(tc).replace(config=dataclasses.replace(tc, seed=0))
  order = np.empty(0, np.int64)
  done = 0
  while done < steps:
    s = min(CHUNK_STEPS, steps - done)
    need = s * tc.batch_size
    while order.size < need:
      order = np.concatenate([order, rng.permutation(x_TxD.shape[0])])
    idx, order = order[:need], order[need:]
    state, losses_SxA = _train_chunk(state, jnp.asarray(x_TxD[idx].reshape(s, tc.batch_size, -1)))
    done += s
    on_chunk(s)
  last = np.asarray(losses_SxA[-1])
  if not np.all(np.isfinite(last)):
    raise UserError(f"training diverged (loss {last.tolist()} at step {steps}) for {tc.architecture}, "
                    f"λ₂ = {tc.lambda2}, seed {tc.seed}; lower the learning rate (--lr).")
  return state


@functools.partial(jax.jit, static_argnames=("k", "rule"))
def _encode(params, x_BxD, k, rule):
  out = sae.forward(params, x_BxD, k, rule)
  return out.acts_BxN > 0, jnp.sum((out.recon_std_BxD - out.xs_BxD) ** 2)


def fire(params: dict, x_TxD: np.ndarray, k: int, batch_size: int, architecture: str = "batchtopk") -> tuple:
  """Firings on held-out tokens by the training rule (per batch of batch_size) and the MSE of the full
  reconstruction. The rule is the architecture's inference rule: a Matryoshka BatchTopK SAE fires by BatchTopK
  over all latents, as in training (one selection over all latents; only its loss looks at prefixes)."""
  rule = architectures.get(architecture).firing(params)["activation"]
  fired, sq = [], 0.0
  usable = (x_TxD.shape[0] // batch_size) * batch_size
  for s in range(0, usable, batch_size):
    f, e = _encode(params, jnp.asarray(x_TxD[s:s + batch_size]), k, rule)
    fired.append(np.asarray(f))
    sq += float(e)
  return np.concatenate(fired), sq / (usable * x_TxD.shape[1]), usable


def _save_params(path: Optional[str], saved: dict) -> None:
  if path:
    buf = io.BytesIO()
    np.savez(buf, **saved)
    atomic.write_bytes(path, buf.getvalue())


def _score_arms(tc: TrainConfig, arms, x_held, on_held, truth_std, generator, result: dict) -> dict:
  """Scores each (name, SAEState) against the truth into `result`; returns their parameters by name."""
  pairs = [tuple(p) for p in generator["pairs"]]
  parent_of = {int(c): p for c, p in generator["parent_of"].items()}
  saved = {}
  for which, s in arms:
    params = jax.device_get(s.params)
    saved.update({f"{which}_{key}": np.asarray(v) for key, v in params.items()})
    fired, mse, usable = fire(params, x_held, tc.k, tc.batch_size, tc.architecture)
    result[which] = scores.score(params["W_dec"], fired, truth_std, on_held[:usable], pairs, parent_of, mse)
  return saved


def run_point(config: StudyConfig, name: str, x_train, x_held, on_held, truth_std, generator, lambda2, seed,
              on_chunk=lambda n: None, params_path: Optional[str] = None) -> dict:
  """Trains one (scenario, λ₂, seed) point and scores its joint and solo SAEs (saving their params)."""
  tc = config.train_config(lambda2, seed, x_train.shape[1])
  state = train_pair(tc, x_train, config.steps, on_chunk)
  result = {"scenario": name, "lambda2": float(lambda2), "seed": int(seed)}
  saved = _score_arms(tc, (("joint", state.joint), ("solo", state.solo)), x_held, on_held, truth_std, generator,
                      result)
  _save_params(params_path, saved)
  return result


def run_matryoshka(config: StudyConfig, name: str, x_train, x_held, on_held, truth_std, generator, seed,
                   on_chunk=lambda n: None, params_path: Optional[str] = None) -> dict:
  """Trains the seed's solo Matryoshka BatchTopK SAE (same width, k, init seed and batches as the solo SAE of
  every point of that seed; no meta SAE penalty) and scores it like the other arms."""
  tc = config.train_config(0.0, seed, x_train.shape[1], arm="matryoshka")
  state = train_pair(tc, x_train, config.steps, on_chunk)
  trained = state.config
  result = {"scenario": name, "arm": "matryoshka", "seed": int(seed),
            "train": {"architecture": trained.architecture, "matryoshka_widths": list(trained.matryoshka_widths),
                      "width": trained.width, "k": trained.k, "lambda2": trained.lambda2}}
  saved = _score_arms(tc, (("matryoshka", state.joint),), x_held, on_held, truth_std, generator, result)
  _save_params(params_path, saved)
  return result


def _load_or_run(path: str, bar, steps: int, run) -> dict:
  if os.path.exists(path):
    with open(path) as f:
      bar.update(steps)
      return json.load(f)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  result = run(path[:-len(".json")] + ".npz")
  atomic.write_json(path, result)
  return result


def run_study(config: StudyConfig, progress: bool = True) -> dict:
  """Runs (or resumes) every point, then writes report.json, report.md and the plots. Returns the report."""
  from metasae_jax.workflows.groundtruth import report  # the report module imports matplotlib; load it late
  claim(config)
  runs_per_scenario = (len(config.lambda2s) + ("matryoshka" in config.arms())) * config.seeds
  bar = tqdm(total=len(config.scenarios) * runs_per_scenario * config.steps, desc="ground truth", unit="step",
             disable=not progress)
  results = []
  for name, sc in config.scenarios:
    train_store, held_store = prepare_data(config, name, sc)
    x_train, x_held = _read_store(train_store), _read_store(held_store)
    on_held = np.load(os.path.join(held_store.path, TRUE_CODES)) > 0
    truth_std = scenarios.standardized_directions(np.load(os.path.join(train_store.path, TRUE_FEATURES)))
    with open(os.path.join(train_store.path, GENERATOR)) as f:
      generator = json.load(f)
    data = (x_train, x_held, on_held, truth_std, generator)
    results_dir = os.path.join(config.out_dir, "results", name)
    for lam in config.lambda2s:
      for seed in range(config.seeds):
        bar.set_postfix_str(f"{name} λ₂={lam:g} seed={seed}")
        results.append(_load_or_run(
            os.path.join(results_dir, point_name(lam, seed) + ".json"), bar, config.steps,
            lambda p, lam=lam, seed=seed: run_point(config, name, *data, lam, seed, bar.update, params_path=p)))
    if "matryoshka" in config.arms():
      for seed in range(config.seeds):
        bar.set_postfix_str(f"{name} matryoshka seed={seed}")
        results.append(_load_or_run(
            os.path.join(results_dir, matryoshka_name(seed) + ".json"), bar, config.steps,
            lambda p, seed=seed: run_matryoshka(config, name, *data, seed, bar.update, params_path=p)))
  bar.close()
  return report.write_report(config, results)
