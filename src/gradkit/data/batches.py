"""In-memory mini-batching of tensors (faster than a DataLoader for small data sets)."""
from __future__ import annotations

from typing import Iterator

import torch


class TensorBatches:
    """Iterate over aligned tensors in mini-batches; reshuffled on every iteration.

    >>> x, y = torch.randn(10, 3), torch.arange(10)
    >>> [len(b[0]) for b in TensorBatches(x, y, batch_size=4, shuffle=False)]
    [4, 4, 2]
    """

    def __init__(
        self,
        *tensors: torch.Tensor,
        batch_size: int,
        shuffle: bool = True,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
    ) -> None:
        if not tensors:
            raise ValueError("TensorBatches needs at least one tensor")
        n = len(tensors[0])
        for i, t in enumerate(tensors):
            if len(t) != n:
                raise ValueError(f"tensor #{i} has {len(t)} rows, expected {n} like tensor #0")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.tensors = tensors
        self.n = n
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.generator = generator
        self.drop_last = drop_last

    def __len__(self) -> int:
        full, rest = divmod(self.n, self.batch_size)
        return full + (0 if self.drop_last or rest == 0 else 1)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        if self.shuffle:
            idx = torch.randperm(self.n, generator=self.generator).to(self.tensors[0].device)
        else:
            idx = None
        for i in range(len(self)):
            sl = slice(i * self.batch_size, min((i + 1) * self.batch_size, self.n))
            if idx is None:
                yield tuple(t[sl] for t in self.tensors)
            else:
                j = idx[sl]
                yield tuple(t[j] for t in self.tensors)
