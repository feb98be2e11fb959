"""Data safety through the real binaries: swapped stores, finished runs, export targets, locks, damaged
checkpoints, disk full, file modes. Every test runs `python -m experiments.*` as a user would."""

import glob
import json
import os
import shutil
import stat
import subprocess
import sys
import time

import numpy as np
import pytest

from metasae_jax.storage import interop, lock, store, synthetic
from tests.conftest import REPO

D = 16
FLAGS = ("--width=32", "--k=4", "--meta_width=4", "--meta_k=2", "--batch_size=32", "--num_tokens=256",
         "--checkpoint_every_steps=2", "--log_every_steps=1", "--noprogress")
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def _run(module, *argv, timeout=300):
  proc = subprocess.run([sys.executable, "-m", module, *argv], cwd=REPO, capture_output=True, text=True,
                        timeout=timeout, env=ENV, check=False)
  proc.lines = [line for line in proc.stderr.splitlines() if line.strip()]
  return proc


def _train(store_path, out_dir, *extra, timeout=300):
  return _run("experiments.train", f"--activations={store_path}", f"--out_dir={out_dir}", *FLAGS, *extra,
              timeout=timeout)


def _one_error_line(proc, keyword):
  assert proc.returncode == 1, proc.stdout + proc.stderr
  assert "Traceback" not in proc.stderr, proc.stderr
  assert len(proc.lines) == 1 and proc.lines[0].startswith("error: "), proc.stderr[-3000:]
  assert keyword in proc.lines[0], proc.lines[0]


def _files(root, with_mtime=False) -> dict:
  """Relative path -> bytes (and mtime_ns) of every file under root; the empty lock file is bookkeeping."""
  out = {}
  for d, _, names in os.walk(root):
    for name in names:
      path = os.path.join(d, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = (f.read(), os.stat(path).st_mtime_ns if with_mtime else None)
  return out


def _artifacts(run_dir) -> dict:
  return {sub: _files(os.path.join(run_dir, sub)) for sub in ("joint", "solo")}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """One store and one uninterrupted run of the binary on it (8 steps, checkpoints at 2, 4, 6, 8)."""
  root = tmp_path_factory.mktemp("safety")
  path = str(root / "store")
  synthetic.write_sparse_store(path, 512, D, context_len=8, shard_tokens=256, num_features=32)
  run = str(root / "whole")
  proc = _train(path, run)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return {"root": str(root), "store": path, "run": run}


def _copy_run(world, dest, keep_artifacts=True) -> str:
  out = str(dest)
  shutil.copytree(world["run"], out)
  if not keep_artifacts:
    for sub in ("joint", "solo"):
      shutil.rmtree(os.path.join(out, sub))
  return out


def test_outputs_respect_the_umask(world):
  mask = os.umask(0o022)
  os.umask(mask)
  for rel in ("joint/sae.safetensors", "joint/cfg.json", "solo/sae.safetensors", "run_config.json"):
    assert stat.S_IMODE(os.stat(os.path.join(world["run"], rel)).st_mode) == 0o666 & ~mask, rel


def test_artifacts_and_run_config_record_the_store_fingerprint(world):
  expected = store.fingerprint(store.open_store(world["store"]))
  with open(os.path.join(world["run"], "run_config.json")) as f:
    assert json.load(f)["store"] == expected
  for sub in ("joint", "solo", "joint/meta"):
    with open(os.path.join(world["run"], sub, "cfg.json")) as f:
      assert json.load(f)["store_fingerprint"] == expected, sub


def test_store_swapped_in_place_is_refused_on_resume(world, tmp_path):
  """Same path, same shape, other data: resuming would train one SAE on two datasets."""
  path = str(tmp_path / "store")
  shutil.copytree(world["store"], path)
  run = _copy_run(world, tmp_path / "run", keep_artifacts=False)
  with open(os.path.join(run, "run_config.json")) as f:
    rc = json.load(f)
  rc["data"]["activations"] = os.path.abspath(path)  # as if this run had been trained on the copy
  with open(os.path.join(run, "run_config.json"), "w") as f:
    json.dump(rc, f)
  shutil.rmtree(path)
  acts = synthetic.sparse_activations(512, D, num_features=32, seed=7)
  store.write_store(path, acts, context_len=8, shard_tokens=256, source={"model": "other", "layer": 3})
  before = _files(run, with_mtime=True)
  proc = _train(path, run)
  _one_error_line(proc, "is not the one this run")
  assert "source:" in proc.lines[0] and "chunk checksums differ" in proc.lines[0], proc.lines[0]
  assert _files(run, with_mtime=True) == before


def test_run_without_fingerprint_resumes_and_records_it(world, tmp_path):
  run = _copy_run(world, tmp_path / "old", keep_artifacts=False)
  rc_path = os.path.join(run, "run_config.json")
  with open(rc_path) as f:
    rc = json.load(f)
  rc.pop("store")
  with open(rc_path, "w") as f:
    json.dump(rc, f)
  proc = _train(world["store"], run)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(rc_path) as f:
    assert json.load(f)["store"] == store.fingerprint(store.open_store(world["store"]))
  assert _artifacts(run) == _artifacts(world["run"])


def test_rerun_of_a_finished_evaluated_run_changes_nothing(world, tmp_path):
  run = _copy_run(world, tmp_path / "done")
  ev = _run("experiments.evaluate", f"--run_dir={run}", f"--activations={world['store']}", "--model=none",
            "--allow_train_tokens",  # this test is about reruns, not about held-out data
            "--meta_fve_steps=0", "--batch_size=64")
  assert ev.returncode == 0, ev.stderr[-3000:]
  with open(os.path.join(run, "joint", "sae.safetensors"), "rb") as f:
    assert b"threshold" in f.read()  # evaluate calibrated and saved thresholds
  before = _files(run, with_mtime=True)
  time.sleep(0.01)
  proc = _train(world["store"], run)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "already finished; nothing changed" in proc.stdout
  assert _files(run, with_mtime=True) == before


@pytest.mark.parametrize("flag,keyword", [("--seed=-1", "--seed must be in"),
                                          ("--checkpoint_every_steps=0", "--checkpoint_every_steps must be >= 1"),
                                          ("--log_every_steps=0", "--log_every_steps must be >= 1")])
def test_bad_flag_leaves_no_trace_and_the_corrected_command_works(world, tmp_path, flag, keyword):
  fresh, existing = tmp_path / "fresh", tmp_path / "existing"
  existing.mkdir()
  _one_error_line(_train(world["store"], fresh, flag), keyword)
  _one_error_line(_train(world["store"], existing, flag), keyword)
  assert not fresh.exists() and os.listdir(existing) == []
  if flag == "--seed=-1":  # the corrected command then just works (once is enough)
    proc = _train(world["store"], existing)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _artifacts(str(existing)) == _artifacts(world["run"])


def test_failure_after_claiming_a_fresh_dir_removes_it(world, tmp_path):
  """A NaN in the first batch: the run claimed the directory, did no work, and must leave nothing."""
  path = str(tmp_path / "nan")
  acts = synthetic.sparse_activations(512, D, num_features=32)
  acts[:, 0] = np.nan
  store.write_store(path, acts, context_len=8, shard_tokens=256)
  _one_error_line(_train(path, tmp_path / "out"), "non-finite activations")
  assert not (tmp_path / "out").exists()


def _export(run_dir, out):
  return _run("experiments.export_sae", f"--run_dir={run_dir}", f"--out_dir={out}", "--allow_approximate")


def test_export_sae_refuses_targets_it_did_not_write(world, tmp_path):
  run = _copy_run(world, tmp_path / "run")
  other = _copy_run(world, tmp_path / "other")
  os.symlink(run, tmp_path / "link")
  foreign = tmp_path / "foreign"
  foreign.mkdir()
  (foreign / "notes.txt").write_text("mine")
  before = _files(str(tmp_path), with_mtime=True)
  for target, keyword in ((tmp_path / "link", "which is or holds --run_dir"),
                          (other, "is a training run directory"),
                          (world["store"], "is an activation store"),
                          (foreign, "holds files export_sae did not write"),
                          (tmp_path, "which is or holds --run_dir")):
    _one_error_line(_export(run, target), keyword)
  assert _files(str(tmp_path), with_mtime=True) == before
  # Its own previous export may be replaced, also through a symlink.
  out = tmp_path / "exported"
  assert _export(run, out).returncode == 0
  os.symlink(out, tmp_path / "exported_link")
  again = _export(other, tmp_path / "exported_link")
  assert again.returncode == 0, again.stderr
  assert (out / interop.EXPORT_MARKER).is_file() and any((out / "joint").glob("*/cfg.json"))


def test_two_trainers_on_one_out_dir_exactly_one_runs(world, tmp_path):
  out = tmp_path / "run"
  first = subprocess.Popen([sys.executable, "-m", "experiments.train", f"--activations={world['store']}",
                            f"--out_dir={out}", *FLAGS[:-4], "--num_tokens=64000", "--checkpoint_every_steps=50",
                            "--log_every_steps=1", "--noprogress"],
                           cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 240
    while not (out / "metrics.jsonl").exists() and time.time() < deadline and first.poll() is None:
      time.sleep(0.05)
    assert first.poll() is None, "the first trainer finished before the second could start"
    second = _run("experiments.train", f"--activations={world['store']}", f"--out_dir={out}", *FLAGS[:-4],
                  "--num_tokens=64000", "--checkpoint_every_steps=50", "--log_every_steps=1", "--noprogress")
    _one_error_line(second, f"in use by process {first.pid}")
  finally:
    _, err = first.communicate(timeout=600)
  assert first.returncode == 0, err[-3000:]
  with open(out / "metrics.jsonl") as f:
    steps = [json.loads(line)["step"] for line in f]
  assert steps == list(range(1, 2001))


def test_a_killed_lock_holder_does_not_block(world, tmp_path):
  out = tmp_path / "run"
  holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from metasae_jax.storage import lock; "
                             f"lock.DirLock({str(out)!r}, 'x').acquire(); print('held', flush=True); time.sleep(600)"],
                            cwd=REPO, stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline().strip() == "held"
  _one_error_line(_train(world["store"], out), f"in use by process {holder.pid}")
  holder.kill()
  holder.wait()
  proc = _train(world["store"], out)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert _artifacts(str(out)) == _artifacts(world["run"])


def _latest_checkpoint(run) -> str:
  ck = os.path.join(run, "checkpoints")
  return os.path.join(ck, str(max(int(n) for n in os.listdir(ck) if n.isdigit())))


def _damage(step_dir, kind):
  data = max(glob.glob(os.path.join(step_dir, "state", "ocdbt.process_0", "d", "*")), key=os.path.getsize)
  if kind == "missing item":
    shutil.rmtree(os.path.join(step_dir, "cursor"))
  elif kind == "truncated data":
    with open(data, "rb") as f:
      raw = f.read()
    with open(data, "wb") as f:
      f.write(raw[:len(raw) // 2])
  elif kind == "bit-flipped data":
    with open(data, "rb") as f:
      raw = bytearray(f.read())
    raw[len(raw) // 2] ^= 0x10
    with open(data, "wb") as f:
      f.write(bytes(raw))
  elif kind == "garbage cursor":
    with open(os.path.join(step_dir, "cursor", "metadata"), "w") as f:
      f.write('{"batches_consumed": "garbage"}')


@pytest.mark.parametrize("kind", ["missing item", "truncated data", "bit-flipped data", "garbage cursor"])
def test_damaged_latest_checkpoint_falls_back_and_ends_bit_identical(world, tmp_path, kind):
  run = _copy_run(world, tmp_path / "run", keep_artifacts=False)  # artifacts gone: not finished, resumes
  _damage(_latest_checkpoint(run), kind)
  proc = _train(world["store"], run)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  warnings = [line for line in proc.lines if line.startswith("warning: checkpoint 8")]
  assert len(warnings) == 1 and len(proc.lines) == 1, proc.stderr[-3000:]
  assert _artifacts(run) == _artifacts(world["run"])
  assert _metrics_without_wall_clock(run) == _metrics_without_wall_clock(world["run"])


def _metrics_without_wall_clock(run: str) -> list:
  """metrics.jsonl rows minus tokens_per_s, the one wall-clock field (everything else is deterministic)."""
  with open(os.path.join(run, "metrics.jsonl")) as f:
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"} for line in f if line.strip()]


def test_no_checkpoint_restores_is_one_line(world, tmp_path):
  run = _copy_run(world, tmp_path / "run", keep_artifacts=False)
  for step_dir in glob.glob(os.path.join(run, "checkpoints", "[0-9]*")):
    _damage(step_dir, "garbage cursor")
  before = _files(run)
  proc = _train(world["store"], run)
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert proc.lines[-1].startswith("error: no checkpoint in") and "restores" in proc.lines[-1]
  assert _files(run) == before


def _mount_tmpfs(path, options) -> None:
  os.makedirs(path, exist_ok=True)
  proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True,
                        text=True, check=False)
  if proc.returncode != 0:
    pytest.skip(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): {proc.stderr.strip()}")


def test_disk_full_is_one_line_and_rerun_on_free_space_finishes(world, tmp_path):
  mnt = tmp_path / "small"
  _mount_tmpfs(mnt, "size=96k")  # room for the config and a log, not for a checkpoint
  try:
    proc = _train(world["store"], mnt / "run")
    _one_error_line(proc, "No space left on device")
    assert "the disk is full" in proc.lines[0]
    out = mnt / "export"
    filler = mnt / "filler"
    with open(filler, "wb", buffering=0) as f:  # fill the disk, then free one page: the export starts, then runs out
      try:
        while True:
          f.write(b"\0" * 4096)
      except OSError:
        pass
    os.truncate(filler, max(0, os.path.getsize(filler) - 4096))
    exp = _export(world["run"], out)
    _one_error_line(exp, "No space left on device")
    assert not out.exists()  # a failed first export leaves nothing behind
  finally:
    subprocess.run(["umount", str(mnt)], check=False)


def test_a_failed_save_drops_writer_noise_that_outlives_it(capfd):
  """Tensorstore callbacks keep printing tracebacks to fd 2 for a moment after a failed save has raised (CI
  once caught the tail of one on the terminal). None of it may leak; on success, held output is replayed."""
  from metasae_jax.training import checkpoint
  import threading

  def late_writer():  # starts inside the window, goes on after the save has raised
    for i in range(6):
      os.write(2, f"Traceback (most recent call last):\n  noise {i}\nRuntimeError: Event loop is closed\n".encode())
      time.sleep(0.1)

  writer = threading.Thread(target=late_writer)
  with pytest.raises(OSError):
    with checkpoint._orbax_quiet():
      writer.start()
      time.sleep(0.05)
      raise OSError(28, "No space left on device")
  writer.join()
  assert capfd.readouterr().err == ""
  with checkpoint._orbax_quiet():
    os.write(2, b"kept\n")
  assert capfd.readouterr().err == "kept\n"


def test_read_only_and_file_out_dirs_are_one_line(world, tmp_path):
  ro = tmp_path / "ro"
  _mount_tmpfs(ro, "ro,size=64k")
  try:
    _one_error_line(_train(world["store"], ro / "run"), "is not writable")
    _one_error_line(_export(world["run"], ro / "x"), "is not writable")
  finally:
    subprocess.run(["umount", str(ro)], check=False)
  (tmp_path / "file").write_text("x")
  _one_error_line(_train(world["store"], tmp_path / "file"), "is a file, not a directory")
  _one_error_line(_train(world["store"], tmp_path / "file" / "run"), "cannot be created")
  assert sorted(os.listdir(tmp_path)) == ["file", "ro"]


def test_evaluate_refuses_a_store_with_nan_like_training(world, tmp_path):
  path = str(tmp_path / "nan")
  acts = synthetic.sparse_activations(512, D, num_features=32)
  acts[300, 5] = np.inf
  store.write_store(path, acts, context_len=8, shard_tokens=256)
  before = _files(world["run"], with_mtime=True)
  proc = _run("experiments.evaluate", f"--run_dir={world['run']}", f"--activations={path}", "--model=none")
  _one_error_line(proc, "non-finite activations (NaN/Inf) at token 300")
  assert f"chunk 1 (tokens 256-511) of {path}" in proc.lines[0]
  assert _files(world["run"], with_mtime=True) == before


def test_lock_names_the_holder_in_process(tmp_path):
  held = lock.DirLock(str(tmp_path / "d"), "store").acquire()
  try:
    with pytest.raises(Exception, match=f"in use by process {os.getpid()}"):
      lock.DirLock(str(tmp_path / "d"), "store").acquire()
  finally:
    held.release()
  lock.DirLock(str(tmp_path / "d"), "store").acquire().release()


def test_ctrl_c_in_a_binary_without_a_step_loop_is_one_line(tmp_path):
  script = ("from experiments import cli\n"
            "def main(argv):\n"
            "  raise KeyboardInterrupt\n"
            "cli.run(main)\n")
  proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, env=ENV,
                        timeout=120, check=False)
  assert proc.returncode == 130 and "Traceback" not in proc.stderr, proc.stderr
  assert [line for line in proc.stderr.splitlines() if line.strip()] == [
      "interrupted; rerun the same command to resume (finished parts are kept)"]
