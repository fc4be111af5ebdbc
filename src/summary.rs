//! A model's summary: each layer with its output shape and parameter count, and the totals
//! (like Keras' `summary()` or torchsummary).

use std::fmt;

use ndarray::{ArrayD, IxDyn};

use crate::error::{Error, Result};
use crate::graph::{Graph, LayerRow, Mode};

/// The layers of a model with their output shapes and parameters; `Display` prints the table.
#[derive(Debug)]
pub struct Summary {
    rows: Vec<LayerRow>,
    input: Option<Vec<usize>>,
}

impl Summary {
    /// Trainable parameters in all layers.
    pub fn trainable(&self) -> usize {
        self.rows.iter().map(|r| r.trainable).sum()
    }

    /// Other state: running statistics and frozen parameters.
    pub fn non_trainable(&self) -> usize {
        self.rows.iter().map(|r| r.other).sum()
    }

    /// Each layer's output shape (`None` where the summary ran no forward pass).
    pub fn output_shapes(&self) -> Vec<Option<&[usize]>> {
        self.rows.iter().map(|r| r.output.as_deref()).collect()
    }
}

impl Graph {
    /// Runs one forward pass in evaluation mode on zeros of `input` shape (batch first; a
    /// batch of 1 is enough) and lists every layer's output shape and parameters.
    /// A shape the model cannot take is an error naming the layer.
    pub fn summary(&mut self, input: &[usize]) -> Result<Summary> {
        if input.is_empty() || input.contains(&0) {
            return Err(Error::InvalidArgument {
                op: "summary",
                detail: format!("input shape {input:?}: give a batch shape such as [1, 1, 28, 28]"),
            });
        }
        let x = self.device().upload(ArrayD::zeros(IxDyn(input)))?;
        // EvalWithGrad keeps every value, so each layer's output shape can be read.
        self.forward(x, Mode::EvalWithGrad)?;
        Ok(Summary {
            rows: self.layer_rows(),
            input: Some(input.to_vec()),
        })
    }
}

/// The layers and parameters, with the output shapes of the last forward pass where known.
impl fmt::Display for Graph {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        Summary {
            rows: self.layer_rows(),
            input: None,
        }
        .fmt(f)
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shape =
            |s: &Option<Vec<usize>>| s.as_ref().map_or("?".to_string(), |s| format!("{s:?}"));
        let layers: Vec<String> = self
            .rows
            .iter()
            .map(|r| format!("{} ({})", r.name, r.layer))
            .collect();
        let width = layers
            .iter()
            .map(|l| l.chars().count())
            .max()
            .unwrap_or(0)
            .max(12);
        let rule = "─".repeat(width + 36);
        writeln!(
            f,
            "{:<width$}  {:<20}  {:>12}",
            "layer", "output shape", "parameters"
        )?;
        writeln!(f, "{rule}")?;
        if let Some(input) = &self.input {
            writeln!(
                f,
                "{:<width$}  {:<20}  {:>12}",
                "input",
                format!("{input:?}"),
                0
            )?;
        }
        for (row, layer) in self.rows.iter().zip(&layers) {
            let params = row.trainable + row.other;
            writeln!(
                f,
                "{layer:<width$}  {:<20}  {params:>12}",
                shape(&row.output)
            )?;
        }
        writeln!(f, "{rule}")?;
        writeln!(
            f,
            "parameters: {} ({} trainable, {} other: running statistics or frozen)",
            self.trainable() + self.non_trainable(),
            self.trainable(),
            self.non_trainable()
        )
    }
}
