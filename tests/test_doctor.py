"""`transformer doctor` passes a sound checkpoint and catches a model that breaks its promises."""

from __future__ import annotations

from pathlib import Path

import pytest

from transformer.cli import main
from transformer.doctor import run_checks
from transformer.model import transformer as transformer_module


def test_a_trained_checkpoint_passes(run_dir: Path, capsys) -> None:
    assert main(["doctor", "--checkpoint", str(run_dir)]) == 0
    table = capsys.readouterr().out
    assert "FAIL" not in table and table.count("pass") == 8


def test_a_decoder_that_sees_the_future_fails(run_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(transformer_module, "causal_masking", lambda *args, **kwargs: (None, False))
    failed = {c.name for c in run_checks(run_dir) if c.status == "FAIL"}
    assert {"decoder cannot see future tokens", "cached == full decoding"} <= failed
    assert main(["doctor", "--checkpoint", str(run_dir)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {len(failed)} check(s) failed")
