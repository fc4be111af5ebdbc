//! Compute pipelines, compiled once per `Gpu` and looked up by key.

use std::collections::HashMap;
use std::sync::Arc;

use super::context::{Gpu, lock};
use crate::error::Result;

#[derive(Default)]
pub(crate) struct PipelineCache {
    pipelines: HashMap<String, Arc<wgpu::ComputePipeline>>,
}

impl PipelineCache {
    pub(crate) fn len(&self) -> usize {
        self.pipelines.len()
    }
}

impl Gpu {
    /// The pipeline for `entry` in `source()`, compiled on first use and cached under
    /// `key`, which must name everything the source depends on.
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
        let source = source();
        let constants: Vec<(&str, f64)> = constants
            .iter()
            .map(|&(name, value)| (name, f64::from(value)))
            .collect();
        let pipeline = self.checked(&format!("compiling the `{key}` kernel"), || {
            let device = self.device();
            let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(key),
                source: wgpu::ShaderSource::Wgsl(source.into()),
            });
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
