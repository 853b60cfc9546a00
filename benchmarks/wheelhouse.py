"""Offline installs: a lock of exact versions, and a folder of wheels for another machine (`make wheelhouse`).

    python benchmarks/wheelhouse.py lock                    # requirements.lock from this venv (+ the gpu extra)
    python benchmarks/wheelhouse.py build --out DIR [--python 3.12] [--platform manylinux_2_28_x86_64]
        [--extras dev,gpu] [--host-freeze FILE] [--cuda 130] [--torch torch==2.13.0]
        [--requirement SPEC ...] [--no-lock] [--drop PACKAGE:FOLDER/ ...]
    python benchmarks/wheelhouse.py check DIR [DIR ...] [--host-freeze FILE] [--python 3.12]

`build` downloads, for the target Python and platform, every package that `expqa[extras]` needs, at the version
in requirements.lock, as wheels (a package published only as pure-Python source, such as antlr4-python3-runtime,
is built into a wheel here). With --host-freeze (the target's `python3 -m pip freeze`), packages that the target
already has are left out, so only what it lacks travels; with --cuda, bitsandbytes keeps only its CPU library and
the one for that CUDA version (its wheel carries one per CUDA release: 43 MB -> ~4 MB). The folder gets a
constraints.txt (the lock minus what the target keeps), which `make install WHEELHOUSE=DIR` installs against with
`--no-index`. Standard library + `packaging` (which pip vendors) only: it runs before the project is installed.

A separate set for a second site folder (e.g. a tool that pins other versions than ours, installed with
`pip install --no-deps --target`): `--requirement SPEC` (repeatable) takes these specs as the roots instead of
expqa[extras]; with `--no-lock` their versions are not taken from requirements.lock but resolved here, walking the
requirements of each downloaded wheel (the newest version that the specs met so far allow; a later, stricter spec
is reported, pin it with another --requirement). `--drop PACKAGE:FOLDER/` rewrites that package's wheel without the
files under FOLDER/ (e.g. unsloth:studio/, a web app that training never imports); `--exclude PACKAGE` leaves
out a required package that nothing run there imports, `--shadow PACKAGE` ships one although the host has it (the
version this set needs, first on that site's sys.path). `check` verifies, offline, that
every requirement of every wheel in the folders is met by a wheel there or by the host's freeze (`pip check` for a
machine we cannot reach), and prints the sizes.
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
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
except ImportError:  # pip vendors it
    from pip._vendor.packaging.requirements import Requirement  # type: ignore[no-redef]
    from pip._vendor.packaging.utils import canonicalize_name  # type: ignore[no-redef]

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements.lock"
# torch and the CUDA stack are the host's own (the Makefile keeps an importable torch); never locked or shipped
TORCH_FAMILY = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*)$")
BUILD_BACKEND = "setuptools>=68"  # pyproject.toml's build-system requirement
# wheels that carry one native library per CUDA release: pattern of those files, group 1 = the CUDA version (or
# "rocm...": a CUDA target never loads the ROCm builds that bitsandbytes 0.50 also ships)
PER_CUDA_LIBRARIES = {"bitsandbytes": re.compile(r"libbitsandbytes_(?:cuda(\d+)|(rocm\d+))\.(so|dll|dylib)$")}


# ---------------------------------------------------------------------------------------------------------------
# lock


def write_lock(python: str) -> None:
    """requirements.lock = this environment's versions (what the tests ran with) + the gpu extra's packages."""
    frozen = subprocess.run(
        [python, "-m", "pip", "freeze", "--exclude-editable"], check=True, capture_output=True, text=True
    ).stdout.split()
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run(
            [python, "-m", "pip", "install", "--quiet", "--dry-run", "--report", str(report), f"{REPO}[gpu]"],
            check=True,
        )
        extra = [
            f"{item['metadata']['name']}=={item['metadata']['version']}"
            for item in json.loads(report.read_text())["install"]
            if canonicalize_name(item["metadata"]["name"]) != "expqa"
        ]
    pins = {}
    for line in frozen + extra:
        name, _, version = line.partition("==")
        if version and not TORCH_FAMILY.match(canonicalize_name(name)):
            pins[canonicalize_name(name)] = version
    LOCK.write_text(
        "# exact versions `make install` installs (constraints); regenerate with `make lock`\n"
        + "".join(f"{name}=={version}\n" for name, version in sorted(pins.items()))
    )
    print(f"{LOCK.name}: {len(pins)} packages")


def read_pins(path: Path) -> dict[str, str]:
    """name -> version of `name==version` lines; a bare `name` (a host package of unknown version) maps to ""."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[canonicalize_name(name)] = version.split("+", 1)[0].strip()  # 2.11.0+cu130 -> 2.11.0
        elif " @ " in line:  # installed from a file or URL: present, version unknown
            pins[canonicalize_name(line.split(" @ ", 1)[0])] = ""
        elif re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", line):  # a bare name: present, version unknown
            pins[canonicalize_name(line)] = ""
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


def target_environment(python_version: str) -> dict[str, str]:
    return {
        "python_version": python_version,
        "python_full_version": f"{python_version}.0",
        "os_name": "posix",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
    }


def applies(req: Requirement, env: dict[str, str], extras: list[str] | None) -> bool:
    """Whether a requirement holds on the target, for a package installed with these extras."""
    return not req.marker or any(req.marker.evaluate({**env, "extra": e}) for e in extras or [""])


def needed_packages(
    extras: list[str],
    python_version: str,
    pins: dict[str, str],
    host: dict[str, str],
    wheels: Path,
    roots: list[str] | None = None,
) -> list[str]:
    """Names in the dependency closure of expqa[extras] (or of `roots`) on the target Python, torch's family excluded.

    The walk stops at packages the host keeps: their own requirements are the host's (its pip check).
    """
    env = target_environment(python_version)
    queue = [(Requirement(text), extras) for text in (roots if roots is not None else requirements_of("expqa", wheels))]
    seen: set[str] = set()
    while queue:
        req, wanted_extras = queue.pop()
        if not applies(req, env, wanted_extras):
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
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        python_version,
        "--implementation",
        "cp",
        "-d",
        str(out),
    ]
    for platform in platforms:
        cmd += ["--platform", platform]
    if not specs or subprocess.run(cmd + specs, capture_output=True, text=True).returncode == 0:
        return
    for spec in specs:  # one of them has no wheel: find which, one by one
        if subprocess.run(cmd + [spec], capture_output=True, text=True).returncode == 0:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            built = subprocess.run(
                [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", tmp, spec],
                capture_output=True,
                text=True,
            )
            wheels = list(Path(tmp).glob("*.whl"))
            if built.returncode or not wheels or not wheels[0].name.endswith("-none-any.whl"):
                raise SystemExit(
                    f"wheelhouse: no wheel of {spec} for Python {python_version} on {platforms[0]}, "
                    f"and it does not build as pure Python here ({built.stderr.strip()[-300:]})"
                )
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
        dropped = {
            info.filename for info in src.infolist() if (m := pattern.search(info.filename)) and m.group(1) != cuda
        }  # rocm: group 1 is None
        for info in src.infolist():
            if info.filename in dropped:
                continue
            data = src.read(info.filename)
            if info.filename.endswith(".dist-info/RECORD"):  # RECORD lists every file: drop the removed ones
                data = "".join(
                    line + "\n" for line in data.decode().splitlines() if line.split(",", 1)[0] not in dropped
                ).encode()
            dst.writestr(info, data)
    if not any((m := pattern.search(n)) and m.group(1) == cuda for n in zipfile.ZipFile(trimmed).namelist()):
        trimmed.unlink()
        raise SystemExit(
            f"wheelhouse: {wheel.name} has no library for CUDA {cuda}; check --cuda (torch.version.cuda "
            "without the dot, e.g. 130 for 13.0)"
        )
    trimmed.replace(wheel)
    return before - wheel.stat().st_size


def drop_folders(wheel: Path, folders: list[str]) -> int:
    """Rewrite a wheel without the files under `folders` (top-level paths ending in /); return the bytes saved."""
    before = wheel.stat().st_size
    trimmed = wheel.with_suffix(".trimmed")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(trimmed, "w", zipfile.ZIP_DEFLATED) as dst:
        dropped = {info.filename for info in src.infolist() if info.filename.startswith(tuple(folders))}
        for info in src.infolist():
            if info.filename in dropped:
                continue
            data = src.read(info.filename)
            if info.filename.endswith(".dist-info/RECORD"):
                data = "".join(
                    line + "\n" for line in data.decode().splitlines() if line.split(",", 1)[0] not in dropped
                ).encode()
            dst.writestr(info, data)
    trimmed.replace(wheel)
    return before - wheel.stat().st_size


def wheel_name(wheel: Path) -> str:
    return canonicalize_name(wheel.name.split("-")[0])


def wheel_version(wheel: Path) -> str:
    return wheel.name.split("-")[1]


def resolve_unpinned(
    roots: list[str], python_version: str, platforms: list[str], host: dict[str, str], out: Path
) -> tuple[list[str], list[str]]:
    """Download the closure of `roots` that the host lacks, choosing versions here; returns (names, problems).

    Breadth first: the roots' own specs come first, so a root pin (trl==1.15.0) wins over what its dependants
    allow; a spec met later by a version already chosen is a problem to report, not a second version.
    """
    env = target_environment(python_version)
    chosen: dict[str, Path] = {w: p for p in out.glob("*.whl") for w in [wheel_name(p)]}
    problems: list[str] = []
    level = [(Requirement(text), [], "command line") for text in roots]
    resolved: set[str] = set()
    while level:
        wanted: dict[str, tuple[Requirement, list[str], str]] = {}
        for req, extras, parent in level:
            name = canonicalize_name(req.name)
            if not applies(req, env, extras) or TORCH_FAMILY.match(name):
                continue
            if name in host:
                version = host[name]
                if version[:1].isdigit() and not req.specifier.contains(version, prereleases=True):
                    problems.append(f"{parent} needs {req}; the host has {name} {version}")
                continue
            if name in resolved or name in wanted:
                got = wheel_version(chosen[name]) if name in resolved else None
                if got and not req.specifier.contains(got, prereleases=True):
                    problems.append(f"{parent} needs {req}; chosen: {name} {got} (pin it with --requirement)")
                continue
            wanted[name] = (req, sorted(req.extras), parent)
        fresh = [
            n
            for n in wanted
            if n not in chosen or not wanted[n][0].specifier.contains(wheel_version(chosen[n]), prereleases=True)
        ]
        with tempfile.TemporaryDirectory() as tmp:
            download([f"{n}{wanted[n][0].specifier}" for n in fresh], Path(tmp), python_version, platforms)
            for wheel in Path(tmp).glob("*.whl"):
                stale = chosen.get(wheel_name(wheel))
                if stale is not None and stale.exists():
                    stale.unlink()
                shutil.move(str(wheel), out / wheel.name)
                chosen[wheel_name(wheel)] = out / wheel.name
        level = []
        for name, (_, extras, _) in wanted.items():
            resolved.add(name)
            level += [
                (Requirement(text), extras, f"{name} {wheel_version(chosen[name])}")
                for text in requirements_of_wheel(chosen[name])
            ]
    return sorted(resolved), problems


def requirements_of_wheel(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        meta = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        return email.parser.Parser().parsestr(archive.read(meta).decode()).get_all("Requires-Dist") or []


def build(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    host = read_pins(Path(args.host_freeze)) if args.host_freeze else {}
    if args.ship_pinned and not args.no_lock:
        # these travel at the lock's version whatever version the host has (torch's family stays the host's)
        pinned = {canonicalize_name(n) for n in args.ship_pinned}
        host = {n: v for n, v in host.items() if n not in pinned or read_pins(LOCK).get(n) == v}
    # left out on purpose (imported by nothing that runs there): treated as present, so the walk stops at them
    host.update({canonicalize_name(n): "" for n in args.exclude})
    for name in args.shadow:  # shipped although the host has it: this site's copy comes first on sys.path
        host.pop(canonicalize_name(name), None)
    problems: list[str] = []
    if args.no_lock:
        if not args.requirement:
            raise SystemExit("wheelhouse: --no-lock needs --requirement (what to resolve)")
        shipped, problems = resolve_unpinned(args.requirement, args.python, args.platform, host, out)
        versions = {wheel_name(w): wheel_version(w) for w in out.glob("*.whl")}
        keep = set(shipped)
    else:
        pins = read_pins(LOCK)
        # locked packages not installed here (the gpu extra's): their wheels first, to read their requirements
        download(
            [f"{n}=={v}" for n, v in pins.items() if n not in host and not _installed(n)],
            out,
            args.python,
            args.platform,
        )
        needed = needed_packages(
            [e for e in args.extras.split(",") if e], args.python, pins, host, out, roots=args.requirement
        )
        shipped = [n for n in needed if n not in host]
        # present files are skipped; setuptools builds the editable install (pip's isolated build env, offline)
        backend = [] if args.requirement else [BUILD_BACKEND]
        download([f"{n}=={pins[n]}" for n in shipped] + backend, out, args.python, args.platform)
        versions = pins
        keep = set(shipped) | ({"setuptools"} if backend else set())
        if args.torch and "torch" not in host:
            download([args.torch], out, args.python, args.platform)
            keep.add("torch")
    for stale in out.glob("*.whl"):  # from an earlier run with other extras or another host
        if wheel_name(stale) not in keep:
            stale.unlink()
    saved = sum(trim_cuda_libraries(w, args.cuda) for w in out.glob("*.whl")) if args.cuda else 0
    for spec in args.drop:
        package, _, folder = spec.partition(":")
        for wheel in out.glob("*.whl"):
            if wheel_name(wheel) == canonicalize_name(package):
                saved += drop_folders(wheel, [folder.rstrip("/") + "/"])
    (out / "constraints.txt").write_text("".join(f"{n}=={versions[n]}\n" for n in sorted(shipped)))
    if not args.requirement:
        (out / "extras").write_text(args.extras + "\n")  # what `make install WHEELHOUSE=...` installs
    size = sum(w.stat().st_size for w in out.glob("*.whl"))
    print(
        f"wheelhouse {out}: {len(list(out.glob('*.whl')))} wheels, {size / 2**20:.1f} MiB"
        + (f" ({saved / 2**20:.1f} MiB of other CUDA versions' libraries or dropped folders removed)" if saved else "")
        + (f"; {len(host)} packages of the host's freeze are left out" if host else "")
    )
    for problem in problems:
        print(f"  problem: {problem}")
    if problems:
        raise SystemExit(f"wheelhouse: {len(problems)} unmet requirements (above)")


def check(folders: list[Path], python_version: str, host: dict[str, str]) -> list[str]:
    """Unmet requirements of the wheels in `folders` (each folder is one site: its wheels + the host)."""
    env = target_environment(python_version)
    problems, unknown = [], set()
    for folder in folders:
        wheels = {wheel_name(w): w for w in folder.glob("*.whl")}
        for name, wheel in sorted(wheels.items()):
            for text in requirements_of_wheel(wheel):
                req = Requirement(text)
                dep = canonicalize_name(req.name)
                if not applies(req, env, []):
                    continue
                version = wheel_version(wheels[dep]) if dep in wheels else host.get(dep)
                if version is None:
                    problems.append(f"{folder.name}: {name} needs {req}: neither shipped nor on the host")
                elif version[:1].isdigit() and not req.specifier.contains(version, prereleases=True):
                    problems.append(f"{folder.name}: {name} needs {req}: {dep} {version} there")
                elif not version and req.specifier:
                    unknown.add(f"{req} ({name})")
        size = sum(w.stat().st_size for w in wheels.values())
        print(f"{folder}: {len(wheels)} wheels, {size / 2**20:.2f} MiB")
    if unknown:
        print(
            "  met by a host package (or an excluded one) whose version is not known here: "
            + ", ".join(sorted(unknown))
        )
    return problems


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
    b.add_argument(
        "--platform",
        action="append",
        default=None,
        help="pip platform tags of the target (repeatable); default: manylinux x86-64 tags",
    )
    b.add_argument("--extras", default="gpu", help="extras of the project to include (e.g. dev,gpu)")
    b.add_argument("--host-freeze", help="`pip freeze` of the target: what it has is not downloaded")
    b.add_argument("--cuda", help="keep only this CUDA version's libraries in bitsandbytes (e.g. 130)")
    b.add_argument("--torch", help="also download this torch (e.g. torch==2.13.0) for a target without torch")
    b.add_argument(
        "--requirement",
        action="append",
        default=None,
        help="a root spec instead of expqa[extras] (repeatable), e.g. unsloth==2026.10.9",
    )
    b.add_argument("--no-lock", action="store_true", help="resolve versions here instead of requirements.lock's")
    b.add_argument(
        "--ship-pinned",
        action="append",
        default=[],
        metavar="PACKAGE",
        help="with --host-freeze: ship this package at the lock's version even where the host has another one "
        "(repeatable; `make wheelhouse` names the model stack, whose versions change the numbers)",
    )
    b.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="PACKAGE",
        help="leave this required package out (repeatable): nothing that runs on the target imports it",
    )
    b.add_argument(
        "--shadow",
        action="append",
        default=[],
        metavar="PACKAGE",
        help="ship this package even if the host has it (a version the set needs; repeatable)",
    )
    b.add_argument(
        "--drop",
        action="append",
        default=[],
        metavar="PACKAGE:FOLDER/",
        help="rewrite PACKAGE's wheel without the files under FOLDER/ (repeatable)",
    )
    c = sub.add_parser("check", help="offline pip check of wheel folders against the host's freeze")
    c.add_argument("folders", nargs="+", type=Path)
    c.add_argument("--host-freeze")
    c.add_argument("--python", default=f"{sys.version_info.major}.{sys.version_info.minor}")
    c.add_argument("--exclude", action="append", default=[], metavar="PACKAGE", help="left out on purpose")
    args = parser.parse_args(argv)
    if args.command == "lock":
        write_lock(sys.executable)
    elif args.command == "check":
        host = read_pins(Path(args.host_freeze)) if args.host_freeze else {}
        problems = check(args.folders, args.python, {**host, **{canonicalize_name(n): "" for n in args.exclude}})
        print("\n".join(f"  problem: {p}" for p in problems) or "  every requirement is met")
        return 1 if problems else 0
    else:
        args.platform = args.platform or [f"manylinux_2_{n}_x86_64" for n in (39, 35, 34, 31, 28, 27, 24, 17)] + [
            "manylinux2014_x86_64",
            "linux_x86_64",
        ]
        build(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
