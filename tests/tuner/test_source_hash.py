"""The implementation hash in every cache key covers the source files a kernel's code comes from, so
editing any of them invalidates what was tuned with the old code."""
from pathlib import Path

import pytest

import adaptc.kernels
from adaptc.kernels import KERNELS
from adaptc.kernels._registry import kernel_sources
from adaptc.tuner import tune

KERNELS_DIR = Path(adaptc.kernels.__file__).parent


def covered(kernel: str) -> set[str]:
    return {path.relative_to(KERNELS_DIR).as_posix() for _, path in kernel_sources(KERNELS[kernel])}


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_every_kernels_hash_covers_its_files_and_changes_with_any_of_them(kernel, monkeypatch):
    files = kernel_sources(KERNELS[kernel])
    assert files, f"{kernel}'s hash covers no source file"
    before = tune.implementation_hash.__wrapped__(kernel)
    read = tune._source
    for _, path in files:  # an edit to any one covered file changes the hash
        monkeypatch.setattr(tune, "_source", lambda p, edited=path: read(p) + (b"#" if p == edited else b""))
        assert tune.implementation_hash.__wrapped__(kernel) != before, f"{kernel}: editing {path.name} went unnoticed"
    monkeypatch.setattr(tune, "_source", read)
    assert tune.implementation_hash.__wrapped__(kernel) == before  # and nothing else moves it


def test_the_moe_hash_covers_the_moe_folder():
    # The folder is moe/, the kernel fused_moe: the old hash of kernels/fused_moe/ hashed nothing.
    assert tune.implementation_hash("fused_moe") != "e3b0c44298fc1c14"
    assert {"moe/__init__.py", "moe/cpu.py", "moe/reference.py", "moe/space.py", "moe/triton.py"} <= covered("fused_moe")


def test_sparse_attention_covers_the_attention_code_it_imports():
    files = covered("sparse_attention")
    assert {"sparse_attention/triton.py", "sparse_attention/cpu.py", "attention/triton.py", "attention/cpu.py",
            "attention/space.py"} <= files
    assert "_registry.py" not in files and not any(f.startswith("moe/") for f in files)
