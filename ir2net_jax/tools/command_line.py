"""What the console scripts that take ``--config`` share: one clear line
for a typo, not a traceback.

* ``--config=digit:smoke`` (no such recipe or file): the recipes, and the
  nearest one;
* ``--config.batchsize=8`` (no such field): the nearest fields;
* a value the field cannot take (``--config.batch_size=abc``), or any
  other error while the flags are read: the flag and ml_collections' own
  words, on one line;
* ``ConfigError`` / ``DataError`` from the command itself: its message.

Each exits with status 2 (flags) or 1 (the run refused). ``--debug``
anywhere on the command line shows the traceback instead.

The console: log lines start with their level's letter and the time
(``I 14:02:07 step 50/330: ...``), not absl's 60-character prefix of date,
thread and source line; ``--verbose`` asks a command for more lines (the
train command: the whole config, every scalar it writes).
"""

import difflib
import importlib.util
import logging as python_logging
import os
import sys
from typing import Callable, Iterable, List, Optional, Sequence

from absl import app, flags, logging

from ir2net_jax import configs

__all__ = ["config_typo", "run_app", "exit_on_error", "DEBUG_FLAG"]

DEBUG_FLAG = "--debug"
# Read from the command line before absl parses it (a typo is reported
# before any flag is read); defined so that --help lists them.
flags.DEFINE_bool("debug", False, "Show the traceback of an error instead of "
                  "its one line.")
flags.DEFINE_bool("verbose", False, "More on the console: the whole config "
                  "and every scalar written to TensorBoard.")


def _debug(argv: Sequence[str]) -> bool:
  return DEBUG_FLAG in argv


def _fields(config, prefix: str = "") -> List[str]:
  """Every field of ``config``, nested ones dotted."""
  out = []
  for key, value in config.items():
    out.append(prefix + key)
    if hasattr(value, "items") and hasattr(value, "to_dict"):
      out += _fields(value, f"{prefix}{key}.")
  return out


def _load(name: str, arg: str):
  """The config a recipe's name or file makes, or None if it will not
  load (ml_collections then reports it)."""
  try:
    if name in configs.RECIPES:
      return configs.get_config(f"{name}:{arg}" if arg else name)
    spec = importlib.util.spec_from_file_location("_ir2net_recipe", name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()
  except Exception:  # pylint: disable=broad-except
    return None


def _suggest(word: str, choices: Iterable[str], prefix: str = "") -> str:
  close = difflib.get_close_matches(word, list(choices), n=3, cutoff=0.6)
  if not close:
    return ""
  quote = "" if prefix else "'"
  return "; did you mean " + " or ".join(
      f"{quote}{prefix}{c}{quote}" for c in close) + "?"


def config_typo(argv: Sequence[str], flag: str = "config") -> Optional[str]:
  """What is wrong with ``--config=`` or a ``--config.FIELD=`` override
  in ``argv``, in one line, or None."""
  spec = next((a.split("=", 1)[1] for a in argv
               if a.startswith(f"--{flag}=")), None)
  if not spec:
    return None
  name, _, arg = spec.partition(":")
  if name not in configs.RECIPES and not os.path.isfile(name):
    stem = os.path.basename(name).removesuffix(".py")
    return (f"--{flag}={spec}: no recipe or file {name!r}"
            + _suggest(stem, configs.RECIPES)
            + f" The recipes: {', '.join(configs.RECIPES)} (or a recipe "
            "file, e.g. configs/digits.py), each with an optional ':ARG' "
            "(digits:smoke, imagenet:c,stage=2).")
  config = _load(name, arg)
  if config is None:
    return None
  fields = _fields(config)
  stem = os.path.basename(name).removesuffix(".py")
  if (stem in configs.RECIPES
      and os.path.abspath(name) == configs.recipe_path(stem)):
    spec = stem + (f":{arg}" if arg else "")   # as it was typed
  for a in argv:
    if a.startswith(f"--{flag}."):
      field = a[len(flag) + 3:].split("=", 1)[0]
      if field not in fields:
        return (f"--{flag}.{field}: {spec} has no such field"
                + _suggest(field, fields, f"--{flag}.")
                + " (configs/default.py lists every field).")
  return None


def _fail(message: str, status: int) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(status)


def _one_line(error: BaseException) -> str:
  text = str(error).strip() or type(error).__name__
  if text.startswith(("'", '"')) and "\\n" in text:   # an escaped repr
    text = text.strip("'\"").replace("\\n", " ").replace("\\'", "'")
  return " ".join(text.split())


def _parser(argv: Sequence[str]) -> List[str]:
  """absl's ``flags_parser``: the flags read, or one line and exit 2."""
  typo = config_typo(argv)
  if typo and not _debug(argv):
    _fail(typo, 2)
  try:
    return flags.FLAGS(list(argv))
  except Exception as e:  # pylint: disable=broad-except
    if _debug(argv):
      raise
    _fail(f"{_one_line(e)} (pass {DEBUG_FLAG} for the traceback, --help "
          "for the flags)", 2)


def exit_on_error(error: BaseException) -> None:
  """Exits with ``error``'s message on one line (status 1), unless
  ``--debug`` is on the command line: then it is raised."""
  if _debug(sys.argv):
    raise error
  _fail(str(error), 1)


class _ShortFormatter(python_logging.Formatter):
  """``I 14:02:07 message``: the level's letter, the time, the message."""

  def __init__(self):
    super().__init__("%(levelname).1s %(asctime)s %(message)s", "%H:%M:%S")


def _short_console(main: Callable[[List[str]], None]):
  def wrapped(argv):
    logging.get_absl_handler().setFormatter(_ShortFormatter())
    return main(argv)
  return wrapped


def run_app(main: Callable[[List[str]], None], argv: Sequence[str]) -> None:
  """``app.run(main, argv)``, flags read by :func:`_parser`, log lines in
  the short form (``_ShortFormatter``).
  """
  app.run(_short_console(main), argv=list(argv), flags_parser=_parser)
