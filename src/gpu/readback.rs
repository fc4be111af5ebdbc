//! Copying GPU buffers back to the host: map_async + a futures-intrusive channel.

use super::context::Gpu;
use crate::error::{Error, Result};

impl Gpu {
    /// Reads the first `bytes` of `buffer` (a multiple of 4) into host memory.
    ///
    /// Native wgpu only completes mappings while the device is polled, so this polls
    /// (blocking) before awaiting the mapping; the future never waits on another thread.
    pub(crate) async fn read_bytes(&self, buffer: &wgpu::Buffer, bytes: u64) -> Result<Vec<u8>> {
        // Inside a recording, the commands that produce `buffer` must run first.
        self.flush_recording();
        let staging = self.checked("creating a readback buffer", || {
            let staging = self.device().create_buffer(&wgpu::BufferDescriptor {
                label: Some("readback"),
                size: bytes,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            let mut encoder =
                self.device()
                    .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                        label: Some("readback"),
                    });
            encoder.copy_buffer_to_buffer(buffer, 0, &staging, 0, bytes);
            self.queue().submit([encoder.finish()]);
            self.count_submit();
            staging
        })?;

        let (sender, receiver) = futures_intrusive::channel::shared::oneshot_channel();
        staging.map_async(wgpu::MapMode::Read, .., move |result| {
            // The receiver only disappears if the caller gave up; nothing to report then.
            let _ = sender.send(result);
        });
        self.synchronize()?;
        match receiver.receive().await {
            Some(Ok(())) => {}
            Some(Err(e)) => return Err(Error::Readback(e.to_string())),
            None => return Err(Error::Readback("the mapping callback never ran".into())),
        }
        let data = staging
            .get_mapped_range(..)
            .map_err(|e| Error::Readback(e.to_string()))?
            .to_vec();
        staging.unmap();
        Ok(data)
    }
}
