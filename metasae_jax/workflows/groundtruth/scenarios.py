"""Five synthetic data families whose true sparse features are known, for the ground-truth benchmark.

Legend: T = tokens, D = d_model, F = true features, N = SAE latents.
Every generator draws unit-norm feature directions `features_FxD`, a sparse
non-negative code `codes_TxF` (magnitude where a feature fires, 0 elsewhere)
and returns x = codes @ features + noise. What varies is which features fire
together; each generator's docstring states the statistics it promises, and
`tests/test_groundtruth.py` checks them numerically.
"""

import dataclasses
from typing import NamedTuple

import numpy as np

from metasae_jax.core.errors import UserError

KINDS = ("independent", "hierarchy", "blended", "composition", "superposition")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScenarioConfig:
  """One scenario's generator parameters (unused fields are ignored by kinds that do not read them)."""

  kind: str
  """One of KINDS."""
  d_model: int = 48
  """Input width D of the synthetic activations."""
  num_features: int = 48
  """Independent (filler) features; for "superposition" all features, and more than the SAE width."""
  p_fire: float = 0.06
  """Firing probability of each independent feature per token."""
  mag_low: float = 0.5
  """Smallest firing magnitude (magnitudes are uniform on [mag_low, mag_high])."""
  mag_high: float = 1.5
  """Largest firing magnitude."""
  noise: float = 0.01
  """Std of the isotropic Gaussian noise added to every coordinate."""
  num_groups: int = 8
  """Structured groups: parents ("hierarchy"), blended features ("blended"), co-occurring pairs ("composition")."""
  group_size: int = 3
  """Children per parent ("hierarchy") or contexts per blended feature ("blended", >= 2)."""
  p_group: float = 0.12
  """"hierarchy": P(parent fires); "blended": P(a token is in one of a group's contexts);
  "composition": P(the pair fires together)."""
  p_conditional: float = 0.5
  """"blended": P(blended feature fires | one of its contexts is active)."""
  p_alone: float = 0.02
  """"composition": P(each member of a pair fires without its partner)."""

  def __post_init__(self):
    checks = [
        (self.kind in KINDS, f"kind must be one of {KINDS}, got {self.kind!r}"),
        (self.d_model >= 4, f"d_model must be >= 4, got {self.d_model}"),
        (self.num_features >= 0, f"num_features must be >= 0, got {self.num_features}"),
        (0 <= self.p_fire <= 1 and 0 <= self.p_group <= 1 and 0 <= self.p_conditional <= 1
         and 0 <= self.p_alone <= 1, "probabilities must be in [0, 1]"),
        (0 < self.mag_low <= self.mag_high, f"need 0 < mag_low <= mag_high, got {self.mag_low}, {self.mag_high}"),
        (self.noise >= 0, f"noise must be >= 0, got {self.noise}"),
        (self.num_groups >= 0, f"num_groups must be >= 0, got {self.num_groups}"),
        (self.kind != "blended" or self.group_size >= 2,
         f"blended needs group_size (contexts per feature) >= 2, got {self.group_size}"),
        (self.kind != "hierarchy" or self.group_size >= 1, f"hierarchy needs group_size >= 1, got {self.group_size}"),
        (self.kind != "blended" or self.group_size * self.p_group <= 1,
         f"blended needs group_size * p_group <= 1 (contexts are exclusive), got {self.group_size * self.p_group}"),
        (self.kind != "composition" or self.p_group + 2 * self.p_alone <= 1,
         "composition needs p_group + 2 * p_alone <= 1"),
    ]
    for ok, message in checks:
      if not ok:
        raise UserError(f"invalid ground-truth scenario: {message}.")
    if self.num_true_features < 1:
      raise UserError(f"invalid ground-truth scenario {self.kind}: it has no features.")
    if self.kind == "blended" and (self.group_size + 1) > self.d_model:
      raise UserError(f"invalid ground-truth scenario: blended needs d_model > group_size (got {self.d_model}, "
                      f"{self.group_size}) so each group can be orthonormal.")

  @property
  def num_true_features(self) -> int:
    per_group = {"hierarchy": 1 + self.group_size, "blended": 1 + self.group_size, "composition": 2}
    return self.num_features + self.num_groups * per_group.get(self.kind, 0)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


class Truth(NamedTuple):
  """A generated data set and its true dictionary."""
  x_TxD: np.ndarray          # float32 activations
  codes_TxF: np.ndarray      # float32 true magnitudes (0 = the feature is off)
  features_FxD: np.ndarray   # float32 unit-norm true directions
  roles: tuple               # per feature: "independent", "parent", "child", "blended", "context", "pair"
  pairs: tuple               # (i, j) pairs whose merge is this scenario's characteristic failure
  parent_of: dict            # child feature -> its parent ("hierarchy" only)


def _directions(rng, num: int, d: int) -> np.ndarray:
  f = rng.normal(size=(num, d))
  return f / np.linalg.norm(f, axis=1, keepdims=True)


def _orthonormal(rng, num: int, d: int) -> np.ndarray:
  q, _ = np.linalg.qr(rng.normal(size=(d, num)))
  return q.T


def _mags(rng, cfg, shape) -> np.ndarray:
  return rng.uniform(cfg.mag_low, cfg.mag_high, size=shape)


def generate(cfg: ScenarioConfig, num_tokens: int, seed: int) -> Truth:
  """Draws `num_tokens` tokens of scenario `cfg.kind` (deterministic in `seed`)."""
  rng = np.random.default_rng(seed)
  t, f_total = num_tokens, cfg.num_true_features
  on_TxF = np.zeros((t, f_total), bool)
  roles, pairs, parent_of = [], [], {}
  features = np.empty((f_total, cfg.d_model))
  col = 0
  if cfg.kind == "hierarchy":
    # Parent fires with prob p_group and then exactly one child (uniform); neither ever fires alone.
    for _ in range(cfg.num_groups):
      parent_on = rng.random(t) < cfg.p_group
      child = rng.integers(cfg.group_size, size=t)
      features[col:col + 1 + cfg.group_size] = _directions(rng, 1 + cfg.group_size, cfg.d_model)
      on_TxF[:, col] = parent_on
      roles.append("parent")
      for c in range(cfg.group_size):
        on_TxF[:, col + 1 + c] = parent_on & (child == c)
        roles.append("child")
        pairs.append((col + 1 + c, col))
        parent_of[col + 1 + c] = col
      col += 1 + cfg.group_size
  elif cfg.kind == "blended":
    # A token is in at most one of a group's contexts (prob p_group each); the blended feature fires only
    # inside one of them (prob p_conditional). The group's directions are orthonormal: the contexts and
    # the blended direction share no common component.
    for _ in range(cfg.num_groups):
      u = rng.random(t)
      ctx = np.where(u < cfg.group_size * cfg.p_group, np.floor(u / max(cfg.p_group, 1e-12)), -1).astype(int)
      features[col:col + 1 + cfg.group_size] = _orthonormal(rng, 1 + cfg.group_size, cfg.d_model)
      on_TxF[:, col] = (ctx >= 0) & (rng.random(t) < cfg.p_conditional)
      roles.append("blended")
      for c in range(cfg.group_size):
        on_TxF[:, col + 1 + c] = ctx == c
        roles.append("context")
        pairs.append((col, col + 1 + c))
      col += 1 + cfg.group_size
  elif cfg.kind == "composition":
    # Each pair fires together with prob p_group; each member alone with prob p_alone (exclusive events).
    for _ in range(cfg.num_groups):
      u = rng.random(t)
      features[col:col + 2] = _directions(rng, 2, cfg.d_model)
      both = u < cfg.p_group
      on_TxF[:, col] = both | ((u >= cfg.p_group) & (u < cfg.p_group + cfg.p_alone))
      on_TxF[:, col + 1] = both | ((u >= cfg.p_group + cfg.p_alone) & (u < cfg.p_group + 2 * cfg.p_alone))
      roles += ["pair", "pair"]
      pairs.append((col, col + 1))
      col += 2
  # Independent features (all of "independent" and "superposition", the filler of the others).
  n_ind = cfg.num_features
  features[col:] = _directions(rng, n_ind, cfg.d_model)
  on_TxF[:, col:] = rng.random((t, n_ind)) < cfg.p_fire
  roles += ["independent"] * n_ind
  codes_TxF = np.where(on_TxF, _mags(rng, cfg, on_TxF.shape), 0.0).astype(np.float32)
  x_TxD = codes_TxF @ features.astype(np.float32)
  x_TxD += (cfg.noise * rng.normal(size=x_TxD.shape)).astype(np.float32)
  return Truth(x_TxD.astype(np.float32), codes_TxF, features.astype(np.float32), tuple(roles),
               tuple(pairs), parent_of)


def defaults(scale: int = 1) -> dict:
  """The study's five default scenarios (name -> config); `scale` multiplies widths and feature counts."""
  s = scale
  d = 48 * s
  return {
      # Control: 48 independent features; any decent SAE with 64 latents should find them all.
      "independent": ScenarioConfig(kind="independent", d_model=d, num_features=48 * s),
      # 8 parents x 3 mutually exclusive children + 16 independent: the feature-absorption setting.
      "hierarchy": ScenarioConfig(kind="hierarchy", d_model=d, num_features=16 * s, num_groups=8 * s,
                                  group_size=3, p_group=0.12),
      # 8 blended features, each inside either of 2 disjoint contexts, + 24 independent.
      "blended": ScenarioConfig(kind="blended", d_model=d, num_features=24 * s, num_groups=8 * s,
                                group_size=2, p_group=0.06, p_conditional=0.5),
      # 12 pairs that usually fire together (0.08) and rarely alone (0.01 each) + 24 independent.
      "composition": ScenarioConfig(kind="composition", d_model=d, num_features=24 * s, num_groups=12 * s,
                                    p_group=0.08, p_alone=0.01),
      # 160 independent features for 64 latents: not every feature can have its own latent.
      "superposition": ScenarioConfig(kind="superposition", d_model=d, num_features=160 * s, p_fire=0.02),
  }


def standardized_directions(features_FxD: np.ndarray) -> np.ndarray:
  """True directions as the SAE sees them: per-token standardisation removes each token's mean over D.

  x' = (x - mean(x)) / std(x) is a positive rescaling of the centred token, so a feature's direction in
  the SAE's space is its projection onto the zero-mean subspace, renormalised.
  """
  return unit_rows(features_FxD - features_FxD.mean(axis=1, keepdims=True))


def unit_rows(w_NxD: np.ndarray, eps: float = 1e-12) -> np.ndarray:
  w = np.asarray(w_NxD, np.float64)
  return w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), eps)


def select(names, scale: int = 1, overrides: str = "") -> tuple:
  """(name, config) of the named default scenarios, with "name.field=value,..." overrides applied."""
  base = defaults(scale)
  unknown = [n for n in names if n not in base]
  if unknown or not names:
    raise UserError(f"unknown or no scenario(s) {unknown}; choose from {', '.join(base)}.")
  chosen = {n: base[n].to_dict() for n in names}
  fields = {f.name: f.type for f in dataclasses.fields(ScenarioConfig)}
  for item in filter(None, (o.strip() for o in overrides.split(","))):
    key, eq, value = item.partition("=")
    name, dot, field = key.strip().partition(".")
    if not eq or not dot:
      raise UserError(f"scenario override {item!r} is not name.field=value (e.g. hierarchy.p_group=0.2).")
    if name not in chosen:
      raise UserError(f"scenario override {item!r}: {name!r} is not among the chosen scenarios {list(chosen)}.")
    if field not in fields or field == "kind":
      raise UserError(f"scenario override {item!r}: no field {field!r}; fields: "
                      f"{', '.join(f for f in fields if f != 'kind')}.")
    try:
      chosen[name][field] = type(chosen[name][field])(value)
    except ValueError:
      raise UserError(f"scenario override {item!r}: {value!r} is not a valid {field}.") from None
  return tuple((n, ScenarioConfig(**c)) for n, c in chosen.items())
