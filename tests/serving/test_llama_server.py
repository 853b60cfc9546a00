"""`expqa llama-serve`: what stops it is one line before llama.cpp loads anything (serving itself is tested with the
generate stage, tests/data/test_teacher_endpoint.py)."""

from __future__ import annotations

import re
import socket

from expqa.serving.llama_server import main, model_id


def test_a_missing_file_is_one_line(tmp_path, capsys):
    assert main([str(tmp_path / "none.gguf")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path / 'none.gguf'} is not a file; export one with `dvc repro export` (models/gguf)\n"


def test_a_port_in_use_is_one_line(tmp_path, capsys):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main([str(gguf), "--port", str(port)]) == 2
    assert capsys.readouterr().err == f"error: port {port} on 127.0.0.1 is in use; pick another with --port\n"


def test_the_model_id_changes_with_the_file_s_bytes(tmp_path):
    """The generate stage's answer cache is keyed by this id: a re-exported file must get another one."""
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF v1")
    first = model_id(gguf)
    gguf.write_bytes(b"GGUF v2")
    assert re.fullmatch(r"m\.gguf@[0-9a-f]{12}", first) and model_id(gguf) != first
