"""A minimal JPEG Lossless encoder (ITU T.81 process 14, first-order prediction: DICOM's JPEG Lossless SV1), for
tests only: pydicom, pylibjpeg and Pillow decode this syntax but none encodes it, and PACS exports use it. Written
from the standard, independently of the decoder under test (libjpeg via pylibjpeg), so a round trip checks both.

One grey component, predictor 1 (the left neighbour; the line above at the start of each line), one Huffman table
giving each difference category 0-16 a 5-bit code.
"""

from __future__ import annotations

import struct

import numpy as np

_CODE_BITS = 5  # 17 categories fit in 5-bit codes; none is all ones, which T.81 reserves


def _segment(marker: int, payload: bytes) -> bytes:
    return struct.pack(">HH", marker, len(payload) + 2) + payload


class _BitWriter:
    def __init__(self):
        self.out = bytearray()
        self.acc = 0
        self.n = 0

    def write(self, value: int, bits: int) -> None:
        for i in range(bits - 1, -1, -1):
            self.acc = (self.acc << 1) | ((value >> i) & 1)
            self.n += 1
            if self.n == 8:
                self.out.append(self.acc)
                if self.acc == 0xFF:
                    self.out.append(0x00)  # byte stuffing: 0xFF in entropy data is followed by 0x00
                self.acc, self.n = 0, 0

    def flush(self) -> bytes:
        if self.n:
            self.write((1 << (8 - self.n)) - 1, 8 - self.n)  # pad with 1-bits
        return bytes(self.out)


def encode_jpeg_lossless(pixels: np.ndarray, precision: int) -> bytes:
    """(rows, cols) unsigned integers below 2**precision -> a JPEG Lossless SV1 codestream."""
    img = np.asarray(pixels).astype(np.int64)
    if img.ndim != 2 or img.min() < 0 or img.max() >= 1 << precision:
        raise ValueError(f"need a 2-D array of unsigned {precision}-bit values")
    rows, cols = img.shape
    pred = np.empty_like(img)
    pred[0, 0] = 1 << (precision - 1)
    pred[0, 1:] = img[0, :-1]  # first line: the left neighbour
    pred[1:, 0] = img[:-1, 0]  # start of each later line: the one above
    pred[1:, 1:] = img[1:, :-1]  # elsewhere: predictor 1, the left neighbour
    diff = img - pred
    bits = _BitWriter()
    for d in diff.ravel().tolist():
        ssss = int(abs(d)).bit_length()
        bits.write(ssss, _CODE_BITS)
        if 0 < ssss < 16:
            bits.write(d if d > 0 else d - 1 + (1 << ssss), ssss)  # negative: the low bits of d - 1
    counts = [0] * 16
    counts[_CODE_BITS - 1] = 17
    sof = struct.pack(">BHHB", precision, rows, cols, 1) + bytes([1, 0x11, 0])
    dht = bytes([0x00]) + bytes(counts) + bytes(range(17))
    sos = bytes([1, 1, 0x00, 1, 0, 0x00])  # one component, table 0, predictor 1, Se 0, no point transform
    return (
        b"\xff\xd8" + _segment(0xFFC3, sof) + _segment(0xFFC4, dht) + _segment(0xFFDA, sos) + bits.flush() + b"\xff\xd9"
    )
