//! log_softmax and nll_loss: PyTorch goldens (logits of ±100 included), GPU against CPU on
//! shapes that fill no workgroup, finite differences for the CPU backward, bad input.

use crate::common;

use common::golden::{assert_close, cases, tensor};
use common::{gpu, max_abs_diff, random, upload};
use ndarray::ArrayD;
use wgcnn::Error;
use wgcnn::ops::{log_softmax, log_softmax_backward, nll_loss};

fn labels_of(value: &serde_json::Value) -> Vec<usize> {
    tensor(value).iter().map(|&v| v as usize).collect()
}

#[test]
fn pytorch_goldens_on_gpu_and_cpu() {
    let log_cases = cases("log_softmax_");
    let nll_cases = cases("nll_");
    assert!(log_cases.len() >= 3 && nll_cases.len() >= 2);
    let gpu = gpu();
    for case in log_cases {
        let j = &case.json;
        let (x, want_y) = (tensor(&j["inputs"]["x"]), tensor(&j["outputs"]["y"]));
        let (dy, want_dx) = (tensor(&j["grad_outputs"]["y"]), tensor(&j["grads"]["x"]));
        let y = wgcnn::cpu::log_softmax(&x.view()).unwrap();
        assert_close(&format!("{} cpu y", case.name), &y, &want_y, 1e-5, 1e-5);
        let dx = wgcnn::cpu::log_softmax_backward(&y.view(), &dy.view()).unwrap();
        assert_close(&format!("{} cpu dx", case.name), &dx, &want_dx, 1e-4, 1e-5);
        if gpu.is_some() {
            let ty = log_softmax(&upload(&x)).unwrap();
            let y = ty.to_array().unwrap();
            assert_close(&format!("{} gpu y", case.name), &y, &want_y, 1e-5, 1e-5);
            let dx = log_softmax_backward(&ty, &upload(&dy))
                .unwrap()
                .to_array()
                .unwrap();
            assert_close(&format!("{} gpu dx", case.name), &dx, &want_dx, 1e-4, 1e-5);
        }
    }
    for case in nll_cases {
        let j = &case.json;
        let logits = tensor(&j["inputs"]["logits"]);
        let target = labels_of(&j["inputs"]["target"]);
        let want_logp = tensor(&j["outputs"]["log_probs"]);
        let want_loss = tensor(&j["outputs"]["loss"]);
        let want_glogp = tensor(&j["grads"]["log_probs"]);
        let want_gz = tensor(&j["grads"]["logits"]);
        let logp = wgcnn::cpu::log_softmax(&logits.view()).unwrap();
        assert_close(
            &format!("{} cpu log_probs", case.name),
            &logp,
            &want_logp,
            1e-5,
            1e-5,
        );
        let nll = wgcnn::cpu::nll_loss(&logp.view(), &target).unwrap();
        assert_close(
            &format!("{} cpu loss", case.name),
            &nll.loss,
            &want_loss,
            1e-5,
            1e-5,
        );
        assert_close(
            &format!("{} cpu glogp", case.name),
            &nll.grad_logits,
            &want_glogp,
            1e-6,
            1e-7,
        );
        let gz = wgcnn::cpu::log_softmax_backward(&logp.view(), &nll.grad_logits.view()).unwrap();
        assert_close(
            &format!("{} cpu glogits", case.name),
            &gz,
            &want_gz,
            1e-4,
            1e-6,
        );
        if gpu.is_some() {
            let tlogp = log_softmax(&upload(&logits)).unwrap();
            let nll = nll_loss(&tlogp, &target).unwrap();
            let loss = nll.loss.to_array().unwrap();
            assert_close(
                &format!("{} gpu loss", case.name),
                &loss,
                &want_loss,
                1e-5,
                1e-5,
            );
            let glogp = nll.grad_logits.to_array().unwrap();
            assert_close(
                &format!("{} gpu glogp", case.name),
                &glogp,
                &want_glogp,
                1e-6,
                1e-7,
            );
            let gz = log_softmax_backward(&tlogp, &nll.grad_logits)
                .unwrap()
                .to_array()
                .unwrap();
            assert_close(
                &format!("{} gpu glogits", case.name),
                &gz,
                &want_gz,
                1e-4,
                1e-6,
            );
        }
    }
}

#[test]
fn gpu_matches_cpu_on_shapes_that_fill_no_workgroup() {
    let Some(gpu) = gpu() else { return };
    for (i, (rows, classes)) in [(1, 1), (3, 7), (65, 10), (130, 257), (5, 1000)]
        .into_iter()
        .enumerate()
    {
        let x = random(&[rows, classes], i as u64).mapv(|v| v * 60.0);
        let dy = random(&[rows, classes], 100 + i as u64);
        let labels: Vec<usize> = (0..rows).map(|r| (r * 7 + i) % classes).collect();
        let want_y = wgcnn::cpu::log_softmax(&x.view()).unwrap();
        let want_dx = wgcnn::cpu::log_softmax_backward(&want_y.view(), &dy.view()).unwrap();
        let want_nll = wgcnn::cpu::nll_loss(&want_y.view(), &labels).unwrap();
        // NaN-filled buffers of the outputs' size go back to the pool first, so the kernels
        // write into them: anything left unwritten shows.
        let poison = || drop(wgcnn::Tensor::full(gpu, &[rows, classes], f32::NAN).unwrap());
        poison();
        let ty = log_softmax(&upload(&x)).unwrap();
        assert!(
            max_abs_diff(&ty.to_array().unwrap(), &want_y) <= 2e-5 * 60.0,
            "y {rows}x{classes}"
        );
        let tdy = upload(&dy);
        poison();
        let dx = log_softmax_backward(&ty, &tdy).unwrap().to_array().unwrap();
        assert!(
            max_abs_diff(&dx, &want_dx) <= 1e-5 * classes as f32,
            "dx {rows}x{classes}"
        );
        poison();
        let nll = nll_loss(&ty, &labels).unwrap();
        assert_eq!(nll.grad_logits.to_array().unwrap(), want_nll.grad_logits);
        assert_eq!(nll.correct.scalar().unwrap(), want_nll.correct[[0]]);
        let loss = nll.loss.scalar().unwrap();
        assert!(
            (loss - want_nll.loss[[0]]).abs() <= 1e-5 * loss.abs().max(1.0),
            "loss {rows}x{classes}"
        );
    }
}

#[test]
fn cpu_backward_matches_finite_differences() {
    let x = random(&[3, 5], 7).mapv(|v| v * 3.0);
    let dy = random(&[3, 5], 8);
    let y = wgcnn::cpu::log_softmax(&x.view()).unwrap();
    let dx = wgcnn::cpu::log_softmax_backward(&y.view(), &dy.view()).unwrap();
    let objective = |x: &ArrayD<f32>| -> f64 {
        let y = wgcnn::cpu::log_softmax(&x.view()).unwrap();
        y.iter()
            .zip(&dy)
            .map(|(&a, &b)| f64::from(a) * f64::from(b))
            .sum()
    };
    let eps = 1e-2f32;
    for i in 0..x.len() {
        let (mut plus, mut minus) = (x.clone(), x.clone());
        plus.as_slice_mut().unwrap()[i] += eps;
        minus.as_slice_mut().unwrap()[i] -= eps;
        let numeric = (objective(&plus) - objective(&minus)) / (2.0 * f64::from(eps));
        let analytic = f64::from(dx.as_slice().unwrap()[i]);
        assert!(
            (numeric - analytic).abs() < 2e-3,
            "element {i}: {analytic} vs {numeric}"
        );
    }
}

#[test]
fn bad_inputs_are_errors() {
    let Some(_) = gpu() else { return };
    let x = upload(&random(&[2, 3, 4], 1));
    assert!(matches!(
        log_softmax(&x).unwrap_err(),
        Error::ShapeMismatch { .. }
    ));
    let y = log_softmax(&upload(&random(&[2, 3], 1))).unwrap();
    let err = log_softmax_backward(&y, &upload(&random(&[3, 2], 2))).unwrap_err();
    assert!(err.to_string().contains("dy is [3, 2]"), "{err}");
    let err = nll_loss(&y, &[0, 3]).err().unwrap();
    assert!(err.to_string().contains("label 3"), "{err}");
    assert!(nll_loss(&y, &[0]).is_err());
    assert!(wgcnn::cpu::log_softmax(&random(&[0, 3], 1).view()).is_err());
}

/// Rows too long for one invocation's loop bound run one workgroup per row: log_softmax,
/// its backward pass and nll_loss at 70,000 classes (where lavapipe's loop cap used to end
/// them early) against the CPU; a row past the wide kernels' bound (2²⁴ + 4 classes, where a
/// label would not even fit an f32) is an error, not a wrong answer.
#[test]
fn rows_of_many_classes_match_the_cpu() {
    let Some(gpu) = gpu() else { return };
    let (rows, classes) = (2, 70_000);
    let x = random(&[rows, classes], 5).mapv(|v| 3.0 * v);
    let want = wgcnn::cpu::log_softmax(&x.view()).unwrap();
    let y = log_softmax(&upload(&x)).unwrap();
    let got = y.to_array().unwrap();
    assert!(
        max_abs_diff(&got, &want) < 1e-4,
        "{}",
        max_abs_diff(&got, &want)
    );

    let dy = random(&[rows, classes], 6);
    let want_dx = wgcnn::cpu::log_softmax_backward(&want.view(), &dy.view()).unwrap();
    let dx = log_softmax_backward(&y, &upload(&dy))
        .unwrap()
        .to_array()
        .unwrap();
    assert!(
        max_abs_diff(&dx, &want_dx) < 1e-4,
        "{}",
        max_abs_diff(&dx, &want_dx)
    );

    let mut log_probs = want.clone();
    log_probs[[1, 65_000]] = 1.0; // row 1's arg-max is its label
    let labels = [12_345, 65_000];
    let cpu = wgcnn::cpu::nll_loss(&log_probs.view(), &labels).unwrap();
    let out = nll_loss(&upload(&log_probs), &labels).unwrap();
    assert!(max_abs_diff(&out.loss.to_array().unwrap(), &cpu.loss) < 1e-4);
    assert_eq!(out.correct.to_array().unwrap(), cpu.correct);
    assert_eq!(out.correct.to_array().unwrap()[[0]], 1.0);
    assert!(max_abs_diff(&out.grad_logits.to_array().unwrap(), &cpu.grad_logits) < 1e-7);

    let too_long = wgcnn::Tensor::full(gpu, &[1, (1 << 24) + 4], 0.5).unwrap();
    let err = nll_loss(&too_long, &[(1 << 24) + 1])
        .unwrap_err()
        .to_string();
    assert!(err.contains("rows of 16777220 elements"), "{err}");
}

/// A loss over more rows than one workgroup's lanes may walk within the loop bound (17
/// million: 66,407 rows per lane, past lavapipe's 65,535-iteration cap) sums its per-row
/// values in passes, each adding to the totals before: the mean loss and the correct count
/// match the CPU's.
#[test]
fn totals_over_millions_of_rows_match_the_cpu() {
    if gpu().is_none() {
        return;
    }
    let rows = 17_000_000;
    // One class: every row's loss is -x (in (1, 2]) and every row is correct.
    let log_probs = random(&[rows, 1], 9).mapv(|v| v / 2.0 - 1.5);
    let labels = vec![0; rows];
    let cpu = wgcnn::cpu::nll_loss(&log_probs.view(), &labels).unwrap();
    let out = nll_loss(&upload(&log_probs), &labels).unwrap();
    let (loss, want) = (out.loss.to_array().unwrap()[[0]], cpu.loss[[0]]);
    assert!((loss - want).abs() < 1e-4, "loss {loss} vs {want}");
    let correct = out.correct.to_array().unwrap()[[0]];
    assert!((correct - rows as f32).abs() <= 2.0, "correct {correct}");
}
