"""Bad inputs to the real binaries: exit non-zero, one `error:` line, no traceback, no file changed."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from metasae_jax.storage import store, synthetic
from metasae_jax.core.config import TrainConfig
from metasae_jax.training.trainer import RunConfig, train_and_save
from tests.conftest import REPO
from tests.test_export import model_dir  # noqa: F401  (a fixture: the tiny local model)

D = 16
SAE_FLAGS = ("--width=64", "--k=4", "--meta_width=6", "--meta_k=2", "--batch_size=32", "--num_tokens=64",
             "--checkpoint_every_steps=1")


@pytest.fixture(scope="module")
def world(tmp_path_factory, model_dir):  # noqa: F811
  """A good store and a finished run on it, shared by the rows (each row snapshots what it touches)."""
  root = tmp_path_factory.mktemp("world")
  good = str(root / "store")
  synthetic.write_sparse_store(good, 512, D, context_len=8, shard_tokens=256, num_features=32)
  run = str(root / "run")
  config = TrainConfig(d_model=D, width=64, k=4, meta_width=6, meta_k=2, batch_size=32)
  train_and_save(config, RunConfig(activations=good, out_dir=run, num_tokens=64, progress=False))
  return {"root": str(root), "store": good, "run": run, "model": model_dir}


def _store(case, **kw) -> str:
  path = str(case / "store")
  acts = synthetic.sparse_activations(512, kw.pop("d", D), num_features=32)
  # Format 1: the rows below break its manifest and .npy shards (format 2's damage: test_zarr_store.py).
  store.write_store(path, acts, context_len=8, shard_tokens=256, source={"model": "synthetic"}, fmt="npy")
  return path


def _edit_manifest(path, **fields):
  mpath = os.path.join(path, store.MANIFEST)
  with open(mpath) as f:
    m = json.load(f)
  m.update(fields)
  with open(mpath, "w") as f:
    json.dump(m, f)


def _truncate(path):
  with open(path, "rb") as f:
    raw = f.read()
  with open(path, "wb") as f:
    f.write(raw[:len(raw) // 2])


def _nan_store(case):
  path = _store(case)
  acts = np.load(os.path.join(path, "acts-00001.npy"))
  acts[:, 0] = np.nan  # every batch reads shard 1
  np.save(os.path.join(path, "acts-00001.npy"), acts)
  return path


def _train(path, *extra, out="out"):
  return lambda case, world: ("experiments.train", [f"--activations={path(case, world)}",
                                                    f"--out_dir={out if out.startswith('/') else case / out}",
                                                    *SAE_FLAGS, *extra])


def _broken(fn):
  """A store in the row's directory, damaged by fn(store_path)."""
  def make(case, world):
    path = _store(case)
    fn(path)
    return path
  return make


def _file(case, rel) -> str:
  """An (empty) file at case/rel."""
  path = os.path.join(str(case), rel)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  open(path, "w").close()
  return path


def _text(case, rel, text) -> str:
  path = os.path.join(str(case), rel)
  with open(path, "w") as f:
    f.write(text)
  return path


def _copy(path, case) -> str:
  out = os.path.join(str(case), os.path.basename(path) + "_copy")
  shutil.copytree(path, out)
  return out


def _link(path, case) -> str:
  out = os.path.join(str(case), "link")
  os.symlink(path, out)
  return out


def _good(case, world):
  return world["store"]


def _foreign_tokens(case, world) -> str:
  """A store of the run's d_model from the tiny model, but one token id is outside its vocabulary."""
  path = str(case / "tokens_store")
  tokens = np.arange(512, dtype=np.int32) % 20
  tokens[300] = 1_000_000
  store.write_store(path, synthetic.sparse_activations(512, D, num_features=32), tokens, context_len=8,
                    shard_tokens=256, source={"model": world["model"], "layer": 1, "site": "resid_pre"})
  return path


def _model_store(case, world) -> str:
  """A store from the tiny model (its ids in the vocabulary) but of the run's d_model, not the model's width."""
  path = str(case / "model_store")
  store.write_store(path, synthetic.sparse_activations(512, D, num_features=32), np.arange(512, dtype=np.int32) % 20,
                    context_len=8, shard_tokens=256, source={"model": world["model"], "layer": 1, "site": "resid_pre"})
  return path


def _bad_sae(edit):
  """A copy of the world's run whose joint SAE was changed by edit(joint_dir)."""
  def make(case, world):
    run = _copy(world["run"], case)
    edit(os.path.join(run, "joint"))
    return run
  return make


def _cfg_field(**fields):
  def edit(sae):
    with open(os.path.join(sae, "cfg.json")) as f:
      cfg = json.load(f)
    with open(os.path.join(sae, "cfg.json"), "w") as f:
      json.dump(dict(cfg, **fields), f)
  return edit


def _nan_weight(sae):
  from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top
  tensors = load_file(os.path.join(sae, "sae.safetensors"))
  tensors["W_dec"][2, 3] = np.nan
  save_file(tensors, os.path.join(sae, "sae.safetensors"))


def _evaluate_sae(edit):
  return lambda case, world: ("experiments.evaluate", [f"--run_dir={_bad_sae(edit)(case, world)}", "--model=none",
                                                        f"--activations={_store(case)}"])


def _loop(case) -> str:
  path = os.path.join(str(case), "loop")
  os.symlink(path, path)
  return path


def _raising_config(case) -> str:
  path = os.path.join(str(case), "raising.py")
  with open(path, "w") as f:
    f.write("def get_config():\n  raise RuntimeError('boom in the config file')\n")
  return path


# id: (build(case_dir, world) -> (module, argv), keyword in the error line, extra env, new files allowed under)
ROWS = {
    "missing activations directory": (_train(lambda c, w: str(c / "nope")), "does not exist", {}, None),
    "missing manifest": (_train(_broken(lambda p: os.remove(os.path.join(p, store.MANIFEST)))),
                         "no manifest.json", {}, None),
    "malformed manifest": (_train(_broken(lambda p: open(os.path.join(p, store.MANIFEST), "w").write("{oops"))),
                           "not valid JSON", {}, None),
    "truncated shard": (_train(_broken(lambda p: _truncate(os.path.join(p, "acts-00001.npy")))),
                        "truncated", {}, None),
    "wrong-shape shard": (_train(_broken(lambda p: np.save(os.path.join(p, "acts-00001.npy"),
                                                           np.zeros((256, D + 1), np.float32)))),
                          "has shape (256, 17)", {}, None),
    "missing shard": (_train(_broken(lambda p: os.remove(os.path.join(p, "acts-00000.npy")))),
                      "acts-00000.npy is missing", {}, None),
    "manifest dtype not supported": (_train(_broken(lambda p: _edit_manifest(p, dtype="int8"))),
                                     "dtype 'int8' is not one of", {}, None),
    "shard dtype differs from manifest": (_train(_broken(lambda p: _edit_manifest(p, dtype="float16"))),
                                          "manifest says float16", {}, None),
    "NaN in activations": (_train(lambda c, w: _nan_store(c)), "acts-00001.npy", {}, None),
    "k >= width": (_train(_good, "--k=64"), "k must be in [1, width)", {}, None),
    "k <= 0": (_train(_good, "--k=0"), "k must be in [1, width)", {}, None),
    "meta_width >= width": (_train(_good, "--meta_width=64"), "meta_width must be in", {}, None),
    "meta_k >= meta_width": (_train(_good, "--meta_k=6"), "meta_k must be in", {}, None),
    "negative lambda2": (_train(_good, "--lambda2=-0.1"), "lambda2 must be >= 0", {}, None),
    "sigma_sq <= 0": (_train(_good, "--sigma_sq=0"), "sigma_sq must be > 0", {}, None),
    "out_dir holds a run with another config": (
        lambda case, world: _train(_good, "--lambda2=1.0", out=world["run"])(case, world),
        "different config", {}, None),
    "batch_size not divisible by device count": (
        _train(_good, "--batch_size=33"), "not divisible by the data-parallel size 2",
        {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}, None),
    "--model_parallel not dividing the devices": (
        _train(_good, "--model_parallel=3"), "--model_parallel 3 must divide the device count 2",
        {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}, None),
    "negative --seed": (_train(_good, "--seed=-1"), "--seed must be in [0, 2^32)", {}, None),
    "--checkpoint_every_steps 0": (_train(_good, "--checkpoint_every_steps=0"),
                                   "--checkpoint_every_steps must be >= 1", {}, None),
    "--log_every_steps 0": (_train(_good, "--log_every_steps=0"), "--log_every_steps must be >= 1", {}, None),
    "--out_dir is a file": (lambda case, world: _train(_good, out=_file(case, "f"))(case, world),
                            "is a file, not a directory", {}, None),
    "--out_dir below a file": (lambda case, world: _train(_good, out=_file(case, "f") + "/run")(case, world),
                               "cannot be created", {}, None),
    "export_sae --out_dir is another run": (
        lambda case, world: ("experiments.export_sae", [f"--run_dir={_copy(world['run'], case)}",
                                                        f"--out_dir={world['run']}", "--allow_approximate"]),
        "is a training run directory", {}, None),
    "export_sae --out_dir is a symlink to the run": (
        lambda case, world: ("experiments.export_sae", [f"--run_dir={world['run']}",
                                                        f"--out_dir={_link(world['run'], case)}", "--allow_approximate"]),
        "is or holds --run_dir", {}, None),
    "export_sae --out_dir is a store": (
        lambda case, world: ("experiments.export_sae", [f"--run_dir={world['run']}", f"--out_dir={world['store']}",
                                                        "--allow_approximate"]),
        "is an activation store", {}, None),
    "export_sae --out_dir holds other files": (
        lambda case, world: ("experiments.export_sae", [f"--run_dir={world['run']}",
                                                        f"--out_dir={os.path.dirname(_file(case, 'x/notes.txt'))}",
                                                        "--allow_approximate"]),
        "holds files export_sae did not write", {}, None),
    "NaN in the evaluation store (evaluate)": (
        lambda case, world: ("experiments.evaluate", [f"--run_dir={world['run']}", "--model=none",
                                                       f"--activations={_nan_store(case)}"]),
        "non-finite activations (NaN/Inf) at token 256, shard acts-00001.npy", {}, None),
    "empty corpus (exporter)": (
        lambda case, world: ("experiments.export_activations", [
            f"--model={world['model']}", f"--corpus={_file(case, 'empty.txt')}", f"--out_dir={case / 'acts'}",
            "--context_len=8", "--num_tokens=64", "--layer=0"]),
        "corpus", {}, None),
    "unknown --model (exporter)": (
        lambda case, world: ("experiments.export_activations", [
            "--model=no-such-org/no-such-model-for-metasae", f"--out_dir={case / 'acts'}", "--num_tokens=256"]),
        "unknown --model", {}, None),
    "evaluate on the tokens the run trained on": (
        lambda case, world: ("experiments.evaluate", [f"--run_dir={world['run']}", "--model=none",
                                                       f"--activations={world['store']}"]),
        "--allow_train_tokens", {}, None),
    "evaluate without --activations on a store with no split": (
        lambda case, world: ("experiments.evaluate", [f"--run_dir={world['run']}", "--model=none"]),
        "--activations is required", {}, None),
    "sweep evaluating on its training store": (
        lambda case, world: ("experiments.sweep", [f"--activations={world['store']}", f"--out_dir={case / 'grid'}",
                                                    f"--eval_activations={world['store']}", *SAE_FLAGS]),
        "--allow_train_tokens", {}, None),
    "--k and --config.train.k disagree": (_train(_good, "--config.train.k=5"), "disagree", {}, None),
    "--heldout_fraction 1 (exporter)": (
        lambda case, world: ("experiments.export_activations", [
            f"--model={world['model']}", f"--out_dir={case / 'acts'}", "--num_tokens=64", "--context_len=8",
            "--heldout_fraction=1"]),
        "--heldout_fraction", {}, None),
    "--workdir and --out_dir both given (reproduce)": (
        lambda case, world: ("experiments.reproduce", ["--preset=tiny", f"--workdir={case}", f"--out_dir={case}"]),
        "pass only --out_dir", {}, None),
    "evaluate a store from another model without --model": (
        lambda case, world: ("experiments.evaluate", [f"--run_dir={world['run']}",
                                                       f"--activations={_store(case)}"]),
        "Pass --model synthetic", {}, None),
    "SAE d_model differs from the store (evaluate)": (
        lambda case, world: ("experiments.evaluate", [f"--run_dir={world['run']}", "--model=none",
                                                       f"--activations={_store(case, d=D // 2)}"]),
        "d_model", {}, None),
    "token ids outside the model's vocabulary (browse)": (
        lambda case, world: ("experiments.browse", [f"--run_dir={world['run']}",
                                                     f"--activations={_foreign_tokens(case, world)}"]),
        "has id 1000000, outside the", {}, None),
    "token ids outside the model's vocabulary (autointerp)": (
        lambda case, world: ("experiments.autointerp", [f"--run_dir={world['run']}",
                                                         f"--activations={_foreign_tokens(case, world)}"]),
        "has id 1000000, outside the", {}, None),
    "token ids outside the model's vocabulary (evaluate)": (
        lambda case, world: ("experiments.evaluate", [f"--run_dir={world['run']}", f"--model={world['model']}",
                                                       f"--activations={_foreign_tokens(case, world)}"]),
        "has id 1000000, outside the", {}, None),
    "--model of another width than the store (evaluate)": (
        lambda case, world: ("experiments.evaluate", [f"--run_dir={world['run']}", f"--model={world['model']}",
                                                       f"--activations={_model_store(case, world)}"]),
        "has a residual width of 32, but the activation store", {}, None),
    "SAE cfg.json field of the wrong type (evaluate)": (_evaluate_sae(_cfg_field(d_model="abc")),
                                                        "cfg.json d_model 'abc' is not an integer", {}, None),
    "SAE cfg.json k above the width (evaluate)": (_evaluate_sae(_cfg_field(k=1000)),
                                                      "cfg.json k is 1000, more than its width 64", {}, None),
    "NaN in SAE weights (evaluate)": (_evaluate_sae(_nan_weight), "tensor W_dec holds 1 NaN/inf value(s)", {}, None),
    "--out_dir a symlink loop (train)": (lambda case, world: _train(_good, out=_loop(case))(case, world),
                                         "loop of symbolic links", {}, None),
    "--layer beyond the model's blocks (exporter)": (
        lambda case, world: ("experiments.export_activations", ["--layer=40", f"--out_dir={case / 'acts'}"]),
        "--layer 40 is out of range: the model has 30 blocks", {}, None),
    "one-token corpus (exporter)": (
        lambda case, world: ("experiments.export_activations", [
            f"--corpus={_text(case, 'one.txt', 'hello')}", f"--out_dir={case / 'acts'}"]),
        "has fewer than --context_len 128 tokens", {}, None),
    "--config.train override naming no field": (_train(_good, "--config.train.lamda2=0.1"),
                                                "Did you mean --config.train.lambda2?", {}, None),
    "--config file that raises": (lambda case, world: _train(_good, f"--config={_raising_config(case)}")(case, world),
                                  "fails to load: RuntimeError: boom in the config file", {}, None),
    "--config file missing": (_train(_good, "--config=no/such/config.py"), "no such config file", {}, None),
    "unknown flag": (_train(_good, "--lamda2=0.1"), "Unknown command line flag 'lamda2'", {}, None),
    "flag of the wrong type": (_train(_good, "--k=abc"), "flag --k=abc: invalid literal for int()", {}, None),
    "NaN --alpha (steer)": (
        lambda case, world: ("experiments.steer", [f"--run_dir={world['run']}", "--latent=1", "--prompt=x",
                                                    "--alpha=nan"]),
        "--alpha is nan, not a finite number", {}, None),
    "inf in a --config override": (_train(_good, "--config.train.lr=inf"), "--config.train.lr is inf", {}, None),
}


def _snapshot(*roots) -> dict:
  out = {}
  for root in roots:
    for d, dirs, files in os.walk(root):
      for name in dirs:
        out[os.path.join(d, name)] = None
      for name in files:
        path = os.path.join(d, name)
        if os.path.islink(path):  # a link (a loop, say) is recorded as where it points, not followed
          out[path] = ("link", os.readlink(path))
          continue
        with open(path, "rb") as f:
          out[path] = f.read()
  return out


@pytest.mark.parametrize("row", list(ROWS))
def test_bad_input_is_one_readable_line_and_changes_nothing(row, world, tmp_path):
  build, keyword, env, may_create = ROWS[row]
  module, argv = build(tmp_path, world)
  before = _snapshot(world["root"], tmp_path)
  proc = subprocess.run([sys.executable, "-m", module, *argv], cwd=REPO, capture_output=True, text=True,
                        timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu", **env}, check=False)
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert proc.returncode != 0, proc.stdout + proc.stderr
  assert "Traceback" not in proc.stderr, proc.stderr
  assert lines and lines[-1].startswith("error: "), proc.stderr[-2000:]
  assert keyword in lines[-1], lines[-1]
  after = _snapshot(world["root"], tmp_path)
  if may_create:  # a fresh --out_dir may have been claimed (run_config.json) before the bad batch
    fresh = str(tmp_path / may_create)
    after = {p: b for p, b in after.items() if p != fresh and not p.startswith(fresh + os.sep)}
  assert after == before
