"""What the browser page holds: one frozen dataclass, validated on construction (no JAX import)."""

import dataclasses

from metasae_jax.core.config import TrainConfig
from metasae_jax.core.errors import UserError
from metasae_jax.storage.sae_schema import FIRINGS


@dataclasses.dataclass(frozen=True, kw_only=True)
class BrowserConfig:
  """What the browser page holds. Defaults keep a page of 2 x 200 latents to a few MB."""
  run_dir: str
  """Training run directory with `joint/` and `solo/`; optional report.json, split_candidates.json, autointerp/."""
  activations: str
  """Activation store with token shards (held-out text, same model/layer/site as the SAEs)."""
  num_latents: int = 200
  """Latents per SAE on the page (split candidates first, then scored, then most frequent + partners)."""
  num_tokens: int = 262144
  """Tokens streamed through the SAEs, counted after skipping (docs/method.md §3.2); 0 = the whole store."""
  num_top: int = 10
  """Top-activating contexts per latent."""
  num_quantiles: int = 4
  """Bins of a latent's firings by activation rank; a few contexts are sampled from each."""
  per_quantile: int = 3
  """Contexts sampled per quantile bin."""
  reservoir: int = 256
  """Uniform sample of firing tokens kept per latent (histogram and quantile samples)."""
  before: int = 16
  """Tokens shown before the example token (within its context)."""
  after: int = 4
  """Tokens shown after the example token (within its context)."""
  histogram_bins: int = 24
  """Bins of each latent's activation histogram."""
  batch_size: int = TrainConfig.batch_size
  """Tokens per encoding batch (BatchTopK firing selects k*B per batch like training; experiments.browse takes the
  run's training batch size, this default is TrainConfig's)."""
  firing: str = ""
  """Firing rule: "threshold" (calibrated θ), "topk" (per token) or "batchtopk" (per batch); "" = θ when
  the artifact has it, else per-token top-k (the library default). The page records the rule used."""
  skip_first_positions: int = 1
  """Leading positions of each context never encoded (attention sink, docs/method.md §3.2)."""
  tokenizer: str = ""
  """Tokenizer for the store's tokens; "" = the store manifest's source model."""
  seed: int = 0
  """Seed for the quantile samples."""
  progress: bool = True
  """Show progress bars."""

  def __post_init__(self):
    if self.num_latents <= 0:
      raise UserError(f"--num_latents must be positive, got {self.num_latents}.")
    if self.num_tokens < 0:
      raise UserError(f"--num_tokens must be >= 0 (0 = the whole store), got {self.num_tokens}.")
    for name in ("num_top", "num_quantiles", "reservoir", "batch_size", "histogram_bins"):
      if getattr(self, name) <= 0:
        raise UserError(f"{name} must be positive, got {getattr(self, name)}.")
    if self.firing not in ("",) + FIRINGS:
      raise UserError(f"--firing must be one of {FIRINGS} (or empty for the default), got {self.firing!r}.")
    if min(self.per_quantile, self.before, self.after, self.skip_first_positions) < 0:
      raise UserError("per_quantile, before, after and skip_first_positions must be >= 0.")
