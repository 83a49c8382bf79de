"""The synthetic backend (data.backend=synthetic): random clip batches made on the device,
to time compute without I/O.

Batches have the loader contract's shapes, dtype and channels_last layout; labels are
uniform in [0, num_classes). Each (seed, epoch, rank, batch) has its own generator seed, so
an epoch replays exactly and ranks see different data.
"""
from __future__ import annotations

import numpy as np
import torch

from .formats import default_num_classes, read_annotation


def _generator(device, seed, epoch, rank, batch):
    state = np.random.SeedSequence([seed, epoch, rank, batch]).generate_state(2, np.uint32)
    return torch.Generator(device=device).manual_seed(int(state[0]) << 32 | int(state[1]))


class SyntheticLoader:
    def __init__(self, *, batch_size, num_segments, flow_length, input_size, device, seed,
                 rank, num_classes, num_videos, num_batches, dtype):
        self.batch_size, self.num_segments = batch_size, num_segments
        self.flow_channels, self.input_size = 2 * flow_length, input_size
        self.device, self.dtype = torch.device(device), dtype
        self.seed, self.rank = seed, rank
        self.num_classes, self.num_videos = num_classes, num_videos
        self.num_batches = num_batches
        self.epoch = 0
        self.first_batch = self.batches_done = 0
        # the Loader members that only files give meaning to: nothing is read, nothing skipped
        self.num_skipped = 0
        self.skipped_errors: dict[int, str] = {}
        self.frame_count = None

    def set_epoch(self, epoch: int, first_batch: int = 0) -> None:
        """Epoch ``epoch``'s batches from its batch ``first_batch`` on (a mid-epoch resume)."""
        self.epoch = epoch
        self.first_batch = first_batch
        self.batches_done = first_batch

    def __len__(self):
        return self.num_batches

    def close(self) -> None:
        """Nothing to stop: batches are made in this process."""

    def _clips(self, channels, generator):
        b, k, s = self.batch_size, self.num_segments, self.input_size
        x = torch.randn((b, k, s, s, channels), generator=generator, device=self.device,
                        dtype=torch.float32)
        return x.to(self.dtype).permute(0, 1, 4, 2, 3)

    def __iter__(self):
        for i in range(self.first_batch, self.num_batches):
            self.batches_done = i + 1
            generator = _generator(self.device, self.seed, self.epoch, self.rank, i)
            start = (self.rank * self.num_batches + i) * self.batch_size
            yield {
                "rgb": self._clips(3, generator),
                "flow": self._clips(self.flow_channels, generator),
                "label": torch.randint(0, self.num_classes, (self.batch_size,),
                                       generator=generator, device=self.device),
                "index": torch.arange(start, start + self.batch_size, device=self.device)
                % max(self.num_videos, 1),
            }


def build_synthetic_loader(spec) -> SyntheticLoader:
    """``build_loader(spec)`` for ``spec.backend == "synthetic"``: the annotation, when given,
    only supplies num_classes and num_videos; nothing is read from the data root."""
    num_classes, num_videos = spec.num_classes, spec.synthetic_batches * spec.batch_size
    if spec.annotation is not None:
        records = read_annotation(spec.annotation, spec.modality, num_classes, labels=spec.labels)
        num_videos = len(records)
        if num_classes is None:
            num_classes = default_num_classes(r.label for r in records)
    if num_classes is None:
        raise ValueError("the synthetic backend needs num_classes or an annotation file")
    return SyntheticLoader(batch_size=spec.batch_size, num_segments=spec.num_segments,
                           flow_length=spec.flow_length, input_size=spec.input_size,
                           device=spec.device, seed=spec.seed, rank=spec.rank,
                           num_classes=num_classes, num_videos=num_videos,
                           num_batches=spec.synthetic_batches, dtype=spec.dtype)
