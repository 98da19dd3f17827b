"""Fixtures the tuner tests share."""
import pytest

from adaptc.kernels._registry import KERNELS, ConfigSpace, Implementation, Kernel, register


# A kernel with planted faults: "wrong" configs give a wrong answer, "crash" configs raise.
def _scale_ref(x):
    return x * 2


def _scale(x, config=None):
    mode = (config or {}).get("mode", "ok")
    if mode == "crash":
        raise RuntimeError("out of shared memory")
    return x * (3 if mode == "wrong" else 2) + 0 * config.get("unroll", 1)


@pytest.fixture
def faulty_kernel():
    space_ = ConfigSpace({"mode": ("ok", "wrong", "crash"), "unroll": (1, 2, 4, 8)}, lambda *a: {"mode": "ok", "unroll": 1},
                         lambda c, *a: c["unroll"] != 8)
    register(Kernel("test_scale", _scale_ref, {"cpu": Implementation(_scale, space=space_)},
                    problem=lambda x: {"n": x.numel(), "dtype": "float32"}, features=lambda p: {"n": p["n"]}))
    yield space_
    KERNELS.pop("test_scale")
