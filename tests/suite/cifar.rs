//! CIFAR-10's binary version read from a small set written here in its format (the full set
//! is downloaded by scripts/fetch_cifar10.sh, not shipped): records in order, the R, G and B
//! planes where they belong, class names from batches.meta.txt, and every malformed file an
//! error naming it.

use std::path::Path;

use crate::common;

use common::Scratch;
use wgcnn::data::{Cifar10, Dataset, Pixels};

const CLASSES: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];

/// Record `index` of file `file`: its label and 3,072 pixels, different in every plane.
fn record(file: usize, index: usize) -> (u8, Vec<u8>) {
    let label = ((file * 3 + index) % 10) as u8;
    let pixels = (0..3072)
        .map(|j| (j / 1024 * 80 + (file * 31 + index * 7 + j) % 64) as u8)
        .collect();
    (label, pixels)
}

/// A fresh folder holding `cifar-10-batches-bin/` with `records[f]` records in file `f`
/// (five training files, then the test file), removed as it drops.
fn write_set(name: &str, records: [usize; 6]) -> Scratch {
    let root = Scratch::new(&format!("cifar-{name}"));
    let dir = root.join("cifar-10-batches-bin");
    std::fs::create_dir_all(&dir).unwrap();
    let names = [
        "data_batch_1.bin",
        "data_batch_2.bin",
        "data_batch_3.bin",
        "data_batch_4.bin",
        "data_batch_5.bin",
        "test_batch.bin",
    ];
    for (file, (&name, &count)) in names.iter().zip(&records).enumerate() {
        let mut bytes = Vec::new();
        for index in 0..count {
            let (label, pixels) = record(file, index);
            bytes.push(label);
            bytes.extend(pixels);
        }
        std::fs::write(dir.join(name), bytes).unwrap();
    }
    std::fs::write(dir.join("batches.meta.txt"), CLASSES.join("\n") + "\n\n").unwrap();
    root
}

/// What files `files` of the set should read as.
fn expected(files: std::ops::Range<usize>, records: [usize; 6]) -> Dataset {
    let (mut labels, mut pixels) = (Vec::new(), Vec::new());
    for file in files {
        for index in 0..records[file] {
            let (label, p) = record(file, index);
            labels.push(usize::from(label));
            pixels.extend(p);
        }
    }
    let classes = CLASSES.iter().map(|c| c.to_string()).collect();
    Dataset::new(
        [labels.len(), 3, 32, 32],
        Pixels::U8(pixels),
        labels,
        Some(classes),
    )
    .unwrap()
}

#[test]
fn records_planes_and_class_names_as_written() {
    let records = [2, 1, 3, 1, 2, 3];
    let set = write_set("good", records);
    let root = set.path();
    // The directory the fetch script fills, or its cifar-10-batches-bin/.
    for dir in [root.to_path_buf(), root.join("cifar-10-batches-bin")] {
        let cifar = Cifar10::load(&dir).unwrap();
        assert_eq!(cifar.train, expected(0..5, records));
        assert_eq!(cifar.test, expected(5..6, records));
        assert_eq!(cifar.train.shape(), [9, 3, 32, 32]);
        assert_eq!(cifar.test.classes()[9], "truck");
    }
    // Each plane holds its own channel: the planes' means differ by the 80 added per plane.
    let (mean, _) = Cifar10::load(root).unwrap().test.channel_stats();
    assert!(mean[1] > mean[0] && mean[2] > mean[1], "{mean:?}");
}

fn error(root: &Path) -> String {
    Cifar10::load(root).unwrap_err().to_string()
}

#[test]
fn malformed_sets_are_errors_naming_the_file() {
    let missing = std::env::temp_dir().join("wgcnn-cifar-none");
    let err = error(&missing);
    assert!(
        err.contains("batches.meta.txt") && err.contains("fetch_cifar10.sh"),
        "{err}"
    );

    let set = write_set("truncated", [1, 1, 1, 1, 1, 2]);
    let root = set.path();
    let test = root.join("cifar-10-batches-bin/test_batch.bin");
    let bytes = std::fs::read(&test).unwrap();
    std::fs::write(&test, &bytes[..bytes.len() - 5]).unwrap();
    let err = error(root);
    assert!(
        err.contains("test_batch.bin") && err.contains("not a whole number of 3073-byte records"),
        "{err}"
    );
    std::fs::write(&test, []).unwrap();
    assert!(error(root).contains("0 bytes"), "{}", error(root));

    let mut bad_label = bytes.clone();
    bad_label[3073] = 10;
    std::fs::write(&test, bad_label).unwrap();
    let err = error(root);
    assert!(err.contains("record 1 has label 10"), "{err}");

    std::fs::write(&test, bytes).unwrap();
    let meta = root.join("cifar-10-batches-bin/batches.meta.txt");
    std::fs::write(&meta, CLASSES[..9].join("\n")).unwrap();
    let err = error(root);
    assert!(err.contains("9 class names"), "{err}");
}
