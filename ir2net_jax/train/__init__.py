"""Training and evaluation.

* ``loop``: ``train_and_evaluate(config, workdir)``.
* ``step``: the models a config names, the train and eval steps, the state.
* ``startup``: the start shared by training and evaluation.
* ``evaluate``: an eval split's top-1 / top-5; a checkpoint's (``evaluate``).
* ``optim``, ``parallel``: optimizers and schedules; the ``('data',)`` mesh.
* ``config_checks``, ``resume``: a config's values; an earlier run's config.
* ``divergence``, ``preemption``: non-finite steps; SIGTERM / SIGINT.
* ``diagnostics``, ``metric_writer``, ``run_metrics``: BNN diagnostics,
  TensorBoard files, reading them back.
* ``pictures``, ``grid``: the restriction pictures drawn at each eval.
"""
