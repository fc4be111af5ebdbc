//! Seeded weight initialisation. Each tensor draws from its own stream, seeded by the model
//! seed and the tensor's full name, so equal seeds give equal weights and adding a layer
//! leaves the other layers' initial weights unchanged.

use ndarray::ArrayD;

use crate::error::Result;
pub use crate::graph::InitRng;

/// How a layer's weights start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Init {
    /// He (Kaiming) uniform, bound `√(6 / fan_in)`, bias zero: for ReLU networks.
    #[default]
    He,
    /// Xavier (Glorot) uniform, bound `√(6 / (fan_in + fan_out))`, bias zero: for tanh/sigmoid.
    Xavier,
    /// PyTorch's default for Conv2d/Linear: weight and bias uniform in `±1/√fan_in`.
    PyTorch,
}

impl Init {
    /// Initial `(weight, bias)` for a layer with the given fan-in and fan-out.
    pub fn weight_and_bias(
        self,
        rng: &mut dyn FnMut(&'static str) -> InitRng,
        weight_shape: &[usize],
        bias_len: usize,
        (fan_in, fan_out): (usize, usize),
    ) -> Result<(ArrayD<f32>, ArrayD<f32>)> {
        let fan_in = fan_in as f64;
        let (weight_bound, bias_bound) = match self {
            Init::He => ((6.0 / fan_in).sqrt(), 0.0),
            Init::Xavier => ((6.0 / (fan_in + fan_out as f64)).sqrt(), 0.0),
            Init::PyTorch => (1.0 / fan_in.sqrt(), 1.0 / fan_in.sqrt()),
        };
        Ok((
            rng("weight").uniform(weight_shape, weight_bound as f32)?,
            rng("bias").uniform(&[bias_len], bias_bound as f32)?,
        ))
    }
}
