"""One default per hyperparameter: flags are generated from the config dataclasses (#27 item 3).

Every TrainConfig field is one flag of each training binary (train, sweep, benchmark) whose own default is None
("the config's"), with the field's docstring as help; no binary writes a second default; evaluate takes the
run's batch size and skip rule unless told otherwise.
"""

import ast
import dataclasses
import glob
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from experiments import dataclass_flags
from metasae_jax.core.config import TrainConfig
from metasae_jax.storage import artifact, synthetic
from metasae_jax.training.run_config import RunConfig
from tests.conftest import REPO

ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
TRAIN_FIELDS = [f.name for f in dataclasses.fields(TrainConfig) if f.name != "d_model"]
# The sweep's grid flags: comma lists over the points (each point's value comes from them).
GRID = ("lambda2", "sigma_sq")
D = 16


def _python(code: str, *argv, check=True) -> subprocess.CompletedProcess:
  proc = subprocess.run([sys.executable, "-c", code, *argv], cwd=REPO, env=ENV, capture_output=True, text=True,
                        timeout=300, check=False)
  if check:
    assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def _flags_of(module: str) -> dict:
  """name -> (defining module, default, help) of every flag once `experiments.MODULE` is imported."""
  code = (f"import json\nfrom absl import flags\nimport experiments.{module}\n"
          "F = flags.FLAGS\n"
          "print(json.dumps({n: [F.find_module_defining_flag(n), F[n].default, F[n].help] for n in F}, default=str))")
  return json.loads(_python(code).stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", ["train", "sweep", "benchmark"])
def test_every_train_field_is_one_generated_flag_with_the_dataclass_default(module):
  found = _flags_of(module)
  docs = dataclass_flags.field_docs(TrainConfig)
  for name in TRAIN_FIELDS:
    assert name in found, f"experiments.{module} has no --{name}"
    where, default, help_text = found[name]
    if module == "sweep" and name in GRID:
      assert where == "experiments.sweep"
      continue
    assert where in (f"experiments.{module}", "experiments.train"), (name, where)
    # None: the value comes from the config (the dataclass); the help shows the docstring and that default.
    assert default is None, (module, name, default)
    assert docs[name][:40] in help_text and "Default:" in help_text, (name, help_text)


@pytest.mark.parametrize("module, cls_path, skip, rename", [
    ("evaluate", "metasae_jax.evaluation.config.EvalConfig", ("run_dir", "activations", "model"), {}),
    ("autointerp", "metasae_jax.autointerp.config.AutointerpConfig", ("run_dir", "activations"), {}),
    ("browse", "metasae_jax.browser.config.BrowserConfig", ("run_dir", "activations"), {}),
    ("export_activations", "metasae_jax.lm.export_config.ExportConfig", ("out_dir",),
     {"batch_size": "contexts_per_batch"}),
])
def test_other_binaries_flags_are_their_configs_fields(module, cls_path, skip, rename):
  """Each field of the binary's config is one flag defaulting to the dataclass's value, its docstring the help."""
  import importlib  # pylint: disable=g-import-not-at-top
  module_path, name = cls_path.rsplit(".", 1)
  cls = getattr(importlib.import_module(module_path), name)
  docs = dataclass_flags.field_docs(cls)
  found = _flags_of(module)
  for field in dataclasses.fields(cls):
    if field.name in skip:
      continue
    flag = rename.get(field.name, field.name)
    assert flag in found and found[flag][0] == f"experiments.{module}", (module, flag)
    assert found[flag][1] is None and docs[field.name][:40] in found[flag][2], (module, flag, found[flag])


def test_no_binary_writes_a_second_default_for_a_train_field():
  """A hand-written DEFINE of a TrainConfig field outside the generator would be a second default."""
  # The sweep's grid flags and the ground-truth study's --lambda2 are lists of values, not defaults of one run.
  allowed = {("sweep.py", "lambda2"), ("sweep.py", "sigma_sq"), ("groundtruth.py", "lambda2")}
  skipped = set()
  pattern = re.compile(r"DEFINE_\w+\(\s*\"(\w+)\"")
  offenders = []
  for path in glob.glob(os.path.join(REPO, "experiments", "*.py")):
    base_name = os.path.basename(path)
    if base_name in skipped:
      continue
    with open(path) as f:
      for name in pattern.findall(f.read()):
        if name in TRAIN_FIELDS and (base_name, name) not in allowed:
          offenders.append(f"{base_name}: --{name}")
  assert not offenders, offenders


def _default_source(cls_path: str, cls_name: str, field: str):
  with open(os.path.join(REPO, cls_path)) as f:
    tree = ast.parse(f.read())
  cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls_name)
  node = next(n for n in cls.body if isinstance(n, ast.AnnAssign) and n.target.id == field)
  return node.value


@pytest.mark.parametrize("cls_path, cls_name, field", [
    ("metasae_jax/evaluation/config.py", "EvalConfig", "batch_size"),
    ("metasae_jax/evaluation/config.py", "EvalConfig", "skip_first_positions"),
    ("metasae_jax/autointerp/config.py", "AutointerpConfig", "batch_size"),
    ("metasae_jax/browser/config.py", "BrowserConfig", "batch_size"),
])
def test_other_configs_derive_training_defaults_instead_of_repeating_them(cls_path, cls_name, field):
  value = _default_source(cls_path, cls_name, field)
  assert not isinstance(value, ast.Constant), f"{cls_name}.{field} repeats a literal default ({value.value})"


def test_config_files_evaluate_as_they_train():
  from experiments import configs  # pylint: disable=g-import-not-at-top
  c = configs.get_config("tiny")
  assert c.eval.batch_size == c.train.batch_size and c.eval.skip_first_positions == c.run.skip_first_positions
  c.train.batch_size = 256
  assert c.eval.batch_size == 256  # an override of the training batch carries over
  c.eval.batch_size = 64
  assert (c.train.batch_size, c.eval.batch_size) == (256, 64)  # and evaluation's own override stays its own


def _help(module: str) -> str:
  return subprocess.run([sys.executable, "-m", f"experiments.{module}", "--help"], cwd=REPO, env=ENV,
                        capture_output=True, text=True, timeout=300, check=False).stdout


def test_help_lists_the_generated_flags_with_their_docstrings():
  train_help, sweep_help, bench_help, eval_help = (_help(m) for m in ("train", "sweep", "benchmark", "evaluate"))
  for text in (train_help, sweep_help, bench_help):
    for name in ("width", "k", "batch_size", "architecture", "matryoshka_widths", "l0_coefficient",
                 "jumprelu_bandwidth", "jumprelu_init_threshold", "aux_k"):
      assert f"--{name}:" in text or f"--[no]{name}:" in text, name
    assert "jumprelu only: the straight-through estimator's kernel" in text
  assert "Default: 4096." in train_help and "Default: 9216." in bench_help  # width: the config's, the bench's
  for name in RunConfig.__dataclass_fields__:
    if name not in ("activations", "out_dir"):
      assert f"--{name}:" in train_help or f"--[no]{name}:" in train_help, name
  assert re.search(r"--batch_size: Tokens per batch.*Default: the run's", eval_help, re.S)
  assert "--skip_first_positions:" in eval_help and "--ce_contexts:" in eval_help


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
  root = tmp_path_factory.mktemp("store")
  return synthetic.write_sparse_store(str(root / "s"), 256, D, context_len=8, shard_tokens=128,
                                      num_features=16).path


def _dry_run(store_path, out_dir, *argv, check=True) -> subprocess.CompletedProcess:
  proc = subprocess.run([sys.executable, "-m", "experiments.train", f"--activations={store_path}",
                         f"--out_dir={out_dir}", "--dry_run", *argv], cwd=REPO, env=ENV, capture_output=True,
                        text=True, timeout=300, check=False)
  if check:
    assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def _error_line(proc) -> str:
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  return lines[-1]


def test_new_architecture_fields_come_from_the_generator(store_path, tmp_path):
  proc = _dry_run(store_path, tmp_path / "r", "--width=64", "--k=4", "--meta_k=2",
                  "--architecture=matryoshka_batchtopk", "--matryoshka_widths=8,32", "--l0_coefficient=2",
                  "--jumprelu_bandwidth=0.01", "--aux_k=7")
  train = json.loads(proc.stdout[proc.stdout.index("{"):])["train"]
  assert train["architecture"] == "matryoshka_batchtopk" and train["matryoshka_widths"] == [8, 32, 64]
  assert (train["l0_coefficient"], train["jumprelu_bandwidth"], train["aux_k"]) == (2.0, 0.01, 7)
  bad = _error_line(_dry_run(store_path, tmp_path / "r", "--matryoshka_widths=8,x", check=False))
  assert bad.startswith("error: ") and "--matryoshka_widths" in bad and "whole numbers" in bad


def test_deprecated_activation_alias_works_and_a_conflict_is_one_line(store_path, tmp_path):
  proc = _dry_run(store_path, tmp_path / "r", "--activation=topk")
  assert json.loads(proc.stdout[proc.stdout.index("{"):])["train"]["architecture"] == "topk"
  assert "--activation is deprecated" in proc.stderr
  both = _dry_run(store_path, tmp_path / "r", "--activation=topk", "--architecture=batchtopk", check=False)
  assert _error_line(both).startswith("error: --activation=topk (deprecated) and --architecture=batchtopk disagree")
  twice = _dry_run(store_path, tmp_path / "r", "--lambda2=0.5", "--config.train.lambda2=0.1", check=False)
  assert _error_line(twice).startswith("error: --lambda2=0.5 and --config.train.lambda2=0.1 disagree")


# Runs experiments.evaluate's main with the evaluation itself replaced: prints the EvalConfig it would run.
_EVALUATE = """
import dataclasses, json, sys, types
fake = types.ModuleType("metasae_jax.evaluation.evaluate")
fake.evaluate_run = lambda config: print("CONFIG " + json.dumps(dataclasses.asdict(config)))
fake.markdown = lambda report: ""
sys.modules[fake.__name__] = fake
import metasae_jax.evaluation
metasae_jax.evaluation.evaluate = fake
from experiments import cli, evaluate
sys.argv[0] = "evaluate"
cli.run(evaluate.main)
"""


def _run_dir(root, run_config=None, batch_size=None, skip=0) -> str:
  rng = np.random.default_rng(0)
  for name in artifact.SAE_NAMES:
    params = {"W_enc": rng.normal(size=(D, 32)).astype(np.float32), "b_enc": np.zeros(32, np.float32),
              "W_dec": rng.normal(size=(32, D)).astype(np.float32), "b_dec": np.zeros(D, np.float32)}
    train = {"k": 4, "architecture": "batchtopk", **({"batch_size": batch_size} if batch_size else {})}
    artifact.save_sae(str(root / name), params, artifact.sae_cfg(name, train, 256, skip_first_positions=skip))
  if run_config is not None:
    with open(root / "run_config.json", "w") as f:
      json.dump(run_config, f)
  return str(root)


def _evaluated(run_dir, store_path, *argv) -> dict:
  proc = _python(_EVALUATE, f"--run_dir={run_dir}", f"--activations={store_path}", "--model=none", *argv)
  return json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("CONFIG "))[len("CONFIG "):])


def test_evaluate_takes_the_runs_batch_size_and_skip_rule_unless_given(store_path, tmp_path):
  run = _run_dir(tmp_path / "run", {"train": {"batch_size": 64}, "data": {"skip_first_positions": 1}})
  config = _evaluated(run, store_path)
  assert (config["batch_size"], config["skip_first_positions"]) == (64, 1)
  config = _evaluated(run, store_path, "--batch_size=32", "--skip_first_positions=0", "--ce_contexts=3")
  assert (config["batch_size"], config["skip_first_positions"], config["ce_contexts"]) == (32, 0, 3)
  # A published run without run_config.json: its SAEs' cfg.json records both.
  published = _run_dir(tmp_path / "published", batch_size=128, skip=2)
  config = _evaluated(published, store_path)
  assert (config["batch_size"], config["skip_first_positions"]) == (128, 2)


@dataclasses.dataclass(frozen=True)
class _Toy:
  """A config with one field of each kind the generator handles."""
  path: str
  """Required: skipped."""
  on: bool = True
  """A switch."""
  count: int = 3
  """How many."""
  rate: float = 0.5
  """How fast."""
  mode: str = "a"
  """Which mode."""
  widths: tuple = ()
  """Nested widths."""


def test_generator_types_defaults_and_help():
  from absl import flags  # pylint: disable=g-import-not-at-top
  fv = flags.FlagValues()
  defined = dataclass_flags.define_from(_Toy, skip=("path",), choices={"mode": ("a", "b")},
                                        rename={"count": "num"}, flag_values=fv)
  assert defined == {"on": "on", "num": "count", "rate": "rate", "mode": "mode", "widths": "widths"}
  fv(["prog"])
  assert all(fv[name].value is None for name in defined) and dataclass_flags.given(defined, fv) == {}
  assert fv["num"].help == "How many. Default: 3." and fv["widths"].help == "Nested widths. Default: empty."
  fv(["prog", "--noon", "--num=7", "--rate=2", "--mode=b", "--widths=32,128,512"])
  assert dataclass_flags.given(defined, fv) == {"on": False, "count": 7, "rate": 2.0, "mode": "b",
                                                "widths": (32, 128, 512)}
  for bad in ("--mode=c", "--widths=1,x", "--num=1.5"):
    with pytest.raises(flags.IllegalFlagValueError):
      flags.FlagValues.__call__(fv, ["prog", bad])
  assert dataclass_flags.as_argv({"on": False, "widths": (1, 2), "count": 3}) == ["--noon", "--widths=1,2",
                                                                                 "--count=3"]
