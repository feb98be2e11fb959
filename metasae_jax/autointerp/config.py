"""Autointerp configuration: one frozen dataclass, validated on construction."""

import dataclasses

from metasae_jax.core.errors import UserError

DEFAULT_LLM = "local:smollm2-135m-gguf"


@dataclasses.dataclass(frozen=True, kw_only=True)
class AutointerpConfig:
  """Explain and score matched joint/solo latent pairs. Defaults keep a 2-core CPU run to minutes."""

  run_dir: str
  """Training run directory holding `joint/` and `solo/` SAE artifacts; results go to run_dir/autointerp/."""
  activations: str
  """Activation store with token shards (held-out text, same model/layer/site as the SAEs)."""
  num_tokens: int = 65536
  """Tokens streamed through the SAEs, counted after skipping (docs/method.md §3.2); 0 = the whole store."""
  num_latents: int = 16
  """Matched joint/solo pairs to explain and score (paper-style paired comparison)."""
  llm: str = DEFAULT_LLM
  """`local:<hf id | dir | smollm2-135m-gguf>` or `openai:<base_url>#<model>`."""
  tokenizer: str = ""
  """Tokenizer decoding the store's tokens; "" = the store manifest's source model."""
  seed: int = 0
  """Seed for the pair choice, example sampling and random highlights."""
  skip_first_positions: int = 1
  """Leading positions of each context never encoded (attention sink, docs/method.md §3.2); ignored when context_len is 1."""
  batch_size: int = 4096
  """Tokens per encoding batch; BatchTopK (no calibrated thresholds) selects k*B per batch like training."""
  window: int = 32
  """Tokens per example context, ending at the example's token, never crossing its context."""
  max_examples: int = 8
  """Activating examples shown to the explainer per latent."""
  num_score: int = 5
  """Held-out activating examples per latent for each scorer."""
  num_negative: int = 5
  """Random non-activating contexts per latent for each scorer."""
  quantiles: int = 4
  """Activation-rank bins examples are drawn from; bin q (0 = top) gets weight quantiles - q (top-heavy)."""
  pool_top: int = 64
  """Top-activating tokens kept per candidate latent while streaming (bounded, merged per batch)."""
  pool_random: int = 64
  """Uniform reservoir of firing tokens kept per candidate latent (bottom-k of random keys)."""
  candidate_factor: int = 4
  """Pairs tracked while streaming, as a multiple of num_latents, so dead or rare ones can be skipped."""
  explain_max_tokens: int = 32
  """Generated tokens for one explanation."""
  score_max_tokens: int = 3
  """Generated tokens for one score answer (the logprobs of the first one are what counts)."""
  timeout_s: float = 60.0
  """HTTP backend: seconds before one request times out."""
  retries: int = 3
  """HTTP backend: retries after a failed request, with exponential backoff."""
  progress: bool = True
  """Show a tqdm progress bar."""

  @property
  def min_examples(self) -> int:
    """Firing tokens a latent needs to be chosen: explainer examples plus held-out ones."""
    return self.max_examples + self.num_score

  def __post_init__(self):
    checks = [
        (self.num_tokens >= 0, f"num_tokens must be >= 0, got {self.num_tokens}"),
        (self.num_latents > 0, f"num_latents must be positive, got {self.num_latents}"),
        (self.llm.startswith(("local:", "openai:")),
         f"llm must be 'local:<model>' or 'openai:<base_url>#<model>', got {self.llm!r}"),
        (not self.llm.startswith("openai:") or "#" in self.llm,
         f"llm {self.llm!r} needs '#<model>' after the base URL"),
        (self.skip_first_positions >= 0,
         f"skip_first_positions must be >= 0, got {self.skip_first_positions}"),
        (self.batch_size > 0, f"batch_size must be positive, got {self.batch_size}"),
        (self.window > 0, f"window must be positive, got {self.window}"),
        (self.max_examples > 0, f"max_examples must be positive, got {self.max_examples}"),
        (self.num_score > 1, f"num_score must be >= 2, got {self.num_score}"),
        (self.num_negative > 0, f"num_negative must be positive, got {self.num_negative}"),
        (self.quantiles > 0, f"quantiles must be positive, got {self.quantiles}"),
        (self.pool_top >= self.min_examples,
         f"pool_top must be >= max_examples + num_score = {self.min_examples}, got {self.pool_top}"),
        (self.pool_random > 0, f"pool_random must be positive, got {self.pool_random}"),
        (self.candidate_factor >= 1, f"candidate_factor must be >= 1, got {self.candidate_factor}"),
        (self.explain_max_tokens > 0 and self.score_max_tokens > 0, "max token counts must be positive"),
        (self.timeout_s > 0, f"timeout_s must be positive, got {self.timeout_s}"),
        (self.retries >= 0, f"retries must be >= 0, got {self.retries}"),
    ]
    for ok, message in checks:
      if not ok:
        raise UserError(f"invalid autointerp config: {message}.")
