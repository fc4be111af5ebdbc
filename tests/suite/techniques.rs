//! Transfer learning (load by name, freeze, replace the head), knowledge distillation (the
//! fused loss against its CPU reference and finite differences), adversarial examples
//! (FGSM/PGD kernels, input gradients, adversarial training).

use crate::common;

use common::{Scratch, gpu, max_abs_diff, random};
use ndarray::ArrayD;
use wgcnn::nn::{LeNetOptions, Linear, lenet5};
use wgcnn::ops::{Distillation, SignedStep};
use wgcnn::train::{Attack, Checkpoint, attack, cross_entropy, distillation_loss, train_step};
use wgcnn::{Device, Graph, Mode, Optimizer, Tensor, Value};

fn devices() -> Vec<Device> {
    let mut list = vec![Device::Cpu];
    if let Some(gpu) = gpu() {
        list.push(Device::Gpu(gpu.clone()));
    }
    list
}

fn labels(n: usize) -> Vec<usize> {
    (0..n).map(|i| (i * 7 + 3) % 10).collect()
}

#[test]
fn distillation_loss_matches_its_reference_and_finite_differences() {
    let spec = Distillation {
        alpha: 0.7,
        temperature: 3.0,
    };
    for (rows, seed) in [(1usize, 1u64), (5, 2), (67, 3)] {
        let s = random(&[rows, 10], seed).mapv(|v| 4.0 * v);
        let t = random(&[rows, 10], seed + 100).mapv(|v| 6.0 * v);
        let y = labels(rows);
        let cpu = spec.forward_cpu(&s.view(), &t.view(), &y).unwrap();
        // Finite differences of the reference loss (f64 inside, f32 logits).
        let h = 1e-2f32;
        for index in [0usize, 3, rows * 10 - 1] {
            let mut plus = s.clone();
            plus.as_slice_mut().unwrap()[index] += h;
            let mut minus = s.clone();
            minus.as_slice_mut().unwrap()[index] -= h;
            let lp = spec.forward_cpu(&plus.view(), &t.view(), &y).unwrap().loss[[0]];
            let lm = spec.forward_cpu(&minus.view(), &t.view(), &y).unwrap().loss[[0]];
            let numeric = (lp - lm) / (2.0 * h);
            let analytic = cpu.grad_logits.as_slice().unwrap()[index];
            assert!(
                (numeric - analytic).abs() < 1e-4 + 1e-2 * analytic.abs(),
                "rows {rows} [{index}]: {numeric} vs {analytic}"
            );
        }
        // α = 0 is plain cross-entropy; identical teacher and student leave only that term.
        let plain = Distillation {
            alpha: 0.0,
            temperature: 2.0,
        }
        .forward_cpu(&s.view(), &t.view(), &y)
        .unwrap();
        let ce = wgcnn::cpu::softmax_cross_entropy(&s.view(), &y).unwrap();
        assert!((plain.loss[[0]] - ce.loss[[0]]).abs() < 1e-5);
        let same = spec.forward_cpu(&s.view(), &s.view(), &y).unwrap();
        assert!((same.loss[[0]] - 0.3 * ce.loss[[0]]).abs() < 1e-5);

        let Some(gpu) = gpu() else { continue };
        let (ts, tt) = (
            Tensor::from_array(gpu, &s).unwrap(),
            Tensor::from_array(gpu, &t).unwrap(),
        );
        let out = spec.forward(&ts, &tt, &y).unwrap();
        let loss = out.loss.to_array().unwrap()[[0]];
        assert!((loss - cpu.loss[[0]]).abs() < 1e-5 * cpu.loss[[0]].abs().max(1.0));
        assert!(max_abs_diff(&out.grad_logits.to_array().unwrap(), &cpu.grad_logits) < 1e-6);
        assert_eq!(out.correct.to_array().unwrap(), cpu.correct);
    }
    let bad = Distillation {
        alpha: 1.5,
        temperature: 1.0,
    };
    let s = random(&[2, 3], 1);
    assert!(bad.forward_cpu(&s.view(), &s.view(), &[0, 1]).is_err());
    let narrow = random(&[2, 4], 1);
    assert!(
        spec.forward_cpu(&s.view(), &narrow.view(), &[0, 1])
            .is_err()
    );
}

#[test]
fn fgsm_moves_every_pixel_by_exactly_epsilon_unless_clamped() {
    let x = random(&[2, 1, 9, 7], 5).mapv(|v| v * 1.2);
    let mut g = random(&[2, 1, 9, 7], 6);
    g.as_slice_mut().unwrap()[4] = 0.0;
    let step = SignedStep::fgsm(0.25, (-1.0, 1.0));
    let cpu = step.apply_cpu(&x.view(), &g.view(), &x.view()).unwrap();
    for ((&a, &b), &d) in x.iter().zip(&cpu).zip(&g) {
        let want = (a + 0.25 * d.signum() * f32::from(u8::from(d != 0.0))).clamp(-1.0, 1.0);
        assert_eq!(b, want);
        if (-0.75..=0.75).contains(&a) && d != 0.0 {
            assert!(((b - a).abs() - 0.25).abs() < 1e-6);
        }
    }
    assert_eq!(
        cpu.as_slice().unwrap()[4],
        x.as_slice().unwrap()[4].clamp(-1.0, 1.0)
    );
    // A PGD step stays within ε of the origin.
    let origin = x.mapv(|v| v * 0.5);
    let pgd = SignedStep {
        step: 0.3,
        radius: 0.1,
        range: (-1.0, 1.0),
    };
    let moved = pgd.apply_cpu(&x.view(), &g.view(), &origin.view()).unwrap();
    assert!(
        moved
            .iter()
            .zip(&origin)
            .all(|(m, o)| (m - o).abs() <= 0.1 + 1e-6)
    );
    let Some(gpu) = gpu() else { return };
    let up = |a: &ArrayD<f32>| Tensor::from_array(gpu, a).unwrap();
    let on_gpu = step.apply(&up(&x), &up(&g), &up(&x)).unwrap();
    assert_eq!(on_gpu.to_array().unwrap(), cpu);
    let on_gpu = pgd.apply(&up(&x), &up(&g), &up(&origin)).unwrap();
    assert_eq!(on_gpu.to_array().unwrap(), moved);
}

fn trained_lenet(device: &Device, steps: usize) -> Graph {
    let data =
        wgcnn::data::Mnist::load(concat!(env!("CARGO_MANIFEST_DIR"), "/data/mnist")).unwrap();
    let mut model = lenet5(LeNetOptions::default())
        .unwrap()
        .build(device.clone(), 3)
        .unwrap();
    let mut opt = model.optimizer(Optimizer::adam(2e-3)).unwrap();
    let normalize = wgcnn::Normalize::mnist();
    for step in 0..steps {
        let indices: Vec<usize> = (step * 32..step * 32 + 32).collect();
        let labels = wgcnn::train::label_batch(&data.train_labels, &indices).unwrap();
        train_step(
            &mut model,
            &mut opt,
            |d: &Device| wgcnn::train::image_batch(d, &data.train_images, &indices, &normalize),
            &labels,
        )
        .unwrap();
    }
    model
}

fn loss_of(model: &mut Graph, x: &Value, labels: &[usize]) -> f32 {
    let logits = model.forward(x.duplicate().unwrap(), Mode::Eval).unwrap();
    cross_entropy(logits, labels)
        .unwrap()
        .loss
        .to_array()
        .unwrap()[[0]]
}

#[test]
fn adversarial_examples_raise_the_loss_of_their_model_on_gpu_and_cpu() {
    let data =
        wgcnn::data::Mnist::load(concat!(env!("CARGO_MANIFEST_DIR"), "/data/mnist")).unwrap();
    let normalize = wgcnn::Normalize::mnist();
    let range = (-0.1307 / 0.3081, (1.0 - 0.1307) / 0.3081);
    let indices: Vec<usize> = (0..16).collect();
    let labels = wgcnn::train::label_batch(&data.test_labels, &indices).unwrap();
    let mut grads = Vec::new();
    for device in devices() {
        let mut model = trained_lenet(&device, 30);
        let x =
            wgcnn::train::image_batch(&device, &data.test_images, &indices, &normalize).unwrap();
        let clean = loss_of(&mut model, &x, &labels);
        let eps = 0.1 / 0.3081;
        let fgsm = attack(
            &mut model,
            &x,
            &labels,
            Attack::Fgsm { epsilon: eps },
            range,
        )
        .unwrap();
        let pgd = attack(
            &mut model,
            &x,
            &labels,
            Attack::Pgd {
                epsilon: eps,
                alpha: eps / 4.0,
                steps: 5,
            },
            range,
        )
        .unwrap();
        let (after_fgsm, after_pgd) = (
            loss_of(&mut model, &fgsm, &labels),
            loss_of(&mut model, &pgd, &labels),
        );
        assert!(
            after_fgsm > clean * 1.5 && after_pgd > after_fgsm,
            "{}: clean {clean}, FGSM {after_fgsm}, PGD {after_pgd}",
            device.name()
        );
        // Each pixel moved by at most ε and stayed in range.
        let (x, fgsm) = (x.to_array().unwrap(), fgsm.to_array().unwrap());
        assert!(x.iter().zip(&fgsm).all(|(a, b)| (a - b).abs() <= eps + 1e-5
            && *b >= range.0 - 1e-6
            && *b <= range.1 + 1e-6));
        // The attack touched no parameter gradient: training state is as it was.
        assert!(model.grads().iter().all(|(_, g)| g.is_some()));
        grads.push(
            wgcnn::train::input_gradient(&mut model, device.upload(x).unwrap(), &labels)
                .unwrap()
                .to_array()
                .unwrap(),
        );
    }
    if let [cpu, gpu] = &grads[..] {
        let scale = cpu.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        assert!(max_abs_diff(cpu, gpu) < 1e-3 * scale, "input gradients");
    }
}

#[test]
fn frozen_layers_stay_bit_identical_and_a_new_head_trains() {
    for device in devices() {
        let pretrained = trained_lenet(&device, 5);
        let checkpoint = pretrained.checkpoint().unwrap();
        let mut model = lenet5(LeNetOptions::default())
            .unwrap()
            .build(device.clone(), 77)
            .unwrap();
        model.replace("fc3", Linear::new(84, 5)).unwrap();
        let report = model.load_matching(&checkpoint).unwrap();
        assert_eq!(report.loaded.len(), 8, "{report}");
        assert_eq!(
            report.mismatched,
            vec![
                ("fc3.weight".to_string(), vec![10, 84], vec![5, 84]),
                ("fc3.bias".to_string(), vec![10], vec![5]),
            ],
            "{report}"
        );
        for name in ["conv1", "conv2", "fc1", "fc2"] {
            model.freeze(name, true).unwrap();
        }
        let before = model.checkpoint().unwrap();
        let mut opt = model.optimizer(Optimizer::adam(1e-2)).unwrap();
        let x = random(&[8, 1, 28, 28], 12);
        let y: Vec<usize> = (0..8).map(|i| i % 5).collect();
        for _ in 0..3 {
            train_step(&mut model, &mut opt, |d| d.upload(x.clone()), &y).unwrap();
        }
        let after = model.checkpoint().unwrap();
        for ((name, a), (_, b)) in before.tensors.iter().zip(&after.tensors) {
            let same = a.iter().zip(b).all(|(p, q)| p.to_bits() == q.to_bits());
            assert_eq!(
                same,
                !name.starts_with("fc3"),
                "{name} on {}",
                device.name()
            );
        }
        // Frozen layers got no gradients at all.
        let grads = model.grads();
        assert!(
            grads
                .iter()
                .all(|(n, g)| g.is_some() == n.starts_with("fc3"))
        );
    }
}

#[test]
fn a_pytorch_style_state_dict_loads_as_is() {
    // The golden's parameters were made by PyTorch (OIHW conv, [out, in] linear), under
    // PyTorch's names: saved as safetensors, they load into lenet5 unchanged.
    let tensors = common::golden::lenet_init_state();
    let model = lenet5(LeNetOptions::default())
        .unwrap()
        .build(Device::Cpu, 1)
        .unwrap();
    let scratch = Scratch::new("sd");
    let path = scratch.join("torch.safetensors");
    Checkpoint::new(tensors.clone())
        .unwrap()
        .save(&path)
        .unwrap();
    let mut model = model;
    model.load(&path).unwrap();
    let loaded = model.checkpoint().unwrap();
    for (name, t) in &tensors {
        assert_eq!(loaded.get(name).unwrap(), t);
    }
}

#[test]
fn distill_step_trains_the_student_and_leaves_the_teacher_alone() {
    for device in devices() {
        let mut teacher = trained_lenet(&device, 3);
        let before = teacher.checkpoint().unwrap();
        let mut student = wgcnn::nn::Sequential::new()
            .add("flatten", wgcnn::nn::Flatten)
            .add("fc", Linear::new(784, 10))
            .build(device.clone(), 5)
            .unwrap();
        let mut opt = student.optimizer(Optimizer::adam(1e-3)).unwrap();
        let x = random(&[16, 1, 28, 28], 3);
        let y = labels(16);
        let spec = Distillation {
            alpha: 0.5,
            temperature: 4.0,
        };
        let mut losses = Vec::new();
        for _ in 0..10 {
            let out = wgcnn::train::distill_step(
                &mut student,
                &mut teacher,
                &mut opt,
                |d| d.upload(x.clone()),
                &y,
                spec,
            )
            .unwrap();
            losses.push(out.loss.to_array().unwrap()[[0]]);
        }
        assert!(losses[9] < losses[0], "{losses:?}");
        assert_eq!(
            teacher.checkpoint().unwrap(),
            before,
            "the teacher is untouched"
        );
        // The step's loss is the distillation loss of the two models' outputs.
        let s = student
            .forward(device.upload(x.clone()).unwrap(), Mode::Eval)
            .unwrap()
            .duplicate()
            .unwrap();
        let t = teacher
            .forward(device.upload(x.clone()).unwrap(), Mode::Eval)
            .unwrap();
        let loss = distillation_loss(spec, &s, t, &y).unwrap().loss;
        assert!(loss.to_array().unwrap()[[0]].is_finite());
    }
}

#[test]
fn a_generator_learns_to_fool_a_fixed_discriminator() {
    use wgcnn::nn::{Flatten, Sequential};
    use wgcnn::train::{discriminator_step, generator_step};
    let data =
        wgcnn::data::Mnist::load(concat!(env!("CARGO_MANIFEST_DIR"), "/data/mnist")).unwrap();
    let unit = wgcnn::Normalize::new(&[0.5], &[0.5]).unwrap();
    for device in devices() {
        let leaky = wgcnn::Activation::LeakyRelu(0.2);
        let mut generator = Sequential::new()
            .add("fc1", Linear::new(8, 32).activation(leaky))
            .add(
                "fc2",
                Linear::new(32, 784).activation(wgcnn::Activation::Tanh),
            )
            .build(device.clone(), 1)
            .unwrap();
        let mut discriminator = Sequential::new()
            .add("flatten", Flatten)
            .add("fc1", Linear::new(784, 32).activation(leaky))
            .add("fc2", Linear::new(32, 2))
            .build(device.clone(), 2)
            .unwrap();
        let mut opt_d = discriminator.optimizer(Optimizer::adam(1e-3)).unwrap();
        let mut opt_g = generator.optimizer(Optimizer::adam(1e-2)).unwrap();
        let noise = |step: u64| move |d: &Device| d.upload(random(&[16, 8], 1000 + step));
        // The discriminator learns to reject the untrained generator's samples.
        for step in 0..20 {
            let real: Vec<usize> = (step * 16..step * 16 + 16).collect();
            discriminator_step(
                &mut discriminator,
                &mut generator,
                &mut opt_d,
                |d| wgcnn::train::image_batch(d, &data.train_images, &real, &unit),
                noise(step as u64),
            )
            .unwrap();
        }
        let frozen = discriminator.checkpoint().unwrap();
        let mut fooled = Vec::new();
        for step in 0..30 {
            let out = generator_step(
                &mut generator,
                &mut discriminator,
                &mut opt_g,
                noise(100 + step),
                1,
            )
            .unwrap();
            fooled.push(out.correct.to_array().unwrap()[[0]]);
        }
        assert_eq!(
            discriminator.checkpoint().unwrap(),
            frozen,
            "generator steps leave the discriminator as it was"
        );
        let early: f32 = fooled[..5].iter().sum();
        let late: f32 = fooled[25..].iter().sum();
        assert!(late > early, "{}: fooled {fooled:?}", device.name());
    }
}

/// Rows too long for one invocation's loop bound (the distillation kernel reads a row seven
/// times) run one workgroup per row: 3,000 and 70,000 classes against the CPU reference.
#[test]
fn distillation_over_many_classes_matches_the_cpu() {
    let Some(gpu) = gpu() else { return };
    let spec = Distillation {
        alpha: 0.6,
        temperature: 2.0,
    };
    for (rows, classes) in [(2usize, 3_000usize), (2, 70_000)] {
        let s = random(&[rows, classes], 11).mapv(|v| 4.0 * v);
        let t = random(&[rows, classes], 12).mapv(|v| 4.0 * v);
        let y: Vec<usize> = (0..rows).map(|r| (r * 977 + 5) % classes).collect();
        let cpu = spec.forward_cpu(&s.view(), &t.view(), &y).unwrap();
        let upload = |a: &ArrayD<f32>| Tensor::from_array(gpu, a).unwrap();
        let out = spec.forward(&upload(&s), &upload(&t), &y).unwrap();
        let loss = out.loss.to_array().unwrap();
        assert!(
            max_abs_diff(&loss, &cpu.loss) < 1e-4 * cpu.loss[[0]].abs().max(1.0),
            "{classes}: {loss} vs {}",
            cpu.loss
        );
        let grad = out.grad_logits.to_array().unwrap();
        assert!(max_abs_diff(&grad, &cpu.grad_logits) < 1e-6, "{classes}");
        assert_eq!(out.correct.to_array().unwrap(), cpu.correct, "{classes}");
    }
}
