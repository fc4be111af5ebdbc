//! Every failure a caller can cause or meet, as one error type.

/// The result type of every fallible wgcnn call.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, worded so that the message alone says how to fix it. New kinds of
/// failure may be added: match with a wildcard arm.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No GPU adapter matched the request.
    #[error(
        "no GPU adapter found ({detail}). On headless Linux install Mesa's software Vulkan \
         driver, lavapipe: `apt-get install -y mesa-vulkan-drivers` (check with `vulkaninfo --summary`); \
         or choose another adapter with WGPU_BACKEND / WGPU_ADAPTER_NAME"
    )]
    NoAdapter {
        /// Why no adapter could be used.
        detail: String,
    },

    /// The adapter exists but refused to open a device.
    #[error("could not open a device on adapter `{adapter}`: {reason}")]
    DeviceRequest {
        /// Adapter name.
        adapter: String,
        /// wgpu's reason.
        reason: String,
    },

    /// Two shapes that must agree do not.
    #[error("{op}: shape mismatch: {detail}")]
    ShapeMismatch {
        /// The operation that checked the shapes.
        op: &'static str,
        /// The shapes involved, in the order `detail` names them (the one given first where
        /// it was checked against what the op expects); empty where the mismatch is in names
        /// or counts rather than shapes (a checkpoint's missing tensors).
        shapes: Vec<Vec<usize>>,
        /// Which shapes, and what was expected.
        detail: String,
    },

    /// A dimension of size zero, which no kernel can work on.
    #[error(
        "{op}: dimension {axis} of shape {shape:?} is zero{batch}; every dimension must be at \
         least 1",
        batch = if *axis == 0 { " (an empty batch)" } else { "" }
    )]
    EmptyDimension {
        /// The operation that checked the shape.
        op: &'static str,
        /// The shape that holds the zero.
        shape: Vec<usize>,
        /// The axis whose size is zero.
        axis: usize,
    },

    /// A hyper-parameter or argument outside its valid range.
    #[error("{op}: invalid argument: {detail}")]
    InvalidArgument {
        /// The operation that checked the argument.
        op: &'static str,
        /// What was wrong and what is allowed.
        detail: String,
    },

    /// A buffer larger than the device allows.
    #[error(
        "{what} needs {bytes} bytes, more than this device's {limit_name} of {limit} bytes \
         (adapter `{adapter}`); split the work (e.g. a smaller batch)"
    )]
    TooLarge {
        /// What needed the buffer.
        what: String,
        /// Bytes needed.
        bytes: u64,
        /// The limit's wgpu name.
        limit_name: &'static str,
        /// The limit's value.
        limit: u64,
        /// Adapter name.
        adapter: String,
    },

    /// The device ran out of memory.
    #[error(
        "GPU out of memory while {context}; free tensors or use smaller batches. If later calls \
         report the device lost (wgpu loses it when an internal allocation fails), drop this \
         Gpu and its tensors, create a new Gpu and reload the model from its last checkpoint"
    )]
    OutOfMemory {
        /// What was being done.
        context: String,
    },

    /// The device was lost (driver reset, removal, or destruction).
    #[error(
        "GPU device lost: {reason}; drop this Gpu and its tensors, create a new Gpu and reload \
         the model from its last checkpoint (Graph::load_training resumes a run)"
    )]
    DeviceLost {
        /// The driver's reason.
        reason: String,
    },

    /// wgpu rejected a command: a bug in wgcnn if it ever reaches a user.
    #[error("GPU error while {context}: {detail}")]
    Gpu {
        /// What was being done.
        context: String,
        /// wgpu's description.
        detail: String,
    },

    /// A data file is missing, unreadable or malformed.
    #[error("{path}: {detail}")]
    Data {
        /// The file.
        path: String,
        /// What is wrong with it and, where it helps, what was expected.
        detail: String,
        /// The I/O error behind it, if one was (also `std::error::Error::source`).
        #[source]
        source: Option<std::io::Error>,
    },

    /// NaN or infinity appeared while [`Graph::set_check_finite`](crate::Graph::set_check_finite)
    /// was on.
    #[error(
        "non-finite values (NaN or infinity) first appeared in {what} at training step {step}\
         {skipped}; check the batch for NaN, lower the learning rate or clip gradients, then \
         resume from the last good checkpoint",
        skipped = if *update_skipped {
            " (the update was skipped: the weights and the optimizer are as before the step)"
        } else {
            ""
        }
    )]
    NonFinite {
        /// The first output, loss, gradient or parameter that held one, by name.
        what: String,
        /// The model's training-step count.
        step: u32,
        /// Found before the optimizer ran (in an output, the loss or a gradient), which then
        /// did not: the weights and the optimizer state are those from before the step.
        update_skipped: bool,
    },

    /// Reading a buffer back to the host failed.
    #[error("reading GPU memory back failed: {0}")]
    Readback(String),
}

impl Error {
    /// A problem with the data file at `path`.
    pub(crate) fn data(path: &std::path::Path, detail: impl Into<String>) -> Self {
        Self::Data {
            path: path.display().to_string(),
            detail: detail.into(),
            source: None,
        }
    }

    /// A data file at `path` that could not be read or written, keeping the I/O error.
    pub(crate) fn data_io(
        path: &std::path::Path,
        detail: impl Into<String>,
        source: std::io::Error,
    ) -> Self {
        Self::Data {
            path: path.display().to_string(),
            detail: format!("{}: {source}", detail.into()),
            source: Some(source),
        }
    }
}
