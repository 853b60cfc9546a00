"""benchmarks/wheelhouse.py: the lock reader and the per-CUDA trimming of wheels (offline, fake wheels)."""

import sys
import zipfile

import pytest

from helpers import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import wheelhouse


def fake_wheel(path, files, requires=None):
    """A wheel at `path` (its name gives the distribution) holding `files`; METADATA only when `requires` is given."""
    dist = "-".join(path.name.split("-")[:2]) + ".dist-info"
    record = "".join(f"{name},sha256=x,1\n" for name in files) + f"{dist}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as archive:
        for name in files:
            archive.writestr(name, b"\0" * 1000)
        if requires is not None:
            archive.writestr(
                f"{dist}/METADATA", "Metadata-Version: 2.1\n" + "".join(f"Requires-Dist: {r}\n" for r in requires)
            )
        archive.writestr(f"{dist}/RECORD", record)
    return path


def test_trim_keeps_cpu_and_the_one_cuda_library_and_rewrites_record(tmp_path):
    libs = [f"bitsandbytes/libbitsandbytes_{v}.so" for v in ("cuda118", "cuda124", "cuda128", "cuda130", "rocm71")]
    wheel = fake_wheel(
        tmp_path / "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl",
        ["bitsandbytes/__init__.py", "bitsandbytes/libbitsandbytes_cpu.so", *libs],
    )
    assert wheelhouse.trim_cuda_libraries(wheel, "130") > 0
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        record = archive.read("bitsandbytes-0.50.2.dist-info/RECORD").decode()
    assert names == {
        "bitsandbytes/__init__.py",
        "bitsandbytes/libbitsandbytes_cpu.so",
        "bitsandbytes/libbitsandbytes_cuda130.so",
        "bitsandbytes-0.50.2.dist-info/RECORD",
    }
    assert "cuda124" not in record and "rocm" not in record and "cuda130" in record
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


def test_drop_folder_rewrites_the_wheel_and_its_record(tmp_path):
    wheel = fake_wheel(
        tmp_path / "unsloth-2026.10.9-py3-none-any.whl",
        ["unsloth/__init__.py", "studio/frontend/app.js", "studio/backend/server.py"],
    )
    assert wheelhouse.drop_folders(wheel, ["studio/"]) > 0
    names = zipfile.ZipFile(wheel).namelist()
    assert "unsloth/__init__.py" in names and not any(n.startswith("studio/") for n in names)
    assert "studio" not in zipfile.ZipFile(wheel).read("unsloth-2026.10.9.dist-info/RECORD").decode()


def test_check_reads_requirements_against_the_set_and_the_host(tmp_path, capsys):
    site = tmp_path / "site"
    site.mkdir()
    fake_wheel(
        site / "tool-1.0-py3-none-any.whl",
        ["tool/__init__.py"],
        requires=[
            "trl<=1.15",
            "datasets<5",
            "torch>=2.4",
            "missing",
            "windows-only; sys_platform == 'win32'",
            "extra-only; extra == 'studio'",
            "certifi>=2026.1",
        ],
    )
    fake_wheel(site / "trl-1.15.0-py3-none-any.whl", ["trl/__init__.py"], requires=[])
    fake_wheel(site / "datasets-5.2.0-py3-none-any.whl", ["datasets/__init__.py"], requires=[])
    host = {"torch": "2.11.0", "certifi": ""}
    problems = wheelhouse.check([site], "3.12", host)
    assert problems == [
        "site: tool needs datasets<5: datasets 5.2.0 there",
        "site: tool needs missing: neither shipped nor on the host",
    ]
    assert "certifi>=2026.1 (tool)" in capsys.readouterr().out  # unknown host version: reported, not failed


def test_host_list_reads_bare_names_as_present(tmp_path):
    freeze = tmp_path / "freeze.txt"
    freeze.write_text("# comment\ntorch==2.11.0+cu130\nPyYAML\n")
    assert wheelhouse.read_pins(freeze) == {"torch": "2.11.0", "pyyaml": ""}
