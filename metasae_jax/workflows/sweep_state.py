"""What is on disk for one sweep point: trained? evaluated? its status record, its lock, and so its state.

Layout inside a sweep directory OUT: OUT/NAME/ is the point's run directory (what `experiments.train`
writes, plus report.json once evaluated); OUT/logs/ holds each point's stage logs and specs, its lock
NAME.lock (held by whoever is running the point, for the whole point: training and evaluation) and
NAME.status.json (who ran it last, when, and how it ended).
"""

import json
import os
import socket
import time
from typing import Optional

from metasae_jax.storage import artifact, atomic, lock

LOGS = "logs"
REPORT = "report.json"
SAE_DIRS = ("joint", "solo", os.path.join("joint", "meta"))
FINISHED, TRAINED, RUNNING, FAILED, INTERRUPTED, NOT_STARTED = (
    "finished", "trained", "running", "failed", "interrupted", "not started")
STATES = (FINISHED, TRAINED, RUNNING, FAILED, INTERRUPTED, NOT_STARTED)
"""A point's state: finished (trained and, if the sweep evaluates, evaluated); trained (evaluation still to
run); running (someone holds its lock); failed (its last run ended in an error); interrupted (killed or
stopped mid-way: rerunning resumes from its checkpoint); not started."""


def is_trained(run_dir: str) -> bool:
  """Artifacts present (joint, meta, and solo unless --nobaseline) with the final checkpoint they came from."""
  try:
    with open(os.path.join(run_dir, "joint", artifact.CFG)) as f:
      cfg = json.load(f)
    final = cfg["trained_tokens"] // cfg["train_config"]["batch_size"]
    baseline = cfg["train_config"].get("baseline", True)
  except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
    return False
  saes = [d for d in SAE_DIRS if baseline or d != "solo"]
  return (all(os.path.exists(os.path.join(run_dir, d, artifact.WEIGHTS)) for d in saes)
          and os.path.isdir(os.path.join(run_dir, "checkpoints", str(final))))


def is_evaluated(run_dir: str) -> bool:
  """A report.json that describes the SAE weights on disk now, by content (a retrained point is evaluated
  again; a rerun that changed no byte is not). Reports without recorded digests fall back to file times."""
  path = os.path.join(run_dir, REPORT)
  try:
    with open(path) as f:
      recorded = json.load(f).get("artifact_sha256")
  except (OSError, ValueError, AttributeError):
    return False
  present = [s for s in artifact.SAE_NAMES if os.path.exists(os.path.join(run_dir, s, artifact.WEIGHTS))]
  if isinstance(recorded, dict) and recorded:
    return all(recorded.get(s) == artifact.weights_digest(os.path.join(run_dir, s)) for s in present)
  return all(os.path.getmtime(path) >= os.path.getmtime(os.path.join(run_dir, s, artifact.WEIGHTS))
             for s in present)


def point_lock(out_dir: str, name: str) -> lock.DirLock:
  """The lock a point's runner holds from before its first write until its status is recorded."""
  return lock.DirLock(os.path.join(out_dir, LOGS), f"sweep point {name}", file_name=f"{name}.lock")


def _status_path(out_dir: str, name: str) -> str:
  return os.path.join(out_dir, LOGS, f"{name}.status.json")


def write_status(out_dir: str, name: str, state: str, **fields) -> dict:
  """Records who runs or ran the point (host, pid, times) and how it ended; only the lock holder calls this."""
  record = {"state": state, "host": socket.gethostname(), "pid": os.getpid(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **fields}
  atomic.write_json(_status_path(out_dir, name), record)
  return record


def read_status(out_dir: str, name: str) -> dict:
  """The point's last status record ({} when there is none or it is unreadable)."""
  try:
    with open(_status_path(out_dir, name)) as f:
      record = json.load(f)
  except (OSError, ValueError):
    return {}
  return record if isinstance(record, dict) else {}


def tail(path: Optional[str], lines: int = 15) -> str:
  """Last lines of a log, with progress-bar carriage returns turned into line breaks."""
  try:
    with open(path, errors="replace") as f:
      text = f.read()
  except (OSError, TypeError):
    return ""
  rows = [r for r in text.replace("\r", "\n").splitlines() if r.strip()]
  return "\n".join(rows[-lines:])


def _checkpoint_steps(run_dir: str) -> list:
  try:
    return sorted(int(n) for n in os.listdir(os.path.join(run_dir, "checkpoints")) if n.isdigit())
  except OSError:
    return []


def point_state(out_dir: str, name: str, evaluate: bool) -> dict:
  """{"state": one of STATES, "detail": one line} for the point NAME; failed points add "error", "log" and
  "stderr_tail". Reads only: a running point is seen through its lock, never by taking it."""
  run_dir = os.path.join(out_dir, name)
  status = read_status(out_dir, name)
  holder = lock.holder(point_lock(out_dir, name).path)
  if holder is not None:
    where = f" on {status['host']}" if status.get("host") and status.get("host") != socket.gethostname() else ""
    stage = f" ({status['stage']})" if status.get("state") == RUNNING and status.get("stage") else ""
    return {"state": RUNNING, "detail": f"run by {holder}{where}{stage}"}
  trained = is_trained(run_dir)
  if trained and (not evaluate or is_evaluated(run_dir)):
    return {"state": FINISHED, "detail": "trained and evaluated" if evaluate else "trained"}
  if status.get("state") == FAILED:
    return {"state": FAILED, "detail": status.get("error", "failed"), "error": status.get("error", "failed"),
            "log": status.get("log"), "stderr_tail": tail(status.get("log"))}
  if trained:
    return {"state": TRAINED, "detail": "trained; not evaluated yet"}
  steps = _checkpoint_steps(run_dir)
  if steps or os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
    at = f"its checkpoint at step {steps[-1]}" if steps else "the start (no checkpoint yet)"
    return {"state": INTERRUPTED, "detail": f"stopped mid-way; rerunning resumes from {at}"}
  return {"state": NOT_STARTED, "detail": "not started"}
