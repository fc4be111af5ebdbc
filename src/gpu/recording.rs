//! Recording: many ops encoded into one command encoder and submitted once.
//!
//! Outside a recording every op submits its own commands. Inside [`Gpu::record`], the ops
//! append their passes and copies to one encoder, and the whole step is one `queue.submit`
//! at the end. Buffers that tensors drop meanwhile go back to the pool only after that
//! submit, so no buffer is handed out again while recorded commands may still use it.
//! Uploads (`Tensor::from_array`) run before the recorded commands, which is right for any
//! tensor created inside the recording: its data is there before a kernel reads it.

use super::context::{Gpu, lock};
use crate::error::{Error, Result};

pub(crate) struct Recording {
    encoder: wgpu::CommandEncoder,
    /// Buffers dropped during the recording, returned to the pool after the submit.
    deferred: Vec<(wgpu::Buffer, u64)>,
}

impl Gpu {
    /// Runs `step` with every op it calls recorded into one command encoder, submitted
    /// once when `step` returns. Readbacks inside `step` submit what was recorded so far
    /// first. Ops that other threads run on this `Gpu` meanwhile are recorded too.
    pub fn record<T>(&self, step: impl FnOnce() -> Result<T>) -> Result<T> {
        {
            let mut recording = lock(&self.inner.recording);
            if recording.is_some() {
                return Err(Error::InvalidArgument {
                    op: "record",
                    detail: "a recording is already under way on this Gpu; recordings do not nest"
                        .into(),
                });
            }
            let encoder = self
                .device()
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("recorded step"),
                });
            *recording = Some(Recording {
                encoder,
                deferred: Vec::new(),
            });
        }
        let result = step();
        let finished = lock(&self.inner.recording).take();
        if let Some(recording) = finished {
            if result.is_ok() {
                self.checked("submitting a recorded step", || {
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
    /// submitted at once.
    pub(crate) fn with_encoder(
        &self,
        label: &str,
        encode: impl FnOnce(&mut wgpu::CommandEncoder) -> Result<()>,
    ) -> Result<()> {
        let mut recording = lock(&self.inner.recording);
        if let Some(active) = recording.as_mut() {
            return encode(&mut active.encoder);
        }
        drop(recording);
        let mut encoder = self
            .device()
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some(label) });
        encode(&mut encoder)?;
        self.queue().submit([encoder.finish()]);
        self.count_submit();
        Ok(())
    }

    /// Submits what the active recording holds so far (before a readback).
    pub(crate) fn flush_recording(&self) {
        let mut recording = lock(&self.inner.recording);
        if let Some(active) = recording.as_mut() {
            let fresh = self
                .device()
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("recorded step"),
                });
            let done = std::mem::replace(&mut active.encoder, fresh);
            self.queue().submit([done.finish()]);
            self.count_submit();
        }
    }

    /// Takes a dropped tensor's buffer: into the pool, or held until the recording's submit.
    pub(crate) fn release_buffer(&self, buffer: wgpu::Buffer, class: u64) {
        let mut recording = lock(&self.inner.recording);
        match recording.as_mut() {
            Some(active) => active.deferred.push((buffer, class)),
            None => {
                drop(recording);
                lock(&self.inner.pool).give_back(buffer, class);
            }
        }
    }
}
