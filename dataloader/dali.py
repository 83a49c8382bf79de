"""DALI backend of the clip loader: JPEG (or VP8/VP9 video) decoding on the GPU (SPEC §4).

One DALI sample is one *segment* of a clip: its RGB frame and its stack of L flow_x / L
flow_y frames. A batch of B clips is therefore B·K samples, so each of the 1 + 2L image
decoders decodes a flat batch of B·K images whatever K is (K = 25 at test would otherwise
need 25 + 250 decoder instances, each with its own nvJPEG padding buffers).

A parallel batch-mode ``fn.external_source`` (``dali_sources.ClipSource``, run in DALI's
Python worker processes) does everything that is not pixels: the epoch's batches, the clip
plans, the encoded bytes and their checks, and the crop box, flip and flow normalisation as
per-sample arguments. The graph here decodes (``device="mixed"`` on a GPU, CPU otherwise),
cuts the crop with ``fn.slice`` (so the resize clamps at the crop's edges as cv2 does on the
cropped patch), resizes and flips in one ``fn.resize`` whose region of interest runs from
x = w to 0 when flipped, concatenates the flow planes in TSN order x1, y1, …, xL, yL and
normalises.

Batch mode lets the last batch of an evaluation epoch be smaller (DALI silently drops a
partial batch of a per-sample source) and lets skip_bad drop a clip from its batch (a batch
left with no clip carries a placeholder the loader drops: DALI refuses empty batches).

Bad input is a one-line CCSError: the source's own checks travel back in DALI's error text;
a file that passes them but fails in DALI's decoder is found by re-checking that batch's
files with cv2 in the main process. The failed pipeline and its workers are shut down; with
skip_bad the video is excluded and a new pipeline resumes at the same batch.

Outputs are (B·K, S, S, C) per stream; they are copied into torch tensors (DALI owns its
buffers until the next run) and viewed as (B, K, C, S, S), channels_last after
``flatten(0, 1)``. 3-D clips and test views need nothing else: a 3-D clip's N·T frames are
its samples (one flow pair each), and with V test crops a clip's samples are its V views one
after another, each with its own crop box and flip (``clip_plan.view_plans``), viewed as
(B·V, P, C, S, S) at the end like the torch backend's batch. Pixels agree with the torch
backend up to resize rounding (±1 level before normalisation; tests/dataloader/test_dali.py).
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from ccs_fast.base.errors import CCSError, bad_file

from ccs_fast.base.distributed import cores_per_process, dist_env

from .dali_sources import ClipSource, check_dali_codec, video_codec
from .formats import default_num_classes
from .rawframes import load_records
from .batch_samplers import batch_sampler_for
from .transforms import IMAGENET_MEAN, IMAGENET_STD

PIPELINE_PREFETCH = 2  # batches DALI's pipeline runs ahead (its default)

# DALI reports a worker's exception with its traceback; this pulls our one line back out.
_CCS_ERROR_IN_TRACEBACK = re.compile(r"CCSError: (.+)")
_DECODE_FAILURE = re.compile(r"Failed to decode sample #(\d+)")


# -- the pipeline ---------------------------------------------------------------------
def build_dali_pipeline(source: ClipSource, *, batch_size, device_id, num_threads,
                        py_num_workers, dtype):
    """The DALI pipeline of ``source``: outputs rgb, flow, label, index (one sample/segment).

    ``device_id=None`` builds a CPU-only pipeline (CPU decoders); otherwise decoding is
    ``device="mixed"`` and the pixel ops run on the GPU.
    """
    from nvidia.dali import fn, pipeline_def, types

    opts = source.spec
    on_gpu = device_id is not None
    graph = _ClipGraph(decoder="mixed" if on_gpu else "cpu",
                       out_type=types.FLOAT16 if dtype == torch.float16 else types.FLOAT,
                       size=[opts.input_size, opts.input_size])
    num_rgb_outputs = 3 if opts.modality == "video" else 1  # video: bytes, frame index, the flow's (h, w)
    # fork is only safe before the process holds a CUDA context (DALI's or torch's)
    start_method = "spawn" if on_gpu else "fork"

    @pipeline_def(batch_size=batch_size * opts.samples_per_video, num_threads=num_threads,
                  device_id=device_id, py_num_workers=py_num_workers,
                  py_start_method=start_method, prefetch_queue_depth=PIPELINE_PREFETCH)
    def clip_pipeline():
        outputs = fn.external_source(
            source, num_outputs=num_rgb_outputs + 2 * opts.flow_length + 8, batch=True, batch_info=True,
            parallel=True, prefetch_queue_depth=max(2, py_num_workers),
        )
        rgb_inputs, flows = outputs[:num_rgb_outputs], outputs[num_rgb_outputs:-8]
        anchor, shape, roi_start, roi_end, flow_mean, flow_std, label, index = outputs[-8:]
        crop = (anchor, shape, roi_start, roi_end)
        return graph.rgb(rgb_inputs, crop), graph.flow(flows, crop, flow_mean, flow_std), label, index

    return clip_pipeline()


class _ClipGraph:
    """The pixel operators of ``build_dali_pipeline``: decode, crop, resize-and-flip,
    normalise (module docstring), on ``decoder`` ("mixed" or "cpu") to ``out_type``."""

    def __init__(self, *, decoder, out_type, size):
        self.decoder, self.out_type, self.size = decoder, out_type, size

    def crop_resize(self, image, crop):
        from nvidia.dali import fn, types

        anchor, shape, roi_start, roi_end = crop
        image = fn.slice(image, anchor, shape, axis_names="HW")
        return fn.resize(image, size=self.size, roi_start=roi_start, roi_end=roi_end,
                         interp_type=types.INTERP_LINEAR, antialias=False)

    def rgb(self, inputs, crop):
        """One RGB frame per sample: a JPEG, or (video bytes, frame index, the flow's (h, w))."""
        from nvidia.dali import fn, types

        if len(inputs) == 3:
            encoded, frame, flow_size = inputs
            decoded = fn.decoders.video(encoded, frames=frame, device=self.decoder)
            decoded = fn.resize(decoded, size=flow_size, interp_type=types.INTERP_LINEAR,
                                antialias=False)
            rgb, layout = self.crop_resize(decoded, crop), "FHWC"
        else:
            rgb = self.crop_resize(fn.decoders.image(inputs[0], device=self.decoder, output_type=types.RGB), crop)
            layout = "HWC"
        return fn.crop_mirror_normalize(
            rgb, dtype=self.out_type, output_layout=layout,
            mean=(255.0 * IMAGENET_MEAN).tolist(), std=(255.0 * IMAGENET_STD).tolist(),
        )

    def flow(self, encoded_planes, crop, flow_mean, flow_std):
        """The 2L flow planes of a sample stacked on the channel axis, normalised per plane."""
        from nvidia.dali import fn, types

        planes = [self.crop_resize(fn.decoders.image(encoded, device=self.decoder, output_type=types.GRAY), crop)
                  for encoded in encoded_planes]
        return fn.crop_mirror_normalize(fn.cat(*planes, axis=2), dtype=self.out_type, output_layout="HWC",
                                        mean=flow_mean, std=flow_std)


# -- the loader -----------------------------------------------------------------------
class DALILoader:
    """Epochs of clip batches from a DALI pipeline (see the module docstring).

    ``set_epoch(e)`` picks the clips of epoch ``e``; the pipeline is built on the first
    ``__iter__`` and rebuilt only when the epochs are not consecutive (its worker processes
    hold a copy of the source, which counts DALI's epochs from the epoch it was built for).
    ``num_skipped`` counts the clips dropped as bad input with skip_bad (a bad video each
    time it is drawn); ``skipped_errors`` holds {annotation row: message} of those videos.
    """

    def __init__(self, source: ClipSource, *, batch_size, device, dtype, num_threads,
                 py_num_workers, num_classes, skipped=None, frame_count=None):
        self.source = source
        self.batch_size = batch_size
        self.device = device
        self.dtype = dtype
        self.num_threads = num_threads
        self.py_num_workers = py_num_workers
        self.num_videos = len(source.records)  # usable videos (bad ones dropped with skip_bad)
        self.num_classes = num_classes
        self.skipped_errors: dict[int, str] = dict(skipped or {})  # the list's bad videos first
        self.num_skipped = len(self.skipped_errors)
        self.frame_count = frame_count  # rawframes.FrameCount of the list
        self.epoch = 0
        self.first_batch = self.batches_done = 0
        self._pipe = None
        self._pipe_epoch = None  # the epoch the pipeline's next DALI epoch will produce

    def set_epoch(self, epoch: int, first_batch: int = 0) -> None:
        """Epoch ``epoch``'s batches from its batch ``first_batch`` on (a mid-epoch resume:
        the pipeline starts at that batch)."""
        self.epoch = int(epoch)
        self.first_batch = self.batches_done = int(first_batch)

    def __len__(self) -> int:
        return len(self.source.sampler)

    def __iter__(self):
        epoch = self.epoch
        batches = self.source.epoch_batches(epoch)
        if not batches:
            return
        first, self.first_batch = self.first_batch, 0
        self._ensure_pipeline(epoch, first_batch=first)
        finished = False
        try:
            iteration = self.batches_done = first
            while iteration < len(batches):
                try:
                    outputs = self._pipe.run()
                except StopIteration:
                    raise RuntimeError(f"DALI ended epoch {epoch} after {iteration} of "
                                       f"{len(batches)} batches") from None
                except Exception as exc:  # DALI reports worker and decoder errors this way
                    self.close()
                    error, bad_video = self._explain(exc, epoch, iteration)
                    if not (self.source.spec.skip_bad and bad_video is not None):
                        raise error from None
                    # the decoder rejected a file the source's checks let through: drop the
                    # video for good and restart the pipeline at this batch
                    self.source.excluded.add(bad_video)
                    self.skipped_errors[self.source.rows[bad_video]] = str(error)
                    self._ensure_pipeline(epoch, first_batch=iteration)
                    continue
                batch = self._to_torch(*outputs)
                self.num_skipped += len(batches[iteration]) - len(batch["index"])
                if len(batches[iteration]) > len(batch["index"]):
                    self._note_skipped(batches[iteration], batch["index"], epoch)
                iteration += 1
                self.batches_done = iteration
                if len(batch["index"]):
                    yield batch
            try:
                self._pipe.run()
            except StopIteration:  # the source's StopIteration closes DALI's epoch
                pass
            else:
                raise RuntimeError(f"DALI produced more than {len(batches)} batches in "
                                   f"epoch {epoch}")
            self._pipe.reset()
            self._pipe_epoch = epoch + 1
            finished = True
        finally:
            if not finished:
                self.close()

    def _note_skipped(self, positions, rows_in_batch, epoch: int) -> None:
        """Record why the clips missing from a batch were dropped: the source's checks ran
        in DALI's worker processes, so they are run again here for those clips only."""
        present = set(int(r) for r in rows_in_batch.tolist())
        for index in positions:
            row = self.source.rows[index]
            if row in present or row in self.skipped_errors:
                continue
            try:
                self.source.read_clip(index, epoch)
            except CCSError as exc:
                self.skipped_errors[row] = str(exc)

    def close(self) -> None:
        """Shut the pipeline and its worker processes down (rebuilt on the next epoch)."""
        pipe, self._pipe, self._pipe_epoch = self._pipe, None, None
        if pipe is not None:
            pipe._shutdown()  # noqa: SLF001 - DALI's own __del__; frees decoders now, not at GC
        del pipe

    def _ensure_pipeline(self, epoch: int, first_batch: int = 0) -> None:
        if self._pipe is not None and self._pipe_epoch == epoch and not first_batch:
            return
        self.close()
        # DALI's epoch_idx and iteration restart at 0 in a new pipeline
        self.source.epoch_base, self.source.iteration_base = epoch, first_batch
        pipe = build_dali_pipeline(
            self.source, batch_size=self.batch_size,
            device_id=self.device.index if self.device.type == "cuda" else None,
            num_threads=self.num_threads, py_num_workers=self.py_num_workers,
            dtype=self.dtype,
        )
        pipe.build()
        self._pipe, self._pipe_epoch = pipe, epoch

    def _to_torch(self, rgb, flow, label, index) -> dict:
        spec = self.source.spec
        k, views = spec.samples_per_video, spec.views
        rows = np.asarray(index.as_tensor())[::k]
        n = len(rows)
        size = spec.input_size
        # (B·V·P, S, S, C) samples, views of a clip contiguous -> (B·V, P, C, S, S)
        rgb = self._copy(rgb).view(n * views, spec.positions, size, size, 3).permute(0, 1, 4, 2, 3)
        flow = self._copy(flow)
        flow = flow.view(n * views, spec.positions, size, size, flow.shape[-1]).permute(0, 1, 4, 2, 3)
        label = torch.from_numpy(np.asarray(label.as_tensor())[::k].copy())
        if rows[0] < 0:  # the placeholder of a batch whose clips were all skipped
            rgb, flow, label, rows = rgb[:0], flow[:0], label[:0], rows[:0]
        batch = {"rgb": rgb, "flow": flow,
                 "label": label.to(self.device, non_blocking=True),
                 "index": torch.from_numpy(rows.copy()).to(self.device, non_blocking=True)}
        if views > 1:
            batch["views"] = views
        return batch

    def _copy(self, tensor_list) -> torch.Tensor:
        """A torch copy of a DALI output (DALI reuses its buffers on the next run)."""
        from nvidia.dali.plugin.pytorch import feed_ndarray

        dense = tensor_list.as_tensor()
        native = torch.float16 if self.dtype == torch.float16 else torch.float32
        out = torch.empty(dense.shape(), dtype=native, device=self.device)
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        feed_ndarray(dense, out, cuda_stream=stream)
        return out if native == self.dtype else out.to(self.dtype)

    def _explain(self, exc: Exception, epoch: int, iteration: int):
        """(error to raise, video position to blame or None) for a DALI failure: the
        one-line CCSError behind it, or the DALI error itself."""
        text = str(exc)
        found = _CCS_ERROR_IN_TRACEBACK.search(text)
        if found:
            return CCSError(found.group(1).strip()), None
        found = _DECODE_FAILURE.search(text)
        if found:
            return self._undecodable(epoch, iteration, int(found.group(1)))
        return exc, None

    def _undecodable(self, epoch: int, iteration: int, sample: int):
        """(CCSError naming the file, video position) of DALI's "Failed to decode sample #i"."""
        import cv2

        source, opts = self.source, self.source.spec
        segments = []  # (video position, segment) of every DALI sample of the batch
        for index in source.epoch_batches(epoch)[iteration]:
            if source.try_read_clip(index, epoch) is not None:
                segments.extend((index, k % opts.positions) for k in range(opts.samples_per_video))
        if not 0 <= sample < len(segments):
            return CCSError(f"DALI failed to decode sample {sample} of batch {iteration} "
                            f"of epoch {epoch}"), None
        index, k = segments[sample]
        plan, info = source.plan(index, epoch)
        if opts.modality == "video":
            return bad_file(info["video"], f"DALI cannot decode frame {plan.frame_indices[k]} "
                                           "(its CPU decoder reads VP8, VP9 and MJPEG only)"), index
        folder = source.frames_dir(index)
        offset = source.records[index].offset
        paths = [opts.naming.rgb(folder, offset + plan.frame_indices[k])]
        for t in plan.flow_indices[k]:
            paths += list(opts.naming.flow(folder, offset + t))
        for path in paths:
            if cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_UNCHANGED) is None:
                return bad_file(path, "cannot decode (corrupt JPEG data)"), index
        return bad_file(folder, f"DALI could not decode segment {k}"), index


def _resolve_device(device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", dist_env().local_rank)
    return device


def build_dali_loader(spec) -> DALILoader:
    """``build_loader(spec)`` for ``spec.backend == "dali"``: ``device="cpu"`` runs a
    CPU-only pipeline, ``"cuda"`` decodes on ``cuda:LOCAL_RANK``."""
    check = None
    if spec.modality == "video":  # a codec DALI cannot decode: refused (or skipped) up front
        on_gpu = torch.device(spec.device).type == "cuda"

        def check(record):
            path = Path(spec.data_root) / record.path
            check_dali_codec(path, video_codec(path), on_gpu)
    records, rows, skipped, flow_root, count = load_records(spec, check)
    labels = [record.label for record in records]
    source = ClipSource(records, rows, spec, flow_root, batch_sampler_for(spec, labels))
    num_threads = spec.num_workers or cores_per_process()
    return DALILoader(source, batch_size=spec.batch_size, device=_resolve_device(spec.device),
                      dtype=spec.dtype, num_threads=num_threads,
                      py_num_workers=max(1, min(4, num_threads)),
                      num_classes=spec.num_classes if spec.num_classes is not None
                      else default_num_classes(labels),
                      skipped=skipped, frame_count=count)
