"""Noticing a diverged run: a non-finite loss, gradient or updated state.

The train step computes, inside its own XLA program, whether its loss, its
gradient and the state it produced are finite (``finite_flags``): a few
reductions, no extra host round trip. The host reads those flags only where it
waits for the device anyway, as big_vision does: at each logging step, and
before every evaluation and checkpoint save (``check``), so every step is
covered and a non-finite state is never evaluated or saved.

With ``config.skip_nonfinite_updates`` a bad step keeps the state it started
from instead (``keep_if_finite``, optax's ``apply_if_finite`` done inside the
step so that the optimizer state keeps its structure) and is counted.
"""

from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["DivergenceError", "all_finite", "finite_flags", "keep_if_finite",
           "check", "count_skipped"]

# What each flag of ``finite_flags`` covers, for the error message.
_WHAT = {
    "loss": "the loss (train_loss)",
    "gradient": "the gradient (train_grad_norm)",
    "state": "the updated parameters, BatchNorm statistics or optimizer state",
}


class DivergenceError(RuntimeError):
  """Training produced a non-finite loss, gradient or state."""


def all_finite(tree: Any) -> jax.Array:
  """A boolean scalar: every element of every leaf of ``tree`` is finite."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def finite_flags(loss: jax.Array, grads: Any, new_state: Any
                 ) -> Dict[str, jax.Array]:
  """Per-step finiteness of the loss, the gradient and the state after it.

  The state is checked as well: a finite gradient times a huge learning rate
  can overflow the parameters without the loss of *this* step showing it.

  Args:
    loss: the global loss, a scalar.
    grads: the gradient, a tree like the parameters.
    new_state: what the step would return (parameters, BatchNorm statistics,
      optimizer state).

  Returns:
    ``{'loss', 'gradient', 'state'}``: boolean scalars.
  """
  return {"loss": jnp.isfinite(loss), "gradient": all_finite(grads),
          "state": all_finite(new_state)}


def keep_if_finite(flags: Dict[str, jax.Array], new: Any, old: Any
                   ) -> Tuple[Any, jax.Array]:
  """``new`` if every flag holds, else ``old``; and 1.0 when it kept ``old``.

  Args:
    flags: ``finite_flags`` of the step.
    new: the trees the step produced.
    old: the same trees before the step.

  Returns:
    ``(tree, skipped)``: the tree to carry on with and a float32 scalar.
  """
  ok = jnp.all(jnp.stack(list(flags.values())))
  kept = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
  return kept, 1.0 - ok.astype(jnp.float32)


def check(pending: Sequence[Tuple[int, Dict[str, Any]]], config,
          last_saved: Optional[int] = None) -> None:
  """Raises DivergenceError at the first step that was not finite.

  Args:
    pending: ``(step, metrics)`` of the steps not checked yet; ``metrics``
      holds ``finite`` (``finite_flags``), ``loss`` and ``grad_norm``.
    config: the run's config (for the message and
      ``skip_nonfinite_updates``: skipped steps kept a finite state).
    last_saved: the step of the latest checkpoint, if any (for the message).

  Raises:
    DivergenceError: naming the step, what was not finite, and what to try.
  """
  if not pending or config.get("skip_nonfinite_updates", False):
    return
  flags = jax.device_get([m["finite"] for _, m in pending])
  for (step, metrics), finite in zip(pending, flags):
    bad = [name for name in _WHAT if not finite[name]]
    if not bad:
      continue
    values = jax.device_get({k: metrics[k] for k in ("loss", "grad_norm")})
    saved = ("no checkpoint was saved before it" if last_saved is None else
             f"the latest checkpoint, of step {last_saved}, is finite")
    raise DivergenceError(
        f"training diverged at step {step}: {_join([_WHAT[b] for b in bad])} "
        f"{'is' if len(bad) == 1 else 'are'} not finite (train_loss="
        f"{float(values['loss']):.4g}, train_grad_norm="
        f"{float(values['grad_norm']):.4g}). Nothing from this step on was "
        f"saved; {saved}. Lower "
        f"config.learning_rate (now {config.learning_rate}), add a warm-up "
        f"(config.warmup_epochs), or set config.skip_nonfinite_updates=True "
        f"to skip such steps.")


def _join(items: List[str]) -> str:
  if len(items) == 1:
    return items[0]
  return ", ".join(items[:-1]) + " and " + items[-1]


def count_skipped(pending: Sequence[Tuple[int, Dict[str, Any]]]) -> int:
  """How many of the ``pending`` steps ``keep_if_finite`` skipped."""
  return int(round(sum(float(np.asarray(m.get("skipped_steps", 0.0)))
                       for _, m in pending)))
