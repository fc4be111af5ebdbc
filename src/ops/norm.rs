//! The machinery batch norm and layer norm share (`shaders/norm.wgsl`): statistics per
//! group of a `[outer][groups][inner]` view, normalisation, and the backward pass.

use bytemuck::{Pod, Zeroable};

use super::reduce::sum_axes;
use crate::error::{Error, Result};
use crate::gpu::Commands;
use crate::gpu::dispatch::Resource;
use crate::gpu::shared::{MAX_LOOP_ITERATIONS, WORKGROUP_SMALL, small_workgroups, workgroups};
use crate::gpu::texture::{Texel, TextureInputs, vec4_input};
use crate::gpu::{Generated, Gpu};
use crate::tensor::{Tensor, gpu_word};
use crate::value::Activation;

/// How the tensor splits into groups, and where the affine parameters vary.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Grouping {
    pub outer: usize,
    pub groups: usize,
    pub inner: usize,
    /// Layer norm: γ and β have one value per inner element; batch norm: per group.
    pub affine_per_inner: bool,
}

/// Mirrors `Params` in shaders/norm.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct NormParams {
    outer: u32,
    groups: u32,
    inner: u32,
    affine_per_inner: u32,
    eps: f32,
    momentum: f32,
    update_running: u32,
    training: u32,
    total: u32,
    cumulative: u32,
    run_groups: u32,
    _pad3: u32,
    slope: f32,
    _pad: [u32; 3],
}

// Binding numbers in shaders/norm.wgsl.
pub(crate) const X: u32 = 1;
pub(crate) const DY: u32 = 2;
pub(crate) const GAMMA: u32 = 3;
pub(crate) const BETA: u32 = 4;
pub(crate) const MEAN: u32 = 5;
pub(crate) const RSTD: u32 = 6;
pub(crate) const VAR: u32 = 7;
pub(crate) const RUNNING_MEAN: u32 = 8;
pub(crate) const RUNNING_VAR: u32 = 9;
pub(crate) const Y: u32 = 10;
pub(crate) const SUMS: u32 = 11;
pub(crate) const DX: u32 = 12;
pub(crate) const DGAMMA: u32 = 13;
pub(crate) const DBETA: u32 = 14;
pub(crate) const BATCHES: u32 = 15;
/// The reductions' partial results per (group, split).
const PARTIALS: u32 = 24;

/// What the statistics store: what their finishing entry binds besides the partials (the
/// backward sums' binds `SUMS`).
const STATISTICS: [u32; 6] = [MEAN, RSTD, VAR, RUNNING_MEAN, RUNNING_VAR, BATCHES];

/// The entries with a `…4` twin over vec4s, run where rows are whole vec4s.
const VEC4_ENTRIES: [&str; 5] = [
    "stats",
    "normalize",
    "backward_sums",
    "backward_dx",
    "affine_grads_per_inner",
];

/// What the `…4` entries read through `load_x4` and its kin: storage or textures.
const VEC4_INPUTS: [u32; 4] = [X, DY, GAMMA, BETA];

/// Where the `…4` entries bind the tensors they read and write as vec4s.
const VEC4_BINDINGS: [(u32, u32); 8] = [
    (X, 16),
    (DY, 17),
    (Y, 18),
    (DX, 19),
    (GAMMA, 20),
    (BETA, 21),
    (DGAMMA, 22),
    (DBETA, 23),
];

/// Settings of one launch beyond the grouping.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Settings {
    pub eps: f32,
    pub momentum: f32,
    /// Running averages as cumulative averages over the tracked batches (momentum None).
    pub cumulative: bool,
    pub update_running: bool,
    pub training: bool,
    /// Applied last by `normalize`; the backward entries take dy back through it.
    pub activation: Activation,
    /// Layer norm's dγ, dβ: the groups (samples) each run of an affine element sums.
    pub run_groups: usize,
}

/// The grid an entry point needs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Grid {
    /// One workgroup per group (the reductions).
    PerGroup,
    /// One invocation per group, 64 to a workgroup.
    GroupThreads,
    /// One invocation per inner element, 64 to a workgroup.
    InnerThreads,
    /// One invocation per element, 256 to a workgroup.
    Elements,
    /// One invocation.
    Single,
}

/// The generated normalisation kernels: everything their source depends on.
#[derive(Debug)]
struct NormKernel {
    /// The vec4 entries' x, dy, γ and β through textures.
    textures: bool,
}

impl Generated for NormKernel {
    fn source(&self) -> String {
        let declarations: String = VEC4_INPUTS
            .iter()
            .zip(["x4", "dy4", "gamma4", "beta4"])
            .map(|(&n, name)| vec4_input(name, vec4_binding(n), self.textures))
            .collect();
        [
            include_str!("../../shaders/epilogue.wgsl"),
            &declarations,
            include_str!("../../shaders/norm.wgsl"),
        ]
        .concat()
    }
}

/// Workgroups per group of a reduction over `runs` per group (of `run` vec4s, or scalars
/// with a run of 1): toward the adapter's target of workgroups, each lane with a run to
/// walk at least, and enough that no lane's loops pass the loop bound (a run's loop and the
/// walk's step each count, then up the tree).
fn reduction_splits(gpu: &Gpu, groups: usize, (runs, run): (usize, usize)) -> usize {
    let lanes = WORKGROUP_SMALL as usize;
    let per_lane = (MAX_LOOP_ITERATIONS - lanes.ilog2() as usize) / (run + 1);
    let fewest = runs.div_ceil(lanes * per_lane);
    let most = runs.div_ceil(lanes).max(1);
    gpu.target_workgroups()
        .div_ceil(groups.max(1))
        .min(most)
        .max(fewest)
}

/// The vec4s a lane reads one after the other (`RUN4` in shaders/norm.wgsl): on CPU
/// adapters (whose lanes are SIMD lanes: a read spread across them is a gather), the
/// longest run of 8, 4 or 2 that divides a row and leaves `enough` runs; 1 on GPUs, whose
/// lanes coalesce neighbouring reads, and where nothing else fits.
fn vec4_run(gpu: &Gpu, grouping: Grouping, enough: impl Fn(usize) -> bool) -> usize {
    let row = grouping.inner / 4;
    let runs: &[usize] = if gpu.cpu_kernels() { &[8, 4, 2] } else { &[] };
    runs.iter()
        .copied()
        .find(|&run| row.is_multiple_of(run) && enough(row * grouping.outer / run))
        .unwrap_or(1)
}

/// `constants` as `entry` (without its `4`) reads them: those it never reads take fixed
/// values, so that norms differing only there share its pipeline. Each set of constants is a
/// kernel of its own to compile (tens of ms on lavapipe): ResNet-20's first step compiled its
/// statistics, batch count and affine gradients twice per shape, with and without the ReLU
/// they do not apply, and the batch count once per shape.
fn read_constants(entry: &str, constants: [(&'static str, u32); 5]) -> [(&'static str, u32); 5] {
    let reads_act = matches!(
        entry,
        "normalize" | "backward_sums" | "backward_dx" | "affine_grads_per_inner"
    );
    constants.map(|(name, value)| match (entry, name) {
        ("count_batch", "INNER" | "SPLITS" | "RUN4") => (name, 1),
        ("count_batch", "GROUPS") => (name, 0),
        (_, "ACT") if !reads_act => (name, 0),
        _ => (name, value),
    })
}

pub(crate) fn launch(
    gpu: &Gpu,
    grouping: Grouping,
    settings: Settings,
    entry: &str,
    grid: Grid,
    tensors: &[(u32, &Tensor)],
) -> Result<()> {
    let total = grouping.outer * grouping.groups * grouping.inner;
    let params = NormParams {
        outer: grouping.outer as u32,
        groups: grouping.groups as u32,
        inner: grouping.inner as u32,
        affine_per_inner: u32::from(grouping.affine_per_inner),
        eps: settings.eps,
        momentum: settings.momentum,
        update_running: u32::from(settings.update_running),
        training: u32::from(settings.training),
        total: total as u32,
        cumulative: u32::from(settings.cumulative),
        run_groups: settings.run_groups as u32,
        _pad3: 0,
        slope: settings.activation.slope(),
        _pad: [0; 3],
    };
    // Rows of whole vec4s: the `…4` twin of the entry, over vec4s.
    let vec4 = grouping.inner.is_multiple_of(4) && VEC4_ENTRIES.contains(&entry);
    let per_vec4 = if vec4 { 4 } else { 1 };
    // Runs per group: element-wise passes leave the adapter's target of workgroups, and
    // reductions a run for each lane of a workgroup.
    let run4 = match grid {
        Grid::Elements if vec4 => vec4_run(gpu, grouping, |runs| {
            workgroups((runs * grouping.groups) as u64) >= gpu.target_workgroups() as u64
        }),
        Grid::PerGroup if vec4 => vec4_run(gpu, grouping, |runs| runs >= WORKGROUP_SMALL as usize),
        _ => 1,
    };
    let splits = match grid {
        Grid::PerGroup => {
            let values = grouping.outer * grouping.inner / per_vec4 as usize;
            reduction_splits(gpu, grouping.groups, (values / run4, run4))
        }
        _ => 1,
    };
    let groups = match grid {
        Grid::PerGroup => (grouping.groups * splits) as u64,
        Grid::GroupThreads => small_workgroups(grouping.groups as u64),
        Grid::InnerThreads => {
            let runs = grouping.groups.div_ceil(settings.run_groups.max(1)) as u64;
            small_workgroups(grouping.inner as u64 / per_vec4 * runs)
        }
        Grid::Elements => workgroups(total as u64 / per_vec4 / run4 as u64),
        Grid::Single => 1,
    };
    // Batch norm's groups are its channels, a layer constant; layer norm's are the batch.
    let constant_groups = if grouping.affine_per_inner {
        0
    } else {
        grouping.groups
    };
    let constants = [
        ("INNER", gpu_word("norm", grouping.inner)?),
        ("GROUPS", gpu_word("norm", constant_groups)?),
        ("ACT", settings.activation.code()),
        ("SPLITS", gpu_word("norm", splits)?),
        ("RUN4", gpu_word("norm", run4)?),
    ];
    let base = entry;
    let entry = if vec4 {
        format!("{entry}4")
    } else {
        entry.to_string()
    };
    // The vec4 entries read x, dy, γ and β through textures where this context reads
    // operands so (all of them or none).
    let inputs = TextureInputs::new(
        tensors
            .iter()
            .copied()
            .filter(|(n, _)| vec4 && VEC4_INPUTS.contains(n)),
        Texel::Vec4,
    )?;
    let kernel = NormKernel {
        textures: inputs.textures(),
    };
    let pipeline = gpu.generated(&kernel, &entry, &read_constants(base, constants))?;
    // The reductions bind their partials even with one split (their source refers to them;
    // groups × 16 bytes from the pool).
    let partials = match grid {
        Grid::PerGroup => Some(Tensor::uninit(gpu, &[grouping.groups * splits, 4])?),
        _ => None,
    };
    let partials = partials
        .as_ref()
        .map(|t| (PARTIALS, Resource::Buffer(t.binding())));
    let mut resources: Vec<_> = tensors
        .iter()
        .map(|&(n, t)| {
            let rebound = vec4 && vec4_binding(n) != n;
            match inputs.view(n) {
                Some(view) => (vec4_binding(n), Resource::Texture(view)),
                None if rebound => (vec4_binding(n), Resource::Buffer(t.binding_vec4())),
                None => (n, Resource::Buffer(t.binding())),
            }
        })
        .collect();
    resources.extend(partials);
    // Splits combine per group in the entry's finishing twin, which binds what the
    // reduction stores (its statistics or sums) and the partials.
    let finish = match splits {
        1 => None,
        _ => {
            let finish = format!("{base}_finish");
            let pipeline = gpu.generated(&kernel, &finish, &read_constants(&finish, constants))?;
            let stores: &[u32] = if base == "stats" {
                &STATISTICS
            } else {
                &[SUMS]
            };
            let stored = tensors
                .iter()
                .filter(|(n, _)| stores.contains(n))
                .map(|&(n, t)| (n, Resource::Buffer(t.binding())));
            let resources: Vec<_> = stored.chain(partials).collect();
            Some((pipeline, resources))
        }
    };
    let copies = |commands: &mut Commands<'_>| {
        inputs.copy(commands);
        Ok(())
    };
    gpu.run_pass_after(&entry, copies, |pass| {
        let params = bytemuck::bytes_of(&params);
        gpu.encode_resources(pass, &pipeline, params, &resources, groups)?;
        if let Some((pipeline, resources)) = &finish {
            let groups = small_workgroups(grouping.groups as u64);
            gpu.encode_resources(pass, pipeline, params, resources, groups)?;
        }
        Ok(())
    })
}

/// Where the `…4` entries bind tensor binding `n` (as vec4s), or `n` for the scalar ones.
fn vec4_binding(n: u32) -> u32 {
    VEC4_BINDINGS
        .iter()
        .find(|&&(of, _)| of == n)
        .map_or(n, |&(_, n4)| n4)
}

/// `y = act((x − mean)·rstd·γ + β)` with the given statistics, for either norm.
pub(crate) fn normalize(
    gpu: &Gpu,
    grouping: Grouping,
    [x, gamma, beta, mean, rstd]: [&Tensor; 5],
    activation: Activation,
) -> Result<Tensor> {
    let y = Tensor::uninit(gpu, x.shape())?;
    let settings = Settings {
        activation,
        ..Settings::default()
    };
    launch(
        gpu,
        grouping,
        settings,
        "normalize",
        Grid::Elements,
        &[
            (X, x),
            (GAMMA, gamma),
            (BETA, beta),
            (MEAN, mean),
            (RSTD, rstd),
            (Y, &y),
        ],
    )?;
    Ok(y)
}

/// The whole backward pass of either norm from the saved statistics: `(dx, dγ, dβ)`.
/// `dx` flows through the statistics in training mode; dγ and dβ are per group (batch
/// norm, from the per-group sums) or per inner element (layer norm). With an `activation`,
/// `dy` is the gradient after it: every pass takes it back through as it reads it.
pub(crate) fn backward(
    op: &'static str,
    grouping: Grouping,
    (training, activation): (bool, Activation),
    [x, gamma, beta, mean, rstd, dy]: [&Tensor; 6],
) -> Result<[Tensor; 3]> {
    if dy.shape() != x.shape() {
        return Err(Error::ShapeMismatch {
            op,
            shapes: vec![dy.shape().to_vec(), x.shape().to_vec()],
            detail: format!("dy is {:?}, x is {:?}", dy.shape(), x.shape()),
        });
    }
    let gpu = x.gpu();
    let sums = Tensor::uninit(gpu, &[grouping.groups, 4])?;
    let dx = Tensor::uninit(gpu, x.shape())?;
    let settings = Settings {
        training,
        activation,
        ..Settings::default()
    };
    let inputs = [
        (X, x),
        (DY, dy),
        (GAMMA, gamma),
        (BETA, beta),
        (MEAN, mean),
        (RSTD, rstd),
        (SUMS, &sums),
    ];
    launch(
        gpu,
        grouping,
        settings,
        "backward_sums",
        Grid::PerGroup,
        &inputs,
    )?;
    launch(
        gpu,
        grouping,
        settings,
        "backward_dx",
        Grid::Elements,
        &[&inputs[..], &[(DX, &dx)]].concat(),
    )?;
    let (dgamma, dbeta) = (
        Tensor::uninit(gpu, gamma.shape())?,
        Tensor::uninit(gpu, gamma.shape())?,
    );
    let outputs = [(DGAMMA, &dgamma), (DBETA, &dbeta)];
    if grouping.affine_per_inner {
        // One invocation per affine element and run of samples: runs within the loop bound
        // (it walks outer × the run), and enough to fill the adapter, their sums added up.
        let longest = (MAX_LOOP_ITERATIONS / grouping.outer)
            .saturating_sub(1)
            .max(1);
        let inner_groups = grouping.inner.div_ceil(WORKGROUP_SMALL as usize);
        let runs = gpu
            .target_workgroups()
            .div_ceil(inner_groups)
            .min(grouping.groups)
            .max(grouping.groups.div_ceil(longest));
        let run_groups = grouping.groups.div_ceil(runs);
        let runs = grouping.groups.div_ceil(run_groups);
        let settings = Settings {
            run_groups,
            ..settings
        };
        let reads = [
            (X, x),
            (DY, dy),
            (GAMMA, gamma),
            (BETA, beta),
            (MEAN, mean),
            (RSTD, rstd),
        ];
        // With several runs, each writes its row of a [runs, INNER] pair, added up after.
        let rows = match runs {
            1 => None,
            _ => {
                let shape = [runs, grouping.inner];
                Some((Tensor::uninit(gpu, &shape)?, Tensor::uninit(gpu, &shape)?))
            }
        };
        let (dg, db) = rows.as_ref().map_or((&dgamma, &dbeta), |(g, b)| (g, b));
        let tensors = [&reads[..], &[(DGAMMA, dg), (DBETA, db)]].concat();
        launch(
            gpu,
            grouping,
            settings,
            "affine_grads_per_inner",
            Grid::InnerThreads,
            &tensors,
        )?;
        if let Some((dg, db)) = &rows {
            let dims = (runs, grouping.inner, 1);
            sum_axes(gpu, dg, dims, &dgamma, 1.0, false)?;
            sum_axes(gpu, db, dims, &dbeta, 1.0, false)?;
        }
    } else {
        launch(
            gpu,
            grouping,
            settings,
            "affine_grads_per_group",
            Grid::GroupThreads,
            &[&[(SUMS, &sums)][..], &outputs].concat(),
        )?;
    }
    Ok([dx, dgamma, dbeta])
}
