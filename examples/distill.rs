//! Knowledge distillation: a small CNN learns from a larger one's softened outputs.
//!
//! A teacher (LeNet-5, 44k parameters) trains on MNIST. Then a student with about a tenth of
//! its parameters trains on a reduced training set twice, from the same initial weights:
//! once on the labels alone, once on `α·T²·KL(teacher_T ‖ student_T) + (1-α)·CE`, the
//! teacher running forward (eval mode, on the GPU, nothing read back) inside each step.
//!
//! `cargo run --release --example distill -- [--teacher-images 30000] [--student-images 2000]
//!     [--epochs 10] [--temperature 4] [--alpha 0.9] [--device gpu|cpu] [--data DIR] [--json]`

mod common;

use clap::Parser;
use common::{CommonArgs, accuracy, fit, subset};
use wgcnn::data::shuffled_indices;
use wgcnn::nn::{Conv2d, Flatten, Init, LeNetOptions, Linear, Sequential, lenet5, max_pool2d};
use wgcnn::ops::Distillation;
use wgcnn::train::{distill_step, image_batch, label_batch};
use wgcnn::{Activation, Device, Graph, Normalize, Optimizer};

/// conv 5×5 (c1) → pool → conv 5×5 (c2) → pool → hidden → 10, ReLUs fused.
fn cnn(
    device: &Device,
    (c1, c2, hidden): (usize, usize, usize),
    seed: u64,
) -> wgcnn::Result<Graph> {
    let relu = Activation::Relu;
    Sequential::new()
        .add("conv1", Conv2d::new(1, c1, (5, 5)).activation(relu))
        .add("pool1", max_pool2d(2))
        .add("conv2", Conv2d::new(c1, c2, (5, 5)).activation(relu))
        .add("pool2", max_pool2d(2))
        .add("flatten", Flatten)
        .add("fc1", Linear::new(c2 * 16, hidden).activation(relu))
        .add("fc2", Linear::new(hidden, 10))
        .build(device.clone(), seed)
}

/// Knowledge distillation: a small student learns from a LeNet-5 teacher's softened outputs.
#[derive(Parser, Debug)]
struct Args {
    /// Training images for the teacher.
    #[arg(long, default_value_t = 30_000)]
    teacher_images: usize,
    /// Training images for the students.
    #[arg(long, default_value_t = 2_000)]
    student_images: usize,
    /// Epochs for each model.
    #[arg(long, default_value_t = 10)]
    epochs: usize,
    /// Weight of the teacher's soft targets (1 − α on the labels).
    #[arg(long, default_value_t = 0.9)]
    alpha: f32,
    /// Softmax temperature of the soft targets.
    #[arg(long, default_value_t = 4.0)]
    temperature: f32,
    /// One JSON line of results instead of the report.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    common: CommonArgs,
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let json = args.json;
    let teacher_images = args.teacher_images;
    let student_images = args.student_images;
    let epochs = args.epochs;
    let spec = Distillation {
        alpha: args.alpha,
        temperature: args.temperature,
    };
    let device = common::device(&args.common)?;
    let data = common::mnist(&args.common)?;
    let say = |line: String| {
        if !json {
            println!("{line}")
        }
    };
    let test = (&data.test_images, &data.test_labels[..]);

    let (teacher_set, teacher_labels) = subset(
        &data.train_images,
        &data.train_labels,
        |_| true,
        teacher_images / 10,
        |d| d,
    );
    // The teacher: LeNet-5 as the MNIST example trains it.
    let options = LeNetOptions {
        init: Init::PyTorch,
        ..LeNetOptions::default()
    };
    let mut teacher = lenet5(options)?.build(device.clone(), 1)?;
    let mut opt = teacher.optimizer(Optimizer::adam(6e-3))?;
    let seconds = fit(
        &mut teacher,
        &mut opt,
        &teacher_set,
        &teacher_labels,
        6e-3,
        1,
        64,
        1,
    )?;
    let teacher_accuracy = accuracy(&mut teacher, test.0, test.1)?;
    say(format!(
        "teacher: {} parameters, {} images, {seconds:.1} s: {:.2}%",
        teacher.parameter_count(),
        teacher_set.count,
        100.0 * teacher_accuracy
    ));

    let (small, small_labels) = subset(
        &data.train_images,
        &data.train_labels,
        |_| true,
        student_images / 10,
        |d| d,
    );
    let shape = (4, 8, 24);
    let lr = 2e-3;
    let mut plain = cnn(&device, shape, 7)?;
    let mut opt = plain.optimizer(Optimizer::adam(lr))?;
    let plain_seconds = fit(
        &mut plain,
        &mut opt,
        &small,
        &small_labels,
        lr,
        epochs,
        32,
        5,
    )?;
    let plain_accuracy = accuracy(&mut plain, test.0, test.1)?;

    let mut student = cnn(&device, shape, 7)?;
    let mut opt = student.optimizer(Optimizer::adam(lr))?;
    let normalize = Normalize::mnist();
    let start = std::time::Instant::now();
    let total = epochs * small.count.div_ceil(32);
    let mut step = 0;
    for epoch in 0..epochs {
        for batch in shuffled_indices(small.count, 5, epoch as u64).chunks(32) {
            opt.set_lr(common::cosine(lr, step, total))?;
            step += 1;
            distill_step(
                &mut student,
                &mut teacher,
                &mut opt,
                |d| image_batch(d, &small, batch, &normalize),
                &label_batch(&small_labels, batch)?,
                spec,
            )?;
        }
    }
    if let Device::Gpu(gpu) = &device {
        gpu.synchronize()?;
    }
    let distill_seconds = start.elapsed().as_secs_f64();
    let distilled_accuracy = accuracy(&mut student, test.0, test.1)?;

    say(format!(
        "students: {} parameters, {} images, {epochs} epochs, T = {}, α = {}",
        student.parameter_count(),
        small.count,
        spec.temperature,
        spec.alpha
    ));
    say(format!(
        "  labels only:   {:.2}%  ({plain_seconds:.1} s)",
        100.0 * plain_accuracy
    ));
    say(format!(
        "  distilled:     {:.2}%  ({distill_seconds:.1} s, teacher forward included)",
        100.0 * distilled_accuracy
    ));
    if json {
        println!(
            "{{\"teacher_accuracy\":{teacher_accuracy:.4},\"student_distilled_accuracy\":{distilled_accuracy:.4},\"student_plain_accuracy\":{plain_accuracy:.4},\"teacher_params\":{},\"student_params\":{},\"student_images\":{},\"epochs\":{epochs},\"temperature\":{},\"alpha\":{},\"device\":{:?}}}",
            teacher.parameter_count(),
            student.parameter_count(),
            small.count,
            spec.temperature,
            spec.alpha,
            device.name()
        );
    }
    Ok(())
}
