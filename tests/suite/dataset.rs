//! `Dataset`: construction and its errors, per-channel statistics, batches on GPU and CPU,
//! MNIST as a source, a folder of images, training and evaluation over it.

use crate::common;

use common::{gpu, max_abs_diff};
use wgcnn::data::shuffled_indices;
use wgcnn::prelude::*;
use wgcnn::train::{EpochStats, image_batch};

/// 5 RGB 3×4 images of bytes, labels 0..3.
fn rgb_bytes() -> Dataset {
    let pixels: Vec<u8> = (0..5 * 3 * 3 * 4).map(|i| (i * 37 % 256) as u8).collect();
    Dataset::new([5, 3, 3, 4], Pixels::U8(pixels), vec![0, 1, 2, 1, 0], None).unwrap()
}

#[test]
fn construction_checks_sizes_and_labels() {
    let data = rgb_bytes();
    assert_eq!((data.len(), data.shape()), (5, [5, 3, 3, 4]));
    assert_eq!(data.classes(), ["0", "1", "2"]);
    let bad = [
        Dataset::new([2, 1, 2, 2], Pixels::F32(vec![0.0; 7]), vec![0, 1], None),
        Dataset::new([2, 1, 2, 2], Pixels::F32(vec![0.0; 8]), vec![0], None),
        Dataset::new([0, 1, 2, 2], Pixels::F32(vec![]), vec![], None),
        Dataset::new(
            [1, 1, 1, 1],
            Pixels::U8(vec![0]),
            vec![3],
            Some(vec!["a".into()]),
        ),
        Dataset::new([usize::MAX, 2, 2, 2], Pixels::U8(vec![]), vec![], None),
    ];
    for result in bad {
        let err = result.unwrap_err();
        assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
    }
    assert!(data.labels_at(&[4, 5]).is_err());
    assert!(data.batches(0, 1, 0).is_err());
}

#[test]
fn channel_stats_are_per_channel() {
    // Channel 0 holds 0 and 1 (mean 0.5, std 0.5); channel 1 is constant 0.25.
    let pixels = vec![0.0, 1.0, 0.25, 0.25];
    let data = Dataset::new([1, 2, 1, 2], Pixels::F32(pixels), vec![0], None).unwrap();
    let (mean, std) = data.channel_stats();
    assert_eq!((mean, std), (vec![0.5, 0.25], vec![0.5, 0.0]));
    // Bytes are scaled to [0, 1] first.
    let data = Dataset::new([1, 1, 1, 2], Pixels::U8(vec![0, 255]), vec![0], None).unwrap();
    assert_eq!(data.channel_stats(), (vec![0.5], vec![0.5]));
}

#[test]
fn batches_follow_the_seeded_order() {
    let data = rgb_bytes();
    let batches = data.batches(2, 7, 3).unwrap();
    assert_eq!(batches.len(), 3);
    assert_eq!(batches.concat(), shuffled_indices(5, 7, 3));
}

#[test]
fn batches_normalise_per_channel_on_gpu_and_cpu() {
    let Some(gpu) = gpu() else { return };
    let normalize = Normalize::new(&[0.1, 0.5, 0.9], &[0.5, 0.25, 2.0]).unwrap();
    let data = rgb_bytes();
    let floats: Vec<f32> = (0..5 * 3 * 3 * 4)
        .map(|i| (i * 37 % 256) as f32 / 255.0)
        .collect();
    let as_floats =
        Dataset::new([5, 3, 3, 4], Pixels::F32(floats), vec![0, 1, 2, 1, 0], None).unwrap();
    let indices = [4, 1, 1];
    let mut want = ArrayD::zeros(IxDyn(&[3, 3, 3, 4]));
    for (b, &i) in indices.iter().enumerate() {
        for c in 0..3 {
            for p in 0..12 {
                let byte = ((i * 36 + c * 12 + p) * 37 % 256) as f32;
                let (mean, std) = ([0.1, 0.5, 0.9][c], [0.5, 0.25, 2.0][c]);
                want[[b, c, p / 4, p % 4]] = (byte / 255.0 - mean) / std;
            }
        }
    }
    for set in [&data, &as_floats] {
        for device in [Device::Gpu(gpu.clone()), Device::Cpu] {
            let got = set
                .batch(&device, &indices, &normalize)
                .unwrap()
                .to_array()
                .unwrap();
            assert!(max_abs_diff(&got, &want) < 1e-5, "{device:?}");
        }
    }
    assert!(data.batch(&Device::Cpu, &[5], &normalize).is_err());
}

#[test]
fn mnist_is_one_source_and_trains_as_before() {
    let Some(gpu) = gpu() else { return };
    let mnist = Mnist::load("data/mnist").unwrap();
    let (images, labels) = (mnist.train_images.first(200), &mnist.train_labels[..200]);
    let data = Dataset::from_images(&images, labels).unwrap();
    let device = Device::Gpu(gpu.clone());
    let normalize = Normalize::mnist();
    let indices = [3, 0, 199];
    let want = image_batch(&device, &images, &indices, &normalize)
        .unwrap()
        .to_array()
        .unwrap();
    let got = data
        .batch(&device, &indices, &normalize)
        .unwrap()
        .to_array()
        .unwrap();
    assert_eq!(got, want);
    assert_eq!(
        data.labels_at(&indices).unwrap(),
        label_batch(labels, &indices).unwrap()
    );

    // train_epoch over the images and train_epoch_on over the dataset: the same weights.
    let run = |on_dataset: bool| -> (EpochStats, Vec<f32>) {
        let mut model = lenet5(LeNetOptions::default())
            .unwrap()
            .build(device.clone(), 3)
            .unwrap();
        let mut opt = model.optimizer(Optimizer::sgd(0.05)).unwrap();
        let stats = if on_dataset {
            train_epoch_on(&mut model, &mut opt, &data, &normalize, 32, 5, 0).unwrap()
        } else {
            train_epoch(&mut model, &mut opt, &images, labels, &normalize, 32, 5, 0).unwrap()
        };
        let fc3 = model
            .state()
            .into_iter()
            .find(|(n, _)| n == "fc3.weight")
            .unwrap()
            .1;
        (stats, fc3.to_array().unwrap().iter().copied().collect())
    };
    let (a, wa) = run(true);
    let (b, wb) = run(false);
    assert_eq!((a.loss, a.accuracy, wa), (b.loss, b.accuracy, wb));
    let mut model = lenet5(LeNetOptions::default())
        .unwrap()
        .build(device, 3)
        .unwrap();
    let eval = evaluate_on(&mut model, &data, &normalize, 64).unwrap();
    assert!(eval.loss.is_finite() && (0.0..=1.0).contains(&eval.accuracy));
}

#[cfg(feature = "image")]
#[test]
fn a_folder_of_images_with_one_sub_folder_per_class() {
    let scratch = common::Scratch::new("dataset");
    let dir = scratch.path();
    // Two classes of solid-colour PNGs and JPEGs of different sizes, and a stray file.
    for (class, colour, count) in [("cats", [200u8, 10, 10], 2), ("dogs", [10, 10, 200], 3)] {
        std::fs::create_dir_all(dir.join(class)).unwrap();
        for i in 0..count {
            let image = image::RgbImage::from_pixel(6 + i, 5 + i, image::Rgb(colour));
            let name = if i == 1 {
                format!("{i}.jpg")
            } else {
                format!("{i}.png")
            };
            image.save(dir.join(class).join(name)).unwrap();
        }
    }
    // Hidden files and files that are no images by extension are skipped and listed.
    std::fs::write(dir.join("cats").join(".DS_Store"), b"finder").unwrap();
    std::fs::write(dir.join("dogs").join("notes.txt"), b"good dogs").unwrap();
    std::fs::create_dir_all(dir.join(".ipynb_checkpoints")).unwrap();
    let data = Dataset::from_folder(dir, (4, 4), 3).unwrap();
    assert_eq!(data.shape(), [5, 3, 4, 4]);
    assert_eq!(data.classes(), ["cats", "dogs"]);
    assert_eq!(data.labels(), [0, 0, 1, 1, 1]);
    let skipped: Vec<_> = data
        .skipped()
        .iter()
        .map(|p| p.file_name().unwrap())
        .collect();
    assert_eq!(skipped, [".DS_Store", "notes.txt"]);

    // An empty class folder would shift every later label: an error naming it, or with
    // allow_empty_classes a class of its own with no images.
    std::fs::create_dir_all(dir.join("birds")).unwrap();
    let err = Dataset::from_folder(dir, (4, 4), 3)
        .unwrap_err()
        .to_string();
    assert!(err.contains("birds") && err.contains("no images"), "{err}");
    let options = wgcnn::data::FolderOptions {
        allow_empty_classes: true,
    };
    let with_empty = Dataset::from_folder_with(dir, (4, 4), 3, options).unwrap();
    assert_eq!(with_empty.classes(), ["birds", "cats", "dogs"]);
    assert_eq!(with_empty.labels(), [1, 1, 2, 2, 2]);
    std::fs::remove_dir(dir.join("birds")).unwrap();
    let x = data
        .batch(
            &Device::Cpu,
            &[0, 4],
            &Normalize::new(&[0.0; 3], &[1.0; 3]).unwrap(),
        )
        .unwrap()
        .to_array()
        .unwrap();
    // Red for the cat, blue for the dog, every pixel (JPEG within a few levels).
    assert!((x[[0, 0, 2, 2]] - 200.0 / 255.0).abs() < 0.02 && x[[0, 2, 2, 2]] < 0.1);
    assert!((x[[1, 2, 1, 3]] - 200.0 / 255.0).abs() < 0.02 && x[[1, 0, 1, 3]] < 0.1);
    let grey = Dataset::from_folder(dir, (4, 4), 1).unwrap();
    assert_eq!(grey.shape(), [5, 1, 4, 4]);

    // Errors name what is wrong: a file that is no image, a missing folder, bad sizes.
    std::fs::write(dir.join("dogs").join("notes.png"), b"not an image").unwrap();
    let err = Dataset::from_folder(dir, (4, 4), 3).unwrap_err();
    assert!(err.to_string().contains("notes.png"), "{err}");
    assert!(Dataset::from_folder(dir.join("missing"), (4, 4), 3).is_err());
    assert!(Dataset::from_folder(dir, (0, 4), 3).is_err());
    assert!(Dataset::from_folder(dir, (4, 4), 2).is_err());
}

/// A folder of photos prepared as a model's recipe prepares them (EXIF orientation, the
/// torchvision resize and centre crop), kept as bytes and normalised per batch.
#[cfg(feature = "image")]
#[test]
fn a_folder_of_photos_takes_a_models_preprocessing() {
    use wgcnn::data::{IMAGENET_MEAN, IMAGENET_STD, Preprocess, load_image};
    let photos = concat!(env!("CARGO_MANIFEST_DIR"), "/data/photos");
    let scratch = common::Scratch::new("photos");
    let dir = scratch.path();
    for (class, file) in [
        ("cat", "chelsea.jpg"),
        ("cat", "chelsea_exif_rotate90.jpg"),
        ("coffee", "coffee.jpg"),
    ] {
        std::fs::create_dir_all(dir.join(class)).unwrap();
        std::fs::copy(format!("{photos}/{file}"), dir.join(class).join(file)).unwrap();
    }
    let preprocess = Preprocess::imagenet();
    let data = Dataset::from_folder_preprocessed(dir, &preprocess).unwrap();
    assert_eq!(data.shape(), [3, 3, 224, 224]);
    assert_eq!(data.classes(), ["cat", "coffee"]);
    assert_eq!(data.labels(), [0, 0, 1]);
    // Batches normalised with the recipe's statistics are the recipe's own output.
    let normalize = Normalize::new(&IMAGENET_MEAN, &IMAGENET_STD).unwrap();
    let x = data
        .batch(&Device::Cpu, &[1], &normalize)
        .unwrap()
        .to_array()
        .unwrap();
    let want = preprocess
        .apply(&load_image(format!("{photos}/chelsea_exif_rotate90.jpg")).unwrap())
        .unwrap()
        .insert_axis(ndarray::Axis(0))
        .into_dyn();
    assert!(max_abs_diff(&x, &want) < 1e-5);
    // Without a crop the images would differ in size: an error that says so.
    let err =
        Dataset::from_folder_preprocessed(dir, &Preprocess::new().resize(64).unwrap()).unwrap_err();
    assert!(err.to_string().contains("center_crop"), "{err}");
}
