//! Kernel choices measured on first use and remembered per adapter.
//!
//! An op offering several kernels for one shape (a convolution: direct, Winograd, im2col…)
//! asks [`Gpu::tuned`] which to run. The first ask for a key times the candidates (the op
//! supplies the trial), keeps the fastest in memory and in a cache file, and later asks,
//! in this process or the next, answer at once. Measuring stops once the context has spent
//! its budget ([`GpuOptions::tuning_budget`]); shapes met after that take the op's fixed
//! default, as every shape does under [`Tuning::Fixed`]. A trial that the budget cuts short
//! (no further candidate starts once it has passed) times the candidates it started and is
//! kept as it stands, the fastest of them running: the next context that meets the shape
//! with budget left times the rest against that leader, at least one more candidate each
//! time, so that a shape whose whole trial takes longer than a budget is still measured
//! over a few runs; the run that finishes it races the close ones of every run again. The
//! file is plain text, one line per (adapter, key); deleting it starts over, and lines it
//! cannot read are ignored.

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
    /// Timed in part (in this process, or an earlier one as the cache file says): the
    /// budget ran out before every candidate had started. The fastest of those timed runs;
    /// the next context with budget left times the rest ([`TunedChoice::pending`]).
    Partial,
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
    /// A trial spread over several runs keeps the times of each: an earlier run's losers
    /// keep theirs, on the trial's batch.
    pub candidates: Vec<(String, Option<f64>)>,
    /// The batch those times were measured on: the key's, or a narrower trial's where no
    /// second candidate came close enough to race again on the key's (`None`: nothing was
    /// timed, or a cache line written before this was kept).
    pub timed_batch: Option<usize>,
    /// Where the choice came from.
    pub source: ChoiceSource,
    /// The candidates not timed yet, in the order they will be ([`ChoiceSource::Partial`];
    /// empty otherwise).
    pub pending: Vec<String>,
}

/// What [`Gpu::tuned`] asks a trial to time.
pub(crate) struct TrialRequest<'a> {
    /// The context's budget left.
    pub budget: Duration,
    /// The candidates to time, by index, in order: those not timed yet, after the fastest
    /// an earlier run left (so that they race it in one process) where there is one.
    pub run: &'a [usize],
    /// How many of `run` start however little budget is left: those that make progress
    /// (the first candidate not timed before, and the leader it races).
    pub at_least: usize,
}

/// What a trial timed.
pub(crate) struct TrialTimes {
    /// Seconds per candidate of the request's `run`, in its order (`None`: failed, not
    /// started, or not timed on `batch`).
    pub times: Vec<Option<f64>>,
    /// How many of `run` started: those after them are left for a later run.
    pub started: usize,
    /// The batch the times were measured on.
    pub batch: usize,
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

/// Where a trial spread over several runs finishes, those any run timed within this factor
/// of the fastest time recorded race again ([`Gpu::tuned`]'s playoff).
const PLAYOFF: f64 = 1.25;

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
                ChoiceSource::Measured | ChoiceSource::CacheFile | ChoiceSource::Partial
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
            None if choice.pending.contains(name) => format!("{name}=?"),
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
    // `?`: a candidate a trial cut short left for a later run.
    let mut pending = Vec::new();
    let candidates = candidates
        .split(';')
        .map(|entry| {
            let (name, seconds) = entry.rsplit_once('=')?;
            let seconds = match seconds {
                "-" => None,
                "?" => {
                    pending.push(name.to_string());
                    None
                }
                s => Some(s.parse::<f64>().ok().filter(|s| s.is_finite())?),
            };
            Some((name.to_string(), seconds))
        })
        .collect::<Option<Vec<_>>>()?;
    candidates.iter().any(|(name, _)| name == chosen).then(|| {
        let source = match pending.is_empty() {
            true => ChoiceSource::CacheFile,
            false => ChoiceSource::Partial,
        };
        let choice = TunedChoice {
            key: key.to_string(),
            chosen: chosen.to_string(),
            candidates,
            timed_batch: batch,
            source,
            pending,
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
    /// candidates), or timed by `measure`, the fastest kept. `measure` times the candidates
    /// a [`TrialRequest`] names within the budget it gives, starting no more once that has
    /// passed (past its `at_least`). A trial cut short so is kept as [`ChoiceSource::Partial`]:
    /// its fastest runs, and the next ask with budget left (here or in a later process that
    /// reads the file) times the rest against it; the run that finishes such a trial asks
    /// `measure` once more, for a playoff of the close ones of every run ([`PLAYOFF`]). One
    /// key is measured once per context, even by threads asking at the same moment.
    /// `measure` must not ask for choices.
    pub(crate) fn tuned(
        &self,
        key: &str,
        candidates: &[String],
        mut measure: impl FnMut(TrialRequest) -> Result<TrialTimes>,
    ) -> Result<usize> {
        let mut state = lock(&self.inner.tuning);
        if candidates.len() < 2 || state.mode == Tuning::Fixed {
            return Ok(0);
        }
        let adapter = self.adapter_key();
        state.load(&adapter);
        let index = |name: &str| candidates.iter().position(|c| c == name);
        // A choice among other candidates (a kernel added since) is measured again.
        let earlier = state
            .by_key
            .get(key)
            .map(|&i| state.choices[i].clone())
            .filter(|c| c.candidates.iter().map(|(name, _)| name).eq(candidates))
            .and_then(|c| Some((index(&c.chosen)?, c)));
        let out_of_budget = state.spent >= state.budget;
        if let Some((chosen, choice)) = &earlier
            && (choice.pending.is_empty() || out_of_budget)
        {
            return Ok(*chosen);
        }
        if out_of_budget {
            state.remember(TunedChoice {
                key: key.to_string(),
                chosen: candidates[0].clone(),
                candidates: candidates.iter().map(|c| (c.clone(), None)).collect(),
                timed_batch: None,
                source: ChoiceSource::BudgetSpent,
                pending: Vec::new(),
            });
            return Ok(0);
        }
        // A fresh trial times every candidate; a resumed one the leader and those pending.
        let (mut times, run, at_least) = match &earlier {
            None => (
                vec![None; candidates.len()],
                (0..candidates.len()).collect(),
                1,
            ),
            Some((leader, choice)) => {
                let times: Vec<Option<f64>> = choice.candidates.iter().map(|(_, t)| *t).collect();
                let timed = times[*leader].is_some();
                let pending = choice.pending.iter().filter_map(|name| index(name));
                let run: Vec<usize> = timed
                    .then_some(*leader)
                    .into_iter()
                    .chain(pending)
                    .collect();
                (times, run, 1 + usize::from(timed))
            }
        };
        // The work already submitted finishes outside the budget: the trials would wait
        // for it (on a CPU adapter it runs on the cores they time), and on a model's
        // first training step it is the step's own forward pass (ResNet-20's on
        // lavapipe: 1.5 s of the 4.5 s its backward trials spent).
        self.synchronize()?;
        let started = Instant::now();
        let budget = state.budget - state.spent;
        let timed = measure(TrialRequest {
            budget,
            run: &run,
            at_least,
        })?;
        state.spent += started.elapsed();
        let (ran, pending) = run.split_at(timed.started.min(run.len()));
        for (&i, time) in ran.iter().zip(&timed.times) {
            times[i] = *time;
        }
        // The fastest of this trial: earlier runs' times are compared with theirs only
        // through the leader they left, which raced again here.
        let fastest_of = |times: &[Option<f64>], among: &mut dyn Iterator<Item = usize>| {
            among
                .filter_map(|i| Some((i, times[i]?)))
                .min_by(|a, b| a.1.total_cmp(&b.1))
                .map(|(i, _)| i)
        };
        let mut batch = timed.batch;
        let mut fastest = fastest_of(&times, &mut ran.iter().copied())
            .or_else(|| fastest_of(&times, &mut (0..candidates.len())));
        // A trial spread over several runs ends with a playoff in the run that finishes
        // it: its leader and every candidate any run timed within PLAYOFF of the fastest
        // time recorded race again here, all of them started. One noisy round of a resumed
        // trial had left ResNet-20's 16-channel backward on a pair 1.8× slower than one an
        // earlier run had timed faster.
        if earlier.is_some() && pending.is_empty() {
            let best = times
                .iter()
                .flatten()
                .copied()
                .fold(f64::INFINITY, f64::min);
            let contenders: Vec<usize> = (0..candidates.len())
                .filter(|&i| Some(i) == fastest || times[i].is_some_and(|t| t <= best * PLAYOFF))
                .collect();
            if contenders.len() > 1 {
                let started = Instant::now();
                let playoff = measure(TrialRequest {
                    budget: state.budget.saturating_sub(state.spent),
                    run: &contenders,
                    at_least: contenders.len(),
                })?;
                state.spent += started.elapsed();
                let mut raced = times.clone();
                for (&i, time) in contenders.iter().zip(&playoff.times) {
                    raced[i] = *time;
                }
                if let Some(winner) = fastest_of(&raced, &mut contenders.iter().copied()) {
                    (times, fastest, batch) = (raced, Some(winner), playoff.batch);
                }
            }
        }
        let source = match (pending.is_empty(), fastest) {
            (false, _) => ChoiceSource::Partial,
            (true, Some(_)) => ChoiceSource::Measured,
            (true, None) => ChoiceSource::TrialsFailed,
        };
        state.remember(TunedChoice {
            key: key.to_string(),
            chosen: candidates[fastest.unwrap_or(0)].clone(),
            candidates: candidates.iter().cloned().zip(times).collect(),
            timed_batch: Some(batch),
            source,
            pending: pending.iter().map(|&i| candidates[i].clone()).collect(),
        });
        if source != ChoiceSource::TrialsFailed {
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

    /// A trial cut short keeps its leader (asked again once the budget is spent, it is the
    /// answer) and resumes in the next context: the leader first, the pending candidates
    /// after it, two of them started whatever the budget. The run that finishes it holds a
    /// playoff: that run's fastest and an earlier run's candidate timed within PLAYOFF of
    /// the fastest time recorded race again, all started, and the playoff decides.
    #[test]
    fn a_cut_trial_resumes_with_its_leader_and_the_pending_candidates() {
        if crate::test_support::gpu(GpuOptions::from_env().unwrap()).is_none() {
            return;
        }
        let dir = std::env::temp_dir().join(format!("wgcnn-resume-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        // A budget the first trial spends.
        let options = GpuOptions {
            tuning: Tuning::Measure,
            tuning_cache: Some(dir.join("tuning.tsv")),
            tuning_budget: Duration::from_nanos(1),
            ..GpuOptions::from_env().unwrap()
        };
        let names: Vec<String> = ["a", "b", "c"].map(String::from).into();
        let ms = |t: f64| Some(t / 1e3);
        let sources = |gpu: &Gpu| -> Vec<(ChoiceSource, Vec<String>)> {
            let report = gpu.tuning_report();
            report
                .choices
                .into_iter()
                .map(|c| (c.source, c.pending))
                .collect()
        };

        let gpu = Gpu::with_options(options.clone()).unwrap();
        let chosen = gpu.tuned("key", &names, |request| {
            assert_eq!((request.run, request.at_least), (&[0, 1, 2][..], 1));
            let times = vec![ms(6.0), ms(5.0), None];
            Ok(TrialTimes {
                times,
                started: 2,
                batch: 4,
            })
        });
        assert_eq!(chosen.unwrap(), 1);
        assert_eq!(sources(&gpu), [(ChoiceSource::Partial, vec!["c".into()])]);
        let again = gpu.tuned("key", &names, |_| panic!("measured twice"));
        assert_eq!(again.unwrap(), 1);
        drop(gpu);

        // b (the leader) and c race, c ahead; then c and a (6 ms in the first run, within
        // PLAYOFF of it) race again, and a wins. b (8 ms) is out.
        let gpu = Gpu::with_options(options.clone()).unwrap();
        let mut calls = 0;
        let chosen = gpu.tuned("key", &names, |request| {
            calls += 1;
            // The playoff's times are on a batch of their own here: the choice keeps it.
            let (run, times, batch) = match calls {
                1 => ([1, 2], vec![ms(8.0), ms(7.0)], 4),
                _ => ([0, 2], vec![ms(6.5), ms(7.2)], 8),
            };
            assert_eq!(
                (request.run, request.at_least),
                (&run[..], 2),
                "call {calls}"
            );
            Ok(TrialTimes {
                times,
                started: 2,
                batch,
            })
        });
        assert_eq!((chosen.unwrap(), calls), (0, 2));
        let report = gpu.tuning_report();
        let times: Vec<Option<f64>> = report.choices[0].candidates.iter().map(|c| c.1).collect();
        assert_eq!(times, [ms(6.5), ms(8.0), ms(7.2)]);
        assert_eq!(report.choices[0].timed_batch, Some(8));
        assert_eq!(sources(&gpu), [(ChoiceSource::Measured, vec![])]);
        drop(gpu);

        let gpu = Gpu::with_options(options).unwrap();
        let read = gpu.tuned("key", &names, |_| panic!("measured again"));
        assert_eq!(read.unwrap(), 0);
        assert_eq!(sources(&gpu), [(ChoiceSource::CacheFile, vec![])]);
        let _ = std::fs::remove_dir_all(&dir);
    }

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
            pending: Vec::new(),
        };
        let text = line("lavapipe | Vulkan", &choice);
        let (adapter, read) = parse_line(text.trim_end()).unwrap();
        assert_eq!(adapter, "lavapipe | Vulkan");
        assert_eq!(read.candidates, choice.candidates);
        assert_eq!(read.timed_batch, Some(2));
        assert_eq!(read.source, ChoiceSource::CacheFile);
        assert!(read.pending.is_empty());
        // A trial cut short: its untimed candidates read back as pending, a failed one not.
        let partial = TunedChoice {
            chosen: "im2col+matmul".into(),
            candidates: vec![
                ("im2col+matmul".into(), Some(0.25)),
                ("winograd".into(), None),
                ("direct".into(), None),
            ],
            source: ChoiceSource::Partial,
            pending: vec!["direct".into()],
            ..choice.clone()
        };
        let cut = line("lavapipe | Vulkan", &partial);
        assert!(cut.contains("winograd=-;direct=?"), "{cut}");
        let (_, read) = parse_line(cut.trim_end()).unwrap();
        assert_eq!(read.candidates, partial.candidates);
        assert_eq!(read.pending, partial.pending);
        assert_eq!(read.source, ChoiceSource::Partial);
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
