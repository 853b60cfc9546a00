"""`expqa pull`'s pieces that need no DVC repository (the pull itself: tests/pipeline/test_dvc_workflow.py)."""

import pytest

from expqa.workspace.pull import remote_argument


@pytest.mark.parametrize(
    ("argv", "remote"),
    [
        ([], None),
        (["models/adapter", "-j", "4"], None),
        (["-r", "storage"], "storage"),
        (["-rstorage", "models/base"], "storage"),
        (["--remote", "storage"], "storage"),
        (["--remote=storage"], "storage"),
        (["-R", "data", "--run-cache"], None),
    ],
)
def test_the_remote_is_read_from_dvc_pull_arguments(argv, remote):
    assert remote_argument(argv) == remote
