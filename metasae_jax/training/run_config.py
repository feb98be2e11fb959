"""Where a training run's data comes from and where it goes: RunConfig and its checks (no JAX import)."""

import dataclasses
import json
import os
from typing import Optional

from metasae_jax.core.config import TrainConfig
from metasae_jax.core.errors import UserError
from metasae_jax.storage import atomic, positions
from metasae_jax.training import tracking

# Tokens each data stream shuffles within by default (a million: the whole of a small store).
DEFAULT_SHUFFLE_BUFFER = 1 << 20
# What a run directory records about its config and data (written by the trainer when it claims the directory).
RUN_CONFIG = "run_config.json"


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
  """Where the data comes from and where the run goes (everything outside the math)."""
  activations: str
  """Activation store: a local directory, s3://bucket/prefix or gs://bucket/prefix (docs/storage.md)."""
  out_dir: str
  """Run directory: joint/, solo/, joint/meta/, metrics.jsonl, checkpoints/."""
  num_tokens: int = 0
  """Training tokens (after skipping); 0 means one pass over the store's usable tokens."""
  skip_first_positions: int = positions.DEFAULT_SKIP_FIRST_POSITIONS
  """Positions skipped at the start of every context; 0 trains on every position as the paper's code does
  (docs/method.md §3.2: skipping the sink leaves sink-like tokens later in a context unreconstructed). A resumed
  run keeps the value recorded in its run_config.json."""
  checkpoint_every_steps: int = 1000
  """Save an Orbax checkpoint every this many steps (and at the end)."""
  log_every_steps: int = 50
  """Write a metrics.jsonl line every this many steps (and at the end)."""
  max_checkpoints: int = 2
  """Checkpoints kept on disk."""
  progress: bool = True
  """Show a progress bar."""
  log_to: str = "jsonl"
  """Trackers, comma-separated (tracking.BACKENDS): metrics.jsonl is always written; add "tensorboard"
  (RUN/tensorboard) and/or "wandb" (RUN/wandb), e.g. "jsonl,tensorboard"."""
  wandb_project: str = "metasae-jax"
  """W&B project name."""
  wandb_run_name: str = ""
  """W&B run name; empty = the run directory's name."""
  wandb_mode: str = "offline"
  """W&B mode: "offline" (default: no account or network; `wandb sync` uploads later) or "online"."""
  eval_every_steps: int = 0
  """Validate joint and solo on the held-out sample every this many steps (and at the end); 0 = never."""
  eval_activations: str = ""
  """Held-out store for validation; empty = the training store's recorded held-out view."""
  eval_tokens: int = 4096
  """Held-out tokens in the fixed validation sample (the first ones of the held-out store, after skipping)."""
  curves: bool = True
  """Write training_curves.png (train and validation curves) at the end of the run."""
  model_parallel: int = 1
  """Devices that split each primary SAE's latents (the mesh is devices / model_parallel x model_parallel). Not
  part of the run's identity: a checkpoint written on one mesh resumes on another."""
  # --- how the data stage reads the store (training/data.py) ---
  shuffle_buffer_tokens: int = DEFAULT_SHUFFLE_BUFFER
  """Tokens each data stream shuffles within (whole chunks); a process holds up to two such windows per stream.
  A buffer that holds the whole store gives the whole-store permutation. Recorded: a resumed run must keep it."""
  data_streams: int = 0
  """Data streams the global batch is drawn from (each reads its own chunks); 0 = one per process at the run's
  start, recorded, so a resumed run keeps its order on any number of processes that divides it."""


def validate_run(config: TrainConfig, run: RunConfig) -> None:
  """Every flag-level check, before the run directory is touched (a failed first attempt must not poison it)."""
  checks = [
      (0 <= config.seed < 2**32, f"--seed must be in [0, 2^32), got {config.seed}"),
      (run.num_tokens >= 0, f"--num_tokens must be >= 0 (0 = one pass), got {run.num_tokens}"),
      (run.skip_first_positions >= 0, f"--skip_first_positions must be >= 0, got {run.skip_first_positions}"),
      (run.checkpoint_every_steps >= 1,
       f"--checkpoint_every_steps must be >= 1, got {run.checkpoint_every_steps}"),
      (run.log_every_steps >= 1, f"--log_every_steps must be >= 1, got {run.log_every_steps}"),
      (run.max_checkpoints >= 1, f"max_checkpoints must be >= 1, got {run.max_checkpoints}"),
      (run.eval_every_steps >= 0, f"--eval_every_steps must be >= 0 (0 = never), got {run.eval_every_steps}"),
      (run.eval_tokens >= 2, f"--eval_tokens must be >= 2, got {run.eval_tokens}"),
      (run.model_parallel >= 1, f"--model_parallel must be >= 1, got {run.model_parallel}"),
      (run.wandb_mode in tracking.WANDB_MODES,
       f"--wandb_mode must be one of {tracking.WANDB_MODES}, got {run.wandb_mode!r}"),
  ]
  for ok, message in checks:
    if not ok:
      raise UserError(f"{message}. Nothing was written.")
  tracking.check_backends(run.log_to)
  atomic.check_output_dir(run.out_dir, "--out_dir")


def _recorded(out_dir: str, section: str, key: str):
  """run_config.json's `section`.`key` in out_dir; None when the file or the entry is missing."""
  try:
    with open(os.path.join(out_dir, RUN_CONFIG)) as f:
      return json.load(f).get(section, {}).get(key)
  except (OSError, ValueError, AttributeError):
    return None


def recorded_skip_first_positions(out_dir: str) -> Optional[int]:
  """The skip rule an existing run in out_dir was started with (runs from before the default became 0 keep 1)."""
  value = _recorded(out_dir, "data", "skip_first_positions")
  return int(value) if isinstance(value, int) else None


def recorded_data_streams(out_dir: str) -> Optional[int]:
  """The data streams an existing run in out_dir was started with (None for a new run or an older one)."""
  value = _recorded(out_dir, "data", "data_streams")
  return int(value) if isinstance(value, int) else None


def recorded_batch_size(out_dir: str) -> Optional[int]:
  """The global batch size the run in out_dir trains with (what BatchTopK selects over)."""
  value = _recorded(out_dir, "train", "batch_size")
  return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def recorded_activations(run_dir: str) -> Optional[str]:
  """The store (or view) a training run in `run_dir` recorded; None if it records none."""
  value = _recorded(run_dir, "data", "activations")
  return value if isinstance(value, str) else None
