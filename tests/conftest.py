"""Shared fixtures: a small slice of the bundled corpus, written as plain text files."""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import ModuleType

import pytest
import torch

from transformer.config import TrainConfig, TransformerConfig
from transformer.data.corpus import read_lines
from transformer.data.tokenizer import PAD_ID
from transformer.train import train

BUNDLED = Path(__file__).resolve().parent.parent / "data" / "multi30k"

# A Transformer small enough for exact reference comparisons in milliseconds.
TINY = TransformerConfig(
    src_vocab_size=50,
    tgt_vocab_size=60,
    d_model=32,
    n_heads=4,
    d_ff=64,
    n_encoder_layers=2,
    n_decoder_layers=2,
    dropout=0.0,
    max_len=64,
    tie_output=False,
)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200 training pairs, 20 validation and 20 test pairs from the bundled corpus, as plain text."""
    out = tmp_path_factory.mktemp("multi30k-slice")
    for split, source, n in (("train", "train", 200), ("val", "val", 20), ("test2016", "test2016", 20)):
        for lang in ("de", "en"):
            lines = read_lines(BUNDLED / f"{source}.{lang}.gz")[:n]
            (out / f"{split}.{lang}").write_text("\n".join(lines) + "\n")
    return out


TINY_MODEL = {"d_model": 32, "n_heads": 2, "d_ff": 64, "n_encoder_layers": 1, "n_decoder_layers": 1}


def tiny_recipe(data_dir: Path, **changes) -> TrainConfig:
    settings = {
        "data_dir": str(data_dir),
        "vocab_size": 400,
        "max_tokens": 600,
        "warmup": 10,
        "lr_factor": 2.0,
        "max_steps": 30,
        "eval_every": 15,
        "time_budget_minutes": 0.0,
        "average_last": 2,
        "beam": 2,
        "log_every": 5,
        "max_len": 64,
        "seed": 3,
    }
    return TrainConfig(**{**settings, **changes})


@pytest.fixture(scope="session")
def run_dir(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run")
    train(tiny_recipe(data_dir), TINY_MODEL, out)
    return out


def dev_dependency(name: str) -> ModuleType:
    """A module of the `dev` extra (a reference the tests hold our code to): skipped where it is not
    installed, but in CI (`CI` set, as .ci/run sets it) its absence fails, so a broken install cannot
    quietly skip the comparison."""
    if os.environ.get("CI"):
        return importlib.import_module(name)
    return pytest.importorskip(name)


def padded_projection_case() -> tuple[torch.Tensor, torch.nn.Linear, torch.Tensor]:
    """(hidden (3, 7, 16) with gradients, a projection onto 50 words, targets with padded tails): the
    loss's projection tests, on the CPU and on CUDA."""
    torch.manual_seed(0)
    hidden = torch.randn(3, 7, 16, requires_grad=True)
    projection = torch.nn.Linear(16, 50)
    target = torch.randint(4, 50, (3, 7))
    target[0, 5:] = PAD_ID
    target[2, 2:] = PAD_ID
    return hidden, projection, target
