"""Every binary checks its flags, paths and the model's config before importing JAX or torch (#28 item 11).

The binaries run with JAX, torch and transformers made unimportable (stand-in packages first on the path
that raise on import): a mistake must still end in its own `error:` line, which proves nothing heavy was
imported or loaded before the check. `--help` works the same way.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from metasae_jax.storage import artifact, store, synthetic
from tests.conftest import REPO

HEAVY = ("jax", "jaxlib", "torch", "transformers", "flax", "optax", "orbax")
BINARIES = ("train", "evaluate", "export_activations", "browse", "autointerp", "steer", "inspect", "export_sae",
            "reproduce", "demo", "groundtruth", "benchmark")
D = 16


@pytest.fixture(scope="module")
def blocked(tmp_path_factory):
  """A directory of stand-in packages that fail on import."""
  root = tmp_path_factory.mktemp("blocked")
  for name in HEAVY:
    os.makedirs(root / name)
    (root / name / "__init__.py").write_text(
        f"raise ImportError('{name} imported before the command line was checked')\n")
  return str(root)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """A store and a run directory with joint/ and solo/ artifacts (written without training)."""
  root = tmp_path_factory.mktemp("world")
  s = synthetic.write_sparse_store(str(root / "store"), 256, D, context_len=8, shard_tokens=128, num_features=16)
  rng = np.random.default_rng(0)
  for name in artifact.SAE_NAMES:
    params = {"W_enc": rng.normal(size=(D, 32)).astype(np.float32), "b_enc": np.zeros(32, np.float32),
              "W_dec": rng.normal(size=(32, D)).astype(np.float32), "b_dec": np.zeros(D, np.float32)}
    cfg = artifact.sae_cfg(name, {"k": 4, "activation": "batchtopk"}, 256,
                           source={"model": "smollm2-135m-gguf", "layer": 45, "site": "resid_pre"})
    artifact.save_sae(str(root / "run" / name), params, cfg)
  return {"root": str(root), "store": s.path, "run": str(root / "run")}


def _run(blocked, module, *argv):
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([blocked, REPO]), "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", f"experiments.{module}", *argv], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=120, check=False)


def _error_line(proc) -> str:
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert lines and lines[-1].startswith("error: "), proc.stderr[-3000:]
  return lines[-1]


@pytest.mark.parametrize("binary", BINARIES)
def test_help_and_a_bad_flag_import_nothing_heavy(binary, blocked):
  helped = _run(blocked, binary, "--help")
  # absl's --help exits with status 1 by design; what matters is the help text and no traceback.
  assert "flags:" in helped.stdout and "Traceback" not in helped.stderr, helped.stderr[-3000:]
  assert "Unknown command line flag 'no_such_flag'" in _error_line(_run(blocked, binary, "--no_such_flag=1"))


def _link_loop(world) -> str:
  path = os.path.join(world["root"], "loop")
  if not os.path.islink(path):
    os.symlink(path, path)
  return path


def _tiny_corpus(world) -> str:
  path = os.path.join(world["root"], "one_token.txt")
  with open(path, "w") as f:
    f.write("hello")
  return path


# (binary, argv from the world, what the error line says): each refused before anything heavy is imported.
CASES = {
    "exporter --layer beyond the model's blocks": (
        "export_activations", lambda w: ["--layer=40", f"--out_dir={w['root']}/acts"],
        "--layer 40 is out of range: the model has 30 blocks"),
    "exporter corpus shorter than one context": (
        "export_activations", lambda w: [f"--corpus={_tiny_corpus(w)}", f"--out_dir={w['root']}/acts2"],
        "has fewer than --context_len 128 tokens"),
    "exporter --out_dir a symlink loop": (
        "export_activations", lambda w: [f"--out_dir={_link_loop(w)}"], "loop of symbolic links"),
    "exporter --model a missing directory": (
        "export_activations", lambda w: ["--model=./no/such/model", f"--out_dir={w['root']}/acts3"],
        "no such model directory"),
    "train on a missing store": (
        "train", lambda w: [f"--activations={w['root']}/nope", f"--out_dir={w['root']}/r"], "does not exist"),
    "train with k >= width": (
        "train", lambda w: [f"--activations={w['store']}", f"--out_dir={w['root']}/r", "--width=32", "--k=32"],
        "k must be in [1, width)"),
    "train --out_dir a symlink loop": (
        "train", lambda w: [f"--activations={w['store']}", f"--out_dir={_link_loop(w)}"], "loop of symbolic links"),
    "evaluate a missing run": ("evaluate", lambda w: [f"--run_dir={w['root']}/nope"], "does not exist"),
    "evaluate without a held-out view": ("evaluate", lambda w: [f"--run_dir={w['run']}"], "--activations is required"),
    "browse a missing run": ("browse", lambda w: [f"--run_dir={w['root']}/nope"], "does not exist"),
    "autointerp a missing run": ("autointerp", lambda w: [f"--run_dir={w['root']}/nope"], "does not exist"),
    "steer a latent beyond the width": (
        "steer", lambda w: [f"--run_dir={w['run']}", "--latent=99", "--prompt=x"], "--latent 99 is out of range"),
    "steer an SAE hooked past the model's blocks": (
        "steer", lambda w: [f"--run_dir={w['run']}", "--latent=3", "--prompt=x"], "--layer 45 is out of range"),
    "inspect an SAE hooked past the model's blocks": (
        "inspect", lambda w: [f"--run_dir={w['run']}", "--prompt=x"], "--layer 45 is out of range"),
    "export_sae into a symlink loop": (
        "export_sae", lambda w: [f"--run_dir={w['run']}", f"--out_dir={_link_loop(w)}"], "loop of symbolic links"),
    "reproduce an unknown preset": ("reproduce", lambda w: ["--preset=nope", f"--out_dir={w['root']}/x"],
                                    "unknown --preset 'nope'"),
    "demo --out_dir below a file": (
        "demo", lambda w: [f"--out_dir={w['run']}/joint/cfg.json/x"], "cannot be created"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_mistakes_are_refused_before_anything_heavy(case, blocked, world):
  binary, argv, message = CASES[case]
  assert message in _error_line(_run(blocked, binary, *argv(world)))
