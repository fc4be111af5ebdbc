//! Operands read through textures, and the calibration that decides whether kernels use them.
//!
//! On lavapipe a per-lane storage-buffer load is a bounds-checked scalar loop over the lanes,
//! while `textureLoad` is a vectorised fetch. How far apart the two are depends on the host
//! CPU: 3–4× in a matmul on an AVX2-only host, about even on an AVX-512 one. So CPU adapters
//! measure both once per context ([`Gpu::operand_reads`]) and kernels follow the winner.
//! A texture holds a dense operand as rgba32float texels, texel `i` at
//! `(i mod 2^TEXTURE_WIDTH_LOG2, i / 2^TEXTURE_WIDTH_LOG2)`: kernels index it like a
//! `array<vec4<f32>>`.

use std::time::Instant;

use bytemuck::{Pod, Zeroable};

use super::context::Gpu;
use super::dispatch::{Binding, Resource};
use super::pipelines::wgsl_section;
use super::recording::Commands;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// How much faster a texel load must be than a storage load for kernels to use textures:
/// filling a texture costs a copy or a pack per operand, and on hosts where the two loads
/// cost about the same (AVX-512) the matmuls measured even.
pub const TEXTURE_ADVANTAGE: f64 = 1.5;

/// Operand textures are 2^12 = 4096 texels wide (64 KiB rows).
pub(crate) const TEXTURE_WIDTH_LOG2: u32 = 12;

/// How kernels that offer both read their large operands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OperandReads {
    /// Per-lane loads from storage buffers (every adapter).
    Storage,
    /// `textureLoad` from rgba32float textures filled by a pack kernel (CPU adapters where
    /// that is faster).
    Texture,
}

/// What the calibration of a CPU adapter measured, and what it chose.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OperandCalibration {
    /// Nanoseconds per vec4 loaded from a storage buffer, per lane.
    pub storage_ns: f64,
    /// Nanoseconds per texel loaded with `textureLoad`, per lane.
    pub texture_ns: f64,
    /// The choice: textures only when a texel load is over 1.5× faster (textures also
    /// cost a pack or copy per operand).
    pub choice: OperandReads,
    /// Seconds the calibration took, shader compilation included.
    pub seconds: f64,
}

/// What one texel of an operand texture holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Texel {
    /// Four floats (rgba32float): operands read as vec4s.
    Vec4,
    /// One float (r32float): operands read element by element.
    Scalar,
}

impl Texel {
    fn bytes(self) -> u64 {
        match self {
            Texel::Vec4 => 16,
            Texel::Scalar => 4,
        }
    }

    fn format(self) -> wgpu::TextureFormat {
        match self {
            Texel::Vec4 => wgpu::TextureFormat::Rgba32Float,
            Texel::Scalar => wgpu::TextureFormat::R32Float,
        }
    }
}

/// A dense operand as a texture: see the module documentation.
pub(crate) struct OperandTexture {
    texture: wgpu::Texture,
    pub view: wgpu::TextureView,
    texel: Texel,
}

/// Width and height of a texture holding `texels` texels.
fn texture_extent(texels: u64) -> (u32, u64) {
    let width = 1u64 << TEXTURE_WIDTH_LOG2;
    let height = texels.div_ceil(width).max(1);
    (width as u32, height)
}

impl OperandTexture {
    /// Bytes per texel.
    pub(crate) fn texel_bytes(&self) -> u64 {
        self.texel.bytes()
    }

    /// Records a copy of `tensor` into the texture (its last texel completed from the
    /// buffer's padding: buffers come in whole vec4s).
    pub(crate) fn copy_tensor(&self, encoder: &mut wgpu::CommandEncoder, tensor: &Tensor) {
        let texels = tensor.bytes().div_ceil(self.texel.bytes());
        self.copy_from(encoder, tensor.binding_vec4(), texels);
    }

    /// Records a copy of the first `texels` texels of `src` (a dense operand) into the
    /// texture: the whole rows, then the last partial one.
    pub(crate) fn copy_from(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        src: Binding<'_>,
        texels: u64,
    ) {
        let (width, _) = texture_extent(texels);
        let full_rows = texels / u64::from(width);
        let rest = texels % u64::from(width);
        let row_bytes = u64::from(width) * self.texel.bytes();
        let parts = [
            (0, 0, width, full_rows),
            (full_rows * row_bytes, full_rows, rest as u32, 1),
        ];
        for (offset, y, part_width, rows) in parts {
            if part_width == 0 || rows == 0 {
                continue;
            }
            encoder.copy_buffer_to_texture(
                wgpu::TexelCopyBufferInfo {
                    buffer: src.buffer,
                    layout: wgpu::TexelCopyBufferLayout {
                        offset,
                        bytes_per_row: Some(row_bytes as u32),
                        rows_per_image: None,
                    },
                },
                wgpu::TexelCopyTextureInfo {
                    texture: &self.texture,
                    mip_level: 0,
                    origin: wgpu::Origin3d {
                        x: 0,
                        y: y as u32,
                        z: 0,
                    },
                    aspect: wgpu::TextureAspect::All,
                },
                wgpu::Extent3d {
                    width: part_width,
                    height: rows as u32,
                    depth_or_array_layers: 1,
                },
            );
        }
    }
}

/// The WGSL declaring kernel input `name` at `binding` with its `load_NAME(i)` accessor, read
/// from a storage buffer or an r32float operand texture (shaders/scalar_input.wgsl).
pub(crate) fn scalar_input(name: &str, binding: u32, texture: bool) -> String {
    input_declaration(if texture { "texture" } else { "storage" }, name, binding)
}

/// Like [`scalar_input`] for an input read as vec4s (`load_NAME(i)` returns vec4 number `i`),
/// from an array of vec4s or an rgba32float operand texture.
pub(crate) fn vec4_input(name: &str, binding: u32, texture: bool) -> String {
    let section = if texture {
        "texture_vec4"
    } else {
        "storage_vec4"
    };
    input_declaration(section, name, binding)
}

fn input_declaration(section: &str, name: &str, binding: u32) -> String {
    wgsl_section(include_str!("../../shaders/scalar_input.wgsl"), section)
        .replace("{{NAME}}", name)
        .replace("{{BINDING}}", &binding.to_string())
        .replace("{{MASK}}", &((1u32 << TEXTURE_WIDTH_LOG2) - 1).to_string())
        .replace("{{LOG2}}", &TEXTURE_WIDTH_LOG2.to_string())
}

/// A copy of `tensor` in an r32float operand texture, when this context reads operands
/// through textures and it fits; copied by `copy_from` ahead of the kernels that read it.
pub(crate) fn scalar_texture(tensor: &Tensor) -> Result<Option<OperandTexture>> {
    operand_copy(tensor, Texel::Scalar)
}

/// Like [`scalar_texture`], in an rgba32float operand texture: for a tensor read as vec4s.
pub(crate) fn vec4_texture(tensor: &Tensor) -> Result<Option<OperandTexture>> {
    operand_copy(tensor, Texel::Vec4)
}

/// Copies of all of `tensors` in operand textures of `texel`s (vec4 texels for tensors read
/// as vec4s), or `None` where this context reads storage or one does not fit: a kernel reads
/// its inputs one way.
fn operand_copies<'a>(
    tensors: impl IntoIterator<Item = &'a Tensor>,
    texel: Texel,
) -> Result<Option<Vec<OperandTexture>>> {
    let copies = tensors
        .into_iter()
        .map(|t| operand_copy(t, texel))
        .collect::<Result<Vec<_>>>()?;
    Ok(copies.into_iter().collect())
}

/// A kernel's inputs (binding number, tensor) and, where this context reads operands through
/// textures and they all fit, their copies as textures of `texel`s: all of them or none.
pub(crate) struct TextureInputs<'a> {
    inputs: Vec<(u32, &'a Tensor)>,
    textures: Option<Vec<OperandTexture>>,
}

impl<'a> TextureInputs<'a> {
    pub(crate) fn new(
        inputs: impl IntoIterator<Item = (u32, &'a Tensor)>,
        texel: Texel,
    ) -> Result<Self> {
        let inputs: Vec<_> = inputs.into_iter().collect();
        // No inputs: nothing read through textures.
        let textures = match inputs.is_empty() {
            true => None,
            false => operand_copies(inputs.iter().map(|&(_, t)| t), texel)?,
        };
        Ok(Self { inputs, textures })
    }

    /// Whether the inputs are read through textures.
    pub(crate) fn textures(&self) -> bool {
        self.textures.is_some()
    }

    /// The texture standing for the input at `binding`, if the inputs are read so.
    pub(crate) fn view(&self, binding: u32) -> Option<&wgpu::TextureView> {
        let at = self.inputs.iter().position(|&(n, _)| n == binding)?;
        Some(&self.textures.as_ref()?[at].view)
    }

    /// Records the copies of the inputs into their textures (nothing if read from storage:
    /// the open compute pass stays open).
    pub(crate) fn copy(&self, commands: &mut Commands<'_>) {
        for (texture, (_, t)) in self.textures.iter().flatten().zip(&self.inputs) {
            texture.copy_tensor(commands.encoder(), t);
        }
    }
}

fn operand_copy(tensor: &Tensor, texel: Texel) -> Result<Option<OperandTexture>> {
    binding_texture(tensor.gpu(), tensor.binding(), texel)
}

/// A texture for the whole of `binding` (a dense operand) as `texel`s, when this context
/// reads operands through textures and it fits; copied by `copy_from` ahead of the kernels
/// that read it.
pub(crate) fn binding_texture(
    gpu: &Gpu,
    binding: Binding<'_>,
    texel: Texel,
) -> Result<Option<OperandTexture>> {
    let texels = binding.bytes.div_ceil(texel.bytes());
    if gpu.operand_reads()? != OperandReads::Texture || !gpu.fits_operand_texture(texels) {
        return Ok(None);
    }
    gpu.operand_texture(texels, texel).map(Some)
}

impl Gpu {
    /// Whether `texels` texels fit one operand texture on this device.
    pub(crate) fn fits_operand_texture(&self, texels: u64) -> bool {
        let (width, height) = texture_extent(texels);
        let max = u64::from(self.limits().max_texture_dimension_2d);
        u64::from(width) <= max && height <= max
    }

    /// A texture for `texels` texels, written by kernels (storage) and read by others;
    /// counted towards what this thread's recording holds until its submit.
    pub(crate) fn operand_texture(&self, texels: u64, texel: Texel) -> Result<OperandTexture> {
        let texture = self.unrecorded_texture(texels, texel)?;
        let (width, height) = texture_extent(texels);
        self.hold_texture(u64::from(width) * height * texel.bytes());
        Ok(texture)
    }

    /// [`Gpu::operand_texture`] uncounted: for the calibration, whose thread records nothing.
    fn unrecorded_texture(&self, texels: u64, texel: Texel) -> Result<OperandTexture> {
        if !self.fits_operand_texture(texels) {
            // The height is what the limit caps.
            let max = u64::from(self.limits().max_texture_dimension_2d);
            return Err(Error::TooLarge {
                what: "an operand texture".into(),
                bytes: texels * texel.bytes(),
                limit_name: "max_texture_dimension_2d",
                limit: (max << TEXTURE_WIDTH_LOG2) * texel.bytes(),
                adapter: self.adapter_info().name.clone(),
            });
        }
        let (width, height) = texture_extent(texels);
        let texture = self.checked("allocating an operand texture", || {
            self.device().create_texture(&wgpu::TextureDescriptor {
                label: Some("operand"),
                size: wgpu::Extent3d {
                    width,
                    height: height as u32,
                    depth_or_array_layers: 1,
                },
                mip_level_count: 1,
                sample_count: 1,
                dimension: wgpu::TextureDimension::D2,
                format: texel.format(),
                usage: wgpu::TextureUsages::TEXTURE_BINDING
                    | wgpu::TextureUsages::STORAGE_BINDING
                    | wgpu::TextureUsages::COPY_DST,
                view_formats: &[],
            })
        })?;
        let view = texture.create_view(&wgpu::TextureViewDescriptor::default());
        Ok(OperandTexture {
            texture,
            view,
            texel,
        })
    }

    /// How this context's kernels read large operands: storage buffers on real GPUs; on
    /// CPU adapters whichever the calibration found faster, measured on the first call
    /// (well under half a second) and kept for the context's life; or what
    /// [`GpuOptions::operand_reads`](super::GpuOptions::operand_reads) forces.
    pub fn operand_reads(&self) -> Result<OperandReads> {
        if let Some(forced) = self.inner.forced_operand_reads {
            return Ok(forced);
        }
        Ok(self
            .operand_calibration()?
            .map_or(OperandReads::Storage, |c| c.choice))
    }

    /// The calibration behind [`Gpu::operand_reads`]; `None` on adapters that do not
    /// calibrate (real GPUs, or CPU adapters without fixed-size subgroups).
    pub fn operand_calibration(&self) -> Result<Option<OperandCalibration>> {
        if !self.cpu_kernels() || self.fixed_subgroup_size().is_none() {
            return Ok(None);
        }
        if let Some(found) = self.inner.calibration.get() {
            return Ok(Some(*found));
        }
        // Its buffers are made mapped at creation, which wgpu refuses by panicking on a lost
        // device.
        self.check_alive()?;
        // On a thread of its own: the first matmul may come inside a recording, whose
        // staged kernel parameters this thread's submits must not write early.
        let measured = std::thread::scope(|scope| scope.spawn(|| calibrate(self)).join())
            .map_err(|_| Error::Gpu {
                context: "calibrating operand reads".into(),
                detail: "the calibration thread panicked".into(),
            })??;
        Ok(Some(*self.inner.calibration.get_or_init(|| measured)))
    }
}

/// Mirrors `Params` in shaders/calibrate.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct CalibrateParams {
    texels: u32,
    _pad: [u32; 3],
}

/// Times `storage_reads` against `texture_reads` (shaders/calibrate.wgsl) on 1 MiB of data.
/// It submits on its own, outside any recording: its resources are private to it.
fn calibrate(gpu: &Gpu) -> Result<OperandCalibration> {
    const TEXELS: u32 = 1 << 16;
    const INVOCATIONS: u32 = 1 << 14;
    const LOADS_PER_INVOCATION: f64 = 64.0;
    const RUNS: usize = 5;
    let start = Instant::now();
    let device = gpu.device();
    let data: Vec<f32> = (0..TEXELS * 4).map(|i| (i % 97) as f32 * 0.01).collect();
    let src = gpu.checked("calibrating operand reads", || {
        wgpu::util::DeviceExt::create_buffer_init(
            device,
            &wgpu::util::BufferInitDescriptor {
                label: Some("calibration source"),
                contents: bytemuck::cast_slice(&data),
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
            },
        )
    })?;
    let out_bytes = u64::from(INVOCATIONS) * 16;
    let out = gpu.checked("calibrating operand reads", || {
        device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("calibration output"),
            size: out_bytes,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        })
    })?;
    let texture = gpu.unrecorded_texture(u64::from(TEXELS), Texel::Vec4)?;
    let src_binding = Binding {
        buffer: &src,
        bytes: u64::from(TEXELS) * 16,
    };
    let mut encoder = device.create_command_encoder(&Default::default());
    texture.copy_from(&mut encoder, src_binding, u64::from(TEXELS));
    gpu.checked("calibrating operand reads", || {
        gpu.queue().submit([encoder.finish()])
    })?;

    let params = CalibrateParams {
        texels: TEXELS,
        _pad: [0; 3],
    };
    let source = include_str!("../../shaders/calibrate.wgsl")
        .replace("{{TEXTURE_WIDTH_LOG2}}", &TEXTURE_WIDTH_LOG2.to_string());
    let out_binding = Binding {
        buffer: &out,
        bytes: out_bytes,
    };
    let kernels = [
        (
            gpu.pipeline("calibrate", "storage_reads", || source.clone())?,
            (1, Resource::Buffer(src_binding)),
        ),
        (
            gpu.pipeline("calibrate", "texture_reads", || source.clone())?,
            (3, Resource::Texture(&texture.view)),
        ),
    ];
    let mut best = [f64::INFINITY; 2];
    // The two kernels alternate, so that a busy moment on the host hits both; the first
    // round compiles the shaders (lavapipe compiles at the first dispatch) and is not kept.
    for round in 0..=RUNS {
        for (i, kernel) in kernels.iter().enumerate() {
            let (pipeline, input) = kernel;
            let mut encoder = device.create_command_encoder(&Default::default());
            {
                let mut pass = encoder.begin_compute_pass(&Default::default());
                gpu.encode_resources(
                    &mut pass,
                    pipeline,
                    bytemuck::bytes_of(&params),
                    &[*input, (2, Resource::Buffer(out_binding))],
                    u64::from(INVOCATIONS / 64),
                )?;
            }
            let started = Instant::now();
            gpu.checked("calibrating operand reads", || {
                gpu.write_uniforms();
                gpu.queue().submit([encoder.finish()])
            })?;
            gpu.synchronize()?;
            if round > 0 {
                best[i] = best[i].min(started.elapsed().as_secs_f64());
            }
        }
    }
    let loads = f64::from(INVOCATIONS) * LOADS_PER_INVOCATION;
    let [storage_ns, texture_ns] = best.map(|seconds| seconds * 1e9 / loads);
    let choice = if texture_ns * TEXTURE_ADVANTAGE < storage_ns {
        OperandReads::Texture
    } else {
        OperandReads::Storage
    };
    Ok(OperandCalibration {
        storage_ns,
        texture_ns,
        choice,
        seconds: start.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::GpuOptions;
    use crate::test_support::random;

    /// Operand textures count towards what a recording holds: a recording whose layers each
    /// make (and drop) an operand texture submits between them past `recording_hold_bytes`,
    /// and not below it nor where operands are read from storage (no textures).
    #[test]
    fn operand_textures_count_towards_what_a_recording_holds() {
        let cases = [
            (OperandReads::Texture, 1, 4),
            (OperandReads::Texture, u64::MAX, 1),
            (OperandReads::Storage, 1, 1),
        ];
        for (reads, hold, want_submits) in cases {
            let options = GpuOptions {
                operand_reads: Some(reads),
                recording_hold_bytes: hold,
                ..GpuOptions::from_env().unwrap()
            };
            let Some(gpu) = crate::test_support::gpu(options) else {
                return;
            };
            let x = Tensor::from_array(&gpu, &random(&[3, 70], 5)).unwrap();
            // Calibrates (where not forced) outside the recording.
            gpu.operand_reads().unwrap();
            let before = gpu.submissions();
            gpu.record(|| {
                for _ in 0..3 {
                    let made = vec4_texture(&x)?;
                    assert_eq!(made.is_some(), reads == OperandReads::Texture);
                    gpu.submit_between_layers();
                }
                Ok(())
            })
            .unwrap();
            let submits = gpu.submissions() - before;
            assert_eq!(submits, want_submits, "{reads:?}, holding {hold} bytes");
        }
    }
}
