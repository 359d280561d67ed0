"""Loader batches -> device batches, ordered against FFCV's reuse of its host buffers.

FFCV yields views of host buffers that it refills: with batches_ahead = A it cycles A + 2
slots, and once the consumer has taken batch i its thread may refill the slot of batch i - 1
(pinned memory when CUDA exists). So:
- CUDA: each batch is copied on a side stream (non_blocking, from pinned memory), the compute
  stream waits for that copy, and right before the loader is asked for batch i the host waits
  for the copy of batch i - 1 (only that copy, which was queued a whole step earlier: not the
  compute stream). No copy can read a slot that is being refilled, and no step syncs the host
  with the compute stream.
- CPU: no copy; a Batch's tensors are valid until the next batch is requested, which is after
  the step that uses them.
host_indices is always the batch's own copy on the CPU (the teacher cache reads it).
"""
from __future__ import annotations

from typing import Iterable, Iterator, NamedTuple

import torch


class Batch(NamedTuple):
    images: torch.Tensor        # uint8 [B, C, H, W] on the device (channels_last memory from FFCV)
    labels: torch.Tensor        # int64 [B] on the device
    indices: torch.Tensor       # int64 [B] sample indices, on the device
    host_indices: torch.Tensor  # int64 [B] the same, on the CPU
    view: int                   # augmentation epoch of the batch's random views


def device_batches(loader: Iterable, device: torch.device, view: int = 0) -> Iterator[Batch]:
    """(images, labels, indices) host batches of `loader` -> Batch on `device`; `view` is the
    loader's augmentation epoch (BetonLoader.epoch_view)."""
    device = torch.device(device)
    if device.type != "cuda":
        for images, labels, indices in loader:
            yield Batch(images.to(device), labels.to(device).long(), indices.to(device), indices.clone(), view)
        return
    copy_stream, previous_copy = torch.cuda.Stream(device), None
    batches = iter(loader)
    while True:
        if previous_copy is not None:
            previous_copy.synchronize()  # before FFCV may refill the previous batch's slot
        try:
            images, labels, indices = next(batches)
        except StopIteration:
            return
        compute = torch.cuda.current_stream(device)
        with torch.cuda.stream(copy_stream):
            moved = [t.to(device, non_blocking=True) for t in (images, labels, indices)]
            previous_copy = torch.cuda.Event()
            previous_copy.record(copy_stream)
        compute.wait_event(previous_copy)
        for t in moved:
            t.record_stream(compute)  # the allocator must not reuse them before compute is done
        yield Batch(moved[0], moved[1].long(), moved[2], indices.clone(), view)
