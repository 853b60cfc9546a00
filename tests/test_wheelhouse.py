"""benchmarks/wheelhouse.py: the lock reader and the per-CUDA trimming of wheels (offline, fake wheels)."""

import sys
import zipfile

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import wheelhouse  # noqa: E402


def fake_wheel(path, files):
    record = "".join(f"{name},sha256=x,1\n" for name in files) + "bitsandbytes-0.50.2.dist-info/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as archive:
        for name in files:
            archive.writestr(name, b"\0" * 1000)
        archive.writestr("bitsandbytes-0.50.2.dist-info/RECORD", record)
    return path


def test_trim_keeps_cpu_and_the_one_cuda_library_and_rewrites_record(tmp_path):
    libs = [f"bitsandbytes/libbitsandbytes_cuda{v}.so" for v in (118, 124, 128, 130)]
    wheel = fake_wheel(tmp_path / "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl",
                       ["bitsandbytes/__init__.py", "bitsandbytes/libbitsandbytes_cpu.so", *libs])
    assert wheelhouse.trim_cuda_libraries(wheel, "130") > 0
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        record = archive.read("bitsandbytes-0.50.2.dist-info/RECORD").decode()
    assert names == {"bitsandbytes/__init__.py", "bitsandbytes/libbitsandbytes_cpu.so",
                     "bitsandbytes/libbitsandbytes_cuda130.so", "bitsandbytes-0.50.2.dist-info/RECORD"}
    assert "cuda124" not in record and "cuda130" in record
    with pytest.raises(SystemExit, match="no library for CUDA 999"):
        wheelhouse.trim_cuda_libraries(wheel, "999")
    other = fake_wheel(tmp_path / "trl-1.16.0-py3-none-any.whl", ["trl/__init__.py"])
    assert wheelhouse.trim_cuda_libraries(other, "130") == 0  # only wheels known to carry per-CUDA libraries


def test_pins_of_a_freeze_drop_local_versions_and_urls(tmp_path):
    freeze = tmp_path / "freeze.txt"
    freeze.write_text("torch==2.11.0+cu130\nPyYAML==6.0.3\nfoo @ file:///x/foo.whl\n# comment\n")
    assert wheelhouse.read_pins(freeze) == {"torch": "2.11.0", "pyyaml": "6.0.3", "foo": ""}
    lock = wheelhouse.read_pins(REPO / "requirements.lock")
    assert "torch" not in lock and lock["bitsandbytes"] and lock["liger-kernel"]  # torch is the host's own
