"""What every binary shares: user errors become one line on stderr and exit status 1."""

import sys

from absl import app, logging

from metasae_jax.core.errors import UserError


def run(main) -> None:
  """`app.run(main)`, turning a UserError into `error: <message>` and exit code 1 (no traceback)."""

  def wrapped(argv):
    # Orbax logs every checkpoint step at INFO through absl; keep the terminal for the progress bar.
    if logging.get_verbosity() == logging.INFO:
      logging.set_verbosity(logging.WARNING)
    try:
      return main(argv)
    except UserError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(1)

  app.run(wrapped)
