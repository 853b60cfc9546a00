"""expqa.pipeline: the params stage (checks, profile resolution, one file per stage) and the stages' one-line
errors."""

import json
import os
import subprocess
import sys

import pytest

from expqa.config import STAGE_SECTIONS, ConfigError
from helpers import write_params

PARAMS_STAGE = ["stages/params.py", "--params", "params.yaml", "--sources", "data/raw/sources", "--out", "resolved"]


def test_bad_params_value_is_a_one_line_error_without_traceback(copy_repo):
    repo = copy_repo()
    params = repo / "params.yaml"
    params.write_text(params.read_text().replace("  r: 16", "  r: 0"))
    line = next(i for i, text in enumerate(params.read_text().splitlines(), 1) if "  r: 0" in text)
    expected = f"error: params.yaml:{line}: lora.r is 0; must be a positive integer (typical: 8, 16, 32, 64)"
    for command in (
        [sys.executable, *PARAMS_STAGE],  # what dvc repro runs first
        [
            sys.executable,
            "-m",
            "expqa.cli",
            "train",
            "--params",
            "params.yaml",
            "--base",
            "b",
            "--data",
            "d",
            "--out",
            "o",
            "--checkpoints",
            "c",
            "--metrics",
            "m",
            "--log-folder",
            "l",
        ],
    ):  # a stage by hand
        result = subprocess.run(command, cwd=repo, capture_output=True, text=True)
        assert (result.returncode, result.stderr.strip()) == (2, expected), result.stderr
    assert not (repo / "resolved").exists()


@pytest.mark.parametrize(
    "old,new,expected",
    [
        (
            "name: HuggingFaceTB/SmolLM2-135M-Instruct",
            "name: ./no-such-model",
            "error: model.name './no-such-model' is neither a local directory nor a hub id like 'org/model'",
        ),
        (
            "posts: data/raw/stackexchange_sample/Posts.xml",
            "posts: data/raw/site.7z",
            "error: params.yaml: collect.posts data/raw/site.7z does not exist",
        ),
    ],
)
def test_params_stage_checks_what_params_name_before_any_stage_runs(copy_repo, old, new, expected):
    """A bad `dvc exp run -S model.name=...` used to fail in the base stage, after DVC had deleted models/base."""
    repo = copy_repo()
    params = repo / "params.yaml"
    params.write_text(params.read_text().replace(old, new, 1))
    result = subprocess.run([sys.executable, *PARAMS_STAGE], cwd=repo, capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.startswith(expected), result.stderr
    assert not (repo / "resolved").exists()


def test_params_stage_writes_each_stage_its_resolved_sections(copy_repo):
    repo = copy_repo()
    result = subprocess.run(
        [sys.executable, *PARAMS_STAGE],
        cwd=repo,
        capture_output=True,
        text=True,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "params: params.yaml checked, profile auto -> cpu; 9 stage files in resolved\n"
    train = json.loads((repo / "resolved" / "train.json").read_text())
    assert (train["stage"], train["profile"], train["train"]["micro_batch"]) == ("train", "cpu", "2 conversations")
    assert sorted(p.stem for p in (repo / "resolved").iterdir()) == sorted(STAGE_SECTIONS)


def run_params_stage(repo, monkeypatch, gpus: int, cores: int = 2) -> tuple[int, str]:
    """The params stage in this process on a machine with `gpus` CUDA GPUs and `cores` CPU cores; (status, stderr)."""
    import torch

    from expqa.pipeline import params as params_stage

    monkeypatch.chdir(repo)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    return params_stage.main(PARAMS_STAGE[1:])


def resolved_files(repo) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((repo / "resolved").iterdir())}


def test_the_params_stage_runs_on_every_repro_and_re_resolves_auto_for_this_machine(copy_repo, monkeypatch, capsys):
    """A lock made on a CPU, cloned onto a GPU host: `dvc repro` runs the params stage again (always_changed), which
    resolves the gpu profile there; back on a CPU, the cpu profile's files come back byte for byte. Stages whose
    sections the profile does not touch keep the same bytes, so DVC re-runs only what the machine changes."""
    import yaml

    from helpers import REPO

    assert yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["params"]["always_changed"] is True
    repo = copy_repo()
    assert run_params_stage(repo, monkeypatch, gpus=0) == 0
    on_cpu = resolved_files(repo)
    assert json.loads(on_cpu["train.json"])["profile"] == "cpu"
    assert run_params_stage(repo, monkeypatch, gpus=1) == 0
    on_gpu = resolved_files(repo)
    train = json.loads(on_gpu["train.json"])
    assert (train["profile"], train["train"]["micro_batch"]) == ("gpu", "16384 tokens")
    changed = {name for name in on_cpu if on_cpu[name] != on_gpu[name]}
    assert changed == {"train.json", "align.json", "evaluate.json", "stats.json"}  # what the cpu: overrides touch
    assert run_params_stage(repo, monkeypatch, gpus=0) == 0
    assert resolved_files(repo) == on_cpu
    out = capsys.readouterr().out
    assert "profile auto -> gpu;" in out and out.count("profile auto -> cpu;") == 2


def test_stages_depend_on_the_keys_they_read(copy_repo, monkeypatch):
    """stats and evaluate read train.max_seq_length only: a change of another train key (here fp8_matmul) rewrites
    train's file but not theirs, so DVC re-runs train and what follows it, not stats; max_seq_length reaches all."""
    repo = copy_repo()
    assert run_params_stage(repo, monkeypatch, gpus=0) == 0
    before = resolved_files(repo)
    assert json.loads(before["stats.json"]) == {"stage": "stats", "profile": "cpu", "train": {"max_seq_length": 512}}
    params = repo / "params.yaml"
    params.write_text(params.read_text().replace("fp8_matmul: auto ", "fp8_matmul: off ", 1))
    assert run_params_stage(repo, monkeypatch, gpus=0) == 0
    after = resolved_files(repo)
    assert {name for name in before if before[name] != after[name]} == {
        "train.json",
        "align.json",
    }  # align runs with train
    params.write_text(params.read_text().replace("    max_seq_length: 512", "    max_seq_length: 384", 1))
    assert run_params_stage(repo, monkeypatch, gpus=0) == 0
    changed = {name for name, data in resolved_files(repo).items() if data != after[name]}
    assert changed == {"train.json", "align.json", "stats.json", "evaluate.json"}


def test_a_stage_reads_only_its_keys_of_a_section(tmp_path):
    from expqa.config import load_stage_params

    path = tmp_path / "stats.json"
    path.write_text(json.dumps({"stage": "stats", "profile": "cpu", "train": {"max_seq_length": 512}}))
    train = load_stage_params(path, "stats").train
    assert train.max_seq_length == 512
    with pytest.raises(AttributeError, match="learning_rate: not among the keys this stage reads"):
        train.learning_rate  # noqa: B018 (the access is the test)
    path.write_text(json.dumps({"stage": "stats", "train": {"max_seq_length": 512, "learning_rate": 0.1}}))
    with pytest.raises(ConfigError, match="train must hold exactly max_seq_length"):
        load_stage_params(path, "stats")


def test_the_model_source_is_checked_only_when_the_base_stage_will_run_again(copy_repo, monkeypatch):
    """Every `dvc repro` runs the params stage: a hub model.name must not need the network each time."""
    from expqa.pipeline import params as params_stage

    asked = []
    monkeypatch.setattr(params_stage, "check_model_source", lambda name, revision: asked.append(name))
    repo = copy_repo()
    for _ in range(2):
        assert run_params_stage(repo, monkeypatch, gpus=0) == 0
    assert asked == ["HuggingFaceTB/SmolLM2-135M-Instruct"]
    (repo / "params.yaml").write_text((repo / "params.yaml").read_text().replace("revision: main", "revision: v2"))
    assert run_params_stage(repo, monkeypatch, gpus=0) == 0
    assert len(asked) == 2


@pytest.mark.parametrize(
    "gpus,cores,edit,key,expected",
    [
        (1, 16, ("  num_processes: 0 ", "  num_processes: 2 "), "  num_processes: 2 ",
         "train.num_processes is 2, but this machine has 1 CUDA GPU for the gpu profile; set 0 (one process per GPU)"),
        (0, 1, None, "    num_processes: 2 ",
         "cpu.train.num_processes is 2, but this machine has 1 CPU core for the cpu profile; set a count up to that"),
    ],
)  # fmt: skip
def test_params_never_ask_for_more_processes_than_this_machine_has_devices(
    copy_repo, monkeypatch, capsys, gpus, cores, edit, key, expected
):
    """The CPU profile's 2 processes on a 1-GPU host crashed with `CUDA error: invalid device ordinal` inside torchrun;
    now the params stage stops first, at the line of params.yaml that asks for them."""
    repo = copy_repo()
    params = repo / "params.yaml"
    if edit:
        params.write_text(params.read_text().replace(*edit, 1))
    line = next(i for i, text in enumerate(params.read_text().splitlines(), 1) if text.startswith(key))
    assert run_params_stage(repo, monkeypatch, gpus=gpus, cores=cores) == 2
    assert capsys.readouterr().err.startswith(f"error: params.yaml:{line}: {expected}")
    assert not (repo / "resolved").exists()


def test_offload_with_several_processes_stops_in_the_params_stage(copy_repo, monkeypatch, capsys):
    """It used to fail in the trainer, after the model, FP8 and the weight cache were set up."""
    repo = copy_repo()
    params = repo / "params.yaml"
    params.write_text(
        params.read_text().replace("gradient_checkpointing: auto ", "gradient_checkpointing: offload ", 1)
    )
    line = next(i for i, t in enumerate(params.read_text().splitlines(), 1) if "gradient_checkpointing: offload" in t)
    assert run_params_stage(repo, monkeypatch, gpus=2) == 2
    assert capsys.readouterr().err.startswith(
        f"error: params.yaml:{line}: train.gradient_checkpointing is offload, which runs in one process, but this run "
        "has 2: a reentrant checkpoint"
    )
    assert run_params_stage(repo, monkeypatch, gpus=1) == 0  # one GPU: one process


def test_the_cpu_profile_runs_on_the_cpu_even_where_a_gpu_is(monkeypatch):
    """Its settings (2 gloo processes, fp32 weights) are the CPU's, and it is how a CPU-made lock is reproduced."""
    from expqa.config import ConfigError, Params
    from expqa.pipeline import check_profile

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    check_profile(Params(profile="cpu"), "train")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="train: the params run with the gpu profile .* no CUDA GPU here"):
        check_profile(Params(profile="gpu"), "train")


def test_stage_scripts_run_only_as_the_main_module():
    """evaluate's spawned worker processes import the stage script again: an unguarded `main()` there started a second
    evaluation in each worker and broke the process pool (BrokenProcessPool in `dvc repro`)."""
    import ast

    from helpers import REPO

    for script in sorted((REPO / "stages").glob("*.py")):
        body = ast.parse(script.read_text()).body
        calls = [
            node for node in body if isinstance(node, ast.Raise) or isinstance(getattr(node, "value", None), ast.Call)
        ]
        guards = [node for node in body if isinstance(node, ast.If) and "__name__" in ast.unparse(node.test)]
        assert not calls and len(guards) == 1, f"{script.name}: call main() under `if __name__ == '__main__':`"


def test_every_stage_module_runs_with_python_dash_m():
    """`python -m expqa.pipeline.<stage>` imported the module and exited 0 without running anything (only train had
    the `__main__` block, which torchrun needs)."""
    import ast

    from helpers import REPO

    modules = sorted((REPO / "src" / "expqa" / "pipeline").glob("[!_]*.py"))
    assert {m.stem for m in modules} == {*STAGE_SECTIONS, "params", "merge"}  # every stage of dvc.yaml
    for module in modules:
        stage = module.stem
        body = ast.parse(module.read_text()).body
        guards = [node for node in body if isinstance(node, ast.If) and "__name__" in ast.unparse(node.test)]
        assert [ast.unparse(node) for node in guards] == ["if __name__ == '__main__':\n    sys.exit(main())"], stage
    help_ = subprocess.run([sys.executable, "-m", "expqa.pipeline.params", "--help"], capture_output=True, text=True)
    assert help_.returncode == 0 and help_.stdout.startswith("usage: expqa params "), help_.stderr
    missing = subprocess.run(
        [sys.executable, "-m", "expqa.pipeline.params", "--params", "p.yaml"], capture_output=True, text=True
    )
    assert missing.returncode == 2, missing.stderr
    assert "expqa params: error: the following arguments are required: --sources, --out" in missing.stderr


@pytest.mark.parametrize(
    "stage, argv, expected",
    [
        ("merge", "--base b --adapter a --out o --report {dir}", "--report {dir} is a directory"),
        (
            "evaluate",
            "--base b --sft s --tuned t --test t.jsonl --train r.jsonl --out o.json --headline h.json "
            "--examples e.jsonl --plot {dir} --params params.yaml",
            "--plot {dir} is a directory",
        ),
        (
            "align",
            "--base b --adapter a --preferences p.jsonl --questions q.jsonl --data d --out o --report r.json "
            "--quarantine {dir} --checkpoints c --metrics m --log-folder l --params params.yaml",
            "--quarantine {dir} is a directory",
        ),
        (
            "export",
            "--model m --out {file} --report r.json --timings t.json --params params.yaml",
            "--out {file} is a file; give the path of a folder",
        ),
        (
            "stats",
            "--data d --base b --out {file}/s.json --histogram h.csv --params params.yaml",
            "--out {file}/s.json: {file} is a file, not a folder",
        ),
    ],
    ids=["merge", "evaluate", "align", "export", "stats"],
)
def test_stages_check_their_output_paths_before_running(tmp_path, monkeypatch, capsys, stage, argv, expected):
    """The same check as collect's (stage_main's output_files/output_folders): a report path that is a folder
    failed only once the stage's main output had been written (merge, evaluate, export), or after hours of work."""
    import importlib

    monkeypatch.chdir(tmp_path)
    write_params(tmp_path / "params.yaml")
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("")
    paths = {"dir": str(tmp_path / "folder"), "file": str(tmp_path / "file")}
    main = importlib.import_module(f"expqa.pipeline.{stage}").main
    assert main([arg.format(**paths) for arg in argv.split()]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {expected.format(**paths)}") and err.endswith("(nothing was written)\n"), err


def test_align_off_writes_every_output_dvc_yaml_declares(tmp_path, monkeypatch):
    """align.enabled false (the CPU profile's): DVC fails a stage that leaves a declared output missing, and the
    curves of an earlier run must not stay beside the SFT adapter passed through."""
    import yaml

    from expqa.pipeline.align import main
    from helpers import REPO

    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["align"]
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path / "params.yaml", {"align": {"enabled": False}})
    for folder, marker in (("models/base", "config.json"), ("models/adapter", "adapter_config.json")):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / marker).write_text("{}")
    (tmp_path / "models/adapter/adapter_model.safetensors").write_bytes(b"weights")
    stale = tmp_path / "metrics/align/plots/metrics/eval/loss.tsv"
    stale.parent.mkdir(parents=True)
    stale.write_text("step\tloss\n1\t0.5\n")
    argv = stage["cmd"].split()[2:]  # after `python stages/align.py`
    argv[argv.index("--params") + 1] = "params.yaml"
    assert main(argv) == 0
    declared = [next(iter(out)) if isinstance(out, dict) else out for out in stage["outs"] + stage["plots"]]
    assert [path for path in declared if not (tmp_path / path).exists()] == []
    assert not stale.exists()
    assert (tmp_path / "models/aligned/adapter_model.safetensors").read_bytes() == b"weights"
    assert json.loads((tmp_path / "metrics/align.json").read_text()) == {"enabled": False}


# Modules a stage imports that cannot change what it writes, so that editing them does not re-run the pipeline.
GLUE = {
    "src/expqa/pipeline/__init__.py": "argument parsing and the one-line error",
    **dict.fromkeys(
        ("src/expqa/config/__init__.py", "src/expqa/config/schema.py", "src/expqa/config/loader.py"),
        "parses the stage's resolved params file, which is itself a dependency",
    ),
    "src/expqa/files.py": "atomic writes: where the bytes go, not what they are",
    "src/expqa/progress.py": "progress bars on stderr",
    "src/expqa/__init__.py": "the package's version and the warning filter",
    "src/expqa/noise.py": "silences library warnings",
    **{
        f"src/expqa/{package}/__init__.py": "the package's docstring"
        for package in ("data", "model", "training", "evaluation", "serving", "workspace")
    },
}
# load_for_training's
TRAINING_PATHS = ("src/expqa/model/attention.py", "src/expqa/model/fused_lora.py", "src/expqa/model/fp8.py")
NOT_USED = {"generate": set(TRAINING_PATHS), "evaluate": set(TRAINING_PATHS)}


def imported_modules(path, src):
    """expqa modules a file imports (at the top or inside functions), as files under src."""
    import ast

    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "expqa":
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names if alias.name.split(".")[0] == "expqa")
    files = set()
    for name in names:
        for candidate in (src / f"{name.replace('.', '/')}.py", src / name.replace(".", "/") / "__init__.py"):
            if candidate.exists():
                files.add(candidate)
    return files


def test_every_stage_depends_on_the_code_it_runs():
    """dvc.yaml's deps of each stage hold every expqa module its entry module reaches through imports, except the
    glue listed above: a change to, say, fp8.py must re-run train (it was missing once)."""
    import yaml

    from helpers import REPO

    src = REPO / "src"
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    problems = []
    for name, stage in stages.items():
        entry = src / "expqa" / "pipeline" / f"{stage['cmd'].split()[1].split('/')[-1]}"
        seen, todo = set(), [entry]
        while todo:
            path = todo.pop()
            if path not in seen:
                seen.add(path)
                todo.extend(imported_modules(path, src))
        needed = {p.relative_to(REPO).as_posix() for p in seen} - set(GLUE) - NOT_USED.get(name, set())
        missing = sorted(needed - set(stage["deps"]))
        if missing:
            problems.append(f"{name}: {', '.join(missing)}")
    assert not problems, "dvc.yaml deps miss modules the stage imports: " + "; ".join(problems)
