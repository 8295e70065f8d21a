"""The calibration samples a recovery pass holds in memory, since it runs over them many times
(reconstruct's waves, finetune's steps); finetune reads them here too."""

from __future__ import annotations

from collections.abc import Iterable

from onnx_squeeze.calibration.service import Calibration
from onnx_squeeze.calibration.sources import Feed
from onnx_squeeze.errors import InputError


def held_samples(
    data: Calibration,
    samples: int,
    purpose: str,
    notes: list[str],
    source: Iterable[Feed] | None = None,
) -> list[Feed]:
    """Up to ``samples`` samples of the run's calibration data (or of ``source``, the same data
    read another way, such as with labels) as feeds; ``purpose`` names the job in the notes,
    which warn when the data is random."""
    if data.is_random and not data.supplied:
        notes.append(
            f"WARNING: no calibration data given; {purpose} used RANDOM inputs, which rarely "
            "helps on real data: pass calibration data (--calib)"
        )
    elif data.is_random:
        notes.append(f"WARNING: the calibration data is random: {purpose} is a smoke test")
    feeds: list[Feed] = []
    count = 0
    for feed in data if source is None else source:
        feeds.append(dict(feed))
        count += len(next(iter(feed.values())))
        if count >= samples:
            break
    if not feeds:
        raise InputError(f"{purpose}: the calibration data {data.label} yielded no batches")
    notes.append(f"calibration: {count} samples in {len(feeds)} batches from {data.label}")
    return feeds
