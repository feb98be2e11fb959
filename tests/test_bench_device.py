"""`experiments.benchmark --device`: where each implementation runs, said in every line; the torch baseline's
device path (batches handed over as tensors, as on CUDA) steps exactly like its host-array path."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from metasae_jax.core.config import TrainConfig
from metasae_jax.core.errors import UserError
from metasae_jax.workflows import bench_device

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--d_model=16", "--width=64", "--k=4", "--meta_width=6", "--meta_k=2", "--batch_size=128", "--warmup=2",
        "--steps=3"]


def _bench(args: list, tmp_path) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "experiments.benchmark", f"--out_dir={tmp_path}", *args], cwd=REPO,
                        env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True, timeout=600)


def test_device_choice():
  assert bench_device.resolve("auto", "cpu", False) == {"jax": "cpu", "torch": "cpu"}
  assert bench_device.resolve("auto", "gpu", True) == {"jax": "gpu", "torch": "cuda"}
  assert bench_device.resolve("auto", "tpu", False) == {"jax": "tpu", "torch": "cpu"}
  assert bench_device.resolve("cpu", "gpu", True) == {"jax": "cpu", "torch": "cpu"}
  assert bench_device.resolve("cuda", "gpu", True) == {"jax": "gpu", "torch": "cuda"}
  with pytest.raises(UserError, match=r"--device cuda: torch.cuda.is_available\(\) is False"):
    bench_device.resolve("cuda", "gpu", False)
  with pytest.raises(UserError, match="--device cuda: JAX's backend is tpu, not gpu"):
    bench_device.resolve("cuda", "tpu", True)
  assert bench_device.kind("cuda:0 NVIDIA H100 80GB HBM3") == bench_device.kind("gpu:0 NVIDIA H100 80GB HBM3") == "gpu"
  same = bench_device.comparison({"fast": "gpu:0 NVIDIA H100", "torch": "cuda:0 NVIDIA H100"})
  assert same["same_device_kind"] and "note" not in same
  mixed = bench_device.comparison({"fast": "gpu:0 NVIDIA H100", "torch": "cpu"})
  assert not mixed["same_device_kind"] and "different kinds of device" in mixed["note"]


def test_steps_lines_name_each_device_and_the_ratio_is_theirs(tmp_path):
  import torch  # pylint: disable=g-import-not-at-top
  result = _bench(["--what=steps", "--impl=fast,torch", "--data=synthetic", *TINY], tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
  fast, base, ratio = lines
  device = jax.devices()[0]
  assert fast["impl"] == "fast" and fast["device"] == f"{device.platform}:{device.id} {device.device_kind}"
  want = f"cuda:{torch.cuda.current_device()} {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "cpu"
  assert base["impl"] == "torch" and base["device"] == want
  assert ratio["what"] == "steps_ratios" and ratio["devices"] == {"fast": fast["device"], "torch": base["device"]}
  assert ratio["speedup_fast_vs_torch"] == pytest.approx(base["s_per_step"] / fast["s_per_step"])
  assert ratio["same_device_kind"] == (bench_device.kind(fast["device"]) == bench_device.kind(base["device"]))


def test_device_cuda_without_a_gpu_is_one_error_line(tmp_path):
  import torch  # pylint: disable=g-import-not-at-top
  if jax.default_backend() == "gpu" and torch.cuda.is_available():
    pytest.skip("this host has a GPU for both: --device cuda is valid here")
  result = _bench(["--what=steps", "--impl=fast,torch", "--device=cuda", *TINY], tmp_path)
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 1 and lines[-1].startswith("error: --device cuda: ") and result.stdout == ""
  assert not os.listdir(tmp_path)  # refused before any store was exported or written


def test_torch_baseline_steps_the_same_from_device_tensors():
  """The CUDA path hands the baseline torch tensors already on the device; on the CPU that path must give the
  same parameters as the host-array path the CPU benchmark uses."""
  import torch  # pylint: disable=g-import-not-at-top
  from metasae_jax.lm import torch_baseline  # pylint: disable=g-import-not-at-top
  config = TrainConfig(d_model=16, width=64, k=4, meta_width=6, meta_k=2, batch_size=32, n_primary_steps=2,
                       n_meta_steps=1, lambda2=0.3)
  rng = np.random.default_rng(0)
  batches = [rng.normal(size=(32, 16)).astype(np.float16) for _ in range(5)]
  host, tensors = torch_baseline.Baseline(config), torch_baseline.Baseline(config, device="cpu")
  for b in batches:
    host.step(b)
    tensors.step(torch.from_numpy(b))
  for name in ("joint", "solo", "meta"):
    for field in ("w_enc", "b_enc", "w_dec", "b_dec"):
      a, b = getattr(getattr(host, name), field), getattr(getattr(tensors, name), field)
      assert torch.equal(a, b), (name, field)
  assert not torch.equal(host.joint.w_enc, torch_baseline.Baseline(config).joint.w_enc)  # steps changed it
  times = torch_baseline.time_steps(config, batches, warmup=1, steps=2, device="cpu")
  assert len(times) == 2 and all(t > 0 for t in times)
