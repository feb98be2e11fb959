"""Sweeps beyond one machine and sweeps that get killed: --point_index / --summarize / --list_points, the point
lock and sweep.json, workers that die with the sweep (SIGKILL), and a rerun that equals an uninterrupted sweep."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from metasae_jax.storage import artifact, synthetic
from metasae_jax.workflows import sweep, sweep_state
from tests.conftest import fake_devices_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ["lam0_sig1", "lam0.3_sig1", "lam1_sig1"]  # --lambda2=0,0.3,1 --sigma_sq=1, in grid order
TRAIN_FLAGS = ["--width=64", "--k=4", "--meta_width=6", "--meta_k=2", "--batch_size=128", "--n_primary_steps=2",
               "--n_meta_steps=2", "--lr=1e-3", "--num_tokens=3072", "--checkpoint_every_steps=2",
               "--log_every_steps=1"]  # 24 steps: long enough to be killed mid-way


def _env(devices: int = 0) -> dict:
  env = dict(os.environ, PYTHONPATH=REPO)
  if devices:
    env["XLA_FLAGS"] = fake_devices_flags(devices)
  return env


def _args(stores, out_dir: str, lambda2: str = "0,0.3,1") -> list:
  train_store, heldout = stores
  return [f"--activations={train_store}", f"--out_dir={out_dir}", f"--lambda2={lambda2}", "--sigma_sq=1",
          f"--eval_activations={heldout}", "--eval_meta_fve_steps=0",
          # Two data streams in every launch, so one process and two processes read the same batch order.
          "--data_streams=2"] + TRAIN_FLAGS


def _sweep(args: list, **kw) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "experiments.sweep", *args], cwd=REPO, env=kw.pop("env", _env()),
                        capture_output=True, text=True, timeout=600, **kw)


def _start(args: list, env=None) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-m", "experiments.sweep", *args], cwd=REPO, env=env or _env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _weights(run_dir: str) -> dict:
  return {sub: artifact.load_sae_files(os.path.join(run_dir, sub))[0] for sub in ("joint", "solo", "joint/meta")}


def _alive(pid: int) -> bool:
  """A process that exists and is not a zombie (a dead orphan waiting for a reaper counts as dead)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except OSError:
    return False


def _processes_mentioning(text: str) -> list:
  """PIDs of live processes whose command line contains `text`."""
  found = []
  for entry in os.listdir("/proc"):
    if entry.isdigit() and int(entry) != os.getpid():
      try:
        with open(f"/proc/{entry}/cmdline", "rb") as f:
          cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
      except OSError:
        continue
      if text in cmdline and _alive(int(entry)):
        found.append(int(entry))
  return found


def _children(pid: int) -> list:
  kids = []
  for entry in os.listdir("/proc"):
    if entry.isdigit():
      try:
        with open(f"/proc/{entry}/stat") as f:
          if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
            kids.append(int(entry))
      except (OSError, ValueError, IndexError):
        continue
  return kids


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
  root = tmp_path_factory.mktemp("stores")
  synthetic.write_sparse_store(str(root / "train"), 1024, 16, context_len=8, shard_tokens=512, num_features=48)
  synthetic.write_sparse_store(str(root / "heldout"), 512, 16, seed=1, context_len=8, num_features=48)
  return str(root / "train"), str(root / "heldout")


@pytest.fixture(scope="module")
def reference(stores, tmp_path_factory):
  """The sweep run as a scheduler would: points 0 and 1 as two concurrent launches, then point 2, then
  --summarize and --list_points."""
  out = str(tmp_path_factory.mktemp("ref") / "grid")
  args = _args(stores, out)
  first = [_start(args + [f"--point_index={i}"]) for i in (0, 1)]
  outputs = [p.communicate(timeout=600) for p in first]
  for p, (_, err) in zip(first, outputs):
    assert p.returncode == 0, err[-3000:]
  last = _sweep(args + ["--point_index=2"])
  assert last.returncode == 0, last.stderr[-3000:]
  summary = _sweep(args + ["--summarize"])
  assert summary.returncode == 0, summary.stderr[-3000:]
  after = _sweep(args + ["--list_points"])
  with open(os.path.join(out, "summary.json")) as f:
    return {"out": out, "args": args, "summary": json.load(f), "list_points": after, "summarize": summary,
            "launch_stdout": [o for o, _ in outputs] + [last.stdout]}


def test_points_listed_launched_one_by_one_and_summarized(reference):
  out, listed = reference["out"], reference["list_points"]
  assert listed.returncode == 0, listed.stderr
  assert listed.stdout.startswith("3 points in ")
  assert listed.stdout.strip().splitlines()[1:] == ["index\tname\tlambda2\tsigma_sq\tseed\tstate",
                                                     "0\tlam0_sig1\t0\t1\t0\tfinished",
                                                     "1\tlam0.3_sig1\t0.3\t1\t0\tfinished",
                                                     "2\tlam1_sig1\t1\t1\t0\tfinished"]
  for i, name in enumerate(NAMES):
    assert f"sweep point {i} of 3: {name}" in reference["launch_stdout"][i]
    run_dir = os.path.join(out, name)
    assert sweep.is_trained(run_dir) and sweep.is_evaluated(run_dir)
    with open(os.path.join(run_dir, "run_config.json")) as f:
      assert json.load(f)["train"]["lambda2"] == [0.0, 0.3, 1.0][i]
    assert sweep_state.read_status(out, name)["state"] == "finished"
  summary = reference["summary"]
  assert summary["complete"] and summary["failed"] == [] and summary["states"] == {"finished": NAMES}
  for row in summary["points"]:
    with open(os.path.join(row["run_dir"], "report.json")) as f:
      assert row["delta_mean_abs_phi_pct"] == json.load(f)["comparison"]["mean_abs_phi_pct"]
  with open(os.path.join(out, "pareto.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert "3 of 3 points finished" in reference["summarize"].stderr


def test_sigkill_takes_the_workers_along_and_the_rerun_equals_the_point_launches(stores, reference, tmp_path):
  out = str(tmp_path / "grid")
  args = _args(stores, out) + ["--parallel=2", "--noevaluate"]  # the reference's evaluation is not under test here
  driver = _start(args)
  last = os.path.join(out, NAMES[2])
  deadline = time.time() + 300
  while time.time() < deadline and driver.poll() is None:
    steps = [n for n in (os.listdir(os.path.join(last, "checkpoints")) if os.path.isdir(
        os.path.join(last, "checkpoints")) else []) if n.isdigit()]
    if steps and not os.path.exists(os.path.join(last, "joint")):
      break
    time.sleep(0.01)
  assert driver.poll() is None, "the sweep ended before its last point was mid-way"
  workers = [p for p in _children(driver.pid) if _alive(p)]
  assert workers, "no worker process was running"
  trained_before_kill = {n for n in NAMES if sweep.is_trained(os.path.join(out, n))}
  assert trained_before_kill  # point 2 starts only after point 0 or 1 is done
  os.kill(driver.pid, signal.SIGKILL)
  killed = time.time()
  driver.communicate(timeout=60)
  end = killed + 30
  while time.time() < end and (any(_alive(p) for p in workers) or _processes_mentioning(out)):
    time.sleep(0.05)
  print(f"{len(workers)} workers gone {time.time() - killed:.2f} s after the sweep's SIGKILL")
  assert not [p for p in workers if _alive(p)], "workers outlived the SIGKILLed sweep"
  assert not _processes_mentioning(out), "a process still works on the sweep's directory"

  state = sweep_state.point_state(out, NAMES[2], evaluate=False)
  assert state["state"] == "interrupted" and "checkpoint at step" in state["detail"], state
  rerun = _sweep(args)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  for name in trained_before_kill:
    assert f"{name}: skipped (finished)" in rerun.stdout, rerun.stdout
  with open(os.path.join(out, "logs", f"{NAMES[2]}.train.log")) as f:
    first_bar = re.search(r"train:\s+(\d+)%", f.read())
  assert first_bar and int(first_bar.group(1)) > 0, "the killed point started over instead of resuming"
  with open(os.path.join(out, "summary.json")) as f:
    rows = {r["name"]: r for r in json.load(f)["points"]}
  reference_rows = {r["name"]: r for r in reference["summary"]["points"]}
  for name in NAMES:
    got, want = _weights(os.path.join(out, name)), _weights(os.path.join(reference["out"], name))
    for sub in want:
      for key in got[sub]:  # the reference's evaluation added calibrated thresholds to its artifacts
        np.testing.assert_array_equal(got[sub][key], want[sub][key], err_msg=f"{name}/{sub}/{key}")
    assert rows[name]["state"] == "finished" and rows[name]["train_final"] == reference_rows[name]["train_final"]


def test_summarize_reports_each_state_and_uses_finished_points_only(stores, reference, tmp_path):
  """Points in every state at once: numbers come only from the finished one; a second launch of a running
  point and a launch with other settings are refused."""
  ref, out = reference["out"], str(tmp_path / "grid")
  os.makedirs(os.path.join(out, "logs"))
  shutil.copy(os.path.join(ref, "sweep.json"), out)  # grid: 0, 0.3, 1, 3, 10, 30 (the record does not hold it)
  shutil.copytree(os.path.join(ref, NAMES[0]), os.path.join(out, NAMES[0]))  # finished
  shutil.copytree(os.path.join(ref, NAMES[1]), os.path.join(out, NAMES[1]),  # killed before its artifacts
                  ignore=lambda d, names: [n for n in names if n in ("joint", "solo", "report.json")])
  shutil.copytree(os.path.join(ref, NAMES[2]), os.path.join(out, NAMES[2]),  # trained, evaluation to run
                  ignore=lambda d, names: ["report.json"])
  log = os.path.join(out, "logs", "lam3_sig1.train.log")
  with open(log, "w") as f:
    f.write("$ python -m metasae_jax.workflows.run_point ...\nerror: the disk is full (made up for the test)\n")
  sweep_state.write_status(out, "lam3_sig1", "failed", stage="train", error=f"training exited with 1; log {log}",
                           log=log)
  held = sweep_state.point_lock(out, "lam10_sig1").acquire()
  try:
    args = _args(stores, out, lambda2="0,0.3,1,3,10,30")
    result = _sweep(args + ["--summarize"])
    second = _sweep(args + ["--point_index=4"])
  finally:
    held.release()
  other = _sweep(args + ["--point_index=5", "--width=32"])

  assert result.returncode == 1
  err = result.stderr.strip().splitlines()
  assert err[-1].startswith("error: 1 of 6 points failed: lam3_sig1"), err[-1]
  assert "1 of 6 points finished; the summary covers the finished ones only" in result.stderr
  expected = [f"interrupted: lam0.3_sig1: stopped mid-way; rerunning resumes from its checkpoint at step 24 "
              "(resume with --point_index 1)",
              "trained: lam1_sig1: trained; not evaluated yet (evaluate with --point_index 2)",
              f"failed: lam3_sig1: training exited with 1; log {log} (retry with --point_index 3)",
              f"running: lam10_sig1: run by process {os.getpid()} (index 4)",
              "not started: lam30_sig1 (run with --point_index 5)"]
  for line in expected:
    assert any(e.strip() == line for e in err), (line, err)
  with open(os.path.join(out, "summary.json")) as f:
    summary = json.load(f)
  rows = {r["name"]: r for r in summary["points"]}
  assert not summary["complete"] and summary["failed"] == ["lam3_sig1"]
  assert {n: r["state"] for n, r in rows.items()} == {
      "lam0_sig1": "finished", "lam0.3_sig1": "interrupted", "lam1_sig1": "trained", "lam3_sig1": "failed",
      "lam10_sig1": "running", "lam30_sig1": "not started"}
  assert "made up for the test" in rows["lam3_sig1"]["stderr_tail"]
  ref_row = {r["name"]: r for r in reference["summary"]["points"]}[NAMES[0]]
  assert rows[NAMES[0]]["delta_mean_abs_phi_pct"] == ref_row["delta_mean_abs_phi_pct"]
  assert rows[NAMES[0]]["train_final"] == ref_row["train_final"]
  # The interrupted point's metrics.jsonl is on disk, but a half-written run contributes no number.
  assert os.path.exists(os.path.join(out, NAMES[1], "metrics.jsonl")) and "train_final" not in rows[NAMES[1]]
  assert "delta_mean_abs_phi_pct" not in rows[NAMES[2]]  # trained, not evaluated: no held-out numbers yet
  means = {(a["lambda2"]): a["delta_mean_abs_phi_pct"]["n"] for a in summary["aggregates"]}
  assert means == {0.0: 1, 0.3: 0, 1.0: 0, 3.0: 0, 10.0: 0, 30.0: 0}

  assert second.returncode == 1 and not os.path.exists(os.path.join(out, "lam10_sig1"))
  assert second.stderr.strip().splitlines()[-1].startswith(
      f"error: sweep point lam10_sig1 is in use by process {os.getpid()}"), second.stderr
  assert other.returncode == 1 and not os.path.exists(os.path.join(out, "lam30_sig1"))
  assert "holds a sweep with other settings (train.width: 64 -> 32)" in other.stderr.strip().splitlines()[-1]


def test_bad_launch_flags_give_one_error_line(stores, tmp_path):
  out = str(tmp_path / "grid")
  cases = {"--point_index=3": "--point_index 3 is out of range: this sweep has 3 points (0..2)",
           "--distributed": "multi-process flags (--distributed, --coordinator_address, ...) apply to one point"}
  for flag, message in cases.items():
    result = _sweep(_args(stores, out) + [flag])
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and lines[-1].startswith("error: ") and message in lines[-1], result.stderr
  assert not os.path.exists(os.path.join(out, NAMES[0]))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_a_point_over_two_processes_equals_the_one_process_launch(stores, reference, tmp_path):
  out = str(tmp_path / "grid")
  port = _free_port()
  args = _args(stores, out) + ["--noevaluate", "--point_index=1", f"--coordinator_address=127.0.0.1:{port}",
                               "--num_processes=2"]
  procs = [_start(args + [f"--process_id={i}"], env=_env(devices=1)) for i in range(2)]
  try:
    results = [p.communicate(timeout=600) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, (_, err) in zip(procs, results):
    assert p.returncode == 0, err[-3000:]
  assert "(process 1: training only)" in results[1][0]
  got, want = _weights(os.path.join(out, NAMES[1])), _weights(os.path.join(reference["out"], NAMES[1]))
  for sub in want:
    for key in ("W_enc", "W_dec", "b_enc", "b_dec"):
      np.testing.assert_allclose(got[sub][key], want[sub][key], atol=1e-5, err_msg=f"{sub}/{key}")
  status = sweep_state.read_status(out, NAMES[1])
  assert status["state"] == "finished" and status["pid"] == procs[0].pid  # process 0 alone records the point
  logs = sorted(os.listdir(os.path.join(out, "logs")))
  assert logs == sorted(f"{NAMES[1]}.{s}" for s in ("lock", "status.json", "train.json", "train.log",
                                                     "train.p1.json", "train.p1.log"))


_PARENT = """
import os, sys, threading, time
from metasae_jax.workflows import workers
w = workers.Workers()
child = [sys.executable, "-c", "import sys, time; from metasae_jax.workflows import workers; "
         "print(workers.die_with_parent(use_prctl=" + sys.argv[1] + "), flush=True); time.sleep(120)"]
codes = []
with w, open(sys.argv[2], "w") as log:
  t = threading.Thread(target=lambda: codes.append(w.run(child, log, dict(os.environ))))
  t.start()
  while not w.pids():
    time.sleep(0.01)
  print(w.pids()[0], flush=True)
  while t.is_alive():
    t.join(0.1)
print("child exit", codes[0], "stopped", w.stopped, flush=True)
"""


@pytest.mark.parametrize("use_prctl,mechanism", [(True, "prctl"), (False, "poll")])
def test_a_worker_dies_with_its_sigkilled_parent(tmp_path, use_prctl, mechanism):
  log = tmp_path / "child.log"
  parent = subprocess.Popen([sys.executable, "-c", _PARENT, str(use_prctl), str(log)], cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, text=True)
  child = int(parent.stdout.readline())
  end = time.time() + 60
  while time.time() < end and not log.read_text().strip():  # armed before we kill
    time.sleep(0.02)
  assert log.read_text().strip() == mechanism
  parent.kill()
  parent.wait(timeout=30)
  end = time.time() + 10
  while time.time() < end and _alive(child):
    time.sleep(0.02)
  assert not _alive(child)


def test_sigterm_to_the_parent_is_forwarded_to_its_workers(tmp_path):
  parent = subprocess.Popen([sys.executable, "-c", _PARENT, "True", str(tmp_path / "child.log")], cwd=REPO,
                            env=_env(), stdout=subprocess.PIPE, text=True)
  child = int(parent.stdout.readline())
  end = time.time() + 60
  while time.time() < end and not (tmp_path / "child.log").read_text().strip():
    time.sleep(0.02)
  parent.send_signal(signal.SIGTERM)
  out, _ = parent.communicate(timeout=30)
  assert out.strip() == f"child exit {-signal.SIGTERM} stopped {int(signal.SIGTERM)}"
  assert parent.returncode == 0 and not _alive(child)


def test_docs_slurm_scripts_use_real_flags_and_cover_every_point():
  """docs/sweeps.md: every flag its experiments.sweep commands pass exists, and each --array covers its grid."""
  from experiments import configs  # pylint: disable=g-import-not-at-top
  with open(os.path.join(REPO, "docs", "sweeps.md")) as f:
    blocks = re.findall(r"```(?:bash)?\n(.*?)```", f.read(), re.S)
  helpfull = subprocess.run([sys.executable, "-m", "experiments.sweep", "--helpfull"], cwd=REPO, env=_env(),
                            capture_output=True, text=True, timeout=300).stdout
  defined = set(re.findall(r"--(?:\[no\])?([a-z_0-9]+)[:=]?", helpfull))
  arrays = 0
  for block in blocks:
    text = block.replace("\\\n", " ")
    for command in re.findall(r"experiments\.sweep([^\n\"]*)", text):
      for name in re.findall(r"--([a-z_0-9]+)", command):
        assert name in defined or (name.startswith("no") and name[2:] in defined), name
    array = re.search(r"#SBATCH --array=0-(\d+)", text)
    if array:
      config = re.search(r"configs/(\w+)\.py", text).group(1)
      grid = configs.get_config(config).grid
      lam = re.search(r"--lambda2 ([\d.,]+)", text)
      sig = re.search(r"--sigma_sq ([\d.,]+)", text)
      lambda2s = sweep.parse_floats(lam.group(1), "lambda2") if lam else tuple(grid.lambda2)
      sigma_sqs = sweep.parse_floats(sig.group(1), "sigma_sq") if sig else tuple(grid.sigma_sq)
      assert int(array.group(1)) == len(sweep.grid(lambda2s, sigma_sqs)) - 1, block
      arrays += 1
  assert arrays == 2
