"""What an evaluation evaluates and how: one frozen dataclass, validated on construction (no JAX import)."""

import dataclasses

from metasae_jax.core.config import TrainConfig
from metasae_jax.core.errors import UserError
from metasae_jax.storage.sae_schema import FIRINGS
from metasae_jax.storage.positions import DEFAULT_SKIP_FIRST_POSITIONS


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """What `evaluate_run` evaluates and how."""
  run_dir: str
  """Training run directory holding `joint/` and (usually) `solo/` SAE artifacts; outputs go here."""
  activations: str
  """Held-out activation store (same model, layer and site as training)."""
  num_tokens: int = 0
  """Evaluation tokens after skipping (0 = the whole store)."""
  model: str = ""
  """Model for ΔCE: "" = the store's source.model, "none" = skip ΔCE."""
  firing: str = "threshold"
  """"threshold": calibrated θ (calibrated here and written into artifacts that lack it); "batchtopk"."""
  batch_size: int = TrainConfig.batch_size
  """Tokens per batch: BatchTopK firing and θ calibration select over each batch, so it should be the run's
  training batch size (experiments.evaluate reads it from the run; this default is TrainConfig's)."""
  skip_first_positions: int = DEFAULT_SKIP_FIRST_POSITIONS
  """Positions t % context_len < this are left out of everything (0 = all positions, docs/method.md §3.2: fvu
  and mse over all positions, fvu_excl_first without position 0 are reported either way); experiments.evaluate
  takes the run's, this default is training's (storage/positions.py)."""
  ce_contexts: int = 64
  """Whole contexts for ΔCE (each costs 4 model forwards: clean, zero, joint, solo); the reference uses 3,200."""
  ce_batch_contexts: int = 8
  """Contexts per model forward in ΔCE (with ce_firing batchtopk, the batch BatchTopK runs over)."""
  ce_firing: str = ""
  """Firing rule of the spliced SAE in ΔCE: "" = `firing`; "batchtopk" = over each hooked batch (the reference)."""
  ce_include_first_position: bool = False
  """Score the prediction made at position 0 too (the reference does); by default CE starts at max(skip, 1)."""
  meta_fve_steps: int = 500
  """Steps of the fresh meta SAE for meta FVE (SAEBench meta_structure); 0 skips it."""
  meta_width_fraction: float = 0.25
  """Fresh meta SAE width as a fraction of the SAE's width (SAEBench: 0.25)."""
  meta_k: int = 4
  """Fresh meta SAE k (SAEBench: 4)."""
  split_phi_threshold: float = 0.2
  """Cross-φ a joint latent needs to count as sharing a solo latent's firing."""
  max_split_candidates: int = 50
  """Split candidates listed in split_candidates.json."""
  bootstrap_replicates: int = 200
  """Block-bootstrap replicates for the joint-vs-solo intervals (0 skips them)."""
  bootstrap_blocks: int = 64
  """Blocks of whole contexts the held-out set is cut into for the bootstrap."""
  seed: int = 0
  """Seed of the meta SAE init, the |φ| sample and the bootstrap draws."""
  progress: bool = True
  """Show progress bars."""

  def __post_init__(self):
    if self.firing not in FIRINGS:
      raise UserError(f"--firing must be one of {FIRINGS}, got {self.firing!r}.")
    if self.ce_firing and self.ce_firing not in FIRINGS:
      raise UserError(f"--ce_firing must be empty or one of {FIRINGS}, got {self.ce_firing!r}.")
    if (self.batch_size <= 0 or self.ce_contexts < 0 or self.ce_batch_contexts <= 0 or self.meta_fve_steps < 0
        or self.skip_first_positions < 0 or self.bootstrap_replicates < 0 or self.bootstrap_blocks < 2):
      raise UserError("--batch_size and --ce_batch_contexts must be positive, --bootstrap_blocks >= 2; "
                      "--ce_contexts, --meta_fve_steps, --skip_first_positions and --bootstrap_replicates "
                      "must be >= 0.")
    if not 0 < self.meta_width_fraction <= 4:
      raise UserError(f"meta_width_fraction must be in (0, 4], got {self.meta_width_fraction}.")

  @property
  def ce_firing_rule(self) -> str:
    return self.ce_firing or self.firing
