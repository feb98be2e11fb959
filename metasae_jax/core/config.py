"""Training configuration: one frozen dataclass, validated on construction."""

import dataclasses

from metasae_jax.core import architectures
from metasae_jax.core.errors import UserError

# The paper's meta SAE: 1800 latents for a 20480-wide primary.
PAPER_META_WIDTH, PAPER_WIDTH = 1800, 20480
COMPUTE_DTYPES = ("auto", "float32", "bfloat16")
ALGORITHMS = ("auto", "slots", "dense")
PENALTY_GRADS = ("stop", "through")


def default_meta_width(width: int) -> int:
  """round(width * 1800 / 20480): the paper's meta width, scaled to this primary width."""
  return max(1, round(width * PAPER_META_WIDTH / PAPER_WIDTH))


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
  """Joint MetaSAE + solo baseline training. Defaults are the paper's unless noted."""

  d_model: int
  """Input width D (576 for SmolLM2-135M, 1280 for GPT-2 large)."""
  width: int
  """Primary SAE latents N (paper: 20480 on GPT-2 large)."""
  k: int = 64
  """Mean active latents per token; BatchTopK keeps k*B per batch (paper: 64)."""
  meta_width: int = 0
  """Meta SAE latents M; 0 means round(width * 1800 / 20480), the paper's 1800 at its width 20480."""
  meta_k: int = 8
  """Active meta latents per decoder row (paper's text: 8; the reference's run script for the selected
  GPT-2 large configuration uses 4, see the gpt2_large_l20 preset)."""
  lambda2: float = 0.3
  """Decomposability penalty weight λ₂ (paper's selected configuration: 0.3); 0 disables it."""
  sigma_sq: float = 1.0
  """Penalty bandwidth σ² in p_i = exp(-||w_i - ŵ_i||² / σ²) (paper: 1.0)."""
  penalty_grad: str = "stop"
  """"stop": ŵ is a constant (the paper); "through": gradients flow through the frozen meta SAE."""
  n_primary_steps: int = 10
  """Primary steps between meta phases (paper's text: 10; the reference's run script: 100)."""
  n_meta_steps: int = 5
  """Meta SAE steps per meta phase, on the whole W_dec as one batch (paper's text: 5; reference script: 10)."""
  batch_size: int = 4096
  """Tokens per global batch B (paper: ~4096)."""
  lr: float = 3e-4
  """Adam learning rate for all SAEs (reference: 3e-4, no schedule)."""
  b1: float = 0.9
  """Adam β1 (reference)."""
  b2: float = 0.99
  """Adam β2 (reference)."""
  aux_k: int = 512
  """Dead latents each token may use in the AuxK loss (reference: 512)."""
  aux_coeff: float = 1 / 32
  """AuxK loss weight (reference: 1/32)."""
  dead_after_batches: int = 5
  """A latent is dead after this many batches without firing, counting the current one (reference: 5)."""
  auxk_detach: bool = False
  """Detach the AuxK target residual x' - x̂'. False (default) is the paper's reference code, where AuxK's
  gradient also reaches the main reconstruction; True is OpenAI's TopK recipe."""
  seed: int = 0
  """Seed for initialisation; the solo SAE starts from the same init as the joint primary."""
  baseline: bool = True
  """Train the solo SAE (no meta SAE, no penalty) in lockstep on identical batches."""
  architecture: str = "batchtopk"
  """The primary SAE's architecture (core/architectures/): "batchtopk" (the paper), "topk",
  "matryoshka_batchtopk" or "jumprelu". The meta SAE is always BatchTopK with meta_k."""
  matryoshka_widths: tuple = ()
  """matryoshka_batchtopk only: the nested prefix widths, strictly increasing, each <= width; the full width
  is added as the last prefix when missing (SAELens' name, matryoshka_widths)."""
  l0_coefficient: float = 1.0
  """jumprelu only: λ of the L0 penalty, in the paper's units (against the squared error summed over D; we
  divide by D because our MSE is a mean over D). SAELens' name and default."""
  jumprelu_bandwidth: float = 0.001
  """jumprelu only: the straight-through estimator's kernel width ε (Rajamanoharan et al. 2024: 0.001, for
  inputs normalised to E||x||² = D as our standardised inputs are). SAELens' name."""
  jumprelu_init_threshold: float = 0.001
  """jumprelu only: every latent's initial threshold θ (the paper's 0.001). SAELens' name."""
  compute_dtype: str = "auto"
  """Matmul input dtype of all three SAEs: "auto" (default) is float32 on CPU and bfloat16 on GPU/TPU (chosen
  when the step is lowered for its platform); "float32" or "bfloat16" force one. Products accumulate in float32;
  master weights, Adam state and losses stay float32."""
  algorithm: str = "auto"
  """How the step computes the same loss: "slots" (the CPU's: candidate slots, native kernels), "dense" (GPU/TPU:
  bisection thresholds, masked dense products, no scatter); "auto" (default) picks slots on CPU and dense
  elsewhere when the step is lowered for its platform."""

  def __post_init__(self):
    object.__setattr__(self, "matryoshka_widths", tuple(self.matryoshka_widths))  # a list from JSON
    if self.meta_width == 0:
      object.__setattr__(self, "meta_width", default_meta_width(self.width))
    checks = [
        (self.d_model > 0, f"d_model must be positive, got {self.d_model}"),
        (self.width > 0, f"width must be positive, got {self.width}"),
        (0 < self.k < self.width, f"k must be in [1, width) = [1, {self.width}), got {self.k}"),
        (0 < self.meta_width < self.width,
         f"meta_width must be in [1, width) = [1, {self.width}), got {self.meta_width}"),
        (0 < self.meta_k < self.meta_width,
         f"meta_k must be in [1, meta_width) = [1, {self.meta_width}), got {self.meta_k}"),
        (self.lambda2 >= 0, f"lambda2 must be >= 0, got {self.lambda2}"),
        (self.sigma_sq > 0, f"sigma_sq must be > 0, got {self.sigma_sq}"),
        (self.penalty_grad in PENALTY_GRADS,
         f"penalty_grad must be 'stop' or 'through', got {self.penalty_grad!r}"),
        (self.n_primary_steps > 0, f"n_primary_steps must be positive, got {self.n_primary_steps}"),
        (self.n_meta_steps >= 0, f"n_meta_steps must be >= 0, got {self.n_meta_steps}"),
        (self.batch_size > 0, f"batch_size must be positive, got {self.batch_size}"),
        (self.lr > 0, f"lr must be positive, got {self.lr}"),
        (0 <= self.b1 < 1 and 0 <= self.b2 < 1, f"b1, b2 must be in [0, 1), got {self.b1}, {self.b2}"),
        (self.aux_k > 0, f"aux_k must be positive, got {self.aux_k}"),
        (self.aux_coeff >= 0, f"aux_coeff must be >= 0, got {self.aux_coeff}"),
        (self.dead_after_batches > 0, f"dead_after_batches must be positive, got {self.dead_after_batches}"),
        (self.architecture in architectures.names(),
         f"architecture must be one of {', '.join(architectures.names())}, got {self.architecture!r}"),
        (all(isinstance(w, int) and 0 < w <= self.width for w in self.matryoshka_widths)
         and list(self.matryoshka_widths) == sorted(set(self.matryoshka_widths)),
         f"matryoshka_widths must be strictly increasing widths in [1, width = {self.width}], got "
         f"{list(self.matryoshka_widths)}"),
        (self.l0_coefficient >= 0, f"l0_coefficient must be >= 0, got {self.l0_coefficient}"),
        (self.jumprelu_bandwidth > 0, f"jumprelu_bandwidth must be > 0, got {self.jumprelu_bandwidth}"),
        (self.jumprelu_init_threshold > 0,
         f"jumprelu_init_threshold must be > 0, got {self.jumprelu_init_threshold}"),
        (self.compute_dtype in COMPUTE_DTYPES,
         f"compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {self.compute_dtype!r}"),
        (self.algorithm in ALGORITHMS,
         f"algorithm must be one of {', '.join(ALGORITHMS)}, got {self.algorithm!r}"),
    ]
    if self.architecture in architectures.names():
      spec = architectures.spec(self.architecture)
      checks += [
          (self.architecture != "matryoshka_batchtopk" or self.matryoshka_widths,
           "matryoshka_batchtopk needs matryoshka_widths (e.g. 32,128,512)"),
          (self.architecture == "matryoshka_batchtopk" or not self.matryoshka_widths,
           f"matryoshka_widths is for matryoshka_batchtopk, not {self.architecture}"),
          (self.algorithm in ("auto",) + spec.algorithms,
           f"{self.architecture} runs the {' or '.join(spec.algorithms)} algorithm, not {self.algorithm!r}"),
      ]
    for ok, message in checks:
      if not ok:
        raise UserError(f"invalid training config: {message}.")
    if self.architecture == "matryoshka_batchtopk" and self.matryoshka_widths[-1] != self.width:
      object.__setattr__(self, "matryoshka_widths", tuple(self.matryoshka_widths) + (self.width,))

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  def resolved(self, platform: str) -> tuple[str, str]:
    """(algorithm, compute dtype) on `platform` ("cpu", "gpu", "tpu", ...): "auto" means the slots path in
    float32 on CPU and the dense path in bfloat16 on accelerators."""
    cpu = platform == "cpu"
    slots_ok = "slots" in architectures.spec(self.architecture).algorithms
    algorithm = self.algorithm if self.algorithm != "auto" else ("slots" if cpu and slots_ok else "dense")
    dtype = self.compute_dtype if self.compute_dtype != "auto" else ("float32" if cpu else "bfloat16")
    return algorithm, dtype
