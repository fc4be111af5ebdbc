//! Image preprocessing against torchvision (tests/golden/preprocess_*.json, made by
//! make_preprocess_golden.py; the photos' crops from classify_efficientnet_lite0.json), its
//! errors, and photo decoding with the EXIF orientation.
//!
//! Tolerances: bytes are exact (torchvision's uint8 output is integer arithmetic we repeat).
//! float32 resizing is within 1e-4 on values 0–255: the weights are bit-exact, but PyTorch's
//! compiled kernel fuses some multiply-adds, which moves a few results by 1–2 ulp.

use std::path::{Path, PathBuf};

use crate::common;

use common::Scratch;
use ndarray::{Array3, ArrayView3};
use serde_json::Value;
use wgcnn::Error;
use wgcnn::data::{
    Preprocess, center_crop, load_image, normalize, resize, resize_shorter, resized_size,
};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn golden(name: &str) -> Value {
    let path = root().join("tests/golden").join(name);
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn usizes(v: &Value) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_u64().unwrap() as usize)
        .collect()
}

fn bytes(v: &Value) -> Vec<u8> {
    usizes(v).into_iter().map(|d| d as u8).collect()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_f64().unwrap() as f32)
        .collect()
}

fn shape3(v: &Value) -> (usize, usize, usize) {
    let s = usizes(v);
    (s[0], s[1], s[2])
}

/// The golden inputs: the top byte of a hash of (seed, channel, row, column), as
/// `pattern` in make_preprocess_golden.py.
fn pattern(seed: u32, (c, h, w): (usize, usize, usize)) -> Array3<u8> {
    Array3::from_shape_fn((c, h, w), |(ch, y, x)| {
        let mut v = seed
            .wrapping_mul(0x9E37_79B1)
            .wrapping_add((ch as u32).wrapping_mul(0x85EB_CA77))
            .wrapping_add((y as u32).wrapping_mul(0xC2B2_AE3D))
            .wrapping_add((x as u32).wrapping_mul(0x27D4_EB2F));
        v ^= v >> 15;
        v = v.wrapping_mul(0x2C1B_3C6D);
        v ^= v >> 12;
        v = v.wrapping_mul(0x297A_2D39);
        v ^= v >> 15;
        (v >> 24) as u8
    })
}

fn case_input(case: &Value) -> Array3<u8> {
    pattern(
        case["seed"].as_u64().unwrap() as u32,
        shape3(&case["shape"]),
    )
}

fn fnv1a64(bytes: impl IntoIterator<Item = u8>) -> String {
    let hash = bytes.into_iter().fold(0xCBF2_9CE4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01B3)
    });
    format!("{hash:016x}")
}

/// Resizes as torchvision's `resize(image, size)`: one number is the shorter side.
fn resize_as_torchvision<T: wgcnn::data::Sample>(
    image: ArrayView3<'_, T>,
    size: &[usize],
) -> Array3<T> {
    match *size {
        [s] => resize_shorter(image, s).unwrap(),
        [h, w] => resize(image, (h, w)).unwrap(),
        _ => panic!("size {size:?}"),
    }
}

fn max_abs_diff(a: impl IntoIterator<Item = f32>, b: impl IntoIterator<Item = f32>) -> f32 {
    a.into_iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn output_sizes_follow_torchvisions_rule() {
    for row in golden("preprocess_resize.json")["output_sizes"]
        .as_array()
        .unwrap()
    {
        let r = usizes(row);
        assert_eq!(
            resized_size(r[0], r[1], r[2]).unwrap(),
            (r[3], r[4]),
            "{}×{} to {}",
            r[0],
            r[1],
            r[2]
        );
    }
}

#[test]
fn byte_resizing_matches_torchvision_exactly() {
    let json = golden("preprocess_resize.json");
    for case in json["u8"].as_array().unwrap() {
        let out = resize_shorter(
            case_input(case).view(),
            case["size"].as_u64().unwrap() as usize,
        )
        .unwrap();
        let name = case["name"].as_str().unwrap();
        assert_eq!(out.dim(), shape3(&case["out_shape"]), "{name}");
        let expected = bytes(&case["data"]);
        let differ = out.iter().zip(&expected).filter(|(a, b)| a != b).count();
        assert_eq!(differ, 0, "{name}: {differ} bytes differ from torchvision");
    }
    let sweep = json["u8_sweep"].as_array().unwrap();
    for case in sweep {
        let out = resize_as_torchvision(case_input(case).view(), &usizes(&case["size"]));
        assert_eq!(out.dim(), shape3(&case["out_shape"]), "{case}");
        assert_eq!(
            fnv1a64(out.iter().copied()),
            case["fnv1a64"].as_str().unwrap(),
            "{case}"
        );
    }
    assert_eq!(sweep.len(), 60);
}

#[test]
fn float_resizing_matches_torchvision_within_a_few_ulp() {
    let mut worst = 0.0f32;
    for case in golden("preprocess_resize.json")["f32"].as_array().unwrap() {
        let input = case_input(case).mapv(f32::from);
        let out = resize_as_torchvision(input.view(), &usizes(&case["size"]));
        assert_eq!(out.dim(), shape3(&case["out_shape"]));
        let diff = max_abs_diff(out.iter().copied(), floats(&case["data"]));
        assert!(diff <= 1e-4, "{}: max |diff| {diff}", case["name"]);
        worst = worst.max(diff);
    }
    eprintln!("float32 resize: max |ours - torchvision| = {worst:e} on values 0–255");
}

#[test]
fn center_crop_matches_torchvision_offsets_and_padding() {
    for case in golden("preprocess_crop.json")["u8"].as_array().unwrap() {
        let crop = usizes(&case["crop"]);
        let out = center_crop(case_input(case).view(), (crop[0], crop[1])).unwrap();
        assert_eq!(out.dim(), shape3(&case["out_shape"]), "{}", case["name"]);
        assert_eq!(
            out.iter().copied().collect::<Vec<_>>(),
            bytes(&case["data"]),
            "{}",
            case["name"]
        );
    }
}

#[test]
fn whole_pipelines_match_torchvision() {
    let mut worst = 0.0f32;
    for case in golden("preprocess_pipeline.json")["cases"]
        .as_array()
        .unwrap()
    {
        let crop = usizes(&case["crop"]);
        let scale = if case["scale"] == "1/255" {
            1.0 / 255.0
        } else {
            1.0
        };
        let pre = Preprocess::new()
            .resize(case["resize"].as_u64().unwrap() as usize)
            .unwrap()
            .center_crop(crop[0], crop[1])
            .unwrap()
            .scale(scale)
            .unwrap()
            .normalize(floats(&case["mean"]), floats(&case["std"]))
            .unwrap();
        let out = pre.apply(&case_input(case)).unwrap();
        assert_eq!(out.dim(), shape3(&case["out_shape"]), "{}", case["name"]);
        let diff = max_abs_diff(out.iter().copied(), floats(&case["data"]));
        // The integer steps are exact and normalising is the same float32 arithmetic.
        assert!(diff == 0.0, "{}: max |diff| {diff}", case["name"]);
        worst = worst.max(diff);
    }
    eprintln!("pipelines: max |ours - torchvision| = {worst:e}");
}

#[test]
fn the_presets_are_torchvisions_recipes() {
    let image = pattern(5, (3, 300, 400));
    let imagenet = Preprocess::new()
        .resize(256)
        .unwrap()
        .center_crop(224, 224)
        .unwrap()
        .normalize(wgcnn::data::IMAGENET_MEAN, wgcnn::data::IMAGENET_STD)
        .unwrap();
    assert_eq!(Preprocess::imagenet(), imagenet);
    assert_eq!(
        Preprocess::imagenet().apply(&image).unwrap().dim(),
        (3, 224, 224)
    );
    let lite = Preprocess::efficientnet_lite().apply(&image).unwrap();
    let crop = Preprocess::efficientnet_lite().resize_crop(&image).unwrap();
    assert_eq!(crop.dim(), (3, 224, 224));
    assert_eq!(lite, crop.mapv(|v| (f32::from(v) - 127.0) / 128.0));
}

#[test]
fn bad_settings_and_inputs_are_errors_that_say_what_to_do() {
    let invalid = |r: Result<Preprocess, Error>, words: &str| {
        let e = r.unwrap_err();
        assert!(matches!(e, Error::InvalidArgument { .. }), "{e}");
        assert!(e.to_string().contains(words), "{e}");
    };
    invalid(Preprocess::new().resize(0), "at least 1");
    invalid(Preprocess::new().center_crop(0, 5), "at least 1×1");
    invalid(Preprocess::new().center_crop(5, 0), "at least 1×1");
    invalid(
        Preprocess::new().normalize([0.5; 3], [0.5; 2]),
        "one of each per channel",
    );
    invalid(
        Preprocess::new().normalize(Vec::new(), Vec::new()),
        "one of each",
    );
    invalid(
        Preprocess::new().normalize([0.5; 3], [0.5, 0.0, 0.5]),
        "positive",
    );
    invalid(Preprocess::new().normalize([0.5], [-1.0]), "positive");
    invalid(Preprocess::new().normalize([f32::NAN], [1.0]), "finite");
    invalid(Preprocess::new().scale(0.0), "non-zero");

    let image = pattern(1, (3, 8, 8));
    assert!(resize(image.view(), (0, 4)).is_err());
    assert!(resize_shorter(image.view(), 0).is_err());
    assert!(center_crop(image.view(), (4, 0)).is_err());
    assert!(normalize(image.view(), 1.0, &[0.0; 3], &[1.0; 4]).is_err());
    let empty = Array3::<u8>::zeros((3, 0, 5));
    let e = Preprocess::imagenet().apply(&empty).unwrap_err();
    assert!(matches!(e, Error::EmptyDimension { axis: 1, .. }), "{e}");
    // Four channels meet three means: neither one per channel nor one for all.
    let rgba = pattern(2, (4, 8, 8));
    let e = Preprocess::imagenet().apply(&rgba).unwrap_err();
    assert!(e.to_string().contains("one per channel"), "{e}");

    let missing = root().join("data/photos/no_such_photo.jpg");
    let e = Preprocess::imagenet().load(&missing).unwrap_err();
    assert!(
        matches!(e, Error::Data { .. }) && e.to_string().contains("check the path"),
        "{e}"
    );
    // Cut inside the headers. (A JPEG cut inside its image data still decodes: the image
    // crate's JPEG decoder fills the missing blocks, it does not refuse the file.)
    let scratch = Scratch::new("preprocess-corrupt");
    let corrupt = scratch.join("corrupt.jpg");
    let mut bytes = std::fs::read(root().join("data/photos/chelsea.jpg")).unwrap();
    bytes.truncate(120);
    std::fs::write(&corrupt, &bytes).unwrap();
    let e = load_image(&corrupt).unwrap_err();
    assert!(
        matches!(e, Error::Data { .. }) && e.to_string().contains("intact"),
        "{e}"
    );
    std::fs::write(&corrupt, b"not an image at all").unwrap();
    assert!(matches!(load_image(&corrupt), Err(Error::Data { .. })));

    let photos = [photo("chelsea.jpg"), photo("camera.jpg")];
    let e = Preprocess::new()
        .resize(32)
        .unwrap()
        .load_batch(&photos)
        .unwrap_err();
    assert!(e.to_string().contains("add a center_crop"), "{e}");
    assert!(Preprocess::imagenet().load_batch::<PathBuf>(&[]).is_err());
}

fn photo(name: &str) -> PathBuf {
    root().join("data/photos").join(name)
}

#[test]
fn exif_orientation_is_applied() {
    let original = load_image(photo("chelsea.jpg")).unwrap();
    let tagged = load_image(photo("chelsea_exif_rotate90.jpg")).unwrap();
    let (c, h, w) = original.dim();
    assert_eq!((c, h, w), (3, 300, 451));
    // Orientation 6: the stored pixels (chelsea.jpg's) turned 90° clockwise.
    assert_eq!(tagged.dim(), (3, w, h));
    let rotated = Array3::from_shape_fn((c, w, h), |(ch, y, x)| original[[ch, h - 1 - x, y]]);
    assert!(
        tagged == rotated,
        "the tagged photo is not the original turned clockwise"
    );
}

#[test]
fn grey_and_rgba_files_decode_to_rgb() {
    let grey = image::GrayImage::from_fn(5, 3, |x, y| image::Luma([(x * 40 + y) as u8]));
    let scratch = Scratch::new("preprocess-decode");
    let grey_path = scratch.join("grey.png");
    grey.save(&grey_path).unwrap();
    let decoded = load_image(&grey_path).unwrap();
    assert_eq!(decoded.dim(), (3, 3, 5));
    for c in 0..3 {
        assert_eq!(decoded[[c, 2, 4]], 162);
    }
    let rgba = image::RgbaImage::from_fn(4, 2, |x, y| image::Rgba([x as u8, y as u8, 7, 9]));
    let rgba_path = scratch.join("rgba.png");
    rgba.save(&rgba_path).unwrap();
    let decoded = load_image(&rgba_path).unwrap();
    assert_eq!(decoded.dim(), (3, 2, 4));
    assert_eq!(
        [decoded[[0, 1, 3]], decoded[[1, 1, 3]], decoded[[2, 1, 3]]],
        [3, 1, 7]
    );
    // A one-channel image meets three means: replicated, as torch broadcasts it.
    let one = pattern(9, (1, 6, 6));
    let out = normalize(one.view(), 1.0, &[1.0, 2.0, 3.0], &[1.0; 3]).unwrap();
    assert_eq!(out.dim(), (3, 6, 6));
    assert_eq!(out[[2, 4, 5]], f32::from(one[[0, 4, 5]]) - 3.0);
}

#[test]
fn photos_preprocess_like_torchvision() {
    let json = golden("classify_efficientnet_lite0.json");
    let pre = Preprocess::efficientnet_lite();
    let names: Vec<&String> = json["photos"].as_object().unwrap().keys().collect();
    assert_eq!(names.len(), 4);
    for name in &names {
        let expected = &json["photos"][name.as_str()];
        let decoded = load_image(photo(name)).unwrap();
        assert_eq!(
            usizes(&expected["decoded_shape"]),
            decoded.shape(),
            "{name}"
        );
        let crop = pre.resize_crop(&decoded).unwrap();
        assert_eq!(crop.dim(), (3, 224, 224));
        let same_decode = fnv1a64(decoded.iter().copied()) == expected["decoded_fnv1a64"];
        let same_crop = fnv1a64(crop.iter().copied()) == expected["crop_fnv1a64"];
        let mut worst = 0u8;
        for s in expected["crop_samples"].as_array().unwrap() {
            let (y, x) = (
                s["y"].as_u64().unwrap() as usize,
                s["x"].as_u64().unwrap() as usize,
            );
            for (c, &v) in bytes(&s["rgb"]).iter().enumerate() {
                worst = worst.max(crop[[c, y, x]].abs_diff(v));
            }
        }
        let means = floats(&expected["crop_mean"]);
        let mean_diff = (0..3)
            .map(|c| {
                (crop
                    .index_axis(ndarray::Axis(0), c)
                    .mapv(f32::from)
                    .mean()
                    .unwrap()
                    - means[c])
                    .abs()
            })
            .fold(0.0f32, f32::max);
        eprintln!(
            "{name}: decode identical to torchvision's: {same_decode}, crop identical: \
             {same_crop}, sample |diff| ≤ {worst}, channel-mean |diff| {mean_diff:.3}"
        );
        // Different JPEG decoders (zune-jpeg here, libjpeg-turbo in torchvision) may round
        // a few values differently; the resize itself is exact (see the golden tests above).
        assert!(worst <= 3 && mean_diff < 0.05, "{name}");
        if same_decode {
            assert!(
                same_crop,
                "{name}: same decoded pixels but a different crop"
            );
        }
    }
    let batch = pre
        .load_batch(&names.iter().map(|n| photo(n)).collect::<Vec<_>>())
        .unwrap();
    assert_eq!(batch.shape(), [4, 3, 224, 224]);
}

#[test]
fn photo_paths_exist_for_the_examples() {
    for name in [
        "chelsea.jpg",
        "coffee.jpg",
        "camera.jpg",
        "chelsea_exif_rotate90.jpg",
    ] {
        let path: &Path = &photo(name);
        let size = std::fs::metadata(path).unwrap().len();
        assert!(size <= 60 * 1024, "{name} is {size} bytes");
    }
    let classes = std::fs::read_to_string(root().join("data/imagenet/classes.txt")).unwrap();
    let classes: Vec<&str> = classes.lines().collect();
    assert_eq!(classes.len(), 1000);
    assert_eq!(
        (classes[0], classes[281], classes[967]),
        ("tench", "tabby", "espresso")
    );
}
