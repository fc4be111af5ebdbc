//! Softmax cross-entropy fused with the backward pass of the linear layer that produced the
//! logits (`shaders/linear_cross_entropy.wgsl`): the loss, its correct count and the layer's
//! `dx`, `dW` and `db` in one dispatch, for heads small enough for one workgroup. Used by
//! `Graph::backward_cross_entropy` (and so `train_step`) where the model ends in a plain
//! `Linear`; elsewhere the loss and the layer's backward run as their own passes.

#[cfg(test)]
use ndarray::{ArrayD, ArrayViewD};

#[cfg(test)]
use super::activation::through_activation_cpu;
use super::linear::LinearGrads;
#[cfg(test)]
use super::linear::linear_backward_cpu;
use super::rows::{RowKernel, row_kernel};
#[cfg(test)]
use super::softmax_cross_entropy::{CrossEntropy, softmax_cross_entropy_cpu};
use super::softmax_cross_entropy::{LossParams, check, loss_source, upload_labels};
use crate::error::{Error, Result};
use crate::gpu::Generated;
use crate::gpu::dispatch::UniformCopies;
use crate::gpu::shared::WORKGROUP;
use crate::tensor::Tensor;
use crate::value::{Activation, Value};

const OP: &str = "linear_cross_entropy";

/// Loop iterations one lane may run for the layer's gradients (its share of `dx`'s and
/// `dW`'s vec4s, each a loop over the classes or the rows): past it the head is more work
/// than one workgroup, which runs on one thread of a CPU adapter, should take alone, and
/// the loss and the layer's backward run as their own passes. LeNet's head (64 rows,
/// 84 → 10) takes ~200.
const MOST_ITERATIONS: usize = 2_048;

/// The loss's results and the linear layer's gradients.
#[derive(Debug)]
pub(crate) struct LinearCrossEntropy<T> {
    /// Mean loss (`[1]`) and the correct count (`[1]`); `grad_logits` is not kept.
    pub loss: T,
    /// Rows whose first arg-max is their label, `[1]`.
    pub correct: T,
    /// The layer's gradients; `x`'s taken back through the input gate's activation, if any.
    pub grads: LinearGrads<T>,
    /// With an input gate, the bias gradient of the layer that produced `x`: the batch's sum
    /// of `grads.x`.
    pub input_bias: Option<T>,
}

impl<T> LinearCrossEntropy<T> {
    /// The same results as another type (tensors as values).
    pub(crate) fn map<U>(self, f: impl Fn(T) -> U) -> LinearCrossEntropy<U> {
        LinearCrossEntropy {
            loss: f(self.loss),
            correct: f(self.correct),
            grads: LinearGrads {
                x: f(self.grads.x),
                weight: f(self.grads.weight),
                bias: f(self.grads.bias),
            },
            input_bias: self.input_bias.map(f),
        }
    }
}

impl Value {
    /// [`linear_cross_entropy`] of these logits, made from `x` by `weight`, on the GPU;
    /// `None` on the CPU (whose model runs the two ops) and where the head does not fit.
    pub(crate) fn linear_cross_entropy(
        &self,
        labels: &[usize],
        x: &Value,
        weight: &Value,
        input_gate: Activation,
    ) -> Result<Option<LinearCrossEntropy<Value>>> {
        let (Value::Gpu(logits), Value::Gpu(x), Value::Gpu(weight)) = (self, x, weight) else {
            return Ok(None);
        };
        let fused = linear_cross_entropy(logits, labels, x, weight, input_gate)?;
        Ok(fused.map(|fused| fused.map(Value::from)))
    }
}

/// `(rows, classes, features)` of logits `[N, K]` from `x [N, F]` through `weight [K, F]`.
fn check_shapes(
    logits: &[usize],
    labels: &[usize],
    x: &[usize],
    weight: &[usize],
) -> Result<(usize, usize, usize)> {
    let (rows, classes) = check(logits, labels)?;
    match (x, weight) {
        (&[n, f], &[k, f_w]) if n == rows && k == classes && f == f_w => Ok((rows, classes, f)),
        _ => Err(Error::ShapeMismatch {
            op: OP,
            shapes: vec![logits.to_vec(), x.to_vec(), weight.to_vec()],
            detail: format!(
                "logits {logits:?} must come from x [N, F] through weight [K, F]; got x {x:?} \
                 and weight {weight:?}"
            ),
        }),
    }
}

/// Whether one workgroup takes this head: whole vec4 rows of `x`, every row a lane of the
/// loss, and each lane's share of the gradients (with an input gate, the producing layer's
/// bias gradient too) within [`MOST_ITERATIONS`].
fn fits(rows: usize, classes: usize, features: usize, gated: bool) -> bool {
    let lanes = WORKGROUP as usize;
    let features4 = features / 4;
    let dx = (rows * features4).div_ceil(lanes) * (classes + 1);
    let dweight = (classes * features4).div_ceil(lanes) * (rows + 1);
    let dbias = classes.div_ceil(lanes) * (rows + 1);
    let input_bias = usize::from(gated) * features4.div_ceil(lanes) * (rows + 1);
    features.is_multiple_of(4)
        && rows <= lanes
        && dx + dweight + dbias + input_bias <= MOST_ITERATIONS
}

/// Softmax cross-entropy of `logits = x·weightᵀ + b` against `labels` (mean over the rows)
/// and the layer's gradients from it, in one dispatch; `None` where the head does not fit
/// one workgroup (then run `softmax_cross_entropy` and `linear_backward`). With an
/// `input_gate` (the activation `x` is the output of, ending a linear layer) `dx` is taken
/// back through it, and that layer's bias gradient comes too.
pub(crate) fn linear_cross_entropy(
    logits: &Tensor,
    labels: &[usize],
    x: &Tensor,
    weight: &Tensor,
    input_gate: Activation,
) -> Result<Option<LinearCrossEntropy<Tensor>>> {
    let (rows, classes, features) =
        check_shapes(logits.shape(), labels, x.shape(), weight.shape())?;
    let gpu = logits.gpu();
    for t in [x, weight] {
        t.check_same_gpu(OP, gpu)?;
    }
    // Each row's loss reads its logits three times in one lane.
    let gated = input_gate != Activation::None;
    if !fits(rows, classes, features, gated)
        || row_kernel(OP, classes, 3)? != RowKernel::PerInvocation
    {
        return Ok(None);
    }
    let labels = upload_labels(gpu, labels)?;
    let grad = Tensor::uninit(gpu, logits.shape())?;
    let loss = Tensor::uninit(gpu, &[1])?;
    let correct = Tensor::uninit(gpu, &[1])?;
    let grads = LinearGrads {
        x: Tensor::uninit(gpu, x.shape())?,
        weight: Tensor::uninit(gpu, weight.shape())?,
        bias: Tensor::uninit(gpu, &[classes])?,
    };
    let input_gate = (input_gate != Activation::None).then_some(input_gate);
    let input_bias = input_gate
        .map(|_| Tensor::uninit(gpu, &[features]))
        .transpose()?;
    let params = LossParams {
        rows: rows as u32,
        classes: classes as u32,
        scale: 1.0 / rows as f32,
        ..LossParams::default()
    };
    let capacity = gpu.uniform_binding_bytes();
    let uniform = gpu.cpu_kernels() && x.bytes().max(weight.bytes()) <= capacity;
    let copies = if uniform {
        gpu.uniform_copies(&[x.binding(), weight.binding()])?
    } else {
        UniformCopies::default()
    };
    let x_read = copies.binding(0).unwrap_or(x.binding_vec4());
    let weight_read = copies.binding(1).unwrap_or(weight.binding_vec4());
    let kernel = HeadKernel {
        uniform_vec4s: uniform.then_some(capacity / 16),
        input_gate,
    };
    let constants = [("FEATURES4", (features / 4) as u32)];
    let pipeline = gpu.generated(&kernel, "head_small", &constants)?;
    gpu.run_pass_after(
        OP,
        |commands| copies.record(commands),
        |pass| {
            let mut bindings = vec![
                (1, logits.binding()),
                (2, labels.binding()),
                (3, grad.binding()),
                (6, loss.binding()),
                (7, correct.binding()),
                (8, x_read),
                (9, weight_read),
                (10, grads.x.binding_vec4()),
                (11, grads.weight.binding_vec4()),
                (12, grads.bias.binding()),
            ];
            bindings.extend(input_bias.as_ref().map(|b| (13, b.binding_vec4())));
            gpu.encode_at(pass, &pipeline, bytemuck::bytes_of(&params), &bindings, 1)
        },
    )?;
    Ok(Some(LinearCrossEntropy {
        loss,
        correct,
        grads,
        input_bias,
    }))
}

/// The fused head's kernel, reading x and the weight from storage or (`uniform_vec4s`, the
/// size of each binding) from uniform copies, with `dx` taken back through `input_gate`.
#[derive(Debug)]
struct HeadKernel {
    uniform_vec4s: Option<u64>,
    input_gate: Option<Activation>,
}

impl Generated for HeadKernel {
    fn source(&self) -> String {
        let operands = match self.uniform_vec4s {
            None => "@group(0) @binding(8) var<storage, read> x4: array<vec4<f32>>;\n\
                     @group(0) @binding(9) var<storage, read> weight4: array<vec4<f32>>;"
                .to_string(),
            Some(vec4s) => format!(
                "@group(0) @binding(8) var<uniform> x4: array<vec4<f32>, {vec4s}>;\n\
                 @group(0) @binding(9) var<uniform> weight4: array<vec4<f32>, {vec4s}>;"
            ),
        };
        let mut source = loss_source();
        let (mut decls, mut gate_dx, mut input_bias) = (String::new(), "", "");
        if let Some(gate) = self.input_gate {
            source.push_str(include_str!("../../shaders/epilogue.wgsl"));
            decls = format!(
                "// The activation x came out of, and the producing layer's bias gradient.\n\
                 const INPUT_ACT: u32 = {}u;\n\
                 const INPUT_SLOPE_BITS: u32 = {}u;\n\
                 @group(0) @binding(13) var<storage, read_write> dinput_bias4: array<vec4<f32>>;",
                gate.code(),
                gate.slope().to_bits()
            );
            gate_dx =
                " * activation_derivative_vec4(x4[o], INPUT_ACT, bitcast<f32>(INPUT_SLOPE_BITS))";
            input_bias = INPUT_BIAS;
        }
        source
            + &include_str!("../../shaders/linear_cross_entropy.wgsl")
                .replace("{{OPERANDS}}", &operands)
                .replace("{{INPUT_DECLS}}", &decls)
                .replace("{{GATE_DX}}", gate_dx)
                .replace("{{INPUT_BIAS}}", input_bias)
    }
}

/// With an input gate: the producing layer's bias gradient, the column sums of `dx` (every
/// lane's rows of it stored by then).
const INPUT_BIAS: &str = "    storageBarrier();
    for (var q = i; q < f4; q += WORKGROUP) {
        var sum = vec4<f32>(0.0);
        for (var r = 0u; r < p.rows; r++) {
            sum += dx4[r * f4 + q];
        }
        dinput_bias4[q] = sum;
    }";

/// CPU reference of [`linear_cross_entropy`]: the loss, then the layer's backward pass from
/// its gradient (what a model on the CPU runs, as two ops), then `dx` through the input
/// gate's activation and its sum over the batch.
#[cfg(test)]
pub(crate) fn linear_cross_entropy_cpu(
    logits: &ArrayViewD<'_, f32>,
    labels: &[usize],
    x: &ArrayViewD<'_, f32>,
    weight: &ArrayViewD<'_, f32>,
    input_gate: Activation,
) -> Result<LinearCrossEntropy<ArrayD<f32>>> {
    check_shapes(logits.shape(), labels, x.shape(), weight.shape())?;
    let CrossEntropy {
        loss,
        grad_logits,
        correct,
    } = softmax_cross_entropy_cpu(logits, labels)?;
    let mut grads = linear_backward_cpu(x, weight, &grad_logits.view())?;
    let mut input_bias = None;
    if input_gate != Activation::None {
        grads.x = through_activation_cpu(input_gate, x, &grads.x.view())?;
        input_bias = Some(grads.x.sum_axis(ndarray::Axis(0)));
    }
    Ok(LinearCrossEntropy {
        loss,
        correct,
        grads,
        input_bias,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::{Gpu, GpuOptions, KernelFamily};
    use crate::ops::linear::linear_cpu;
    use crate::test_support::{max_abs_diff, random};

    /// The fused head against the CPU reference, its outputs poisoned first: LeNet's head,
    /// a row count and widths that fill no vec4 group of lanes, a full workgroup of rows,
    /// and rows spread over several lanes' shares of `dx` and `dW`, with no input gate and
    /// through each activation (x as its outputs would be); in the portable family (x and
    /// the weight read from storage) and, on CPU adapters, the CPU-adapter one (from
    /// uniform copies).
    #[test]
    fn the_fused_head_matches_the_cpu() {
        for family in [KernelFamily::Portable, KernelFamily::Auto] {
            let options = GpuOptions {
                kernel_family: family,
                ..GpuOptions::from_env().unwrap()
            };
            let Some(gpu) = crate::test_support::gpu(options) else {
                return;
            };
            fused_head_matches_the_cpu(&gpu);
        }
    }

    fn fused_head_matches_the_cpu(gpu: &Gpu) {
        let gpu = gpu.clone();
        // (rows, classes, features, the activation x is the output of)
        for (i, (rows, classes, features, gate)) in [
            (64, 10, 84, Activation::None),
            (64, 10, 84, Activation::Relu),
            (3, 5, 4, Activation::None),
            (3, 5, 4, Activation::LeakyRelu(0.1)),
            (WORKGROUP as usize, 7, 12, Activation::Sigmoid),
            (37, 13, 200, Activation::None),
            (37, 13, 200, Activation::Tanh),
            (9, 6, 20, Activation::Relu6),
        ]
        .into_iter()
        .enumerate()
        {
            let seed = 10 * i as u64;
            // Zeros for ReLU, values past 6 for ReLU6, negatives for leaky ReLU.
            let x = random(&[rows, features], seed).mapv(|v| match gate {
                Activation::Relu => v.max(0.0),
                Activation::Relu6 => (8.0 * v).clamp(0.0, 6.0),
                Activation::Sigmoid => v.abs(),
                _ => v,
            });
            let weight = random(&[classes, features], seed + 1).mapv(|v| 2.0 * v);
            let bias = random(&[classes], seed + 2);
            let logits = linear_cpu(
                &x.view(),
                &weight.view(),
                Some(&bias.view()),
                Activation::None,
            )
            .unwrap();
            let labels: Vec<usize> = (0..rows).map(|r| (r * 7 + i) % classes).collect();
            let want =
                linear_cross_entropy_cpu(&logits.view(), &labels, &x.view(), &weight.view(), gate)
                    .unwrap();

            for shape in [
                &[1][..],
                &[classes],
                &[rows, features],
                &[classes, features],
            ] {
                drop(Tensor::full(&gpu, shape, f32::NAN).unwrap());
            }
            let upload = |a: &ArrayD<f32>| Tensor::from_array(&gpu, a).unwrap();
            let got = linear_cross_entropy(
                &upload(&logits),
                &labels,
                &upload(&x),
                &upload(&weight),
                gate,
            )
            .unwrap()
            .expect("the head fits one workgroup");
            let mut pairs = vec![
                ("loss", &got.loss, &want.loss, 1e-5),
                ("correct", &got.correct, &want.correct, 0.0),
                ("dx", &got.grads.x, &want.grads.x, 1e-5),
                ("dW", &got.grads.weight, &want.grads.weight, 1e-5),
                ("db", &got.grads.bias, &want.grads.bias, 1e-5),
            ];
            assert_eq!(got.input_bias.is_some(), want.input_bias.is_some());
            if let (Some(got), Some(want)) = (&got.input_bias, &want.input_bias) {
                pairs.push(("the input's db", got, want, 1e-5));
            }
            for (name, got, want, tolerance) in pairs {
                let diff = max_abs_diff(&got.to_array().unwrap(), want);
                assert!(
                    diff <= tolerance,
                    "{rows}×{features} → {classes} through {gate:?}: {name} off by {diff}"
                );
            }
        }
    }

    /// Heads past one workgroup (more rows than lanes, too much work per lane, rows of x
    /// that are not whole vec4s) are left to the separate passes; mismatched shapes are
    /// errors.
    #[test]
    fn heads_past_one_workgroup_are_declined() {
        let Some(gpu) = crate::test_support::gpu(GpuOptions::from_env().unwrap()) else {
            return;
        };
        let lanes = WORKGROUP as usize;
        for (rows, classes, features) in [(lanes + 1, 10, 8), (8, 1000, 512), (4, 3, 6)] {
            let logits = Tensor::full(&gpu, &[rows, classes], 0.5).unwrap();
            let x = Tensor::full(&gpu, &[rows, features], 0.25).unwrap();
            let weight = Tensor::full(&gpu, &[classes, features], 0.125).unwrap();
            let labels = vec![1; rows];
            let fused =
                linear_cross_entropy(&logits, &labels, &x, &weight, Activation::Relu).unwrap();
            assert!(fused.is_none(), "{rows}×{features} → {classes} was fused");
        }
        let logits = Tensor::full(&gpu, &[4, 3], 0.5).unwrap();
        let x = Tensor::full(&gpu, &[4, 8], 0.25).unwrap();
        let weight = Tensor::full(&gpu, &[2, 8], 0.125).unwrap();
        let error = linear_cross_entropy(&logits, &[0, 1, 2, 0], &x, &weight, Activation::None)
            .unwrap_err();
        assert!(matches!(error, Error::ShapeMismatch { .. }), "{error}");
    }
}
