//! PyTorch checkpoints (`torch.save(state_dict)`): what torch writes loads with the values
//! torch's own conversion to float32 gives, and hostile or broken files fail with an error
//! that says what is wrong. The corpus is `tests/corpus/pth/`, made by `make_pth_corpus.py`;
//! CPU only.

use std::path::PathBuf;

use crate::common;

use common::Scratch;
use wgcnn::Error;
use wgcnn::ndarray::{ArrayD, IxDyn};
use wgcnn::prelude::*;
use wgcnn::train::Checkpoint;

fn corpus(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/corpus/pth")
        .join(name)
}

fn load(name: &str) -> Checkpoint {
    Checkpoint::load(corpus(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Equal names, shapes and bits; NaN matches NaN (torch itself is not consistent in the payload
/// its conversions give a NaN).
fn assert_same(got: &Checkpoint, want: &Checkpoint, what: &str) {
    let names = |c: &Checkpoint| {
        let floats = c
            .tensors
            .iter()
            .map(|(n, t)| (n.clone(), t.shape().to_vec()));
        let ints = c
            .integers
            .iter()
            .map(|(n, t)| (n.clone(), t.shape().to_vec()));
        (floats.collect::<Vec<_>>(), ints.collect::<Vec<_>>())
    };
    assert_eq!(names(got), names(want), "{what}: names and shapes");
    for ((name, a), (_, b)) in got.tensors.iter().zip(&want.tensors) {
        for (i, (x, y)) in a.iter().zip(b.iter()).enumerate() {
            let same = x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan());
            assert!(
                same,
                "{what}: {name}[{i}] is {x:e} ({:#010x}), torch gives {y:e} ({:#010x})",
                x.to_bits(),
                y.to_bits()
            );
        }
    }
    assert_eq!(got.integers, want.integers, "{what}: integers");
}

#[test]
fn torch_state_dicts_load_as_torch_converts_them() {
    for name in [
        "model",
        "dtypes",
        "views",
        "protocol4",
        "checkpoint",
        "legacy_model",
        "legacy_views",
    ] {
        let got = load(&format!("good_{name}.pth"));
        let want = load(&format!("good_{name}.safetensors"));
        assert_same(&got, &want, name);
    }
}

#[test]
fn a_conv_and_batch_norm_state_dict_has_its_names_and_counter() {
    let loaded = load("good_model.pth");
    let names: Vec<&str> = loaded.tensors.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "bn.bias",
            "bn.running_mean",
            "bn.running_var",
            "bn.weight",
            "conv.bias",
            "conv.weight"
        ]
    );
    assert_eq!(loaded.get("conv.weight").unwrap().shape(), [2, 1, 3, 3]);
    let count = loaded.get_integer("bn.num_batches_tracked").unwrap();
    assert_eq!(count, &ArrayD::from_elem(IxDyn(&[]), 2i64));
}

#[test]
fn a_pth_state_dict_loads_into_a_model() {
    let mut model = Sequential::new()
        .add("conv", Conv2d::new(1, 2, (3, 3)))
        .add("bn", BatchNorm2d::new(2))
        .build_for(&[1, 1, 5, 5], Device::Cpu, 0)
        .unwrap();
    model.load(corpus("good_model.pth")).unwrap();
    let loaded = model.checkpoint().unwrap();
    assert_same(&loaded, &load("good_model.safetensors"), "model");
}

#[test]
fn conversions_are_exact_at_the_edges() {
    let loaded = load("good_dtypes.pth");
    let bits = |name: &str| -> Vec<u32> {
        loaded
            .get(name)
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect()
    };
    // f16: the smallest subnormal (2^-24), the largest subnormal, the smallest normal,
    // 65504, ±inf.
    assert_eq!(
        bits("f16_bits")[..6],
        [
            0x3380_0000,
            0x387f_c000,
            0x3880_0000,
            0x477f_e000,
            0x7f80_0000,
            0xff80_0000
        ]
    );
    assert!(loaded.get("f16_bits").unwrap()[[7]].is_nan());
    // bf16: the top half of an f32, subnormals included.
    assert_eq!(
        bits("bf16_bits")[..3],
        [0x0001_0000, 0x007f_0000, 0x0080_0000]
    );
    // f64: 1.5 · 2^-149 rounds to even (2^-148); 1 + 2^-24 ties to 1, 1 + 3 · 2^-24 up.
    assert_eq!(bits("f64")[19..], [0x2, 0x3f80_0000, 0x3f80_0002]);
    let i64s = loaded.get_integer("i64").unwrap();
    assert_eq!(i64s.as_slice().unwrap(), [0, -1, i64::MAX, i64::MIN]);
    let i32s = loaded.get_integer("i32").unwrap();
    assert_eq!(
        i32s.as_slice().unwrap(),
        [0, -1, i64::from(i32::MAX), i64::from(i32::MIN)]
    );
}

#[test]
fn safetensors_in_f16_bf16_and_f64_convert_like_torch() {
    assert_same(
        &load("good_dtypes_native.safetensors"),
        &load("good_dtypes.safetensors"),
        "native dtypes",
    );
}

#[test]
fn strided_shared_and_zero_dim_views_are_gathered() {
    let loaded = load("good_views.pth");
    let values = |name: &str| {
        loaded
            .get(name)
            .unwrap()
            .iter()
            .copied()
            .collect::<Vec<_>>()
    };
    // `w.t()` kept its strides (1, 3) in the file.
    assert_eq!(loaded.get("t").unwrap().shape(), [3, 2]);
    assert_eq!(values("t"), [0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
    assert_eq!(values("every_other"), [0.25, 0.75, 1.25, 1.75, 2.25, 2.75]);
    // Two views of one storage, at offsets 2 and 5.
    assert_eq!(values("head"), [0.5, 0.75, 1.0]);
    assert_eq!(loaded.get("tail").unwrap().shape(), [7, 1]);
    assert_eq!(values("tail")[0], 1.25);
    assert_eq!(loaded.get("scalar").unwrap().shape(), [] as [usize; 0]);
    assert_eq!(values("scalar"), [2.75]);
    assert_eq!(loaded.get("empty").unwrap().shape(), [0, 3]);
    assert_eq!(values("param"), [0.5, -1.5]);
    assert_eq!(load("good_no_byteorder.pth"), load("good_hand_made.pth"));
    assert_eq!(
        load("good_hand_made.pth")
            .get("w")
            .unwrap()
            .as_slice()
            .unwrap(),
        [1.0, 2.0, 3.0, 4.0]
    );
}

#[test]
fn a_training_checkpoint_loads_its_model_entry() {
    let loaded = load("good_checkpoint.pth");
    let names: Vec<&str> = loaded.tensors.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["bias", "weight"]);
    assert!(loaded.integers.is_empty());
}

#[test]
fn the_file_name_does_not_matter() {
    let scratch = Scratch::new("pth");
    let renamed = scratch.join("weights.safetensors");
    std::fs::copy(corpus("good_views.pth"), &renamed).unwrap();
    assert_eq!(Checkpoint::load(&renamed).unwrap(), load("good_views.pth"));
}

#[test]
fn hostile_and_broken_files_fail_with_a_useful_message() {
    let cases: &[(&str, &[&str])] = &[
        (
            "whole_module.pth",
            &[
                "whole pickled module",
                "torch.nn.modules.container.Sequential",
                "model.state_dict()",
            ],
        ),
        ("main_module.pth", &["whole pickled module", "__main__.Net"]),
        (
            "os_system.pth",
            &["posix.system", "not allowed", "never runs code"],
        ),
        ("legacy_truncated.pth", &["legacy", "cut off"]),
        ("bare_pickle.pth", &["pickle"]),
        ("truncated.pth", &["zip", "truncated"]),
        ("big_endian.pth", &["big-endian", "re-save"]),
        ("missing_data_pkl.pth", &["data.pkl"]),
        ("no_archive_folder.pth", &["data.pkl"]),
        ("missing_storage.pth", &["archive/data/0", "missing"]),
        (
            "storage_short.pth",
            &["archive/data/0 holds 12 bytes", "16 bytes"],
        ),
        ("numel_past_storage.pth", &["holds 16 bytes", "20 bytes"]),
        (
            "view_past_storage.pth",
            &["reaches element 4", "holds 4 elements"],
        ),
        ("huge_sizes.pth", &["too large"]),
        ("huge_numel.pth", &["more than any file holds"]),
        ("wide_int.pth", &["wider than 64 bits"]),
        ("negative_stride.pth", &["negative stride"]),
        ("negative_offset.pth", &["negative offset"]),
        ("stride_overflow.pth", &["overflow"]),
        ("broadcast_view.pth", &["broadcast", "contiguous"]),
        ("unsupported_storage.pth", &["complex64"]),
        ("uint8.pth", &["\"mask\"", "uint8"]),
        (
            "uint16.pth",
            &["_rebuild_tensor_v3", "convert it to float32"],
        ),
        ("deep_nesting.pth", &["nested more than 64"]),
        ("many_marks.pth", &["more than 1000000 objects"]),
        ("memo_flood.pth", &["more than 1000000 objects"]),
        ("no_stop.pth", &["ends early"]),
        ("stack_underflow.pth", &["stack underflow"]),
        ("bad_memo_get.pth", &["memo entry 7"]),
        ("duplicate_names.pth", &["name \"w\" twice"]),
        (
            "nested_unknown.pth",
            &["\"net\"", "pass the state_dict itself"],
        ),
        ("tensor_root.pth", &["single tensor"]),
    ];
    for (name, words) in cases {
        let path = corpus(name);
        let err = Checkpoint::load(&path).expect_err(name);
        let Error::Data { path: reported, .. } = &err else {
            panic!("{name}: not Error::Data: {err:?}");
        };
        assert_eq!(reported, &path.display().to_string());
        let message = err.to_string();
        for word in *words {
            assert!(
                message.contains(word),
                "{name}: {word:?} missing from: {message}"
            );
        }
    }
    // Every file in the corpus is covered: good ones above, the rest here.
    let listed = std::fs::read_dir(corpus("")).unwrap().count();
    let good = std::fs::read_dir(corpus(""))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("good")
        })
        .count();
    assert_eq!(listed, good + cases.len(), "a corpus file without a test");
}
