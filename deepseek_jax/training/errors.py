"""The error type for mistakes in what the user asked for (as opposed to bugs)."""


class UserError(Exception):
  """A configuration, data or device problem the user can fix; entry points print it on one line and
  exit with status 2."""
