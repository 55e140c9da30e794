"""The grain input engine: host decoding in worker processes, no TensorFlow.

``config.input_engine='grain'`` serves ``folder:PATH`` trees (the files
listed as tfds' ``ImageFolder`` lists them, ``folders``) and tfds data sets
prepared as ArrayRecord (``imagenet2012``, ``cifar10``, ``tfds:NAME``, read
with ``tfds.data_source``; ``tfds build NAME --file_format=array_record``).
digits is the device engine's (or tf.data's).

``grain_inputs`` is the engine (its stream, worker processes and batches),
``host_recipes`` its numpy recipes, ``window_resize`` the RandomResizedCrop
resize on the devices, to Pillow's pixels (``pillow_resize``: the integers
Pillow computes with). ``import grain`` in these modules is the grain
library: imports are absolute.
"""
