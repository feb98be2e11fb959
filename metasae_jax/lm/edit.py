"""One latent intervention for steering (what to do to which latent), checked without torch.

Modes: add α · w_i; clamp latent i to a value; ablate it (clamp to 0). `lm/steering.py` applies them.
"""

import dataclasses
import math

from metasae_jax.core.errors import UserError

MODES = ("add", "clamp", "ablate")


@dataclasses.dataclass(frozen=True)
class Edit:
  """One latent intervention."""
  latent: int
  mode: str = "add"
  value: float = 0.0
  """α for "add", the clamped activation for "clamp", ignored for "ablate"."""

  def __post_init__(self):
    if self.mode not in MODES:
      raise UserError(f"steering mode {self.mode!r} is not one of {MODES}.")
    if not math.isfinite(self.value):
      raise UserError(f"steering value {self.value} is not a finite number.")

  def check_width(self, width: int) -> None:
    if not 0 <= self.latent < width:
      raise UserError(f"--latent {self.latent} is out of range for an SAE of width {width} (pass 0..{width - 1}).")
