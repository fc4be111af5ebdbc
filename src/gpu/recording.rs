//! Recording: many ops encoded into one command encoder and submitted once.
//!
//! Outside a recording every op submits its own commands. Inside [`Gpu::record`], the ops
//! the calling thread runs append their passes and copies to one encoder, and the whole step
//! is one `queue.submit` at the end. Buffers that thread's tensors drop meanwhile go back to
//! the pool only after that submit, so no buffer is handed out again while recorded
//! commands may still use it. Each thread has its own recording: threads sharing a `Gpu`
//! (a test harness, a data-parallel loop) record their steps independently.
//! Uploads (`Tensor::from_array`) run before the recorded commands, which is right for any
//! tensor created inside the recording: its data is there before a kernel reads it.

use std::thread::{ThreadId, current};

use super::context::{Gpu, lock};
use crate::error::Result;

pub(crate) struct Recording {
    /// The compute pass consecutive ops' kernels go into (ended before anything else is
    /// encoded, and before a submit): declared first, so that it ends before the encoder goes.
    pass: Option<wgpu::ComputePass<'static>>,
    encoder: wgpu::CommandEncoder,
    /// Buffers dropped during the recording, returned to the pool after the submit.
    deferred: Vec<(wgpu::Buffer, u64)>,
    /// Bytes of the operand textures made since the last submit: each is dropped once its
    /// copy and kernel are encoded, but wgpu keeps it until the commands have run.
    texture_bytes: u64,
    /// How many pipelines the context had compiled when `encoder` was begun.
    pipelines_before: usize,
}

/// Where an op records its commands: the active recording's encoder (or a fresh one,
/// submitted once the op is encoded), its kernels into a compute pass that stays open for the
/// next op's. On lavapipe a pass of its own cost a dispatch 27–35 µs against 13–20 in a
/// shared one (100 small dispatches a submit); wgpu still places the barriers between them.
pub(crate) struct Commands<'a> {
    encoder: &'a mut wgpu::CommandEncoder,
    pass: &'a mut Option<wgpu::ComputePass<'static>>,
}

impl Commands<'_> {
    /// Writes timestamp `index` of `queries` into the open pass, or between passes where
    /// none is open (see `Gpu::profile_ops`).
    fn write_timestamp(&mut self, queries: &wgpu::QuerySet, index: u32) {
        match self.pass.as_mut() {
            Some(pass) => pass.write_timestamp(queries, index),
            None => self.encoder.write_timestamp(queries, index),
        }
    }

    /// The encoder, for copies: ends the open compute pass first.
    pub(crate) fn encoder(&mut self) -> &mut wgpu::CommandEncoder {
        *self.pass = None;
        self.encoder
    }

    /// The open compute pass, begun if there is none.
    pub(crate) fn pass(&mut self) -> &mut wgpu::ComputePass<'static> {
        let encoder = &mut *self.encoder;
        self.pass.get_or_insert_with(|| {
            encoder
                .begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some("kernels"),
                    timestamp_writes: None,
                })
                .forget_lifetime()
        })
    }
}

impl Gpu {
    /// Runs `step` with every op it calls recorded into one command encoder, submitted
    /// once when `step` returns. Readbacks inside `step` submit what was recorded so far
    /// first. Ops that other threads run on this `Gpu` meanwhile are not recorded; a
    /// recording started inside another on the same thread joins the outer one.
    pub fn record<T>(&self, step: impl FnOnce() -> Result<T>) -> Result<T> {
        let me = current().id();
        {
            let mut recordings = lock(&self.inner.recordings);
            if recordings.iter().any(|(id, _)| *id == me) {
                drop(recordings);
                return step();
            }
            let encoder = self
                .device()
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("recorded step"),
                });
            recordings.push((
                me,
                Recording {
                    pass: None,
                    encoder,
                    deferred: Vec::new(),
                    texture_bytes: 0,
                    pipelines_before: self.pipelines_compiled(),
                },
            ));
        }
        // A panic inside `step` must not leave this thread recording for good (every later
        // op would be encoded and never submitted): the guard ends the recording on unwind.
        let guard = EndOnUnwind {
            gpu: self,
            thread: me,
        };
        let result = step();
        std::mem::forget(guard);
        let finished = take(&mut lock(&self.inner.recordings), me);
        if let Some(mut recording) = finished {
            recording.pass = None;
            if result.is_ok() {
                self.checked("submitting a recorded step", || {
                    self.write_uniforms();
                    self.queue().submit([recording.encoder.finish()]);
                    self.count_submit();
                })?;
            }
            let mut pool = lock(&self.inner.pool);
            for (buffer, class) in recording.deferred {
                pool.give_back(buffer, class);
            }
        }
        result
    }

    /// Encodes into the recording's commands if one is active, else into a fresh encoder
    /// that is submitted at once. `encode` itself never submits: kernel parameters staged for
    /// the encoder stay valid until its submit (see `gpu/uniforms.rs`).
    pub(crate) fn with_commands(
        &self,
        label: &str,
        encode: impl FnOnce(&mut Commands<'_>) -> Result<()>,
    ) -> Result<()> {
        let started = self.profiling().then(std::time::Instant::now);
        let stamp = self.next_stamp(label);
        // The op between its two timestamps, where this thread profiles ops; an op that
        // fails is not timed.
        let encode = |commands: &mut Commands<'_>| {
            if let Some((queries, first)) = &stamp {
                commands.write_timestamp(queries, *first);
            }
            if let Err(e) = encode(commands) {
                if stamp.is_some() {
                    self.drop_stamp();
                }
                return Err(e);
            }
            if let Some((queries, first)) = &stamp {
                commands.write_timestamp(queries, first + 1);
            }
            Ok(())
        };
        let mut recordings = lock(&self.inner.recordings);
        if let Some(active) = mine(&mut recordings) {
            encode(&mut Commands {
                encoder: &mut active.encoder,
                pass: &mut active.pass,
            })?;
            drop(recordings);
        } else {
            drop(recordings);
            let mut encoder = self
                .device()
                .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some(label) });
            let mut pass = None;
            encode(&mut Commands {
                encoder: &mut encoder,
                pass: &mut pass,
            })?;
            drop(pass);
            self.write_uniforms();
            self.queue().submit([encoder.finish()]);
            self.count_submit();
        }
        match started {
            Some(started) => self.finish_profiled_pass(label, started),
            None => Ok(()),
        }
    }

    /// Submits what the active recording holds so far (before a readback), and returns the
    /// buffers dropped until now to the pool: whatever is recorded or uploaded after this
    /// submit runs after it.
    pub(crate) fn flush_recording(&self) {
        let pipelines = self.pipelines_compiled();
        let mut recordings = lock(&self.inner.recordings);
        if let Some(active) = mine(&mut recordings) {
            active.pass = None;
            active.pipelines_before = pipelines;
            active.texture_bytes = 0;
            let fresh = self
                .device()
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("recorded step"),
                });
            let done = std::mem::replace(&mut active.encoder, fresh);
            let deferred = std::mem::take(&mut active.deferred);
            drop(recordings);
            self.write_uniforms();
            self.queue().submit([done.finish()]);
            self.count_submit();
            let mut pool = lock(&self.inner.pool);
            for (buffer, class) in deferred {
                pool.give_back(buffer, class);
            }
        }
    }

    /// Submits the active recording early, between two layers of a model (the graph calls
    /// it where no op is half encoded), in two cases:
    /// - the buffers it holds back and the operand textures it made exceed
    ///   `GpuOptions::recording_hold_bytes`, so that a large model's step reuses its
    ///   temporaries instead of holding every one until the end;
    /// - the layer compiled a pipeline: on a CPU adapter the device compiles a kernel to
    ///   machine code at its first dispatch, so a first step submitted at its end leaves the
    ///   device idle while the host creates the later pipelines and then the host idle while
    ///   the device compiles them all. Submitted layer by layer, the two overlap.
    pub(crate) fn submit_between_layers(&self) {
        let pipelines = self.pipelines_compiled();
        let (held, compiled): (u64, bool) = {
            let mut recordings = lock(&self.inner.recordings);
            match mine(&mut recordings) {
                Some(active) => (
                    active.deferred.iter().map(|(_, class)| class).sum::<u64>()
                        + active.texture_bytes,
                    pipelines > active.pipelines_before,
                ),
                None => return,
            }
        };
        if held > self.inner.recording_hold_bytes || compiled {
            self.flush_recording();
        }
    }

    /// Counts an operand texture of `bytes` made by this thread's recording, if one is
    /// active, towards what it holds until its submit.
    pub(crate) fn hold_texture(&self, bytes: u64) {
        if let Some(active) = mine(&mut lock(&self.inner.recordings)) {
            active.texture_bytes += bytes;
        }
    }

    /// Takes a dropped tensor's buffer: into the pool, or held until the recording's submit.
    pub(crate) fn release_buffer(&self, buffer: wgpu::Buffer, class: u64) {
        let mut recordings = lock(&self.inner.recordings);
        match mine(&mut recordings) {
            Some(active) => active.deferred.push((buffer, class)),
            None => {
                drop(recordings);
                lock(&self.inner.pool).give_back(buffer, class);
            }
        }
    }
}

/// Ends a thread's recording, submitting nothing, when `step` unwinds out of [`Gpu::record`].
struct EndOnUnwind<'a> {
    gpu: &'a Gpu,
    thread: ThreadId,
}

impl Drop for EndOnUnwind<'_> {
    fn drop(&mut self) {
        if let Some(recording) = take(&mut lock(&self.gpu.inner.recordings), self.thread) {
            let mut pool = lock(&self.gpu.inner.pool);
            for (buffer, class) in recording.deferred {
                pool.give_back(buffer, class);
            }
        }
    }
}

/// The calling thread's recording, if it has one.
fn mine(recordings: &mut [(ThreadId, Recording)]) -> Option<&mut Recording> {
    let me = current().id();
    recordings
        .iter_mut()
        .find(|(id, _)| *id == me)
        .map(|(_, r)| r)
}

fn take(recordings: &mut Vec<(ThreadId, Recording)>, me: ThreadId) -> Option<Recording> {
    let index = recordings.iter().position(|(id, _)| *id == me)?;
    Some(recordings.swap_remove(index).1)
}
