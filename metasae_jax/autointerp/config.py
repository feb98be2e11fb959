"""Autointerp configuration: one frozen dataclass, validated on construction; 0 means "the backend's default"."""

import dataclasses
import math
from typing import Optional

from metasae_jax.core.config import TrainConfig
from metasae_jax.core.errors import UserError
from metasae_jax.autointerp.backends import DEFAULT_API_KEY_ENV

DEFAULT_LLM = "local:smollm2-135m-gguf"
SCORERS = ("strength", "fuzz", "detection")
# Examples per latent when a field is 0: (explainer, activating, non-activating). HTTP backends get
# delphi's defaults (40 explainer examples, 50 + 50 per scorer); the in-process model, which only
# checks the pipeline, gets sizes a 2-core CPU answers in minutes.
HTTP_COUNTS = (40, 50, 50)
LOCAL_COUNTS = (8, 5, 5)
HTTP_CONCURRENCY = 8
MIN_POOL = 64


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
  """`local:<hf id | dir | smollm2-135m-gguf>` or `openai:<base_url>#<model>`; llm_base_url overrides it."""
  llm_base_url: str = ""
  """OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1 (vLLM); "" = use `llm`."""
  llm_model: str = ""
  """Model name the server serves (needed with llm_base_url)."""
  llm_api_key_env: str = DEFAULT_API_KEY_ENV
  """Name of the environment variable holding the API key (the key itself is never a config value)."""
  concurrency: int = 0
  """LLM requests in flight at once; 0 = 8 for HTTP backends, 1 for the in-process model."""
  tokenizer: str = ""
  """Tokenizer decoding the store's tokens; "" = the store manifest's source model."""
  seed: int = 0
  """Seed for the pair choice, example sampling and random highlights."""
  skip_first_positions: int = 1
  """Leading positions of each context never encoded (attention sink, docs/method.md §3.2); ignored when context_len is 1."""
  batch_size: int = TrainConfig.batch_size
  """Tokens per encoding batch; BatchTopK (no calibrated thresholds) selects k*B per batch like training
  (experiments.autointerp takes the run's training batch size; this default is TrainConfig's)."""
  window: int = 32
  """Tokens per example context, ending at the example's token, never crossing its context."""
  max_examples: int = 0
  """Activating examples shown to the explainer per latent; 0 = 40 (HTTP, delphi) or 8 (local)."""
  num_score: int = 0
  """Held-out activating contexts per latent for each scorer; 0 = 50 (HTTP, delphi) or 5 (local)."""
  num_negative: int = 0
  """Non-activating contexts per latent for each scorer; 0 = 50 (HTTP, delphi) or 5 (local)."""
  strength_activating: int = 0
  """Paper fuzzing scorer (0..10 strength, Spearman ρ): activating contexts; 0 = num_score."""
  strength_negative: int = 0
  """Paper fuzzing scorer: non-activating contexts; 0 = num_negative."""
  fuzz_activating: int = 0
  """delphi fuzzing scorer (are the marked tokens right?): activating contexts; 0 = num_score."""
  fuzz_negative: int = 0
  """delphi fuzzing scorer: non-activating contexts (randomly marked); 0 = num_negative."""
  detection_activating: int = 0
  """delphi detection scorer (does the latent fire in this context?): activating contexts; 0 = num_score."""
  detection_negative: int = 0
  """delphi detection scorer: non-activating contexts; 0 = num_negative."""
  quantiles: int = 4
  """Activation-rank bins examples are drawn from; bin q (0 = top) gets weight quantiles - q (top-heavy)."""
  pool_top: int = 0
  """Top-activating tokens kept per candidate latent while streaming; 0 = max(64, min_examples)."""
  pool_random: int = 0
  """Uniform reservoir of firing tokens kept per candidate latent; 0 = max(64, min_examples)."""
  candidate_factor: int = 4
  """Pairs tracked while streaming, as a multiple of num_latents, so dead or rare ones can be skipped."""
  explain_max_tokens: int = 32
  """Generated tokens for one explanation."""
  score_max_tokens: int = 3
  """Generated tokens for one score answer (the logprobs of the first one are what counts)."""
  timeout_s: float = 60.0
  """HTTP backend: seconds before one request attempt times out."""
  retries: int = 3
  """HTTP backend: retries after a failed attempt (the openai client's exponential backoff)."""
  progress: bool = True
  """Show a tqdm progress bar."""

  @property
  def llm_spec(self) -> str:
    """The backend spec: llm_base_url/llm_model when given, else `llm`."""
    return f"openai:{self.llm_base_url}#{self.llm_model}" if self.llm_base_url else self.llm

  @property
  def is_local(self) -> bool:
    return self.llm_spec.startswith("local:")

  def scorer_counts(self) -> dict:
    """Scorer -> (activating, non-activating) contexts per latent (after resolve())."""
    return {"strength": (self.strength_activating, self.strength_negative),
            "fuzz": (self.fuzz_activating, self.fuzz_negative),
            "detection": (self.detection_activating, self.detection_negative)}

  @property
  def num_activating_contexts(self) -> int:
    return max(a for a, _ in self.scorer_counts().values())

  @property
  def num_negative_contexts(self) -> int:
    return max(n for _, n in self.scorer_counts().values())

  @property
  def min_examples(self) -> int:
    """Firing tokens a latent needs to be chosen: its explainer examples plus its half of the shared contexts."""
    return self.max_examples + math.ceil(self.num_activating_contexts / 2)

  def resolve(self, local: Optional[bool] = None) -> "AutointerpConfig":
    """A copy with every 0 ("default") replaced by the number used for this backend kind."""
    local = self.is_local if local is None else local
    explain, act, neg = LOCAL_COUNTS if local else HTTP_COUNTS
    c = dataclasses.replace(self, max_examples=self.max_examples or explain,
                            num_score=self.num_score or act, num_negative=self.num_negative or neg,
                            concurrency=self.concurrency or (1 if local else HTTP_CONCURRENCY))
    c = dataclasses.replace(
        c, strength_activating=c.strength_activating or c.num_score,
        strength_negative=c.strength_negative or c.num_negative,
        fuzz_activating=c.fuzz_activating or c.num_score, fuzz_negative=c.fuzz_negative or c.num_negative,
        detection_activating=c.detection_activating or c.num_score,
        detection_negative=c.detection_negative or c.num_negative)
    pool = max(MIN_POOL, c.min_examples)
    c = dataclasses.replace(c, pool_top=c.pool_top or pool, pool_random=c.pool_random or pool)
    if c.pool_top < c.min_examples:
      raise UserError(f"invalid autointerp config: pool_top must be >= max_examples + half the activating "
                      f"contexts = {c.min_examples}, got {c.pool_top}.")
    if c.strength_activating + c.strength_negative < 2:
      raise UserError("invalid autointerp config: the strength scorer needs >= 2 contexts for a Spearman ρ.")
    return c

  def __post_init__(self):
    counts = ("max_examples", "num_score", "num_negative", "strength_activating", "strength_negative",
              "fuzz_activating", "fuzz_negative", "detection_activating", "detection_negative",
              "pool_top", "pool_random", "concurrency")
    spec = self.llm_spec
    checks = [
        (self.num_tokens >= 0, f"num_tokens must be >= 0, got {self.num_tokens}"),
        (self.num_latents > 0, f"num_latents must be positive, got {self.num_latents}"),
        (spec.startswith(("local:", "openai:")),
         f"llm must be 'local:<model>' or 'openai:<base_url>#<model>', got {spec!r}"),
        (not spec.startswith("openai:") or "#" in spec,
         f"llm {spec!r} needs '#<model>' after the base URL"),
        (not self.llm_base_url or self.llm_model, "llm_base_url needs llm_model (the served model's name)"),
        (not self.llm_base_url or self.llm_base_url.startswith(("http://", "https://")),
         f"llm_base_url must start with http:// or https://, got {self.llm_base_url!r}"),
        (self.skip_first_positions >= 0,
         f"skip_first_positions must be >= 0, got {self.skip_first_positions}"),
        (self.batch_size > 0, f"batch_size must be positive, got {self.batch_size}"),
        (self.window > 0, f"window must be positive, got {self.window}"),
        (self.num_score != 1, "num_score must be 0 (default) or >= 2"),
        (self.quantiles > 0, f"quantiles must be positive, got {self.quantiles}"),
        (self.candidate_factor >= 1, f"candidate_factor must be >= 1, got {self.candidate_factor}"),
        (self.explain_max_tokens > 0 and self.score_max_tokens > 0, "max token counts must be positive"),
        (self.timeout_s > 0, f"timeout_s must be positive, got {self.timeout_s}"),
        (self.retries >= 0, f"retries must be >= 0, got {self.retries}"),
    ] + [(getattr(self, f) >= 0, f"{f} must be >= 0 (0 = default), got {getattr(self, f)}") for f in counts]
    for ok, message in checks:
      if not ok:
        raise UserError(f"invalid autointerp config: {message}.")
