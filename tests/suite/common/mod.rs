//! Shared test setup: a few `Gpu`s per test process, shared by its tests (lavapipe leaks
//! devices created per test).

pub mod golden;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use ndarray::{ArrayD, IxDyn};
use rand::{RngExt, SeedableRng, rngs::StdRng};
use wgcnn::Gpu;

/// Options for the tests' contexts: the environment's, with the fixed kernel order (each
/// test reaches the kernels its shapes are chosen for, whatever a trial would time; the
/// tuner has its own tests) and no cache file.
pub fn options() -> wgcnn::GpuOptions {
    wgcnn::GpuOptions {
        tuning: wgcnn::tuning::Tuning::Fixed,
        tuning_cache: None,
        ..wgcnn::GpuOptions::from_env().unwrap()
    }
}

/// A context with the tests' [`options`].
pub fn new_gpu() -> Gpu {
    Gpu::with_options(options()).unwrap()
}

/// This test's GPU: one of the process's [`SLOTS`] contexts, the one fewest running tests
/// hold, kept for the test. A missing adapter fails the test (say WGCNN_SKIP_GPU_TESTS=1 to
/// skip on purpose on a machine without one; CI never does).
pub fn gpu() -> Option<&'static Gpu> {
    match slot()
        .shared
        .get_or_init(|| Gpu::with_options(options()).map_err(|e| e.to_string()))
    {
        Ok(gpu) => Some(gpu),
        Err(e) if std::env::var_os("WGCNN_SKIP_GPU_TESTS").is_some() => {
            eprintln!("skipping a GPU test on request: {e}");
            None
        }
        Err(e) => panic!("no GPU for the tests: {e}"),
    }
}

/// How many sets of shared contexts a test process keeps: one for each of CI's two cores.
/// lavapipe compiles a kernel on first use on its device's queue thread, so two tests
/// sharing one device compile one kernel at a time (the portable family's matmul.rs
/// 164 → 153 s, conv2d.rs 228 → 200 s with two). More would only add devices (lavapipe
/// leaks one created per test) and compile each kernel again for each.
const SLOTS: usize = 2;

/// One slot's contexts, each made on first use and never dropped, and the tests holding it.
struct Contexts {
    shared: OnceLock<Result<Gpu, String>>,
    texture: OnceLock<Gpu>,
    storage: OnceLock<Gpu>,
    holders: AtomicUsize,
}

static SLOT_CONTEXTS: [Contexts; SLOTS] = [const {
    Contexts {
        shared: OnceLock::new(),
        texture: OnceLock::new(),
        storage: OnceLock::new(),
        holders: AtomicUsize::new(0),
    }
}; SLOTS];

/// The slot a test's thread took on its first `gpu()` call. As the thread ends it waits for
/// what was submitted to the slot's contexts, which are never dropped (dropping a `Gpu`
/// waits), then gives the slot up. libtest joins every test's thread, its thread-locals'
/// destructors included, before the process exits; a process that exits while lavapipe's
/// queue thread still compiles a kernel can abort (docs/guide.md, "Failure modes"), so no
/// test needs to end on a read-back.
struct Slot(&'static Contexts);

impl Slot {
    fn take() -> Slot {
        let contexts = SLOT_CONTEXTS
            .iter()
            .min_by_key(|c| c.holders.load(Ordering::Relaxed))
            .unwrap_or(&SLOT_CONTEXTS[0]);
        contexts.holders.fetch_add(1, Ordering::Relaxed);
        Slot(contexts)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let contexts = self.0;
        let shared = contexts.shared.get().and_then(|gpu| gpu.as_ref().ok());
        for gpu in [shared, contexts.texture.get(), contexts.storage.get()]
            .into_iter()
            .flatten()
        {
            // A test that lost its device has said so already.
            let _ = gpu.synchronize();
        }
        contexts.holders.fetch_sub(1, Ordering::Relaxed);
    }
}

thread_local! {
    static SLOT: Slot = Slot::take();
}

/// This test's slot's contexts.
fn slot() -> &'static Contexts {
    SLOT.with(|slot| slot.0)
}

/// A context on the same adapter forced to read kernel operands one way, whatever this
/// host's calibration would pick. `None` where `gpu()` is.
fn forced_gpu(
    reads: wgcnn::tuning::OperandReads,
    cell: fn(&'static Contexts) -> &'static OnceLock<Gpu>,
) -> Option<&'static Gpu> {
    gpu()?;
    Some(cell(slot()).get_or_init(|| Gpu::with_options(reading(reads)).unwrap()))
}

/// The tests' [`options`], operands read `reads`' way.
fn reading(reads: wgcnn::tuning::OperandReads) -> wgcnn::GpuOptions {
    wgcnn::GpuOptions {
        operand_reads: Some(reads),
        ..options()
    }
}

/// A context forced to read kernel operands through textures (what the calibration picks
/// on hosts where texel loads are the cheaper ones).
pub fn texture_gpu() -> Option<&'static Gpu> {
    forced_gpu(wgcnn::tuning::OperandReads::Texture, |c| &c.texture)
}

/// A context forced to read kernel operands from storage buffers.
pub fn storage_gpu() -> Option<&'static Gpu> {
    forced_gpu(wgcnn::tuning::OperandReads::Storage, |c| &c.storage)
}

/// Both operand-read families, forced, so that a test runs every kernel variant on any host
/// (this test's `gpu()` runs only the one its calibration picked).
pub fn read_family_gpus() -> Option<[&'static Gpu; 2]> {
    Some([storage_gpu()?, texture_gpu()?])
}

/// Fresh contexts forced to each operand-read family with wgpu's runtime checks on (index
/// clamping, loop bounding), whatever `WGCNN_RUNTIME_CHECKS` says: for a test that must run
/// its kernels checked in every CI pass. `None` where `gpu()` is.
pub fn checked_read_family_gpus() -> Option<[Gpu; 2]> {
    gpu()?;
    Some(
        [
            wgcnn::tuning::OperandReads::Storage,
            wgcnn::tuning::OperandReads::Texture,
        ]
        .map(|reads| {
            let options = wgcnn::GpuOptions {
                runtime_checks: true,
                ..reading(reads)
            };
            Gpu::with_options(options).unwrap()
        }),
    )
}

/// A fresh context with the tests' [`options`] whose buffers and storage bindings are capped
/// at `bytes` (`GpuOptions::buffer_limit`): an op reaches its chunking at the adapter's limit
/// with tensors that small. `None` where `gpu()` is.
pub fn capped_gpu(bytes: u64) -> Option<Gpu> {
    gpu()?;
    let options = wgcnn::GpuOptions {
        buffer_limit: Some(bytes),
        ..options()
    };
    Some(Gpu::with_options(options).unwrap())
}

/// This test's GPU (first, where there is one) and the CPU reference path: the
/// devices a test runs the same model on.
pub fn devices() -> Vec<wgcnn::Device> {
    let mut devices: Vec<_> = gpu()
        .map(|g| wgcnn::Device::Gpu(g.clone()))
        .into_iter()
        .collect();
    devices.push(wgcnn::Device::Cpu);
    devices
}

/// Uploads to this test's GPU (call after `gpu()` said there is one).
pub fn upload(x: &ArrayD<f32>) -> wgcnn::Tensor {
    wgcnn::Tensor::from_array(gpu().expect("a GPU"), x).unwrap()
}

/// Uniform values in [-1, 1) from a seed.
pub fn random(shape: &[usize], seed: u64) -> ArrayD<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    ArrayD::from_shape_simple_fn(IxDyn(shape), || rng.random_range(-1.0f32..1.0))
}

/// Largest absolute difference, NaN counting as infinite.
pub fn max_abs_diff(a: &ArrayD<f32>, b: &ArrayD<f32>) -> f32 {
    assert_eq!(a.shape(), b.shape());
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            if x.is_nan() || y.is_nan() {
                f32::INFINITY
            } else {
                (x - y).abs()
            }
        })
        .fold(0.0, f32::max)
}

/// One forward pass of `graph` in `mode` and, outside `Mode::Eval`, a backward one: the
/// output, the input's gradient and every trainable tensor's, and the state after it
/// (running statistics). For comparing a graph that fuses layers with one that does not.
pub fn graph_step(
    graph: &mut wgcnn::Graph,
    x: &ArrayD<f32>,
    mode: wgcnn::Mode,
) -> Vec<(String, ArrayD<f32>)> {
    let input = graph.device().upload(x.clone()).unwrap();
    let y = graph.forward(input, mode).unwrap().to_array().unwrap();
    let mut out = vec![("y".to_string(), y.clone())];
    if mode != wgcnn::Mode::Eval {
        let dy = random(y.shape(), 3).mapv(|v| v + 0.5);
        let dx = graph.backward(graph.device().upload(dy).unwrap()).unwrap();
        out.push(("dx".into(), dx.unwrap().to_array().unwrap()));
        for (name, grad) in graph.grads() {
            out.push((format!("d {name}"), grad.unwrap().to_array().unwrap()));
        }
    }
    for (name, value) in graph.state() {
        out.push((name, value.to_array().unwrap()));
    }
    out
}

/// Asserts that two [`graph_step`]s agree within 1e-5 of each value's largest magnitude.
pub fn assert_steps_agree(
    got: &[(String, ArrayD<f32>)],
    want: &[(String, ArrayD<f32>)],
    context: &str,
) {
    assert_eq!(got.len(), want.len(), "{context}");
    for ((name, got), (_, want)) in got.iter().zip(want) {
        let scale = want.iter().fold(1.0f32, |m, v| m.max(v.abs()));
        let diff = max_abs_diff(got, want);
        assert!(
            diff <= 1e-5 * scale,
            "{context} {name}: off by {diff} (scale {scale})"
        );
    }
}

/// A fresh folder of the system's temporary one for one test, removed with what the test
/// wrote there when dropped (a failing test's is removed too, as its panic unwinds).
pub struct Scratch(PathBuf);

impl Scratch {
    /// `wgcnn-{name}-{process id}`, emptied first: an earlier process with the same id may
    /// have left it behind if it was killed.
    pub fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("wgcnn-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// `name` in the folder.
    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// Writes `bytes` to `name` in the folder.
    pub fn file(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
