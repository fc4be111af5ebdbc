//! Where a step's time goes on the device: while the calling thread profiles, each pass it
//! encodes is submitted and waited for on its own and timed (`profile_passes`), or each op is
//! stamped with device timestamps as it runs in the step's own submits (`profile_ops`).

use std::thread::current;
use std::time::Instant;

use super::context::{Gpu, lock};
use crate::error::{Error, Result};

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

/// The device features [`Gpu::profile_ops`] needs, requested where the adapter offers them
/// (lavapipe does, as do most Vulkan and DX12 GPUs; on Metal, AMD and Intel GPUs only).
pub(crate) const TIMESTAMPS: wgpu::Features = wgpu::Features::TIMESTAMP_QUERY
    .union(wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS)
    .union(wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES);

/// One op of a run profiled with timestamps: its label and when its commands ran on the
/// device, inside the run's own submits (nothing added between ops but the timestamps).
#[derive(Clone, Debug, PartialEq)]
pub struct OpTime {
    /// The op's label, as for [`PassTime`].
    pub label: String,
    /// Milliseconds from the first op's start to this one's.
    pub start_ms: f64,
    /// Milliseconds between the op's two timestamps: its own time where the device runs
    /// commands one after the other (lavapipe); on a GPU that overlaps them, from the end of
    /// the work before it to the end of its own.
    pub ms: f64,
}

/// The timestamps of a thread's ops while it profiles them: a start and an end per op.
pub(crate) struct OpStamps {
    queries: wgpu::QuerySet,
    labels: Vec<String>,
}

/// Timestamps one profiled run holds (wgpu's most per query set): two per op.
const MOST_STAMPS: u32 = wgpu::QUERY_SET_MAX_QUERIES;

impl Gpu {
    /// Runs `work` with every pass it encodes (on this thread) submitted and waited for on its
    /// own, and returns its result with each pass's time, in order. Slower than a plain run:
    /// meant for finding where a step's time goes on an adapter without timestamps (`cargo
    /// run --release --example perf -- --profile --waited`), not for timing it.
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

    /// Whether [`Gpu::profile_ops`] can run here (the device has timestamp queries inside
    /// passes).
    pub fn can_profile_ops(&self) -> bool {
        self.features().contains(TIMESTAMPS)
    }

    /// Runs `work` with a device timestamp written before and after each op it encodes (on
    /// this thread), and returns its result with each op's time, in order. Unlike
    /// [`Gpu::profile_passes`] the ops run as `work` submits them (one recorded step stays
    /// one submit), so the times add up to the step's, less the gaps between ops (the
    /// dispatch overhead `start_ms` shows). Past 2,048 ops the later ones are not timed. An
    /// error where the device has no timestamps inside passes ([`Gpu::can_profile_ops`]) or
    /// the thread is profiling its ops already; inside a recording, the recording is
    /// submitted at the end to read the times.
    pub fn profile_ops<T>(&self, work: impl FnOnce() -> Result<T>) -> Result<(T, Vec<OpTime>)> {
        if !self.can_profile_ops() {
            return Err(Error::InvalidArgument {
                op: "profile_ops",
                detail: format!(
                    "the adapter {:?} has no timestamp queries inside passes; \
                     use Gpu::profile_passes",
                    self.adapter_info().name
                ),
            });
        }
        let queries = self.checked("creating a timestamp query set", || {
            self.device().create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("op timestamps"),
                ty: wgpu::QueryType::Timestamp,
                count: MOST_STAMPS,
            })
        })?;
        let me = current().id();
        {
            let mut all = lock(&self.inner.stamps);
            if all.iter().any(|(id, _)| *id == me) {
                return Err(Error::InvalidArgument {
                    op: "profile_ops",
                    detail: "this thread is profiling its ops already: profile the outer \
                             run alone"
                        .into(),
                });
            }
            let labels = Vec::new();
            all.push((me, OpStamps { queries, labels }));
        }
        // Ends the profile however `work` ends, a panic included.
        let ending = EndStamps { gpu: self };
        let result = work();
        let stamps = ending.take();
        let value = result?;
        let times = match stamps {
            Some(stamps) if !stamps.labels.is_empty() => self.read_stamps(stamps)?,
            _ => Vec::new(),
        };
        Ok((value, times))
    }

    /// The query set and the index of the op `label`'s first timestamp, where the calling
    /// thread profiles ops and has room for two more.
    pub(crate) fn next_stamp(&self, label: &str) -> Option<(wgpu::QuerySet, u32)> {
        let me = current().id();
        let mut all = lock(&self.inner.stamps);
        let (_, stamps) = all.iter_mut().find(|(id, _)| *id == me)?;
        let first = 2 * u32::try_from(stamps.labels.len()).ok()?;
        if first + 2 > MOST_STAMPS {
            return None;
        }
        stamps.labels.push(label.to_string());
        Some((stamps.queries.clone(), first))
    }

    /// Forgets the last op's timestamps, for an op that failed while it encoded (its
    /// queries may stay unwritten, and a resolve would wait on them).
    pub(crate) fn drop_stamp(&self) {
        let me = current().id();
        if let Some((_, stamps)) = lock(&self.inner.stamps)
            .iter_mut()
            .find(|(id, _)| *id == me)
        {
            stamps.labels.pop();
        }
    }

    /// Each stamped op's times, from its pair of timestamps resolved and read back.
    fn read_stamps(&self, stamps: OpStamps) -> Result<Vec<OpTime>> {
        let count = 2 * stamps.labels.len() as u32;
        let bytes = u64::from(count) * 8;
        // The stamps are in the recording's commands, if one is under way.
        self.flush_recording();
        let resolved = self.checked("resolving timestamps", || {
            let resolved = self.device().create_buffer(&wgpu::BufferDescriptor {
                label: Some("op timestamps"),
                size: bytes,
                usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            });
            let mut encoder =
                self.device()
                    .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                        label: Some("op timestamps"),
                    });
            encoder.resolve_query_set(&stamps.queries, 0..count, &resolved, 0);
            self.queue().submit([encoder.finish()]);
            self.count_submit();
            resolved
        })?;
        let data = pollster::block_on(self.read_bytes(&resolved, bytes))?;
        let ticks: &[u64] = bytemuck::cast_slice(&data);
        let ms_per_tick = f64::from(self.queue().get_timestamp_period()) * 1e-6;
        let first = ticks.first().copied().unwrap_or(0);
        let since = |tick: u64| tick.saturating_sub(first) as f64 * ms_per_tick;
        Ok(stamps
            .labels
            .into_iter()
            .zip(ticks.chunks_exact(2))
            .map(|(label, pair)| OpTime {
                label,
                start_ms: since(pair[0]),
                ms: pair[1].saturating_sub(pair[0]) as f64 * ms_per_tick,
            })
            .collect())
    }
}

/// The calling thread's op profile, ended when dropped: `profile_ops` takes it, and a
/// panic out of its work leaves no profile behind to stamp later ops into.
struct EndStamps<'a> {
    gpu: &'a Gpu,
}

impl EndStamps<'_> {
    /// The thread's stamps, the profile ended.
    fn take(self) -> Option<OpStamps> {
        let me = current().id();
        let mut all = lock(&self.gpu.inner.stamps);
        let index = all.iter().position(|(id, _)| *id == me)?;
        Some(all.swap_remove(index).1)
    }
}

impl Drop for EndStamps<'_> {
    fn drop(&mut self) {
        let me = current().id();
        lock(&self.gpu.inner.stamps).retain(|(id, _)| *id != me);
    }
}
