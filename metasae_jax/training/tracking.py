"""Experiment tracking: one writer interface, three backends (metrics.jsonl, TensorBoard, Weights & Biases).

`metrics.jsonl` is always written: resuming trims it and `training_curves.png` is drawn from it. TensorBoard
(`tensorboardX`) and W&B (`wandb`) are imported only when asked for, so the library works without them.
Metric names are the same everywhere: `loss`, `joint/fvu`, `solo/l0`, `penalty`, `meta_mse`, `tokens_per_s`,
`val/joint/fvu`, ...
"""

import json
import os
from typing import Optional, Protocol

from metasae_jax.core.errors import UserError

BACKENDS = ("jsonl", "tensorboard", "wandb")
WANDB_MODES = ("offline", "online")
TENSORBOARD_DIR = "tensorboard"


class Tracker(Protocol):
  """Where scalar metrics go: hyperparameters once, then one dict of scalars per logged step."""

  def hparams(self, params: dict) -> None:
    ...

  def log(self, step: int, metrics: dict) -> None:
    ...

  def close(self) -> None:
    ...


def _flat(d: dict, prefix: str = "") -> dict:
  """Nested dict -> {"a/b": scalar-or-str} (what TensorBoard's hparams and W&B's config take)."""
  out = {}
  for key, value in d.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      out.update(_flat(value, name + "/"))
    elif isinstance(value, (bool, int, float, str)) or value is None:
      out[name] = value
    else:
      out[name] = str(value)
  return out


class JsonlTracker:
  """Appends `{"step", "tokens", **metrics}` lines to metrics.jsonl (hyperparameters live in run_config.json)."""

  def __init__(self, path: str, tokens_per_step: int):
    self.path, self.tokens_per_step = path, tokens_per_step

  def hparams(self, params: dict) -> None:
    del params

  def log(self, step: int, metrics: dict) -> None:
    line = {"step": step, "tokens": step * self.tokens_per_step, **metrics}
    try:
      with open(self.path, "a") as f:
        f.write(json.dumps(line) + "\n")
    except OSError as e:  # a failed write() names no file; say which
      raise OSError(e.errno, e.strerror, self.path) from e

  def close(self) -> None:
    pass


class TensorBoardTracker:
  """Event files under RUN/tensorboard; a resumed run purges the steps past its checkpoint."""

  def __init__(self, log_dir: str, start_step: int):
    try:
      from tensorboardX import SummaryWriter
    except ImportError:
      raise UserError("--log_to tensorboard needs the tensorboardX package: pip install tensorboardX "
                      "(requirements.txt pins the tested version).") from None
    # purge_step: TensorBoard hides events at or past it written before a restart, so a resumed curve has no
    # doubled segment. Steps up to the checkpoint's (start_step) stay, as in the trimmed metrics.jsonl.
    self.writer = SummaryWriter(log_dir, purge_step=start_step + 1 if start_step else None)

  def hparams(self, params: dict) -> None:
    self.writer.add_text("hparams", "```\n" + json.dumps(params, indent=2, default=str) + "\n```", 0)
    for name, value in _flat(params).items():
      if isinstance(value, (int, float)) and not isinstance(value, bool):
        self.writer.add_scalar(f"hparams/{name}", value, 0)

  def log(self, step: int, metrics: dict) -> None:
    for name, value in metrics.items():
      self.writer.add_scalar(name, value, step)
    self.writer.flush()

  def close(self) -> None:
    self.writer.close()


class WandbTracker:
  """A W&B run in RUN/wandb; offline mode (the default) needs no account or network (`wandb sync` later)."""

  def __init__(self, out_dir: str, project: str, run_name: Optional[str], mode: str):
    if mode not in WANDB_MODES:
      raise UserError(f"--wandb_mode must be one of {WANDB_MODES}, got {mode!r}.")
    try:
      import wandb
    except ImportError:
      raise UserError("--log_to wandb needs the wandb package: pip install wandb "
                      "(requirements.txt pins the tested version).") from None
    self.run = wandb.init(project=project, name=run_name or os.path.basename(os.path.abspath(out_dir)),
                          dir=out_dir, mode=mode, reinit="create_new")

  def hparams(self, params: dict) -> None:
    self.run.config.update(_flat(params), allow_val_change=True)

  def log(self, step: int, metrics: dict) -> None:
    self.run.log(dict(metrics), step=step)

  def close(self) -> None:
    self.run.finish()


class Trackers:
  """Fans every call out to several trackers."""

  def __init__(self, trackers: list):
    self.trackers = trackers

  def hparams(self, params: dict) -> None:
    for t in self.trackers:
      t.hparams(params)

  def log(self, step: int, metrics: dict) -> None:
    for t in self.trackers:
      t.log(step, metrics)

  def close(self) -> None:
    for t in self.trackers:
      t.close()


def check_backends(log_to) -> tuple:
  """The requested backends (a comma-separated string or a sequence), validated; jsonl is always among them."""
  if isinstance(log_to, str):
    log_to = [b.strip() for b in log_to.split(",") if b.strip()]
  unknown = [b for b in log_to if b not in BACKENDS]
  if unknown:
    raise UserError(f"--log_to {','.join(unknown)} is not one of {BACKENDS}.")
  return ("jsonl",) + tuple(b for b in dict.fromkeys(log_to) if b != "jsonl")


def open_trackers(log_to, out_dir: str, metrics_path: str, tokens_per_step: int, start_step: int,
                  wandb_project: str = "metasae-jax", wandb_run_name: Optional[str] = None,
                  wandb_mode: str = "offline") -> Trackers:
  """The trackers named in `log_to` (see BACKENDS), writing into the run directory."""
  trackers = []
  try:
    for backend in check_backends(log_to):
      if backend == "jsonl":
        trackers.append(JsonlTracker(metrics_path, tokens_per_step))
      elif backend == "tensorboard":
        trackers.append(TensorBoardTracker(os.path.join(out_dir, TENSORBOARD_DIR), start_step))
      else:
        trackers.append(WandbTracker(out_dir, wandb_project, wandb_run_name, wandb_mode))
  except BaseException:
    Trackers(trackers).close()
    raise
  return Trackers(trackers)
