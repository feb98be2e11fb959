"""Exports residual-stream activations of a causal LM into an activation store (zarr v3, docs/storage.md).

  python -m experiments.export_activations --layer 15 --num_tokens 8192 --out_dir /tmp/acts
  python -m experiments.export_activations --num_tokens 8192 --out_dir s3://bucket/l15   # or gs://bucket/l15

Rerunning the same command resumes an interrupted export; a finished store is left as is.
"""

import json

from absl import flags

from experiments import cli
from metasae_jax.lm import export_config, model_files
from metasae_jax.storage import store as store_lib

_DEFAULTS = export_config.ExportConfig(out_dir="-")

_MODEL = flags.DEFINE_string("model", model_files.DEFAULT_MODEL,
                             "Built-in default (SmolLM2-135M-Instruct GGUF), a local model "
                             "directory, or an HF model id (needs internet).")
_LAYER = flags.DEFINE_integer("layer", _DEFAULTS.layer, "Transformer block index, 0-based.")
_SITE = flags.DEFINE_enum("site", _DEFAULTS.site, list(model_files.SITES),
                          "resid_pre: input of the block; resid_post: its output.")
_CORPUS = flags.DEFINE_string("corpus", _DEFAULTS.corpus,
                              "'builtin' (CPython docs, offline), a .txt/.jsonl/.parquet file or "
                              "directory, or an HF dataset id[:config] (needs `datasets` and internet).")
_TEXT_FIELD = flags.DEFINE_string("text_field", _DEFAULTS.text_field,
                                  "Field holding the text in .jsonl/.parquet/dataset rows.")
_CONTEXT_LEN = flags.DEFINE_integer("context_len", _DEFAULTS.context_len, "Tokens per context.")
_CONTEXTS_PER_BATCH = flags.DEFINE_integer("contexts_per_batch", _DEFAULTS.batch_size,
                                           "Contexts per forward pass (--batch_size means tokens elsewhere).")
cli.deprecated_alias("batch_size", "contexts_per_batch")
_HELDOUT = flags.DEFINE_float("heldout_fraction", _DEFAULTS.heldout_fraction,
                              "Fraction of whole contexts held out as the store's fixed tail: views STORE/train "
                              "(train reads it) and STORE/heldout (evaluate, sweep, autointerp, browse read it); "
                              "0 writes no split.")
_DTYPE = flags.DEFINE_enum("dtype", _DEFAULTS.dtype, ["float16", "float32"],
                           "Stored activation dtype.")
_CHUNK_TOKENS = flags.DEFINE_integer("chunk_tokens", _DEFAULTS.chunk_tokens,
                                     "Tokens per zarr chunk, the unit written, checksummed and read (rounded down "
                                     "to whole contexts); a resumed store keeps its own.")
_SHARD_TOKENS = flags.DEFINE_integer("shard_tokens", _DEFAULTS.shard_tokens,
                                     "Tokens per shard file when resuming a format-1 (.npy) store.")
_NUM_TOKENS = flags.DEFINE_integer("num_tokens", _DEFAULTS.num_tokens,
                                   "Tokens to export (rounded down to whole contexts; fewer if "
                                   "the corpus runs out).")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Store location: a directory, s3://bucket/prefix (AWS_* variables) "
                               "or gs://bucket/prefix (application default credentials); created, or resumed.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar (tokens/s) on stderr.")
_BENCHMARK = flags.DEFINE_integer("benchmark_batches", 0,
                                  "If > 0: write nothing, print exporter vs raw forward tokens/s "
                                  "measured on this many batches.")


def main(argv):
  del argv
  config = export_config.ExportConfig(
      out_dir=_OUT_DIR.value or ("-" if _BENCHMARK.value else ""), model=_MODEL.value,
      layer=_LAYER.value, site=_SITE.value, corpus=_CORPUS.value,
      text_field=_TEXT_FIELD.value, context_len=_CONTEXT_LEN.value,
      batch_size=_CONTEXTS_PER_BATCH.value, dtype=_DTYPE.value, chunk_tokens=_CHUNK_TOKENS.value,
      shard_tokens=_SHARD_TOKENS.value,
      num_tokens=_NUM_TOKENS.value, heldout_fraction=_HELDOUT.value,
      progress=_PROGRESS.value)
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
