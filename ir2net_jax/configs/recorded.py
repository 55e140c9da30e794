"""The config a run recorded (its workdir's ``config.json``), as a config
file: ``--config=ir2net_jax/configs/recorded.py:runs/x/config.json``.

Not a recipe: ``ir2net-eval`` passes it when ``--config`` is left out, so
that ``--config.field=value`` overrides work on the recorded config too.
"""

from ir2net_jax.configs import record


def get_config(path: str):
  if not path:
    raise ValueError("configs/recorded.py needs the path of a config.json: "
                     "--config=.../recorded.py:WORKDIR/config.json")
  return record.read_recorded_config(path)
