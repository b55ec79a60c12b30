"""What every entry point under `experiments/` shares: a user's mistake ends in one line and exit status 2.

    from experiments import cli
    _CONFIG = cli.DEFINE_config_file("config", "experiments/configs/tiny.py", "experiment config file")
    ...
    if __name__ == "__main__":
      cli.run(main)

`run(main)` parses the flags and calls `main(argv)` as `absl.app.run` does (`--help` included), and turns
every mistake in what was asked for into one line `error: <message>` on stderr and exit status 2:
  * flags: unknown or mistyped flags, bad values, missing required flags (absl's own message);
  * config files (`DEFINE_config_file`): a missing file, an exception while loading it (named with its
    line), an override of a field the config does not have (with ml_collections' "did you mean ..."), a
    value of the wrong type;
  * `main` raising one of the user-error types: `app.UsageError`, `deepseek_jax.training.UserError`,
    `ValueError` (the library's bad-input error, e.g. `interop.hf.CheckpointError`), and the `OSError`s
    of a path the user named (missing, not a directory, a directory, existing, not permitted).
Anything else is a bug and keeps its traceback.  Unless `--verbosity` is given, absl logging shows warnings
and errors only (libraries such as orbax log every step at INFO).
"""

from __future__ import annotations

import os
import re
import sys
import traceback
from typing import Callable, NoReturn, Optional

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

# Flags defined here (DEFINE_config_file) belong to the entry point that calls it, and so show in its --help.
flags.disclaim_key_flags()

EXIT_USER_ERROR = 2

# OSErrors about a path the user gave: a user's mistake, reported as "PATH: reason".
PATH_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError, PermissionError)

_CONFIG_FLAGS: dict[str, Optional[str]] = {}   # flags defined by DEFINE_config_file: name -> default
_DEFERRED: list[str] = []         # messages of mistakes found while defining flags (before run)


def one_line(text: str) -> str:
  """`text` with its line breaks (and the blanks around them) folded into single spaces."""
  return re.sub(r"\s*\n\s*", " ", str(text)).strip()


def fail(message: str) -> NoReturn:
  """Prints `error: message` as one line on stderr and exits with status 2."""
  sys.stderr.write(f"error: {one_line(message)}\n")
  sys.stderr.flush()
  sys.exit(EXIT_USER_ERROR)


def user_error_types() -> tuple:
  """The exception types `run` reports as a user's mistake (the project's own once it is imported)."""
  types = (app.UsageError, ValueError) + PATH_ERRORS
  errors = sys.modules.get("deepseek_jax.training.errors")   # loaded whenever one can have been raised
  if errors is not None:
    types += (errors.UserError,)
  return types


def describe(e: BaseException) -> str:
  """The one-line message of a user-error exception."""
  if isinstance(e, OSError) and e.filename is not None and e.strerror:
    return f"{e.filename}: {e.strerror}"
  return one_line(str(e)) or type(e).__name__


# ------------------------------------------------------------------------------------------ config files

def _argv() -> list[str]:
  return list(sys.argv)


def _config_value(name: str, argv) -> Optional[str]:
  """The value given to --name on the command line (`--name=V` or `--name V`), or None."""
  value = None
  for i, arg in enumerate(argv[1:], 1):
    if arg == "--":
      break
    m = re.match(rf"^--?{re.escape(name)}(=(.*))?$", arg)
    if m:
      value = m.group(2) if m.group(1) else (argv[i + 1] if i + 1 < len(argv) else None)
  return value


def _config_file_problem(flag: str, value: str, default: bool = False) -> Optional[str]:
  """Why the config file `value` of --flag cannot be loaded (before ml_collections tries), or None."""
  path = value.split(":", 1)[0]
  where = f"--{flag}={value}" + (" (the default)" if default else "")
  if not path:
    return f"{where}: no config file named"
  if not os.path.exists(path):
    return f"{where}: config file {path} does not exist"
  if not os.path.isfile(path):
    return f"{where}: {path} is not a file"
  if not os.access(path, os.R_OK):
    return f"{where}: config file {path} is not readable"
  return None


def _override_flag(key: str, argv) -> Optional[str]:
  """The --config.PATH override on the command line whose path goes through the field `key`."""
  for arg in argv[1:]:
    for name in _CONFIG_FLAGS:
      m = re.match(rf"^--?(?:no)?{re.escape(name)}\.([^=]+)", arg)
      if m and key in re.split(r"[.\[\]]", m.group(1)):
        return f"--{name}.{m.group(1)}"
  return None


def _config_files() -> dict[str, str]:
  """{flag name: its config file's value} of the config flags given or with a default."""
  argv = _argv()
  values = {name: _config_value(name, argv) or default for name, default in _CONFIG_FLAGS.items()}
  return {name: value for name, value in values.items() if value}


def _config_file_frame(e: BaseException) -> Optional[str]:
  """'FILE:LINE' of the innermost frame of e's traceback in one of the config files given, if any."""
  files = {os.path.abspath(v.split(":", 1)[0]) for v in _config_files().values()}
  if isinstance(e, SyntaxError) and e.filename and os.path.abspath(e.filename) in files:
    return f"{e.filename}:{e.lineno}"
  where = None
  for frame in traceback.extract_tb(e.__traceback__):
    if os.path.abspath(frame.filename) in files:
      where = f"{frame.filename}:{frame.lineno}"
  return where


def _flag_error_message(e: BaseException) -> str:
  """One line for an exception raised while the flags (and the config files they name) were parsed."""
  argv = _argv()
  text = e
  while isinstance(text, (KeyError, AttributeError)) and len(text.args) == 1:
    text = text.args[0]       # str(KeyError) is the repr of its argument; AttributeError(KeyError) nests it
  text = str(text)
  # ml_collections: "'modle'\nDid you mean "model" instead of "modle"?" for a field the config lacks.
  m = re.match(r"^'([^']*)'(?:\s*Did you mean \"([^\"]*)\" instead of \"[^\"]*\"\?)?\s*$", text)
  if isinstance(e, (KeyError, AttributeError)) and m:
    key, suggestion = m.group(1), m.group(2)
    flag = _override_flag(key, argv) or "--" + next(iter(_CONFIG_FLAGS), "config")
    msg = f"{flag}: the config has no field {key!r}"
    return msg + (f"; did you mean {suggestion!r}?" if suggestion else "")
  # A TypeError / ValueError while loading a config file, rewrapped by ml_collections with the traceback as
  # text (and by absl with the flag): the flag, the file and line, and the exception's last line.
  if "Error whilst parsing config file" in text:
    lines = [l for l in text.splitlines() if l.strip()]
    head = lines[0].split(": Error whilst parsing config file")[0]
    files = {os.path.abspath(v.split(":", 1)[0]) for v in _config_files().values()}
    frames = [f"{f}:{n}" for f, n in re.findall(r'File "([^"]+)", line (\d+)', text)
              if os.path.abspath(f) in files]
    return f"{head}: {lines[-1].strip()}" + (f" ({frames[-1]})" if frames else "")
  if isinstance(e, flags.UnrecognizedFlagError):
    for name in _CONFIG_FLAGS:
      if e.flagname.startswith(name + "."):
        return f"--{e.flagname}: a config override needs a config file (--{name}=FILE)"
  where = _config_file_frame(e)
  if where:
    return f"{where}: {type(e).__name__}: {one_line(text)}"
  if isinstance(e, flags.Error):
    return one_line(text)
  loading = _config_files()
  if loading and any(f.name == "parse" and f.filename.endswith("config_flags.py")
                     for f in traceback.extract_tb(e.__traceback__)):
    name, value = next(iter(loading.items()))   # raised while ml_collections loaded a config file
    return f"--{name}={value}: {type(e).__name__}: {one_line(text)}"
  return f"{type(e).__name__}: {one_line(text)}" if text else type(e).__name__


def DEFINE_config_file(name: str, default: Optional[str] = None, help_string: str = "experiment config file",
                       **kwargs):  # pylint: disable=invalid-name
  """`ml_collections.config_flags.DEFINE_config_file` whose mistakes `run` reports in one line.

  With a default file and no --name on the command line, ml_collections loads the file and applies the
  --name.FIELD overrides right here, at definition; a mistake found then is reported by `run`.

  Returns:
    The flag holder (None when the definition failed: `run` then exits before `main`).
  """
  _CONFIG_FLAGS[name] = default
  argv = _argv()
  if default is not None and _config_value(name, argv) is None:
    problem = _config_file_problem(name, default, default=True)
    if problem:
      _DEFERRED.append(problem)
      return None
  try:
    return config_flags.DEFINE_config_file(name, default, help_string, **kwargs)
  except Exception as e:  # pylint: disable=broad-except
    _DEFERRED.append(_flag_error_message(e))
    return None


def _parse_flags(argv):
  """absl's flag parsing with every mistake reported by `fail`."""
  if _DEFERRED:
    fail(_DEFERRED[0])
  for name in _CONFIG_FLAGS:
    value = _config_value(name, argv)
    if value is not None:
      problem = _config_file_problem(name, value)
      if problem:
        fail(problem)
  try:
    args = flags.FLAGS(argv)
  except BrokenPipeError:   # --help into a closed pipe
    raise
  except Exception as e:  # pylint: disable=broad-except
    fail(_flag_error_message(e))
  for name, value in _config_files().items():
    if flags.FLAGS[name].value is None:
      fail(f"--{name}={value}: get_config() returned None")
  return args


def run(main: Callable) -> NoReturn:
  """`absl.app.run(main)` on sys.argv with every user's mistake reported as one line and exit status 2."""

  def wrapped(args):
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)
    try:
      return main(args)
    except user_error_types() as e:  # pylint: disable=catching-non-exception
      fail(describe(e))

  app.run(wrapped, flags_parser=_parse_flags)
