//! Where a step's time goes on the device: while the calling thread profiles, each pass it
//! encodes is submitted and waited for on its own and timed.

use std::thread::current;
use std::time::Instant;

use super::context::{Gpu, lock};
use crate::error::Result;

/// One pass of a profiled run: its label (the op) and the time from encoding it to the end
/// of its work on the device, its own submit and wait included (about 0.07 ms on lavapipe:
/// compare passes with each other, not with an unprofiled step, which overlaps none of it).
#[derive(Clone, Debug, PartialEq)]
pub struct PassTime {
    /// The op's label, as `Gpu::run_pass` was given it ("conv2d direct", "matmul", …).
    pub label: String,
    /// Milliseconds.
    pub ms: f64,
}

impl Gpu {
    /// Runs `work` with every pass it encodes (on this thread) submitted and waited for on its
    /// own, and returns its result with each pass's time, in order. Slower than a plain run:
    /// meant for finding where a step's time goes (`cargo run --release --example perf --
    /// --profile`), not for timing it.
    pub fn profile_passes<T>(
        &self,
        work: impl FnOnce() -> Result<T>,
    ) -> Result<(T, Vec<PassTime>)> {
        let me = current().id();
        lock(&self.inner.profiles).push((me, Vec::new()));
        let result = work();
        let mut profiles = lock(&self.inner.profiles);
        let times = profiles
            .iter()
            .position(|(id, _)| *id == me)
            .map(|index| profiles.swap_remove(index).1)
            .unwrap_or_default();
        drop(profiles);
        result.map(|value| (value, times))
    }

    /// Whether the calling thread is profiling its passes.
    pub(crate) fn profiling(&self) -> bool {
        let me = current().id();
        lock(&self.inner.profiles).iter().any(|(id, _)| *id == me)
    }

    /// Submits what this thread has encoded, waits for it, and records the pass `label`
    /// as taking from `started` until now.
    pub(crate) fn finish_profiled_pass(&self, label: &str, started: Instant) -> Result<()> {
        self.flush_recording();
        self.synchronize()?;
        let me = current().id();
        if let Some((_, times)) = lock(&self.inner.profiles)
            .iter_mut()
            .find(|(id, _)| *id == me)
        {
            times.push(PassTime {
                label: label.to_string(),
                ms: started.elapsed().as_secs_f64() * 1e3,
            });
        }
        Ok(())
    }
}
