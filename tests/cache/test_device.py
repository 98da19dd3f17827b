import subprocess
import sys

from adaptc.tuner.device import device_fingerprint


def test_cpu_fingerprint_is_stable_and_readable():
    fp = device_fingerprint("cpu")
    assert fp is device_fingerprint("cpu")  # computed once per process
    assert fp.kind == "cpu" and fp.name and fp.cores >= 1
    assert fp.id.startswith("cpu-") and len(fp.id.rsplit("-", 1)[1]) == 12
    assert fp.to_dict()["id"] == fp.id
    # Only vector-ISA flags survive normalisation; security and virtualisation flags would split caches.
    assert not {"smep", "smap", "hypervisor", "nx"} & set(fp.isa)


def test_same_machine_same_id_in_another_process():
    code = "from adaptc.tuner.device import device_fingerprint; print(device_fingerprint().id)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == device_fingerprint().id


def test_importing_the_cache_touches_neither_torch_nor_cuda():
    code = ("import sys, adaptc.cache, adaptc.cache.cli, adaptc.tuner.device as d; d.device_fingerprint('cpu'); "
            "print('torch' in sys.modules, 'triton' in sys.modules, 'redis' in sys.modules, 'psycopg' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False", "False", "False"]
