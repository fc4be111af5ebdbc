//! The public surface under hostile arguments: every op and layer constructor, given random
//! hyper-parameters (zeros, `u32::MAX`, `usize::MAX`), mismatched or empty shapes and
//! non-finite inputs, either succeeds and agrees with its CPU reference or returns an
//! `Error`: never a panic (each case runs under `catch_unwind`).

use crate::common;

use std::panic::{AssertUnwindSafe, catch_unwind};

use common::{gpu, random};
use ndarray::ArrayD;
use proptest::prelude::*;
use wgcnn::ops::{AdaptiveAvgPool2d, Conv2d, Matmul, Pool2d, PoolKind};
use wgcnn::{Activation, Padding, Tensor};

/// Sizes a caller might pass by mistake or malice.
fn hostile() -> impl Strategy<Value = usize> {
    // Mostly small, so that most cases get past the shape rules and compute.
    prop_oneof![
        12 => 0usize..4,
        1 => Just(7usize),
        1 => Just(u32::MAX as usize),
        1 => Just(u32::MAX as usize + 1),
        1 => Just(usize::MAX),
    ]
}

/// Layer sizes: small, or so large that the byte count overflows. (Sizes in between, such
/// as `u32::MAX` features, are refused by the host's allocator here, but a host with
/// overcommit could grant and fill them: `faults.rs` covers that case at 2⁵¹ bytes.)
fn sizes_or_overflow() -> impl Strategy<Value = usize> {
    prop_oneof![4 => 0usize..4, 1 => Just(8usize), 1 => Just(usize::MAX)]
}

/// A small shape, sometimes with a zero, sometimes of the wrong rank.
fn shape() -> impl Strategy<Value = Vec<usize>> {
    prop_oneof![
        6 => proptest::collection::vec(1usize..5, 4),
        1 => proptest::collection::vec(0usize..3, 4),
        1 => proptest::collection::vec(1usize..4, 0..6),
    ]
}

/// Random values with a NaN or an infinity now and then.
fn values(shape: &[usize], seed: u64, poison: u8) -> ArrayD<f32> {
    let mut x = random(shape, seed);
    if let Some(v) = x.iter_mut().next() {
        *v = match poison % 4 {
            0 => f32::NAN,
            1 => f32::INFINITY,
            _ => *v,
        };
    }
    x
}

/// Runs `case`, failing on a panic.
fn never_panics(what: &str, case: impl FnOnce()) {
    if catch_unwind(AssertUnwindSafe(case)).is_err() {
        panic!("{what} panicked");
    }
}

/// GPU and CPU agree: both errors, or both values equal (NaN where the other has NaN).
fn agree<E: std::fmt::Debug>(what: &str, gpu: Result<ArrayD<f32>, E>, cpu: Result<ArrayD<f32>, E>) {
    match (gpu, cpu) {
        (Ok(g), Ok(c)) => {
            assert_eq!(g.shape(), c.shape(), "{what}");
            for (a, b) in g.iter().zip(&c) {
                let same =
                    (a.is_nan() && b.is_nan()) || a == b || (a - b).abs() <= 1e-3 * (1.0 + b.abs());
                assert!(same, "{what}: {a} vs {b}");
            }
        }
        (Err(_), Err(_)) => {}
        (g, c) => panic!(
            "{what}: GPU {:?} but CPU {:?}",
            g.map(|_| "ok"),
            c.map(|_| "ok")
        ),
    }
}

/// Elements of a shape, if few enough for the CPU reference to compute in a test.
fn small(shape: &[usize]) -> bool {
    shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .is_some_and(|n| n <= 1 << 16)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn convolution(x in shape(), o in 1usize..4, k in (0usize..4, 0usize..4), stride in (hostile(), hostile()),
                   pad in (hostile(), hostile()), dilation in (hostile(), 1usize..3), groups in hostile(), seed in 0u64..100, poison: u8) {
        let spec = Conv2d { stride, padding: Padding::Explicit(pad.0, pad.1), dilation, groups, activation: Activation::None, kernel: None };
        let c = x.get(1).copied().unwrap_or(1);
        let w_shape = [o * groups.clamp(1, 4), (c / groups.max(1)).max(1), k.0, k.1];
        never_panics(&format!("conv {spec:?} x {x:?} w {w_shape:?}"), || {
            let Some(gpu) = gpu() else { return };
            let shape = spec.shape(&x, &w_shape, None);
            let (xs, ws) = (values(&x, seed, poison), random(&w_shape, seed + 1));
            let tx = Tensor::from_array(gpu, &xs);
            let tw = Tensor::from_array(gpu, &ws);
            let (Ok(tx), Ok(tw)) = (tx, tw) else {
                assert!(shape.is_err() || x.contains(&0) || w_shape.contains(&0));
                return;
            };
            let out = spec.forward(&tx, &tw, None);
            match shape {
                Err(_) => assert!(out.is_err()),
                Ok(s) if small(&s.output()) => {
                    let cpu = wgcnn::cpu::conv2d(&spec, &xs.view(), &ws.view(), None);
                    agree(&format!("conv {spec:?}"), out.and_then(|t| t.to_array()), cpu);
                    let dy = random(&s.output(), seed + 2);
                    let gpu_grads = spec.backward(&tx, &tw, &Tensor::from_array(gpu, &dy).unwrap());
                    let cpu_grads = wgcnn::cpu::conv2d_backward(&spec, &xs.view(), &ws.view(), &dy.view());
                    agree("conv dx", gpu_grads.and_then(|g| g.x.to_array()), cpu_grads.map(|g| g.x));
                }
                Ok(_) => {}
            }
        });
    }

    #[test]
    fn pooling(x in shape(), kernel in (hostile(), hostile()), stride in (hostile(), hostile()),
               padding in (hostile(), hostile()), dilation in (1usize..3, hostile()), max: bool, ceil_mode: bool,
               seed in 0u64..100, poison: u8) {
        let kind = if max { PoolKind::Max } else { PoolKind::Avg { count_include_pad: seed % 2 == 0 } };
        let spec = Pool2d { kind, kernel, stride, padding, dilation, ceil_mode };
        never_panics(&format!("pool {spec:?} x {x:?}"), || {
            let Some(gpu) = gpu() else { return };
            let xs = values(&x, seed, poison);
            let shape = spec.shape(&x);
            let Ok(tx) = Tensor::from_array(gpu, &xs) else { return };
            let out = spec.forward(&tx);
            match shape {
                Err(_) => assert!(out.is_err()),
                Ok(s) if small(&s.output()) => {
                    let cpu = wgcnn::cpu::pool2d(&spec, &xs.view());
                    let out = out.unwrap();
                    agree(&format!("pool {spec:?}"), out.y.to_array(), cpu.map(|p| p.y));
                }
                Ok(_) => {}
            }
        });
    }

    #[test]
    fn adaptive_pooling(x in shape(), out in (hostile(), hostile()), seed in 0u64..100, poison: u8) {
        let spec = AdaptiveAvgPool2d::new(out.0, out.1);
        never_panics(&format!("adaptive {spec:?} x {x:?}"), || {
            let Some(gpu) = gpu() else { return };
            let xs = values(&x, seed, poison);
            let Ok(tx) = Tensor::from_array(gpu, &xs) else { return };
            let gpu_y = spec.forward(&tx).and_then(|t| t.to_array());
            if small(&[out.0.min(1 << 20), out.1.min(1 << 20), x.iter().product()]) {
                agree("adaptive", gpu_y, spec.forward_cpu(&xs.view()));
            }
        });
    }

    #[test]
    fn matmul(a in proptest::collection::vec(0usize..5, 1..4), b in proptest::collection::vec(0usize..5, 1..4),
              trans: (bool, bool), seed in 0u64..100, poison: u8) {
        let spec = Matmul { trans_a: trans.0, trans_b: trans.1, ..Matmul::default() };
        never_panics(&format!("matmul {a:?} {b:?} {spec:?}"), || {
            let Some(gpu) = gpu() else { return };
            let (xa, xb) = (values(&a, seed, poison), random(&b, seed + 1));
            let (Ok(ta), Ok(tb)) = (Tensor::from_array(gpu, &xa), Tensor::from_array(gpu, &xb)) else { return };
            let cpu = wgcnn::cpu::matmul(&spec, &xa.view(), &xb.view(), None);
            agree(&format!("matmul {spec:?}"), spec.forward(&ta, &tb, None).and_then(|t| t.to_array()), cpu);
        });
    }

    #[test]
    fn losses_and_softmax(n in 0usize..4, k in 0usize..5, labels in proptest::collection::vec(hostile(), 0..5),
                          seed in 0u64..100, poison: u8) {
        never_panics(&format!("losses n {n} k {k} labels {labels:?}"), || {
            let Some(gpu) = gpu() else { return };
            let x = values(&[n, k], seed, poison);
            let Ok(t) = Tensor::from_array(gpu, &x) else {
                assert!(n == 0 || k == 0);
                return;
            };
            let ce = wgcnn::ops::softmax_cross_entropy(&t, &labels).and_then(|c| c.loss.to_array());
            let ce_cpu = wgcnn::ops::softmax_cross_entropy::softmax_cross_entropy_cpu(&x.view(), &labels).map(|c| c.loss);
            agree("softmax_cross_entropy", ce, ce_cpu);
            let lp = wgcnn::ops::log_softmax(&t);
            agree("log_softmax", lp.as_ref().map_err(|e| e.to_string()).and_then(|t| t.to_array().map_err(|e| e.to_string())),
                  wgcnn::ops::log_softmax::log_softmax_cpu(&x.view()).map_err(|e| e.to_string()));
            if let Ok(lp) = lp {
                let nll = wgcnn::ops::nll_loss(&lp, &labels).and_then(|c| c.loss.to_array());
                assert!(nll.is_ok() == (labels.len() == n && labels.iter().all(|&l| l < k)), "nll {labels:?}");
            }
        });
    }

    #[test]
    fn normalisation_and_dropout(x in shape(), params in proptest::collection::vec(0usize..5, 0..3),
                                 eps in prop_oneof![Just(1e-5f32), Just(0.0f32), Just(-1.0f32), Just(f32::NAN)],
                                 momentum in prop_oneof![Just(Some(0.1f32)), Just(None), Just(Some(2.0f32)), Just(Some(f32::NAN))],
                                 rate in prop_oneof![Just(0.0f32), Just(0.5f32), Just(0.99f32)],
                                 seed in 0u64..100, poison: u8) {
        use wgcnn::ops::batch_norm::batches_state;
        use wgcnn::ops::{BatchNorm2d, Dropout, LayerNorm};
        never_panics(&format!("norms x {x:?} params {params:?} eps {eps} momentum {momentum:?}"), || {
            let Some(gpu) = gpu() else { return };
            let xs = values(&x, seed, poison);
            let Ok(tx) = Tensor::from_array(gpu, &xs) else { return };
            // γ, β and the running statistics: the right [C] or a wrong shape.
            let c = x.get(1).copied().unwrap_or(1);
            let p_shape = if params.is_empty() { vec![c] } else { params.clone() };
            let ones = ArrayD::from_elem(ndarray::IxDyn(&p_shape), 1.0f32);
            let Ok(tp) = Tensor::from_array(gpu, &ones) else { return };
            let (rm, rv, count) = (
                Tensor::from_array(gpu, &ones).unwrap(),
                Tensor::from_array(gpu, &ones).unwrap(),
                Tensor::from_array(gpu, &batches_state(0)).unwrap(),
            );
            let bn = BatchNorm2d {
                eps: eps.max(0.0),
                momentum,
                ..BatchNorm2d::default()
            };
            let gpu_y = bn.forward_train(&tx, &tp, &tp, &rm, &rv, &count).and_then(|o| o.y.to_array());
            let cpu_y = match ones.view().into_dimensionality::<ndarray::Ix1>() {
                Ok(p) => wgcnn::cpu::batch_norm_train(&bn, &xs.view(), &p, &p, &p, &p, 0).map(|o| o.0.y),
                Err(_) => Err(wgcnn::Error::InvalidArgument { op: "test", detail: "not 1-D".into() }),
            };
            agree("batch norm", gpu_y, cpu_y);
            let ln = LayerNorm {
                eps,
                ..LayerNorm::default()
            };
            let (lg, lb) = (ArrayD::from_elem(ndarray::IxDyn(&x[x.len().min(1)..]), 1.0f32), ArrayD::from_elem(ndarray::IxDyn(&x[x.len().min(1)..]), 0.0f32));
            if let (Ok(tg), Ok(tb)) = (Tensor::from_array(gpu, &lg), Tensor::from_array(gpu, &lb)) {
                agree("layer norm", ln.forward(&tx, &tg, &tb).and_then(|o| o.y.to_array()),
                      ln.forward_cpu(&xs.view(), &lg.view(), &lb.view()).map(|o| o.y));
            }
            let dropout = Dropout::new(rate, 3).unwrap();
            agree("dropout", dropout.forward(&tx, 1, true).and_then(|t| t.to_array()),
                  dropout.forward_cpu(&xs.view(), 1, true));
        });
    }

    #[test]
    fn linear_softmax_distillation_attack_normalize_add(a in proptest::collection::vec(0usize..5, 1..4),
            b in proptest::collection::vec(0usize..5, 1..4), labels in proptest::collection::vec(hostile(), 0..4),
            scalars in (prop_oneof![Just(0.5f32), Just(-1.0f32), Just(f32::NAN), Just(0.0f32)],
                        prop_oneof![Just(2.0f32), Just(0.0f32), Just(f32::INFINITY)]),
            seed in 0u64..100, poison: u8) {
        use wgcnn::ops::{Distillation, Normalize, SignedStep};
        never_panics(&format!("misc a {a:?} b {b:?} labels {labels:?} scalars {scalars:?}"), || {
            let Some(gpu) = gpu() else { return };
            let (xa, xb) = (values(&a, seed, poison), random(&b, seed + 1));
            let (Ok(ta), Ok(tb)) = (Tensor::from_array(gpu, &xa), Tensor::from_array(gpu, &xb)) else { return };
            let err = |e: wgcnn::Error| e.to_string();
            // linear: x [N, in], weight [out, in], bias [out].
            let bias = ArrayD::from_elem(ndarray::IxDyn(&b[..1]), 0.5f32);
            let tbias = Tensor::from_array(gpu, &bias).unwrap();
            agree("linear",
                  wgcnn::ops::linear(&ta, &tb, Some(&tbias), Activation::Relu).and_then(|t| t.to_array()).map_err(err),
                  wgcnn::cpu::linear(&xa.view(), &xb.view(), Some(&bias.view()), Activation::Relu).map_err(err));
            agree("softmax", wgcnn::ops::softmax(&ta).and_then(|t| t.to_array()).map_err(err),
                  wgcnn::cpu::softmax(&xa.view()).map_err(err));
            agree("add", wgcnn::value::add::add(&ta, &tb).and_then(|t| t.to_array()).map_err(err),
                  wgcnn::value::add::add_cpu(&xa.view(), &xb.view()).map_err(err));
            let spec = Distillation { alpha: scalars.0, temperature: scalars.1 };
            agree("distillation",
                  spec.forward(&ta, &tb, &labels).and_then(|c| c.loss.to_array()).map_err(err),
                  spec.forward_cpu(&xa.view(), &xb.view(), &labels).map(|c| c.loss).map_err(err));
            let step = SignedStep::fgsm(scalars.0, (-scalars.1, scalars.1));
            agree("signed step",
                  step.apply(&ta, &tb, &ta).and_then(|t| t.to_array()).map_err(err),
                  step.apply_cpu(&xa.view(), &xb.view(), &xa.view()).map_err(err));
            if let Ok(normalize) = Normalize::new(&[scalars.0; 2], &[scalars.1; 2]) {
                agree("normalize", normalize.forward(&ta).and_then(|t| t.to_array()).map_err(err),
                      normalize.forward_cpu(&xa.view()).map_err(err));
            }
            let _ = wgcnn::ops::global_avg_pool(&ta).and_then(|t| t.to_array());
        });
    }

    #[test]
    fn layers_build_or_refuse_and_agree(pool in sizes_or_overflow(), avg: bool, norm in proptest::collection::vec(sizes_or_overflow(), 0..4),
                                        x in proptest::collection::vec(1usize..5, 4), seed in 0u64..100) {
        use wgcnn::nn::{Flatten, LayerNorm, Sequential, avg_pool2d, max_pool2d};
        never_panics(&format!("layers pool {pool} avg {avg} norm {norm:?} x {x:?}"), || {
            // Usually the normalised shape the pooled input has; now and then a random one.
            let pooled = [x[1], x[2] / pool.max(1), x[3] / pool.max(1)];
            let norm = match seed % 3 {
                0 => pooled.to_vec(),
                1 => pooled[2..].to_vec(),
                _ => norm.clone(),
            };
            let layers = || {
                let pooling = if avg { avg_pool2d(pool) } else { max_pool2d(pool) };
                Sequential::new().add("pool", pooling).add("norm", LayerNorm::new(&norm)).add("flatten", Flatten)
            };
            let input = random(&x, seed);
            let cpu = layers().build_for(&x, wgcnn::Device::Cpu, 1).and_then(|mut m| m.logits(&input));
            let Some(gpu) = gpu() else { return };
            let on_gpu = layers().build_for(&x, wgcnn::Device::Gpu(gpu.clone()), 1).and_then(|mut m| m.logits(&input));
            agree("layers", on_gpu.map(|a| a.into_dyn()), cpu.map(|a| a.into_dyn()));
        });
    }

    #[test]
    fn tensors_dropout_and_layers(dims in proptest::collection::vec(hostile(), 0..4), rate in prop_oneof![
        Just(f32::NAN), Just(-1.0f32), Just(0.0f32), Just(0.5f32), Just(1.0f32), Just(f32::INFINITY)],
        features in (sizes_or_overflow(), sizes_or_overflow()), channels in sizes_or_overflow()) {
        never_panics(&format!("tensors {dims:?} rate {rate} features {features:?} channels {channels}"), || {
            let Some(gpu) = gpu() else { return };
            // Shapes with zeros, overflowing products or over the buffer limit are errors.
            let full = Tensor::full(gpu, &dims, 1.0);
            if let Ok(t) = &full {
                assert_eq!(t.shape(), dims.as_slice());
            }
            let dropout = wgcnn::ops::Dropout::new(rate, 1);
            assert_eq!(dropout.is_ok(), (0.0..1.0).contains(&rate));
            // Layer constructors: building either works or says why.
            use wgcnn::nn::{BatchNorm2d, Conv2d, Flatten, Linear, Sequential};
            let built = Sequential::new()
                .add("conv", Conv2d::new(channels, 2, (1, 1)))
                .add("bn", BatchNorm2d::new(2))
                .add("flatten", Flatten)
                .add("fc", Linear::new(features.0, features.1))
                .build_for(&[1, channels.clamp(1, 4), 2, 2], wgcnn::Device::Cpu, 0);
            // in_features 0 is Linear::lazy's "size me from the input" (8 here).
            let fits = (1..=4).contains(&channels)
                && (1..=8).contains(&features.1)
                && matches!(features.0, 0 | 8);
            assert_eq!(built.is_ok(), fits, "{:?}", built.err().map(|e| e.to_string()));
        });
    }
}

#[test]
fn hostile_values_reach_every_strategy() {
    // The strategies above include the extremes (a guard against editing them away).
    let runner = &mut proptest::test_runner::TestRunner::deterministic();
    let seen: Vec<usize> = (0..400)
        .map(|_| proptest::strategy::ValueTree::current(&hostile().new_tree(runner).unwrap()))
        .collect();
    for extreme in [0, u32::MAX as usize, usize::MAX] {
        assert!(seen.contains(&extreme), "{extreme}");
    }
}
