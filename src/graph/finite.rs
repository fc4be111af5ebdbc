//! Non-finite detection for [`Graph::set_check_finite`](crate::Graph::set_check_finite):
//! each checked tensor (a layer's output, a gradient, a parameter after its update) marks
//! its own slot of one flags buffer on the GPU (`shaders/finite.wgsl`), so a whole step's
//! checks cost one readback; on the CPU path the first failing check is remembered directly.

use bytemuck::{Pod, Zeroable};

use crate::error::{Error, Result};
use crate::gpu::shared::workgroups;
use crate::tensor::{Tensor, gpu_word};
use crate::value::{Device, Value};

/// Mirrors `Params` in shaders/finite.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct FiniteParams {
    total: u32,
    slot: u32,
    _pad: [u32; 2],
}

/// The checks of one training step, in the order they were made.
pub(crate) struct FiniteChecks {
    labels: Vec<String>,
    /// One word per check (GPU); zero until a check finds a non-finite value.
    flags: Option<Tensor>,
    /// The first failing check (CPU).
    first_cpu: Option<usize>,
}

impl FiniteChecks {
    /// Room for `capacity` checks on `device`.
    pub(crate) fn new(device: &Device, capacity: usize) -> Result<Self> {
        let flags = match device {
            // Zero bits: 0.0.
            Device::Gpu(gpu) => Some(Tensor::full(gpu, &[capacity.max(1)], 0.0)?),
            Device::Cpu => None,
        };
        Ok(Self {
            labels: Vec::new(),
            flags,
            first_cpu: None,
        })
    }

    /// Checks `value`, described by `label` ("the output of node \"conv1\"", …).
    pub(crate) fn check(&mut self, label: impl FnOnce() -> String, value: &Value) -> Result<()> {
        let slot = self.labels.len();
        match &self.flags {
            Some(flags) if slot < flags.len() => mark_non_finite(value.gpu()?, flags, slot)?,
            Some(_) => {
                return Err(Error::InvalidArgument {
                    op: "check_finite",
                    detail: format!("more checks than the {slot} planned"),
                });
            }
            None => {
                if self.first_cpu.is_none() && value.cpu()?.iter().any(|v| !v.is_finite()) {
                    self.first_cpu = Some(slot);
                }
            }
        }
        self.labels.push(label());
        Ok(())
    }

    /// The label of the first check that found a NaN or an infinity (a readback on a GPU).
    pub(crate) fn first_failure(&self) -> Result<Option<&str>> {
        let first = match &self.flags {
            Some(flags) => flags
                .to_array()?
                .iter()
                .take(self.labels.len())
                .position(|v| v.to_bits() != 0),
            None => self.first_cpu,
        };
        Ok(first.map(|i| self.labels[i].as_str()))
    }
}

/// Sets word `slot` of `flags` if `x` holds a NaN or an infinity (`shaders/finite.wgsl`).
fn mark_non_finite(x: &Tensor, flags: &Tensor, slot: usize) -> Result<()> {
    let gpu = x.gpu();
    flags.check_same_gpu("check_finite", gpu)?;
    let params = FiniteParams {
        total: gpu_word("check_finite", x.len())?,
        slot: slot as u32,
        _pad: [0; 2],
    };
    let pipeline = gpu.pipeline("finite", "main", || {
        include_str!("../../shaders/finite.wgsl").into()
    })?;
    // A few invocations per workgroup's worth of elements: the loop strides.
    let groups = workgroups((x.len() as u64).div_ceil(16));
    gpu.run_pass("checking for non-finite values", |pass| {
        gpu.encode(
            pass,
            &pipeline,
            bytemuck::bytes_of(&params),
            &[x.binding(), flags.binding()],
            groups,
        )
    })
}
