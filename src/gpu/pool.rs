//! A bounded pool of storage buffers, reused by size class.
//!
//! Buffers are rounded up to a size class (powers of two split in four steps, so at most
//! 25% is wasted) and kept on a free list when a tensor drops them. Reuse is safe because
//! every public op submits its commands before returning, and inside `Gpu::record` dropped
//! buffers come back only after the recorded step is submitted: a buffer handed out again
//! can only be written by work queued after the work that last used it.

use std::collections::HashMap;

/// Counters that show how the pool behaves.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Buffers created on the device.
    pub allocations: u64,
    /// Requests served from the free lists.
    pub reuses: u64,
    /// Bytes in buffers currently held by tensors.
    pub live_bytes: u64,
    /// Bytes in idle buffers kept for reuse.
    pub cached_bytes: u64,
    /// Most bytes ever live at once.
    pub peak_live_bytes: u64,
    /// Idle buffers dropped because the cache was full.
    pub evictions: u64,
}

pub(crate) struct BufferPool {
    free: HashMap<u64, Vec<wgpu::Buffer>>,
    cache_limit: u64,
    stats: PoolStats,
}

/// The size class of a request: 16-byte minimum, then four steps per power of two.
pub(crate) fn size_class(bytes: u64) -> u64 {
    let bytes = bytes.max(16);
    let power = bytes.next_power_of_two();
    if power <= 64 {
        return power;
    }
    let step = power / 8;
    bytes.div_ceil(step) * step
}

impl BufferPool {
    pub(crate) fn new(cache_limit: u64) -> Self {
        Self {
            free: HashMap::new(),
            cache_limit,
            stats: PoolStats::default(),
        }
    }

    /// A free buffer of `class` bytes, if one is cached.
    pub(crate) fn take(&mut self, class: u64) -> Option<wgpu::Buffer> {
        let buffer = self.free.get_mut(&class)?.pop()?;
        self.stats.reuses += 1;
        self.stats.cached_bytes -= class;
        self.mark_live(class);
        Some(buffer)
    }

    /// Records a buffer just created on the device.
    pub(crate) fn record_allocation(&mut self, class: u64) {
        self.stats.allocations += 1;
        self.mark_live(class);
    }

    fn mark_live(&mut self, class: u64) {
        self.stats.live_bytes += class;
        self.stats.peak_live_bytes = self.stats.peak_live_bytes.max(self.stats.live_bytes);
    }

    /// Takes a buffer back from a dropped tensor; drops it if the cache is full.
    pub(crate) fn give_back(&mut self, buffer: wgpu::Buffer, class: u64) {
        self.stats.live_bytes -= class;
        if self.stats.cached_bytes + class > self.cache_limit {
            self.stats.evictions += 1;
            return;
        }
        self.stats.cached_bytes += class;
        self.free.entry(class).or_default().push(buffer);
    }

    pub(crate) fn stats(&self) -> PoolStats {
        self.stats
    }

    pub(crate) fn reset_peak(&mut self) {
        self.stats.peak_live_bytes = self.stats.live_bytes;
    }
}

#[cfg(test)]
mod tests {
    use super::size_class;

    #[test]
    fn size_classes_cover_the_request_and_waste_at_most_a_quarter() {
        for bytes in [
            1u64,
            4,
            15,
            16,
            17,
            63,
            64,
            65,
            100,
            1000,
            4096,
            4097,
            1 << 20,
            3 << 27,
        ] {
            let class = size_class(bytes);
            assert!(class >= bytes, "{bytes} -> {class}");
            // Kernels bind tensors in whole vec4s (Tensor::binding_vec4).
            assert_eq!(class % 16, 0);
            if bytes > 64 {
                assert!(
                    class * 4 <= bytes * 5 + 64,
                    "{bytes} -> {class} wastes too much"
                );
            }
            assert_eq!(size_class(class), class, "classes are fixed points");
        }
    }
}
