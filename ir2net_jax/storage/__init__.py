"""Where a run's files live: a local disk or a bucket (``gs://``, ``s3://``).

``paths`` is the one path layer every run file goes through (etils.epath and
fsspec, as orbax uses them); ``preflight`` refuses a bucket that cannot be
used before anything is compiled; ``event_files`` writes TensorBoard event
files to either.
"""
