//! The loaders under hostile bytes: the IDX reader, the checkpoint loader (safetensors and
//! PyTorch `.pth`) and image decoding (`Dataset::from_folder`) must return an error, never
//! panic or abort. The corpus in `tests/corpus/` (hand-made cases, `make_corpus.py` and
//! `make_pth_corpus.py`, plus anything a fuzz run finds) is replayed on every run; proptest
//! then mutates the good files and tries random bytes. A `.pth` file's pickle is also mutated
//! on its own and packed again, so that the zip's checksums pass and the pickle reader sees it.

use std::io::{Cursor, Read, Write};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::common;

use proptest::prelude::*;
#[cfg(feature = "image")]
use wgcnn::data::Dataset;
use wgcnn::data::{read_idx_images, read_idx_labels};
use wgcnn::train::{Checkpoint, image_batch};
use wgcnn::{Device, Normalize};

const CORPUS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/corpus");

/// A scratch file holding `bytes`, named `name` inside a class folder of a folder of its
/// own, removed with the folder as it drops.
struct ScratchFile {
    _folder: common::Scratch,
    file: PathBuf,
}

impl ScratchFile {
    fn new(tag: &str, name: &str, bytes: &[u8]) -> Self {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let id = COUNTER.fetch_add(1, Ordering::Relaxed);
        let folder = common::Scratch::new(&format!("fuzz-{tag}-{id}"));
        let class = folder.join("class0");
        std::fs::create_dir_all(&class).unwrap();
        let file = class.join(name);
        std::fs::write(&file, bytes).unwrap();
        Self {
            _folder: folder,
            file,
        }
    }
}

/// Runs `load` and fails the test on a panic; returns whether it loaded.
fn no_panic(what: &str, load: impl FnOnce() -> bool) -> bool {
    catch_unwind(AssertUnwindSafe(load)).unwrap_or_else(|_| panic!("{what} panicked"))
}

/// IDX: read as images and as labels; whatever loads is used (every image of a batch).
fn idx(path: &Path) -> bool {
    let images = read_idx_images(path).ok().map(|images| {
        let all: Vec<usize> = (0..images.count.min(64)).collect();
        for i in &all {
            assert_eq!(images.image(*i).len(), images.rows * images.cols);
        }
        let _ = image_batch(&Device::Cpu, &images, &all, &Normalize::mnist());
    });
    let labels = read_idx_labels(path).ok();
    images.is_some() || labels.is_some()
}

/// Equal names, shapes and bits (a loaded NaN is not equal to itself).
fn assert_same_bits(a: &Checkpoint, b: &Checkpoint) {
    let bits = |c: &Checkpoint| -> Vec<(String, Vec<usize>, Vec<u32>)> {
        c.tensors
            .iter()
            .map(|(n, t)| {
                (
                    n.clone(),
                    t.shape().to_vec(),
                    t.iter().map(|v| v.to_bits()).collect(),
                )
            })
            .collect()
    };
    assert_eq!(bits(a), bits(b));
    assert_eq!(a.integers, b.integers);
}

/// A checkpoint (safetensors or `.pth`): load, then save the result as safetensors and load it
/// again, unchanged.
fn checkpoint(path: &Path) -> bool {
    let Ok(loaded) = Checkpoint::load(path) else {
        return false;
    };
    let copy = path.with_extension("copy");
    loaded.save(&copy).unwrap();
    assert_same_bits(&Checkpoint::load(&copy).unwrap(), &loaded);
    true
}

/// A `.pth` file's zip entries, in order.
fn zip_entries(bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut archive = zip::ZipArchive::new(Cursor::new(bytes)).unwrap();
    (0..archive.len())
        .map(|i| {
            let mut entry = archive.by_index(i).unwrap();
            let mut body = Vec::new();
            entry.read_to_end(&mut body).unwrap();
            (entry.name().unwrap().to_string(), body)
        })
        .collect()
}

/// The entries packed again, `data.pkl` replaced by `pickle` (stored, valid checksums).
fn with_pickle(entries: &[(String, Vec<u8>)], pickle: &[u8]) -> Vec<u8> {
    let mut writer = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let options =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, body) in entries {
        writer.start_file(name.as_str(), options).unwrap();
        let body = if name.ends_with("/data.pkl") {
            pickle
        } else {
            body
        };
        writer.write_all(body).unwrap();
    }
    writer.finish().unwrap().into_inner()
}

/// The `data.pkl` of a good `.pth` file, mutated, in the file's zip.
fn mutated_pickle(name: &str) -> impl Strategy<Value = Vec<u8>> {
    let entries = zip_entries(&good("pth", name));
    let pickle = entries
        .iter()
        .find(|(n, _)| n.ends_with("/data.pkl"))
        .map(|(_, body)| body.clone())
        .unwrap();
    mutated(pickle).prop_map(move |pickle| with_pickle(&entries, &pickle))
}

/// An image file as the only image of a one-class folder.
fn image_folder(path: &Path) -> bool {
    #[cfg(feature = "image")]
    {
        let root = path.parent().and_then(Path::parent).unwrap();
        Dataset::from_folder(root, (4, 4), 1).is_ok()
    }
    #[cfg(not(feature = "image"))]
    {
        let _ = path;
        false
    }
}

fn loader(kind: &str) -> fn(&Path) -> bool {
    match kind {
        "idx" => idx,
        "safetensors" | "pth" => checkpoint,
        _ => image_folder,
    }
}

#[test]
fn the_corpus_loads_or_fails_cleanly() {
    let mut replayed = 0;
    for kind in ["idx", "safetensors", "pth", "image"] {
        let mut files: Vec<PathBuf> = std::fs::read_dir(Path::new(CORPUS).join(kind))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        for file in files {
            let name = file.file_name().unwrap().to_string_lossy().to_string();
            let scratch = ScratchFile::new(kind, &name, &std::fs::read(&file).unwrap());
            let loaded = no_panic(&format!("{kind} {name}"), || loader(kind)(&scratch.file));
            // The good files must load: a loader that refused everything would pass too.
            if name.starts_with("good") && (kind != "image" || cfg!(feature = "image")) {
                assert!(loaded, "{kind} {name} must load");
            }
            replayed += 1;
        }
    }
    assert!(replayed >= 30, "{replayed} corpus files");
}

fn good(kind: &str, name: &str) -> Vec<u8> {
    std::fs::read(Path::new(CORPUS).join(kind).join(name)).unwrap()
}

/// A good file with some bytes overwritten and perhaps cut short.
fn mutated(original: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    let len = original.len();
    (
        proptest::collection::vec((0..len, any::<u8>()), 1..6),
        0..=len,
    )
        .prop_map(move |(edits, keep)| {
            let mut bytes = original.clone();
            for (at, value) in edits {
                bytes[at] = value;
            }
            bytes.truncate(keep.max(1));
            bytes
        })
}

proptest! {
    // 256 cases each by default; PROPTEST_CASES=100000 for a longer fuzz run.
    #[test]
    fn idx_files_never_panic(bytes in prop_oneof![
        mutated(good("idx", "good_images.idx")),
        mutated(good("idx", "good_labels.idx")),
        proptest::collection::vec(any::<u8>(), 0..64),
    ]) {
        let scratch = ScratchFile::new("idx", "data.idx", &bytes);
        no_panic("idx", || idx(&scratch.file));
    }

    #[test]
    fn checkpoints_never_panic(bytes in prop_oneof![
        mutated(good("safetensors", "good.safetensors")),
        proptest::collection::vec(any::<u8>(), 0..96),
    ]) {
        let scratch = ScratchFile::new("safetensors", "model.safetensors", &bytes);
        no_panic("safetensors", || checkpoint(&scratch.file));
    }

    #[test]
    fn pth_files_never_panic(bytes in prop_oneof![
        mutated(good("pth", "good_model.pth")),
        mutated(good("pth", "good_views.pth")),
        mutated(good("pth", "good_legacy_model.pth")),
        mutated(good("pth", "good_hand_made.pth")),
        mutated_pickle("good_views.pth"),
        mutated_pickle("good_protocol4.pth"),
        mutated_pickle("good_checkpoint.pth"),
        mutated_pickle("good_dtypes.pth"),
        proptest::collection::vec(any::<u8>(), 0..96).prop_map(|tail| [b"PK\x03\x04".as_slice(), &tail].concat()),
        proptest::collection::vec(any::<u8>(), 0..96),
    ]) {
        let scratch = ScratchFile::new("pth", "model.pth", &bytes);
        no_panic("pth", || checkpoint(&scratch.file));
    }

    #[test]
    fn images_never_panic(bytes in prop_oneof![
        mutated(good("image", "good.png")),
        proptest::collection::vec(any::<u8>(), 0..96),
    ], jpeg: bool) {
        let name = if jpeg { "picture.jpg" } else { "picture.png" };
        let scratch = ScratchFile::new("image", name, &bytes);
        no_panic("image", || image_folder(&scratch.file));
    }
}
