//! Linear layers and softmax cross-entropy: PyTorch goldens, GPU against CPU, finite
//! differences, bad labels.

use crate::common;

use common::golden::{assert_close, cases, tensor};
use common::{gpu, max_abs_diff, random, upload};
use ndarray::{ArrayD, IxDyn};
use wgcnn::{Activation, Tensor};

#[test]
fn pytorch_goldens_on_gpu_and_cpu() {
    if gpu().is_none() {
        return;
    }
    for case in cases("linear_softmax_ce_") {
        let (json, name) = (&case.json, &case.name);
        let inputs = &json["inputs"];
        let (x, w, b) = (
            tensor(&inputs["x"]),
            tensor(&inputs["weight"]),
            tensor(&inputs["bias"]),
        );
        let labels: Vec<usize> = tensor(&inputs["target"])
            .iter()
            .map(|&v| v as usize)
            .collect();
        let (logits, loss) = (
            tensor(&json["outputs"]["logits"]),
            json["outputs"]["loss"]["data"][0].as_f64().unwrap() as f32,
        );
        let grads = &json["grads"];
        let loss_array = ArrayD::from_elem(IxDyn(&[1]), loss);

        let cpu_logits =
            wgcnn::cpu::linear(&x.view(), &w.view(), Some(&b.view()), Activation::None).unwrap();
        assert_close(
            &format!("{name} cpu logits"),
            &cpu_logits,
            &logits,
            1e-4,
            1e-5,
        );
        let ce = wgcnn::cpu::softmax_cross_entropy(&cpu_logits.view(), &labels).unwrap();
        assert_close(
            &format!("{name} cpu loss"),
            &ce.loss,
            &loss_array,
            1e-4,
            1e-5,
        );
        assert_close(
            &format!("{name} cpu dlogits"),
            &ce.grad_logits,
            &tensor(&grads["logits"]),
            1e-4,
            1e-5,
        );
        let g = wgcnn::cpu::linear_backward(&x.view(), &w.view(), &ce.grad_logits.view()).unwrap();
        assert_close(
            &format!("{name} cpu dx"),
            &g.x,
            &tensor(&grads["x"]),
            1e-4,
            1e-5,
        );
        assert_close(
            &format!("{name} cpu dw"),
            &g.weight,
            &tensor(&grads["weight"]),
            1e-4,
            1e-5,
        );
        assert_close(
            &format!("{name} cpu db"),
            &g.bias,
            &tensor(&grads["bias"]),
            1e-4,
            1e-5,
        );

        let (tx, tw) = (upload(&x), upload(&w));
        let gpu_logits = wgcnn::ops::linear(&tx, &tw, Some(&upload(&b)), Activation::None).unwrap();
        assert_close(
            &format!("{name} gpu logits"),
            &gpu_logits.to_array().unwrap(),
            &logits,
            1e-4,
            1e-5,
        );
        let ce = wgcnn::ops::softmax_cross_entropy(&gpu_logits, &labels).unwrap();
        assert_close(
            &format!("{name} gpu loss"),
            &ce.loss.to_array().unwrap(),
            &loss_array,
            1e-4,
            1e-5,
        );
        assert_close(
            &format!("{name} gpu dlogits"),
            &ce.grad_logits.to_array().unwrap(),
            &tensor(&grads["logits"]),
            1e-4,
            1e-5,
        );
        let g = wgcnn::ops::linear_backward(&tx, &tw, &ce.grad_logits).unwrap();
        assert_close(
            &format!("{name} gpu dx"),
            &g.x.to_array().unwrap(),
            &tensor(&grads["x"]),
            1e-4,
            1e-5,
        );
        assert_close(
            &format!("{name} gpu dw"),
            &g.weight.to_array().unwrap(),
            &tensor(&grads["weight"]),
            1e-4,
            1e-5,
        );
        assert_close(
            &format!("{name} gpu db"),
            &g.bias.to_array().unwrap(),
            &tensor(&grads["bias"]),
            1e-4,
            1e-5,
        );
    }
}

#[test]
fn random_batches_match_the_cpu_including_accuracy() {
    let Some(gpu) = gpu() else { return };
    // Up to 256 rows (of at most 65536 logits) one workgroup sums the totals too; past that,
    // per-row values and a summing pass (1000 rows: more than one row per lane).
    let shapes = [
        (1, 2, 1),
        (64, 10, 2),
        (37, 3, 3),
        (200, 100, 4),
        (256, 7, 5),
        (257, 5, 6),
        (1000, 12, 7),
        (200, 400, 8),
    ];
    for (n, k, seed) in shapes {
        let logits = random(&[n, k], seed).mapv(|v| v * 5.0);
        let labels: Vec<usize> = (0..n).map(|i| (i * 7 + seed as usize) % k).collect();
        let want = wgcnn::cpu::softmax_cross_entropy(&logits.view(), &labels).unwrap();
        // Outputs land in NaN-filled buffers: an unwritten one shows.
        for shape in [&[1][..], &[1], &[n], &[n], &[n, k]] {
            drop(Tensor::full(gpu, shape, f32::NAN).unwrap());
        }
        let got =
            wgcnn::ops::softmax_cross_entropy(&Tensor::from_array(gpu, &logits).unwrap(), &labels)
                .unwrap();
        assert!(max_abs_diff(&got.loss.to_array().unwrap(), &want.loss) < 1e-5);
        assert!(max_abs_diff(&got.grad_logits.to_array().unwrap(), &want.grad_logits) < 1e-6);
        assert_eq!(got.correct.to_array().unwrap(), want.correct);
        // The accuracy count, from its definition.
        let expected_correct = (0..n)
            .filter(|&i| {
                let row = logits.index_axis(ndarray::Axis(0), i);
                let top = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                row.iter().position(|&v| v == top) == Some(labels[i])
            })
            .count();
        assert_eq!(want.correct[[0]], expected_correct as f32);
    }
}

#[test]
fn cross_entropy_gradient_matches_finite_differences() {
    let logits = random(&[4, 5], 9).mapv(|v| v * 3.0);
    let labels = [0, 4, 2, 2];
    let loss = |z: &ArrayD<f32>| {
        f64::from(
            wgcnn::cpu::softmax_cross_entropy(&z.view(), &labels)
                .unwrap()
                .loss[[0]],
        )
    };
    let grad = wgcnn::cpu::softmax_cross_entropy(&logits.view(), &labels)
        .unwrap()
        .grad_logits;
    for i in 0..logits.len() {
        let (mut plus, mut minus) = (logits.clone(), logits.clone());
        plus.as_slice_mut().unwrap()[i] += 1e-2;
        minus.as_slice_mut().unwrap()[i] -= 1e-2;
        let numeric = (loss(&plus) - loss(&minus)) / 2e-2;
        let analytic = f64::from(grad.as_slice().unwrap()[i]);
        assert!(
            (numeric - analytic).abs() < 1e-3,
            "[{i}] {analytic} vs {numeric}"
        );
    }
    // Large logits stay finite.
    let huge = logits.mapv(|v| v * 1000.0);
    let ce = wgcnn::cpu::softmax_cross_entropy(&huge.view(), &labels).unwrap();
    assert!(ce.loss[[0]].is_finite() && ce.grad_logits.iter().all(|v| v.is_finite()));
}

#[test]
fn linear_backward_matches_finite_differences() {
    let (x, w, b) = (random(&[3, 4], 1), random(&[5, 4], 2), random(&[5], 3));
    let dy = random(&[3, 5], 4);
    let loss = |x: &ArrayD<f32>, w: &ArrayD<f32>, b: &ArrayD<f32>| -> f64 {
        let y =
            wgcnn::cpu::linear(&x.view(), &w.view(), Some(&b.view()), Activation::None).unwrap();
        y.iter()
            .zip(&dy)
            .map(|(a, g)| f64::from(*a) * f64::from(*g))
            .sum()
    };
    let g = wgcnn::cpu::linear_backward(&x.view(), &w.view(), &dy.view()).unwrap();
    let fd = |perturbed: &dyn Fn(f32) -> f64| (perturbed(1e-2) - perturbed(-1e-2)) / 2e-2;
    for i in 0..x.len() {
        let numeric = fd(&|e| {
            let mut x2 = x.clone();
            x2.as_slice_mut().unwrap()[i] += e;
            loss(&x2, &w, &b)
        });
        assert!((numeric - f64::from(g.x.as_slice().unwrap()[i])).abs() < 1e-3);
    }
    for i in 0..w.len() {
        let numeric = fd(&|e| {
            let mut w2 = w.clone();
            w2.as_slice_mut().unwrap()[i] += e;
            loss(&x, &w2, &b)
        });
        assert!((numeric - f64::from(g.weight.as_slice().unwrap()[i])).abs() < 1e-3);
    }
    for i in 0..b.len() {
        let numeric = fd(&|e| {
            let mut b2 = b.clone();
            b2.as_slice_mut().unwrap()[i] += e;
            loss(&x, &w, &b2)
        });
        assert!((numeric - f64::from(g.bias[i])).abs() < 1e-3);
    }
}

#[test]
fn bad_labels_and_shapes_are_errors() {
    let logits = random(&[3, 4], 1);
    let err = wgcnn::cpu::softmax_cross_entropy(&logits.view(), &[0, 4, 1]).unwrap_err();
    assert!(
        err.to_string()
            .contains("label 4 at row 1 is not below the 4 classes"),
        "{err}"
    );
    let err = wgcnn::cpu::softmax_cross_entropy(&logits.view(), &[0, 1]).unwrap_err();
    assert!(err.to_string().contains("2 labels for 3 rows"), "{err}");
    let Some(gpu) = gpu() else { return };
    let t = Tensor::from_array(gpu, &logits).unwrap();
    assert!(wgcnn::ops::softmax_cross_entropy(&t, &[9, 0, 0]).is_err());
    let w = Tensor::from_array(gpu, &random(&[5, 3], 2)).unwrap();
    let err = wgcnn::ops::linear(&t, &w, None, Activation::None).unwrap_err();
    assert!(
        err.to_string()
            .contains("x must be [N, in] and weight [out, in]"),
        "{err}"
    );
}

/// Rows too long for one invocation's loop bound (lavapipe ends a shader invocation's loops
/// after 65,535 iterations: at 70,000 classes the loss read 0.05 where it is 11) run one
/// workgroup per row: loss, gradient and accuracy as the CPU's, at 5,000 classes (just past
/// one invocation's share) and at 70,000; past the wide kernel's bound, an error.
#[test]
fn losses_over_many_classes_match_the_cpu() {
    let Some(gpu) = gpu() else { return };
    for (rows, classes, seed) in [(3, 5_000, 1), (2, 70_000, 2)] {
        let x = random(&[rows, classes], seed).mapv(|v| 4.0 * v);
        let labels: Vec<usize> = (0..rows).map(|r| (r * 7919 + 13) % classes).collect();
        let want = wgcnn::cpu::softmax_cross_entropy(&x.view(), &labels).unwrap();
        let got = wgcnn::ops::softmax_cross_entropy(&upload(&x), &labels).unwrap();
        let loss = got.loss.to_array().unwrap();
        assert!(
            max_abs_diff(&loss, &want.loss) < 1e-4 * want.loss[[0]].abs().max(1.0),
            "{classes} classes: {loss} vs {}",
            want.loss
        );
        let grad = got.grad_logits.to_array().unwrap();
        assert!(
            max_abs_diff(&grad, &want.grad_logits) < 1e-6,
            "{classes} classes"
        );
        assert_eq!(got.correct.to_array().unwrap(), want.correct, "{classes}");
    }
    // A row whose label is its maximum counts as correct on the wide path too.
    let mut x = random(&[1, 70_000], 3);
    x[[0, 69_999]] = 9.0;
    let got = wgcnn::ops::softmax_cross_entropy(&upload(&x), &[69_999]).unwrap();
    assert_eq!(got.correct.to_array().unwrap()[[0]], 1.0);

    let too_long = Tensor::full(gpu, &[1, 1_400_000], 0.5).unwrap();
    let err = wgcnn::ops::softmax_cross_entropy(&too_long, &[0])
        .unwrap_err()
        .to_string();
    assert!(err.contains("rows of 1400000 elements"), "{err}");
}
