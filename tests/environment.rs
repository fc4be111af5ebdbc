//! The variables that pick a backend and adapter and the kernel tuning (its mode, cache and budget): a value not
//! understood is an error that lists the accepted ones. One test in its own binary, since it changes the environment.

use wgcnn::tuning::{KernelFamily, Tuning};
use wgcnn::{Gpu, GpuOptions};

fn with_var(name: &str, value: &str) -> String {
    // SAFETY: this binary's only test; no other thread reads the environment meanwhile.
    unsafe { std::env::set_var(name, value) };
    let options = GpuOptions::from_env().err().map(|e| e.to_string());
    let gpu = Gpu::new().err().map(|e| e.to_string());
    // SAFETY: as above.
    unsafe { std::env::remove_var(name) };
    assert_eq!(options, gpu, "Gpu::new reads the same variables");
    options.unwrap_or_default()
}

#[test]
fn unknown_or_unbuilt_backends_and_preferences_are_errors() {
    let err = with_var("WGPU_BACKEND", "bogus");
    assert!(err.contains("unknown backend \"bogus\""), "{err}");
    assert!(
        err.contains("vulkan (vk), metal (mtl), dx12 (d3d12), gl (gles, opengl)"),
        "{err}"
    );
    // GL is a real wgpu backend, but not built into wgcnn: say so, not "no adapter".
    let err = with_var("WGPU_BACKEND", "gl");
    assert!(
        err.contains("the gl backend is not built into wgcnn"),
        "{err}"
    );
    let err = with_var("WGPU_BACKEND", "vulkan, bogus");
    assert!(err.contains("unknown backend \"bogus\""), "{err}");
    let err = with_var("WGPU_POWER_PREF", "bogus");
    assert!(
        err.contains("unknown preference \"bogus\"; accepted: low, high, none"),
        "{err}"
    );
    let err = with_var("WGCNN_TUNING", "sometimes");
    assert!(
        err.contains("unknown tuning \"sometimes\"; accepted: measure"),
        "{err}"
    );
    for (value, tuning) in [("off", Tuning::Fixed), (" Measure ", Tuning::Measure)] {
        // SAFETY: as above.
        unsafe { std::env::set_var("WGCNN_TUNING", value) };
        assert_eq!(GpuOptions::from_env().unwrap().tuning, tuning, "{value}");
        unsafe { std::env::remove_var("WGCNN_TUNING") };
    }
    let err = with_var("WGCNN_KERNELS", "fastest");
    assert!(
        err.contains("unknown kernel family \"fastest\"; accepted: auto"),
        "{err}"
    );
    for (value, family) in [
        ("portable", KernelFamily::Portable),
        (" CPU ", KernelFamily::CpuAdapter),
        ("auto", KernelFamily::Auto),
    ] {
        // SAFETY: as above.
        unsafe { std::env::set_var("WGCNN_KERNELS", value) };
        let options = GpuOptions::from_env().unwrap();
        assert_eq!(options.kernel_family, family, "{value}");
        unsafe { std::env::remove_var("WGCNN_KERNELS") };
    }
    let err = with_var("WGCNN_RUNTIME_CHECKS", "maybe");
    assert!(
        err.contains("unknown value \"maybe\"; accepted: on"),
        "{err}"
    );
    for (value, checks) in [("on", true), (" OFF ", false), ("1", true)] {
        // SAFETY: as above.
        unsafe { std::env::set_var("WGCNN_RUNTIME_CHECKS", value) };
        let options = GpuOptions::from_env().unwrap();
        assert_eq!(options.runtime_checks, checks, "{value}");
        unsafe { std::env::remove_var("WGCNN_RUNTIME_CHECKS") };
    }
    assert!(!GpuOptions::default().runtime_checks);
    for (value, file) in [("none", None), ("/tmp/t.tsv", Some("/tmp/t.tsv".into()))] {
        // SAFETY: as above.
        unsafe { std::env::set_var("WGCNN_TUNING_CACHE", value) };
        assert_eq!(
            GpuOptions::from_env().unwrap().tuning_cache,
            file,
            "{value}"
        );
        unsafe { std::env::remove_var("WGCNN_TUNING_CACHE") };
    }
    for bad in ["-1", "soon", "NaN", "1e400"] {
        let err = with_var("WGCNN_TUNING_BUDGET", bad);
        assert!(
            err.contains(&format!("unknown budget {bad:?}; accepted: seconds")),
            "{err}"
        );
    }
    for (value, seconds) in [("0", 0.0), (" 2.5 ", 2.5), ("600", 600.0)] {
        // SAFETY: as above.
        unsafe { std::env::set_var("WGCNN_TUNING_BUDGET", value) };
        let budget = GpuOptions::from_env().unwrap().tuning_budget;
        assert_eq!(budget.as_secs_f64(), seconds, "{value}");
        unsafe { std::env::remove_var("WGCNN_TUNING_BUDGET") };
    }
    for fine in [
        ("WGPU_BACKEND", "Vulkan"),
        ("WGPU_POWER_PREF", "low"),
        ("WGPU_BACKEND", " "),
    ] {
        // SAFETY: as above.
        unsafe { std::env::set_var(fine.0, fine.1) };
        assert!(GpuOptions::from_env().is_ok(), "{fine:?}");
        unsafe { std::env::remove_var(fine.0) };
    }
}
