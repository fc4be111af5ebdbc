//! Running out of device memory: provoked in a child process under `ulimit -v` (lavapipe's
//! device memory is the process's; a discrete GPU runs out of its own, about 140 GiB on an H200),
//! the context either keeps working for smaller work or its error says how to recover, and
//! recovering that way works.

use wgcnn::{Error, Gpu, Tensor};

const CHILD: &str = "WGCNN_OOM_CHILD";

/// The child's work: 128 MiB tensors until the device says no (lavapipe under the limit
/// below after a few; an H200 held more than 200, the earlier bound, before refusing).
fn exhaust(gpu: &Gpu) -> (Vec<Tensor>, Error) {
    let mut held = Vec::new();
    for _ in 0..4096 {
        match Tensor::full(gpu, &[32 << 20], 1.0) {
            Ok(t) => held.push(t),
            Err(e) => return (held, e),
        }
    }
    panic!("4096 tensors of 128 MiB (512 GiB) fitted: no device has that much memory");
}

#[test]
fn out_of_memory_is_an_error_with_a_way_back() {
    if std::env::var_os(CHILD).is_some() {
        return child();
    }
    if std::env::var_os("WGCNN_SKIP_GPU_TESTS").is_some() {
        return;
    }
    let exe = std::env::current_exe().unwrap();
    // 2 GiB of address space: room for the Vulkan driver and a few 128 MiB tensors.
    let script = format!(
        "ulimit -v 2097152 && exec '{}' --exact out_of_memory_is_an_error_with_a_way_back --nocapture",
        exe.display()
    );
    let out = std::process::Command::new("sh")
        .args(["-c", &script])
        .env(CHILD, "1")
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the child failed:\n{text}");
    assert!(text.contains("child: recovered"), "{text}");
}

fn child() {
    let gpu = Gpu::new().unwrap();
    let (held, err) = exhaust(&gpu);
    println!("child: {} tensors, then: {err}", held.len());
    let message = err.to_string();
    assert!(matches!(err, Error::OutOfMemory { .. }), "{message}");
    assert!(
        message.contains("create a new Gpu"),
        "the way back is in the message: {message}"
    );
    // The buffer was refused, nothing was lost: smaller work on the same context works.
    drop(held);
    let a = Tensor::full(&gpu, &[1024], 2.0)
        .unwrap()
        .to_array()
        .unwrap();
    assert!(a.iter().all(|&v| v == 2.0));
    println!("child: the context still works");
    // A fresh context works too (the way back when a device is lost).
    drop(gpu);
    let fresh = Gpu::new().unwrap();
    let a = Tensor::full(&fresh, &[1024], 3.0)
        .unwrap()
        .to_array()
        .unwrap();
    assert!(a.iter().all(|&v| v == 3.0));
    println!("child: recovered");
}
