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

    def split(self, name: str) -> torch.Tensor:
        if name not in ("train", "val"):
            raise ValueError(f"split: expected 'train' or 'val', got {name!r}")
        return self.train if name == "train" else self.val

    def random_starts(self, split: str, count: int, batch_size: int, seq_len: int,
                      generator: torch.Generator) -> torch.Tensor:
        """Start offsets ``[count, batch_size]`` of random windows of ``seq_len + 1`` characters."""
        n = self.split(split).numel()
        if n <= seq_len + 1:
            raise ValueError(f"seq_len: {seq_len} is too long for the {split} split ({n} characters)")
        return torch.randint(0, n - seq_len - 1, (count, batch_size), generator=generator)

    @staticmethod
    def windows(data: torch.Tensor, starts: torch.Tensor, seq_len: int):
        """Inputs ``[B, S]`` and next-character targets ``[B, S]`` at ``starts [B]``, on data's device."""
        offsets = torch.arange(seq_len + 1, device=data.device)
        chunk = data[starts[:, None] + offsets[None, :]]
        return chunk[:, :-1], chunk[:, 1:]

    def batch(self, split: str, batch_size: int, seq_len: int, generator: torch.Generator):
        """One batch of random windows: inputs ``[B, S]`` and targets ``[B, S]``."""
        starts = self.random_starts(split, 1, batch_size, seq_len, generator)[0]
        return self.windows(self.split(split), starts, seq_len)


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
