"""The package's layer rules (docs/architecture.md), read from every module's imports with `ast`.

Rules: core/ imports only jax, flax, optax, numpy, the standard library and
itself; only lm/ imports torch-side packages; nothing imports `experiments`;
no module imports a higher layer (core < storage < training, lm, evaluation <
autointerp, browser < workflows), peers in one layer only where listed in
PEERS; no import cycles among module-level imports.
"""

import ast
import dataclasses
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "metasae_jax"

LAYERS = {"core": 0, "storage": 1, "training": 2, "lm": 2, "evaluation": 2, "autointerp": 3, "browser": 3,
          "workflows": 4}
# Imports between peers of one layer that are allowed, and whether they must sit inside a function.
# evaluation loads the language model only for ΔCE, so it imports lm lazily and stays importable without torch.
PEERS = {("evaluation", "lm"): "lazy"}
CORE_THIRD_PARTY = {"jax", "jaxlib", "flax", "optax", "numpy"}
TORCH_SIDE = {"torch", "transformers", "accelerate", "gguf", "tokenizers"}


@dataclasses.dataclass(frozen=True)
class Import:
  """One import statement's target as seen from a module."""
  module: str
  """The importing module (dotted name)."""
  target: str
  """The imported module's dotted name (for `from a import b`: a.b when b is a module, else a)."""
  lazy: bool
  """Inside a function or method body (runs only when called)."""
  line: int


def module_name(root: str, path: str) -> str:
  rel = os.path.relpath(path, root)[:-len(".py")].split(os.sep)
  return ".".join(rel[:-1] if rel[-1] == "__init__" else rel)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
  if not node.level:
    return node.module or ""
  parts = module.split(".") if is_package else module.split(".")[:-1]
  base = parts[:len(parts) - node.level + 1]
  return ".".join(base + ([node.module] if node.module else []))


def read_imports(root: str, package: str = PACKAGE) -> tuple[list, set]:
  """Every import of every module under root/package, and the set of module names."""
  found, modules = [], set()
  for d, _, files in os.walk(os.path.join(root, package)):
    for f in sorted(files):
      if f.endswith(".py"):
        modules.add(module_name(root, os.path.join(d, f)))
  for d, _, files in os.walk(os.path.join(root, package)):
    for f in sorted(files):
      if not f.endswith(".py"):
        continue
      path = os.path.join(d, f)
      name = module_name(root, path)
      with open(path, encoding="utf-8") as fh:
        tree = ast.parse(fh.read(), path)
      lazy_nodes = {id(n) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                        ast.Lambda))
                    for n in ast.walk(fn) if n is not fn}
      for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
          targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
          base = _resolve(name, f == "__init__.py", node)
          targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        found += [Import(name, t, id(node) in lazy_nodes, node.lineno) for t in targets]
  return found, modules


def _sub(name: str, package: str) -> str:
  """The layer folder of a module of `package` ("" for the package's own __init__)."""
  parts = name.split(".")
  return parts[1] if len(parts) > 1 else ""


def violations(root: str, package: str = PACKAGE) -> list:
  """Every broken rule, as readable lines."""
  imports, modules = read_imports(root, package)
  stdlib = set(sys.stdlib_module_names)
  out = []
  for imp in imports:
    top = imp.target.split(".")[0]
    src = _sub(imp.module, package)
    where = f"{imp.module}:{imp.line} imports {imp.target}"
    if top == "experiments":
      out.append(f"{where}: the library never refers to the binaries")
    if top in TORCH_SIDE and src != "lm":
      out.append(f"{where}: only {package}.lm imports torch-side packages")
    if src == "core" and top != package and top not in CORE_THIRD_PARTY and top not in stdlib:
      out.append(f"{where}: core imports only {sorted(CORE_THIRD_PARTY)} and the standard library")
    if top != package or src not in LAYERS:
      continue
    dst = _sub(imp.target, package)
    if dst == "":
      out.append(f"{where}: modules import the layer they need, never the package facade")
    elif dst not in LAYERS:
      out.append(f"{where}: {dst} is not in a layer (add it to LAYERS and docs/architecture.md)")
    elif dst != src and LAYERS[dst] > LAYERS[src]:
      out.append(f"{where}: {src} (layer {LAYERS[src]}) must not import {dst} (layer {LAYERS[dst]})")
    elif dst != src and LAYERS[dst] == LAYERS[src]:
      rule = PEERS.get((src, dst))
      if rule is None:
        out.append(f"{where}: peers {src} and {dst} must not import each other")
      elif rule == "lazy" and not imp.lazy:
        out.append(f"{where}: {src} may import {dst} only inside the function that needs it")
  out += [f"import cycle: {' -> '.join(c)}" for c in cycles(imports, modules)]
  for d in sorted({_sub(m, package) for m in modules} - {""} - set(LAYERS)):
    out.append(f"{package}.{d} is not in a layer (add it to LAYERS and docs/architecture.md)")
  return out


def cycles(imports: list, modules: set) -> list:
  """Cycles among module-level imports of the package's modules (each reported once)."""
  graph = {m: set() for m in modules}
  for imp in imports:
    if not imp.lazy and imp.target in modules and imp.target != imp.module:
      graph[imp.module].add(imp.target)
  found, state, stack = [], {}, []

  def visit(m):
    state[m] = "open"
    stack.append(m)
    for n in sorted(graph[m]):
      if state.get(n) == "open":
        found.append(stack[stack.index(n):] + [n])
      elif n not in state:
        visit(n)
    stack.pop()
    state[m] = "done"

  for m in sorted(graph):
    if m not in state:
      visit(m)
  return found


def test_package_keeps_its_layer_rules():
  assert violations(ROOT) == []


def _write(root, rel: str, text: str = "") -> None:
  path = os.path.join(root, "pkg", rel)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)


@pytest.mark.parametrize("rel, text, expect", [
    ("core/bad.py", "import scipy\n", "core imports only"),
    ("core/bad.py", "from pkg.storage import store\n", "core (layer 0) must not import storage (layer 1)"),
    ("storage/bad.py", "def f():\n  from pkg.evaluation import thresholds\n", "storage (layer 1) must not import"),
    ("training/bad.py", "import torch\n", "only pkg.lm imports torch-side"),
    ("browser/bad.py", "def f():\n  from transformers import AutoTokenizer\n", "only pkg.lm imports torch-side"),
    ("workflows/bad.py", "import experiments.train\n", "never refers to the binaries"),
    ("workflows/bad.py", "from experiments import cli\n", "never refers to the binaries"),
    ("evaluation/bad.py", "from pkg.lm import delta_ce\n", "only inside the function"),
    ("training/bad.py", "from pkg.evaluation import thresholds\n", "peers training and evaluation"),
    ("core/bad.py", "from .. import storage\n", "core (layer 0) must not import storage"),
    ("core/bad.py", "import pkg\n", "never the package facade"),
    ("extras/bad.py", "", "pkg.extras is not in a layer"),
    ("core/a.py", "from pkg.core import b\n", "import cycle: pkg.core.b -> pkg.core.a -> pkg.core.b"),
])
def test_checker_catches_each_broken_rule(tmp_path, rel, text, expect):
  """A small package that keeps every rule, then one bad file: the checker names exactly that rule."""
  for sub in LAYERS:
    _write(tmp_path, f"{sub}/__init__.py")
  _write(tmp_path, "__init__.py", "from pkg.core import b\n")
  _write(tmp_path, "core/b.py", "import math\nimport numpy as np\nimport jax.numpy as jnp\n")
  _write(tmp_path, "storage/store.py", "from pkg.core import b\nfrom . import other\n")
  _write(tmp_path, "storage/other.py", "import json\n")
  _write(tmp_path, "evaluation/thresholds.py", "import scipy\nfrom pkg.storage import store\n"
                                               "def f():\n  from pkg.lm import delta_ce\n")
  _write(tmp_path, "lm/delta_ce.py", "import torch\nfrom pkg.storage import store\n")
  assert violations(str(tmp_path), "pkg") == []
  if rel == "core/a.py":
    _write(tmp_path, "core/b.py", "from pkg.core import a\n")
  _write(tmp_path, rel, text)
  found = violations(str(tmp_path), "pkg")
  assert len(found) == 1 and expect in found[0], found
