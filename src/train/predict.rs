//! Inference: logits and class predictions of a batch in evaluation mode, on the model's
//! device, in chunks so that any batch size fits the device's buffers.

use ndarray::{Array2, ArrayD, Axis, Ix2};

use crate::error::{Error, Result};
use crate::graph::{Graph, Mode};

/// Images per forward pass in [`Graph::logits`] and [`Graph::predict`].
const PREDICT_CHUNK: usize = 256;

/// The classes a model predicts for a batch, with the softmax probabilities behind them.
#[derive(Clone, Debug, PartialEq)]
pub struct Predictions {
    /// Per image, the class with the largest logit (the first one on ties).
    pub classes: Vec<usize>,
    /// Per image, the probability of every class: `[N, K]`, rows summing to 1.
    pub probabilities: Array2<f32>,
}

impl Predictions {
    /// The probability of image `i`'s predicted class, if there is an image `i`.
    pub fn confidence(&self, i: usize) -> Option<f32> {
        let class = *self.classes.get(i)?;
        Some(self.probabilities[[i, class]])
    }
}

impl Graph {
    /// The model's outputs `[N, K]` for `input` (`[N, …]`, already normalised as in
    /// training) in evaluation mode: no dropout, batch norm on its running statistics.
    /// Batches of any size run in chunks of 256 images.
    pub fn logits(&mut self, input: &ArrayD<f32>) -> Result<Array2<f32>> {
        let images = input.shape().first().copied().unwrap_or(0);
        if input.ndim() < 2 || images == 0 {
            return Err(Error::InvalidArgument {
                op: "logits",
                detail: format!(
                    "the input is {:?}; give a batch [N, …] of at least one image",
                    input.shape()
                ),
            });
        }
        // NaN would spread to every logit of its image and come out as class 0 with
        // probability NaN: refuse it, naming the images.
        let non_finite: Vec<usize> = input
            .axis_iter(Axis(0))
            .enumerate()
            .filter(|(_, image)| image.iter().any(|v| !v.is_finite()))
            .map(|(i, _)| i)
            .collect();
        if !non_finite.is_empty() {
            let shown: Vec<String> = non_finite.iter().take(10).map(usize::to_string).collect();
            let more = if non_finite.len() > 10 { ", …" } else { "" };
            return Err(Error::InvalidArgument {
                op: "logits",
                detail: format!(
                    "{} of {images} images hold NaN or infinity (images {}{more}); clean or \
                     drop them before predicting",
                    non_finite.len(),
                    shown.join(", ")
                ),
            });
        }
        let mut chunks = Vec::new();
        for start in (0..images).step_by(PREDICT_CHUNK) {
            let end = (start + PREDICT_CHUNK).min(images);
            let chunk = input.slice_axis(Axis(0), (start..end).into()).to_owned();
            let x = self.device().upload(chunk)?;
            let y = self.forward(x, Mode::Eval)?.to_array()?;
            let shape = y.shape().to_vec();
            let y = y
                .into_dimensionality::<Ix2>()
                .map_err(|_| Error::ShapeMismatch {
                    op: "logits",
                    shapes: vec![shape],
                    detail: "the model's output is not [N, K]: end it with a linear layer".into(),
                })?;
            chunks.push(y);
        }
        let views: Vec<_> = chunks.iter().map(|c| c.view()).collect();
        ndarray::concatenate(Axis(0), &views).map_err(|e| Error::ShapeMismatch {
            op: "logits",
            shapes: Vec::new(),
            detail: e.to_string(),
        })
    }

    /// Class predictions for `input` (as for [`Graph::logits`]): per image the most
    /// probable class and the softmax probabilities of all classes.
    pub fn predict(&mut self, input: &ArrayD<f32>) -> Result<Predictions> {
        let logits = self.logits(input)?;
        let mut probabilities = logits.clone();
        let mut classes = Vec::with_capacity(logits.nrows());
        for mut row in probabilities.rows_mut() {
            let (class, top) =
                row.iter()
                    .enumerate()
                    .fold((0, f32::NEG_INFINITY), |best, (k, &v)| {
                        if v > best.1 { (k, v) } else { best }
                    });
            classes.push(class);
            // Stable softmax in f64: subtract the largest logit first.
            let exps: Vec<f64> = row.iter().map(|&v| f64::from(v - top).exp()).collect();
            let sum: f64 = exps.iter().sum();
            for (p, e) in row.iter_mut().zip(exps) {
                *p = (e / sum) as f32;
            }
        }
        Ok(Predictions {
            classes,
            probabilities,
        })
    }
}
