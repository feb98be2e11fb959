"""Crash safety: binaries SIGKILLed at chosen moments and rerun equal uninterrupted runs; NaN guards."""

import json
import os
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest

from metasae_jax.storage import atomic, store, synthetic
from metasae_jax.training import checkpoint, data, sharding, trainer
from metasae_jax.lm import export
from metasae_jax.core.config import TrainConfig
from metasae_jax.core.errors import UserError
from metasae_jax.training.trainer import RunConfig, train_and_save
from tests.conftest import REPO
from tests.test_export import C, _sentences, model_dir  # noqa: F401  (model_dir is a fixture)

TRAIN_FLAGS = ("--width=64", "--k=4", "--meta_width=6", "--meta_k=2", "--batch_size=32",
               "--n_primary_steps=2", "--n_meta_steps=2", "--lr=1e-3", f"--num_tokens={32 * 120}",
               "--checkpoint_every_steps=10", "--log_every_steps=5")


def _snapshot(root) -> dict:
  """Relative path -> bytes of every file under root (directories map to None)."""
  out = {}
  for d, dirs, files in os.walk(root):
    for name in dirs:
      out[os.path.relpath(os.path.join(d, name), root)] = None
    for name in files:
      with open(os.path.join(d, name), "rb") as f:
        out[os.path.relpath(os.path.join(d, name), root)] = f.read()
  return out


def _start(module: str, *flags, log=None) -> subprocess.Popen:
  log = log or subprocess.DEVNULL
  return subprocess.Popen([sys.executable, "-m", module, *flags], cwd=REPO, stdout=log, stderr=log)


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 240.0, each=None) -> bool:
  """SIGKILLs proc once ready() holds. Returns True if it was still running then (the kill landed)."""
  end = time.time() + timeout
  while proc.poll() is None and time.time() < end:
    if each is not None:
      each()
    if ready():
      proc.send_signal(signal.SIGKILL)
      proc.wait()
      return True
    time.sleep(0.002)
  proc.wait(timeout=max(1.0, end - time.time()))
  return False


def _ls(path) -> list:
  try:
    return os.listdir(path)
  except OSError:
    return []


def _steps_logged(run_dir) -> list:
  try:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
      return [json.loads(line)["step"] for line in f if line.endswith("\n")]
  except (OSError, ValueError):
    return []


def _done_checkpoints(run_dir) -> list:
  return sorted(int(n) for n in _ls(os.path.join(run_dir, "checkpoints")) if n.isdigit())


@pytest.fixture(scope="module")
def train_store(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("crash") / "store")
  synthetic.write_sparse_store(path, 1536, 16, context_len=8, shard_tokens=512, num_features=48)
  return path


def test_train_killed_at_many_moments_resumes_bit_identical(train_store, tmp_path):
  flags = (f"--activations={train_store}",) + TRAIN_FLAGS
  whole, cut = str(tmp_path / "whole"), str(tmp_path / "cut")
  reference = _start("experiments.train", *flags, f"--out_dir={whole}")  # runs alongside the kills

  def mid_interval():
    done = _done_checkpoints(cut)
    return bool(done) and any(s > done[-1] + 2 for s in _steps_logged(cut))

  moments = {
      "right after start": lambda: os.path.isdir(cut),
      "mid checkpoint interval": mid_interval,
      "while a checkpoint is written": lambda: any("tmp" in n for n in _ls(os.path.join(cut, "checkpoints"))),
      "while artifacts are written": lambda: os.path.isdir(os.path.join(cut, "joint")),
  }
  landed = []
  for name, ready in moments.items():
    if _kill_when(_start("experiments.train", *flags, f"--out_dir={cut}"), ready):
      landed.append(name)
  with open(tmp_path / "log", "wb") as log:
    final = _start("experiments.train", *flags, f"--out_dir={cut}", log=log)
    assert final.wait(timeout=240) == 0, (tmp_path / "log").read_text()[-2000:]
  assert reference.wait(timeout=240) == 0
  # The first two moments always come before the end of a 120-step run; the others usually do.
  print("kills landed:", landed)
  assert {"right after start", "mid checkpoint interval"} <= set(landed), landed
  for sub in ("joint", "solo"):  # joint/ holds joint/meta/
    assert _snapshot(os.path.join(cut, sub)) == _snapshot(os.path.join(whole, sub)), sub
  assert set(_snapshot(os.path.join(cut, "joint", "meta"))) == {"cfg.json", "sae.safetensors"}
  assert _metrics_rows(cut) == _metrics_rows(whole)
  assert not [n for n in _ls(cut) if atomic.is_temp(n)]


def _interrupt_when(flags, out_dir, ready, signum) -> subprocess.CompletedProcess:
  """Starts train, sends signum once ready() holds; returns (exit code, stderr lines)."""
  proc = subprocess.Popen([sys.executable, "-m", "experiments.train", *flags, f"--out_dir={out_dir}",
                           "--noprogress"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  end = time.time() + 240
  while proc.poll() is None and time.time() < end and not ready():
    time.sleep(0.002)
  sent = proc.poll() is None
  if sent:
    proc.send_signal(signum)
  out, err = proc.communicate(timeout=240)
  return sent, proc.returncode, [line for line in err.splitlines() if line.strip()], out


def test_sigint_during_compilation_and_mid_run_then_resume_is_bit_identical(train_store, tmp_path):
  flags = (f"--activations={train_store}",) + TRAIN_FLAGS
  whole, cut = str(tmp_path / "whole"), str(tmp_path / "cut")
  reference = _start("experiments.train", *flags, f"--out_dir={whole}", "--noprogress")
  # The run directory is claimed right before the step is compiled: the signal lands in set-up/compilation.
  seen = []

  def compiling():  # a moment after the claim: the first step is being compiled (seconds on this CPU)
    if os.path.exists(os.path.join(cut, "run_config.json")):
      seen.append(time.time())
    return bool(seen) and time.time() - seen[0] > 0.3 and not _steps_logged(cut)

  cases = [("compilation", compiling, signal.SIGINT, 130),
           ("mid-run", lambda: any(s >= 35 for s in _steps_logged(cut)), signal.SIGINT, 130),
           ("mid-run SIGTERM", lambda: any(s >= 75 for s in _steps_logged(cut)), signal.SIGTERM, 143)]
  stopped_at = []
  for name, ready, signum, code in cases:
    sent, rc, lines, _ = _interrupt_when(flags, cut, ready, signum)
    assert sent, f"{name}: the run ended before the signal"
    assert rc == code, (name, rc, lines)
    assert len(lines) == 1, (name, lines)
    step = int(lines[0].split()[3].rstrip(";"))
    assert lines[0] == f"interrupted at step {step}; rerun the same command to resume", lines
    assert step == 0 or _done_checkpoints(cut)[-1] == step, (name, step, _done_checkpoints(cut))
    stopped_at.append(step)
  assert stopped_at[0] <= 1 and stopped_at[0] < stopped_at[1] < stopped_at[2] < 120, stopped_at
  with open(tmp_path / "log", "wb") as log:
    assert _start("experiments.train", *flags, f"--out_dir={cut}", log=log).wait(timeout=240) == 0
  assert reference.wait(timeout=240) == 0
  for sub in ("joint", "solo"):
    assert _snapshot(os.path.join(cut, sub)) == _snapshot(os.path.join(whole, sub)), sub
  assert _metrics_rows(cut) == _metrics_rows(whole)


@pytest.fixture(scope="module")
def big_corpus(tmp_path_factory):
  path = tmp_path_factory.mktemp("crash_corpus") / "docs.jsonl"
  path.write_text("".join(json.dumps({"text": s}) + "\n" for s in _sentences(1500, seed=3)))
  return str(path)


def test_export_killed_and_rerun_equals_uninterrupted(model_dir, big_corpus, tmp_path):  # noqa: F811
  flags = (f"--model={model_dir}", "--layer=1", f"--corpus={big_corpus}", f"--context_len={C}",
           f"--num_tokens={300 * C}", f"--chunk_tokens={4 * C}", "--batch_size=3")
  whole, cut = str(tmp_path / "whole"), str(tmp_path / "cut")
  export.export_activations(export.ExportConfig(
      out_dir=whole, model=model_dir, layer=1, corpus=big_corpus, context_len=C, num_tokens=300 * C,
      chunk_tokens=4 * C, batch_size=3, progress=False))
  seen = {"manifests": 0}

  def never_counts_a_partial_chunk():
    try:
      with open(os.path.join(cut, "zarr.json"), "rb") as f:
        raw = f.read()
    except OSError:
      return
    if raw != seen.get("last"):
      seen["last"] = raw
      seen["manifests"] += 1
      s = store.open_store(cut)  # every counted chunk complete and matching its checksum, or UserError
      if s.num_chunks:
        s.read_chunk(s.num_chunks - 1)

  def chunks_counted():
    return json.loads(seen["last"])["attributes"]["num_tokens"] // (4 * C) if seen.get("last") else 0

  moments = {
      "after two chunks": lambda: chunks_counted() >= 2,
      "with a chunk written but not yet counted": lambda: chunks_counted() > 2 and os.path.exists(
          os.path.join(cut, "activations", "c", str(chunks_counted()), "0")),
  }
  landed = []
  for name, ready in moments.items():
    proc = _start("experiments.export_activations", *flags, f"--out_dir={cut}")
    if _kill_when(proc, ready, each=never_counts_a_partial_chunk):
      landed.append(name)
    never_counts_a_partial_chunk()
  with open(tmp_path / "log", "wb") as log:
    final = _start("experiments.export_activations", *flags, f"--out_dir={cut}", log=log)
    assert final.wait(timeout=240) == 0, (tmp_path / "log").read_text()[-2000:]
  print("kills landed:", landed)
  assert "after two chunks" in landed, landed
  assert seen["manifests"] >= 2
  assert _snapshot(cut) == _snapshot(whole)  # also: no temp file left behind
  assert store.open_store(cut, require_tokens=True).num_tokens == 300 * C


def test_stale_temp_files_do_not_block_or_survive_a_rerun(tmp_path):
  """What a kill inside an atomic write leaves: a dot-temp file next to its target."""
  d = tmp_path / "d"
  atomic.write_text(str(d / "a.txt"), "x")
  (d / ".manifest.json.abc123.tmp").write_bytes(b"half")
  assert atomic.is_temp(".manifest.json.abc123.tmp") and not atomic.is_temp("a.txt")
  assert atomic.remove_stale_temps(str(d)) == [".manifest.json.abc123.tmp"]
  assert os.listdir(d) == ["a.txt"]
  # An exporter killed before its first manifest rename leaves only a temp file: still resumable.
  out = tmp_path / "store"
  out.mkdir()
  (out / ".manifest.json.x1.tmp").write_text("{")
  assert export._check_existing(export.ExportConfig(out_dir=str(out), model="m", corpus="c")) is None


CFG = TrainConfig(d_model=16, width=64, k=4, meta_width=6, meta_k=2, batch_size=128, seed=0,
                  n_primary_steps=2, n_meta_steps=2, lr=1e-3)


def _run(store_path, out_dir, **kw):
  return RunConfig(activations=store_path, out_dir=str(out_dir), num_tokens=8 * 128,
                   checkpoint_every_steps=2, log_every_steps=1, progress=False, **kw)


@pytest.fixture
def saved_checkpoints(monkeypatch):
  """Records each checkpoint directory's files right after it is saved."""
  snaps = {}
  real = checkpoint.Checkpointer.save

  def save(self, step, state, cursor):
    real(self, step, state, cursor)
    self.wait()
    root = self._mgr.directory
    snaps[step] = _snapshot(os.path.join(str(root), str(step)))

  monkeypatch.setattr(checkpoint.Checkpointer, "save", save)
  return snaps


def _latest_intact(run_dir, snaps) -> int:
  latest = _done_checkpoints(run_dir)[-1]
  assert _snapshot(os.path.join(run_dir, "checkpoints", str(latest))) == snaps[latest]
  return latest


def test_nan_batch_names_step_and_shard_and_keeps_last_checkpoint(tmp_path, saved_checkpoints):
  acts = synthetic.sparse_activations(1536, 16, num_features=48)
  source = data.BatchSource(store.write_store(str(tmp_path / "probe"), acts, context_len=8,
                                              shard_tokens=512), 128, CFG.seed)
  # Poison a token of chunk 1 that the batch of step 6 (position 5) reads first.
  first_seen = {}
  for position in range(8):
    for u in source.global_indices(position):
      first_seen.setdefault(int(u), position)
  token = next(t for t, p in sorted(first_seen.items()) if p == 5 and 512 <= t < 1024)
  acts[token, 3] = np.nan
  bad = str(tmp_path / "bad")
  store.write_store(bad, acts, context_len=8, shard_tokens=512)
  out = tmp_path / "r"
  with pytest.raises(UserError, match=r"step 6 .*chunk 1 \(tokens 512-1023\)"):
    train_and_save(CFG, _run(bad, out))
  assert _latest_intact(str(out), saved_checkpoints) == 4
  assert not os.path.exists(out / "joint")


def test_nan_loss_names_step_keeps_checkpoint_and_resumes(tmp_path, monkeypatch, saved_checkpoints):
  path = str(tmp_path / "s")
  synthetic.write_sparse_store(path, 1536, 16, context_len=8, shard_tokens=512, num_features=48)
  real_step = sharding.train_step

  def diverges_at_step_5(state, batch, **axes):
    return real_step(state, jnp.where(state.step == 4, jnp.nan, batch), **axes)

  monkeypatch.setattr(sharding, "train_step", diverges_at_step_5)
  with pytest.raises(UserError, match=r"non-finite .* at step 5;.*step 4\) is intact"):
    train_and_save(CFG, _run(path, tmp_path / "cut"))
  assert _latest_intact(str(tmp_path / "cut"), saved_checkpoints) == 4
  assert _steps_logged(tmp_path / "cut") == [1, 2, 3, 4]

  monkeypatch.setattr(sharding, "train_step", real_step)
  train_and_save(CFG, _run(path, tmp_path / "cut"))
  train_and_save(CFG, _run(path, tmp_path / "whole"))
  for sub in ("joint", "solo"):
    assert _snapshot(tmp_path / "cut" / sub) == _snapshot(tmp_path / "whole" / sub), sub
  assert _steps_logged(tmp_path / "cut") == _steps_logged(tmp_path / "whole")


def test_torn_metrics_line_is_dropped_on_resume(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"ste')
  trainer._trim_metrics(str(path), 2)
  assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
  path.write_text('{"step": 1}\n{"step"')
  trainer._trim_metrics(str(path), 4)
  assert path.read_text() == '{"step": 1}\n'



def _metrics_rows(run_dir: str) -> list:
  """metrics.jsonl rows without tokens_per_s, the one wall-clock field; every other value must match exactly."""
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"} for line in f if line.strip()]
