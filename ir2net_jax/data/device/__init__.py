"""The on-device input engine: small data sets live on the accelerators.

digits and CIFAR-10 (150 MB as uint8) fit in any accelerator's memory many
times over. This engine (``on_device``) puts both splits on every device
once, replicated (each device gathers its own rows of a batch, with no
communication), and draws the training batch *inside the jitted train step*
from ``(seed, step)``: no host pipeline, no transfers, no waiting. With it
the train step is the run.
"""
