"""From text to text: tokenise, batch by length, search, detokenise — and the `Translator` API."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from transformer.checkpoint import checkpoint_path, load_weights
from transformer.config import TrainConfig, TransformerConfig, config_from_dict
from transformer.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer
from transformer.errors import TransformerError
from transformer.model import Transformer
from transformer.search import SearchConfig, generate


def translate_ids(
    model: Transformer,
    sources: Sequence[list[int]],
    search: SearchConfig,
    *,
    max_tokens: int = 6000,
    device: torch.device | str = "cpu",
) -> list[list[int]]:
    """Translate token-id sequences (without EOS), batched by length to waste little on padding; the
    results come back in input order. Empty sources give empty translations without running the model."""
    order = sorted((i for i in range(len(sources)) if sources[i]), key=lambda i: len(sources[i]))
    results: list[list[int]] = [[] for _ in sources]
    # Beam search multiplies the rows by the beam size; the budget counts them.
    rows_per_token = max(search.beam, 1)
    start = 0
    while start < len(order):
        end = start + 1
        longest = len(sources[order[start]]) + 1
        while end < len(order):
            longest = len(sources[order[end]]) + 1
            if (end - start + 1) * longest * rows_per_token > max_tokens:
                break
            end += 1
        chunk = order[start:end]
        width = max(len(sources[i]) for i in chunk) + 1
        src = torch.full((len(chunk), width), PAD_ID, dtype=torch.long)
        for row, i in enumerate(chunk):
            ids = [*sources[i], EOS_ID]
            src[row, : len(ids)] = torch.tensor(ids)
        outputs = generate(
            model,
            src.to(device),
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_id=PAD_ID,
            config=search,
            max_len=model.config.max_len,
        )
        for i, out in zip(chunk, outputs, strict=True):
            results[i] = out
        start = end
    return results


class Translator:
    """A trained model with its tokenizer: `Translator.from_checkpoint(run_dir).translate(["…"], beam=4)`."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, train_config: TrainConfig | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.train_config = train_config or TrainConfig()

    @classmethod
    def from_checkpoint(cls, path: str | Path, name: str = "best", device: str = "cpu") -> Translator:
        """Load a run directory (its `best` weights unless `name` says otherwise) or a .safetensors file
        whose directory holds config.json and tokenizer.model."""
        path = Path(path)
        weights_file = checkpoint_path(path, name)
        run_dir = weights_file.parent
        model_config, train_config = load_run_config(run_dir)
        tokenizer = Tokenizer.load(run_dir / "tokenizer.model")
        model = Transformer(model_config)
        weights = load_weights(weights_file)
        try:
            model.load_state_dict(weights, strict=True)
        except RuntimeError as error:
            first = str(error).strip().splitlines()
            raise TransformerError(
                f"{weights_file} does not fit the model in {run_dir / 'config.json'}: {first[-1].strip()}"
            ) from None
        return cls(model.to(device), tokenizer, train_config)

    def translate(
        self, sentences: Sequence[str], beam: int | None = None, length_penalty: float | None = None
    ) -> list[str]:
        """One translation per sentence, in order; empty or blank sentences give empty strings."""
        tc = self.train_config
        beam = tc.beam if beam is None else beam
        if beam < 1:
            raise TransformerError(f"beam size must be at least 1, got {beam}")
        search = SearchConfig(
            beam=beam, length_penalty=tc.length_penalty if length_penalty is None else length_penalty
        )
        limit = self.model.config.max_len - 1  # room for EOS
        sources = []
        for n, sentence in enumerate(sentences):
            ids = self.tokenizer.encode(sentence.strip()) if sentence.strip() else []
            if len(ids) > limit:
                print(
                    f"warning: sentence {n + 1} has {len(ids)} tokens; truncated to {limit}", file=sys.stderr
                )
                ids = ids[:limit]
            sources.append(ids)
        device = next(self.model.parameters()).device
        outputs = translate_ids(self.model, sources, search, device=device)
        return [self.tokenizer.decode(ids) for ids in outputs]


def load_run_config(run_dir: Path) -> tuple[TransformerConfig, TrainConfig]:
    """Read the configs a training run wrote to run_dir/config.json."""
    path = run_dir / "config.json"
    if not path.is_file():
        raise TransformerError(
            f"{run_dir} has no config.json: is it a run directory written by `transformer train`?"
        )
    try:
        saved = json.loads(path.read_text())
        return (
            config_from_dict(TransformerConfig, saved["model"], source=str(path)),
            config_from_dict(TrainConfig, saved["train"], source=str(path)),
        )
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise TransformerError(f"{path} is not a valid run configuration ({error})") from None
