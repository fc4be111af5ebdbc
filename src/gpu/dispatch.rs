//! Encoding kernels: uniform parameters, bind groups, and grids of any size.

use super::context::Gpu;
use super::recording::Commands;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Most workgroups one grid axis may hold (WebGPU's guaranteed minimum, and lavapipe's).
const MAX_GROUPS_PER_AXIS: u64 = 65_535;

/// A storage buffer bound to a kernel: the first `bytes` of `buffer`.
#[derive(Clone, Copy)]
pub(crate) struct Binding<'a> {
    pub buffer: &'a wgpu::Buffer,
    pub bytes: u64,
}

/// A resource bound to a kernel at a binding number: a storage buffer or a texture view.
#[derive(Clone, Copy)]
pub(crate) enum Resource<'a> {
    Buffer(Binding<'a>),
    Texture(&'a wgpu::TextureView),
}

/// Splits `groups` workgroups into an `x * y` grid with both axes within the device limit.
/// Kernels rebuild the linear index as `wid.x + wid.y * num_workgroups.x` and skip those
/// at or past `groups`.
pub(crate) fn grid(groups: u64) -> Result<(u32, u32)> {
    let x = groups.clamp(1, MAX_GROUPS_PER_AXIS);
    let y = groups.div_ceil(x).max(1);
    if y > MAX_GROUPS_PER_AXIS {
        return Err(Error::InvalidArgument {
            op: "dispatch",
            detail: format!("{groups} workgroups exceed 65535² in one dispatch; split the work"),
        });
    }
    Ok((x as u32, y as u32))
}

impl Gpu {
    /// Records one kernel launch into `pass`. Binding 0 is the uniform `params` struct;
    /// bindings 1.. are `storage` in order.
    pub(crate) fn encode(
        &self,
        pass: &mut wgpu::ComputePass<'_>,
        pipeline: &wgpu::ComputePipeline,
        params: &[u8],
        storage: &[Binding<'_>],
        groups: u64,
    ) -> Result<()> {
        let numbered: Vec<_> = (1..).zip(storage.iter().copied()).collect();
        self.encode_at(pass, pipeline, params, &numbered, groups)
    }

    /// Like [`Gpu::encode`], with each storage buffer at the binding number given with it
    /// (for shaders whose entry points use different bindings).
    pub(crate) fn encode_at(
        &self,
        pass: &mut wgpu::ComputePass<'_>,
        pipeline: &wgpu::ComputePipeline,
        params: &[u8],
        storage: &[(u32, Binding<'_>)],
        groups: u64,
    ) -> Result<()> {
        let resources: Vec<_> = storage
            .iter()
            .map(|&(number, binding)| (number, Resource::Buffer(binding)))
            .collect();
        self.encode_resources(pass, pipeline, params, &resources, groups)
    }

    /// Like [`Gpu::encode_at`], with textures among the resources.
    pub(crate) fn encode_resources(
        &self,
        pass: &mut wgpu::ComputePass<'_>,
        pipeline: &wgpu::ComputePipeline,
        params: &[u8],
        resources: &[(u32, Resource<'_>)],
        groups: u64,
    ) -> Result<()> {
        let (x, y) = grid(groups)?;
        let device = self.device();
        let (uniform, offset) = self.uniform_slot(params);
        let mut entries = vec![wgpu::BindGroupEntry {
            binding: 0,
            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer: &uniform,
                offset,
                size: wgpu::BufferSize::new(params.len() as u64),
            }),
        }];
        for &(number, resource) in resources {
            entries.push(wgpu::BindGroupEntry {
                binding: number,
                resource: match resource {
                    Resource::Buffer(binding) => {
                        wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                            buffer: binding.buffer,
                            offset: 0,
                            size: wgpu::BufferSize::new(binding.bytes),
                        })
                    }
                    Resource::Texture(view) => wgpu::BindingResource::TextureView(view),
                },
            });
        }
        let bind_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &pipeline.get_bind_group_layout(0),
            entries: &entries,
        });
        pass.set_pipeline(pipeline);
        pass.set_bind_group(0, &bind_group, &[]);
        pass.dispatch_workgroups(x, y, 1);
        self.count_dispatch();
        Ok(())
    }

    /// Records kernels with `record` into a compute pass, submitted at once (or with the
    /// active recording, see [`Gpu::record`], in the pass the previous op's kernels went into).
    pub(crate) fn run_pass(
        &self,
        label: &str,
        record: impl FnOnce(&mut wgpu::ComputePass<'_>) -> Result<()>,
    ) -> Result<()> {
        self.run_pass_after(label, |_| Ok(()), record)
    }

    /// Like [`Gpu::run_pass`], with commands recorded by `before` (copies, through
    /// `Commands::encoder`, which ends the open pass) ahead of the kernels.
    pub(crate) fn run_pass_after(
        &self,
        label: &str,
        before: impl FnOnce(&mut Commands<'_>) -> Result<()>,
        record: impl FnOnce(&mut wgpu::ComputePass<'_>) -> Result<()>,
    ) -> Result<()> {
        self.checked(label, || {
            self.with_commands(label, |commands| {
                before(commands)?;
                record(commands.pass())
            })
        })?
    }

    /// Uniform copies of `operands` (each at most [`Gpu::uniform_binding_bytes`]): pooled
    /// tensors of a whole uniform binding, filled by [`UniformCopies::record`] in the same
    /// command stream as the pass that reads them (`run_pass_after`).
    pub(crate) fn uniform_copies<'a>(&self, operands: &[Binding<'a>]) -> Result<UniformCopies<'a>> {
        let floats = self.uniform_binding_bytes() as usize / 4;
        let copies = operands
            .iter()
            .map(|&operand| Ok((operand, Tensor::uninit(self, &[floats])?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(UniformCopies(copies))
    }

    /// Copies `bytes` from `src` at `src_offset` to `dst` at `dst_offset` (multiples of 4).
    pub(crate) fn copy(
        &self,
        (src, src_offset): (&wgpu::Buffer, u64),
        (dst, dst_offset): (&wgpu::Buffer, u64),
        bytes: u64,
    ) -> Result<()> {
        self.checked("copying a tensor", || {
            self.with_commands("copy", |commands| {
                let encoder = commands.encoder();
                encoder.copy_buffer_to_buffer(src, src_offset, dst, dst_offset, bytes);
                Ok(())
            })
        })?
    }
}

#[cfg(test)]
mod tests {
    use super::grid;

    #[test]
    fn grids_split_large_counts_over_two_axes() {
        assert_eq!(grid(1).unwrap(), (1, 1));
        assert_eq!(grid(65_535).unwrap(), (65_535, 1));
        let (x, y) = grid(70_000).unwrap();
        assert!(u64::from(x) * u64::from(y) >= 70_000 && y == 2);
        assert!(grid(65_535 * 65_535 + 1).is_err());
    }
}

/// Operands copied into uniform buffers ([`Gpu::uniform_copies`]; empty: none), for kernels
/// that read small operands at per-lane indices on CPU adapters, where lavapipe reads a
/// uniform buffer ~16× faster than storage (`lavapipe-probe micro`).
#[derive(Default)]
pub(crate) struct UniformCopies<'a>(Vec<(Binding<'a>, Tensor)>);

impl UniformCopies<'_> {
    /// The copy of operand `i`, to bind in its place, if there is one.
    pub(crate) fn binding(&self, i: usize) -> Option<Binding<'_>> {
        self.0.get(i).map(|(_, copy)| copy.binding())
    }

    /// Records the copies (ending the open compute pass): the `before` of
    /// [`Gpu::run_pass_after`].
    pub(crate) fn record(&self, commands: &mut Commands<'_>) -> Result<()> {
        let encoder = commands.encoder();
        for (operand, copy) in &self.0 {
            encoder.copy_buffer_to_buffer(operand.buffer, 0, copy.buffer(), 0, operand.bytes);
        }
        Ok(())
    }
}
