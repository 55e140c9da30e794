"""What every input engine reads, without TensorFlow.

The data set registry and config checks (``sources``), the specs of
``tfds:`` and ``folder:`` data (``custom``, ``specs``), folder listings as
tfds' ``ImageFolder`` lists them (``folders``), the one image reader
(``image_files``) and the ``bad_examples`` policy (``bad_data``),
scikit-learn's digits (``digits``), the recipes' numbers (``constants``) and
their tf.data names (``tf_recipes``), the host-to-device prefetch
(``prefetch``). These modules import no engine (``device``, ``grain``,
``tf_data``); an engine imports them and its own modules only.
"""
