//! The training loop's pieces against PyTorch: learning-rate schedules stepped one by one
//! (tests/golden/lr_schedules.json, from make_schedule_golden.py); cross-entropy with label
//! smoothing, clip_grad_norm_, parameter groups and top-k counts
//! (tests/golden/training_pieces.json, from make_training_golden.py), each on the GPU and
//! the CPU; and the parameters PyTorch refuses as errors.

use crate::common;

use std::collections::HashMap;

use common::golden::{assert_close, tensor};
use common::{gpu, max_abs_diff, random};
use ndarray::{ArrayD, IxDyn};
use wgcnn::train::{LrSchedule, top_k_correct};
use wgcnn::{CpuOptimizer, GpuOptimizer, Optimizer, ParamGroup, Tensor, Value};

fn pieces() -> serde_json::Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/golden/training_pieces.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn indices(value: &serde_json::Value) -> Vec<usize> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect()
}

fn schedule(name: &str) -> LrSchedule {
    match name {
        "step" => LrSchedule::Step {
            step_size: 3,
            gamma: 0.5,
        },
        "multistep" => LrSchedule::MultiStep {
            milestones: vec![2, 5, 9],
            gamma: 0.1,
        },
        "cosine" => LrSchedule::Cosine {
            t_max: 10,
            eta_min: 0.001,
        },
        "linear" => LrSchedule::Linear {
            start_factor: 0.1,
            end_factor: 1.0,
            total_iters: 5,
        },
        "one_cycle_defaults" => LrSchedule::one_cycle(0.2, 20),
        "one_cycle_options" => LrSchedule::OneCycle {
            max_lr: 0.05,
            total_steps: 37,
            pct_start: 0.25,
            div_factor: 10.0,
            final_div_factor: 100.0,
            momentum: Some((0.8, 0.92)),
        },
        "one_cycle_fixed_momentum" => LrSchedule::OneCycle {
            max_lr: 0.3,
            total_steps: 15,
            pct_start: 0.3,
            div_factor: 25.0,
            final_div_factor: 1e4,
            momentum: None,
        },
        "warmup_cosine" => LrSchedule::Cosine {
            t_max: 10,
            eta_min: 0.0,
        }
        .after_warmup(4, 0.01),
        other => panic!("no schedule for golden case {other}"),
    }
}

#[test]
fn every_schedule_steps_as_pytorch() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/golden/lr_schedules.json"
    );
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let cases = golden["cases"].as_object().unwrap();
    assert_eq!(cases.len(), 8);
    for (name, case) in cases {
        let base = case["base_lr"].as_f64().unwrap() as f32;
        let schedule = schedule(name);
        let momentums = case["momentums"].as_array().unwrap();
        for (step, want) in case["lrs"].as_array().unwrap().iter().enumerate() {
            let want = want.as_f64().unwrap();
            let got = f64::from(schedule.lr(base, step).unwrap());
            assert!(
                (got - want).abs() <= 1e-6 * want.abs().max(1e-3),
                "{name} step {step}: {got} vs PyTorch's {want}"
            );
            // A schedule that does not cycle the momentum leaves the optimizer's 0.9.
            let want = momentums[step].as_f64().unwrap();
            let got = schedule.momentum(step).unwrap().map_or(0.9, f64::from);
            assert!(
                (got - want).abs() <= 1e-6,
                "{name} step {step}: momentum {got} vs PyTorch's {want}"
            );
        }
    }
    // The momentum goes to the optimizer as SGD's momentum or Adam's β₁.
    let mut sgd = CpuOptimizer::new(Optimizer::sgd(0.1).momentum(0.9)).unwrap();
    sgd.set_momentum(0.85).unwrap();
    assert_eq!(sgd.rule(), Optimizer::sgd(0.1).momentum(0.85).into());
    let mut adam = CpuOptimizer::new(Optimizer::adam(0.1)).unwrap();
    adam.set_momentum(0.8).unwrap();
    assert_eq!(adam.rule(), Optimizer::adam(0.1).betas(0.8, 0.999).into());
    let plain: [Optimizer; 2] = [Optimizer::sgd(0.1).into(), Optimizer::adagrad(0.1).into()];
    for rule in plain {
        let mut opt = CpuOptimizer::new(rule).unwrap();
        assert!(opt.set_momentum(0.9).is_err(), "{rule:?}");
    }
    // SGD's momentum stays above 0, so its buffer stays in its state.
    assert!(sgd.set_momentum(0.0).is_err());
}

#[test]
fn parameters_pytorch_refuses_are_errors() {
    let cases = [
        (
            LrSchedule::Step {
                step_size: 0,
                gamma: 0.1,
            },
            "step_size",
        ),
        (
            LrSchedule::MultiStep {
                milestones: vec![5, 2],
                gamma: 0.1,
            },
            "ascending",
        ),
        (
            LrSchedule::Cosine {
                t_max: 0,
                eta_min: 0.0,
            },
            "t_max",
        ),
        (
            LrSchedule::Linear {
                start_factor: 0.0,
                end_factor: 1.0,
                total_iters: 5,
            },
            "start_factor",
        ),
        (LrSchedule::one_cycle(0.1, 3), "total_steps·pct_start ≥ 2"),
        (
            LrSchedule::OneCycle {
                momentum: Some((-0.1, 0.85)),
                max_lr: 0.1,
                total_steps: 100,
                pct_start: 0.3,
                div_factor: 25.0,
                final_div_factor: 1e4,
            },
            "finite values of at least 0",
        ),
        (
            LrSchedule::one_cycle(0.1, 100).after_warmup(0, 0.1),
            "warm-up",
        ),
    ];
    for (schedule, expected) in cases {
        let err = schedule.lr(0.1, 0).unwrap_err().to_string();
        assert!(err.contains(expected), "{schedule:?}: {err}");
    }
}

#[test]
fn label_smoothing_matches_pytorch_on_gpu_and_cpu() {
    let gpu = gpu().unwrap();
    for case in pieces()["label_smoothing"].as_array().unwrap() {
        let eps = case["smoothing"].as_f64().unwrap() as f32;
        let (logits, grad) = (tensor(&case["logits"]), tensor(&case["grad"]));
        let labels = indices(&case["labels"]);
        let loss = case["loss"].as_f64().unwrap() as f32;
        let what = format!("smoothing {eps}");
        // Poisoned outputs: a value the kernel leaves unwritten shows.
        drop(Tensor::full(gpu, logits.shape(), f32::NAN).unwrap());
        for logits in [
            Value::from(Tensor::from_array(gpu, &logits).unwrap()),
            Value::from(logits.clone()),
        ] {
            let ce = logits.softmax_cross_entropy_smoothed(&labels, eps).unwrap();
            let got = ce.loss.scalar().unwrap();
            assert!(
                (got - loss).abs() <= 1e-5 * loss.abs().max(1.0),
                "{what}: {got} vs {loss}"
            );
            assert_close(
                &what,
                &ce.grad_logits.to_array().unwrap(),
                &grad,
                1e-4,
                1e-6,
            );
        }
    }
    // Rows too long for one invocation (one workgroup per row) agree with the CPU.
    let logits = random(&[3, 70_000], 5);
    let labels = [0, 69_999, 12_345];
    let want = wgcnn::cpu::softmax_cross_entropy_smoothed(&logits.view(), &labels, 0.2).unwrap();
    let got = Value::from(Tensor::from_array(gpu, &logits).unwrap())
        .softmax_cross_entropy_smoothed(&labels, 0.2)
        .unwrap();
    let loss = got.loss.scalar().unwrap();
    assert!(
        (loss - want.loss[[0]]).abs() < 1e-4 * want.loss[[0]],
        "wide rows: {loss}"
    );
    let diff = max_abs_diff(&got.grad_logits.to_array().unwrap(), &want.grad_logits);
    assert!(diff < 1e-7, "wide rows: gradients {diff} apart");
    // Without smoothing a class at −∞ is simply never chosen: the loss stays finite.
    let masked = ArrayD::from_shape_vec(IxDyn(&[1, 3]), vec![1.0, f32::NEG_INFINITY, 2.0]).unwrap();
    for logits in [
        Value::from(Tensor::from_array(gpu, &masked).unwrap()),
        Value::from(masked.clone()),
    ] {
        let ce = logits.softmax_cross_entropy_smoothed(&[0], 0.0).unwrap();
        let loss = ce.loss.scalar().unwrap();
        assert!((loss - 1.313_262).abs() < 1e-5, "masked class: loss {loss}");
    }
    for bad in [-0.1, 1.5, f32::NAN] {
        let err = Value::from(logits.clone())
            .softmax_cross_entropy_smoothed(&labels, bad)
            .unwrap_err();
        assert!(err.to_string().contains("label smoothing"), "{err}");
    }
}

#[test]
fn label_smoothing_gradient_matches_finite_differences() {
    let logits = random(&[3, 6], 11).mapv(|v| v * 2.0);
    let labels = [4, 0, 5];
    let ce = |z: &ArrayD<f32>| {
        wgcnn::cpu::softmax_cross_entropy_smoothed(&z.view(), &labels, 0.3).unwrap()
    };
    let grad = ce(&logits).grad_logits;
    for i in 0..logits.len() {
        let (mut plus, mut minus) = (logits.clone(), logits.clone());
        plus.as_slice_mut().unwrap()[i] += 1e-2;
        minus.as_slice_mut().unwrap()[i] -= 1e-2;
        let numeric = f64::from(ce(&plus).loss[[0]] - ce(&minus).loss[[0]]) / 2e-2;
        let analytic = f64::from(grad.as_slice().unwrap()[i]);
        assert!(
            (numeric - analytic).abs() < 1e-3,
            "[{i}] {analytic} vs {numeric}"
        );
    }
}

#[test]
fn clipping_by_global_norm_matches_pytorch_on_gpu_and_cpu() {
    let gpu = gpu().unwrap();
    for case in pieces()["clip_grad_norm"].as_array().unwrap() {
        let max_norm = case["max_norm"].as_f64().unwrap() as f32;
        let norm = case["norm"].as_f64().unwrap() as f32;
        let grads: Vec<ArrayD<f32>> = case["grads"]
            .as_array()
            .unwrap()
            .iter()
            .map(tensor)
            .collect();
        let clipped: Vec<ArrayD<f32>> = case["clipped"]
            .as_array()
            .unwrap()
            .iter()
            .map(tensor)
            .collect();
        for on_gpu in [true, false] {
            let upload = |a: &ArrayD<f32>| -> Value {
                match on_gpu {
                    true => Tensor::from_array(gpu, a).unwrap().into(),
                    false => a.clone().into(),
                }
            };
            let mut values: Vec<Value> = grads.iter().map(upload).collect();
            let mut refs: Vec<&mut Value> = values.iter_mut().collect();
            let got = Value::clip_grad_norm(&mut refs, max_norm)
                .unwrap()
                .scalar()
                .unwrap();
            assert!(
                (got - norm).abs() <= 1e-5 * norm,
                "max {max_norm}: norm {got} vs {norm}"
            );
            for (value, want) in values.iter().zip(&clipped) {
                assert_close("clipped", &value.to_array().unwrap(), want, 1e-5, 1e-7);
            }
        }
    }
}

#[test]
fn clipping_adds_up_tensors_of_many_workgroups() {
    let gpu = gpu().unwrap();
    // 16,384 elements per workgroup: these take 1, 3 and 70 of them, with ragged ends.
    let grads: Vec<ArrayD<f32>> = [vec![7], vec![300, 130], vec![1_100_001]]
        .iter()
        .enumerate()
        .map(|(i, shape)| random(shape, i as u64 + 1))
        .collect();
    let mut cpu: Vec<ArrayD<f32>> = grads.clone();
    let mut refs: Vec<&mut ArrayD<f32>> = cpu.iter_mut().collect();
    let want = wgcnn::cpu::clip_grad_norm(&mut refs, 2.0).unwrap();
    let tensors: Vec<Tensor> = grads
        .iter()
        .map(|g| Tensor::from_array(gpu, g).unwrap())
        .collect();
    let got = wgcnn::ops::clip_grad_norm(&tensors.iter().collect::<Vec<_>>(), 2.0).unwrap();
    let got = got.to_array().unwrap()[[0]];
    assert!((got - want).abs() <= 1e-4 * want, "norm {got} vs {want}");
    for (t, c) in tensors.iter().zip(&cpu) {
        assert!(max_abs_diff(&t.to_array().unwrap(), c) < 1e-6);
    }
    for bad in [0.0, -1.0, f32::INFINITY] {
        let err = wgcnn::ops::clip_grad_norm(&[&tensors[0]], bad).unwrap_err();
        assert!(err.to_string().contains("max norm"), "{err}");
    }
}

/// The optimizer of a golden parameter-group case, with its groups.
fn grouped(name: &str) -> (Optimizer, ParamGroup) {
    match name {
        "sgd_nesterov_no_decay_on_vectors" => (
            Optimizer::sgd(0.1)
                .momentum(0.9)
                .nesterov(true)
                .weight_decay(5e-2)
                .into(),
            ParamGroup::vectors().weight_decay(0.0),
        ),
        "adam_head_at_ten_times" => (
            Optimizer::adam(1e-3).weight_decay(1e-2).into(),
            ParamGroup::named(&["fc.*"]).lr_scale(10.0),
        ),
        other => panic!("no optimizer for golden case {other}"),
    }
}

#[test]
fn parameter_groups_step_as_pytorchs_on_gpu_and_cpu() {
    let gpu = gpu().unwrap();
    for case in pieces()["param_groups"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let (rule, group) = grouped(name);
        let initial: Vec<(String, ArrayD<f32>)> = case["initial"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(n, v)| (n.clone(), tensor(v)))
            .collect();
        let factors: Vec<f32> = case["lr_factors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let mut cpu = CpuOptimizer::new(rule).unwrap();
        let mut gpu_opt = GpuOptimizer::new(rule).unwrap();
        cpu.add_param_group(group.clone()).unwrap();
        gpu_opt.add_param_group(group.clone()).unwrap();
        let mut cpu_params: Vec<ArrayD<f32>> = initial.iter().map(|(_, a)| a.clone()).collect();
        let gpu_params: Vec<Tensor> = initial
            .iter()
            .map(|(_, a)| Tensor::from_array(gpu, a).unwrap())
            .collect();
        for (step, factor) in factors.iter().enumerate() {
            cpu.set_lr(rule.lr() * factor).unwrap();
            gpu_opt.set_lr(rule.lr() * factor).unwrap();
            let grads: HashMap<String, ArrayD<f32>> = case["grads"][step]
                .as_object()
                .unwrap()
                .iter()
                .map(|(n, v)| (n.clone(), tensor(v)))
                .collect();
            let ordered: Vec<&ArrayD<f32>> = initial.iter().map(|(n, _)| &grads[n]).collect();
            let mut named: Vec<(&str, &mut ArrayD<f32>)> = initial
                .iter()
                .map(|(n, _)| n.as_str())
                .zip(cpu_params.iter_mut())
                .collect();
            cpu.step_named(&mut named, &ordered).unwrap();
            let gpu_grads: Vec<Tensor> = ordered
                .iter()
                .map(|g| Tensor::from_array(gpu, g).unwrap())
                .collect();
            let named: Vec<(&str, &Tensor)> = initial
                .iter()
                .map(|(n, _)| n.as_str())
                .zip(&gpu_params)
                .collect();
            gpu_opt
                .step_named(&named, &gpu_grads.iter().collect::<Vec<_>>())
                .unwrap();
            for (i, (param, _)) in initial.iter().enumerate() {
                let want = tensor(&case["after"][step][param]);
                let what = format!("{name} step {step} {param}");
                assert_close(&what, &cpu_params[i], &want, 1e-5, 1e-6);
                assert_close(&what, &gpu_params[i].to_array().unwrap(), &want, 1e-5, 1e-6);
            }
        }
    }
    let err = CpuOptimizer::new(Optimizer::sgd(0.1))
        .unwrap()
        .add_param_group(ParamGroup::vectors().weight_decay(-1.0))
        .unwrap_err();
    assert!(err.to_string().contains("non-negative"), "{err}");
}

#[test]
fn name_patterns_select_as_globs() {
    let group = ParamGroup::named(&["*.bias", "layer*.bn?.weight", "fc.*"]);
    for (name, selected) in [
        ("conv1.bias", true),
        ("bias", false),
        ("fc.weight", true),
        ("layer1.0.bn?.weight", true),
        ("layer1.0.bn1.weight", false),
        ("head.fc.weight", false),
    ] {
        assert_eq!(group.selects(name, &[3, 3]), selected, "{name}");
    }
    assert!(ParamGroup::named(&["*"]).selects("anything", &[1]));
    assert!(ParamGroup::named(&["a*b*c"]).selects("a_b_c", &[1]));
    assert!(!ParamGroup::named(&["a*b*c"]).selects("a_c_b", &[1]));
    assert!(!ParamGroup::named(&["ab*ba"]).selects("aba", &[1]));
}

#[test]
fn top_k_counts_match_pytorch() {
    let golden = &pieces()["topk"];
    let logits = tensor(&golden["logits"]);
    let labels = indices(&golden["labels"]);
    for (k, key) in [(1, "top1"), (5, "top5")] {
        let want = golden[key].as_u64().unwrap() as usize;
        assert_eq!(top_k_correct(&logits, &labels, k).unwrap(), want, "top-{k}");
    }
    // Ties go to the lower class, as the first arg-max of top-1.
    let tied = ArrayD::from_shape_vec(IxDyn(&[1, 4]), vec![1.0, 2.0, 2.0, 0.0]).unwrap();
    assert_eq!(top_k_correct(&tied, &[1], 1).unwrap(), 1);
    assert_eq!(top_k_correct(&tied, &[2], 1).unwrap(), 0);
    assert_eq!(top_k_correct(&tied, &[2], 2).unwrap(), 1);
    assert!(top_k_correct(&tied, &[4], 1).is_err());
    assert!(top_k_correct(&tied, &[1], 0).is_err());
}

#[test]
fn an_update_clips_when_the_optimizer_says_so() {
    use wgcnn::prelude::*;
    for device in common::devices() {
        let mut model = Sequential::new()
            .add("conv", Conv2d::new(1, 3, (3, 3)))
            .add("flatten", Flatten)
            .add("fc", Linear::lazy(4))
            .build_for(&[2, 1, 5, 5], device.clone(), 3)
            .unwrap();
        let mut sgd = model.optimizer(Optimizer::sgd(0.1)).unwrap();
        sgd.set_max_grad_norm(Some(0.01)).unwrap();
        let x = random(&[2, 1, 5, 5], 8);
        train_step(&mut model, &mut sgd, |d| d.upload(x.clone()), &[1, 3]).unwrap();
        let before = model.last_grad_norm().unwrap().scalar().unwrap();
        let after: f32 = model
            .grads()
            .iter()
            .map(|(_, g)| g.unwrap().to_array().unwrap().mapv(|v| v * v).sum())
            .sum::<f32>()
            .sqrt();
        assert!(before > 0.05, "{}: norm {before}", device.name());
        assert!(
            (after - 0.01).abs() < 1e-5,
            "{}: clipped to {after}",
            device.name()
        );
        assert!(sgd.set_max_grad_norm(Some(-1.0)).is_err());
    }
}
