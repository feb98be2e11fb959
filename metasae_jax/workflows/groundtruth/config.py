"""The ground-truth study's configuration: its own choices plus one nested set of TrainConfig overrides.

JAX-free, so the binary checks a study before JAX loads. Every SAE hyperparameter has exactly one default,
TrainConfig's; the study's small-scale choices (k 3, lr 1e-3, ...) are the config file
experiments/configs/groundtruth.py, not defaults here.
"""

import dataclasses
import json
import math
from typing import Mapping

from metasae_jax.core.config import TrainConfig
from metasae_jax.core.errors import UserError
from metasae_jax.workflows import matryoshka_arm
from metasae_jax.workflows.groundtruth import scenarios

PER_ARM = ("d_model", "lambda2", "seed", "baseline", "architecture", "matryoshka_widths")
"""TrainConfig fields the study sets itself, per scenario, point and arm; `train` may not hold them."""
WIDTH_PER_SCALE = 64
"""SAE latents per unit of `scale` when `train` gives no width."""


def _train_fields() -> set:
  return {f.name for f in dataclasses.fields(TrainConfig)}


@dataclasses.dataclass(frozen=True, kw_only=True)
class StudyConfig:
  """A ground-truth study: scenarios x λ₂ x seeds; at each point a joint SAE and its lockstep solo SAE, and
  per seed a solo Matryoshka BatchTopK SAE at the same width and k (the matryoshka arm)."""

  out_dir: str
  """Study directory (see study.py for its layout)."""
  train: Mapping = dataclasses.field(default_factory=dict)
  """TrainConfig fields shared by every arm (k, lr, batch_size, meta_k, aux_k, sigma_sq, penalty_grad, ...);
  a field left out keeps TrainConfig's default. `width` left out means 64 * scale. The study sets
  d_model (the scenario's), lambda2 and seed (per point), baseline, architecture and matryoshka_widths (per
  arm) itself. experiments/configs/groundtruth.py holds the published study's choices."""
  scenarios: tuple = ()
  """(name, ScenarioConfig) pairs; empty means the five defaults at `scale`."""
  scale: int = 1
  """Multiplies d_model, feature counts, SAE width and steps of the defaults (1 = minutes on 2 cores)."""
  lambda2s: tuple = (0.0, 0.3, 1.0)
  """Penalty weights; 0 is the control (joint and solo then train identically: their difference must be 0)."""
  seeds: int = 3
  """Seeds per point (init and batch order; the data set of a scenario is fixed by `data_seed`)."""
  steps: int = 0
  """Training steps per SAE; 0 means 1500 * scale."""
  matryoshka_fractions: tuple = matryoshka_arm.DEFAULT_FRACTIONS
  """The matryoshka arm's nested prefix widths as fractions of the width (the full width is the last prefix);
  empty: no matryoshka arm."""
  train_tokens: int = 32768
  """Tokens in each scenario's training store (cycled, reshuffled every pass)."""
  heldout_tokens: int = 8192
  """Tokens in each scenario's held-out store, on which every score is computed."""
  data_seed: int = 0
  """Seed of every scenario's feature directions and tokens."""

  def __post_init__(self):
    train = dict(self.train)
    bad = sorted(set(train) - _train_fields())
    if bad:
      raise UserError(f"invalid ground-truth study: train has no field(s) {', '.join(bad)} (TrainConfig's "
                      f"fields: {', '.join(sorted(_train_fields() - set(PER_ARM)))}).")
    fixed = sorted(set(train) & set(PER_ARM))
    if fixed:
      raise UserError(f"invalid ground-truth study: the study sets {', '.join(fixed)} itself (per scenario, "
                      "point or arm); remove it from train.")
    if not train.get("width"):
      train["width"] = WIDTH_PER_SCALE * self.scale
    object.__setattr__(self, "train", train)
    object.__setattr__(self, "matryoshka_fractions", tuple(float(f) for f in self.matryoshka_fractions))
    object.__setattr__(self, "lambda2s", tuple(float(v) for v in self.lambda2s))
    if not self.scenarios:
      object.__setattr__(self, "scenarios", tuple(scenarios.defaults(self.scale).items()))
    if self.steps == 0:
      object.__setattr__(self, "steps", 1500 * self.scale)
    fr = self.matryoshka_fractions
    checks = [
        (self.scale >= 1, f"scale must be >= 1, got {self.scale}"),
        (self.seeds >= 2, f"seeds must be >= 2 for a paired interval, got {self.seeds}"),
        (len(self.lambda2s) > 0 and all(math.isfinite(v) and v >= 0 for v in self.lambda2s),
         f"lambda2 values must be >= 0, got {list(self.lambda2s)}"),
        (len(set(self.lambda2s)) == len(self.lambda2s), f"lambda2 values repeat: {list(self.lambda2s)}"),
        (self.steps > 0, "steps must be positive"),
        (not matryoshka_arm.check_fractions(fr), matryoshka_arm.check_fractions(fr)),
        (len({n for n, _ in self.scenarios}) == len(self.scenarios), "scenario names repeat"),
    ]
    for ok, message in checks:
      if not ok:
        raise UserError(f"invalid ground-truth study: {message}.")
    tc = self.train_config(0.0, 0, self.scenarios[0][1].d_model)  # validates the SAE settings once
    if self.heldout_tokens < tc.batch_size or self.train_tokens < tc.batch_size:
      raise UserError(f"invalid ground-truth study: heldout_tokens and train_tokens must each be at least one "
                      f"batch ({tc.batch_size}).")
    for name, sc in self.scenarios:
      if sc.kind == "superposition" and sc.num_true_features <= tc.width:
        raise UserError(f"scenario {name}: superposition needs more true features ({sc.num_true_features}) "
                        f"than SAE latents ({tc.width}); raise num_features or lower the width.")
    if self.matryoshka_fractions:
      self.train_config(0.0, 0, self.scenarios[0][1].d_model, arm="matryoshka")

  @property
  def width(self) -> int:
    return self.train["width"]

  def arms(self) -> tuple:
    """The SAEs a study trains: joint and solo at every point, matryoshka once per (scenario, seed)."""
    return ("joint", "solo", "matryoshka") if self.matryoshka_fractions else ("joint", "solo")

  def matryoshka_widths(self) -> tuple:
    """The matryoshka arm's prefix widths, rounded to whole latents (TrainConfig appends the full width)."""
    return matryoshka_arm.prefix_widths(self.width, self.matryoshka_fractions)

  def train_config(self, lambda2: float, seed: int, d_model: int, arm: str = "pair") -> TrainConfig:
    """"pair": the joint SAE (+ meta SAE, penalty λ₂) and its lockstep solo twin; "matryoshka": a solo
    Matryoshka BatchTopK SAE with the same shared settings (no penalty, no twin)."""
    try:
      if arm == "matryoshka":
        return TrainConfig(d_model=d_model, **matryoshka_arm.train_fields(self.train, self.matryoshka_fractions,
                                                                         seed))
      return TrainConfig(d_model=d_model, lambda2=lambda2, seed=seed, baseline=True, **self.train)
    except UserError as e:
      raise UserError(f"invalid ground-truth study ({arm} arm): {e}") from None

  def shared_train(self) -> dict:
    """Every TrainConfig field the arms share, resolved (defaults filled in)."""
    tc = self.train_config(0.0, 0, self.scenarios[0][1].d_model)
    return {k: v for k, v in tc.to_dict().items() if k not in PER_ARM}

  def identity(self) -> dict:
    """Everything that decides the results (not where they go)."""
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("out_dir", "train")}
    d["train"] = self.shared_train()
    d["scenarios"] = {name: sc.to_dict() for name, sc in self.scenarios}
    return json.loads(json.dumps(d))
