//! Optimizers: PyTorch's update rules (goldens), GPU against CPU for every variant.

mod common;

use common::golden::{assert_close, cases, tensor};
use common::{gpu, max_abs_diff, random};
use ndarray::ArrayD;
use serde_json::Value;
use wgcnn::{GpuOptimizer, Optimizer, Tensor};

fn rule_of(params: &Value) -> Optimizer {
    let h = &params["hyperparams"];
    let f = |k: &str| h[k].as_f64().unwrap() as f32;
    match params["optimizer"].as_str().unwrap() {
        "SGD" => Optimizer::Sgd {
            lr: f("lr"),
            momentum: f("momentum"),
            dampening: f("dampening"),
            nesterov: h["nesterov"].as_bool().unwrap(),
            weight_decay: f("weight_decay"),
        },
        "Adagrad" => Optimizer::AdaGrad {
            lr: f("lr"),
            eps: f("eps"),
            weight_decay: f("weight_decay"),
        },
        "Adam" => Optimizer::Adam {
            lr: f("lr"),
            beta1: h["betas"][0].as_f64().unwrap() as f32,
            beta2: h["betas"][1].as_f64().unwrap() as f32,
            eps: f("eps"),
            weight_decay: f("weight_decay"),
            decoupled: h["decoupled_weight_decay"].as_bool().unwrap_or(false),
        },
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
        let mut state = [
            ArrayD::zeros(param.raw_dim()),
            ArrayD::zeros(param.raw_dim()),
        ];
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
        for (key, value) in final_state {
            let slot = usize::from(key == "exp_avg_sq");
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
    let rules = [
        Optimizer::sgd(0.05),
        Optimizer::Sgd {
            lr: 0.05,
            momentum: 0.9,
            dampening: 0.1,
            nesterov: false,
            weight_decay: 1e-3,
        },
        Optimizer::Sgd {
            lr: 0.05,
            momentum: 0.9,
            dampening: 0.0,
            nesterov: true,
            weight_decay: 0.0,
        },
        Optimizer::AdaGrad {
            lr: 0.1,
            eps: 1e-10,
            weight_decay: 1e-2,
        },
        Optimizer::adam(0.01),
        Optimizer::Adam {
            lr: 0.01,
            beta1: 0.8,
            beta2: 0.99,
            eps: 1e-6,
            weight_decay: 1e-2,
            decoupled: false,
        },
        Optimizer::adamw(0.01, 0.1),
    ];
    for (i, rule) in rules.into_iter().enumerate() {
        let shapes = [vec![3, 7], vec![300]];
        let mut cpu_params: Vec<ArrayD<f32>> = shapes
            .iter()
            .enumerate()
            .map(|(j, s)| random(s, (i * 10 + j) as u64))
            .collect();
        let mut states: Vec<[ArrayD<f32>; 2]> = cpu_params
            .iter()
            .map(|p| [ArrayD::zeros(p.raw_dim()), ArrayD::zeros(p.raw_dim())])
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
    }
}

#[test]
fn bad_hyper_parameters_and_mismatches_are_errors() {
    assert!(GpuOptimizer::new(Optimizer::sgd(-1.0)).is_err());
    assert!(
        GpuOptimizer::new(Optimizer::Adam {
            lr: 0.1,
            beta1: 1.0,
            beta2: 0.9,
            eps: 1e-8,
            weight_decay: 0.0,
            decoupled: false
        })
        .is_err()
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
