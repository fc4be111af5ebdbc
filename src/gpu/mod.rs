//! The device and its resources: context, buffer pool, pipeline cache, readback.

mod context;
pub(crate) mod dispatch;
mod pipelines;
pub(crate) use pipelines::{Generated, wgsl_section};
mod pool;
mod profile;
mod readback;
mod recording;
pub(crate) mod shared;
pub(crate) mod texture;
mod tuning;
mod uniforms;

pub(crate) use context::lock;
pub use context::{Gpu, GpuOptions, KernelFamily};
pub use pool::PoolStats;
pub(crate) use pool::size_class;
pub use profile::{OpTime, PassTime};
pub(crate) use recording::Commands;
pub(crate) use texture::OperandTexture;
pub use texture::{OperandCalibration, OperandReads, TEXTURE_ADVANTAGE};
pub(crate) use tuning::TrialTimes;
pub use tuning::{ChoiceSource, TunedChoice, Tuning, TuningReport};
