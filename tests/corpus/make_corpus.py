"""The fuzz corpus replayed by tests/suite/fuzz.rs: hand-made hostile and broken inputs for the IDX
reader, the safetensors checkpoint loader and image decoding (plus any input a fuzz run
found, added by hand). Every file must load or fail with an error, never panic or abort.
Run from the repository root (Python 3 standard library only):

    python3 tests/corpus/make_corpus.py
"""

import gzip
import json
import os
import struct
import zlib

ROOT = os.path.dirname(os.path.abspath(__file__))


def put(kind, name, data):
    os.makedirs(os.path.join(ROOT, kind), exist_ok=True)
    with open(os.path.join(ROOT, kind, name), "wb") as f:
        f.write(data)


def idx(magic, dims, payload=b""):
    return struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in dims) + payload


def safetensors(header, data=b"", length=None):
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def png_chunk(kind, body):
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png(width, height, rows=None):
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    body = png_chunk(b"IHDR", ihdr)
    if rows is not None:
        body += png_chunk(b"IDAT", zlib.compress(rows))
    return b"\x89PNG\r\n\x1a\n" + body + png_chunk(b"IEND", b"")


def main():
    good_images = idx(0x803, [2, 2, 3], bytes(range(12)))
    put("idx", "good_images.idx", good_images)
    put("idx", "good_labels.idx", idx(0x801, [3], b"\x01\x02\x03"))
    put("idx", "empty.idx", b"")
    put("idx", "three_bytes.idx", b"\x00\x00\x08")
    put("idx", "wrong_magic.idx", idx(0x804, [1, 1, 1], b"\x00"))
    put("idx", "sizes_overflow.idx", idx(0x803, [1 << 31, 1 << 31, 4]))
    put("idx", "sizes_huge.idx", idx(0x803, [0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF]))
    put("idx", "zero_images.idx", idx(0x803, [0, 28, 28]))
    put("idx", "truncated_payload.idx", good_images[:-5])
    put("idx", "padded_payload.idx", good_images + b"\x00")
    put("idx", "gzip_garbage.idx", b"\x1f\x8b\x08\x00garbage")
    put("idx", "gzip_of_truncated.idx", gzip.compress(good_images[:10]))
    put("idx", "labels_magic_as_images.idx", idx(0x801, [4], b"\x00" * 4))

    tensor = {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}
    put("safetensors", "good.safetensors", safetensors(tensor, bytes(16)))
    put("safetensors", "empty.safetensors", b"")
    put("safetensors", "length_only.safetensors", struct.pack("<Q", 10))
    put("safetensors", "length_max.safetensors", safetensors(tensor, bytes(16), length=(1 << 64) - 1))
    put("safetensors", "length_past_end.safetensors", safetensors(tensor, bytes(16), length=1 << 20))
    put("safetensors", "not_json.safetensors", struct.pack("<Q", 5) + b"{{{{{")
    put("safetensors", "offsets_past_end.safetensors",
        safetensors({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 1 << 40]}}, bytes(16)))
    put("safetensors", "shape_disagrees.safetensors",
        safetensors({"w": {"dtype": "F32", "shape": [3, 3], "data_offsets": [0, 16]}}, bytes(16)))
    put("safetensors", "shape_overflows.safetensors",
        safetensors({"w": {"dtype": "F32", "shape": [1 << 62, 1 << 62], "data_offsets": [0, 16]}}, bytes(16)))
    put("safetensors", "f16.safetensors",
        safetensors({"w": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]}}, bytes(4)))
    put("safetensors", "i64_and_f32.safetensors",
        safetensors({"n": {"dtype": "I64", "shape": [], "data_offsets": [0, 8]},
                     "w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, bytes(16)))
    put("safetensors", "overlapping.safetensors",
        safetensors({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                     "b": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(16)))
    put("safetensors", "zero_dim.safetensors",
        safetensors({"w": {"dtype": "F32", "shape": [0, 5], "data_offsets": [0, 0]}}))

    put("image", "good.png", png(3, 2, b"\x00" + bytes(3) + b"\x00" + bytes(3)))
    put("image", "empty.png", b"")
    put("image", "signature_only.png", b"\x89PNG\r\n\x1a\n")
    put("image", "huge_header.png", png(1 << 30, 1 << 30))
    put("image", "zero_size.png", png(0, 0, b""))
    put("image", "truncated.png", png(3, 2, b"\x00" + bytes(3) + b"\x00" + bytes(3))[:40])
    put("image", "soi_only.jpg", b"\xff\xd8")
    put("image", "text.jpg", b"this is not a jpeg at all")


if __name__ == "__main__":
    main()
