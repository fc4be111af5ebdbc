//! Convolutions as implicit GEMM: the matmul kernels (`ops/matmul.rs`, both families and
//! both operand reads) load their B operand through the layer's windows
//! (`shaders/conv_implicit.wgsl`), so that no column buffer is written or read back. The
//! forward pass is `y = W · col`, the input gradient `dx = Wᵀ · B` with B holding `dy` at
//! the output that reads each input pixel through each tap (col2im written as a gather, no
//! `dcol`), and the weight gradient `Σ dy · colᵀ` per image (col read along the positions,
//! four neighbours of an output row at a time), summed in chunks of images.
//! Any kernel size, stride, padding and dilation, one group. The CPU reference is
//! `conv2d_cpu` / `conv2d_backward_cpu`.

use super::conv2d::{Conv2d, Conv2dShape, chunk_copy, chunk_limit, image_chunks};
use super::matmul::{BiasAxis, KernelChoice, Matmul, Window, swap_leading_axes};
use super::reduce::sum_axes;
use crate::error::Result;
use crate::gpu::dispatch::Binding;
use crate::tensor::{Tensor, gpu_word};

/// Whether the implicit kernels run this convolution (one group; grouped convolutions have
/// their own families).
pub(crate) fn eligible(shape: &Conv2dShape) -> bool {
    shape.groups == 1
}

/// The stored matrix of `section` for `shape`, `[images, rows, cols]`, read from `source`
/// from image `first` on.
fn window<'a>(
    spec: &Conv2d,
    shape: &Conv2dShape,
    section: &'static str,
    source: Binding<'a>,
    [images, rows, cols]: [usize; 3],
    first: usize,
) -> Result<Window<'a>> {
    let more = [("O", shape.o), ("B_ROWS", rows), ("B_COLS", cols)];
    Ok(Window {
        source,
        shape: [images, rows, cols],
        first_image: gpu_word("conv2d", first)?,
        section,
        constants: spec.window_constants(shape, &more)?,
    })
}

/// `out = act(W · col(x) + bias)` through the matmul kernels of `family` (`Auto` but in
/// tests).
pub(crate) fn forward(
    spec: &Conv2d,
    shape: &Conv2dShape,
    (x, weight, bias): (&Tensor, &Tensor, Option<&Tensor>),
    out: &Tensor,
    family: KernelChoice,
) -> Result<()> {
    let (n, o, taps, positions) = (shape.n, shape.o, shape.taps(), shape.positions());
    let matmul = Matmul {
        bias: if bias.is_some() {
            BiasAxis::PerRow
        } else {
            BiasAxis::None
        },
        activation: spec.activation,
        kernel: family,
        ..Matmul::default()
    };
    let b = window(spec, shape, "forward", x.binding(), [n, taps, positions], 0)?;
    matmul.run_window(
        x.gpu(),
        weight.operand_as(&[o, taps]),
        &b,
        bias.map(Tensor::operand),
        out.operand_as(&[n, o, positions]),
    )?;
    Ok(())
}

/// `dx = Wᵀ · B(dy)`, the filters as `[C][O·KH·KW]`.
pub(crate) fn backward_data(
    spec: &Conv2d,
    shape: &Conv2dShape,
    dy: &Tensor,
    weight: &Tensor,
    dx: &Tensor,
    family: KernelChoice,
) -> Result<()> {
    let gpu = dy.gpu();
    let (n, c, o, kernel) = (shape.n, shape.c, shape.o, shape.kh * shape.kw);
    let pixels = shape.h * shape.w;
    let transposed = swap_leading_axes(gpu, weight, [o, c, kernel])?;
    let b = window(
        spec,
        shape,
        "input_grad",
        dy.binding(),
        [n, o * kernel, pixels],
        0,
    )?;
    let matmul = Matmul {
        kernel: family,
        ..Matmul::default()
    };
    matmul.run_window(
        gpu,
        transposed.operand(),
        &b,
        None,
        dx.operand_as(&[n, c, pixels]),
    )?;
    Ok(())
}

/// `dweight = Σ_n dy[n] · col(x[n])ᵀ`: one split-K product over the batch on the tiled
/// kernel; on the others, per-image products in chunks whose products fit one binding,
/// each chunk's summed into `dweight`.
pub(crate) fn weight_grad(
    spec: &Conv2d,
    shape: &Conv2dShape,
    (x, dy): (&Tensor, &Tensor),
    dweight: &Tensor,
    family: KernelChoice,
) -> Result<()> {
    let gpu = x.gpu();
    // dy · colᵀ: col read as it lies, along the positions (the contracted axis).
    let matmul = Matmul {
        trans_b: true,
        kernel: family,
        ..Matmul::default()
    };
    let (o, taps, positions) = (shape.o, shape.taps(), shape.positions());
    // The portable kernel sums over the whole batch as one split-K product.
    let whole = window(
        spec,
        shape,
        "forward",
        x.binding(),
        [shape.n, taps, positions],
        0,
    )?;
    let dy_shape = [shape.n, o, positions];
    if matmul.run_window_summed(gpu, dy.operand_as(&dy_shape), &whole, dweight)? {
        return Ok(());
    }
    let per_image = (o * taps) as u64 * 4;
    gpu.check_buffer_size("one image's weight-gradient product", per_image)?;
    let chunks = image_chunks(shape.n, per_image, chunk_limit(gpu));
    for (index, &(first, count)) in chunks.iter().enumerate() {
        // dy's images of this chunk as the product's A (the whole of dy when one chunk).
        let dy_chunk = chunk_copy(dy, (first, count))?;
        let a_shape = [count, o, positions];
        let a = dy_chunk.as_ref().unwrap_or(dy).operand_as(&a_shape);
        let b = window(
            spec,
            shape,
            "forward",
            x.binding(),
            [count, taps, positions],
            first,
        )?;
        let products = Tensor::uninit(gpu, &[count, o, taps])?;
        matmul.run_window(gpu, a, &b, None, products.operand())?;
        sum_axes(
            gpu,
            &products,
            (count, o * taps, 1),
            dweight,
            1.0,
            index > 0,
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::GpuOptions;
    use crate::ops::conv2d::{conv2d_backward_cpu, conv2d_cpu};
    use crate::ops::{Activation, Padding};
    use crate::test_support::{gpu, max_abs_diff, random};

    /// Every matmul family the adapter can run (the portable tiled one everywhere, both
    /// subgroup reads where subgroups have a fixed size) reads the implicit B of all three
    /// passes: against the CPU with poisoned outputs, on shapes that fill no tile (K and N
    /// not multiples of 4 or of the tiles, rows of x and y that are and are not whole vec4s),
    /// strides 1 to 3, dilation, rectangular kernels, a K past the loop bound,
    /// asymmetric padding, a fused bias and activation (`wide_weight_gradients_are_summed_in_chunks`
    /// runs the weight gradient over several chunks).
    #[test]
    fn every_matmul_family_reads_the_windows() {
        let Some(gpu) = gpu(GpuOptions::default()) else {
            return;
        };
        let mut families = vec![KernelChoice::Tiled];
        if gpu.fixed_subgroup_size().is_some() {
            families.extend([KernelChoice::Subgroup, KernelChoice::SubgroupTexture]);
        }
        // (x, w, stride, dilation, padding, activation)
        let cases = [
            (
                [2, 3, 11, 9],
                [5, 3, 3, 3],
                1,
                1,
                Padding::Explicit(1, 1),
                Activation::Relu,
            ),
            (
                [3, 7, 13, 10],
                [70, 7, 3, 3],
                2,
                1,
                Padding::Explicit(1, 1),
                Activation::None,
            ),
            (
                [1, 4, 17, 15],
                [6, 4, 7, 7],
                2,
                1,
                Padding::Explicit(3, 3),
                Activation::Tanh,
            ),
            (
                [2, 5, 12, 14],
                [9, 5, 3, 2],
                1,
                2,
                Padding::Asymmetric {
                    top: 0,
                    bottom: 2,
                    left: 1,
                    right: 0,
                },
                Activation::LeakyRelu(0.1),
            ),
            (
                [2, 6, 9, 8],
                [33, 6, 1, 1],
                2,
                1,
                Padding::Explicit(0, 0),
                Activation::None,
            ),
            (
                [1, 2, 7, 7],
                [3, 2, 5, 5],
                3,
                1,
                Padding::Explicit(2, 2),
                Activation::None,
            ),
            // A stem-like layer with 65,536 outputs or more and 64 filters or more: the
            // subgroup kernel's eight rows a lane (70 filters: a part tile).
            (
                [2, 3, 66, 62],
                [70, 3, 7, 7],
                2,
                1,
                Padding::Explicit(3, 3),
                Activation::Relu,
            ),
            // 67,600 positions: the weight gradient's K runs in passes within the loop bound.
            (
                [1, 1, 260, 260],
                [2, 1, 1, 1],
                1,
                1,
                Padding::Explicit(0, 0),
                Activation::None,
            ),
            // Rows of whole vec4s (x and y): the row-sharing loads.
            (
                [2, 5, 10, 12],
                [11, 5, 3, 3],
                1,
                1,
                Padding::Explicit(1, 1),
                Activation::Relu,
            ),
            (
                [1, 3, 9, 16],
                [4, 3, 3, 3],
                2,
                1,
                Padding::Explicit(1, 1),
                Activation::None,
            ),
            (
                [1, 4, 8, 12],
                [5, 4, 3, 3],
                1,
                2,
                Padding::Explicit(2, 2),
                Activation::None,
            ),
        ];
        for family in families {
            for (i, (x_shape, w_shape, stride, dilation, padding, activation)) in
                cases.into_iter().enumerate()
            {
                let label = format!("{family:?} case {i}");
                let spec = Conv2d {
                    stride: (stride, stride),
                    dilation: (dilation, dilation),
                    padding,
                    activation,
                    ..Conv2d::default()
                };
                let seed = 40 + 5 * i as u64;
                let (x, w, b) = (
                    random(&x_shape, seed),
                    random(&w_shape, seed + 1),
                    random(&w_shape[..1], seed + 2),
                );
                let shape = spec.shape(x.shape(), w.shape(), None).unwrap();
                let dy = random(&shape.output(), seed + 3);
                let up = |a: &ndarray::ArrayD<f32>| Tensor::from_array(&gpu, a).unwrap();
                let poisoned = |shape: &[usize]| Tensor::full(&gpu, shape, f32::NAN).unwrap();
                let (tx, tw, tb, tdy) = (up(&x), up(&w), up(&b), up(&dy));
                let close = |got: &Tensor, want: &ndarray::ArrayD<f32>, terms: usize, what| {
                    let got = got.to_array().unwrap();
                    let diff = max_abs_diff(&got, want);
                    let tolerance = 4e-5 * (terms as f32).sqrt() + 1e-5;
                    assert!(diff <= tolerance, "{label} {what}: off by {diff}");
                };

                let y = poisoned(&shape.output());
                forward(&spec, &shape, (&tx, &tw, Some(&tb)), &y, family).unwrap();
                let want = conv2d_cpu(&spec, &x.view(), &w.view(), Some(&b.view())).unwrap();
                close(&y, &want, shape.taps(), "y");

                let linear = Conv2d {
                    activation: Activation::None,
                    ..spec
                };
                let want = conv2d_backward_cpu(&linear, &x.view(), &w.view(), &dy.view()).unwrap();
                let dx = poisoned(&x_shape);
                backward_data(&linear, &shape, &tdy, &tw, &dx, family).unwrap();
                close(&dx, &want.x, shape.o * shape.kh * shape.kw, "dx");
                let dw = poisoned(&w_shape);
                weight_grad(&linear, &shape, (&tx, &tdy), &dw, family).unwrap();
                close(&dw, &want.weight, shape.n * shape.positions(), "dW");
            }
        }
    }
}
