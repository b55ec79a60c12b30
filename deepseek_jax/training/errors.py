"""The error types for problems the user can fix (as opposed to bugs)."""


class UserError(Exception):
  """A configuration, data or device problem the user can fix; entry points print it on one line and
  exit with status 2."""


class CheckpointError(UserError):
  """A checkpoint could not be written, or no checkpoint of a run can be read; what is on disk is left as
  it was."""
