//! The kernel tuner: a convolution with several eligible kernel families times them on first
//! use, keeps the fastest in memory and in a cache file that the next context reads back;
//! `Tuning::Fixed` and a spent budget take the fixed order (Winograd first for 3×3 layers,
//! in one group or in wide ones); a trial the budget cuts short goes on in later contexts;
//! a broken cache file is ignored;
//! and every family, forced where it can run, matches the CPU reference forward and backward.

use crate::common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{gpu, max_abs_diff, random};
use wgcnn::ops::Conv2d;
use wgcnn::tuning::{ChoiceSource, ConvKernel, Tuning};
use wgcnn::{Gpu, GpuOptions, Padding, Tensor};

/// A cache file of this test's own in the temporary directory (removed first).
fn cache_file(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("wgcnn-tuning-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir.join("tuning.tsv")
}

fn context(tuning: Tuning, cache: Option<PathBuf>, budget: Duration) -> Gpu {
    Gpu::with_options(options(tuning, cache, budget)).unwrap()
}

fn options(tuning: Tuning, cache: Option<PathBuf>, budget: Duration) -> GpuOptions {
    GpuOptions {
        tuning,
        tuning_cache: cache,
        tuning_budget: budget,
        ..common::options()
    }
}

/// A measuring context with the cache file `file` and a budget no trial here reaches.
fn measuring(file: &Path) -> Gpu {
    Gpu::with_options(measuring_options(file)).unwrap()
}

fn measuring_options(file: &Path) -> GpuOptions {
    options(
        Tuning::Measure,
        Some(file.to_path_buf()),
        Duration::from_secs(600),
    )
}

/// Rewrites the cache file `file` so that each backward choice whose key starts with
/// `prefix` is the candidate `pick` names among its candidates, and drops the training
/// forward choices (timed against the backward plans before).
fn choose_backward(file: &Path, prefix: &str, pick: impl Fn(&[&str]) -> String) {
    let text = std::fs::read_to_string(file).unwrap();
    let mut rewrote = false;
    let rewritten: String = text
        .lines()
        .filter(|line| !line.contains("\tconv2d training forward "))
        .map(|line| match line.split('\t').collect::<Vec<_>>()[..] {
            [adapter, key, _, candidates, batch] if key.starts_with(prefix) => {
                let names: Vec<&str> = candidates
                    .split(';')
                    .map(|c| c.rsplit_once('=').unwrap().0)
                    .collect();
                rewrote = true;
                let chosen = pick(&names);
                format!("{adapter}\t{key}\t{chosen}\t{candidates}\t{batch}\n")
            }
            _ => format!("{line}\n"),
        })
        .collect();
    assert!(rewrote, "no backward choice {prefix:?} in {text}");
    std::fs::write(file, rewritten).unwrap();
}

/// A 3×3 layer heavy enough to be tuned (75 MFLOP), with two forward families (Winograd,
/// im2col) and two backward pairs.
const X: [usize; 4] = [4, 32, 32, 32];
const W: [usize; 4] = [32, 32, 3, 3];

fn spec() -> Conv2d {
    Conv2d {
        padding: Padding::Explicit(1, 1),
        ..Conv2d::default()
    }
}

/// Runs the layer forward and backward on `gpu` and checks it against the CPU.
fn run_against_cpu(gpu: &Gpu, spec: &Conv2d, x: &[usize], w: &[usize], label: &str) {
    let (xa, wa, ba) = (random(x, 1), random(w, 2), random(&[w[0]], 3));
    let expected = wgcnn::cpu::conv2d(spec, &xa.view(), &wa.view(), Some(&ba.view())).unwrap();
    let dya = random(expected.shape(), 4);
    let plain = Conv2d {
        activation: wgcnn::Activation::None,
        ..*spec
    };
    let grads = wgcnn::cpu::conv2d_backward(&plain, &xa.view(), &wa.view(), &dya.view()).unwrap();
    let upload = |a: &ndarray::ArrayD<f32>| Tensor::from_array(gpu, a).unwrap();
    let (tx, tw, tb, tdy) = (upload(&xa), upload(&wa), upload(&ba), upload(&dya));
    let y = spec
        .forward(&tx, &tw, Some(&tb))
        .unwrap()
        .to_array()
        .unwrap();
    let scale = |a: &ndarray::ArrayD<f32>| a.iter().fold(1.0f32, |m, v| m.max(v.abs()));
    let close = |got: &ndarray::ArrayD<f32>, want: &ndarray::ArrayD<f32>, what: &str| {
        let diff = max_abs_diff(got, want);
        assert!(diff <= 1e-4 * scale(want), "{label} {what}: off by {diff}");
    };
    close(&y, &expected, "y");
    let g = plain.backward(&tx, &tw, &tdy).unwrap();
    close(&g.x.to_array().unwrap(), &grads.x, "dx");
    close(&g.weight.to_array().unwrap(), &grads.weight, "dW");
    close(&g.bias.to_array().unwrap(), &grads.bias, "db");
}

#[test]
fn measured_choices_are_kept_in_the_cache_file_and_read_back() {
    if gpu().is_none() {
        return;
    }
    let file = cache_file("kept");
    let tuned = measuring(&file);
    run_against_cpu(&tuned, &spec(), &X, &W, "measured");
    let report = tuned.tuning_report();
    assert_eq!(report.choices.len(), 2, "{report:#?}");
    for choice in &report.choices {
        assert_eq!(choice.source, ChoiceSource::Measured, "{choice:?}");
        assert!(choice.candidates.len() >= 2, "{choice:?}");
        // Four images: the trial runs the whole batch.
        assert_eq!(choice.timed_batch, Some(X[0]), "{choice:?}");
        // The kept one is the fastest of those timed; every candidate ran.
        let times: Vec<f64> = choice.candidates.iter().map(|(_, t)| t.unwrap()).collect();
        assert!(times.iter().all(|t| t.is_finite()), "{choice:?}");
        let fastest = times.iter().copied().fold(f64::INFINITY, f64::min);
        let chosen = choice.candidates.iter().find(|(n, _)| *n == choice.chosen);
        assert_eq!(chosen.and_then(|(_, t)| *t), Some(fastest), "{choice:?}");
    }
    assert!(
        report.seconds > 0.0 && report.cache_error.is_none(),
        "{report:#?}"
    );
    let text = std::fs::read_to_string(&file).unwrap();
    for choice in &report.choices {
        assert!(text.contains(&choice.key), "{text}");
    }

    // A new context reads the choices back and measures nothing.
    let again = measuring(&file);
    let shape = spec().shape(&X, &W, None).unwrap();
    let plan = spec().plan(&again, &shape).unwrap();
    let read = again.tuning_report();
    assert_eq!(read.seconds, 0.0, "{read:#?}");
    assert_eq!(read.choices.len(), 2);
    for (kept, back) in report.choices.iter().zip(&read.choices) {
        assert_eq!(back.source, ChoiceSource::CacheFile);
        assert_eq!((&back.key, &back.chosen), (&kept.key, &kept.chosen));
        assert_eq!(back.timed_batch, kept.timed_batch);
    }
    assert_eq!(plan.forward.name(), report.choices[0].chosen);

    // A choice made among other candidates (a kernel added since) is measured again.
    let fewer: String = text
        .lines()
        .map(|line| match line.split('\t').collect::<Vec<_>>()[..] {
            [adapter, key, chosen, _, batch] => {
                format!("{adapter}\t{key}\t{chosen}\t{chosen}=0.001\t{batch}\n")
            }
            _ => format!("{line}\n"),
        })
        .collect();
    std::fs::write(&file, fewer).unwrap();
    let remeasured = measuring(&file);
    spec().plan(&remeasured, &shape).unwrap();
    let report = remeasured.tuning_report();
    assert!(
        report
            .choices
            .iter()
            .all(|c| c.source == ChoiceSource::Measured),
        "{report:#?}"
    );
    let _ = std::fs::remove_dir_all(file.parent().unwrap());
}

/// A training step's forward pass (`forward_saving`) is tuned with the weight gradient it
/// feeds: where that weight gradient is Winograd's, a "training forward" choice of its own is
/// measured (every candidate timed, the fastest kept) and the pass keeps V exactly when the
/// kernel chosen runs the same tile; elsewhere there is no such choice and nothing is kept.
/// The weight gradient is whatever the measurement picks, then F(4×4)'s (the cache file
/// rewritten to say so); the gradients match the CPU each time, and a new context reads
/// every choice back.
#[test]
fn a_training_forward_pass_is_timed_with_its_weight_gradient() {
    if gpu().is_none() {
        return;
    }
    let file = cache_file("training");
    let (xa, wa, ba) = (random(&X, 11), random(&W, 12), random(&[W[0]], 13));
    let spec = spec();
    let expected = wgcnn::cpu::conv2d(&spec, &xa.view(), &wa.view(), Some(&ba.view())).unwrap();
    let dya = random(expected.shape(), 14);
    let grads = wgcnn::cpu::conv2d_backward(&spec, &xa.view(), &wa.view(), &dya.view()).unwrap();
    // A training step on `gpu` against the CPU: whether it kept V, and the tuning report.
    let run = |gpu: &Gpu| {
        let up = |a: &ndarray::ArrayD<f32>| Tensor::from_array(gpu, a).unwrap();
        let (tx, tw) = (up(&xa), up(&wa));
        let (y, saved) = spec.forward_saving(&tx, &tw, Some(&up(&ba))).unwrap();
        let g = spec
            .backward_saved(&tx, &tw, &up(&dya), saved.as_ref())
            .unwrap();
        let pairs = [
            (y, &expected),
            (g.x, &grads.x),
            (g.weight, &grads.weight),
            (g.bias, &grads.bias),
        ];
        for (i, (got, want)) in pairs.into_iter().enumerate() {
            let scale = want.iter().fold(1.0f32, |m, v| m.max(v.abs()));
            let diff = max_abs_diff(&got.to_array().unwrap(), want);
            assert!(diff <= 1e-4 * scale, "output {i}: off by {diff}");
        }
        (saved.is_some(), gpu.tuning_report())
    };
    // The report's choices agree with what the pass kept.
    let consistent = |kept: bool, report: &wgcnn::tuning::TuningReport| {
        let find = |pass: &str| report.choices.iter().find(|c| c.key.starts_with(pass));
        let backward = find("conv2d backward ").expect("the backward pass was planned");
        let dw_tile = ["winograd dW", "winograd 4x4 dW"]
            .iter()
            .position(|dw| backward.chosen.ends_with(dw));
        match (dw_tile, find("conv2d training forward ")) {
            (Some(tile), Some(training)) => {
                let timed = training.candidates.iter().map(|(_, t)| t.unwrap());
                let fastest = timed.fold(f64::INFINITY, f64::min);
                let chosen = training
                    .candidates
                    .iter()
                    .find(|(n, _)| *n == training.chosen);
                assert_eq!(chosen.and_then(|(_, t)| *t), Some(fastest), "{training:?}");
                let same_tile = training.chosen == ["winograd", "winograd 4x4"][tile];
                assert_eq!(kept, same_tile, "{report:#?}");
            }
            (None, None) => assert!(!kept, "{report:#?}"),
            _ => panic!("a training forward choice exactly where dW is Winograd's: {report:#?}"),
        }
    };
    let (kept, report) = run(&measuring(&file));
    consistent(kept, &report);

    // The weight gradient F(4×4)'s: the training forward pass measured against it.
    choose_backward(&file, "conv2d backward ", |candidates| {
        let f4 = "winograd 4x4 dx + winograd 4x4 dW";
        assert!(candidates.contains(&f4), "{candidates:?}");
        f4.into()
    });
    let (kept, report) = run(&measuring(&file));
    consistent(kept, &report);
    let training = report.choices.iter().find(|c| c.key.contains("training"));
    assert_eq!(
        training.map(|c| c.source),
        Some(ChoiceSource::Measured),
        "{report:#?}"
    );

    let (again, read) = run(&measuring(&file));
    assert_eq!(again, kept);
    assert_eq!(read.seconds, 0.0, "{read:#?}");
    assert!(
        read.choices
            .iter()
            .all(|c| c.source == ChoiceSource::CacheFile)
    );
    let _ = std::fs::remove_dir_all(file.parent().unwrap());
}

/// A batch whose transformed tiles outgrow the one chunk a kept V is made in keeps none, so
/// its forward pass is not timed as if it saved the weight gradient's input transform. The
/// contexts cap buffers at 4 MiB (`GpuOptions::buffer_limit`), which the chunk then is, as
/// at the adapter's own limit: F(2×2) of 16×32² images takes 256 KiB each, so 16 fit. With
/// dW F(2×2)'s for the tuning keys that 16 and 17 images share (both timed on 16), 17 images
/// take the forward pass's own choice and keep nothing; 16 are timed for training and keep
/// V exactly where that choice is F(2×2). Each pass gives what the plain forward and
/// backward passes do (which the other tests check against the CPU).
#[test]
fn tiles_past_one_chunk_are_not_counted_as_kept() {
    if gpu().is_none() {
        return;
    }
    let file = cache_file("chunk");
    let capped = || {
        let options = GpuOptions {
            buffer_limit: Some(4 << 20),
            ..measuring_options(&file)
        };
        Gpu::with_options(options).unwrap()
    };
    let spec = spec();
    let w = [16, 16, 3, 3];
    let (wa, ba) = (random(&w, 31), random(&[w[0]], 32));
    // A training step of `n` images on `gpu` against the plain passes: whether it kept V.
    let step = |gpu: &Gpu, n: usize| {
        let up = |a: &ndarray::ArrayD<f32>| Tensor::from_array(gpu, a).unwrap();
        let (x, weight, bias) = (up(&random(&[n, 16, 32, 32], 33)), up(&wa), up(&ba));
        let dy = up(&random(&[n, 16, 32, 32], 34));
        let (y, saved) = spec.forward_saving(&x, &weight, Some(&bias)).unwrap();
        let g = spec
            .backward_saved(&x, &weight, &dy, saved.as_ref())
            .unwrap();
        let plain_y = spec.forward(&x, &weight, Some(&bias)).unwrap();
        let plain = spec.backward(&x, &weight, &dy).unwrap();
        let pairs = [(y, plain_y), (g.x, plain.x), (g.weight, plain.weight)];
        for (i, (got, want)) in pairs.into_iter().enumerate() {
            let want = want.to_array().unwrap();
            let scale = want.iter().fold(1.0f32, |m, v| m.max(v.abs()));
            let diff = max_abs_diff(&got.to_array().unwrap(), &want);
            assert!(
                diff <= 1e-4 * scale,
                "{n} images, output {i}: off by {diff}"
            );
        }
        saved.is_some()
    };
    let first = capped();
    step(&first, 16);
    // Its trials time 4 of the 16 images; the candidates close to the leader race again on
    // all 16: each choice says which batch its times are from.
    for choice in first.tuning_report().choices {
        let timed = choice
            .candidates
            .iter()
            .filter(|(_, t)| t.is_some())
            .count();
        assert!(timed >= 1, "{choice:?}");
        assert!(matches!(choice.timed_batch, Some(4 | 16)), "{choice:?}");
    }
    // Choices timed under a cap are kept for contexts with the same cap only.
    let text = std::fs::read_to_string(&file).unwrap();
    let lines: Vec<&str> = text.lines().filter(|l| l.contains("\tconv2d ")).collect();
    assert!(!lines.is_empty(), "{text}");
    for line in lines {
        assert!(
            line.contains("buffers of 4194304 bytes at most\t"),
            "{line}"
        );
    }
    // The backward plan F(2×2)'s weight gradient, and no training forward choice yet.
    choose_backward(&file, "conv2d backward n16 ", |candidates| {
        let f2 = candidates.iter().find(|n| n.ends_with(" + winograd dW"));
        f2.unwrap_or_else(|| panic!("{candidates:?}")).to_string()
    });

    let tuned = capped();
    let training = || {
        let report = tuned.tuning_report();
        let found = report.choices.iter().find(|c| c.key.contains("training"));
        (found.map(|c| c.chosen.clone()), report)
    };
    assert!(!step(&tuned, 17), "17 images kept V: {:#?}", training().1);
    let (none, report) = training();
    assert_eq!(none, None, "{report:#?}");
    let kept = step(&tuned, 16);
    let (chosen, report) = training();
    let chosen = chosen.unwrap_or_else(|| panic!("16 images not timed for training: {report:#?}"));
    assert_eq!(kept, chosen == "winograd", "{chosen}");
    let _ = std::fs::remove_dir_all(file.parent().unwrap());
}

/// In a model's training step a convolution's forward pass plans the backward pass the step
/// then runs: the first layer's (Winograd among its candidates, 87 MFLOP) without an input
/// gradient, so no "dx" key is measured for it, which no step would use; and the step
/// matches the CPU's.
#[test]
fn a_models_training_forward_plans_the_backward_pass_it_runs() {
    use wgcnn::nn::{Conv2d as Layer, Flatten, GlobalAvgPool, Linear, Sequential, relu};
    use wgcnn::train::train_step;
    use wgcnn::{Device, Optimizer};

    if gpu().is_none() {
        return;
    }
    let file = cache_file("model");
    let tuned = measuring(&file);
    let x = random(&[8, 3, 56, 56], 21);
    let labels: Vec<usize> = (0..8).map(|i| i % 4).collect();
    let mut losses = Vec::new();
    for device in [Device::Cpu, Device::Gpu(tuned.clone())] {
        let mut model = Sequential::new()
            .add("first", Layer::new(3, 64, (3, 3)).padding(Padding::Same))
            .add("relu", relu())
            .add("pointwise", Layer::new(64, 8, (1, 1)))
            .add("pool", GlobalAvgPool)
            .add("flatten", Flatten)
            .add("fc", Linear::new(8, 4))
            .build(device, 5)
            .unwrap();
        let mut opt = model.optimizer(Optimizer::sgd(0.1)).unwrap();
        let step: Vec<f32> = (0..2)
            .map(|_| {
                let out = train_step(&mut model, &mut opt, |d| d.upload(x.clone()), &labels);
                out.unwrap().loss.to_array().unwrap()[[0]]
            })
            .collect();
        losses.push(step);
    }
    for (cpu, gpu) in losses[0].iter().zip(&losses[1]) {
        assert!((cpu - gpu).abs() < 1e-3 * (1.0 + cpu.abs()), "{losses:?}");
    }
    let report = tuned.tuning_report();
    let first_layer = |dx: bool| {
        report
            .choices
            .iter()
            .any(|c| c.key.starts_with("conv2d backward n8 c3 ") && c.key.contains(" dx") == dx)
    };
    assert!(first_layer(false) && !first_layer(true), "{report:#?}");
    let _ = std::fs::remove_dir_all(file.parent().unwrap());
}

#[test]
fn fixed_order_and_a_spent_budget_take_the_default_and_write_nothing() {
    if gpu().is_none() {
        return;
    }
    let shape = spec().shape(&X, &W, None).unwrap();
    for (tuning, budget, name) in [
        (Tuning::Fixed, Duration::from_secs(600), "fixed"),
        (Tuning::Measure, Duration::ZERO, "budget"),
    ] {
        let file = cache_file(name);
        let gpu = context(tuning, Some(file.clone()), budget);
        let plan = spec().plan(&gpu, &shape).unwrap();
        assert_eq!(plan.forward, ConvKernel::Winograd, "{name}");
        assert_eq!(plan.input_grad, ConvKernel::Winograd, "{name}");
        let report = gpu.tuning_report();
        assert_eq!(report.seconds, 0.0);
        let expected = match tuning {
            Tuning::Fixed => 0,
            Tuning::Measure => 2,
        };
        assert_eq!(report.choices.len(), expected, "{report:#?}");
        assert!(
            report
                .choices
                .iter()
                .all(|c| c.source == ChoiceSource::BudgetSpent),
            "{report:#?}"
        );
        assert!(!file.exists(), "{name} wrote {}", file.display());
        run_against_cpu(&gpu, &spec(), &X, &W, name);
    }
}

/// The fixed order leads with Winograd F(2×2) for 3×3 layers in groups of 8 channels or
/// more, as for one group, forward and backward (before, grouped direct or im2col led: on
/// lavapipe 2–4× slower); groups too narrow for Winograd keep the grouped kernels.
#[test]
fn wide_groups_lead_with_winograd_in_the_fixed_order() {
    if gpu().is_none() {
        return;
    }
    let gpu = context(Tuning::Fixed, None, Duration::from_secs(600));
    use ConvKernel::{GroupedDirect, Im2colMatmul, Winograd};
    // (x, weight, groups, the forward, input-gradient and weight-gradient kernels)
    let cases = [
        ([2, 32, 9, 11], [24, 16, 3, 3], 2, [Winograd; 3]),
        ([3, 64, 7, 10], [64, 8, 3, 3], 8, [Winograd; 3]),
        // 36 taps a group: grouped direct forward, im2col backward, as before.
        (
            [2, 32, 9, 11],
            [32, 4, 3, 3],
            8,
            [GroupedDirect, Im2colMatmul, Im2colMatmul],
        ),
    ];
    for (x, w, groups, kernels) in cases {
        let spec = Conv2d { groups, ..spec() };
        let shape = spec.shape(&x, &w, None).unwrap();
        let plan = spec.plan(&gpu, &shape).unwrap();
        let label = format!("{x:?} * {w:?} in {groups} groups: {}", plan.label());
        assert_eq!(
            [plan.forward, plan.input_grad, plan.weight_grad],
            kernels,
            "{label}"
        );
        run_against_cpu(&gpu, &spec, &x, &w, &label);
    }
}

/// A budget that runs out during a shape's trial (1 ms: less than compiling one candidate)
/// starts no more candidates: the default alone is timed and runs, the choice reads as
/// partial with the others pending, the shapes after it take the default, and the file
/// keeps the partial trial. Each later context with the same budget and file times at least
/// one more candidate (racing the leader), so that every shape is measured within a few runs.
#[test]
fn a_trial_the_budget_cuts_short_goes_on_in_the_next_context() {
    if gpu().is_none() {
        return;
    }
    let file = cache_file("mid-trial");
    let budgeted = || {
        context(
            Tuning::Measure,
            Some(file.clone()),
            Duration::from_millis(1),
        )
    };
    let shape = spec().shape(&X, &W, None).unwrap();
    let gpu = budgeted();
    let plan = spec().plan(&gpu, &shape).unwrap();
    assert_eq!(plan.forward, ConvKernel::Winograd);
    let report = gpu.tuning_report();
    let (first, rest) = report.choices.split_first().unwrap();
    assert_eq!(first.source, ChoiceSource::Partial, "{report:#?}");
    assert!(first.candidates[0].1.is_some(), "{report:#?}");
    assert!(
        first.candidates[1..].iter().all(|(_, t)| t.is_none())
            && first.pending.len() == first.candidates.len() - 1,
        "{report:#?}"
    );
    assert!(
        !rest.is_empty() && rest.iter().all(|c| c.source == ChoiceSource::BudgetSpent),
        "{report:#?}"
    );
    let text = std::fs::read_to_string(&file).unwrap();
    assert_eq!(text.matches("=?").count(), first.pending.len(), "{text}");
    run_against_cpu(&gpu, &spec(), &X, &W, "mid-trial");

    // Candidates not yet timed: a partial trial's pending ones, all of a skipped shape's.
    let left = |report: &wgcnn::tuning::TuningReport| -> usize {
        report
            .choices
            .iter()
            .map(|c| match c.source {
                ChoiceSource::Partial => c.pending.len(),
                ChoiceSource::BudgetSpent => c.candidates.len(),
                _ => 0,
            })
            .sum()
    };
    let mut before = left(&report);
    while before > 0 {
        let gpu = budgeted();
        let plan = spec().plan(&gpu, &shape).unwrap();
        let report = gpu.tuning_report();
        let now = left(&report);
        assert!(now < before, "no progress ({before} left): {report:#?}");
        before = now;
        if now == 0 {
            assert!(
                report
                    .choices
                    .iter()
                    .all(|c| matches!(c.source, ChoiceSource::Measured | ChoiceSource::CacheFile)),
                "{report:#?}"
            );
            run_against_cpu(&gpu, &spec(), &X, &W, &format!("measured {}", plan.label()));
        }
    }
    let _ = std::fs::remove_dir_all(file.parent().unwrap());
}

#[test]
fn a_broken_cache_file_is_ignored() {
    if gpu().is_none() {
        return;
    }
    // Lines that do not parse, and one naming a kernel the layer does not have.
    let file = cache_file("broken");
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    let adapter = gpu().unwrap().adapter_info().name.clone();
    let junk = format!(
        "garbage\n\u{0}\u{1}\nx\ty\n{adapter}\tconv2d forward n4 c32 32x32\tnone\tnone=0.1\n"
    );
    std::fs::write(&file, junk).unwrap();
    let tuned = measuring(&file);
    run_against_cpu(&tuned, &spec(), &X, &W, "broken file");
    let report = tuned.tuning_report();
    assert!(
        report
            .choices
            .iter()
            .all(|c| c.source == ChoiceSource::Measured)
    );
    assert!(report.cache_error.is_none(), "{report:#?}");
    // The rewritten file keeps the readable lines of other adapters (that last one: our
    // adapter's full key names its driver too), drops the rest and adds the new choices.
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(
        !text.contains("garbage") && text.contains("\tnone=0.1"),
        "{text}"
    );
    assert_eq!(
        text.lines().filter(|l| l.contains("conv2d")).count(),
        3,
        "{text}"
    );

    // A cache path that cannot be a file: tuning goes on, the report says why.
    let blocked = cache_file("blocked");
    std::fs::create_dir_all(&blocked).unwrap();
    let tuned = measuring(&blocked);
    run_against_cpu(&tuned, &spec(), &X, &W, "blocked file");
    let report = tuned.tuning_report();
    assert!(report.cache_error.is_some(), "{report:#?}");
    for path in [file, blocked] {
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }
}

/// Every family forced on shapes where it can run: the plan takes it on each pass that
/// offers it, and forward and backward match the CPU. Shapes fill no tile; a forced family
/// a pass cannot run leaves that pass to the fixed order.
#[test]
fn every_kernel_family_forced_matches_the_cpu() {
    let Some(gpu) = gpu() else {
        return;
    };
    use ConvKernel::*;
    // (x, w, groups, padding, families that must take the forward pass)
    type Case = ([usize; 4], [usize; 4], usize, usize, &'static [ConvKernel]);
    let cases: [Case; 4] = [
        // Direct, both Winograds, im2col and implicit GEMM all run a small 3×3 bank.
        (
            [3, 5, 11, 9],
            [7, 5, 3, 3],
            1,
            1,
            &[Direct, Winograd, Winograd4, Im2colMatmul, ImplicitGemm],
        ),
        // Pointwise, direct (1×1 is a small bank), im2col and implicit GEMM.
        (
            [2, 6, 7, 5],
            [9, 6, 1, 1],
            1,
            0,
            &[Direct, Pointwise, Im2colMatmul, ImplicitGemm],
        ),
        // Depthwise: grouped direct or im2col per group.
        (
            [2, 6, 9, 7],
            [6, 1, 3, 3],
            6,
            1,
            &[GroupedDirect, Im2colMatmul],
        ),
        // Groups of 5 channels, 5×5: long sums.
        (
            [2, 10, 9, 8],
            [4, 5, 5, 5],
            2,
            2,
            &[GroupedDirect, Im2colMatmul],
        ),
    ];
    for (x, w, groups, pad, forward) in cases {
        for kernel in ConvKernel::ALL {
            let spec = Conv2d {
                padding: Padding::Explicit(pad, pad),
                groups,
                activation: wgcnn::Activation::Relu,
                kernel: Some(kernel),
                ..Conv2d::default()
            };
            let shape = spec.shape(&x, &w, None).unwrap();
            let plan = spec.plan(gpu, &shape).unwrap();
            let label = format!("{kernel:?} on {x:?} * {w:?}: {}", plan.label());
            assert_eq!(forward.contains(&kernel), plan.forward == kernel, "{label}");
            run_against_cpu(gpu, &spec, &x, &w, &label);
        }
    }
}
