"""The PyTorch `.pth` corpus read by tests/suite/pth.rs and replayed by tests/suite/fuzz.rs.

`good_*.pth` are written by `torch.save(state_dict)` itself; next to each, `good_*.safetensors`
holds the values PyTorch's own conversion gives (`.float()` for floating dtypes, int64 for
integers, contiguous), which the loader must match bit for bit. Everything else is hostile or
broken and must fail with a clear error: some files come from torch (a whole pickled module,
the legacy format), the rest are assembled here by hand. Nothing here is ever unpickled except
the good files, by `torch.load(weights_only=True)`, to check what torch wrote. Run from the
repository root:

    /work/venv/torch/bin/python tests/corpus/make_pth_corpus.py
"""

import io
import os
import pickle
import struct
import zipfile

import torch
from safetensors.torch import save as safetensors_save

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pth")


def put(name, data):
    os.makedirs(ROOT, exist_ok=True)
    with open(os.path.join(ROOT, name), "wb") as f:
        f.write(data)


def torch_bytes(obj, **kwargs):
    buffer = io.BytesIO()
    torch.save(obj, buffer, **kwargs)
    return buffer.getvalue()


def expected(state):
    """The values the loader must produce: floats as torch converts them to float32."""
    out = {}
    for name, t in state.items():
        t = t.detach()
        t = t.to(torch.int64) if not t.is_floating_point() else t.to(torch.float32)
        out[name] = t.contiguous().clone()
    return safetensors_save(out)


def good(name, state, **kwargs):
    data = torch_bytes(state, **kwargs)
    put(f"good_{name}.pth", data)
    put(f"good_{name}.safetensors", expected(state))
    return data


def entries(data):
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return {n: z.read(n) for n in z.namelist()}


def archive(files, deflate=False):
    """A zip like torch.save's (without its 64-byte alignment, to keep the corpus small)."""
    buffer = io.BytesIO()
    method = zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED
    with zipfile.ZipFile(buffer, "w", method) as z:
        for name, body in files.items():
            # A fixed date: regenerating the corpus changes no byte of these files.
            z.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), body, method)
    return buffer.getvalue()


def repack(data, edit):
    files = entries(data)
    edit(files)
    return archive(files)


# A tiny pickle assembler for the hand-made cases (protocol 2, as torch.save writes).
def op_int(v):
    if 0 <= v < 256:
        return b"K" + bytes([v])
    if -(1 << 31) <= v < (1 << 31):
        return b"J" + struct.pack("<i", v)
    n = (v.bit_length() + 8) // 8
    return b"\x8a" + bytes([n]) + v.to_bytes(n, "little", signed=True)


def op_str(s):
    raw = s.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def op_global(module, name):
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def op_tuple(items):
    return b"(" + b"".join(items) + b"t"


ORDERED_DICT = op_global("collections", "OrderedDict") + b")R"


def op_tensor(storage="FloatStorage", key="0", numel=4, offset=0, size=(4,), stride=(1,)):
    persid = op_tuple([op_str("storage"), op_global("torch", storage), op_str(key),
                       op_str("cpu"), op_int(numel)]) + b"Q"
    args = [persid, op_int(offset), op_tuple([op_int(s) for s in size]),
            op_tuple([op_int(s) for s in stride]), b"\x89", ORDERED_DICT]
    return op_global("torch._utils", "_rebuild_tensor_v2") + op_tuple(args) + b"R"


def state_pickle(items):
    body = b"".join(op_str(name) + value for name, value in items)
    return b"\x80\x02" + ORDERED_DICT + b"(" + body + b"u."


def hand_made(pickle_bytes, storages=None, byteorder=b"little", deflate=False):
    files = {"archive/data.pkl": pickle_bytes, "archive/byteorder": byteorder}
    for key, body in (storages or {"0": struct.pack("<4f", 1, 2, 3, 4)}).items():
        files[f"archive/data/{key}"] = body
    files["archive/version"] = b"3\n"
    return archive(files, deflate)


class Evil:
    """Pickles as a call to os.system; only ever pickled, never loaded."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


def main():
    torch.manual_seed(0)

    # A conv + batch norm state dict, as a model's state_dict() gives it.
    model = torch.nn.Module()
    model.conv = torch.nn.Conv2d(1, 2, 3)
    model.bn = torch.nn.BatchNorm2d(2)
    model.train()
    model.bn(torch.randn(4, 2, 3, 3))
    model.bn(torch.randn(4, 2, 3, 3))
    model_state = model.state_dict()
    assert model_state["bn.num_batches_tracked"].dtype == torch.int64
    assert model_state["bn.num_batches_tracked"].dim() == 0
    model_bytes = good("model", model_state)

    # One tensor per dtype, with values that round, underflow to subnormals, overflow, NaN.
    specials = [0.0, -0.0, 1.0, -2.5, 1 / 3, 1e-3, 6.1e-5, 6e-8, 1e-40, 65504.0, 7e4, 3.4e38,
                1e39, 1e-46, float("inf"), float("-inf"), float("nan")]
    half_bits = torch.tensor([0x0001, 0x03FF, 0x0400, 0x7BFF, 0x7C00, 0xFC00, 0x7E00, 0x7C01,
                              0x8001, 0x8000, 0x3C00, 0x3555], dtype=torch.int32)
    bf16_bits = torch.tensor([0x0001, 0x007F, 0x0080, 0x7F7F, 0x7F80, 0xFF80, 0x7FC0, 0x7F81,
                              0x8001, 0x3F80, 0x3EAB], dtype=torch.int32)
    dtypes = {
        "f32": torch.tensor(specials, dtype=torch.float32),
        "f16": torch.tensor(specials, dtype=torch.float16),
        "f16_bits": half_bits.to(torch.int16).view(torch.float16),
        "bf16": torch.tensor(specials, dtype=torch.bfloat16),
        "bf16_bits": bf16_bits.to(torch.int16).view(torch.bfloat16),
        "f64": torch.tensor(specials + [1e-45, 7e-46, 2 ** -149 * 1.5, 1 + 2 ** -24,
                                        1 + 3 * 2 ** -24], dtype=torch.float64),
        "i64": torch.tensor([0, -1, 2 ** 63 - 1, -(2 ** 63)], dtype=torch.int64),
        "i32": torch.tensor([0, -1, 2 ** 31 - 1, -(2 ** 31)], dtype=torch.int32),
    }
    good("dtypes", dtypes)
    # The same tensors in their own dtypes, for the safetensors reader's conversions.
    put("good_dtypes_native.safetensors",
        safetensors_save({k: v.contiguous() for k, v in dtypes.items()}))

    # Views: a transpose (strides kept), a strided slice, two slices of one storage, a 0-dim
    # tensor, an empty tensor and a Parameter (_rebuild_parameter).
    base = torch.arange(12, dtype=torch.float32) / 4
    w = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    views = {
        "t": w.t(),
        "every_other": base[1::2],
        "head": base[2:5],
        "tail": base[5:].view(7, 1),
        "scalar": torch.tensor(2.75),
        "empty": torch.zeros(0, 3),
        "param": torch.nn.Parameter(torch.tensor([[0.5, -1.5]])),
    }
    good("views", views)
    back = torch.load(os.path.join(ROOT, "good_views.pth"), weights_only=True)
    assert back["t"].stride() == (1, 3), back["t"].stride()
    assert back["every_other"].stride() == (2,)
    assert back["head"].storage_offset() == 2 and back["tail"].storage_offset() == 5
    assert back["head"].untyped_storage().data_ptr() == back["tail"].untyped_storage().data_ptr()

    # Protocol 4 (FRAME, SHORT_BINUNICODE, MEMOIZE, STACK_GLOBAL) and a plain dict.
    protocol4 = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    put("good_protocol4.pth", repack(torch_bytes(protocol4, pickle_protocol=4), lambda f: f))
    put("good_protocol4.safetensors", expected(protocol4))

    # A training checkpoint: the tensors of its "model" entry load.
    small = torch.nn.Linear(2, 1)
    optimizer = torch.optim.Adam(small.parameters())
    small(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    checkpoint = {"model": small.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 3}
    put("good_checkpoint.pth", repack(torch_bytes(checkpoint), lambda f: f))
    put("good_checkpoint.safetensors", expected(small.state_dict()))

    # The hostile and broken cases.
    put("nested_unknown.pth", repack(torch_bytes({"net": {"w": torch.ones(1)}, "epoch": 3}),
                                     lambda f: f))
    put("tensor_root.pth", repack(torch_bytes(torch.ones(2)), lambda f: f))
    put("uint8.pth", repack(torch_bytes({"mask": torch.ones(2, dtype=torch.uint8)}), lambda f: f))
    put("uint16.pth", repack(torch_bytes({"x": torch.ones(2, dtype=torch.uint16)}), lambda f: f))
    put("whole_module.pth", repack(torch_bytes(torch.nn.Sequential(torch.nn.Linear(1, 1))),
                                   lambda f: f))
    put("main_module.pth", hand_made(b"\x80\x02" + op_global("__main__", "Net") + b")\x81."))
    put("os_system.pth", hand_made(pickle.dumps(Evil(), protocol=2)))
    # The legacy (pre-1.6) format, as 2020's pretrained files are: good ones, and one cut
    # off inside its raw storages.
    legacy = good("legacy_model", model_state, _use_new_zipfile_serialization=False)
    good("legacy_views", views, _use_new_zipfile_serialization=False)
    put("legacy_truncated.pth", legacy[:-10])
    put("bare_pickle.pth", pickle.dumps({"w": [1.0, 2.0]}, protocol=2))
    put("truncated.pth", model_bytes[: len(model_bytes) // 2])

    tensor = op_tensor()
    hand_made_good = hand_made(state_pickle([("w", tensor)]))
    back = torch.load(io.BytesIO(hand_made_good), weights_only=True)
    assert back["w"].tolist() == [1, 2, 3, 4], back
    put("good_hand_made.pth", hand_made_good)
    big = {"archive/byteorder": b"big"}
    put("big_endian.pth", repack(hand_made_good, lambda f: f.update(big)))

    def drop(suffix):
        return lambda f: f.pop(next(n for n in f if n.endswith(suffix)))

    # torch.save(..., _disable_byteorder_record=True) omits the file: little-endian.
    put("good_no_byteorder.pth", repack(hand_made_good, drop("/byteorder")))
    put("missing_data_pkl.pth", repack(hand_made_good, drop("/data.pkl")))
    put("missing_storage.pth", repack(hand_made_good, drop("/data/0")))

    def shorten(f):
        name = next(n for n in f if n.endswith("/data/0"))
        f[name] = f[name][:-4]

    put("storage_short.pth", repack(hand_made_good, shorten))
    put("view_past_storage.pth", hand_made(state_pickle([("w", op_tensor(offset=2, size=(3,)))])))
    put("numel_past_storage.pth", hand_made(state_pickle([("w", op_tensor(numel=5, size=(5,)))])))
    put("huge_sizes.pth", hand_made(state_pickle(
        [("w", op_tensor(numel=2 ** 62, size=(2 ** 62, 2 ** 62), stride=(2 ** 62, 1)))])))
    put("huge_numel.pth", hand_made(state_pickle(
        [("w", op_tensor(numel=2 ** 63 - 1, size=(2 ** 63 - 1,)))])))
    put("wide_int.pth", hand_made(state_pickle([("w", op_tensor(numel=2 ** 70))])))
    put("negative_stride.pth", hand_made(state_pickle(
        [("w", op_tensor(offset=3, size=(4,), stride=(-1,)))])))
    put("stride_overflow.pth", hand_made(state_pickle(
        [("w", op_tensor(size=(4,), stride=(2 ** 63 - 1,)))])))
    put("negative_offset.pth", hand_made(state_pickle([("w", op_tensor(offset=-1, size=(1,)))])))
    put("broadcast_view.pth", hand_made(state_pickle(
        [("w", op_tensor(size=(1000,), stride=(0,)))])))
    put("unsupported_storage.pth", hand_made(state_pickle(
        [("w", op_tensor(storage="ComplexFloatStorage", numel=2, size=(2,)))])))
    put("deep_nesting.pth", hand_made(b"\x80\x02N" + b"\x85" * 100000 + b".", deflate=True))
    put("many_marks.pth", hand_made(b"\x80\x02" + b"(" * 1000100 + b".", deflate=True))
    put("memo_flood.pth", hand_made(b"\x80\x04N" + b"\x94" * 1000100 + b".", deflate=True))
    put("no_stop.pth", hand_made(state_pickle([("w", tensor)])[:-1]))
    put("stack_underflow.pth", hand_made(b"\x80\x02(R."))
    put("bad_memo_get.pth", hand_made(b"\x80\x02h\x07."))
    put("duplicate_names.pth", hand_made(state_pickle([("w", tensor), ("w", tensor)])))
    put("no_archive_folder.pth", archive({"data.pkl": state_pickle([("w", tensor)])}))
    total = sum(os.path.getsize(os.path.join(ROOT, n)) for n in os.listdir(ROOT))
    print(f"{len(os.listdir(ROOT))} files, {total} bytes")


if __name__ == "__main__":
    main()
