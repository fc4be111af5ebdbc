//! Tensors: upload and readback, the buffer pool, the pipeline cache, and threads.

use crate::common;

use common::{gpu, random};
use ndarray::{Array3, ArrayD, IxDyn, s};
use wgcnn::ops::Matmul;
use wgcnn::{Gpu, Tensor};

#[test]
fn contiguous_and_strided_arrays_round_trip() {
    let Some(gpu) = gpu() else { return };
    let dense = random(&[3, 5, 7], 1);
    let back = Tensor::from_array(gpu, &dense).unwrap().to_array().unwrap();
    assert_eq!(back, dense);

    // A transposed view and a stepped slice are not contiguous: they must be gathered.
    let base = Array3::from_shape_fn((4, 6, 8), |(i, j, k)| (i * 100 + j * 10 + k) as f32);
    let transposed = base.view().permuted_axes([2, 0, 1]);
    let back = Tensor::from_array(gpu, &transposed)
        .unwrap()
        .to_array()
        .unwrap();
    assert_eq!(back, transposed.into_dyn());
    let stepped = base.slice(s![.., ..;2, 1..;3]);
    assert!(stepped.as_slice().is_none());
    let tensor = Tensor::from_array(gpu, &stepped).unwrap();
    assert_eq!(tensor.shape(), &[4, 3, 3]);
    assert_eq!(tensor.to_array().unwrap(), stepped.into_dyn());
}

#[test]
fn async_readback_and_reshape() {
    let Some(gpu) = gpu() else { return };
    let x = random(&[2, 6], 2);
    let t = Tensor::from_array(gpu, &x)
        .unwrap()
        .reshape(&[3, 4])
        .unwrap();
    let back = pollster::block_on(t.to_array_async()).unwrap();
    assert_eq!(back.shape(), &[3, 4]);
    assert_eq!(
        back.iter().copied().collect::<Vec<_>>(),
        x.iter().copied().collect::<Vec<_>>()
    );
    let err = t.reshape(&[5, 5]).unwrap_err();
    assert!(
        err.to_string().contains("cannot view [3, 4] as [5, 5]"),
        "{err}"
    );
}

#[test]
fn full_fills_every_element() {
    let Some(gpu) = gpu() else { return };
    let t = Tensor::full(gpu, &[3, 3], f32::NAN).unwrap();
    assert!(t.to_array().unwrap().iter().all(|v| v.is_nan()));
}

#[test]
fn the_pool_reuses_buffers_of_a_size_class() {
    // A private context, so that other tests do not disturb the counters.
    let Some(shared) = gpu() else { return };
    let _ = shared;
    let gpu = common::new_gpu();
    let data = ArrayD::from_elem(IxDyn(&[1000]), 1.5f32);
    let first = Tensor::from_array(&gpu, &data).unwrap();
    let after_first = gpu.pool_stats();
    assert_eq!(after_first.allocations, 1);
    assert!(after_first.live_bytes >= 4000);
    drop(first);
    assert_eq!(gpu.pool_stats().live_bytes, 0);
    assert!(gpu.pool_stats().cached_bytes >= 4000);
    for _ in 0..10 {
        // 990 floats fall in the same size class as 1000.
        let t = Tensor::from_array(&gpu, &data.slice(s![..990])).unwrap();
        assert_eq!(t.to_array().unwrap()[0], 1.5);
    }
    let stats = gpu.pool_stats();
    assert_eq!(stats.allocations, 1, "{stats:?}");
    assert_eq!(stats.reuses, 10, "{stats:?}");
    assert_eq!(stats.live_bytes, 0);
}

#[test]
fn pipelines_compile_once() {
    let Some(gpu) = gpu() else { return };
    let a = Tensor::from_array(gpu, &random(&[5, 6], 3)).unwrap();
    let b = Tensor::from_array(gpu, &random(&[6, 7], 4)).unwrap();
    Matmul::default().forward(&a, &b, None).unwrap();
    let compiled = gpu.pipelines_compiled();
    for _ in 0..3 {
        Matmul::default().forward(&a, &b, None).unwrap();
    }
    assert_eq!(gpu.pipelines_compiled(), compiled);
}

#[test]
fn one_gpu_is_shared_across_threads() {
    fn assert_send_sync<T: Send + Sync + Clone>() {}
    assert_send_sync::<Gpu>();
    let Some(gpu) = gpu() else { return };
    let handles: Vec<_> = (0..3)
        .map(|i| {
            let gpu = gpu.clone();
            std::thread::spawn(move || {
                let x = random(&[4, 4], 10 + i);
                let back = Tensor::from_array(&gpu, &x).unwrap().to_array().unwrap();
                assert_eq!(back, x);
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

#[test]
fn adapter_info_and_limits_are_the_adapters_own() {
    let Some(gpu) = gpu() else { return };
    assert!(!gpu.adapter_info().name.is_empty());
    // Both lavapipe and real GPUs allow more than WebGPU's 128 MiB default binding.
    assert!(
        gpu.limits().max_buffer_size >= 256 << 20,
        "{:?}",
        gpu.limits()
    );
    let async_gpu = pollster::block_on(Gpu::new_async()).unwrap();
    assert_eq!(async_gpu.adapter_info().name, gpu.adapter_info().name);
}
