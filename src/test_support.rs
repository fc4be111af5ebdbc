//! Helpers for the unit tests inside the crate (the integration tests have tests/suite/common).

use ndarray::{ArrayD, IxDyn};

use crate::gpu::{Gpu, GpuOptions, OperandReads};

/// Values in [-1, 1) from a cheap xorshift: reproducible per seed.
pub(crate) fn random(shape: &[usize], seed: u64) -> ArrayD<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    ArrayD::from_shape_fn(IxDyn(shape), |_| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    })
}

/// The largest absolute difference between `got` and `want`, element by element; infinite
/// where one is NaN (an output the kernel left poisoned, or a NaN it made) or where their
/// lengths differ, so that neither passes a tolerance.
pub(crate) fn max_abs_diff<'a>(
    got: impl IntoIterator<Item = &'a f32>,
    want: impl IntoIterator<Item = &'a f32>,
) -> f32 {
    let (mut got, mut want) = (got.into_iter(), want.into_iter());
    let mut most = 0.0f32;
    loop {
        match (got.next(), want.next()) {
            (Some(g), Some(w)) => {
                let d = (g - w).abs();
                most = if d.is_nan() {
                    f32::INFINITY
                } else {
                    most.max(d)
                };
            }
            (None, None) => return most,
            _ => return f32::INFINITY,
        }
    }
}

/// A context opened with `options`. A missing adapter fails the test unless
/// WGCNN_SKIP_GPU_TESTS is set (then `None`: the test skips, saying so).
pub(crate) fn gpu(options: GpuOptions) -> Option<Gpu> {
    // The fixed kernel order and no cache file, as the integration tests'.
    let options = GpuOptions {
        tuning: crate::gpu::Tuning::Fixed,
        tuning_cache: None,
        ..options
    };
    match Gpu::with_options(options) {
        Ok(gpu) => Some(gpu),
        Err(e) if std::env::var_os("WGCNN_SKIP_GPU_TESTS").is_some() => {
            eprintln!("skipping a GPU test on request: {e}");
            None
        }
        Err(e) => panic!("no GPU for the tests: {e}"),
    }
}

/// Runs `check` on a context reading kernel operands from storage buffers, then on one
/// reading them from textures, whatever the host's calibration would pick.
pub(crate) fn on_both_read_families(check: impl Fn(&Gpu)) {
    for reads in [OperandReads::Storage, OperandReads::Texture] {
        let options = GpuOptions {
            operand_reads: Some(reads),
            ..GpuOptions::from_env().unwrap()
        };
        let Some(gpu) = gpu(options) else {
            return;
        };
        check(&gpu);
    }
}
