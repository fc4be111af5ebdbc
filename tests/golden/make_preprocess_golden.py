"""torchvision's preprocessing on small deterministic images, for tests/suite/preprocess.rs.

Writes tests/golden/preprocess_{resize,crop,pipeline}.json. With --write-photos it also
(re)writes data/photos/ from scikit-image's sample photos (see data/photos/README.md).

    /work/venv/torch/bin/python tests/golden/make_preprocess_golden.py [--write-photos]

Inputs are `pattern(seed, c, h, w)`: a hash of (seed, channel, row, column) whose top byte is
the pixel, so the Rust test rebuilds them instead of reading them. uint8 images go through
torchvision's uint8 path, which on x86 with AVX2 (and on arm64) is PyTorch's fixed-point
resampler; the file records the CPU capability it was made on.
"""

import argparse
import json
import platform
from pathlib import Path

import numpy as np
import torch
import torchvision
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as F

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "golden"
MASK = 0xFFFFFFFF


def pattern(seed, c, h, w):
    """uint8 [c, h, w]: the top byte of a 32-bit hash of (seed, channel, row, column)."""
    ch, y, x = np.meshgrid(np.arange(c), np.arange(h), np.arange(w), indexing="ij")
    v = (seed * 0x9E3779B1 + ch * 0x85EBCA77 + y * 0xC2B2AE3D + x * 0x27D4EB2F) & MASK
    v = v.astype(np.uint64)
    v ^= v >> np.uint64(15)
    v = (v * np.uint64(0x2C1B3C6D)) & np.uint64(MASK)
    v ^= v >> np.uint64(12)
    v = (v * np.uint64(0x297A2D39)) & np.uint64(MASK)
    v ^= v >> np.uint64(15)
    return torch.from_numpy((v >> np.uint64(24)).astype(np.uint8))


def fnv1a64(t):
    """FNV-1a over the bytes in row-major order (the Rust test computes the same)."""
    h = 0xCBF29CE484222325
    for b in t.contiguous().numpy().tobytes():
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def floats(t):
    """float32 values as their shortest round-trip decimal."""
    return [float(str(v)) for v in t.flatten().numpy()]


def resize_cases():
    named = [
        # name, seed, shape, size (shorter side)
        ("down_37x53_to_16", 1, (3, 37, 53), 16),
        ("up_20x20_to_33", 2, (3, 20, 20), 33),
        ("grey_29x41_to_12", 3, (1, 29, 41), 12),
        ("tall_thin_9x1_to_3", 4, (3, 9, 1), 3),
        ("rgba_12x30_to_5", 5, (4, 12, 30), 5),
        ("same_size_8x11_to_8", 6, (3, 8, 11), 8),
    ]
    u8 = []
    for name, seed, shape, size in named:
        out = F.resize(pattern(seed, *shape), [size], antialias=True)
        u8.append({"name": name, "seed": seed, "shape": list(shape), "size": size,
                   "out_shape": list(out.shape), "data": out.flatten().tolist()})
    # A sweep of random shapes and sizes, outputs as checksums only.
    rng = np.random.default_rng(20240611)
    sweep = []
    for i in range(60):
        c = int(rng.integers(1, 5))
        h, w = (int(v) for v in rng.integers(1, 90, 2))
        size = [int(rng.integers(1, 90))] if i % 3 else [int(v) for v in rng.integers(1, 90, 2)]
        out = F.resize(pattern(100 + i, c, h, w), size, antialias=True)
        sweep.append({"seed": 100 + i, "shape": [c, h, w], "size": size,
                      "out_shape": list(out.shape), "fnv1a64": fnv1a64(out)})
    # float32: the same filter in float (PyTorch's float kernel). Widths of 1 are left out:
    # PyTorch's float path mis-resamples rows of a one-column image (its uint8 path does not).
    f32 = []
    for name, seed, shape, size in [
        ("down_f32_19x27_to_8", 1, (3, 19, 27), [8]),
        ("up_f32_9x11_to_15", 7, (3, 9, 11), [15]),
        ("exact_f32_13x17_to_7x30", 8, (2, 13, 17), [7, 30]),
    ]:
        x = pattern(seed, *shape).float()
        out = F.resize(x, size, antialias=True)
        f32.append({"name": name, "seed": seed, "shape": list(shape), "size": size,
                    "out_shape": list(out.shape), "data": floats(out)})
    sizes = []
    for h, w, s in [(480, 640, 256), (640, 480, 256), (375, 500, 256), (333, 500, 224),
                    (500, 333, 224), (299, 299, 224), (1, 1000, 3), (1000, 1, 3), (7, 3, 5),
                    (3, 7, 5), (101, 203, 77), (4032, 3024, 256), (3024, 4032, 224),
                    (10, 30, 1), (30, 10, 100)]:
        new_h, new_w = F.resize(torch.zeros(1, h, w, dtype=torch.uint8), [s], antialias=True).shape[1:]
        sizes.append([h, w, s, int(new_h), int(new_w)])
    return {"u8": u8, "u8_sweep": sweep, "f32": f32, "output_sizes": sizes}


def crop_cases():
    cases = []
    for name, seed, shape, crop in [
        ("odd_offsets_10x11_to_5x6", 11, (3, 10, 11), (5, 6)),  # round(2.5) = 2 both ways
        ("ties_9x12_to_4x3", 12, (3, 9, 12), (4, 3)),  # round(2.5) = 2, round(4.5) = 4
        ("ties_8x12_to_5x5", 13, (2, 8, 12), (5, 5)),  # round(1.5) = 2, round(3.5) = 4
        ("larger_5x7_to_8x10", 14, (3, 5, 7), (8, 10)),  # padded on all sides
        ("larger_one_side_6x9_to_9x4", 15, (1, 6, 9), (9, 4)),  # padded rows, cropped columns
        ("larger_odd_3x3_to_6x8", 16, (3, 3, 3), (6, 8)),
    ]:
        out = F.center_crop(pattern(seed, *shape), list(crop))
        cases.append({"name": name, "seed": seed, "shape": list(shape), "crop": list(crop),
                      "out_shape": list(out.shape), "data": out.flatten().tolist()})
    return {"u8": cases}


def pipeline_cases():
    imagenet = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    cases = []
    for name, seed, shape, size, crop, scale, (mean, std) in [
        ("imagenet_61x47", 21, (3, 61, 47), 12, (10, 10), True, imagenet),
        ("efficientnet_lite_30x45", 22, (3, 30, 45), 14, (14, 14), False, ([127.0] * 3, [128.0] * 3)),
        ("grey_to_rgb_20x30", 23, (1, 20, 30), 8, (6, 7), True, imagenet),
        ("padded_20x30", 24, (3, 20, 30), 8, (10, 10), True, imagenet),
    ]:
        pipeline = T.Compose([
            T.Resize(size, antialias=True),
            T.CenterCrop(list(crop)),
            T.ToDtype(torch.float32, scale=scale),
            T.Normalize(mean, std),
        ])
        out = pipeline(pattern(seed, *shape))
        cases.append({"name": name, "seed": seed, "shape": list(shape), "resize": size,
                      "crop": list(crop), "scale": "1/255" if scale else "1", "mean": mean,
                      "std": std, "out_shape": list(out.shape), "data": floats(out)})
    return {"cases": cases}


def write_photos():
    """data/photos: three scikit-image samples as JPEG, plus the cat again with EXIF
    Orientation=6 ("rotate 90° clockwise to view") in front of the same JPEG data."""
    import PIL.Image
    import skimage.data

    out = ROOT / "data" / "photos"
    out.mkdir(parents=True, exist_ok=True)
    # No chroma subsampling (4:4:4): with 4:2:0, decoders upsample the chroma differently
    # (zune-jpeg and libjpeg-turbo then differ by up to 4 on ~15% of the pixels).
    for name, quality in [("chelsea", 85), ("coffee", 75), ("camera", 85)]:
        PIL.Image.fromarray(getattr(skimage.data, name)()).save(
            out / f"{name}.jpg", "JPEG", quality=quality, optimize=True, subsampling=0)
    # The tagged copy holds chelsea.jpg's compressed data unchanged, so its stored pixels
    # decode exactly as chelsea.jpg's do and only the orientation differs.
    exif = PIL.Image.Exif()
    exif[0x0112] = 6
    payload = exif.tobytes()  # b"Exif\0\0" + TIFF
    app1 = b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload
    jpeg = (out / "chelsea.jpg").read_bytes()
    assert jpeg[:2] == b"\xff\xd8"
    (out / "chelsea_exif_rotate90.jpg").write_bytes(jpeg[:2] + app1 + jpeg[2:])
    with PIL.Image.open(out / "chelsea_exif_rotate90.jpg") as im:
        assert im.getexif()[0x0112] == 6
    for p in sorted(out.glob("*.jpg")):
        print(p.name, p.stat().st_size, "bytes")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--write-photos", action="store_true")
    args = parser.parse_args()
    if args.write_photos:
        write_photos()
    meta = {
        "made_by": "tests/golden/make_preprocess_golden.py",
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "machine": platform.machine(),
        "pattern": "pixel = top byte of hash(seed, c, y, x); see pattern() in the script",
    }
    for name, cases in [("resize", resize_cases()), ("crop", crop_cases()),
                        ("pipeline", pipeline_cases())]:
        path = GOLDEN / f"preprocess_{name}.json"
        path.write_text(json.dumps({**meta, **cases}, separators=(",", ":")) + "\n")
        print(path.relative_to(ROOT), path.stat().st_size, "bytes")


if __name__ == "__main__":
    main()
