"""The real DVC workflow (issue "Reproducibility and sharing"), end to end on the tiny random Llama.

One module-scoped throwaway git repository is made from the project's sources, pointed at the tiny base and a
shrunk CPU profile, committed and `dvc repro`-ed once; the tests then check what a user relies on: the pipeline
reproduces and is up to date afterwards, the data stages give byte-identical outputs to the project's dvc.lock,
experiments (`dvc exp run -S`, the queue) show params.yaml params and the headline metrics, and a result pushed to a
local or S3-compatible (moto) remote can be cloned and pulled without any stage running again.

Everything runs through `python -m dvc` of this venv, with the venv's bin first on PATH so that the stages'
`cmd: python stages/...` use it, and PYTHONPATH=src so that each stage imports the library of the copy it runs in
(a queued experiment runs in its own temporary copy).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from helpers import REPO, write_params

pytestmark = pytest.mark.slow  # a real `dvc repro` of every stage, experiments, push/pull

VENV_BIN = Path(sys.executable).parent
DATA_OUTS = {"collect": ["data/interim/stackexchange.jsonl"], "combine": ["data/processed"]}
SMALL_QUESTIONS = "data/eval/critical_questions_small.jsonl"
QUESTIONS = [
    {
        "id": "cq-t1",
        "question": "What does a p-value of 0.04 mean in an A/B test?",
        "options": [
            "A 4% chance that there is no difference",
            "Data at least this extreme would occur 4% of the time if there were no difference",
        ],
        "answer": 1,
    },
    {
        "id": "cq-t2",
        "question": "Why fix the sample size of an A/B test in advance?",
        "options": ["Stopping when p < 0.05 inflates the false positive rate", "It makes the test run faster"],
        "answer": 0,
    },
]


@dataclass
class Project:
    root: Path  # the module's temporary folder
    repo: Path  # the reproduced git + DVC repository
    env: dict = field(repr=False)
    shipped_lock: dict = field(repr=False)  # the project's dvc.lock, as copied (the committed one in CI)
    repro: subprocess.CompletedProcess = field(repr=False)


# ---------------------------------------------------------------------------------------------------------------
# helpers


def _env(root: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "DVC_", "GIT_"))}
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=os.pathsep.join(["src", *filter(None, [env.get("PYTHONPATH")])]),
        DVC_NO_ANALYTICS="1",
        DVC_GLOBAL_CONFIG_DIR=str(root / "dvc-global"),  # no user/site DVC config (remotes, cache) leaks in
        DVC_SITE_CONFIG_DIR=str(root / "dvc-site"),
        GIT_CONFIG_NOSYSTEM="1",
        HF_HUB_OFFLINE="1",
        CUDA_VISIBLE_DEVICES="",  # the `cpu:` profile applies, shrunk below, even on a GPU runner
        TOKENIZERS_PARALLELISM="false",
        AWS_CONFIG_FILE=str(root / "no-aws-config"),  # S3 credentials come from .dvc/config.local only
        AWS_SHARED_CREDENTIALS_FILE=str(root / "no-aws-credentials"),
        AWS_EC2_METADATA_DISABLED="true",
    )
    return env


def run(cmd: list[str], cwd: Path, env: dict, timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, cmd))} failed ({result.returncode}) in {cwd}\n"
            f"--- stdout\n{result.stdout[-6000:]}\n--- stderr\n{result.stderr[-6000:]}"
        )
    return result


def dvc(project: Project, *args: str, cwd: Path | None = None, **kw) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "dvc", *args], cwd or project.repo, project.env, **kw)


def git(project: Project, *args: str, cwd: Path | None = None, **kw) -> subprocess.CompletedProcess:
    return run(["git", *args], cwd or project.repo, project.env, **kw)


def expqa(project: Project, *args: str, cwd: Path | None = None, **kw) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "expqa.cli", *args], cwd or project.repo, project.env, **kw)


def commit(project: Project, message: str, cwd: Path | None = None) -> None:
    git(project, "add", "-A", cwd=cwd)
    git(project, "commit", "-q", "--allow-empty", "-m", message, cwd=cwd)


def copy_project(dest: Path) -> None:
    """The project's sources as `git clone` would give them, plus sources not yet added to git.

    That is: tracked files and untracked files git does not ignore (working-tree contents), but no pipeline outputs
    left in models/ or metrics/. Not conftest's `copy_repo`: that copies everything but a few names, including
    .dvc/cache (over a GB after a `make repro`, with its run-cache, which would let `dvc repro` restore the data
    stages instead of re-running them and so void the determinism check) and untracked outputs such as
    models/checkpoints.
    """

    def ls(*flags: str) -> set[str]:
        return set(
            filter(
                None,
                subprocess.run(
                    ["git", "ls-files", "-z", *flags], cwd=REPO, capture_output=True, text=True, check=True
                ).stdout.split("\0"),
            )
        )

    untracked = {name for name in ls("--others", "--exclude-standard") if not name.startswith(("models/", "metrics/"))}
    for name in sorted(ls("--cached") | untracked):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)


def configure(repo: Path, tiny_base: Path) -> None:
    """params.yaml: the tiny base, and a CPU profile that trains and evaluates in seconds."""
    updates = {"model": {"name": str(tiny_base)}, "eval": {"critical_questions": SMALL_QUESTIONS}}
    # max_seq_length 128, not 64: at 64 every assistant token of the first test conversations is truncated away and
    # the evaluate stage dies in perplexity() with ZeroDivisionError (reported; 128 keeps some in each).
    # one process each: the workflow is what these tests check; 2-process training and evaluation have their own
    # tests (test_distributed.py, test_evaluate.py), and a process start costs seconds per stage here
    updates["cpu.train"] = dict(
        max_steps=2,
        micro_batch="2 conversations",
        max_seq_length=128,
        eval_steps=2,
        save_steps=2,
        logging_steps=1,
        num_threads=1,
        num_processes=1,
    )
    # a few preference pairs (the shipped file's first 30): the stage's workflow, not DPO's effect; on, although the
    # shipped CPU profile turns it off: the longer path through DVC (off: test_pipeline.py checks its outputs)
    updates["align"] = dict(num_train_epochs=1, pairs_per_step=4, logging_steps=1)
    updates["cpu.align"] = dict(enabled=True)
    preferences = repo / "data/raw/preferences.jsonl"
    preferences.write_text("".join(preferences.read_text().splitlines(keepends=True)[:30]))
    updates["cpu.eval"] = dict(max_new_tokens=4, max_examples=2, batch_size=2, num_processes=1, num_threads=1)
    updates["export"] = dict(types=["q8_0"], ollama_type="q8_0")  # one GGUF: each is loaded back twice (~10 s)
    write_params(repo / "params.yaml", updates, source=repo / "params.yaml", sort_keys=False)
    (repo / SMALL_QUESTIONS).write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))


def cached_outs(repo: Path) -> set[str]:
    """dvc.yaml's outputs that go to the DVC cache (and so to a remote): all but those with cache: false."""
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"].values()
    outs = [out for stage in stages for out in stage.get("outs", [])]
    return {out if isinstance(out, str) else next(iter(out)) for out in outs} - {
        next(iter(out)) for out in outs if isinstance(out, dict) and next(iter(out.values())).get("cache") is False
    }


def lock_outs(lock: dict) -> dict[str, dict]:
    return {out["path"]: out for stage in lock["stages"].values() for out in stage.get("outs", [])}


def clone(project: Project, dest: Path) -> Path:
    git(project, "clone", "-q", str(project.repo), str(dest), cwd=project.root)
    git(project, "config", "user.name", "expqa test", cwd=dest)
    git(project, "config", "user.email", "expqa-test@example.invalid", cwd=dest)
    return dest


def assert_up_to_date(project: Project, cwd: Path | None = None) -> None:
    """`dvc status` lists only the params stage, which runs on every `dvc repro` (always_changed: it re-resolves
    profile auto for the machine)."""
    status = json.loads(dvc(project, "status", "--json", cwd=cwd).stdout)
    hint = (
        "\n(models/checkpoints is a declared output of `train` that is neither pushed (cache: false) nor in git "
        "(.gitignore): a clone never has it, so DVC sees the output deleted and `dvc repro` retrains. Stop "
        "declaring it as an output in dvc.yaml; the stage keeps using it for resuming.)"
        if "models/checkpoints" in json.dumps(status)
        else ""
    )
    assert status == {"params": ["always changed"]}, f"dvc status in {(cwd or project.repo).name}: {status}{hint}"


def assert_nothing_runs(project: Project, cwd: Path) -> None:
    """`dvc status` and `dvc repro` say up to date but for the params stage, and no other stage runs (nothing
    retrains)."""
    assert_up_to_date(project, cwd)
    repro = dvc(project, "repro", cwd=cwd)
    out = repro.stdout + repro.stderr
    ran = re.findall(r"Running stage '([^']+)'", out)
    assert ran == ["params"], f"dvc repro in {cwd.name} re-ran stages:\n{out}"
    assert "didn't change, skipping" in out and git(project, "status", "--porcelain", cwd=cwd).stdout == "", out


def timed(label: str):
    class _Timer:
        def __enter__(self):
            self.start = time.monotonic()

        def __exit__(self, *exc):  # shown with -s; for keeping an eye on the file's runtime
            print(f"[dvc workflow] {label}: {time.monotonic() - self.start:.1f} s")

    return _Timer()


# ---------------------------------------------------------------------------------------------------------------
# the shared, reproduced repository


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_base) -> Project:
    root = tmp_path_factory.mktemp("dvc_workflow")
    repo = root / "repo"
    copy_project(repo)
    shipped_lock = yaml.safe_load((repo / "dvc.lock").read_text())
    configure(repo, tiny_base)
    project = Project(root, repo, _env(root), shipped_lock, None)
    git(project, "init", "-q")
    git(project, "config", "user.name", "expqa test")
    git(project, "config", "user.email", "expqa-test@example.invalid")
    commit(project, "expqa on the tiny base")
    with timed("dvc repro (all stages)"):
        project.repro = dvc(project, "repro", check=False)
    assert project.repro.returncode == 0, project.repro.stdout[-6000:] + project.repro.stderr[-6000:]
    commit(project, "dvc repro")
    return project


def test_repro_runs_every_stage_and_leaves_the_pipeline_up_to_date(project):
    out = project.repro.stdout + project.repro.stderr
    for stage in ("base", "collect", "combine", "stats", "train", "align", "merge", "evaluate", "export"):
        assert f"Running stage '{stage}'" in out, f"stage {stage} did not run:\n{out[-4000:]}"
    assert_up_to_date(project)
    assert git(project, "status", "--porcelain").stdout == ""  # everything the run wrote was committed

    evaluation = json.loads((project.repo / "metrics/eval.json").read_text())
    critical = evaluation["critical_questions"]
    for block in (evaluation[k] for k in ("perplexity", "rouge1", "rouge2", "rougeL", "stop_rate")):
        assert {"base", "tuned", "delta", "delta_ci95_lo", "delta_ci95_hi", "p_value"} <= set(block), block
    assert {"length_norm", "calibrated", "length_norm_untaught"} <= set(critical), critical
    assert critical["questions"] == len(QUESTIONS) and evaluation["test_examples"] == 2
    assert evaluation["models"] == ["base", "sft", "tuned"]  # align ran: the SFT model is the middle of three
    assert evaluation["tuned_vs_sft"]["compared"] == ["sft", "tuned"]
    aligned = json.loads((project.repo / "metrics/align.json").read_text())
    assert aligned["enabled"] and aligned["train_pairs"] + aligned["held_out_pairs"] == aligned["records"]
    exported = json.loads((project.repo / "metrics/export.json").read_text())
    assert exported["passed"] and set(exported["types"]) == {"q8_0"}
    assert (project.repo / "models/gguf/expqa-q8_0.gguf").stat().st_size == exported["types"]["q8_0"]["bytes"]
    train = json.loads((project.repo / "metrics/train/metrics.json").read_text())
    assert {"loss", "eval_loss_before_training"} <= set(train["train"]) | set(train), train
    assert not (project.repo / "metrics/train/params.yaml").exists()  # dvclive dumps no TrainingArguments
    # the profile that ran, in the reports (`dvc metrics show <file>`) and in the params each stage read
    assert train["profile"] == evaluation["profile"] == "cpu"
    assert json.loads((project.repo / "metrics/params/train.json").read_text())["profile"] == "cpu"
    assert json.loads((project.repo / "models/adapter/training_config.json").read_text())["config"]["profile"] == "cpu"
    shown = dvc(project, "metrics", "show", "--json", "metrics/train/metrics.json").stdout
    assert re.search(r'"profile":\s*"cpu"', shown), shown


def resolved_params(lock: dict, stage: str) -> str | None:
    """The md5 of the params file a stage read (metrics/params/<stage>.json, written by the params stage)."""
    return next(
        (dep["md5"] for dep in lock["stages"][stage]["deps"] if dep["path"].startswith("metrics/params/")), None
    )


def test_data_stages_reproduce_the_committed_lock_byte_for_byte(project):
    """collect and combine do not depend on the model: their outputs must hash as in the project's dvc.lock.

    That lock is the working tree's, i.e. the committed one in CI; locally it is the one the last `make repro`
    wrote, which is what a data-code change should be compared with.
    """
    shipped = project.shipped_lock
    here = yaml.safe_load((project.repo / "dvc.lock").read_text())
    for stage, paths in DATA_OUTS.items():
        assert resolved_params(here, stage) == resolved_params(shipped, stage), stage
        for path in paths:
            mine, theirs = lock_outs(here)[path], lock_outs(shipped)[path]
            # exact on any CPU: collect and combine do no floating point beyond IEEE double + - * / (no numpy, torch
            # or libm), and generate is off (an empty output, no model)
            assert (mine["md5"], mine["size"], mine.get("nfiles")) == (
                theirs["md5"],
                theirs["size"],
                theirs.get("nfiles"),
            ), f"{path} is not reproduced byte for byte"


def test_a_train_key_that_stats_does_not_read_leaves_stats_alone(project):
    """`-S train.fp8_matmul=off` re-runs train and what follows, not stats (which reads train.max_seq_length only):
    after the params stage, DVC sees train's params file changed and stats' not."""
    params = project.repo / "params.yaml"
    original = params.read_text()
    assert "fp8_matmul: auto" in original
    try:
        params.write_text(original.replace("fp8_matmul: auto", "fp8_matmul: 'off'", 1))
        dvc(project, "repro", "-s", "params")
        status = json.loads(dvc(project, "status", "--json").stdout)
        assert "train" in status and not {"base", "collect", "combine", "stats"} & set(status), status
    finally:
        params.write_text(original)
        dvc(project, "repro", "-s", "params")
    assert_up_to_date(project)


def test_verify_passes_after_a_rerun_here_and_fails_after_a_real_change(project):
    """`expqa verify`: a forced re-run of train on this machine reproduces the committed metrics; a larger test
    split (params, combine and stats re-run) puts the split counts outside their exact tolerance. In a clone sharing
    the cache, so the shared repository keeps its committed state.

    Not a learning-rate change: the tiny random model's losses stay within 1 % of ln(vocabulary) whatever its 2 steps
    do (measured: val loss -0.48 % at 250x the learning rate, +0.13 % at 2500x), inside the loss tolerance.
    """
    dest = clone(project, project.root / "clone-verify")
    dvc(project, "cache", "dir", "--local", str(project.repo / ".dvc/cache"), cwd=dest)
    dvc(project, "checkout", cwd=dest)
    with timed("dvc repro -f -s train + expqa verify"):
        dvc(project, "repro", "-f", "-s", "train", cwd=dest)
        rerun = expqa(project, "verify", cwd=dest, check=False)
    assert rerun.returncode == 0 and rerun.stdout.splitlines()[-1].startswith("ok: all"), rerun.stdout + rerun.stderr

    fraction = yaml.safe_load((dest / "params.yaml").read_text())["data"]["test_fraction"]
    write_params(
        dest / "params.yaml", {"data": {"test_fraction": fraction * 2}}, source=dest / "params.yaml", sort_keys=False
    )
    with timed("dvc repro stats (test_fraction x2) + expqa verify"):
        dvc(project, "repro", "stats", cwd=dest)
        changed = expqa(project, "verify", cwd=dest, check=False)
    assert changed.returncode == 1, changed.stdout + changed.stderr
    line = next(
        line for line in changed.stdout.splitlines() if line.startswith("data_stats: splits.test.conversations ")
    )
    assert line.endswith(" OUTSIDE"), changed.stdout
    assert "data_stats: splits.test.conversations" in changed.stdout.splitlines()[-1], changed.stdout


# ---------------------------------------------------------------------------------------------------------------
# sharing: remotes, clones


@pytest.fixture(scope="module")
def local_remote(project) -> Path:
    """A local-directory default remote, committed in .dvc/config, with the reproduced results pushed to it."""
    remote = project.root / "local-remote"
    dvc(project, "remote", "add", "-d", "local", str(remote))
    commit(project, "local DVC remote")
    with timed("dvc push (local)"):
        dvc(project, "push")
    return remote


def test_local_remote_push_then_clone_pull_runs_nothing(project, local_remote):
    assert any(p.is_file() for p in local_remote.rglob("*"))
    # training checkpoints (optimizer and RNG state) are neither pushed nor committed: a clone has none
    assert git(project, "ls-files", "models/checkpoints").stdout == "", "checkpoints are committed to git"
    dest = clone(project, project.root / "clone-local")
    assert "local" in dvc(project, "remote", "list", cwd=dest).stdout  # the remote travels in .dvc/config
    with timed("expqa pull + dvc status + repro (clone)"):
        pulled = expqa(project, "pull", cwd=dest)  # everything is on the remote: plain `dvc pull`, its output
        assert "fetched" in pulled.stdout and pulled.stderr == "", pulled
        for path in (
            "models/base/model.safetensors",
            "models/adapter/adapter_model.safetensors",
            "models/merged/model.safetensors",
            "data/processed/train.jsonl",
            "data/interim/stackexchange.jsonl",
            "metrics/eval.json",
            "metrics/headline.json",
            "metrics/train/metrics.json",
        ):
            assert (dest / path).is_file(), f"{path} missing after dvc pull"
        assert_nothing_runs(project, dest)


def pull_failure(result: subprocess.CompletedProcess) -> tuple[list[str], set[str]]:
    """expqa pull's lines (stderr) and the outputs its first line names as missing."""
    assert result.returncode != 0, result.stdout
    assert "Checkout failed" not in result.stdout + result.stderr, result.stderr  # not DVC's bare error
    lines = result.stderr.splitlines()
    named = re.search(r"outputs? of dvc.lock \((.*?); stages? ", lines[0])
    assert named, lines
    return lines, set(named.group(1).split(", "))


def test_pull_names_outputs_never_pushed_and_what_to_run(project):
    """A clone whose remote has data/processed and models/base only (the rest were never pushed): `expqa pull`
    pulls those and says which outputs are missing, why, and to `dvc push` on their machine or `dvc repro` here."""
    remote = project.root / "partial-remote"
    # in config.local, removed again: the shared repository's committed config stays as it is
    dvc(project, "remote", "add", "--local", "partial", str(remote))
    try:
        dvc(project, "push", "-r", "partial", "data/processed", "models/base")
    finally:
        dvc(project, "remote", "remove", "--local", "partial")
    dest = clone(project, project.root / "clone-partial")
    dvc(project, "remote", "add", "--local", "-d", "partial", str(remote), cwd=dest)

    with timed("expqa pull (partial remote)"):
        lines, missing = pull_failure(expqa(project, "pull", cwd=dest, check=False))
    # every output the pull could not give is named, and only those (an empty file needs no remote)
    absent = {out for out in cached_outs(dest) if not (dest / out).exists()}
    assert missing == absent and {"models/adapter", "models/aligned", "models/merged", "models/gguf"} <= missing, lines
    assert len(lines) == 3, lines
    assert lines[0].startswith("error: DVC remote 'partial' and the local cache lack "), lines
    assert lines[0].endswith("train, align, merge, export)"), lines  # the stages that make them, in pipeline order
    assert "did not `dvc push`" in lines[1], lines
    assert "`dvc push` on the machine that made them" in lines[2] and "`dvc repro`" in lines[2], lines
    assert (dest / "models/base/model.safetensors").is_file() and (dest / "data/processed/train.jsonl").is_file()


def test_pull_without_a_remote_says_so(project):
    dest = clone(project, project.root / "clone-no-remote")
    # the committed remote, if another test added one (`dvc remote list` wraps long lines: read the config)
    config = dvc(project, "config", "--list", "--project", cwd=dest).stdout
    for name in re.findall(r"^remote\.(.+)\.url=", config, flags=re.MULTILINE):
        dvc(project, "remote", "remove", name, cwd=dest)
    lines, missing = pull_failure(expqa(project, "pull", cwd=dest, check=False))
    absent = {out for out in cached_outs(dest) if not (dest / out).exists()}
    assert missing == absent and {"models/base", "data/processed", "models/adapter"} <= missing, lines
    assert len(lines) == 3 and lines[0].startswith("error: no default DVC remote is set"), lines
    assert "`dvc remote add -d" in lines[2] and "`dvc repro`" in lines[2], lines


def test_s3_remote_via_moto_keeps_credentials_out_of_git(project):
    pytest.importorskip("dvc_s3", reason="dvc-s3 is not installed (pip install -e '.[dev]')")
    boto3 = pytest.importorskip("boto3", reason="boto3 (from dvc-s3) is not installed")
    server_mod = pytest.importorskip("moto.server", reason="moto[server] is not installed (pip install -e '.[dev]')")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per S3 request in a failure report
    try:
        server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
    except Exception as exc:  # e.g. flask/werkzeug missing
        pytest.skip(f"moto server does not start: {exc!r}")
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        key_id, secret = "AKIAEXPQATEST", "expqa-test-secret-not-in-git"
        s3 = boto3.client(
            "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=key_id, aws_secret_access_key=secret
        )
        s3.create_bucket(Bucket="expqa-dvc")

        dvc(project, "remote", "add", "s3remote", "s3://expqa-dvc/store")
        for option, value in (
            ("endpointurl", endpoint),
            ("access_key_id", key_id),
            ("secret_access_key", secret),
            ("region", "us-east-1"),
        ):
            dvc(project, "remote", "modify", "--local", "s3remote", option, value)
        config = (project.repo / ".dvc/config").read_text()
        assert "s3://expqa-dvc/store" in config
        assert secret not in config and key_id not in config and endpoint not in config
        assert secret in (project.repo / ".dvc/config.local").read_text()
        git(project, "check-ignore", "-q", ".dvc/config.local")  # git never sees the credentials
        commit(project, "S3 DVC remote")
        assert "config.local" not in git(project, "ls-files", ".dvc").stdout

        with timed("dvc push (s3/moto)"):
            dvc(project, "push", "-r", "s3remote")
        assert s3.list_objects_v2(Bucket="expqa-dvc", Prefix="store/").get("KeyCount", 0) > 0

        dest = clone(project, project.root / "clone-s3")
        shutil.copy2(project.repo / ".dvc/config.local", dest / ".dvc/config.local")
        with timed("dvc pull (s3/moto) + status + repro (clone)"):
            dvc(project, "pull", "-r", "s3remote", cwd=dest)
            assert (dest / "models/adapter/adapter_model.safetensors").read_bytes() == (
                project.repo / "models/adapter/adapter_model.safetensors"
            ).read_bytes()
            assert sorted(p.name for p in (dest / "data/processed").iterdir()) == sorted(
                p.name for p in (project.repo / "data/processed").iterdir()
            )
            assert_nothing_runs(project, dest)
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------------------------
# experiments (in a clone sharing the cache, so the repository the other tests use keeps its committed state)


def _experiments(show: list[dict]) -> dict[str, dict]:
    """name -> record for every experiment in `dvc exp show --json` output."""
    found = {}
    for baseline in show:
        for group in baseline.get("experiments") or []:
            for record in group.get("revs") or []:
                found[record.get("name") or record["rev"]] = record
    return found


def test_experiments_show_params_yaml_params_and_metrics(project):
    dest = clone(project, project.root / "clone-exp")
    dvc(project, "cache", "dir", "--local", str(project.repo / ".dvc/cache"), cwd=dest)
    dvc(project, "checkout", cwd=dest)

    with timed("dvc exp run -S lora.r=8"):
        dvc(project, "exp", "run", "-n", "lora-r8", "-S", "lora.r=8", cwd=dest)

    params_diff = json.loads(dvc(project, "params", "diff", "--json", cwd=dest).stdout)
    assert params_diff == {"params.yaml": {"lora.r": {"old": 16, "new": 8, "diff": -8}}}
    # the DVC metrics are the headline; the full reports are plain outputs, compared by naming them
    headline_diff = json.loads(dvc(project, "metrics", "diff", "--json", cwd=dest).stdout)
    assert set(headline_diff) == {"metrics/headline.json"}, headline_diff
    assert "ppl.tuned" in headline_diff["metrics/headline.json"], headline_diff
    assert not [k for k in headline_diff["metrics/headline.json"] if ".base" in k], headline_diff
    reports = ["metrics/train/metrics.json", "metrics/eval.json"]
    metrics_diff = json.loads(dvc(project, "metrics", "diff", "--json", "--targets", *reports, cwd=dest).stdout)
    assert set(reports) <= set(metrics_diff), metrics_diff
    for name, changes in metrics_diff.items():
        for key, change in changes.items():
            assert change["diff"] == pytest.approx(change["new"] - change["old"]), (name, key, change)
    assert "eval.loss" in metrics_diff["metrics/train/metrics.json"]  # val loss after training
    assert "perplexity.tuned" in metrics_diff["metrics/eval.json"]
    # the base model is the same in both runs and evaluation (bootstrap included) is deterministic: no base metric
    # or base interval moves (exact: the same computation on this machine with the same params and thread count)
    # (tuned_vs_sft's "base" is the SFT model, which lora.r moves)
    moved_base = [k for k in metrics_diff["metrics/eval.json"] if ".base" in k and not k.startswith("tuned_vs_sft.")]
    assert not moved_base, metrics_diff

    with timed("dvc exp run --queue -S lora.r=4 + queue start + wait"):
        dvc(project, "exp", "run", "--queue", "-n", "lora-r4", "-S", "lora.r=4", cwd=dest)
        dvc(project, "queue", "start", cwd=dest)
        try:
            deadline = time.monotonic() + 300
            while True:
                status = dvc(project, "queue", "status", cwd=dest).stdout
                line = next((ln for ln in status.splitlines() if "lora-r4" in ln), "")
                if "Success" in line or "Failed" in line or time.monotonic() > deadline:
                    break
                time.sleep(2)
            assert "Success" in line, (
                status + dvc(project, "queue", "logs", "lora-r4", cwd=dest, check=False).stdout[-4000:]
            )
        finally:
            dvc(project, "queue", "stop", cwd=dest, check=False)

    raw = dvc(project, "exp", "show", "--json", cwd=dest).stdout
    assert "adam_beta1" not in raw  # no TrainingArguments dump (dvclive's params.yaml) among the params
    experiments = _experiments(json.loads(raw))
    for name, rank in (("lora-r8", 8), ("lora-r4", 4)):
        assert name in experiments, sorted(experiments)
        data = experiments[name]["data"]
        assert set(data["params"]) == {"params.yaml"}, set(data["params"])
        assert data["params"]["params.yaml"]["data"]["lora"]["r"] == rank
        assert set(data["metrics"]) == {"metrics/headline.json"}, set(data["metrics"])
        assert set(data["metrics"]["metrics/headline.json"]["data"]) == {"ppl", "rougeL", "cq"}

    csv = dvc(project, "exp", "show", "--csv", cwd=dest).stdout
    header = csv.splitlines()[0].split(",")
    assert {"lora.r", "ppl.tuned", "rougeL.tuned", "cq.tuned"} <= set(header), header
    assert "adam_beta1" not in csv

    # a bad value stops at the params stage, before DVC deletes any output (models/base was removed by
    # `-S model.name=does/not-exist` when the base stage itself found the problem)
    base_files = sorted(p.name for p in (dest / "models/base").iterdir())
    failed = dvc(project, "exp", "run", "-S", "model.name=./no-such-model", cwd=dest, check=False)
    assert failed.returncode != 0
    assert "model.name './no-such-model' is neither a local directory nor a hub id" in failed.stdout + failed.stderr
    assert sorted(p.name for p in (dest / "models/base").iterdir()) == base_files
