"""Exports a run's joint and solo SAEs for SAELens or EleutherAI's sparsify (see docs/interop.md).

  python -m experiments.export_sae --run_dir runs/x --format saelens --out_dir exported/x

SAELens: writes OUT_DIR/joint/HOOK and OUT_DIR/solo/HOOK (HOOK = blocks.L.hook_resid_pre, the Hub's sae_id), each
loadable with `sae_lens.SAE.load_from_disk`; without calibrated thresholds BatchTopK is exported as TopK(k).
sparsify: writes OUT_DIR/joint and OUT_DIR/solo for `sparsify.SparseCoder.load_from_disk`.
"""

from absl import flags

from experiments import cli
from metasae_jax.storage import interop

_RUN_DIR = flags.DEFINE_string("run_dir", None, "Run directory written by experiments.train (joint/, solo/).")
_FORMAT = flags.DEFINE_enum("format", "saelens", list(interop.FORMATS), "Target library's on-disk layout.")
_OUT = flags.DEFINE_string("out_dir", None, "Output directory; gets joint/ and solo/ (SAELens: each holding a "
                           "folder named by hook).")
cli.deprecated_alias("out", "out_dir")
_APPROX = flags.DEFINE_bool("allow_approximate", False,
                            "sparsify: export even though it cannot express the SAE exactly (no input "
                            "standardisation, per-token TopK); caveats go into cfg.json. SAELens needs no "
                            "permission: BatchTopK without thresholds is exported as TopK(k) with a caveat.")
flags.mark_flags_as_required(["run_dir"])


def main(argv):
  del argv
  if not _OUT.value:
    raise cli.UserError("--out_dir is required: the directory that gets joint/ and solo/.")
  cli.check_out_dir(_OUT.value)
  written = interop.export_run(_RUN_DIR.value, _OUT.value, _FORMAT.value, _APPROX.value)
  for name, (path, caveats) in written.items():
    print(f"{name}: {path} ({_FORMAT.value})" + ("" if not caveats else "  (approximate: "
                                                   + " ".join(caveats) + ")"))


if __name__ == "__main__":
  cli.run(main)
