"""Orbax training checkpoints: train state and data cursor saved together.

These are for resuming, not for publishing: a finished SAE is an artifact
(`artifact.py`), written separately.
"""

import os
from typing import Optional

import jax
import orbax.checkpoint as ocp

from metasae_jax.core.train_step import TrainState


class Checkpointer:
  """Saves {state, cursor} every so often; restores the latest into a template state."""

  def __init__(self, directory: str, max_to_keep: int = 2):
    self._mgr = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=False),
        item_names=("state", "cursor"))

  def latest_step(self) -> Optional[int]:
    return self._mgr.latest_step()

  def save(self, step: int, state: TrainState, cursor: dict) -> None:
    self._mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                 cursor=ocp.args.JsonSave(cursor)))

  def restore(self, template: TrainState, step: Optional[int] = None) -> tuple[TrainState, dict]:
    step = self._mgr.latest_step() if step is None else step
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    out = self._mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                          cursor=ocp.args.JsonRestore()))
    return out["state"], out["cursor"]

  def wait(self) -> None:
    self._mgr.wait_until_finished()

  def close(self) -> None:
    self._mgr.wait_until_finished()
    self._mgr.close()
