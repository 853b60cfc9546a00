"""Offline installs: a lock of exact versions, and a folder of wheels for another machine (`make wheelhouse`).

    python benchmarks/wheelhouse.py lock                    # requirements.lock from this venv (+ the gpu extra)
    python benchmarks/wheelhouse.py build --out DIR [--python 3.12] [--platform manylinux_2_28_x86_64]
        [--extras dev,gpu] [--host-freeze FILE] [--cuda 130] [--torch torch==2.13.0]

`build` downloads, for the target Python and platform, every package that `expqa[extras]` needs, at the version
in requirements.lock, as wheels (a package published only as pure-Python source, such as antlr4-python3-runtime,
is built into a wheel here). With --host-freeze (the target's `python3 -m pip freeze`), packages that the target
already has are left out, so only what it lacks travels; with --cuda, bitsandbytes keeps only its CPU library and
the one for that CUDA version (its wheel carries one per CUDA release: 43 MB -> ~4 MB). The folder gets a
constraints.txt (the lock minus what the target keeps), which `make install WHEELHOUSE=DIR` installs against with
`--no-index`. Standard library + `packaging` (which pip vendors) only: it runs before the project is installed.
"""

from __future__ import annotations

import argparse
import email.parser
import json
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

try:
    from packaging.markers import Marker
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
except ImportError:  # pip vendors it
    from pip._vendor.packaging.markers import Marker  # type: ignore[no-redef]
    from pip._vendor.packaging.requirements import Requirement  # type: ignore[no-redef]
    from pip._vendor.packaging.utils import canonicalize_name  # type: ignore[no-redef]

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements.lock"
# torch and the CUDA stack are the host's own (the Makefile keeps an importable torch); never locked or shipped
TORCH_FAMILY = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*)$")
BUILD_BACKEND = "setuptools>=68"  # pyproject.toml's build-system requirement
# wheels that carry one native library per CUDA release: pattern of those files, group 1 = the CUDA version
PER_CUDA_LIBRARIES = {"bitsandbytes": re.compile(r"libbitsandbytes_cuda(\d+)\.(so|dll|dylib)$")}


# ---------------------------------------------------------------------------------------------------------------
# lock

def write_lock(python: str) -> None:
    """requirements.lock = this environment's versions (what the tests ran with) + the gpu extra's packages."""
    frozen = subprocess.run([python, "-m", "pip", "freeze", "--exclude-editable"], check=True,
                            capture_output=True, text=True).stdout.split()
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run([python, "-m", "pip", "install", "--quiet", "--dry-run", "--report", str(report),
                        f"{REPO}[gpu]"], check=True)
        extra = [f"{item['metadata']['name']}=={item['metadata']['version']}"
                 for item in json.loads(report.read_text())["install"]
                 if canonicalize_name(item["metadata"]["name"]) != "expqa"]
    pins = {}
    for line in frozen + extra:
        name, _, version = line.partition("==")
        if version and not TORCH_FAMILY.match(canonicalize_name(name)):
            pins[canonicalize_name(name)] = version
    LOCK.write_text("# exact versions `make install` installs (constraints); regenerate with `make lock`\n"
                    + "".join(f"{name}=={version}\n" for name, version in sorted(pins.items())))
    print(f"{LOCK.name}: {len(pins)} packages")


def read_pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[canonicalize_name(name)] = version.split("+", 1)[0].strip()  # 2.11.0+cu130 -> 2.11.0
        elif " @ " in line:  # installed from a file or URL: present, version unknown
            pins[canonicalize_name(line.split(" @ ", 1)[0])] = ""
    return pins


# ---------------------------------------------------------------------------------------------------------------
# which packages the target needs

def requirements_of(name: str, wheels: Path) -> list[str]:
    """Requires-Dist of an installed distribution, or of its wheel in `wheels` when it is not installed here."""
    try:
        return metadata.requires(name) or []
    except metadata.PackageNotFoundError:
        pass
    for wheel in wheels.glob("*.whl"):
        if canonicalize_name(wheel.name.split("-")[0]) == canonicalize_name(name):
            with zipfile.ZipFile(wheel) as archive:
                meta = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
                return email.parser.Parser().parsestr(archive.read(meta).decode()).get_all("Requires-Dist") or []
    raise SystemExit(f"wheelhouse: cannot read the requirements of {name}: not installed here and no wheel yet")


def needed_packages(extras: list[str], python_version: str, pins: dict[str, str], host: dict[str, str],
                    wheels: Path) -> list[str]:
    """Names in the dependency closure of expqa[extras] on the target Python, torch's family excluded.

    The walk stops at packages the host keeps: their own requirements are the host's (its pip check).
    """
    env = {"python_version": python_version, "python_full_version": f"{python_version}.0", "os_name": "posix",
           "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
           "implementation_name": "cpython", "platform_python_implementation": "CPython"}
    queue = [(Requirement(text), extras) for text in requirements_of("expqa", wheels)]
    seen: set[str] = set()
    while queue:
        req, wanted_extras = queue.pop()
        if req.marker and not any(req.marker.evaluate({**env, "extra": e}) for e in wanted_extras or [""]):
            continue
        name = canonicalize_name(req.name)
        if TORCH_FAMILY.match(name) or name in seen:
            continue
        if name not in pins and name not in host:
            raise SystemExit(f"wheelhouse: {name} is required but not in {LOCK.name}; run `make lock`")
        seen.add(name)
        if name not in host:
            queue += [(Requirement(text), sorted(req.extras)) for text in requirements_of(name, wheels)]
    return sorted(seen)


# ---------------------------------------------------------------------------------------------------------------
# download, build, trim

def download(specs: list[str], out: Path, python_version: str, platforms: list[str]) -> None:
    """Wheels for the target, in one pip call; a spec with no wheel for it is built here if it is pure Python."""
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--python-version", python_version, "--implementation", "cp", "-d", str(out)]
    for platform in platforms:
        cmd += ["--platform", platform]
    if not specs or subprocess.run(cmd + specs, capture_output=True, text=True).returncode == 0:
        return
    for spec in specs:  # one of them has no wheel: find which, one by one
        if subprocess.run(cmd + [spec], capture_output=True, text=True).returncode == 0:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", tmp, spec],
                                   capture_output=True, text=True)
            wheels = list(Path(tmp).glob("*.whl"))
            if built.returncode or not wheels or not wheels[0].name.endswith("-none-any.whl"):
                raise SystemExit(f"wheelhouse: no wheel of {spec} for Python {python_version} on {platforms[0]}, "
                                 f"and it does not build as pure Python here ({built.stderr.strip()[-300:]})")
            shutil.move(str(wheels[0]), out / wheels[0].name)
            print(f"  built {wheels[0].name} from source (pure Python)")


def trim_cuda_libraries(wheel: Path, cuda: str) -> int:
    """Rewrite a wheel without the native libraries of other CUDA versions; return the bytes saved."""
    name = canonicalize_name(wheel.name.split("-")[0])
    pattern = PER_CUDA_LIBRARIES.get(name)
    if pattern is None:
        return 0
    before = wheel.stat().st_size
    trimmed = wheel.with_suffix(".trimmed")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(trimmed, "w", zipfile.ZIP_DEFLATED) as dst:
        dropped = {info.filename for info in src.infolist()
                   if (m := pattern.search(info.filename)) and m.group(1) != cuda}
        for info in src.infolist():
            if info.filename in dropped:
                continue
            data = src.read(info.filename)
            if info.filename.endswith(".dist-info/RECORD"):  # RECORD lists every file: drop the removed ones
                data = "".join(line + "\n" for line in data.decode().splitlines()
                               if line.split(",", 1)[0] not in dropped).encode()
            dst.writestr(info, data)
    if not any(pattern.search(n) for n in zipfile.ZipFile(trimmed).namelist()):
        trimmed.unlink()
        raise SystemExit(f"wheelhouse: {wheel.name} has no library for CUDA {cuda}; check --cuda (torch.version.cuda "
                         "without the dot, e.g. 130 for 13.0)")
    trimmed.replace(wheel)
    return before - wheel.stat().st_size


def build(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pins = read_pins(LOCK)
    host = read_pins(Path(args.host_freeze)) if args.host_freeze else {}
    # locked packages not installed here (the gpu extra's): their wheels first, to read their requirements
    download([f"{n}=={v}" for n, v in pins.items() if n not in host and not _installed(n)], out, args.python,
             args.platform)
    needed = needed_packages([e for e in args.extras.split(",") if e], args.python, pins, host, out)
    shipped = [n for n in needed if n not in host]
    # present files are skipped; setuptools builds the editable install (pip's isolated build env, offline)
    download([f"{n}=={pins[n]}" for n in shipped] + [BUILD_BACKEND], out, args.python, args.platform)
    keep = set(shipped) | {"setuptools"}
    if args.torch and "torch" not in host:
        download([args.torch], out, args.python, args.platform)
        keep.add("torch")
    for stale in out.glob("*.whl"):  # from an earlier run with other extras or another host
        if canonicalize_name(stale.name.split("-")[0]) not in keep:
            stale.unlink()
    saved = sum(trim_cuda_libraries(w, args.cuda) for w in out.glob("*.whl")) if args.cuda else 0
    (out / "constraints.txt").write_text("".join(f"{n}=={pins[n]}\n" for n in sorted(shipped)))
    (out / "extras").write_text(args.extras + "\n")  # what `make install WHEELHOUSE=...` installs
    size = sum(w.stat().st_size for w in out.glob("*.whl"))
    print(f"wheelhouse {out}: {len(list(out.glob('*.whl')))} wheels, {size / 2**20:.1f} MiB"
          + (f" ({saved / 2**20:.1f} MiB of other CUDA versions' libraries removed)" if saved else "")
          + (f"; {len([n for n in needed if n in host])} needed packages the host already has are left out"
             if host else ""))


def _installed(name: str) -> bool:
    try:
        metadata.distribution(name)
        return True
    except metadata.PackageNotFoundError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("lock", help="write requirements.lock from this environment")
    b = sub.add_parser("build", help="download the wheels a target machine needs")
    b.add_argument("--out", required=True)
    b.add_argument("--python", default=f"{sys.version_info.major}.{sys.version_info.minor}")
    b.add_argument("--platform", action="append", default=None,
                   help="pip platform tags of the target (repeatable); default: manylinux x86-64 tags")
    b.add_argument("--extras", default="gpu", help="extras of the project to include (e.g. dev,gpu)")
    b.add_argument("--host-freeze", help="`pip freeze` of the target: what it has is not downloaded")
    b.add_argument("--cuda", help="keep only this CUDA version's libraries in bitsandbytes (e.g. 130)")
    b.add_argument("--torch", help="also download this torch (e.g. torch==2.13.0) for a target without torch")
    args = parser.parse_args(argv)
    if args.command == "lock":
        write_lock(sys.executable)
    else:
        args.platform = args.platform or [f"manylinux_2_{n}_x86_64" for n in (39, 35, 34, 31, 28, 27, 24, 17)] \
            + ["manylinux2014_x86_64", "linux_x86_64"]
        build(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
