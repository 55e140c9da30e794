"""The tf.data input engine: tfds + tf.data host pipelines, any data set.

``pipeline`` builds the batches from each host's share of a split
(``splits``) with the reference's preprocessing in TensorFlow ops
(``recipes``, ``augment``); digits is read as a local tfds data set
(``digits_tfds``). These modules need TensorFlow; importing the package
alone imports none.
"""
