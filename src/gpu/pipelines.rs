//! Compute pipelines, compiled once per `Gpu` and looked up by key.

use std::collections::HashMap;
use std::sync::Arc;

use super::context::{Gpu, lock};
use crate::error::{Error, Result};

#[derive(Default)]
pub(crate) struct PipelineCache {
    pipelines: HashMap<String, Arc<wgpu::ComputePipeline>>,
}

impl PipelineCache {
    pub(crate) fn len(&self) -> usize {
        self.pipelines.len()
    }
}

/// A generated kernel: the inputs its WGSL is made from, and the generator. The pipeline
/// cache keys it by those inputs (its `Debug` form, field by field), so no key can leave out
/// an input that changes the source.
pub(crate) trait Generated: std::fmt::Debug {
    /// The WGSL made from these inputs.
    fn source(&self) -> String;
}

impl Gpu {
    /// The pipeline for `entry` of a generated kernel, keyed by the generator's inputs.
    pub(crate) fn generated(
        &self,
        kernel: &impl Generated,
        entry: &str,
        constants: &[(&str, u32)],
    ) -> Result<Arc<wgpu::ComputePipeline>> {
        self.specialized(&format!("{kernel:?}"), entry, || kernel.source(), constants)
    }

    /// The pipeline for `entry` in `source()`, compiled on first use and cached under
    /// `key`: a fixed source (a shader file) has a fixed key; a generated one goes through
    /// [`Gpu::generated`].
    pub(crate) fn pipeline(
        &self,
        key: &str,
        entry: &str,
        source: impl FnOnce() -> String,
    ) -> Result<Arc<wgpu::ComputePipeline>> {
        self.specialized(key, entry, source, &[])
    }

    /// Like [`Gpu::pipeline`], with the shader's `override` constants set to `constants`
    /// (one pipeline per distinct set). Shapes baked in as constants let the compiler fold
    /// the index arithmetic: on CPU adapters such as lavapipe, where integer division by a
    /// runtime value is a scalar loop over the lanes, that halves memory-bound kernels.
    pub(crate) fn specialized(
        &self,
        key: &str,
        entry: &str,
        source: impl FnOnce() -> String,
        constants: &[(&str, u32)],
    ) -> Result<Arc<wgpu::ComputePipeline>> {
        let mut key = format!("{key}:{entry}");
        for (name, value) in constants {
            key.push_str(&format!(":{name}={value}"));
        }
        let key = key.as_str();
        if let Some(found) = lock(&self.inner.pipelines).pipelines.get(key) {
            return Ok(Arc::clone(found));
        }
        let source = super::shared::prelude() + &source();
        // A `{{NAME}}` the generator left unfilled would compile to something else, or fail
        // far from its cause.
        if let Some(placeholder) = unfilled_placeholder(&source) {
            return Err(Error::Gpu {
                context: format!("generating the `{key}` kernel"),
                detail: format!("the placeholder {placeholder} was left unfilled"),
            });
        }
        let constants: Vec<(&str, f64)> = constants
            .iter()
            .map(|&(name, value)| (name, f64::from(value)))
            .collect();
        let pipeline = self.checked(&format!("compiling the `{key}` kernel"), || {
            let device = self.device();
            let descriptor = wgpu::ShaderModuleDescriptor {
                label: Some(key),
                source: wgpu::ShaderSource::Wgsl(source.into()),
            };
            let module = if self.inner.runtime_checks {
                device.create_shader_module(descriptor)
            } else {
                // SAFETY: every kernel of this crate guards its buffer and texture accesses
                // against the sizes it is given and bounds its loops (gpu/shared.rs), and
                // CI runs every test with the checks on as well (`GpuOptions::runtime_checks`).
                unsafe {
                    device.create_shader_module_trusted(
                        descriptor,
                        wgpu::ShaderRuntimeChecks::unchecked(),
                    )
                }
            };
            device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(key),
                layout: None,
                module: &module,
                entry_point: Some(entry),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants: &constants,
                    ..Default::default()
                },
                cache: None,
            })
        })?;
        let pipeline = Arc::new(pipeline);
        lock(&self.inner.pipelines)
            .pipelines
            .insert(key.to_string(), Arc::clone(&pipeline));
        Ok(pipeline)
    }
}

/// The part of a WGSL snippet file that follows the line `//- name`, up to the next such line.
pub(crate) fn wgsl_section<'a>(source: &'a str, name: &str) -> &'a str {
    let marker = format!("//- {name}\n");
    source.split_once(&marker).map_or("", |(_, rest)| {
        rest.split_once("//- ").map_or(rest, |(part, _)| part)
    })
}

/// The first `{{NAME}}` (upper-case letters, digits, `_`) in `source`; comments may write
/// `{{…}}` about the parts a generator fills.
fn unfilled_placeholder(source: &str) -> Option<&str> {
    let mut rest = source;
    while let Some(start) = rest.find("{{") {
        let after = &rest[start + 2..];
        let end = after.find("}}")?;
        let name = &after[..end];
        if !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
        {
            return Some(&rest[start..start + 2 + end + 2]);
        }
        rest = after;
    }
    None
}

#[cfg(test)]
mod tests {
    use crate::gpu::GpuOptions;

    /// A generator that leaves a `{{…}}` placeholder is an error naming it, before
    /// anything compiles.
    #[test]
    fn an_unfilled_placeholder_is_an_error() {
        let Some(gpu) = crate::test_support::gpu(GpuOptions::from_env().unwrap()) else {
            return;
        };
        let source = || "@compute @workgroup_size({{SIZE}}) fn main() {}".to_string();
        let e = gpu.pipeline("unfilled", "main", source).unwrap_err();
        assert!(e.to_string().contains("{{SIZE}}"), "{e}");
        let filled = || "@compute @workgroup_size(1) fn main() {}".to_string();
        assert!(gpu.pipeline("filled", "main", filled).is_ok());
    }
}
