"""The ground-truth study: synthetic stores per scenario, lockstep joint/solo training over λ₂ × seeds, scores.

Legend: T = tokens, D = d_model, F = true features, N = SAE latents, S = steps in one compiled chunk,
B = batch.
Layout of `out_dir`:
  study.json                          the study's config (a rerun with another config is refused)
  data/<scenario>/train/              activation store (manifest.json + shards), true_features.npy,
                                      generator.json
  data/<scenario>/heldout/            held-out store + true_codes.npy (which true features are on per token)
  results/<scenario>/lam<λ₂>_seed<s>.json   scores of the joint SAE and its lockstep solo SAE
  results/<scenario>/lam<λ₂>_seed<s>.npz    their parameters (joint_W_dec, solo_W_dec, ...) for rescoring
  report.json, report.md, plots/<scenario>.png
Finished points are kept, so an interrupted study resumes where it stopped.
"""

import dataclasses
import functools
import io
import json
import math
import os
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from metasae_jax.core import sae
from metasae_jax.core.config import TrainConfig
from metasae_jax.core.errors import UserError
from metasae_jax.core.train_step import init_train_state, train_step
from metasae_jax.storage import atomic, store
from metasae_jax.workflows.groundtruth import scenarios, scores

STUDY = "study.json"
TRUE_FEATURES = "true_features.npy"
TRUE_CODES = "true_codes.npy"
GENERATOR = "generator.json"
CHUNK_STEPS = 100


@dataclasses.dataclass(frozen=True, kw_only=True)
class StudyConfig:
  """A ground-truth study: scenarios x λ₂ x seeds, each point a joint SAE and its lockstep solo SAE."""

  out_dir: str
  """Study directory (see the module docstring for its layout)."""
  scenarios: tuple = ()
  """(name, ScenarioConfig) pairs; empty means the five defaults at `scale`."""
  scale: int = 1
  """Multiplies d_model, feature counts, SAE width and steps of the defaults (1 = a few minutes on 2 cores)."""
  lambda2s: tuple = (0.0, 0.3, 1.0)
  """Penalty weights; 0 is the control (joint and solo then train identically: their difference must be 0)."""
  seeds: int = 3
  """Seeds per point (init and batch order; the data set of a scenario is fixed by `data_seed`)."""
  width: int = 0
  """SAE latents N; 0 means 64 * scale."""
  k: int = 3
  """Mean active latents per token (BatchTopK); the default scenarios fire 2.9-3.6 true features per token."""
  meta_width: int = 0
  """Meta SAE latents; 0 means the paper's ratio, round(width · 1800 / 20480)."""
  meta_k: int = 2
  """Active meta latents per decoder row (the paper's 8 needs a wider meta SAE than round(64 · 1800 / 20480) = 6)."""
  sigma_sq: float = 1.0
  """Penalty bandwidth σ² (paper's selected value)."""
  penalty_grad: str = "stop"
  """"stop" (the paper) or "through" (gradients flow through the frozen meta SAE)."""
  auxk_detach: Optional[bool] = None
  """AuxK target detached or not; None keeps TrainConfig's default. PASS-THROUGH: forwarded to
  TrainConfig.auxk_detach only if this TrainConfig has that field (another branch adds it)."""
  n_primary_steps: int = 10
  """Primary steps between meta phases (paper text)."""
  n_meta_steps: int = 5
  """Meta steps per phase (paper text)."""
  steps: int = 0
  """Training steps per SAE; 0 means 1500 * scale."""
  batch_size: int = 256
  """Tokens per batch."""
  lr: float = 1e-3
  """Adam learning rate (higher than the paper's 3e-4 so that the small default study converges in minutes)."""
  aux_k: int = 32
  """Dead latents per token in AuxK (the paper's 512 exceeds these widths)."""
  train_tokens: int = 32768
  """Tokens in each scenario's training store (cycled, reshuffled every pass)."""
  heldout_tokens: int = 8192
  """Tokens in each scenario's held-out store, on which every score is computed."""
  data_seed: int = 0
  """Seed of every scenario's feature directions and tokens."""

  def __post_init__(self):
    if not self.scenarios:
      object.__setattr__(self, "scenarios", tuple(scenarios.defaults(self.scale).items()))
    if self.width == 0:
      object.__setattr__(self, "width", 64 * self.scale)
    if self.steps == 0:
      object.__setattr__(self, "steps", 1500 * self.scale)
    checks = [
        (self.scale >= 1, f"scale must be >= 1, got {self.scale}"),
        (self.seeds >= 2, f"seeds must be >= 2 for a paired interval, got {self.seeds}"),
        (len(self.lambda2s) > 0 and all(math.isfinite(v) and v >= 0 for v in self.lambda2s),
         f"lambda2 values must be >= 0, got {list(self.lambda2s)}"),
        (len(set(self.lambda2s)) == len(self.lambda2s), f"lambda2 values repeat: {list(self.lambda2s)}"),
        (self.steps > 0 and self.batch_size > 0, "steps and batch_size must be positive"),
        (self.heldout_tokens >= self.batch_size, "heldout_tokens must be at least one batch"),
        (self.train_tokens >= self.batch_size, "train_tokens must be at least one batch"),
        (len({n for n, _ in self.scenarios}) == len(self.scenarios), "scenario names repeat"),
    ]
    for ok, message in checks:
      if not ok:
        raise UserError(f"invalid ground-truth study: {message}.")
    for name, sc in self.scenarios:
      if sc.kind == "superposition" and sc.num_true_features <= self.width:
        raise UserError(f"scenario {name}: superposition needs more true features ({sc.num_true_features}) "
                        f"than SAE latents ({self.width}); raise num_features or lower --width.")
    self.train_config(0.0, 0, self.scenarios[0][1].d_model)  # validates the SAE settings once

  def train_config(self, lambda2: float, seed: int, d_model: int) -> TrainConfig:
    kwargs = dict(d_model=d_model, width=self.width, k=self.k, meta_width=self.meta_width, meta_k=self.meta_k,
                  lambda2=lambda2, sigma_sq=self.sigma_sq, penalty_grad=self.penalty_grad,
                  n_primary_steps=self.n_primary_steps, n_meta_steps=self.n_meta_steps,
                  batch_size=self.batch_size, lr=self.lr, aux_k=self.aux_k, seed=seed, baseline=True)
    # PASS-THROUGH for the detached/undetached AuxK variant: TrainConfig gains `auxk_detach` on another
    # branch; until then only the default (None) is accepted.
    if self.auxk_detach is not None:
      if "auxk_detach" not in {f.name for f in dataclasses.fields(TrainConfig)}:
        raise UserError("--auxk_detach needs a TrainConfig with an auxk_detach field (not in this version); "
                        "leave it unset.")
      kwargs["auxk_detach"] = self.auxk_detach
    return TrainConfig(**kwargs)

  def identity(self) -> dict:
    """Everything that decides the results (not where they go)."""
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "out_dir"}
    d["scenarios"] = {name: sc.to_dict() for name, sc in self.scenarios}
    d["lambda2s"] = [float(v) for v in self.lambda2s]
    return json.loads(json.dumps(d))


def point_name(lambda2: float, seed: int) -> str:
  return f"lam{lambda2:g}_seed{seed}"


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
    return s, jnp.stack([m["joint/loss"], m["solo/loss"]])
  return jax.lax.scan(body, state, batches_SxBxD)


def train_pair(tc: TrainConfig, x_TxD: np.ndarray, steps: int, on_chunk: Callable[[int], None] = lambda n: None):
  """Trains a joint SAE (+ meta SAE) and its lockstep solo SAE on shuffled passes over x; returns the state."""
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
    state, losses_Sx2 = _train_chunk(state, jnp.asarray(x_TxD[idx].reshape(s, tc.batch_size, -1)))
    done += s
    on_chunk(s)
  last = np.asarray(losses_Sx2[-1])
  if not np.all(np.isfinite(last)):
    raise UserError(f"training diverged (loss {last.tolist()} at step {steps}) for λ₂ = {tc.lambda2}, "
                    f"seed {tc.seed}; lower --lr.")
  return state


@functools.partial(jax.jit, static_argnames=("k",))
def _encode(params, x_BxD, k):
  out = sae.forward(params, x_BxD, k, "batchtopk")
  return out.acts_BxN > 0, jnp.sum((out.recon_std_BxD - out.xs_BxD) ** 2)


def fire(params: dict, x_TxD: np.ndarray, k: int, batch_size: int) -> tuple:
  """Firings on held-out tokens by the training rule (BatchTopK per batch of batch_size) and the MSE."""
  fired, sq = [], 0.0
  usable = (x_TxD.shape[0] // batch_size) * batch_size
  for s in range(0, usable, batch_size):
    f, e = _encode(params, jnp.asarray(x_TxD[s:s + batch_size]), k)
    fired.append(np.asarray(f))
    sq += float(e)
  return np.concatenate(fired), sq / (usable * x_TxD.shape[1]), usable


def run_point(config: StudyConfig, name: str, x_train, x_held, on_held, truth_std, generator, lambda2, seed,
              on_chunk=lambda n: None, params_path: Optional[str] = None) -> dict:
  """Trains one (scenario, λ₂, seed) point and scores its joint and solo SAEs (saving their params)."""
  tc = config.train_config(lambda2, seed, x_train.shape[1])
  state = train_pair(tc, x_train, config.steps, on_chunk)
  result = {"scenario": name, "lambda2": float(lambda2), "seed": int(seed)}
  pairs = [tuple(p) for p in generator["pairs"]]
  parent_of = {int(c): p for c, p in generator["parent_of"].items()}
  saved = {}
  for which, s in (("joint", state.joint), ("solo", state.solo)):
    params = jax.device_get(s.params)
    saved.update({f"{which}_{key}": np.asarray(v) for key, v in params.items()})
    fired, mse, usable = fire(params, x_held, tc.k, tc.batch_size)
    result[which] = scores.score(params["W_dec"], fired, truth_std, on_held[:usable], pairs, parent_of, mse)
  if params_path:
    buf = io.BytesIO()
    np.savez(buf, **saved)
    atomic.write_bytes(params_path, buf.getvalue())
  return result


def run_study(config: StudyConfig, progress: bool = True) -> dict:
  """Runs (or resumes) every point, then writes report.json, report.md and the plots. Returns the report."""
  from metasae_jax.workflows.groundtruth import report  # the report module imports matplotlib; load it late
  claim(config)
  total_runs = len(config.scenarios) * len(config.lambda2s) * config.seeds
  bar = tqdm(total=total_runs * config.steps, desc="ground truth", unit="step", disable=not progress)
  results = []
  for name, sc in config.scenarios:
    train_store, held_store = prepare_data(config, name, sc)
    x_train, x_held = _read_store(train_store), _read_store(held_store)
    on_held = np.load(os.path.join(held_store.path, TRUE_CODES)) > 0
    truth_std = scenarios.standardized_directions(np.load(os.path.join(train_store.path, TRUE_FEATURES)))
    with open(os.path.join(train_store.path, GENERATOR)) as f:
      generator = json.load(f)
    for lam in config.lambda2s:
      for seed in range(config.seeds):
        path = os.path.join(config.out_dir, "results", name, point_name(lam, seed) + ".json")
        bar.set_postfix_str(f"{name} λ₂={lam:g} seed={seed}")
        if os.path.exists(path):
          with open(path) as f:
            results.append(json.load(f))
          bar.update(config.steps)
          continue
        os.makedirs(os.path.dirname(path), exist_ok=True)
        result = run_point(config, name, x_train, x_held, on_held, truth_std, generator, lam, seed, bar.update,
                           params_path=path[:-len(".json")] + ".npz")
        atomic.write_json(path, result)
        results.append(result)
  bar.close()
  return report.write_report(config, results)
