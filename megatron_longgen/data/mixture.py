"""A deterministic interleaving of datasets by integer ratio (e.g. text and passkey items)."""

from __future__ import annotations

from typing import Sequence


class MixtureDataset:
    """Ratio ``(1, 3)`` reads A B B B A B B B ...; each source is read in order, cyclically."""

    def __init__(self, datasets: Sequence, ratio: Sequence[int], num_samples: int):
        if len(datasets) != len(ratio) or not datasets or min(ratio) < 1:
            raise ValueError("one positive integer ratio per dataset is needed")
        self.datasets, self.num_samples = list(datasets), num_samples
        self.schedule = [(d, k) for d, r in enumerate(ratio) for k in range(r)]
        self.period, self.per_period = len(self.schedule), list(ratio)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, idx: int):
        cycle, slot = divmod(idx, self.period)
        source, k = self.schedule[slot]
        dataset = self.datasets[source]
        return dataset[(cycle * self.per_period[source] + k) % len(dataset)]
