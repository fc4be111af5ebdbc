//! `Gpu`: instance → adapter → device + queue, headless, shared by every tensor and op.

use std::sync::{Arc, Mutex, PoisonError};

use super::pipelines::PipelineCache;
use super::pool::{BufferPool, PoolStats};
use super::recording::Recording;
use super::tuning::Tuning;
use crate::error::{Error, Result};

/// How to pick the adapter. [`GpuOptions::from_env`] reads wgpu's usual variables.
#[derive(Clone, Debug)]
pub struct GpuOptions {
    /// Backends to search (`WGPU_BACKEND`, e.g. `vulkan`, `metal`, `dx12`, `gl`).
    pub backends: wgpu::Backends,
    /// Take the first adapter whose name contains this, case-insensitively (`WGPU_ADAPTER_NAME`).
    pub adapter_name: Option<String>,
    /// Preference between integrated and discrete GPUs (`WGPU_POWER_PREF`: `low`, `high`, `none`).
    pub power_preference: wgpu::PowerPreference,
    /// Bytes of idle buffers the pool may keep for reuse.
    pub pool_cache_bytes: u64,
    /// Bytes of buffers dropped during a recorded step ([`Gpu::record`]), and of operand
    /// textures it made (each kept until the commands reading it have run), that the step
    /// may hold back from reuse before it submits what it recorded so far, between two layers
    /// of a model (256 MiB: a LeNet step stays one submit, a ResNet-18 step at batch 32
    /// peaks at 1.8 GB instead of 11 GB). `u64::MAX` keeps every step one submit.
    pub recording_hold_bytes: u64,
    /// Forces how kernels that offer both read large operands (tests, experiments);
    /// `None` lets CPU adapters calibrate ([`Gpu::operand_reads`]).
    pub operand_reads: Option<super::texture::OperandReads>,
    /// How ops with several eligible kernels choose (`WGCNN_TUNING`: `measure`, `off`):
    /// timed on first use per shape ([`Tuning::Measure`], the default) or each op's fixed
    /// order ([`Tuning::Fixed`], reproducible).
    pub tuning: Tuning,
    /// The file that keeps measured choices between runs (`WGCNN_TUNING_CACHE`: a path, or
    /// `none`); by default `$XDG_CACHE_HOME/wgcnn/tuning.tsv` or `~/.cache/wgcnn/tuning.tsv`.
    /// Delete it to measure again.
    pub tuning_cache: Option<std::path::PathBuf>,
    /// Time a context may spend measuring (trials and the candidates' compilation; 1 s by
    /// default, checked between shapes; `WGCNN_TUNING_BUDGET`, in seconds); shapes met after
    /// that take the fixed order, and the next run measures them. [`Gpu::tuning_report`]
    /// says what was spent.
    pub tuning_budget: std::time::Duration,
    /// Compile the crate's kernels with wgpu's runtime checks (index clamping, loop
    /// bounding: `WGCNN_RUNTIME_CHECKS`, `on` or `off`). Off by default: every kernel guards
    /// its own accesses and bounds its own loops, and the checks cost time on every load
    /// (lavapipe: N8 64→64 56² 3×3 forward + backward 0.79× without them). On for debugging a kernel;
    /// CI runs the crate's unit tests (matmuls, convolutions, sums) with them on too.
    pub runtime_checks: bool,
    /// Which kernel designs run (`WGCNN_KERNELS`: `auto`, `portable`, `cpu`): by default
    /// the adapter's type picks ([`KernelFamily::Auto`]); forcing one runs and measures the
    /// other family's kernels on any adapter (tests, `perf --kernels`).
    pub kernel_family: KernelFamily,
    /// Caps the device's buffer and storage-binding sizes (bytes) below the adapter's own,
    /// to run as a GPU with smaller limits would (WebGPU's default binding is 128 MiB): every
    /// op then splits its batch into chunks that fit, as it does at the adapter's limit,
    /// and a tensor past the cap is an [`Error::TooLarge`]. `None` (the default) asks for
    /// everything the adapter offers. At least 1 MiB.
    pub buffer_limit: Option<u64>,
}

/// The two designs of the kernels that exist in both (`GpuOptions::kernel_family`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KernelFamily {
    /// The CPU-adapter family on CPU adapters (lavapipe), the portable one elsewhere.
    #[default]
    Auto,
    /// Workgroup-memory tiles and storage reads, designed for GPUs: the packed-vec4 matmul,
    /// direct convolutions without subgroup broadcasts, no operand textures.
    Portable,
    /// Register tiles shared by subgroup broadcasts, operands through textures where the
    /// calibration says they are cheaper: designed for CPU adapters, whose invocations are
    /// SIMD lanes. Needs subgroups of a fixed size; kernels that need them fall back to the
    /// portable design where the adapter has none.
    CpuAdapter,
}

impl Default for GpuOptions {
    fn default() -> Self {
        Self {
            backends: wgpu::Backends::all(),
            adapter_name: None,
            power_preference: wgpu::PowerPreference::HighPerformance,
            pool_cache_bytes: 1 << 30,
            recording_hold_bytes: 256 << 20,
            operand_reads: None,
            tuning: Tuning::Measure,
            tuning_cache: super::tuning::default_cache_file(),
            tuning_budget: std::time::Duration::from_secs(1),
            runtime_checks: false,
            kernel_family: KernelFamily::Auto,
            buffer_limit: None,
        }
    }
}

impl GpuOptions {
    /// Defaults, overridden by `WGPU_BACKEND`, `WGPU_ADAPTER_NAME`, `WGPU_POWER_PREF`,
    /// `WGCNN_TUNING`, `WGCNN_TUNING_CACHE`, `WGCNN_TUNING_BUDGET`, `WGCNN_RUNTIME_CHECKS`
    /// and `WGCNN_KERNELS`.
    /// A value not understood is an error listing the accepted ones (wgpu itself would
    /// ignore it and search no backend, or keep the default preference).
    pub fn from_env() -> Result<Self> {
        let default = Self::default();
        let var = |name| std::env::var(name).ok().filter(|s| !s.trim().is_empty());
        Ok(Self {
            backends: match var("WGPU_BACKEND") {
                Some(list) => parse_backends(&list)?,
                None => default.backends,
            },
            adapter_name: var("WGPU_ADAPTER_NAME"),
            power_preference: match var("WGPU_POWER_PREF") {
                Some(value) => parse_power_preference(&value)?,
                None => default.power_preference,
            },
            tuning: match var("WGCNN_TUNING") {
                Some(value) => parse_tuning(&value)?,
                None => default.tuning,
            },
            tuning_cache: match var("WGCNN_TUNING_CACHE") {
                Some(path) if path.trim().eq_ignore_ascii_case("none") => None,
                Some(path) => Some(path.into()),
                None => default.tuning_cache.clone(),
            },
            tuning_budget: match var("WGCNN_TUNING_BUDGET") {
                Some(value) => parse_tuning_budget(&value)?,
                None => default.tuning_budget,
            },
            runtime_checks: match var("WGCNN_RUNTIME_CHECKS") {
                Some(value) => parse_runtime_checks(&value)?,
                None => default.runtime_checks,
            },
            kernel_family: match var("WGCNN_KERNELS") {
                Some(value) => parse_kernel_family(&value)?,
                None => default.kernel_family,
            },
            ..default
        })
    }
}

/// The backends `WGPU_BACKEND` names (comma-separated, as wgpu reads it), each one built
/// into this crate for this platform.
fn parse_backends(list: &str) -> Result<wgpu::Backends> {
    const NAMES: &str = "vulkan (vk), metal (mtl), dx12 (d3d12), gl (gles, opengl)";
    let built = wgpu::Instance::enabled_backend_features();
    let mut backends = wgpu::Backends::empty();
    for name in list.split(',').map(|n| n.trim().to_lowercase()) {
        let backend = match name.as_str() {
            "vulkan" | "vk" => wgpu::Backends::VULKAN,
            "metal" | "mtl" => wgpu::Backends::METAL,
            "dx12" | "d3d12" => wgpu::Backends::DX12,
            "gl" | "gles" | "opengl" => wgpu::Backends::GL,
            _ => {
                return Err(Error::InvalidArgument {
                    op: "WGPU_BACKEND",
                    detail: format!(
                        "unknown backend {name:?} in {list:?}; accepted, comma-separated: {NAMES}"
                    ),
                });
            }
        };
        if !built.contains(backend) {
            let available: Vec<String> = built.iter().map(|b| format!("{b:?}")).collect();
            return Err(Error::InvalidArgument {
                op: "WGPU_BACKEND",
                detail: format!(
                    "the {name} backend is not built into wgcnn on this platform; it has {}",
                    available.join(", ")
                ),
            });
        }
        backends |= backend;
    }
    Ok(backends)
}

/// The adapter's `limits` with the buffer and storage-binding sizes capped at `cap`.
fn capped(mut limits: wgpu::Limits, cap: Option<u64>) -> Result<wgpu::Limits> {
    let Some(cap) = cap else { return Ok(limits) };
    // Below this the kernels' own parameter and uniform buffers would not fit.
    const SMALLEST: u64 = 1 << 20;
    if cap < SMALLEST {
        return Err(Error::InvalidArgument {
            op: "GpuOptions::buffer_limit",
            detail: format!("a cap of {cap} bytes; accepted: {SMALLEST} bytes (1 MiB) or more"),
        });
    }
    limits.max_buffer_size = limits.max_buffer_size.min(cap);
    limits.max_storage_buffer_binding_size = limits.max_storage_buffer_binding_size.min(cap);
    Ok(limits)
}

/// `WGCNN_TUNING`'s value.
fn parse_tuning(value: &str) -> Result<Tuning> {
    match value.trim().to_lowercase().as_str() {
        "measure" | "on" => Ok(Tuning::Measure),
        "off" | "fixed" => Ok(Tuning::Fixed),
        _ => Err(Error::InvalidArgument {
            op: "WGCNN_TUNING",
            detail: format!(
                "unknown tuning {value:?}; accepted: measure (time the kernels on first use), \
                 off (each op's fixed order)"
            ),
        }),
    }
}

/// `WGCNN_TUNING_BUDGET`'s value: seconds, a finite number of them, 0 or more.
fn parse_tuning_budget(value: &str) -> Result<std::time::Duration> {
    value
        .trim()
        .parse::<f64>()
        .ok()
        .and_then(|seconds| std::time::Duration::try_from_secs_f64(seconds).ok())
        .ok_or_else(|| Error::InvalidArgument {
            op: "WGCNN_TUNING_BUDGET",
            detail: format!(
                "unknown budget {value:?}; accepted: seconds the tuner may spend measuring per \
                 context, 0 or more (1 by default; 0 measures nothing new, a large value \
                 measures every shape on first use)"
            ),
        })
}

/// `WGCNN_RUNTIME_CHECKS`'s value.
fn parse_runtime_checks(value: &str) -> Result<bool> {
    match value.trim().to_lowercase().as_str() {
        "on" | "1" | "true" => Ok(true),
        "off" | "0" | "false" => Ok(false),
        _ => Err(Error::InvalidArgument {
            op: "WGCNN_RUNTIME_CHECKS",
            detail: format!(
                "unknown value {value:?}; accepted: on (wgpu's bounds checks and loop \
                 bounding in every kernel), off (the default)"
            ),
        }),
    }
}

/// `WGCNN_KERNELS`' value.
fn parse_kernel_family(value: &str) -> Result<KernelFamily> {
    match value.trim().to_lowercase().as_str() {
        "auto" => Ok(KernelFamily::Auto),
        "portable" | "gpu" => Ok(KernelFamily::Portable),
        "cpu" | "cpu-adapter" => Ok(KernelFamily::CpuAdapter),
        _ => Err(Error::InvalidArgument {
            op: "WGCNN_KERNELS",
            detail: format!(
                "unknown kernel family {value:?}; accepted: auto (by the adapter's type), \
                 portable (the GPU designs), cpu (the CPU-adapter designs)"
            ),
        }),
    }
}

/// `WGPU_POWER_PREF`'s value.
fn parse_power_preference(value: &str) -> Result<wgpu::PowerPreference> {
    match value.trim().to_lowercase().as_str() {
        "low" => Ok(wgpu::PowerPreference::LowPower),
        "high" => Ok(wgpu::PowerPreference::HighPerformance),
        "none" => Ok(wgpu::PowerPreference::None),
        _ => Err(Error::InvalidArgument {
            op: "WGPU_POWER_PREF",
            detail: format!("unknown preference {value:?}; accepted: low, high, none"),
        }),
    }
}

/// A headless GPU context. Cloning is cheap (an `Arc`); it is `Send + Sync`.
#[derive(Clone)]
pub struct Gpu {
    pub(crate) inner: Arc<GpuInner>,
}

pub(crate) struct GpuInner {
    pub(crate) device: wgpu::Device,
    pub(crate) queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
    limits: wgpu::Limits,
    features: wgpu::Features,
    pub(crate) pool: Mutex<BufferPool>,
    pub(crate) pipelines: Mutex<PipelineCache>,
    /// The recording under way on each thread that called [`Gpu::record`].
    pub(crate) recordings: Mutex<Vec<(std::thread::ThreadId, Recording)>>,
    /// The pass times of each thread inside [`Gpu::profile_passes`].
    pub(crate) profiles: Mutex<Vec<(std::thread::ThreadId, Vec<super::profile::PassTime>)>>,
    /// The timestamps of each thread inside [`Gpu::profile_ops`].
    pub(crate) stamps: Mutex<Vec<(std::thread::ThreadId, super::profile::OpStamps)>>,
    submissions: std::sync::atomic::AtomicU64,
    dispatches: std::sync::atomic::AtomicU64,
    /// Each thread's kernel parameters, staged until its next submit.
    pub(crate) uniforms: Mutex<super::uniforms::UniformArenas>,
    /// How large operands are read, measured on first use (CPU adapters).
    pub(crate) calibration: std::sync::OnceLock<super::texture::OperandCalibration>,
    /// `GpuOptions::operand_reads`.
    pub(crate) forced_operand_reads: Option<super::texture::OperandReads>,
    /// Kernel choices measured per shape (`gpu/tuning.rs`).
    pub(crate) tuning: Mutex<super::tuning::TuningState>,
    /// `GpuOptions::recording_hold_bytes`.
    pub(crate) recording_hold_bytes: u64,
    /// `GpuOptions::runtime_checks`.
    pub(crate) runtime_checks: bool,
    /// `GpuOptions::kernel_family`.
    kernel_family: KernelFamily,
    /// `GpuOptions::buffer_limit`.
    pub(crate) buffer_limit: Option<u64>,
    lost: Arc<Mutex<Option<String>>>,
    uncaptured: Arc<Mutex<Option<String>>>,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu")
            .field("adapter", &self.inner.info.name)
            .field("backend", &self.inner.info.backend)
            .field("device_type", &self.inner.info.device_type)
            .finish()
    }
}

/// Locks a mutex even if another thread panicked while holding it: the state it guards
/// (caches and counters) stays consistent at every await-free step.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Gpu {
    /// Opens the adapter chosen by [`GpuOptions::from_env`], blocking.
    pub fn new() -> Result<Self> {
        pollster::block_on(Self::new_async())
    }

    /// Opens the adapter chosen by [`GpuOptions::from_env`].
    pub async fn new_async() -> Result<Self> {
        Self::with_options_async(GpuOptions::from_env()?).await
    }

    /// Opens the adapter chosen by `options`, blocking.
    pub fn with_options(options: GpuOptions) -> Result<Self> {
        pollster::block_on(Self::with_options_async(options))
    }

    /// Opens the adapter chosen by `options`.
    pub async fn with_options_async(options: GpuOptions) -> Result<Self> {
        let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
            backends: options.backends,
            ..wgpu::InstanceDescriptor::new_without_display_handle().with_env()
        });
        let adapter = choose_adapter(&instance, &options).await?;
        let info = adapter.get_info();
        // Ask for everything the adapter offers: real GPUs and lavapipe allow storage
        // buffers far beyond WebGPU's 128 MiB / 256 MiB defaults.
        let limits = capped(adapter.limits(), options.buffer_limit)?;
        // Timestamps inside passes, where offered, for `Gpu::profile_ops`.
        let wanted = wgpu::Features::SUBGROUP | super::profile::TIMESTAMPS;
        let features = adapter.features() & wanted;
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("wgcnn"),
                required_features: features,
                required_limits: limits.clone(),
                memory_hints: wgpu::MemoryHints::Performance,
                ..Default::default()
            })
            .await
            .map_err(|e| Error::DeviceRequest {
                adapter: info.name.clone(),
                reason: e.to_string(),
            })?;

        let lost = Arc::new(Mutex::new(None));
        let lost_in_callback = Arc::clone(&lost);
        // wgpu reports a loss (a driver reset, or `destroy`) from a later poll: every checked
        // call and readback sees it from then on.
        device.set_device_lost_callback(move |reason, message| {
            *lock(&lost_in_callback) = Some(format!("{reason:?}: {message}"));
        });
        // Errors outside an error scope must not panic (wgpu's default): keep the first
        // one and report it from the next checked call.
        let uncaptured = Arc::new(Mutex::new(None));
        let uncaptured_in_callback = Arc::clone(&uncaptured);
        device.on_uncaptured_error(Arc::new(move |error: wgpu::Error| {
            lock(&uncaptured_in_callback).get_or_insert_with(|| error.to_string());
        }));

        Ok(Self {
            inner: Arc::new(GpuInner {
                device,
                queue,
                info,
                limits,
                features,
                pool: Mutex::new(BufferPool::new(options.pool_cache_bytes)),
                pipelines: Mutex::new(PipelineCache::default()),
                recordings: Mutex::new(Vec::new()),
                profiles: Mutex::new(Vec::new()),
                stamps: Mutex::new(Vec::new()),
                submissions: std::sync::atomic::AtomicU64::new(0),
                dispatches: std::sync::atomic::AtomicU64::new(0),
                uniforms: Mutex::new(super::uniforms::UniformArenas::default()),
                calibration: std::sync::OnceLock::new(),
                forced_operand_reads: options.operand_reads,
                tuning: Mutex::new(super::tuning::TuningState::new(&options)),
                recording_hold_bytes: options.recording_hold_bytes,
                runtime_checks: options.runtime_checks,
                kernel_family: options.kernel_family,
                buffer_limit: options.buffer_limit,
                lost,
                uncaptured,
            }),
        })
    }

    /// The adapter this context runs on (name, backend, device type, driver).
    pub fn adapter_info(&self) -> &wgpu::AdapterInfo {
        &self.inner.info
    }

    /// The device limits in force: the adapter's own, the buffer sizes capped by
    /// [`GpuOptions::buffer_limit`] where it is set.
    pub fn limits(&self) -> &wgpu::Limits {
        &self.inner.limits
    }

    /// The optional features enabled on the device.
    pub fn features(&self) -> wgpu::Features {
        self.inner.features
    }

    /// True on CPU adapters such as lavapipe, where kernels are designed differently.
    pub fn is_cpu_adapter(&self) -> bool {
        self.inner.info.device_type == wgpu::DeviceType::Cpu
    }

    /// The kernel family in force: `GpuOptions::kernel_family`, with `Auto` resolved by
    /// the adapter's type (never `Auto`).
    pub fn kernel_family(&self) -> KernelFamily {
        match self.inner.kernel_family {
            KernelFamily::Auto if self.is_cpu_adapter() => KernelFamily::CpuAdapter,
            KernelFamily::Auto => KernelFamily::Portable,
            forced => forced,
        }
    }

    /// The bytes one uniform binding of a kernel may hold: the adapter's limit, at most the
    /// 64 KiB every WebGPU adapter offers, in whole vec4s (a uniform array's elements).
    pub(crate) fn uniform_binding_bytes(&self) -> u64 {
        self.limits().max_uniform_buffer_binding_size.min(65_536) / 16 * 16
    }

    /// How many workgroups a portable kernel that can split its work (over the batch, or
    /// over K) aims for, per adapter class: four 64-lane workgroups for each of a large
    /// discrete GPU's ~128 compute units, an integrated GPU's share of that, a CPU adapter's
    /// threads (forced portable on lavapipe, 512 made LeNet's step 1.6× slower). The GPU
    /// figures are chosen, not measured: no GPU has run them yet.
    pub(crate) fn target_workgroups(&self) -> usize {
        match self.inner.info.device_type {
            wgpu::DeviceType::Cpu => 16,
            wgpu::DeviceType::IntegratedGpu => 128,
            _ => 512,
        }
    }

    /// True where the CPU-adapter designs run ([`Gpu::kernel_family`]).
    pub(crate) fn cpu_kernels(&self) -> bool {
        self.kernel_family() == KernelFamily::CpuAdapter
    }

    /// The subgroup width when the device supports subgroups and it is fixed.
    pub fn fixed_subgroup_size(&self) -> Option<u32> {
        let info = &self.inner.info;
        (self.inner.features.contains(wgpu::Features::SUBGROUP)
            && info.subgroup_min_size == info.subgroup_max_size)
            .then_some(info.subgroup_min_size)
    }

    /// Buffer-pool counters: allocations, reuses, bytes live and cached.
    pub fn pool_stats(&self) -> PoolStats {
        lock(&self.inner.pool).stats()
    }

    /// Starts `PoolStats::peak_live_bytes` over from the bytes live now, so that the peak
    /// of one piece of work (a forward pass, a training step) can be read after it.
    pub fn reset_peak_bytes(&self) {
        lock(&self.inner.pool).reset_peak();
    }

    /// How many compute pipelines have been compiled on this context.
    pub fn pipelines_compiled(&self) -> usize {
        lock(&self.inner.pipelines).len()
    }

    /// How many command buffers this context has submitted (a recorded step counts one).
    pub fn submissions(&self) -> u64 {
        self.inner
            .submissions
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// How many kernels this context has recorded (compute dispatches, each with its own
    /// bind group; copies not counted): `perf --dispatches` reports them per training step.
    pub fn dispatches(&self) -> u64 {
        self.inner
            .dispatches
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    pub(crate) fn count_dispatch(&self) {
        self.inner
            .dispatches
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    pub(crate) fn count_submit(&self) {
        self.inner
            .submissions
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    pub(crate) fn device(&self) -> &wgpu::Device {
        &self.inner.device
    }

    pub(crate) fn queue(&self) -> &wgpu::Queue {
        &self.inner.queue
    }

    /// Checks that `bytes` fits one buffer and one storage binding on this device.
    pub(crate) fn check_buffer_size(&self, what: &str, bytes: u64) -> Result<()> {
        let checks = [
            ("max_buffer_size", self.inner.limits.max_buffer_size),
            (
                "max_storage_buffer_binding_size",
                self.inner.limits.max_storage_buffer_binding_size,
            ),
        ];
        for (limit_name, limit) in checks {
            if bytes > limit {
                return Err(Error::TooLarge {
                    what: what.to_string(),
                    bytes,
                    limit_name,
                    limit,
                    adapter: self.inner.info.name.clone(),
                });
            }
        }
        Ok(())
    }

    /// Runs `work` inside out-of-memory and validation error scopes, so that whatever
    /// wgpu reports becomes an `Err` instead of a panic; also reports a lost device.
    pub(crate) fn checked<T>(&self, context: &str, work: impl FnOnce() -> T) -> Result<T> {
        self.check_alive()?;
        let device = &self.inner.device;
        let oom_scope = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation_scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let value = work();
        let validation = pollster::block_on(validation_scope.pop());
        let oom = pollster::block_on(oom_scope.pop());
        if let Some(error) = oom {
            return Err(Error::OutOfMemory {
                context: format!("{context} ({error})"),
            });
        }
        if let Some(error) = validation {
            return Err(Error::Gpu {
                context: context.to_string(),
                detail: error.to_string(),
            });
        }
        self.check_alive()?;
        Ok(value)
    }

    /// Fails if the device was lost or an error escaped every error scope.
    pub(crate) fn check_alive(&self) -> Result<()> {
        if let Some(reason) = lock(&self.inner.lost).clone() {
            return Err(Error::DeviceLost { reason });
        }
        if let Some(detail) = lock(&self.inner.uncaptured).take() {
            return Err(Error::Gpu {
                context: "an earlier GPU call".into(),
                detail,
            });
        }
        Ok(())
    }

    /// Blocks until every submitted command has finished.
    pub fn synchronize(&self) -> Result<()> {
        self.inner
            .device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::DeviceLost {
                reason: e.to_string(),
            })?;
        self.check_alive()
    }

    /// Destroys the device, as a driver reset would: every later call returns an error.
    /// Meant for tests of error handling.
    #[doc(hidden)]
    pub fn simulate_device_loss(&self) {
        self.inner.device.destroy();
        // The poll that delivers the loss to the lost callback, as after a driver reset.
        let _ = self.inner.device.poll(wgpu::PollType::wait_indefinitely());
    }
}

async fn choose_adapter(instance: &wgpu::Instance, options: &GpuOptions) -> Result<wgpu::Adapter> {
    let adapters = instance.enumerate_adapters(options.backends).await;
    if adapters.is_empty() {
        return Err(Error::NoAdapter {
            detail: format!("no adapter on backends {:?}", options.backends),
        });
    }
    if let Some(wanted) = &options.adapter_name {
        let wanted_lower = wanted.to_lowercase();
        let names: Vec<String> = adapters.iter().map(|a| a.get_info().name).collect();
        return adapters
            .into_iter()
            .find(|a| a.get_info().name.to_lowercase().contains(&wanted_lower))
            .ok_or_else(|| Error::NoAdapter {
                detail: format!("WGPU_ADAPTER_NAME={wanted:?} matches none of {names:?}"),
            });
    }
    instance
        .request_adapter(&wgpu::RequestAdapterOptions {
            power_preference: options.power_preference,
            force_fallback_adapter: false,
            compatible_surface: None,
            ..Default::default()
        })
        .await
        .map_err(|e| Error::NoAdapter {
            detail: e.to_string(),
        })
}
