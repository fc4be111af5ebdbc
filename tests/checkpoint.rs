//! Checkpoints: round trip, atomic writes, clear errors for corrupt or mismatched files.

mod common;

use std::path::PathBuf;

use common::{gpu, random};
use wgcnn::Tensor;
use wgcnn::train::{Checkpoint, check_names_and_shapes};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("wgcnn-checkpoint-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("model.safetensors")
}

fn sample(seed: u64) -> Checkpoint {
    Checkpoint::new(vec![
        ("features.0.weight".into(), random(&[6, 1, 5, 5], seed)),
        ("features.0.bias".into(), random(&[6], seed + 1)),
        ("classifier.weight".into(), random(&[10, 84], seed + 2)),
    ])
    .unwrap()
}

#[test]
fn round_trip_from_gpu_tensors_is_exact() {
    let Some(gpu) = gpu() else { return };
    let w = random(&[3, 4], 1);
    let b = random(&[3], 2);
    let (tw, tb) = (
        Tensor::from_array(gpu, &w).unwrap(),
        Tensor::from_array(gpu, &b).unwrap(),
    );
    let path = scratch("gpu");
    Checkpoint::from_tensors(&[("fc.weight", &tw), ("fc.bias", &tb)])
        .unwrap()
        .save(&path)
        .unwrap();
    let loaded = Checkpoint::load(&path).unwrap();
    assert_eq!(loaded.get("fc.weight").unwrap(), &w);
    assert_eq!(loaded.get("fc.bias").unwrap(), &b);
    check_names_and_shapes(&loaded, &[("fc.weight", &[3, 4]), ("fc.bias", &[3])]).unwrap();
}

#[test]
fn a_failed_save_leaves_the_previous_checkpoint_intact() {
    let path = scratch("atomic");
    let first = sample(1);
    first.save(&path).unwrap();
    // Block the temporary file with a directory: the second save must fail cleanly.
    std::fs::create_dir_all(path.with_file_name("model.safetensors.tmp")).unwrap();
    let err = sample(2).save(&path).unwrap_err();
    assert!(
        err.to_string().contains("cannot write the checkpoint"),
        "{err}"
    );
    assert_eq!(Checkpoint::load(&path).unwrap(), first);
    // Once the obstacle is gone, saving replaces the file.
    std::fs::remove_dir(path.with_file_name("model.safetensors.tmp")).unwrap();
    sample(2).save(&path).unwrap();
    assert_eq!(Checkpoint::load(&path).unwrap(), sample(2));
}

#[test]
fn corrupt_and_mismatched_checkpoints_are_clear_errors() {
    let path = scratch("corrupt");
    sample(3).save(&path).unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.truncate(bytes.len() / 2);
    std::fs::write(&path, &bytes).unwrap();
    let err = Checkpoint::load(&path).unwrap_err();
    assert!(
        err.to_string().contains("not a valid safetensors file"),
        "{err}"
    );
    std::fs::write(&path, b"not a checkpoint at all").unwrap();
    assert!(Checkpoint::load(&path).is_err());
    let err = Checkpoint::load("/no/such/model.safetensors").unwrap_err();
    assert!(
        err.to_string().contains("cannot read the checkpoint"),
        "{err}"
    );

    let err = check_names_and_shapes(
        &sample(4),
        &[
            ("features.0.weight", &[6, 1, 3, 3]),
            ("features.0.bias", &[6]),
            ("head.weight", &[10, 84]),
        ],
    )
    .unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("\"features.0.weight\" is [6, 1, 5, 5], the model needs [6, 1, 3, 3]"),
        "{message}"
    );
    assert!(message.contains("missing \"head.weight\""), "{message}");
    assert!(
        message.contains("unexpected \"classifier.weight\""),
        "{message}"
    );

    let err = Checkpoint::new(vec![
        ("a".into(), random(&[1], 1)),
        ("a".into(), random(&[1], 2)),
    ])
    .unwrap_err();
    assert!(err.to_string().contains("appears twice"), "{err}");
}
