"""The library facade behind ``import advpipe``: objects for your own training loop (see docs/library.md).

It sits above the kernels it wraps (augment, pipeline, models, attacks), beside training and
evaluation, and nothing below imports it. Import the names from :mod:`advpipe` itself.
"""
