"""The compiled multi-device step at the paper's shapes, read from XLA (compiled on 8 fake CPU devices, never run).

Legend: B = global batch, D = d_model, N = width. What is checked is the
program: no collective gathers a batch-sized array, per-device FLOPs fall as
1/devices, and width sharding cuts each device's argument memory.
"""

import json
import os
import subprocess
import sys
import textwrap

from metasae_jax.workflows import devices
from tests.conftest import fake_devices_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _analyze_on_8_devices(cases: list) -> list:
  """devices.analyze for each (preset, algorithm, data, model) in a child process with 8 fake devices."""
  code = textwrap.dedent(f"""
    import json
    from experiments import configs
    from metasae_jax.workflows import devices
    files = {{"gpt2_large": "gpt2_large_l20", "gemma2_9b": "gemma2_9b_l23"}}
    out = []
    for preset, algorithm, data, model in {cases!r}:
      row = devices.analyze(configs.train_config(files[preset], algorithm=algorithm), data, model)
      out.append({{k: v for k, v in row.items() if k != "collectives"}} | {{"collectives": row["collectives"]}})
    print(json.dumps(out))
  """)
  env = dict(os.environ, XLA_FLAGS=fake_devices_flags(8), JAX_PLATFORMS="cpu",
             PYTHONPATH=REPO)
  proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_collective_parser_reads_ops_and_shapes():
  hlo = """
  %all-reduce.3 = f32[512,1280]{1,0} all-reduce(%x), channel_id=1, replica_groups={{0,1}}, to_apply=%add
  %ag = (bf16[8,4096,16]{2,1,0}, s32[]) all-gather-start(%y), dimensions={0}
  %fusion.2 = f32[4096,9216]{1,0} fusion(%a, %b), kind=kLoop, calls=%fused
  %cp = s32[4096]{0} collective-permute(%z), source_target_pairs={{0,1}}
  """
  found = devices.collectives(hlo)
  assert [c.op for c in found] == ["all-reduce", "all-gather", "collective-permute"]
  assert found[0].arrays == (("f32", (512, 1280)),) and found[0].bytes == 512 * 1280 * 4
  assert found[1].elements == 8 * 4096 * 16 + 1 and found[2].bytes == 4096 * 4


def test_paper_shape_step_scales_with_devices_and_gemma_fits_with_model_parallel():
  b, d, n = 4096, 1280, 20480
  rows = _analyze_on_8_devices([("gpt2_large", "dense", c, 1) for c in (1, 2, 4, 8)]
                               + [("gpt2_large", "slots", 8, 1), ("gpt2_large", "dense", 2, 4),
                                  ("gemma2_9b", "dense", 8, 1), ("gemma2_9b", "dense", 2, 4)])
  dense, slots_8, mp_8 = rows[:4], rows[4], rows[5]
  for row in dense + [slots_8, mp_8]:
    print({k: v for k, v in row.items() if k != "collectives"})
    # Only scalars, counts, per-latent vectors, [B/devices, D] partial sums and gradients cross devices.
    assert row["batch_sized_gathers"] == [], row["batch_sized_gathers"]
    assert not [c for c in row["collectives"] if c["op"] != "all-reduce"], row["collectives"]
  # The gradient all-reduce of two primaries (W_enc + W_dec each, float32) is the largest collective.
  assert dense[3]["largest_collective_mb"] >= 2 * 2 * n * d * 4 / 2**20
  # Per-device FLOPs fall as 1/devices within 15 % (the whole step, meta SAE included).
  base = dense[0]["gflops_per_device"]
  assert base >= 16 * 2 * b * d * n / 1e9  # 8 B x N x D products per primary, two primaries
  for row in dense[1:]:
    ratio = row["gflops_per_device"] / base
    assert abs(ratio * row["devices"] - 1) <= 0.15, (row["devices"], ratio)
  # Width sharding: the model axis splits the primaries' parameters and Adam moments.
  gemma_1, gemma_4 = rows[6], rows[7]
  print("gemma argument MB", gemma_1["argument_mb"], gemma_4["argument_mb"])
  assert gemma_4["argument_mb"] <= 0.35 * gemma_1["argument_mb"]
  assert mp_8["argument_mb"] <= 0.35 * dense[3]["argument_mb"]
