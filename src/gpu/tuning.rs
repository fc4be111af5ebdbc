//! Kernel choices measured on first use and remembered per adapter.
//!
//! An op offering several kernels for one shape (a convolution: direct, Winograd, im2col…)
//! asks [`Gpu::tuned`] which to run. The first ask for a key times the candidates (the op
//! supplies the trial), keeps the fastest in memory and in a cache file, and later asks,
//! in this process or the next, answer at once. Measuring stops once the context has spent
//! its budget ([`GpuOptions::tuning_budget`]), within a trial too once each candidate that
//! has run has finished its round; shapes met after that take the op's fixed default, as
//! every shape does under [`Tuning::Fixed`]. The file is plain text, one line
//! per (adapter, key); deleting it starts over, and lines it cannot read are ignored.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::context::{Gpu, GpuOptions, lock};
use crate::error::Result;

/// How ops with several eligible kernels choose among them (`GpuOptions::tuning`,
/// `WGCNN_TUNING`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tuning {
    /// Time the eligible kernels on a shape's first use and keep the fastest (the default;
    /// `WGCNN_TUNING=measure`).
    Measure,
    /// Each op's fixed order, the same on every adapter and run: reproducible, no trials
    /// (`WGCNN_TUNING=off`).
    Fixed,
}

/// Where a choice came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChoiceSource {
    /// Timed in this process.
    Measured,
    /// Read from the cache file.
    CacheFile,
    /// The op's default: the context had spent its tuning budget (before this key's trial,
    /// or during it, before every candidate had run).
    BudgetSpent,
    /// The op's default: no candidate ran in the trial (the real run reports why).
    TrialsFailed,
}

/// One tuned choice.
#[derive(Clone, Debug, PartialEq)]
pub struct TunedChoice {
    /// What was tuned: the op, the pass and the shape (with the widest batch its trials
    /// may time).
    pub key: String,
    /// The kernel chosen.
    pub chosen: String,
    /// Each candidate with the fastest of its timed runs in seconds (`None`: it failed or
    /// was not timed; where the close candidates raced again on a wider batch, only theirs).
    pub candidates: Vec<(String, Option<f64>)>,
    /// The batch those times were measured on: the key's, or a narrower trial's where no
    /// second candidate came close enough to race again on the key's (`None`: nothing was
    /// timed, or a cache line written before this was kept).
    pub timed_batch: Option<usize>,
    /// Where the choice came from.
    pub source: ChoiceSource,
}

/// What the tuner of one context has done ([`Gpu::tuning_report`]).
#[derive(Clone, Debug)]
pub struct TuningReport {
    /// Every choice made so far, in the order of first use.
    pub choices: Vec<TunedChoice>,
    /// Seconds spent measuring (compiling the candidates included).
    pub seconds: f64,
    /// The cache file, if any.
    pub cache_file: Option<PathBuf>,
    /// The last failure to read or write the cache file (tuning goes on without it).
    pub cache_error: Option<String>,
}

/// The first line of a cache file.
/// Raised when a kernel, or how the trials time it, changes enough that choices timed
/// before may not hold: lines a cache file holds from an earlier revision are kept but not
/// read, and the shapes are measured again. 2: the direct weight gradient's two filters a
/// lane; 3: the direct convolution's blocks of 16; 4: trials start with cold caches; 5: the
/// subgroup matmul runs a product with K not a multiple of 4 transposed (an im2col product of
/// an RGB stem 3.5× faster); 6: implicit GEMM takes eight rows a lane for 64 filters or more;
/// 7: a trial's close candidates race again on up to the layer's batch (keys name that batch);
/// 8: im2col lays images whose positions are not a multiple of 4 side by side (one product
/// over the batch's columns), and wide subgroup products walk their tiles down the rows first;
/// 9: Winograd's input transform loads a 2×2 block of tiles' inputs once, and F(4×4)'s output
/// transform stores rows as vec4s; 10: im2col's weight gradient lays such images side by side
/// too; 11: and col2im's input gradient; 12: the direct kernels store vec4s, and F(2×2)'s
/// output transform takes 2×2 blocks of tiles; 13: bias sums walk runs of neighbouring terms
/// (the Winograd and im2col weight gradients' bias sums about twice as fast on lavapipe);
/// 14: grouped layers with several channels a group take row blocks, their dx paired with
/// the matmul dW, and wide groups Winograd; 15: Winograd's input and output-gradient
/// transforms read rows of vec4s; 16: the direct kernels take blocks of 16 for 17 to 32
/// filters, sum each output's taps together and copy their filter bank (no pass of its own);
/// 17: the subgroup matmul hides its K range from lavapipe, which had compiled it anew at
/// every dispatch for some shapes (trials of every candidate built on it paid for that);
/// 18: its bias per row and ReLU, and Winograd's output epilogue, are uniforms (one
/// pipeline a shape), each lane loading its rows' and columns' bias once; 19: products of at
/// most 2^17 multiply-adds run the small matmul kernel where the subgroup one would.
const KERNELS_REVISION: u32 = 19;

const HEADER: &str =
    "# wgcnn kernel tuning v1: adapter\tkey\tchosen\tcandidate=seconds;…\ttimed batch";

/// The tuner's state in a context.
pub(crate) struct TuningState {
    mode: Tuning,
    budget: Duration,
    file: Option<PathBuf>,
    /// Whether the cache file has been read.
    loaded: bool,
    choices: Vec<TunedChoice>,
    by_key: HashMap<String, usize>,
    spent: Duration,
    cache_error: Option<String>,
}

impl TuningState {
    pub(crate) fn new(options: &GpuOptions) -> Self {
        Self {
            mode: options.tuning,
            budget: options.tuning_budget,
            file: options.tuning_cache.clone(),
            loaded: false,
            choices: Vec::new(),
            by_key: HashMap::new(),
            spent: Duration::ZERO,
            cache_error: None,
        }
    }

    fn remember(&mut self, choice: TunedChoice) {
        match self.by_key.get(&choice.key) {
            Some(&i) => self.choices[i] = choice,
            None => {
                self.by_key.insert(choice.key.clone(), self.choices.len());
                self.choices.push(choice);
            }
        }
    }

    /// Reads this adapter's lines of the cache file, once.
    fn load(&mut self, adapter: &str) {
        if self.loaded {
            return;
        }
        self.loaded = true;
        let Some(path) = self.file.clone() else {
            return;
        };
        match read_lines(&path) {
            Ok(lines) => {
                for (line_adapter, choice) in lines {
                    if line_adapter == adapter {
                        self.remember(choice);
                    }
                }
            }
            Err(e) => self.cache_error = Some(e),
        }
    }

    /// Rewrites the cache file with this adapter's timed choices and every other line
    /// already there (another adapter's, or keys this process has not met).
    fn save(&mut self, adapter: &str) {
        let Some(path) = self.file.clone() else {
            return;
        };
        let mut text = format!("{HEADER}\n");
        let kept = read_lines(&path).unwrap_or_default();
        for (line_adapter, choice) in &kept {
            if line_adapter != adapter || !self.by_key.contains_key(&choice.key) {
                text.push_str(&line(line_adapter, choice));
            }
        }
        for choice in &self.choices {
            if matches!(
                choice.source,
                ChoiceSource::Measured | ChoiceSource::CacheFile
            ) {
                text.push_str(&line(adapter, choice));
            }
        }
        let written = path
            .parent()
            .filter(|dir| !dir.as_os_str().is_empty())
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| crate::atomic::write_atomically(&path, text.as_bytes()));
        if let Err(e) = written {
            self.cache_error = Some(format!("writing {}: {e}", path.display()));
        }
    }
}

/// One line of the cache file.
fn line(adapter: &str, choice: &TunedChoice) -> String {
    let candidates: Vec<String> = choice
        .candidates
        .iter()
        .map(|(name, seconds)| match seconds {
            Some(s) => format!("{name}={s:.6}"),
            None => format!("{name}=-"),
        })
        .collect();
    let batch = choice.timed_batch.map_or("-".into(), |n| n.to_string());
    format!(
        "{adapter}\t{}\t{}\t{}\t{batch}\n",
        choice.key,
        choice.chosen,
        candidates.join(";")
    )
}

/// The readable lines of a cache file (none if it does not exist).
fn read_lines(path: &Path) -> std::result::Result<Vec<(String, TunedChoice)>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("reading {}: {e}", path.display())),
    };
    Ok(text.lines().filter_map(parse_line).collect())
}

fn parse_line(text: &str) -> Option<(String, TunedChoice)> {
    // Lines written before the timed batch was recorded have four fields.
    let (adapter, key, chosen, candidates, batch) = match text.split('\t').collect::<Vec<_>>()[..] {
        [adapter, key, chosen, candidates] => (adapter, key, chosen, candidates, None),
        [adapter, key, chosen, candidates, "-"] => (adapter, key, chosen, candidates, None),
        [adapter, key, chosen, candidates, batch] => {
            (adapter, key, chosen, candidates, Some(batch.parse().ok()?))
        }
        _ => return None,
    };
    let candidates = candidates
        .split(';')
        .map(|entry| {
            let (name, seconds) = entry.rsplit_once('=')?;
            let seconds = match seconds {
                "-" => None,
                s => Some(s.parse::<f64>().ok().filter(|s| s.is_finite())?),
            };
            Some((name.to_string(), seconds))
        })
        .collect::<Option<Vec<_>>>()?;
    candidates.iter().any(|(name, _)| name == chosen).then(|| {
        let choice = TunedChoice {
            key: key.to_string(),
            chosen: chosen.to_string(),
            candidates,
            timed_batch: batch,
            source: ChoiceSource::CacheFile,
        };
        (adapter.to_string(), choice)
    })
}

/// The cache file's default place: `$XDG_CACHE_HOME/wgcnn/tuning.tsv`, else
/// `$HOME/.cache/wgcnn/tuning.tsv`; none without either.
pub(crate) fn default_cache_file() -> Option<PathBuf> {
    let var = |name| std::env::var_os(name).filter(|v| !v.is_empty());
    let base = var("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| var("HOME").map(|home| Path::new(&home).join(".cache")))?;
    Some(base.join("wgcnn").join("tuning.tsv"))
}

impl Gpu {
    /// How this context's ops choose among kernels.
    pub fn tuning(&self) -> Tuning {
        lock(&self.inner.tuning).mode
    }

    /// The choices made so far and the time spent measuring them.
    pub fn tuning_report(&self) -> TuningReport {
        let state = lock(&self.inner.tuning);
        TuningReport {
            choices: state.choices.clone(),
            seconds: state.spent.as_secs_f64(),
            cache_file: state.file.clone(),
            cache_error: state.cache_error.clone(),
        }
    }

    /// Which of `candidates` (the op's fixed order: the first is its default) to run for
    /// `key`: remembered, read from the cache file (if it chose among these same
    /// candidates), or timed by `measure` (seconds per candidate, `None` for one that
    /// failed, and the batch they were timed on), the fastest kept. `measure` gets the budget
    /// left and returns `None` if it stopped when that ran out, before every candidate ran
    /// (the default runs, and the next process measures the key again). One key is measured
    /// once, even by threads asking at the same moment. `measure` must not ask for choices.
    pub(crate) fn tuned(
        &self,
        key: &str,
        candidates: &[String],
        measure: impl FnOnce(Duration) -> Result<Option<(Vec<Option<f64>>, usize)>>,
    ) -> Result<usize> {
        let mut state = lock(&self.inner.tuning);
        if candidates.len() < 2 || state.mode == Tuning::Fixed {
            return Ok(0);
        }
        let adapter = self.adapter_key();
        state.load(&adapter);
        // A choice among other candidates (a kernel added since) is measured again.
        if let Some(&i) = state.by_key.get(key)
            && state.choices[i]
                .candidates
                .iter()
                .map(|(name, _)| name)
                .eq(candidates)
            && let Some(found) = candidates
                .iter()
                .position(|c| *c == state.choices[i].chosen)
        {
            return Ok(found);
        }
        let named = |times: &[Option<f64>]| -> Vec<(String, Option<f64>)> {
            let times = times.iter().copied().chain(std::iter::repeat(None));
            candidates.iter().cloned().zip(times).collect()
        };
        let measured = if state.spent >= state.budget {
            None
        } else {
            // The work already submitted finishes outside the budget: the trials would wait
            // for it (on a CPU adapter it runs on the cores they time), and on a model's
            // first training step it is the step's own forward pass (ResNet-20's on
            // lavapipe: 1.5 s of the 4.5 s its backward trials spent).
            self.synchronize()?;
            let started = Instant::now();
            let measured = measure(state.budget - state.spent)?;
            state.spent += started.elapsed();
            measured
        };
        // The budget was spent before this key, or ran out while its candidates compiled.
        let Some((times, batch)) = measured else {
            state.remember(TunedChoice {
                key: key.to_string(),
                chosen: candidates[0].clone(),
                candidates: named(&[]),
                timed_batch: None,
                source: ChoiceSource::BudgetSpent,
            });
            return Ok(0);
        };
        let fastest = times
            .iter()
            .enumerate()
            .filter_map(|(i, t)| Some((i, (*t)?)))
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(i, _)| i);
        state.remember(TunedChoice {
            key: key.to_string(),
            chosen: candidates[fastest.unwrap_or(0)].clone(),
            candidates: named(&times),
            timed_batch: Some(batch),
            source: match fastest {
                Some(_) => ChoiceSource::Measured,
                None => ChoiceSource::TrialsFailed,
            },
        });
        if fastest.is_some() {
            state.save(&adapter);
        }
        Ok(fastest.unwrap_or(0))
    }

    /// This adapter and driver, the kernel family, this crate's version and its kernels'
    /// revision, and a cap on buffer sizes where one is set (it changes how batches are
    /// chunked): a choice timed on one holds for the same kernels on the same hardware only.
    fn adapter_key(&self) -> String {
        let info = self.adapter_info();
        let mut key = format!(
            "{} | {:?} | {} {} | {:?} kernels | wgcnn {} kernels r{KERNELS_REVISION}",
            info.name,
            info.backend,
            info.driver,
            info.driver_info,
            self.kernel_family(),
            env!("CARGO_PKG_VERSION")
        );
        if let Some(cap) = self.inner.buffer_limit {
            key.push_str(&format!(" | buffers of {cap} bytes at most"));
        }
        key.replace(['\t', '\n', '\r'], " ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_lines_read_back_and_bad_ones_are_skipped() {
        let choice = TunedChoice {
            key: "conv2d forward n8 c3".into(),
            chosen: "winograd".into(),
            candidates: vec![
                ("im2col+matmul".into(), Some(0.25)),
                ("winograd".into(), None),
            ],
            timed_batch: Some(2),
            source: ChoiceSource::Measured,
        };
        let text = line("lavapipe | Vulkan", &choice);
        let (adapter, read) = parse_line(text.trim_end()).unwrap();
        assert_eq!(adapter, "lavapipe | Vulkan");
        assert_eq!(read.candidates, choice.candidates);
        assert_eq!(read.timed_batch, Some(2));
        assert_eq!(read.source, ChoiceSource::CacheFile);
        // A line without the timed batch (written before it was recorded), or with none.
        let older = text.trim_end().rsplit_once('\t').unwrap().0;
        let untimed = format!("{older}\t-");
        for text in [older, &untimed] {
            let (_, read) = parse_line(text).unwrap();
            assert_eq!((read.chosen.as_str(), read.timed_batch), ("winograd", None));
        }
        for bad in [
            "",
            HEADER,
            "a\tb\tc",
            "a\tk\tchosen\tother=0.1",
            "a\tk\tx\tx=abc",
            "a\tk\tx\tx=inf",
            "a\tk\tx\tx",
            "a\tk\tx\tx=0.1\tmany",
            "a\tk\tx\tx=0.1\t2\textra",
        ] {
            assert!(parse_line(bad).is_none(), "{bad:?}");
        }
    }
}
