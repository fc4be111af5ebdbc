//! The integration tests, one binary: each module is what was once a test target of its
//! own. One binary links wgpu once instead of 36 times (CI builds the tests twice), and its
//! tests share the two context slots of `common` (and the kernels compiled on them) instead
//! of making their own per file. libtest starts tests in the order of their names, two at a
//! time: the tuner's, the longest (its trials, on fresh contexts), are in `autotune`, which
//! starts early, so that no long test is left running alone at the end. The targets that
//! must own their process stay apart:
//! tests/environment.rs sets environment variables that every context reads, and
//! tests/out_of_memory.rs runs itself under an address-space limit.

mod common;

mod absorb;
mod activation;
mod autotune;
mod builder;
mod checkpoint;
mod cifar;
#[cfg(feature = "image")]
mod classify;
mod conv2d;
mod data;
mod dataset;
mod dropout_normalize;
mod errors;
mod faults;
mod fold;
mod fuzz;
mod graph;
mod layers;
mod lenet;
mod linear_loss;
mod log_softmax;
mod matmul;
mod models;
mod norm;
mod optim;
mod pool2d;
mod pooled;
mod predict;
#[cfg(feature = "image")]
mod preprocess;
mod pth;
mod recording;
mod surface;
mod techniques;
mod tensor;
mod training_loop;
