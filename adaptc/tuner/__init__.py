"""Tuning kernels per device: config spaces, measurement, Optuna search, a learned cost model, replay.

Importing this package is cheap (the cache CLI and device fingerprints need no torch); `session`
holds what `adaptc.compile` runs and installs the tuning cache as the kernels' config source.
"""
