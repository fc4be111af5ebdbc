//! Which kernel family each pass of a convolution runs.
//!
//! Every pass lists the families that can run the shape, in a fixed order whose first is
//! the portable default (what [`Tuning::Fixed`] takes). Where several can, the first use of
//! the shape times each of them on a thread of its own (`Gpu::tuned`: once per adapter and
//! shape, remembered in memory and in the cache file) and keeps the fastest. The trial runs
//! at the layer's own batch size, or at a smaller power of two for layers heavier than
//! [`TRIAL_FLOPS`], so that measuring a model stays within seconds on lavapipe; the
//! candidates it leaves close to the leader then race again on up to the layer's batch
//! (within [`FINAL_FLOPS`]), where the families' efficiency can rank them otherwise.
//!
//! [`Tuning::Fixed`]: crate::gpu::Tuning::Fixed

use std::time::{Duration, Instant};

use super::Activation;
use super::conv_direct::LEADING_FILTERS;
use super::conv2d::{Conv2d, Conv2dShape, chunk_limit};
use super::{conv_direct, conv_grouped, conv_implicit, conv_weight_grad, conv_winograd};
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::gpu::TrialTimes;
use crate::gpu::shared::MAX_LOOP_ITERATIONS;
use crate::tensor::Tensor;

/// Taps per group from which a grouped convolution's forward pass, and its backward pass,
/// default to im2col + matmul instead of the direct kernels (both are candidates for the
/// tuner). Measured on lavapipe (`perf`, ms direct → matmul): N8 64→64 56² 3×3 in two
/// groups (288 taps) forward 590 → 166; N8 128→128 28² 3×3 in 32 groups (36 taps, ResNeXt)
/// forward 48.6 → 69.3 but backward 133 → 62; a depthwise layer stays direct up to 7×7
/// (its row kernels: N8 C672 14² 5×5 forward and backward 187 ms through im2col, 41 direct).
const GROUPED_MATMUL_TAPS_FORWARD: usize = 64;
const GROUPED_MATMUL_TAPS_BACKWARD: usize = 16;

/// Forward floating-point operations above which a trial runs on fewer images than the
/// layer's batch (ResNet-18's 3×3 layers at 224×224 are timed on two images, ResNet-20's
/// on 64 of its 128). Smaller trials mislead: on lavapipe, ResNet-20's choices timed on 8
/// images (2^26) made a step of 970–975 ms, on 64 805–902 and on all 128 777–920 (three
/// alternated runs each); measuring all its shapes took 12.8 s on 64 against 27.8 on 128.
const TRIAL_FLOPS: f64 = (1u64 << 29) as f64;

/// Forward floating-point operations up to which the candidates that a trial on fewer images
/// left within [`CLOSE`] of the leader race again on more (the layer's batch, or the largest
/// power of two within this): a wider batch can rank them otherwise. ResNet-18's layer2 3×3
/// at batch 8 timed on two images had F(2×2, 3×3) ahead of F(4×4) (5.3 against 5.6 ms) in one
/// tuning and behind in another; on all eight F(4×4) takes 13 ms there and F(2×2) 19.
const FINAL_FLOPS: f64 = (1u64 << 31) as f64;

/// Floats a trial copies between two buffers of its own before each candidate's runs (48
/// MiB each way, past a host's last-level cache): on a CPU adapter this evicts the caches,
/// so that each candidate starts as it would in a model's step, where other layers'
/// tensors passed through them since. Without it, trials on 64 images favoured a Winograd
/// input gradient that runs in 1.5× the direct kernel's time inside ResNet-20's step (its
/// transformed tiles stay cached between a trial's runs); with it ResNet-20's choices made
/// a step of 749–857 ms against 816–1121 (alternated runs).
const FLUSH_FLOATS: usize = 12 << 20;

/// Forward floating-point operations below which a layer takes the fixed order untimed:
/// there every candidate runs in a few milliseconds on lavapipe (LeNet-5's layers at batch
/// 64: 11 and 20 MFLOP, direct 1.2 ms, im2col 4.8 ms), and compiling the ones that lose
/// (a large part of a second each there) would cost more than choosing could save.
const TUNED_FLOPS: f64 = (1u64 << 26) as f64;

/// Timed runs per candidate after the first (which compiles its kernels); the fastest counts.
const TIMED_ROUNDS: usize = 2;

/// A candidate slower than the fastest by this factor in a timed round runs no more.
const HOPELESS: f64 = 2.0;

/// Candidates within this factor of the fastest after the timed rounds race on for
/// [`CLOSE_ROUNDS`] more, alone: a busy moment of a shared host can stretch both of a
/// candidate's timed runs by half (lavapipe, ResNet-20's second stage: the kernels that take
/// 2.6 ms read 4.0 in one tuning of five, and a 1.07 s step took 1.17 s with that choice).
const CLOSE: f64 = 1.25;

/// The extra timed rounds of a close race.
const CLOSE_ROUNDS: usize = 2;

/// A leader faster than this per run has every candidate timed again over several runs per
/// wait: on a real GPU a trial's kernels take tens of microseconds and a submit and wait
/// about 100 (an H200's), which would otherwise decide the choice.
const MIN_TIMED_SECONDS: f64 = 1e-3;

/// The most runs one timed wait covers.
const MAX_REPEATS: usize = 32;

/// A family of convolution kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvKernel {
    /// One group's short sums per invocation (conv_grouped.rs): depthwise and small groups.
    GroupedDirect,
    /// Small filter banks at stride 1 with no im2col (conv_direct.rs, conv_weight_grad.rs;
    /// the weight-gradient kernel takes the fused activation's derivative as it reads `dy`).
    Direct,
    /// 1×1 at stride 1 without padding: plain matmuls, the input is the column buffer.
    Pointwise,
    /// 3×3 at stride 1 as Winograd F(2×2, 3×3): transformed tiles and 16 batched matmuls
    /// (conv_winograd.rs), in chunks of images.
    Winograd,
    /// 3×3 at stride 1 as Winograd F(4×4, 3×3): 36 batched matmuls, 4× fewer multiplies
    /// than direct summation, and rounding errors about ten times F(2×2, 3×3)'s (its weight
    /// gradient's several times more: conv_winograd.rs).
    Winograd4,
    /// im2col (col2im for the input gradient) and batched matmuls, in chunks of images.
    Im2colMatmul,
    /// Batched matmuls that read the im2col operand through the layer's windows as they
    /// load it (conv_implicit.rs): no column buffer, no col2im.
    ImplicitGemm,
}

impl ConvKernel {
    /// Every family (what a test forces one by one).
    pub const ALL: [ConvKernel; 7] = [
        ConvKernel::GroupedDirect,
        ConvKernel::Direct,
        ConvKernel::Pointwise,
        ConvKernel::Winograd,
        ConvKernel::Winograd4,
        ConvKernel::Im2colMatmul,
        ConvKernel::ImplicitGemm,
    ];

    /// The output block side of a Winograd family.
    pub(crate) fn winograd_tile(self) -> Option<usize> {
        match self {
            ConvKernel::Winograd => Some(2),
            ConvKernel::Winograd4 => Some(4),
            _ => None,
        }
    }

    /// The family in words, as `perf` prints it.
    pub fn name(self) -> &'static str {
        match self {
            ConvKernel::GroupedDirect => "grouped direct",
            ConvKernel::Direct => "direct",
            ConvKernel::Pointwise => "pointwise matmul",
            ConvKernel::Winograd => "winograd",
            ConvKernel::Winograd4 => "winograd 4x4",
            ConvKernel::Im2colMatmul => "im2col+matmul",
            ConvKernel::ImplicitGemm => "implicit gemm",
        }
    }
}

/// How one convolution runs on one adapter ([`Conv2d::plan`]): forward and backward
/// dispatch from it, and [`ConvPlan::label`] names what they run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvPlan {
    /// The forward pass.
    pub forward: ConvKernel,
    /// The input gradient `dx`.
    pub input_grad: ConvKernel,
    /// The weight and bias gradients.
    pub weight_grad: ConvKernel,
    /// Groups of the convolution (a grouped im2col+matmul runs one product per group).
    pub groups: usize,
}

impl ConvPlan {
    /// The kernels in words, e.g. `"direct"` (all three passes), `"grouped direct,
    /// im2col+matmul backward"` or `"direct forward, im2col+matmul dx, direct dW"`.
    pub fn label(&self) -> String {
        let [forward, dx, dw] =
            [self.forward, self.input_grad, self.weight_grad].map(ConvKernel::name);
        let label = if forward == dx && dx == dw {
            forward.to_string()
        } else if dx == dw {
            format!("{forward}, {dx} backward")
        } else {
            format!("{forward} forward, {dx} dx, {dw} dW")
        };
        if self.groups > 1 && !label.starts_with("grouped") {
            format!("grouped {label}")
        } else {
            label
        }
    }
}

/// Which gradients a backward pass computes besides the weights'.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct GradientsNeeded {
    /// `dx`: not for a network's first layer.
    pub(crate) input: bool,
    /// `dbias`: not for a layer without a bias.
    pub(crate) bias: bool,
}

/// The kernels of one backward pass, chosen together: the matmul paths share their chunks
/// between `dx` and `dW`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct BackwardKernels {
    pub(crate) input_grad: ConvKernel,
    pub(crate) weight_grad: ConvKernel,
}

impl BackwardKernels {
    fn name(&self, input_grad: bool) -> String {
        if input_grad {
            format!(
                "{} dx + {} dW",
                self.input_grad.name(),
                self.weight_grad.name()
            )
        } else {
            format!("{} dW", self.weight_grad.name())
        }
    }
}

/// The tensors a trial runs on: constants (the kernels' time does not depend on the values).
struct TrialTensors {
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    dy: Tensor,
    y: Tensor,
}

impl TrialTensors {
    fn new(gpu: &Gpu, shape: &Conv2dShape, backward: bool) -> Result<Self> {
        let output = if backward {
            shape.output()
        } else {
            [1, 1, 1, 1]
        };
        Ok(Self {
            x: Tensor::full(gpu, &[shape.n, shape.c, shape.h, shape.w], 0.5)?,
            weight: Tensor::full(
                gpu,
                &[shape.o, shape.c / shape.groups, shape.kh, shape.kw],
                0.01,
            )?,
            bias: Tensor::full(gpu, &[shape.o], 0.1)?,
            dy: Tensor::full(gpu, &output, 0.01)?,
            y: Tensor::full(gpu, &output, 0.5)?,
        })
    }
}

impl Conv2d {
    /// How this convolution runs on `gpu`: the kernel family of its forward pass, input
    /// gradient and weight gradient (a backward pass without a fused activation). Where
    /// several families can run a pass, the first call measures them (see
    /// [`crate::gpu::Tuning`]); forward and backward follow the same choices.
    pub fn plan(&self, gpu: &Gpu, shape: &Conv2dShape) -> Result<ConvPlan> {
        let forward = self.forward_kernel(gpu, shape)?;
        let needs = GradientsNeeded {
            input: true,
            bias: true,
        };
        let backward = self.backward_kernels(gpu, shape, needs, None)?;
        Ok(ConvPlan {
            forward,
            input_grad: backward.input_grad,
            weight_grad: backward.weight_grad,
            groups: shape.groups,
        })
    }

    /// The forward pass's kernel.
    pub(crate) fn forward_kernel(&self, gpu: &Gpu, shape: &Conv2dShape) -> Result<ConvKernel> {
        let candidates = self.forward_candidates(gpu, shape);
        if let Some(forced) = self.kernel.filter(|k| candidates.contains(k)) {
            return Ok(forced);
        }
        if untimed(shape) {
            return Ok(candidates[0]);
        }
        let names: Vec<String> = candidates.iter().map(|k| k.name().into()).collect();
        let rounds = Rounds::of(shape);
        let key = self.tuning_key("forward", &rounds.last);
        let chosen = tuned(gpu, &rounds, &key, &names, false, |t, trial, i| {
            let out = Tensor::uninit(gpu, &trial.output())?;
            let inputs = (&t.x, &t.weight, Some(&t.bias));
            self.forward_with(candidates[i], trial, inputs, &out)
        })?;
        Ok(candidates[chosen])
    }

    /// The forward pass's kernel in a training step, and whether it keeps Winograd's input
    /// tiles for the weight gradient ([`Conv2d::forward_saving`]). Where the weight gradient
    /// planned for the shape (for the gradients `needs`, through the layer's activation) is
    /// Winograd's and a forward candidate runs the same tile, the candidates are timed with what the
    /// step then costs: those that keep no such tiles with the weight gradient's input
    /// transform added (a key of its own, "training forward"), where the whole batch's tiles
    /// fit the one chunk a kept V must be made in. On lavapipe this took F(4×4)
    /// for ResNet-20's 32-channel layers, where the forward pass alone takes the direct
    /// kernel. Elsewhere the forward pass's own choice.
    pub(crate) fn training_forward_kernel(
        &self,
        gpu: &Gpu,
        shape: &Conv2dShape,
        needs: GradientsNeeded,
    ) -> Result<(ConvKernel, bool)> {
        let candidates = self.forward_candidates(gpu, shape);
        // The backward plan (measured now, if it was not) matters only where a forward
        // candidate can keep tiles.
        if candidates.iter().all(|k| k.winograd_tile().is_none()) {
            return Ok((self.forward_kernel(gpu, shape)?, false));
        }
        let gate = Some(self.activation).filter(|a| *a != Activation::None);
        let linear = Conv2d {
            activation: Activation::None,
            ..*self
        };
        let backward = linear.backward_kernels(gpu, shape, needs, gate)?;
        // Tiles the forward pass cannot keep (a batch past one chunk of them) save nothing.
        let dw_tile = backward
            .weight_grad
            .winograd_tile()
            .filter(|&tile| conv_winograd::keeps_tiles(gpu, shape, tile));
        let keeps = |kernel: ConvKernel| dw_tile.is_some() && kernel.winograd_tile() == dw_tile;
        let forced = self.kernel.is_some_and(|k| candidates.contains(&k));
        let tile = match dw_tile {
            Some(tile) if !forced && !untimed(shape) && candidates.iter().any(|&k| keeps(k)) => {
                tile
            }
            _ => {
                let kernel = self.forward_kernel(gpu, shape)?;
                return Ok((kernel, keeps(kernel)));
            }
        };
        let names: Vec<String> = candidates.iter().map(|k| k.name().into()).collect();
        let rounds = Rounds::of(shape);
        let key = self.tuning_key("training forward", &rounds.last);
        let chosen = tuned(gpu, &rounds, &key, &names, false, |t, trial, i| {
            let out = Tensor::uninit(gpu, &trial.output())?;
            let inputs = (&t.x, &t.weight, Some(&t.bias));
            self.forward_with(candidates[i], trial, inputs, &out)?;
            if keeps(candidates[i]) {
                return Ok(());
            }
            conv_winograd::input_tiles(self, trial, &t.x, tile).map(drop)
        })?;
        let kernel = candidates[chosen];
        Ok((kernel, keeps(kernel)))
    }

    /// The backward pass's kernels, for the gradients `needs` (a layer whose input needs a
    /// gradient or not, with a bias or not), and whose fused activation (`gate`) the
    /// backward pass takes `dy` through.
    pub(crate) fn backward_kernels(
        &self,
        gpu: &Gpu,
        shape: &Conv2dShape,
        needs: GradientsNeeded,
        gate: Option<Activation>,
    ) -> Result<BackwardKernels> {
        let input_grad = needs.input;
        let candidates = self.backward_candidates(gpu, shape, input_grad);
        if let Some(forced) = self.kernel {
            let score = |k: &BackwardKernels| {
                2 * u8::from(input_grad && k.input_grad == forced)
                    + u8::from(k.weight_grad == forced)
            };
            let best = candidates.iter().map(score).max().unwrap_or(0);
            // The first in the fixed order of those that run the forced family most.
            if let Some(&kernels) = candidates.iter().find(|k| best > 0 && score(k) == best) {
                return Ok(kernels);
            }
        }
        if untimed(shape) {
            return Ok(candidates[0]);
        }
        let names: Vec<String> = candidates.iter().map(|k| k.name(input_grad)).collect();
        let rounds = Rounds::of(shape);
        let mut key = self.tuning_key("backward", &rounds.last);
        if input_grad {
            key.push_str(" dx");
        }
        if !needs.bias {
            key.push_str(" no bias");
        }
        if let Some(activation) = gate {
            key.push_str(&format!(" through {activation:?}"));
        }
        let plain = Conv2d {
            activation: Activation::None,
            ..*self
        };
        let chosen = tuned(gpu, &rounds, &key, &names, true, |t, trial, i| {
            let gate = gate.map(|activation| (activation, &t.y));
            let (x, w, dy) = (&t.x, &t.weight, &t.dy);
            plain
                .gradients_with(candidates[i], (trial, x, w, dy), (gate, None), needs)
                .map(drop)
        })?;
        Ok(candidates[chosen])
    }

    /// Forward kernels that can run `shape`, the default first.
    fn forward_candidates(&self, gpu: &Gpu, shape: &Conv2dShape) -> Vec<ConvKernel> {
        use ConvKernel::*;
        if shape.groups > 1 {
            // One output per invocation loops over its group's channels, rows and taps.
            let per_output = shape.c / shape.groups * shape.kh * (shape.kw + 2);
            // After Winograd, the grouped row kernels lead wherever they fit: N8 64→64 56² in
            // two groups (288 taps) on lavapipe 39.6 ms against im2col's 45.5, N1 128→128
            // 56² in 32 groups (ResNeXt) 1.6 against 7.7.
            let short = shape.taps() < GROUPED_MATMUL_TAPS_FORWARD
                || conv_grouped::grouped_rows_fit(self, shape);
            // Wide groups' 3×3 layers lead with Winograd, a point product per group, as
            // ungrouped ones do. The tuner's trials on lavapipe at 8 to 32 channels a group,
            // F(2×2) against grouped direct, which led before, forward (ms): N8 64→64 56² in
            // 2 groups 15.3 / 37.3 (on 4 images), in 4 groups 39.5 / 55.3; N8 128→128 28²
            // in 4, 8, 16 groups 20.3 / 80.6, 26.9 / 58.9, 14.5 / 17.9; the backward pairs
            // likewise (the 2-group layer forward + backward in the fixed order 305–309 →
            // 77–79 ms, `WGCNN_TUNING=fixed perf`).
            let mut kernels: Vec<ConvKernel> = [(Winograd, 2), (Winograd4, 4)]
                .into_iter()
                .filter(|&(_, tile)| conv_winograd::eligible(gpu, self, shape, tile))
                .map(|(kernel, _)| kernel)
                .collect();
            kernels.extend(match (per_output <= MAX_LOOP_ITERATIONS, short) {
                (false, _) => vec![Im2colMatmul],
                (true, true) => vec![GroupedDirect, Im2colMatmul],
                (true, false) => vec![Im2colMatmul, GroupedDirect],
            });
            return kernels;
        }
        let direct = conv_direct::eligible(gpu, self, shape);
        let leads = shape.o <= LEADING_FILTERS;
        [
            (Direct, direct && leads),
            (Pointwise, self.pointwise_fits(gpu, shape, false)),
            (Winograd, conv_winograd::eligible(gpu, self, shape, 2)),
            (Winograd4, conv_winograd::eligible(gpu, self, shape, 4)),
            (Im2colMatmul, true),
            (ImplicitGemm, conv_implicit::eligible(shape)),
            (Direct, direct && !leads),
        ]
        .into_iter()
        .filter_map(|(kernel, fits)| fits.then_some(kernel))
        .collect()
    }

    /// Backward kernel pairs that can run `shape`, the default first. Without an input
    /// gradient only `dW` differs between them.
    fn backward_candidates(
        &self,
        gpu: &Gpu,
        shape: &Conv2dShape,
        input_grad: bool,
    ) -> Vec<BackwardKernels> {
        use ConvKernel::*;
        let pair = |input_grad, weight_grad| BackwardKernels {
            input_grad,
            weight_grad,
        };
        if shape.groups > 1 {
            // The direct dx gathers every filter of its group's taps per input pixel.
            let gathered = shape.o / shape.groups * shape.kh * (shape.kw + 1);
            let (direct, matmul) = (
                pair(GroupedDirect, GroupedDirect),
                pair(Im2colMatmul, Im2colMatmul),
            );
            // Depthwise layers' row kernels take filters up to 7×7 at any size, and grouped
            // ones' on rows of whole vec4s at stride 1.
            let short = shape.taps() < GROUPED_MATMUL_TAPS_BACKWARD
                || conv_grouped::depthwise_rows_fit(shape)
                || conv_grouped::grouped_rows_backward_fit(self, shape, input_grad);
            let mut others = match (!input_grad || gathered <= MAX_LOOP_ITERATIONS, short) {
                (false, _) => vec![matmul],
                (true, true) => vec![direct, matmul],
                (true, false) => vec![matmul, direct],
            };
            // Where dx takes the grouped row kernels, their dx with the matmul's dW, ahead
            // of both where the matmul leads (a dW too wide for the row kernel's lanes):
            // lavapipe, N8 128→128 28² 3×3 in 32 groups (ResNeXt), dx 4.3 ms against the
            // matmul's 15.5 (the per-weight grouped dW: 68 against 12; the row kernel's 5.8).
            if input_grad && conv_grouped::grouped_rows_dx_fit(self, shape) {
                let at = if short { others.len() } else { 0 };
                others.insert(at, pair(GroupedDirect, Im2colMatmul));
            }
            // Wide groups' 3×3 layers lead with Winograd's dW and its dx, as forward.
            let mut pairs = Vec::new();
            for (dw, tile) in [(Winograd, 2), (Winograd4, 4)] {
                if !conv_winograd::eligible(gpu, self, shape, tile) {
                    continue;
                }
                for (dx, tile) in [(Winograd, 2), (Winograd4, 4)] {
                    if !input_grad || conv_winograd::eligible_backward(gpu, self, shape, tile) {
                        pairs.push(pair(dx, dw));
                    }
                    if !input_grad {
                        break;
                    }
                }
            }
            pairs.extend(others);
            return pairs;
        }
        // The direct kernels lead for small banks, and come last up to MAX_FILTERS.
        let direct_dw = conv_weight_grad::eligible(self, shape);
        let dw_leads = shape.o <= LEADING_FILTERS && shape.c <= LEADING_FILTERS;
        let direct_dx = conv_direct::eligible_backward(gpu, self, shape);
        let dx_leads = shape.c <= LEADING_FILTERS;
        let weight_grads = [
            (Direct, direct_dw && dw_leads),
            (Pointwise, self.pointwise_fits(gpu, shape, true)),
            (Winograd, conv_winograd::eligible(gpu, self, shape, 2)),
            (Winograd4, conv_winograd::eligible(gpu, self, shape, 4)),
            (Im2colMatmul, true),
            (ImplicitGemm, conv_implicit::eligible(shape)),
            (Direct, direct_dw && !dw_leads),
        ];
        let mut pairs = Vec::new();
        for weight_grad in weight_grads
            .into_iter()
            .filter_map(|(kernel, fits)| fits.then_some(kernel))
        {
            let input_grads = [
                (Direct, direct_dx && dx_leads),
                (
                    Pointwise,
                    self.pointwise_fits(gpu, shape, weight_grad != Direct),
                ),
                (
                    Winograd,
                    conv_winograd::eligible_backward(gpu, self, shape, 2),
                ),
                (
                    Winograd4,
                    conv_winograd::eligible_backward(gpu, self, shape, 4),
                ),
                (Im2colMatmul, true),
                (ImplicitGemm, conv_implicit::eligible(shape)),
                (Direct, direct_dx && !dx_leads),
            ];
            // The pointwise and im2col weight gradients share their loop with dx: each
            // runs its own kind of dx there, or one without a col buffer (direct, Winograd,
            // implicit). The others run alone, the implicit dW beside those too (with a
            // col2im dx it would pay for the col buffer it saves). The F(4×4, 3×3) dx pairs
            // with the direct and Winograd dW alone: the trials stay few.
            let shares = |dx: ConvKernel| match (weight_grad, dx) {
                (_, Winograd4) => matches!(weight_grad, Direct | Winograd | Winograd4),
                (_, ImplicitGemm) => true,
                (ImplicitGemm, _) => !matches!(dx, Im2colMatmul | Pointwise),
                (Pointwise, _) => dx != Im2colMatmul,
                (Im2colMatmul, _) => dx != Pointwise,
                _ => true,
            };
            let mut fitting = input_grads
                .into_iter()
                .filter(|&(dx, fits)| fits && shares(dx))
                .map(|(dx, _)| pair(dx, weight_grad));
            if input_grad {
                pairs.extend(fitting);
            } else {
                pairs.extend(fitting.next());
            }
        }
        pairs
    }

    /// A 1×1 convolution at stride 1 without padding whose `x` and `y` (the column
    /// buffers) fit one binding each, and for the weight gradient its per-image products
    /// `[N, O, C]` one chunk.
    fn pointwise_fits(&self, gpu: &Gpu, shape: &Conv2dShape, weight_grad: bool) -> bool {
        let binding = gpu.limits().max_storage_buffer_binding_size;
        let input = (shape.n * shape.c * shape.h * shape.w) as u64 * 4;
        let output = (shape.n * shape.o * shape.positions()) as u64 * 4;
        let partials = (shape.n * shape.o * shape.c) as u64 * 4;
        shape.pointwise(self)
            && input <= binding
            && output <= binding
            && (!weight_grad || partials <= chunk_limit(gpu))
    }

    /// What a choice is remembered by: the pass and every size that shapes the kernels'
    /// work, the batch being the trial's.
    fn tuning_key(&self, pass: &str, trial: &Conv2dShape) -> String {
        let s = trial;
        format!(
            "conv2d {pass} n{} c{} {}x{} o{} k{}x{} out{}x{} groups{} stride{}x{} dilation{}x{} pad{}x{}",
            s.n,
            s.c,
            s.h,
            s.w,
            s.o,
            s.kh,
            s.kw,
            s.oh,
            s.ow,
            s.groups,
            self.stride.0,
            self.stride.1,
            self.dilation.0,
            self.dilation.1,
            s.pad_top,
            s.pad_left
        )
    }
}

/// The shapes a tuning times: the trial's, and the final round's for the candidates close to
/// the trial's leader (the same where the trial runs the whole batch).
struct Rounds {
    trial: Conv2dShape,
    last: Conv2dShape,
}

impl Rounds {
    fn of(shape: &Conv2dShape) -> Self {
        Self {
            trial: within_flops(shape, TRIAL_FLOPS),
            last: within_flops(shape, FINAL_FLOPS),
        }
    }
}

/// The layer's shape on the largest power of two of images within `flops` (at least one,
/// at most the batch).
fn within_flops(shape: &Conv2dShape, flops: f64) -> Conv2dShape {
    let per_image = shape.flops() / shape.n as f64;
    let images = (flops / per_image).max(1.0) as usize;
    Conv2dShape {
        n: shape.n.min(1 << images.ilog2()),
        ..*shape
    }
}

/// Whether a layer is too light to time (under [`TUNED_FLOPS`]): it takes the default, and
/// builds no tuning key on its calls.
fn untimed(shape: &Conv2dShape) -> bool {
    shape.flops() < TUNED_FLOPS
}

/// The index among `names` (the first is the default) that `Gpu::tuned` picks for `key`,
/// trials running `run(tensors, shape, i)` (with `dy` for a backward pass): the candidates
/// the tuner asks for on the trial's shape, then, where every one of them started, those
/// within [`CLOSE`] of their leader on the final round's, whose times alone are kept (the
/// others' read none: they were not timed on that shape).
fn tuned(
    gpu: &Gpu,
    rounds: &Rounds,
    key: &str,
    names: &[String],
    backward: bool,
    run: impl Fn(&TrialTensors, &Conv2dShape, usize) -> Result<()> + Sync,
) -> Result<usize> {
    gpu.tuned(key, names, |request| {
        let began = Instant::now();
        let (trial, asked) = (&rounds.trial, request.run);
        let timed = time_trials(
            gpu,
            asked.len(),
            (request.budget, request.at_least),
            || TrialTensors::new(gpu, trial, backward),
            |t, j| run(t, trial, asked[j]),
        )?;
        let mut times = timed.times;
        let close = close_to_leader(&times);
        let last = &rounds.last;
        let left = request.budget.saturating_sub(began.elapsed());
        let cut = timed.started < asked.len();
        if cut || last.n == trial.n || close.len() < 2 || left.is_zero() {
            return Ok(TrialTimes {
                times,
                started: timed.started,
                batch: trial.n,
            });
        }
        let finals = time_trials(
            gpu,
            close.len(),
            (left, 1),
            || TrialTensors::new(gpu, last, backward),
            |t, j| run(t, last, asked[close[j]]),
        )?;
        let mut batch = trial.n;
        if finals.started == close.len() && finals.times.iter().any(Option::is_some) {
            times = vec![None; asked.len()];
            for (&j, time) in close.iter().zip(finals.times) {
                times[j] = time;
            }
            batch = last.n;
        }
        Ok(TrialTimes {
            times,
            started: asked.len(),
            batch,
        })
    })
}

/// The candidates timed within [`CLOSE`] of the fastest.
fn close_to_leader(times: &[Option<f64>]) -> Vec<usize> {
    let leader = times
        .iter()
        .flatten()
        .copied()
        .fold(f64::INFINITY, f64::min);
    (0..times.len())
        .filter(|&i| times[i].is_some_and(|t| t <= leader * CLOSE))
        .collect()
}

/// How many runs of a candidate whose one run took `seconds` fill [`MIN_TIMED_SECONDS`]
/// (at most [`MAX_REPEATS`]).
fn repeats_for(seconds: f64) -> usize {
    if seconds >= MIN_TIMED_SECONDS {
        return 1;
    }
    // A zero reading (a coarse clock) makes an infinite ratio, which saturates.
    ((MIN_TIMED_SECONDS / seconds).ceil() as usize).clamp(1, MAX_REPEATS)
}

/// The times [`time_trials`] took, per candidate (`None`: it failed, or never started), and
/// how many of the candidates started.
#[derive(Debug)]
struct Trial {
    times: Vec<Option<f64>>,
    started: usize,
}

/// Times `run(tensors, i)` for each of `count` candidates, on a thread of its own (outside
/// the caller's recording), each run one submit, each candidate's runs after a copy that
/// flushes the caches ([`FLUSH_FLOATS`]): a first round that compiles the kernels,
/// then the fastest of [`TIMED_ROUNDS`], the candidates taking turns so that a busy moment
/// on the host hits them all, and those [`HOPELESS`]ly slow dropping out; those still
/// within [`CLOSE`] of the leader then race on for [`CLOSE_ROUNDS`] more. Where the first
/// timed round's leader took under [`MIN_TIMED_SECONDS`] (a fast GPU, where a submit and
/// wait costs more than the kernels), every candidate still running is timed again over
/// as many runs per wait as fill it, and only those rounds count. A candidate that fails
/// gets `None`. Where `budget` (the first of `limits`) has passed after a candidate's first
/// run, past the first `at_least` (the second), the candidates after it do not start: those
/// that did are timed in one round (no more), the others read `None`.
fn time_trials<T>(
    gpu: &Gpu,
    count: usize,
    (budget, at_least): (Duration, usize),
    setup: impl FnOnce() -> Result<T> + Send,
    run: impl Fn(&T, usize) -> Result<()> + Sync,
) -> Result<Trial> {
    let trials = || -> Result<Trial> {
        let began = Instant::now();
        let tensors = setup()?;
        // Where the device cannot hold them, trials run without.
        let flush = [0, 1].map(|_| Tensor::uninit(gpu, &[FLUSH_FLOATS]).ok());
        gpu.synchronize()?;
        let mut best = vec![Some(f64::INFINITY); count];
        let mut running = vec![true; count];
        let (mut runs, mut last_round, mut round) = (1, TIMED_ROUNDS, 0);
        let (mut raced_on, mut started) = (false, count);
        while round <= last_round {
            for (i, slot) in best.iter_mut().enumerate() {
                let Some(fastest) = slot.filter(|_| running[i]) else {
                    continue;
                };
                if let [Some(from), Some(to)] = &flush {
                    gpu.copy((from.buffer(), 0), (to.buffer(), 0), from.bytes())?;
                    gpu.synchronize()?;
                }
                let started_at = Instant::now();
                // A submit per run, one wait: what a run drops goes back to the pool for
                // the next, as in a training loop.
                let ran = (0..runs)
                    .try_for_each(|_| gpu.record(|| run(&tensors, i)))
                    .and_then(|()| gpu.synchronize());
                let per_run = started_at.elapsed().as_secs_f64() / runs as f64;
                *slot = match ran {
                    Err(_) => None,
                    Ok(()) if round == 0 => Some(fastest),
                    Ok(()) => Some(fastest.min(per_run)),
                };
                // The first round compiles: past the budget, the others are not started.
                if round == 0 && i + 1 < count && i + 1 >= at_least && began.elapsed() > budget {
                    started = i + 1;
                    break;
                }
            }
            // A cut trial times those started in one round: the next run races its
            // leader again, and the budget is already spent.
            if started < count {
                last_round = 1;
                for i in started..count {
                    (best[i], running[i]) = (None, false);
                }
            }
            let leader = best.iter().flatten().copied().fold(f64::INFINITY, f64::min);
            for (slot, running) in best.iter().zip(&mut running) {
                *running &= slot.is_some_and(|t| t <= leader * HOPELESS);
            }
            let repeats = repeats_for(leader);
            if round == 1 && repeats > 1 {
                runs = repeats;
                last_round = round + TIMED_ROUNDS;
                // Those dropped keep the time that dropped them.
                for (slot, _) in best.iter_mut().zip(&running).filter(|(_, r)| **r) {
                    *slot = slot.map(|_| f64::INFINITY);
                }
            } else if round == last_round && !raced_on && started == count {
                raced_on = true;
                for (slot, running) in best.iter().zip(&mut running) {
                    *running &= slot.is_some_and(|t| t <= leader * CLOSE);
                }
                if running.iter().filter(|&&r| r).count() > 1 {
                    last_round += CLOSE_ROUNDS;
                }
            }
            round += 1;
        }
        Ok(Trial {
            times: best,
            started,
        })
    };
    std::thread::scope(|scope| scope.spawn(trials).join()).map_err(|_| Error::Gpu {
        context: "timing convolution kernels".into(),
        detail: "the tuning thread panicked".into(),
    })?
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;
    use crate::gpu::GpuOptions;

    /// A heavy layer's trial runs on a power of two of its images within TRIAL_FLOPS and its
    /// close race on up to the whole batch within FINAL_FLOPS; a light layer runs whole in both.
    #[test]
    fn rounds_widen_to_the_batch_within_their_budgets() {
        let layer = |n, c, hw| {
            Conv2d {
                padding: crate::ops::Padding::Explicit(1, 1),
                ..Conv2d::default()
            }
            .shape(&[n, c, hw, hw], &[c, c, 3, 3], None)
            .unwrap()
        };
        // ResNet-18's layer2 3×3 (231 MFLOP an image) at batch 8 and 32.
        let rounds = Rounds::of(&layer(8, 128, 28));
        assert_eq!((rounds.trial.n, rounds.last.n), (2, 8));
        let rounds = Rounds::of(&layer(32, 128, 28));
        assert_eq!((rounds.trial.n, rounds.last.n), (2, 8));
        // ResNet-20's first stage at batch 128 (4.7 MFLOP an image).
        let rounds = Rounds::of(&layer(128, 16, 32));
        assert_eq!((rounds.trial.n, rounds.last.n), (64, 128));
        let rounds = Rounds::of(&layer(3, 16, 32));
        assert_eq!((rounds.trial.n, rounds.last.n), (3, 3));
    }

    #[test]
    fn the_close_race_takes_those_within_close_of_the_leader() {
        let times = [
            Some(1.2),
            Some(1.0),
            None,
            Some(1.0 * CLOSE + 0.01),
            Some(CLOSE),
        ];
        assert_eq!(close_to_leader(&times), vec![0, 1, 4]);
        assert!(close_to_leader(&[None, None]).is_empty());
    }

    /// A budget that runs out while the candidates compile starts no more of them past the
    /// first `at_least`: those started are timed in one round, the others never run and
    /// read no time.
    #[test]
    fn a_spent_budget_starts_no_more_candidates() {
        let Some(gpu) = crate::test_support::gpu(GpuOptions::from_env().unwrap()) else {
            return;
        };
        for at_least in [1, 2] {
            let runs = [0, 1, 2].map(|_| AtomicUsize::new(0));
            let trial = time_trials(
                &gpu,
                3,
                (Duration::from_millis(5), at_least),
                || Ok(()),
                |_, i| {
                    runs[i].fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(20));
                    Ok(())
                },
            )
            .unwrap();
            assert_eq!(trial.started, at_least);
            let mut expected = [0; 3];
            expected[..at_least].fill(2);
            assert_eq!(runs.map(|r| r.load(Ordering::Relaxed)), expected);
            for (i, time) in trial.times.iter().enumerate() {
                assert_eq!(time.is_some_and(|t| t >= 0.02), i < at_least, "{trial:?}");
            }
        }
    }

    #[test]
    fn short_runs_repeat_to_fill_the_floor() {
        assert_eq!(repeats_for(2.0 * MIN_TIMED_SECONDS), 1);
        assert_eq!(repeats_for(MIN_TIMED_SECONDS), 1);
        assert_eq!(repeats_for(MIN_TIMED_SECONDS / 10.0), 10);
        assert_eq!(repeats_for(MIN_TIMED_SECONDS / 7.5), 8);
        assert_eq!(repeats_for(1e-9), MAX_REPEATS);
        assert_eq!(repeats_for(0.0), MAX_REPEATS);
    }

    /// A leader shorter than the floor has the candidates still running timed again over
    /// several runs per wait (what keeps a fast GPU's launch latency out of the choice), and
    /// a hopelessly slow one stops after the first timed round. A loaded host can stretch an
    /// empty run past the floor: one of a few tries must show both.
    #[test]
    fn quick_trials_repeat_per_wait() {
        let Some(gpu) = crate::test_support::gpu(GpuOptions::from_env().unwrap()) else {
            return;
        };
        let pause = Duration::from_secs_f64(20.0 * MIN_TIMED_SECONDS);
        let mut tries = Vec::new();
        for _ in 0..5 {
            let runs = [AtomicUsize::new(0), AtomicUsize::new(0)];
            let times = time_trials(
                &gpu,
                2,
                (Duration::MAX, 1),
                || Ok(()),
                |_, i| {
                    runs[i].fetch_add(1, Ordering::Relaxed);
                    if i == 1 {
                        std::thread::sleep(pause);
                    }
                    Ok(())
                },
            )
            .unwrap()
            .times;
            let [quick, slow] = [0, 1].map(|i| runs[i].load(Ordering::Relaxed));
            // Every time is a reading, the dropped one's too (it goes to the cache file).
            assert!(
                times[1].is_some_and(|t| t >= pause.as_secs_f64() && t.is_finite()),
                "{times:?}"
            );
            assert!(times[0].is_some_and(f64::is_finite), "{times:?}");
            // Rounds 0 and 1 once each, then TIMED_ROUNDS of as many as the leader asked for.
            let most = 2 + MAX_REPEATS * TIMED_ROUNDS;
            assert!((1 + TIMED_ROUNDS..=most).contains(&quick), "{quick}");
            tries.push((quick, slow));
            if quick > 1 + TIMED_ROUNDS && slow == 2 {
                return;
            }
        }
        panic!(
            "(quick runs, slow runs) per try, the quick never repeated past a hopeless slow one: {tries:?}"
        );
    }

    /// The fastest candidate, slowed in both its timed rounds by a busy moment to within
    /// [`CLOSE`] of another, wins in the rounds they race on; one clearly behind stops after
    /// the timed rounds. Sleeps oversleep on a loaded host: one of a few tries must show it.
    #[test]
    fn close_races_run_on() {
        let Some(gpu) = crate::test_support::gpu(GpuOptions::from_env().unwrap()) else {
            return;
        };
        let ms = |ms: u64| Duration::from_millis(ms);
        // Candidate 0 takes 20 ms but 42 until its extra rounds; 1 takes 40, 2 takes 60.
        let pause = |i: usize, run: usize| match (i, run) {
            (0, 0..=TIMED_ROUNDS) => ms(42),
            (0, _) => ms(20),
            (1, _) => ms(40),
            _ => ms(60),
        };
        let mut tries = Vec::new();
        for _ in 0..3 {
            let runs = [0, 1, 2].map(|_| AtomicUsize::new(0));
            let times = time_trials(
                &gpu,
                3,
                (Duration::MAX, 1),
                || Ok(()),
                |_, i| {
                    std::thread::sleep(pause(i, runs[i].fetch_add(1, Ordering::Relaxed)));
                    Ok(())
                },
            )
            .unwrap()
            .times;
            let runs = runs.map(|r| r.load(Ordering::Relaxed));
            let close = 1 + TIMED_ROUNDS + CLOSE_ROUNDS;
            if runs == [close, close, 1 + TIMED_ROUNDS]
                && times[0].is_some_and(|t| t < 0.04)
                && times[1].is_some_and(|t| t >= 0.04)
            {
                return;
            }
            tries.push((runs, times));
        }
        panic!("(runs, seconds) per try: {tries:?}");
    }
}
