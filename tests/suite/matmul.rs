//! GPU matmul (both kernel families) against the ndarray reference.

use crate::common;

use common::{gpu, max_abs_diff, random};
use ndarray::{ArrayD, IxDyn};
use proptest::prelude::*;
use wgcnn::ops::{BiasAxis, KernelChoice, Matmul};
use wgcnn::tuning::{KernelFamily, MatmulPlan, OperandReads, TEXTURE_ADVANTAGE};
use wgcnn::{Activation, Gpu, Tensor};

/// The kernels this adapter can run: the small kernel runs anywhere.
fn kernels(gpu: &Gpu) -> Vec<KernelChoice> {
    let mut kernels = vec![KernelChoice::Tiled, KernelChoice::Small];
    kernels.extend(subgroup_kernels(gpu));
    kernels
}

/// The subgroup kernel reading storage buffers and reading textures, where subgroups exist.
/// A CPU adapter (CI's lavapipe) without fixed-size subgroups fails the test: its kernels
/// would go untested without a word. (They run whatever the context's kernel family.)
fn subgroup_kernels(gpu: &Gpu) -> Vec<KernelChoice> {
    match gpu.fixed_subgroup_size() {
        Some(_) => vec![KernelChoice::Subgroup, KernelChoice::SubgroupTexture],
        None if gpu.is_cpu_adapter() => {
            panic!(
                "a CPU adapter without fixed-size subgroups: the subgroup kernels cannot be tested here"
            )
        }
        None => Vec::new(),
    }
}

fn operand_shape(batch: Option<usize>, rows: usize, cols: usize) -> Vec<usize> {
    match batch {
        Some(b) => vec![b, rows, cols],
        None => vec![rows, cols],
    }
}

/// Runs one product on the GPU (output poisoned with NaN first) and on the CPU, and checks
/// them within a tolerance that scales with K and the operands' magnitude.
#[allow(clippy::too_many_arguments)]
fn check(
    gpu: &Gpu,
    spec: Matmul,
    (a_batch, b_batch): (Option<usize>, Option<usize>),
    (m, k, n): (usize, usize, usize),
    seed: u64,
) -> MatmulPlan {
    let a_shape = if spec.trans_a {
        operand_shape(a_batch, k, m)
    } else {
        operand_shape(a_batch, m, k)
    };
    let b_shape = if spec.trans_b {
        operand_shape(b_batch, n, k)
    } else {
        operand_shape(b_batch, k, n)
    };
    let a = random(&a_shape, seed);
    let b = random(&b_shape, seed + 1);
    let bias = match spec.bias {
        BiasAxis::None => None,
        BiasAxis::PerColumn => Some(random(&[n], seed + 2)),
        BiasAxis::PerRow => Some(random(&[m], seed + 2)),
    };
    let expected = wgcnn::cpu::matmul(
        &spec,
        &a.view(),
        &b.view(),
        bias.as_ref().map(|x| x.view()).as_ref(),
    )
    .unwrap();

    let ta = Tensor::from_array(gpu, &a).unwrap();
    let tb = Tensor::from_array(gpu, &b).unwrap();
    let tbias = bias.as_ref().map(|x| Tensor::from_array(gpu, x).unwrap());
    let mut out = Tensor::full(gpu, expected.shape(), f32::NAN).unwrap();
    let plan = spec
        .forward_into(&ta, &tb, tbias.as_ref(), &mut out)
        .unwrap();
    let got = out.to_array().unwrap();

    // Each output sums K products of values in [-1, 1): f32 rounding grows with K.
    let tolerance = 1e-5 + 4.0 * f32::EPSILON * k as f32;
    let diff = max_abs_diff(&got, &expected);
    assert!(
        diff <= tolerance,
        "{plan} {spec:?} batches {a_batch:?}/{b_batch:?} m={m} k={k} n={n}: max diff {diff} > {tolerance}"
    );
    plan
}

fn activation_strategy() -> impl Strategy<Value = Activation> {
    prop_oneof![
        Just(Activation::None),
        Just(Activation::Relu),
        Just(Activation::LeakyRelu(0.1)),
        Just(Activation::Sigmoid),
        Just(Activation::Tanh),
    ]
}

fn bias_strategy() -> impl Strategy<Value = BiasAxis> {
    prop_oneof![
        Just(BiasAxis::None),
        Just(BiasAxis::PerColumn),
        Just(BiasAxis::PerRow)
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn random_shapes_match_the_cpu(
        m in 1usize..300, k in 1usize..300, n in 1usize..300,
        trans_a: bool, trans_b: bool,
        bias in bias_strategy(), activation in activation_strategy(),
        batch in prop_oneof![Just((None, None)), (1usize..4).prop_map(|b| (Some(b), Some(b))),
                             (1usize..4).prop_map(|b| (Some(b), None)), (1usize..4).prop_map(|b| (None, Some(b)))],
        seed in 0u64..1000,
    ) {
        let Some(gpu) = gpu() else { return Ok(()) };
        for kernel in kernels(gpu) {
            let spec = Matmul { trans_a, trans_b, bias, activation, kernel };
            check(gpu, spec, batch, (m, k, n), seed);
        }
    }
}

#[test]
fn sizes_around_the_tiles_and_tiny_ones() {
    let Some(gpu) = gpu() else { return };
    for (m, k, n) in [
        (1, 1, 1),
        (3, 3, 3),
        (17, 17, 17),
        (1, 1000, 1),
        (65, 63, 129),
        (8, 4, 32),
        (33, 5, 31),
        // A transposed A read as it lies (M a multiple of 4, 65,536 outputs or more), also
        // with a K that ends inside four steps; LeNet's fc1 and fc2 weight gradients (fewer
        // outputs: read as they lie without an epilogue, packed with one), and the second
        // with a K that ends inside four steps.
        (120, 64, 600),
        (84, 67, 800),
        (120, 64, 400),
        (84, 64, 120),
        (84, 67, 120),
        // Whole tiles inside the output beside edge ones, and a K range ending inside a tile:
        // the tiled kernel's unchecked loads, element by element and as vec4s.
        (130, 67, 131),
        (129, 68, 132),
    ] {
        for kernel in kernels(gpu) {
            let orders = [(false, false), (false, true), (true, false), (true, true)];
            let runs = orders.into_iter().flat_map(|o| [(o, false), (o, true)]);
            for ((trans_a, trans_b), epilogue) in runs {
                let (bias, activation) = if epilogue {
                    (BiasAxis::PerRow, Activation::Relu)
                } else {
                    (BiasAxis::None, Activation::None)
                };
                let spec = Matmul {
                    trans_a,
                    trans_b,
                    bias,
                    activation,
                    kernel,
                };
                let plan = check(gpu, spec, (None, None), (m, k, n), (m * k * n) as u64);
                // Products under 65,536 outputs run two rows a lane on the subgroup kernel (a
                // transposed A packed), except a transposed A with M a multiple of 4 and no
                // epilogue (e.g. a linear layer's weight gradient) in a run that is not
                // transposed; larger ones four (a transposed A with M a multiple of 4 read as
                // it lies): these shapes test both tiles.
                if let MatmulPlan::Subgroup { rows, subgroup, .. } = plan {
                    let unaligned = !trans_b && k % 4 != 0 && n % 4 == 0;
                    let transposed_at_4 = n > m && (m < 4 * subgroup as usize || unaligned);
                    let reads_columns = trans_a && m % 4 == 0 && !epilogue && !transposed_at_4;
                    let expected = if m * n < 65_536 && !reads_columns {
                        2
                    } else {
                        4
                    };
                    assert_eq!(rows, expected, "{plan} m={m} k={k} n={n}");
                }
            }
        }
    }
}

#[test]
fn large_products_match_the_cpu() {
    let Some(gpu) = gpu() else { return };
    // The small kernel's edges are the blocks': other tests cover them at small sizes.
    for kernel in kernels(gpu)
        .into_iter()
        .filter(|&k| k != KernelChoice::Small)
    {
        let spec = Matmul {
            kernel,
            ..Matmul::default()
        };
        check(gpu, spec, (None, None), (1024, 1024, 1024), 7);
        // LeNet conv2 as a GEMM: 64 images × 8×8 positions, 6·5·5 taps, 16 filters.
        let conv = Matmul {
            bias: BiasAxis::PerColumn,
            activation: Activation::Relu,
            kernel,
            ..Matmul::default()
        };
        check(gpu, conv, (None, None), (4096, 150, 16), 8);
    }
}

#[test]
fn grids_beyond_65535_workgroups_in_one_axis() {
    let Some(gpu) = gpu() else { return };
    // Tiny products, one tile each: over 65,535 workgroups for either family.
    for kernel in kernels(gpu) {
        let spec = Matmul {
            kernel,
            ..Matmul::default()
        };
        // Tiled: one 256-invocation group per tile; subgroup: 8 tiles per group; small: 64
        // blocks of 4×4 per group.
        let (batch, (m, k, n)) = match kernel {
            KernelChoice::Tiled => (70_000, (2, 1, 3)),
            KernelChoice::Small => (4_200_000, (1, 1, 1)),
            _ => (600_000, (2, 1, 3)),
        };
        check(gpu, spec, (Some(batch), Some(batch)), (m, k, n), 9);
    }
}

#[test]
fn auto_follows_the_kernel_family() {
    let Some(gpu) = gpu() else { return };
    let spec = Matmul::default();
    let shape = spec.shape(&[64, 64], &[64, 64], None).unwrap();
    let plan = spec.plan(gpu, &shape).unwrap();
    let family = gpu.kernel_family();
    if family == KernelFamily::CpuAdapter && gpu.fixed_subgroup_size().is_some() {
        // Operands come through textures exactly when the calibration chose them.
        let textures = gpu.operand_reads().unwrap() == OperandReads::Texture;
        assert!(
            matches!(plan, MatmulPlan::Subgroup { textures: t, .. } if t == textures),
            "{plan}"
        );
    } else {
        assert_eq!(plan, MatmulPlan::Tiled);
    }
}

/// On CPU adapters with subgroups, `Auto` runs products of at most 2^17 multiply-adds on the
/// small kernel, larger ones on the subgroup kernel; on the portable family, the tiled one.
#[test]
fn auto_takes_the_small_kernel_for_small_products_on_cpu_adapters() {
    let Some(gpu) = gpu() else { return };
    let cpu_family =
        gpu.kernel_family() == KernelFamily::CpuAdapter && gpu.fixed_subgroup_size().is_some();
    // LeNet's last layer at batch 64 (53,760), and a product one multiply-add past the bound.
    for (m, k, n, small) in [(64, 84, 10, true), (64, 32, 64, true), (64, 32, 65, false)] {
        let spec = Matmul::default();
        let shape = spec.shape(&[m, k], &[k, n], None).unwrap();
        let plan = spec.plan(gpu, &shape).unwrap();
        match (cpu_family, small) {
            (true, true) => assert_eq!(plan, MatmulPlan::Small, "m={m} k={k} n={n}"),
            (true, false) => assert!(matches!(plan, MatmulPlan::Subgroup { .. }), "{plan}"),
            (false, _) => assert_eq!(plan, MatmulPlan::Tiled),
        }
    }
}

/// A linear layer's three products (forward `x·Wᵀ + b`, `dx = dy·W`, `dW = dyᵀ·x`) read
/// their operands as they lie on the small kernel: one pipeline serves them all, each
/// matching the CPU with its output poisoned (on the subgroup kernel LeNet's last layer
/// compiled three variants, 110–170 ms of lavapipe's JIT each). A fresh context, so that
/// the count is this test's alone.
#[test]
fn one_small_pipeline_serves_a_layers_three_products() {
    let Some(_) = gpu() else { return };
    let gpu = common::new_gpu();
    let small = |trans_a, trans_b, bias| Matmul {
        trans_a,
        trans_b,
        bias,
        kernel: KernelChoice::Small,
        ..Matmul::default()
    };
    // Batch 9, 21 → 10 features: sizes that fill no vec4 nor workgroup. The first product
    // compiles the kernel (and the poisoning fill's).
    check(
        &gpu,
        small(false, true, BiasAxis::PerColumn),
        (None, None),
        (9, 21, 10),
        51,
    );
    let first = gpu.pipelines_compiled();
    check(
        &gpu,
        small(false, false, BiasAxis::None),
        (None, None),
        (9, 10, 21),
        52,
    );
    check(
        &gpu,
        small(true, false, BiasAxis::None),
        (None, None),
        (10, 9, 21),
        53,
    );
    assert_eq!(gpu.pipelines_compiled(), first);
}

#[test]
fn the_calibration_measures_both_reads_and_keeps_its_choice() {
    let Some(gpu) = gpu() else { return };
    let Some(calibration) = gpu.operand_calibration().unwrap() else {
        assert!(
            gpu.kernel_family() == KernelFamily::Portable || gpu.fixed_subgroup_size().is_none()
        );
        assert_eq!(gpu.operand_reads().unwrap(), OperandReads::Storage);
        return;
    };
    eprintln!("{calibration:?}");
    for ns in [calibration.storage_ns, calibration.texture_ns] {
        assert!(ns.is_finite() && ns > 0.0, "{calibration:?}");
    }
    let textures_win = calibration.texture_ns * TEXTURE_ADVANTAGE < calibration.storage_ns;
    let expected = if textures_win {
        OperandReads::Texture
    } else {
        OperandReads::Storage
    };
    assert_eq!(calibration.choice, expected);
    // Measured once per context: the second call returns the same figures.
    assert_eq!(gpu.operand_calibration().unwrap(), Some(calibration));
}

#[test]
fn forced_texture_reads_show_in_the_plan() {
    let Some(gpu) = gpu() else { return };
    if gpu.fixed_subgroup_size().is_none() {
        return;
    }
    let spec = Matmul {
        kernel: KernelChoice::SubgroupTexture,
        ..Matmul::default()
    };
    // Packed operands (K not a multiple of 4), and dense ones copied into textures of
    // several whole rows and a partial one (A: 10,000 texels of 4,096 per row).
    for (m, k, n) in [(100, 37, 70), (1000, 40, 12)] {
        let plan = check(gpu, spec, (None, None), (m, k, n), 13);
        assert!(plan.to_string().starts_with("subgroup-tex-"), "{plan}");
    }
}

#[test]
fn cpu_reference_follows_the_definition() {
    // A hand-sized case: [[1,2],[3,4]] · [[5,6],[7,8]] = [[19,22],[43,50]], + column bias, relu.
    let a = ArrayD::from_shape_vec(IxDyn(&[2, 2]), vec![1.0, 2.0, 3.0, 4.0]).unwrap();
    let b = ArrayD::from_shape_vec(IxDyn(&[2, 2]), vec![5.0, 6.0, 7.0, 8.0]).unwrap();
    let bias = ArrayD::from_shape_vec(IxDyn(&[2]), vec![-20.0, 0.5]).unwrap();
    let spec = Matmul {
        bias: BiasAxis::PerColumn,
        activation: Activation::Relu,
        ..Matmul::default()
    };
    let c = wgcnn::cpu::matmul(&spec, &a.view(), &b.view(), Some(&bias.view())).unwrap();
    assert_eq!(c.as_slice().unwrap(), &[0.0, 22.5, 23.0, 50.5]);
    let nt = Matmul {
        trans_b: true,
        ..Matmul::default()
    };
    let c = wgcnn::cpu::matmul(&nt, &a.view(), &b.view(), None).unwrap();
    assert_eq!(c.as_slice().unwrap(), &[17.0, 23.0, 39.0, 53.0]);
}

#[test]
fn few_rows_run_transposed_on_the_subgroup_kernel() {
    let Some(gpu) = gpu() else { return };
    if gpu.fixed_subgroup_size().is_none() {
        return;
    }
    for kernel in subgroup_kernels(gpu) {
        few_rows_run_transposed(gpu, kernel);
    }
}

fn assert_transposed(plan: MatmulPlan) {
    assert!(
        matches!(
            plan,
            MatmulPlan::Subgroup {
                transposed: true,
                ..
            }
        ),
        "{plan}"
    );
}

fn few_rows_run_transposed(gpu: &Gpu, kernel: KernelChoice) {
    // LeNet conv1 as W[6, 25] · col[n][25, 576], bias per filter (row), relu.
    let spec = Matmul {
        bias: BiasAxis::PerRow,
        activation: Activation::Relu,
        kernel,
        ..Matmul::default()
    };
    assert_transposed(check(gpu, spec, (None, Some(3)), (6, 25, 576), 11));
    for (trans_a, trans_b) in [(true, false), (false, true), (true, true)] {
        let spec = Matmul {
            trans_a,
            trans_b,
            bias: BiasAxis::PerColumn,
            ..spec
        };
        assert_transposed(check(gpu, spec, (Some(2), Some(2)), (5, 9, 100), 12));
    }
}

/// A subgroup product's bias per row (a convolution's) and ReLU are uniforms: at one shape a
/// single pipeline serves a bias per row or none, ReLU or the identity, one more the bias per
/// column (an `override` constant: its loads stay out of the others), and one more a small
/// product with neither (a kernel with no epilogue; a large one shares its pipeline), on both
/// operand-read families, each result matching the CPU with its output poisoned (as
/// constants each was a pipeline, on lavapipe a compile of 0.1–0.5 s, of its own). A fresh
/// context, so that the count is this test's alone.
#[test]
fn one_subgroup_pipeline_serves_every_row_bias_and_relu() {
    let Some(shared) = gpu() else { return };
    let gpu = common::new_gpu();
    for kernel in subgroup_kernels(shared) {
        let mut counts = Vec::new();
        for (bias, activation) in [
            (BiasAxis::PerRow, Activation::Relu),
            (BiasAxis::None, Activation::None),
            (BiasAxis::PerRow, Activation::None),
            (BiasAxis::None, Activation::Relu),
            (BiasAxis::PerColumn, Activation::Relu),
            (BiasAxis::PerColumn, Activation::None),
        ] {
            let spec = Matmul {
                bias,
                activation,
                kernel,
                ..Matmul::default()
            };
            check(&gpu, spec, (None, None), (37, 20, 44), 41);
            counts.push(gpu.pipelines_compiled());
        }
        let first = counts[0];
        assert_eq!(
            counts[1..],
            [first + 1, first + 1, first + 1, first + 2, first + 2],
            "{kernel:?}: pipelines compiled after each product"
        );
        // A product of 65,536 outputs or more keeps its epilogue without a bias or an
        // activation: one pipeline serves it with and without.
        let mut large = Vec::new();
        for (bias, activation) in [
            (BiasAxis::PerRow, Activation::Relu),
            (BiasAxis::None, Activation::None),
        ] {
            let spec = Matmul {
                bias,
                activation,
                kernel,
                ..Matmul::default()
            };
            check(&gpu, spec, (None, None), (260, 20, 264), 42);
            large.push(gpu.pipelines_compiled());
        }
        assert_eq!(
            large[0], large[1],
            "{kernel:?}: a large product without a bias"
        );
    }
}

/// A K that is not a multiple of 4 with a wide B (an im2col product of an RGB stem) runs
/// transposed, so that B is read as it lies and only A is packed: bias per row, B shared
/// and batched, outputs that fill no tile.
#[test]
fn unaligned_k_with_wide_b_runs_transposed() {
    let Some(gpu) = gpu() else { return };
    for kernel in subgroup_kernels(gpu) {
        for (batch, trans_a) in [((None, None), false), ((None, Some(2)), true)] {
            let spec = Matmul {
                trans_a,
                bias: BiasAxis::PerRow,
                activation: Activation::Relu,
                kernel,
                ..Matmul::default()
            };
            assert_transposed(check(gpu, spec, batch, (40, 27, 2004), 21));
        }
    }
}

/// Inner dimensions past the loop bound (issue 21): K = 270,000 walks past lavapipe's
/// 65,535-iteration cap in one invocation, so the kernels split K into passes, each adding
/// to C, with bias and activation applied once at the end. Small integers make every sum
/// exact in f32 in any order, so GPU and CPU must agree bit for bit; a pass cut short, a
/// pass missing or an activation applied to a partial sum shows as a difference.
#[test]
fn inner_dimensions_past_the_loop_bound_are_exact() {
    let Some(gpu) = gpu() else { return };
    for kernel in kernels(gpu) {
        // Few rows and columns (the subgroup kernel runs them transposed), each transpose;
        // then a transposed A with M a multiple of 4 (packed: under 65,536 outputs).
        let mut cases: Vec<(usize, usize, bool, bool)> =
            [(false, false), (false, true), (true, false), (true, true)]
                .into_iter()
                .map(|(ta, tb)| (3, 5, ta, tb))
                .collect();
        cases.push((68, 36, true, false));
        for (m, n, trans_a, trans_b) in cases {
            exact_past_the_loop_bound(gpu, kernel, (m, 270_000, n), (trans_a, trans_b), true);
        }
        // The same transposed A with no bias or activation: on the subgroup kernel read as it
        // lies, four rows a lane, every pass storing its sums as they are (no epilogue).
        let plan = exact_past_the_loop_bound(gpu, kernel, (68, 270_000, 36), (true, false), false);
        if let MatmulPlan::Subgroup { rows, .. } = plan {
            assert_eq!(rows, 4, "{plan}");
        }
    }
}

/// The subgroup kernel's transposed A read as it lies, four rows a lane (a product of
/// 65,536 outputs or more), over a K in two passes: 66,000 is about the shortest K past the
/// bound (4.3 G multiply-adds; the other kernels are slower), and B (K × 484) fits the
/// 128 MiB that every adapter binds.
#[test]
fn a_transposed_a_read_as_it_lies_past_the_loop_bound_is_exact() {
    let Some(gpu) = gpu() else { return };
    for kernel in subgroup_kernels(gpu) {
        let plan = exact_past_the_loop_bound(gpu, kernel, (136, 66_000, 484), (true, false), true);
        assert!(
            matches!(
                plan,
                MatmulPlan::Subgroup {
                    rows: 4,
                    transposed: false,
                    ..
                }
            ),
            "{plan}"
        );
    }
}

/// `act(op(A)·op(B) + bias)` of small integers with a bias per row and ReLU (with
/// `epilogue`; else the plain product), against the CPU bit for bit, with the output
/// poisoned.
fn exact_past_the_loop_bound(
    gpu: &Gpu,
    kernel: KernelChoice,
    (m, k, n): (usize, usize, usize),
    (trans_a, trans_b): (bool, bool),
    epilogue: bool,
) -> MatmulPlan {
    let integers = |shape: &[usize], seed| random(shape, seed).mapv(|x| (x * 2.5).round());
    let (bias, activation) = if epilogue {
        (BiasAxis::PerRow, Activation::Relu)
    } else {
        (BiasAxis::None, Activation::None)
    };
    let spec = Matmul {
        trans_a,
        trans_b,
        bias,
        activation,
        kernel,
    };
    let a = integers(&if trans_a { [k, m] } else { [m, k] }, 31);
    let b = integers(&if trans_b { [n, k] } else { [k, n] }, 32);
    // A bias that makes some outputs negative, so the ReLU clips some and not others.
    let bias = epilogue.then(|| integers(&[m], 33).mapv(|x| x * 200.0));
    let bias_view = bias.as_ref().map(|b| b.view());
    let expected = wgcnn::cpu::matmul(&spec, &a.view(), &b.view(), bias_view.as_ref()).unwrap();
    let clipped = !epilogue || expected.iter().any(|&x| x == 0.0);
    assert!(clipped && expected.iter().any(|&x| x.abs() > 100.0));
    let ta = Tensor::from_array(gpu, &a).unwrap();
    let tb = Tensor::from_array(gpu, &b).unwrap();
    let tbias = bias.map(|b| Tensor::from_array(gpu, &b).unwrap());
    let mut out = Tensor::full(gpu, expected.shape(), f32::NAN).unwrap();
    let plan = spec
        .forward_into(&ta, &tb, tbias.as_ref(), &mut out)
        .unwrap();
    let got = out.to_array().unwrap();
    assert_eq!(
        max_abs_diff(&got, &expected),
        0.0,
        "{plan} m={m} k={k} n={n} trans_a={trans_a} trans_b={trans_b}"
    );
    plan
}
