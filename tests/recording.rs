//! Recorded steps: many ops, one submit, identical results, bounded memory.

mod common;

use common::{gpu, random};
use wgcnn::{Activation, Conv2d, Gpu, Pool2d, Tensor};

/// conv → relu → max pool, then the backward chain: 20-odd kernels and copies.
fn step(x: &Tensor, w: &Tensor, b: &Tensor) -> wgcnn::Result<(Tensor, Tensor)> {
    let conv = Conv2d::default();
    let pool = Pool2d::max((2, 2));
    let c = conv.forward(x, w, Some(b))?;
    let r = Activation::Relu.forward(&c)?;
    let p = pool.forward(&r)?;
    let dr = pool.backward(r.shape(), &p.y, p.argmax.as_ref())?;
    let dc = Activation::Relu.backward(&c, &r, &dr)?;
    let g = conv.backward(x, w, &dc)?;
    Ok((p.y, g.weight))
}

#[test]
fn a_recorded_step_is_one_submit_with_the_same_results() {
    let Some(_) = gpu() else { return };
    let gpu = Gpu::new().unwrap();
    let up = |a: &ndarray::ArrayD<f32>| Tensor::from_array(&gpu, a).unwrap();
    let (x, w, b) = (
        up(&random(&[4, 2, 12, 12], 1)),
        up(&random(&[3, 2, 3, 3], 2)),
        up(&random(&[3], 3)),
    );
    let (y_plain, dw_plain) = step(&x, &w, &b).unwrap();
    let before = gpu.submissions();
    let (y, dw) = gpu.record(|| step(&x, &w, &b)).unwrap();
    assert_eq!(
        gpu.submissions(),
        before + 1,
        "the whole step is one submit"
    );
    assert_eq!(y.to_array().unwrap(), y_plain.to_array().unwrap());
    assert_eq!(dw.to_array().unwrap(), dw_plain.to_array().unwrap());
}

#[test]
fn readback_inside_a_recording_sees_the_recorded_work() {
    let Some(_) = gpu() else { return };
    // Contexts of their own: a recording captures every op on its Gpu, other tests' too.
    let gpu = &Gpu::new().unwrap();
    let x = random(&[2, 3], 4);
    let values = gpu
        .record(|| {
            let y = Activation::Relu.forward(&Tensor::from_array(gpu, &x)?)?;
            y.to_array()
        })
        .unwrap();
    assert_eq!(values, x.mapv(|v| v.max(0.0)));
}

#[test]
fn memory_stays_flat_over_many_recorded_steps() {
    let Some(_) = gpu() else { return };
    let gpu = Gpu::new().unwrap();
    let up = |a: &ndarray::ArrayD<f32>| Tensor::from_array(&gpu, a).unwrap();
    let (x, w, b) = (
        up(&random(&[2, 2, 10, 10], 5)),
        up(&random(&[4, 2, 3, 3], 6)),
        up(&random(&[4], 7)),
    );
    let run = || gpu.record(|| step(&x, &w, &b).map(drop)).unwrap();
    run();
    run();
    let warm = gpu.pool_stats();
    for _ in 0..50 {
        run();
    }
    let after = gpu.pool_stats();
    assert_eq!(
        after.allocations, warm.allocations,
        "no new buffers after warm-up: {warm:?} → {after:?}"
    );
    assert_eq!(after.live_bytes, warm.live_bytes);
    assert!(after.reuses > warm.reuses);
}

#[test]
fn recordings_do_not_nest() {
    let Some(_) = gpu() else { return };
    let gpu = &Gpu::new().unwrap();
    let err = gpu.record(|| gpu.record(|| Ok(()))).unwrap_err();
    assert!(err.to_string().contains("recordings do not nest"), "{err}");
    // The failed inner call leaves the outer one usable, and nothing stays recording.
    gpu.record(|| Ok(())).unwrap();
}
