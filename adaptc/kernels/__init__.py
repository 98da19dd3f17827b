"""Kernels, one folder each. Importing registers their `adaptc::` ops; it never touches a GPU."""
from . import attention, exit_confidence, linear, moe, sparse_attention  # noqa: F401
from ._registry import KERNELS, KernelPreference, kernel_preference  # noqa: F401
