"""Character-level corpus for the demo: public-domain Shakespeare shipped with the package (see data/README.md)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

DATA_DIR = Path(__file__).resolve().parent / "data"
DEFAULT_CORPUS = DATA_DIR / "shakespeare.txt"


@dataclass
class Corpus:
    """A text encoded as character ids, split into a training part and a held-out validation tail."""

    chars: str  # the vocabulary: id i is chars[i]
    train: torch.Tensor  # int64 [N_train]
    val: torch.Tensor  # int64 [N_val]
    source: str

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def batch(self, split: str, batch_size: int, seq_len: int, generator: torch.Generator):
        """Random windows of seq_len + 1 characters: inputs [B, S] and next-character targets [B, S]."""
        data = self.train if split == "train" else self.val
        if data.numel() <= seq_len + 1:
            raise ValueError(f"seq_len: {seq_len} is too long for the {split} split ({data.numel()} characters)")
        starts = torch.randint(0, data.numel() - seq_len - 1, (batch_size,), generator=generator)
        offsets = torch.arange(seq_len + 1)
        windows = data[starts[:, None] + offsets[None, :]]
        return windows[:, :-1], windows[:, 1:]


def load_corpus(path: str | Path | None = None, val_fraction: float = 0.1) -> Corpus:
    """Reads a UTF-8 text (default: the shipped Shakespeare) and splits off the last val_fraction for validation.

    The split is contiguous rather than random so that validation text is never seen during training."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction: expected a value in (0, 1), got {val_fraction}")
    path = Path(path) if path is not None else DEFAULT_CORPUS
    if not path.is_file():
        raise FileNotFoundError(f"corpus: {path} does not exist")
    text = path.read_text(encoding="utf-8")
    chars = "".join(sorted(set(text)))
    if len(text) < 1000:
        raise ValueError(f"corpus: {path} has only {len(text)} characters; the demo needs at least 1000")
    index = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.int64)
    n_val = max(int(len(ids) * val_fraction), 1)
    return Corpus(chars=chars, train=ids[:-n_val], val=ids[-n_val:], source=str(path))
