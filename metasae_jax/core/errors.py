"""The one exception type for mistakes a user can fix (bad flag, bad file, bad shape).

Binaries catch it and print its message as a single line, exiting non-zero,
instead of a traceback from deep inside JAX.
"""


class UserError(ValueError):
  """A readable error naming the problem and the fix."""
