"""Exports residual-stream activations of a causal LM into an activation store (zarr v3, docs/storage.md).

  python -m experiments.export_activations --layer 15 --num_tokens 8192 --out_dir /tmp/acts
  python -m experiments.export_activations --num_tokens 8192 --out_dir s3://bucket/l15   # or gs://bucket/l15

Rerunning the same command resumes an interrupted export; a finished store is left as is.
"""

import json

from absl import flags

from experiments import cli, dataclass_flags
from metasae_jax.lm import export_config, model_files
from metasae_jax.storage import store as store_lib

# One flag per ExportConfig field, generated from the dataclass (help: its docstring; default: its default).
# `batch_size` counts contexts here, so its flag is --contexts_per_batch (--batch_size means tokens elsewhere).
EXPORT_FLAGS = dataclass_flags.define_from(
    export_config.ExportConfig, skip=("out_dir",), rename={"batch_size": "contexts_per_batch"},
    choices={"site": model_files.SITES, "dtype": store_lib.DTYPES})
cli.deprecated_alias("batch_size", "contexts_per_batch")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Store location: a directory, s3://bucket/prefix (AWS_* variables) "
                               "or gs://bucket/prefix (application default credentials); created, or resumed.")
_BENCHMARK = flags.DEFINE_integer("benchmark_batches", 0,
                                  "If > 0: write nothing, print exporter vs raw forward tokens/s "
                                  "measured on this many batches.")


def main(argv):
  del argv
  config = export_config.ExportConfig(out_dir=_OUT_DIR.value or ("-" if _BENCHMARK.value else ""),
                                      **dataclass_flags.given(EXPORT_FLAGS))
  # Flags, paths, the model's config and the corpus are checked before torch is imported or the model loads.
  if not _BENCHMARK.value:
    cli.check_out_dir(config.out_dir, remote_ok=True)
  export_config.preflight(config)
  from metasae_jax.lm import export  # pylint: disable=g-import-not-at-top  (torch)
  if _BENCHMARK.value:
    from metasae_jax.workflows import benchmarking  # pylint: disable=g-import-not-at-top
    print(json.dumps(benchmarking.benchmark_export(config, num_batches=_BENCHMARK.value, rounds=3)))
    return
  store = export.export_activations(config)
  print(f"{store.path}: {store.num_tokens} tokens x d_model {store.d_model} ({store.dtype}) "
        f"in {store.num_chunks} chunks ({store.format})")
  split = store_lib.split_of(store.path)
  if split:
    print(f"train on {split[0]} ({store_lib.read_manifest(split[0])['num_tokens']} tokens), evaluate on "
          f"{split[1]} ({store_lib.read_manifest(split[1])['num_tokens']} tokens); experiments.train and the "
          "evaluating binaries pick these views from the store by themselves.")


if __name__ == "__main__":
  cli.run(main)
