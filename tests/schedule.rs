//! Learning-rate schedules against PyTorch's schedulers stepped one by one
//! (tests/golden/lr_schedules.json, from tests/golden/make_schedule_golden.py), and the
//! parameters PyTorch refuses as errors.

use wgcnn::train::LrSchedule;

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
    assert_eq!(cases.len(), 7);
    for (name, case) in cases {
        let base = case["base_lr"].as_f64().unwrap() as f32;
        let schedule = schedule(name);
        for (step, want) in case["lrs"].as_array().unwrap().iter().enumerate() {
            let want = want.as_f64().unwrap();
            let got = f64::from(schedule.lr(base, step).unwrap());
            assert!(
                (got - want).abs() <= 1e-6 * want.abs().max(1e-3),
                "{name} step {step}: {got} vs PyTorch's {want}"
            );
        }
    }
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
            LrSchedule::one_cycle(0.1, 100).after_warmup(0, 0.1),
            "warm-up",
        ),
    ];
    for (schedule, expected) in cases {
        let err = schedule.lr(0.1, 0).unwrap_err().to_string();
        assert!(err.contains(expected), "{schedule:?}: {err}");
    }
}
