"""The one exception type for mistakes a user can fix (bad flag, bad file, bad shape).

Binaries catch it and print its message as a single line, exiting non-zero,
instead of a traceback from deep inside JAX.
"""


class UserError(ValueError):
  """A readable error naming the problem and the fix."""


class Interrupted(Exception):
  """SIGINT/SIGTERM stopped a run at a step boundary after saving its state; binaries exit 128 + signum."""

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.signum = signum
