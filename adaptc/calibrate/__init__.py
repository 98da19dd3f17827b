"""Calibration for approximate passes: distillation of exit heads and threshold calibration with guarantees."""
