"""FFCV decoders for RGBImageField with replayable views (see fullrange.data.views).

FFCV hands a decoder `batch_indices`: the row numbers of the samples in this batch, which are
the samples' 'index' field. The decoder hashes (seed, epoch, row) into the view, so the view
does not depend on batch size, worker count or world size.

Two pieces:
- a per-loader `decode` closure (compiled by FFCV's pipeline compiler, serial) that reads each
  sample's field metadata and locates its bytes (page cache or process cache), and
- one module-level numba kernel, parallel over the batch with the loader's worker threads, that
  decodes (JPEG via libjpeg-turbo's TurboJPEG API with the accurate integer IDCT and fancy
  upsampling: the same pixels as PIL; raw pixels are used in place), then crops, resizes and
  mirrors with fullrange.data.resample (antialiased bilinear, as PIL / torchvision).
Only the thin closure is compiled per loader; the kernel is compiled once per process.

The epoch reaches the compiled code through a one-element int64 array owned by the decoder:
numba freezes array *contents* captured by a closure, so the closure captures the array's
address and reads it at every batch (`_load_i64`). `set_epoch` writes it; BetonLoader writes it
before every iteration, so the view epoch is the ordering epoch.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
from llvmlite import ir
from numba import carray, get_num_threads, njit, prange, types
from numba.extending import intrinsic
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.operation import Operation

from .hashing import view_key
from .resample import RESAMPLE_VERSION, resize_crop_into
from .views import (DEFAULT_CROP_RATIO, DEFAULT_RATIO, DEFAULT_SCALE, RRC_VERSION, center_one,
                    check_scale_ratio, rrc_one)

RGB_FIELDS = ("mode", "width", "height", "data_ptr")
MODE_JPG = 0  # RGBImageField's storage mode of a JPEG sample (1: raw pixels)
_VIEW_RRC = 0
_VIEW_CENTER = 1


TJPF_RGB = 0  # libjpeg-turbo's pixel format code for packed RGB


def _turbojpeg():
    """ctypes handles on libjpeg-turbo's TurboJPEG API (the library ffcv itself links), with
    integer argument types so numba can pass raw addresses: (init, decompress, destroy)."""
    import ctypes.util

    names = [ctypes.util.find_library("turbojpeg"), "libturbojpeg.so.0", "libturbojpeg.so"]
    lib = None
    for name in filter(None, names):
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    if lib is None:
        raise ImportError("libturbojpeg not found (Debian/Ubuntu: apt-get install "
                          "libturbojpeg0-dev; it is also what ffcv builds against)")
    u64, c_int = ctypes.c_uint64, ctypes.c_int
    init = lib.tjInitDecompress
    init.argtypes, init.restype = [], u64
    dec = lib.tjDecompress2  # handle, jpeg, jpeg size, dst, width, pitch, height, format, flags
    dec.argtypes = [u64, u64, ctypes.c_ulong, u64, c_int, c_int, c_int, c_int, c_int]
    dec.restype = c_int
    destroy = lib.tjDestroy
    destroy.argtypes, destroy.restype = [u64], c_int
    return init, dec, destroy


_tj_init, _tj_decompress, _tj_destroy = _turbojpeg()


@intrinsic
def _load_i64(typingctx, address):
    """Read the int64 stored at an integer address (no copy, no freezing)."""
    if not isinstance(address, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        ptr = builder.inttoptr(args[0], ir.IntType(64).as_pointer())
        return builder.load(ptr)

    return types.int64(address), codegen


@intrinsic
def _store_i64(typingctx, address, value):
    """Write an int64 at an integer address."""
    if not isinstance(address, types.Integer) or not isinstance(value, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        ptr = builder.inttoptr(args[0], ir.IntType(64).as_pointer())
        v = context.cast(builder, args[1], signature.args[1], types.int64)
        builder.store(v, ptr)
        return context.get_dummy_value()

    return types.none(address, value), codegen


@intrinsic
def _u8_pointer(typingctx, address):
    """An integer address as a uint8 pointer (for numba.carray)."""
    if not isinstance(address, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], ir.IntType(8).as_pointer())

    return types.CPointer(types.uint8)(address), codegen


@njit(nogil=True)
def _decode_one(k, addrs, sizes, modes, heights, widths, indices, view, seed, epoch, scale_min,
                scale_max, ratio_min, ratio_max, crop_ratio, flip, out, status, scratch, tj):
    """One sample into out[k]. scratch: a uint8 buffer of >= H * W * 3 bytes that the caller
    keeps alive across this call (the native call only sees its address); tj: a TurboJPEG
    decompressor handle owned by the calling thread."""
    hgt = np.int64(heights[k])
    wid = np.int64(widths[k])
    mirror = False
    if view == _VIEW_RRC:
        key = view_key(seed, epoch, np.uint64(indices[k]))
        top, left, h, w, fl = rrc_one(key, hgt, wid, scale_min, scale_max, ratio_min, ratio_max)
        mirror = fl and flip
    else:
        top, left, h, w = center_one(hgt, wid, crop_ratio)
    status[k] = 0
    if modes[k] != MODE_JPG:  # raw pixels, in place in the page cache / process cache
        resize_crop_into(carray(_u8_pointer(addrs[k]), (hgt, wid, 3)), top, left, h, w, out[k],
                         mirror)
        return
    if tj == 0:
        status[k] = -1
    else:
        status[k] = _tj_decompress(tj, addrs[k], sizes[k], scratch.ctypes.data, wid, 0, hgt,
                                   TJPF_RGB, 0)
    if status[k] != 0:
        out[k] = 0
        return
    # read the decoded pixels through the array itself, not through its raw address: LLVM may
    # move loads through an integer-derived pointer across the decoder call (seen: stale pixels)
    image = scratch[:hgt * wid * 3].reshape((hgt, wid, 3))
    resize_crop_into(image, top, left, h, w, out[k], mirror)


@njit(parallel=True, nogil=True)
def _decode_views(addrs, sizes, modes, heights, widths, indices, options, seed, epoch, scale_min,
                  scale_max, ratio_min, ratio_max, crop_ratio, out, status, scratch_bytes):
    """Decode + crop + resize (+ mirror) a batch into out uint8 [n, OH, OW, 3] on the loader's
    threads. options: int64 [view (0 rrc, 1 centre), flip (0/1)] (an array, not constants:
    numba's parallel lowering fails on literal-typed arguments). status[k]: libjpeg-turbo's
    return code (0 = fine; the image is left black otherwise). Samples are dealt round-robin
    to 4 chunks per thread; each chunk owns one scratch buffer (scratch_bytes: the largest
    JPEG of the batch decoded), alive until the chunk is done, and one decompressor handle."""
    n = len(addrs)
    view = options[0]
    flip = options[1] != 0
    chunks = min(n, 4 * get_num_threads())
    for c in prange(chunks):
        scratch = np.empty(max(scratch_bytes, 1), np.uint8)
        tj = _tj_init() if scratch_bytes > 0 else np.uint64(0)
        for k in range(c, n, chunks):
            _decode_one(k, addrs, sizes, modes, heights, widths, indices, view, seed, epoch,
                        scale_min, scale_max, ratio_min, ratio_max, crop_ratio, flip, out, status,
                        scratch, tj)
        if tj != 0:
            _tj_destroy(tj)


def _size2(output_size) -> tuple[int, int]:
    if isinstance(output_size, (int, np.integer)):
        output_size = (int(output_size), int(output_size))
    h, w = (int(v) for v in output_size)
    if h < 1 or w < 1:
        raise ValueError(f"output_size {output_size}: need positive (height, width)")
    return h, w


class _ViewDecoder(Operation):
    """Shared machinery: output buffer declaration and the per-loader decode closure."""

    view = _VIEW_RRC

    def __init__(self, output_size):
        super().__init__()
        self.output_size = _size2(output_size)
        self.seed = 0
        self.scale, self.ratio = DEFAULT_SCALE, DEFAULT_RATIO
        self.crop_ratio = DEFAULT_CROP_RATIO
        self.flip = False
        self._epoch = np.zeros(1, np.int64)  # read by the compiled code through its address
        self._failed = np.zeros(1, np.int64)  # JPEGs that failed to decode (left black)

    def set_epoch(self, epoch: int) -> None:
        self._epoch[0] = int(epoch)

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    @property
    def failed_decodes(self) -> int:
        """How many samples failed to decode so far (corrupt JPEG data; output left black)."""
        return int(self._failed[0])

    def recipe(self) -> dict:
        """Everything that decides the decoded pixels besides the stored image (for a teacher
        cache manifest): compare it to decide whether cached views still apply."""
        base = {"output_size": list(self.output_size), "resample": RESAMPLE_VERSION,
                "jpeg": "libjpeg-turbo accurate IDCT"}
        if self.view == _VIEW_RRC:
            return {"view": RRC_VERSION, "seed": self.seed, "scale": list(self.scale),
                    "ratio": list(self.ratio), "flip": self.flip, **base}
        return {"view": "center-crop", "crop_ratio": self.crop_ratio, **base}

    def declare_state_and_memory(self, previous_state):
        names = getattr(getattr(self.metadata, "dtype", None), "names", None) or ()
        if not all(n in names for n in RGB_FIELDS):
            raise TypeError(f"{type(self).__name__} decodes an RGBImageField; this field's "
                            f"metadata has {list(names)}")
        shape = (*self.output_size, 3)
        dtype = np.dtype("<u1")
        return (replace(previous_state, jit_mode=True, shape=shape, dtype=dtype),
                AllocationQuery(shape, dtype))

    def generate_code(self):
        mem_read = self.memory_read
        kernel = _decode_views
        view = self.view
        seed = np.uint64(int(self.seed) & ((1 << 64) - 1))
        (s0, s1), (r0, r1) = check_scale_ratio(self.scale, self.ratio)
        crop_ratio = float(self.crop_ratio)
        flip = 1 if self.flip else 0
        epoch_addr = np.uint64(self._epoch.ctypes.data)
        failed_addr = np.uint64(self._failed.ctypes.data)
        jpg = MODE_JPG

        def decode(batch_indices, destination, metadata, storage_state):
            n = len(batch_indices)
            addrs = np.empty(n, np.uint64)
            sizes = np.empty(n, np.uint64)
            modes = np.empty(n, np.int64)  # not uint8: with uint8, numba 0.68 typed it as
            # read-only when a second loader compiled this closure
            heights = np.empty(n, np.int64)
            widths = np.empty(n, np.int64)
            indices = np.empty(n, np.int64)
            for k in range(n):
                ix = batch_indices[k]
                f = metadata[ix]
                data = mem_read(f["data_ptr"], storage_state)
                addrs[k] = data.ctypes.data
                sizes[k] = data.size
                modes[k] = jpg if f["mode"] == jpg else 1
                heights[k] = f["height"]
                widths[k] = f["width"]
                indices[k] = ix
            scratch_bytes = 0
            for k in range(n):
                if modes[k] == jpg:
                    scratch_bytes = max(scratch_bytes, heights[k] * widths[k] * 3)
            epoch = np.uint64(_load_i64(epoch_addr))
            status = np.zeros(n, np.int32)
            options = np.empty(2, np.int64)
            options[0] = view
            options[1] = flip
            out = destination[:n]
            kernel(addrs, sizes, modes, heights, widths, indices, options, seed, epoch, s0, s1, r0,
                   r1, crop_ratio, out, status, scratch_bytes)
            bad = 0
            for k in range(n):
                if status[k] != 0:
                    bad += 1
            if bad:
                _store_i64(failed_addr, _load_i64(failed_addr) + bad)
            return out

        return decode


class ReplayableRRCDecoder(_ViewDecoder):
    """RandomResizedCrop + horizontal flip whose draws are a function of (seed, epoch, sample
    index) (see fullrange.data.views.rrc_view_params), to output_size (h, w) or an int.

    scale: area fraction range, ratio: aspect ratio range, flip: mirror where the hash says so.
    The epoch is set with set_epoch() (BetonLoader does it before every epoch)."""

    view = _VIEW_RRC

    def __init__(self, output_size, seed: int, scale=DEFAULT_SCALE, ratio=DEFAULT_RATIO,
                 flip: bool = True):
        super().__init__(output_size)
        self.scale, self.ratio = check_scale_ratio(scale, ratio)
        self.seed, self.flip = int(seed), bool(flip)


class CenterCropDecoder(_ViewDecoder):
    """Validation view: the centred square of side crop_ratio * min(H, W), resized to
    output_size (224 of 256 for ImageNet: crop_ratio = 224/256). Deterministic, no epoch."""

    view = _VIEW_CENTER

    def __init__(self, output_size, crop_ratio: float = DEFAULT_CROP_RATIO):
        super().__init__(output_size)
        if not 0.0 < float(crop_ratio) <= 1.0:
            raise ValueError(f"crop_ratio {crop_ratio}: need 0 < crop_ratio <= 1")
        self.crop_ratio = float(crop_ratio)
