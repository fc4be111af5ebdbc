//! Optimizers: PyTorch's update rules (goldens), GPU against CPU for every variant.

use crate::common;

use common::golden::{assert_close, cases, tensor};
use common::{gpu, max_abs_diff, random};
use ndarray::ArrayD;
use serde_json::Value;
use wgcnn::{GpuOptimizer, Optimizer, Tensor};

/// The rule of a golden case, built as a user would from PyTorch's hyper-parameters.
fn rule_of(params: &Value) -> Optimizer {
    let h = &params["hyperparams"];
    let f = |k: &str| h[k].as_f64().unwrap() as f32;
    let flag = |k: &str| h[k].as_bool().unwrap_or(false);
    match params["optimizer"].as_str().unwrap() {
        "SGD" => Optimizer::sgd(f("lr"))
            .momentum(f("momentum"))
            .dampening(f("dampening"))
            .nesterov(flag("nesterov"))
            .weight_decay(f("weight_decay"))
            .into(),
        "Adagrad" => Optimizer::adagrad(f("lr"))
            .eps(f("eps"))
            .weight_decay(f("weight_decay"))
            .lr_decay(f("lr_decay"))
            .initial_accumulator_value(f("initial_accumulator_value"))
            .into(),
        "Adam" | "AdamW" => {
            let adam = if params["optimizer"] == "AdamW" || flag("decoupled_weight_decay") {
                Optimizer::adamw(f("lr"), f("weight_decay"))
            } else {
                Optimizer::adam(f("lr")).weight_decay(f("weight_decay"))
            };
            adam.betas(
                h["betas"][0].as_f64().unwrap() as f32,
                h["betas"][1].as_f64().unwrap() as f32,
            )
            .eps(f("eps"))
            .amsgrad(flag("amsgrad"))
            .into()
        }
        other => panic!("unknown optimizer {other}"),
    }
}

#[test]
fn pytorch_goldens_on_gpu_and_cpu() {
    let Some(gpu) = gpu() else { return };
    for case in cases("optim_") {
        let (json, name) = (&case.json, &case.name);
        let rule = rule_of(&json["params"]);
        let param = tensor(&json["inputs"]["param"]);
        let grads: Vec<ArrayD<f32>> = json["inputs"]["grads_per_step"]
            .as_array()
            .unwrap()
            .iter()
            .map(tensor)
            .collect();
        let expected: Vec<ArrayD<f32>> = json["outputs"]["param_after_step"]
            .as_array()
            .unwrap()
            .iter()
            .map(tensor)
            .collect();

        let mut cpu_param = param.clone();
        let mut state = rule.initial_state(param.shape());
        let gpu_param = Tensor::from_array(gpu, &param).unwrap();
        let mut optimizer = GpuOptimizer::new(rule).unwrap();
        for (t, (g, want)) in grads.iter().zip(&expected).enumerate() {
            rule.update_cpu(t as u32 + 1, &mut cpu_param, g, &mut state)
                .unwrap();
            assert_close(
                &format!("{name} cpu step {}", t + 1),
                &cpu_param,
                want,
                1e-5,
                1e-6,
            );
            let tg = Tensor::from_array(gpu, g).unwrap();
            optimizer.step(&[&gpu_param], &[&tg]).unwrap();
            assert_close(
                &format!("{name} gpu step {}", t + 1),
                &gpu_param.to_array().unwrap(),
                want,
                1e-5,
                1e-6,
            );
        }
        let final_state = json["outputs"]["final_state"].as_object().unwrap();
        let names = rule.state_names();
        assert_eq!(final_state.len(), names.len(), "{name}: {final_state:?}");
        for (key, value) in final_state {
            let slot = names.iter().position(|n| n == key).unwrap();
            let want = tensor(value);
            assert_close(
                &format!("{name} cpu {key}"),
                &state[slot],
                &want,
                1e-5,
                1e-6,
            );
            assert_close(
                &format!("{name} gpu {key}"),
                &optimizer.state(0).unwrap()[slot].to_array().unwrap(),
                &want,
                1e-5,
                1e-6,
            );
        }
    }
}

#[test]
fn every_variant_matches_the_cpu_over_several_steps() {
    let Some(gpu) = gpu() else { return };
    let rules: [Optimizer; 10] = [
        Optimizer::sgd(0.05).into(),
        Optimizer::momentum(0.05, 0.9)
            .dampening(0.1)
            .weight_decay(1e-3)
            .into(),
        Optimizer::momentum(0.05, 0.9).nesterov(true).into(),
        Optimizer::adagrad(0.1).weight_decay(1e-2).into(),
        Optimizer::adagrad(0.1)
            .lr_decay(0.05)
            .initial_accumulator_value(0.3)
            .into(),
        Optimizer::adam(0.01).into(),
        Optimizer::adam(0.01)
            .betas(0.8, 0.99)
            .eps(1e-6)
            .weight_decay(1e-2)
            .into(),
        Optimizer::adam(0.01).amsgrad(true).into(),
        Optimizer::adamw(0.01, 0.1).into(),
        Optimizer::adamw(0.01, 0.1).amsgrad(true).into(),
    ];
    for (i, rule) in rules.into_iter().enumerate() {
        // Twenty parameters (more than one dispatch updates for every rule) whose lengths
        // fill no vec4 or workgroup, or span several workgroups; two long enough for a
        // dispatch of their own.
        let shapes: Vec<Vec<usize>> = (0..20)
            .map(|j| match j % 4 {
                _ if j == 5 || j == 19 => vec![70, 61 + j],
                0 => vec![3, 7],
                1 => vec![300],
                2 => vec![1],
                _ => vec![2, 515 + j],
            })
            .collect();
        let mut cpu_params: Vec<ArrayD<f32>> = shapes
            .iter()
            .enumerate()
            .map(|(j, s)| random(s, (i * 10 + j) as u64))
            .collect();
        let mut states: Vec<Vec<ArrayD<f32>>> = cpu_params
            .iter()
            .map(|p| rule.initial_state(p.shape()))
            .collect();
        let gpu_params: Vec<Tensor> = cpu_params
            .iter()
            .map(|p| Tensor::from_array(gpu, p).unwrap())
            .collect();
        let mut optimizer = GpuOptimizer::new(rule).unwrap();
        for t in 1..=5u32 {
            let grads: Vec<ArrayD<f32>> = shapes
                .iter()
                .enumerate()
                .map(|(j, s)| random(s, 1000 + u64::from(t) * 10 + j as u64))
                .collect();
            for ((p, g), s) in cpu_params.iter_mut().zip(&grads).zip(&mut states) {
                rule.update_cpu(t, p, g, s).unwrap();
            }
            let tgrads: Vec<Tensor> = grads
                .iter()
                .map(|g| Tensor::from_array(gpu, g).unwrap())
                .collect();
            optimizer
                .step(
                    &gpu_params.iter().collect::<Vec<_>>(),
                    &tgrads.iter().collect::<Vec<_>>(),
                )
                .unwrap();
        }
        for (p, want) in gpu_params.iter().zip(&cpu_params) {
            assert!(
                max_abs_diff(&p.to_array().unwrap(), want) < 1e-6,
                "{rule:?}"
            );
        }
        assert_eq!(optimizer.steps(), 5);
        for (index, want) in states.iter().enumerate() {
            let got = optimizer.state(index).unwrap();
            assert_eq!(got.len(), rule.state_names().len());
            for (g, w) in got.iter().zip(want) {
                assert!(
                    max_abs_diff(&g.to_array().unwrap(), w) < 1e-6,
                    "{rule:?} state"
                );
            }
        }
    }
}

#[test]
fn bad_hyper_parameters_and_mismatches_are_errors() {
    assert!(GpuOptimizer::new(Optimizer::sgd(-1.0)).is_err());
    let err = GpuOptimizer::new(Optimizer::adam(0.1).betas(1.0, 0.9))
        .err()
        .unwrap();
    assert!(err.to_string().contains("betas must be in [0, 1)"), "{err}");
    for nesterov in [
        Optimizer::sgd(0.1).nesterov(true),
        Optimizer::momentum(0.1, 0.9).dampening(0.1).nesterov(true),
    ] {
        let err = GpuOptimizer::new(nesterov).err().unwrap();
        assert!(
            err.to_string()
                .contains("Nesterov momentum requires a momentum and zero dampening"),
            "{err}"
        );
    }
    assert!(GpuOptimizer::new(Optimizer::adagrad(0.1).lr_decay(-1.0)).is_err());
    assert!(
        GpuOptimizer::new(Optimizer::adagrad(0.1).initial_accumulator_value(f32::NAN)).is_err()
    );
    let err = GpuOptimizer::new(Optimizer::adagrad(f32::NAN))
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("must be finite and non-negative"),
        "{err}"
    );
    let Some(gpu) = gpu() else { return };
    let p = Tensor::full(gpu, &[3], 1.0).unwrap();
    let g = Tensor::full(gpu, &[4], 1.0).unwrap();
    let err = GpuOptimizer::new(Optimizer::sgd(0.1))
        .unwrap()
        .step(&[&p], &[&g])
        .unwrap_err();
    assert!(
        err.to_string().contains("has a gradient of shape [4]"),
        "{err}"
    );
}

/// Adam's state follows each parameter by name, as PyTorch keys it by parameter: a layer
/// frozen after the optimizer exists is skipped and keeps its moments and step count, picks
/// them up again when unfrozen (its bias correction at its own second step while the other
/// layer is at its fourth), and a replaced head starts fresh. Against PyTorch
/// (`tests/golden/make_optimizer_freeze_golden.py`), on GPU and CPU.
#[test]
fn optimizer_state_follows_parameters_through_freezing_and_replacing() {
    use wgcnn::nn::{Linear, Sequential};
    use wgcnn::{Activation, train::train_step};
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/golden/freeze_replace_adam.json"
    ))
    .unwrap();
    let golden: serde_json::Value = serde_json::from_str(&text).unwrap();
    let x = tensor(&golden["x"]);
    let labels: Vec<usize> = golden["labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    for device in common::devices() {
        let on = device.name();
        let mut model = Sequential::new()
            .add("fc1", Linear::new(4, 3).activation(Activation::Relu))
            .add("fc2", Linear::new(3, 2))
            .build(device.clone(), 0)
            .unwrap();
        let set = |model: &mut wgcnn::Graph, values: &serde_json::Value| {
            for (name, value) in values.as_object().unwrap() {
                model.set_state(name, tensor(value)).unwrap();
            }
        };
        set(&mut model, &golden["init"]);
        let mut adam = model.optimizer(Optimizer::adam(0.1)).unwrap();
        for (step, after) in golden["after"].as_array().unwrap().iter().enumerate() {
            match step {
                // fc1 frozen as a backbone around the head, then everything trains again.
                1 => {
                    model.freeze_all(true);
                    model.freeze("fc2", false).unwrap();
                }
                3 => model.freeze_all(false),
                4 => {
                    model.replace("fc2", Linear::new(3, 2)).unwrap();
                    set(&mut model, &golden["new_head"]);
                }
                _ => {}
            }
            let out = train_step(&mut model, &mut adam, |d| d.upload(x.clone()), &labels).unwrap();
            let loss = out.loss.scalar().unwrap();
            let want_loss = after["loss"].as_f64().unwrap() as f32;
            assert!(
                (loss - want_loss).abs() < 1e-5,
                "step {} loss on {on}",
                step + 1
            );
            let state: std::collections::HashMap<String, ArrayD<f32>> = model
                .state()
                .into_iter()
                .map(|(n, v)| (n, v.to_array().unwrap()))
                .collect();
            for name in ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"] {
                let want = tensor(&after[name]);
                let what = format!("{name} after step {} on {on}", step + 1);
                assert_close(&what, &state[name], &want, 1e-5, 1e-6);
            }
        }
    }
    // A parameter whose shape changes under its name (not through `replace`) is an error
    // naming it, on both devices.
    let zeros = |n: usize| ArrayD::<f32>::zeros(ndarray::IxDyn(&[n]));
    let mut cpu = wgcnn::CpuOptimizer::new(Optimizer::adam(0.1)).unwrap();
    let (mut a, mut b) = (zeros(2), zeros(3));
    cpu.step_named(&mut [("fc.weight", &mut a)], &[&zeros(2)])
        .unwrap();
    let e = cpu
        .step_named(&mut [("fc.weight", &mut b)], &[&zeros(3)])
        .unwrap_err();
    assert!(e.to_string().contains("fc.weight"), "{e}");
    if let Some(gpu) = gpu() {
        let mut opt = GpuOptimizer::new(Optimizer::adam(0.1)).unwrap();
        let up = |a: &ArrayD<f32>| Tensor::from_array(gpu, a).unwrap();
        opt.step_named(&[("fc.weight", &up(&zeros(2)))], &[&up(&zeros(2))])
            .unwrap();
        let e = opt
            .step_named(&[("fc.weight", &up(&zeros(3)))], &[&up(&zeros(3))])
            .unwrap_err();
        assert!(e.to_string().contains("fc.weight"), "{e}");
    }
}
