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
    encoder: wgpu::CommandEncoder,
    /// Buffers dropped during the recording, returned to the pool after the submit.
    deferred: Vec<(wgpu::Buffer, u64)>,
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
                    encoder,
                    deferred: Vec::new(),
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
        if let Some(recording) = finished {
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

    /// Encodes with the recording's encoder if one is active, else with a fresh one that is
    /// submitted at once. `encode` itself never submits: kernel parameters staged for the
    /// encoder stay valid until its submit (see `gpu/uniforms.rs`).
    pub(crate) fn with_encoder(
        &self,
        label: &str,
        encode: impl FnOnce(&mut wgpu::CommandEncoder) -> Result<()>,
    ) -> Result<()> {
        let started = self.profiling().then(std::time::Instant::now);
        let mut recordings = lock(&self.inner.recordings);
        if let Some(active) = mine(&mut recordings) {
            encode(&mut active.encoder)?;
            drop(recordings);
        } else {
            drop(recordings);
            let mut encoder = self
                .device()
                .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some(label) });
            encode(&mut encoder)?;
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
        let mut recordings = lock(&self.inner.recordings);
        if let Some(active) = mine(&mut recordings) {
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

    /// Submits the active recording early when the buffers it holds back exceed
    /// `GpuOptions::recording_hold_bytes`, so that a large model's step reuses its
    /// temporaries instead of holding every one until the end. Called by the graph between
    /// layers, where no op is half encoded.
    pub(crate) fn bound_held_buffers(&self) {
        let bytes = self.inner.recording_hold_bytes;
        let held: u64 = {
            let mut recordings = lock(&self.inner.recordings);
            match mine(&mut recordings) {
                Some(active) => active.deferred.iter().map(|(_, class)| class).sum(),
                None => return,
            }
        };
        if held > bytes {
            self.flush_recording();
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
