//! A convolution is a filter slid over an image. This demo applies the course's filters with
//! wgcnn's GPU convolution: the 3×3 mean filter (smoothing) and the Sobel kernels (edges) on
//! the 6×6 step image, printed as the course shows them; then on an MNIST digit, or on any
//! PNG/JPEG given on the command line, writing each filtered image as a PNG.
//!
//! `cargo run --release --example filters -- [IMAGE] [--out DIR] [--json]`

use std::path::{Path, PathBuf};

use clap::Parser;

use ndarray::{Array2, array};
use wgcnn::ops::Conv2d;
use wgcnn::{Gpu, Tensor};

type Error = Box<dyn std::error::Error>;

/// The named 3×3 filters of the course.
fn filters() -> Vec<(&'static str, Array2<f32>)> {
    vec![
        ("mean", Array2::from_elem((3, 3), 1.0 / 9.0)),
        (
            "sobel_vertical",
            array![[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]],
        ),
        (
            "sobel_horizontal",
            array![[1.0, 2.0, 1.0], [0.0, 0.0, 0.0], [-1.0, -2.0, -1.0]],
        ),
    ]
}

/// One grey image through one filter on the GPU (no padding: the output is 2 smaller).
fn filter(gpu: &Gpu, image: &Array2<f32>, kernel: &Array2<f32>) -> Result<Array2<f32>, Error> {
    let (h, w) = image.dim();
    let x = Tensor::from_array(gpu, &image.view().into_shape_with_order((1, 1, h, w))?)?;
    let k = Tensor::from_array(gpu, &kernel.view().into_shape_with_order((1, 1, 3, 3))?)?;
    let y = Conv2d::default().forward(&x, &k, None)?.to_array()?;
    // Check against the CPU reference (the course's nested sums).
    let cpu = wgcnn::cpu::conv2d(
        &Conv2d::default(),
        &x.to_array()?.view(),
        &k.to_array()?.view(),
        None,
    )?;
    let worst = y
        .iter()
        .zip(&cpu)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    if worst > 1e-4 {
        return Err(format!("GPU and CPU disagree by {worst}").into());
    }
    Ok(y.into_shape_with_order((h - 2, w - 2))?)
}

/// A value as the course writes it: integers plain, thirds as fractions.
fn show(v: f32) -> String {
    let thirds = v * 3.0;
    if (v - v.round()).abs() < 1e-4 {
        format!("{}", v.round())
    } else if (thirds - thirds.round()).abs() < 1e-4 {
        format!("{}/3", thirds.round())
    } else {
        format!("{v:.3}")
    }
}

fn print_matrix(title: &str, m: &Array2<f32>) {
    println!("{title}");
    for row in m.rows() {
        let cells: Vec<String> = row.iter().map(|&v| format!("{:>6}", show(v))).collect();
        println!("  {}", cells.join(""));
    }
}

/// A grey image scaled to bytes: non-negative images by their maximum, signed ones (edges)
/// by their largest magnitude around mid-grey.
fn save_png(path: &Path, m: &Array2<f32>) -> Result<(), Error> {
    let (h, w) = m.dim();
    let top = m.iter().fold(0.0f32, |a, v| a.max(v.abs())).max(1e-6);
    let signed = m.iter().any(|&v| v < -1e-6);
    let bytes: Vec<u8> = m
        .iter()
        .map(|&v| {
            let unit = if signed { 0.5 + 0.5 * v / top } else { v / top };
            (unit.clamp(0.0, 1.0) * 255.0).round() as u8
        })
        .collect();
    image::GrayImage::from_raw(w as u32, h as u32, bytes)
        .ok_or("image size")?
        .save(path)?;
    Ok(())
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

/// The course's filters (3×3 mean, Sobel) on the 6×6 step image, checked GPU against CPU,
/// then applied to an MNIST digit or to the image given.
#[derive(Parser, Debug)]
struct Args {
    /// Where the filtered PNGs go.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/target/filters"))]
    out: PathBuf,
    /// One JSON line of results.
    #[arg(long)]
    json: bool,
    /// A PNG or JPEG to filter (default: the first MNIST test digit).
    image: Option<PathBuf>,
}

fn run() -> Result<(), Error> {
    let args = Args::parse();
    let (json, out_dir, input) = (args.json, args.out, args.image);
    let gpu = Gpu::new()?;

    // The 6×6 step image: three bright columns, then three dark ones.
    let step = Array2::from_shape_fn((6, 6), |(_, j)| if j < 3 { 1.0 } else { 0.0 });
    if !json {
        print_matrix("input (6×6 step image):", &step);
    }
    let mut figures = Vec::new();
    for (name, kernel) in filters().into_iter().take(2) {
        let y = filter(&gpu, &step, &kernel)?;
        if !json {
            print_matrix(&format!("\n{name} kernel:"), &kernel);
            print_matrix(&format!("{name} result (4×4):"), &y);
        }
        let row: Vec<String> = y.row(0).iter().map(|&v| format!("{v:.4}")).collect();
        figures.push(format!("\"{name}_row\":[{}]", row.join(",")));
    }

    // A real image: the given file, or the first MNIST test digit.
    let (label, image) = match &input {
        Some(path) => {
            let grey = image::open(path)?.to_luma8();
            let (w, h) = grey.dimensions();
            let pixels = grey.into_raw().into_iter().map(|b| f32::from(b) / 255.0);
            (
                path.display().to_string(),
                Array2::from_shape_vec((h as usize, w as usize), pixels.collect())?,
            )
        }
        None => {
            let data = wgcnn::data::read_idx_images(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/data/mnist/t10k-images-idx3-ubyte.gz"
            ))?;
            let pixels = data.image(0).iter().map(|&b| f32::from(b) / 255.0);
            (
                "MNIST test digit 0".to_string(),
                Array2::from_shape_vec((data.rows, data.cols), pixels.collect())?,
            )
        }
    };
    if image.dim().0 < 3 || image.dim().1 < 3 {
        return Err("the image must be at least 3×3 pixels".into());
    }
    std::fs::create_dir_all(&out_dir)?;
    save_png(&out_dir.join("input.png"), &image)?;
    let mut written = vec![out_dir.join("input.png")];
    for (name, kernel) in filters() {
        let y = filter(&gpu, &image, &kernel)?;
        let path = out_dir.join(format!("{name}.png"));
        save_png(&path, &y)?;
        written.push(path);
    }
    let names: Vec<String> = written
        .iter()
        .map(|p| format!("{:?}", p.display().to_string()))
        .collect();
    if json {
        println!(
            "{{{},\"image\":{label:?},\"size\":[{},{}],\"written\":[{}],\"device\":{:?}}}",
            figures.join(","),
            image.dim().0,
            image.dim().1,
            names.join(","),
            gpu.adapter_info().name
        );
    } else {
        println!(
            "\n{label} ({}×{}) filtered; wrote:",
            image.dim().0,
            image.dim().1
        );
        for path in &written {
            println!("  {}", path.display());
        }
    }
    Ok(())
}
