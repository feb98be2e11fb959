"""Without torch and transformers, `import metasae_jax`, training on a store and `load_sae(...).encode` still work.

Legend: T = tokens, D = d_model, N = width.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HIDDEN = ("torch", "transformers", "accelerate", "gguf", "tokenizers")

# Put on PYTHONPATH as sitecustomize.py: every import of a hidden package (or its submodules) fails as it
# would where the package is not installed.
SITECUSTOMIZE = textwrap.dedent(f"""
    import sys

    class _Hide:
      def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {HIDDEN!r}:
          raise ModuleNotFoundError(f"No module named {{name!r}} (hidden by the torch-absent test)", name=name)
        return None

    sys.meta_path.insert(0, _Hide())
""")

SCRIPT = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    try:
      import torch  # noqa: F401
      sys.exit("torch is importable: the hiding did not work")
    except ImportError:
      pass
    import metasae_jax
    from metasae_jax.core.config import TrainConfig
    from metasae_jax.storage import synthetic
    from metasae_jax.training import trainer

    work = sys.argv[1]
    store = synthetic.write_sparse_store(os.path.join(work, "store"), 512, 16, context_len=8, shard_tokens=256,
                                         num_features=32)
    config = TrainConfig(d_model=16, width=32, k=4, meta_width=4, meta_k=2, batch_size=64, n_primary_steps=2,
                         n_meta_steps=1)
    run = trainer.RunConfig(activations=store.path, out_dir=os.path.join(work, "run"), num_tokens=256,
                            checkpoint_every_steps=2, progress=False)
    metrics = trainer.train_and_save(config, run)
    sae = metasae_jax.load_sae(os.path.join(work, "run", "joint"))
    x_TxD = store.read_acts(0, 32)
    np.save(os.path.join(work, "x.npy"), x_TxD)
    np.save(os.path.join(work, "acts.npy"), np.asarray(sae.encode(x_TxD), np.float32))
    hidden = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
    print(json.dumps({"loss": metrics["loss"], "hidden_loaded": hidden}))
""")


def _numpy_topk_encode(weights: dict, x_TxD: np.ndarray, k: int) -> np.ndarray:
  """Standardise each token (unbiased std + 1e-5), ReLU((x' - b_dec) W_enc + b_enc), keep each token's top k."""
  xs = (x_TxD - x_TxD.mean(-1, keepdims=True)) / (x_TxD.std(-1, ddof=1, keepdims=True) + 1e-5)
  pre = np.maximum((xs - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"], 0.0)
  keep = np.zeros_like(pre, bool)
  np.put_along_axis(keep, np.argsort(-pre, axis=1)[:, :k], True, axis=1)
  return np.where(keep, pre, 0.0)


def test_train_and_encode_without_torch(tmp_path):
  site = tmp_path / "site"
  site.mkdir()
  (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), ROOT]), JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=str(tmp_path), env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["hidden_loaded"] == [] and np.isfinite(out["loss"])

  from safetensors.numpy import load_file
  weights = load_file(str(tmp_path / "run" / "joint" / "sae.safetensors"))
  with open(tmp_path / "run" / "joint" / "cfg.json") as f:
    k = json.load(f)["k"]
  x_TxD = np.load(tmp_path / "x.npy")
  got_TxN = np.load(tmp_path / "acts.npy")
  np.testing.assert_allclose(got_TxN, _numpy_topk_encode(weights, x_TxD, k), rtol=1e-4, atol=1e-5)
  assert (got_TxN > 0).sum(axis=1).max() <= k and got_TxN.any()
