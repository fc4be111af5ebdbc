//! PyTorch checkpoints (`torch.save(model.state_dict(), path)`) read without running them.
//!
//! A `.pth` file is a zip: `<folder>/data.pkl` is a pickle of the state dict whose tensors
//! refer to raw storages `<folder>/data/<key>`. A pickle is a program (it can call any Python
//! function), so this is not an unpickler: a small stack machine knows the opcodes
//! `torch.save` writes and the few callables a state dict needs (`OrderedDict`,
//! `_rebuild_tensor_v2`, `_rebuild_parameter`, the storage types) as data. Any other global
//! is refused by name. Counts, depth, sizes, offsets and strides are checked with checked
//! arithmetic against the bytes actually present before anything is allocated from them.

use std::collections::HashMap;
use std::io::{Cursor, Read};
use std::path::Path;
use std::rc::Rc;

use ndarray::{ArrayD, IxDyn};
use zip::ZipArchive;

use crate::error::{Error, Result};

/// The f32 and int64 tensors of a checkpoint, by name.
pub(super) type Loaded = (Vec<(String, ArrayD<f32>)>, Vec<(String, ArrayD<i64>)>);

/// A `.pth` file's zip, read from memory.
type Archive<'a> = ZipArchive<Cursor<&'a [u8]>>;

/// Values, stack entries and memo entries one pickle may create: a state dict spends about 70
/// per tensor, so this admits some 14,000 tensors and bounds the memory a hostile file costs.
const OBJECT_LIMIT: usize = 1_000_000;
/// Containers nested deeper than this are refused (state dicts nest about 5 deep); the bound
/// also keeps the recursive drop of a nested value off the end of the stack.
const DEPTH_LIMIT: u32 = 64;
/// Dimensions of one tensor.
const RANK_LIMIT: usize = 32;
/// `data.pkl` larger than this is refused (a state dict's pickle is about 100 bytes a tensor).
const PICKLE_LIMIT: u64 = 64 << 20;

/// The pickle protocol-2 number `torch.save` wrote first in its legacy (pre-1.6) format.
const LEGACY_MAGIC: [u8; 12] = [
    0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19,
];

/// Whether `bytes` is a zip archive (torch.save's format since PyTorch 1.6).
pub(super) fn is_zip(bytes: &[u8]) -> bool {
    bytes.starts_with(b"PK\x03\x04")
}

/// Whether `bytes` is torch.save's legacy format: a pickle whose first value is its magic number.
pub(super) fn is_legacy(bytes: &[u8]) -> bool {
    looks_like_pickle(bytes) && bytes[2..].starts_with(&LEGACY_MAGIC)
}

/// Whether `bytes` starts like a bare pickle (`pickle.dump`), to say so when nothing else fits.
pub(super) fn looks_like_pickle(bytes: &[u8]) -> bool {
    bytes.len() > 1 && bytes[0] == 0x80 && (2..=5).contains(&bytes[1])
}

/// IEEE half precision to f32, exactly: every f16 is an f32. NaN stays NaN with its sign and
/// payload, quieted as hardware conversions do.
pub(super) fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h >> 15) << 31;
    let exponent = u32::from((h >> 10) & 0x1f);
    let mantissa = u32::from(h & 0x3ff);
    match exponent {
        0 => {
            // Zero or subnormal: mantissa · 2⁻²⁴, exact in f32 (a 10-bit integer times a power of two).
            let magnitude = mantissa as f32 * f32::from_bits(0x3380_0000);
            f32::from_bits(sign | magnitude.to_bits())
        }
        31 if mantissa == 0 => f32::from_bits(sign | 0x7f80_0000),
        31 => f32::from_bits(sign | 0x7fc0_0000 | (mantissa << 13)),
        _ => f32::from_bits(sign | ((exponent + 112) << 23) | (mantissa << 13)),
    }
}

/// bfloat16 to f32, exactly: bfloat16 is the top half of an f32.
pub(super) fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits(u32::from(h) << 16)
}

/// The element types of torch storages.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Dtype {
    F32,
    F16,
    Bf16,
    F64,
    I64,
    I32,
    /// A storage type torch has but wgcnn does not read: its torch name.
    Other(&'static str),
}

impl Dtype {
    /// The dtype of `torch.<name>`, for the storage types torch.save names.
    fn of_storage(name: &str) -> Option<Self> {
        Some(match name {
            "FloatStorage" => Self::F32,
            "HalfStorage" => Self::F16,
            "BFloat16Storage" => Self::Bf16,
            "DoubleStorage" => Self::F64,
            "LongStorage" => Self::I64,
            "IntStorage" => Self::I32,
            "ShortStorage" => Self::Other("int16"),
            "CharStorage" => Self::Other("int8"),
            "ByteStorage" => Self::Other("uint8"),
            "BoolStorage" => Self::Other("bool"),
            "ComplexFloatStorage" => Self::Other("complex64"),
            "ComplexDoubleStorage" => Self::Other("complex128"),
            "QInt8Storage" | "QUInt8Storage" | "QInt32Storage" | "QUInt4x2Storage"
            | "QUInt2x4Storage" => Self::Other("quantized"),
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::F16 => "float16",
            Self::Bf16 => "bfloat16",
            Self::F64 => "float64",
            Self::I64 => "int64",
            Self::I32 => "int32",
            Self::Other(name) => name,
        }
    }

    /// Bytes per element (1 for the types only named in errors: nothing is read for them).
    fn size(self) -> u64 {
        match self {
            Self::F16 | Self::Bf16 => 2,
            Self::F32 | Self::I32 => 4,
            Self::F64 | Self::I64 => 8,
            Self::Other(_) => 1,
        }
    }
}

/// The callables a state dict's pickle may name: data to the machine, never executed.
#[derive(Clone, Copy, Debug)]
enum Global {
    OrderedDict,
    RebuildTensor,
    RebuildParameter,
    RebuildParameterWithState,
    Storage(Dtype),
}

/// One storage file, as a `BINPERSID` names it.
#[derive(Debug)]
struct Storage {
    key: String,
    dtype: Dtype,
    /// Elements, as the pickle claims; checked against the file's size before reading.
    elements: u64,
}

/// A tensor: a strided view of a storage, checked to stay inside it.
#[derive(Debug)]
struct View {
    storage: Rc<Storage>,
    offset: u64,
    shape: Vec<usize>,
    strides: Vec<u64>,
}

/// Tuples, lists and dicts, with their nesting depth.
#[derive(Clone, Debug)]
struct Node<T> {
    depth: u32,
    items: Vec<T>,
}

impl<T> Default for Node<T> {
    fn default() -> Self {
        Self {
            depth: 1,
            items: Vec::new(),
        }
    }
}

/// A pickled value. Containers are shared (`Rc`) between the stack and the memo and copied
/// on write, so fetching from the memo costs nothing and no cycle can form.
#[derive(Clone, Debug)]
enum Value {
    None,
    /// Booleans (the legacy format's `little_endian` flag among them).
    Bool(bool),
    /// Floats (optimizer settings) matter to no tensor: only their kind is kept.
    Int(i64),
    Float,
    Str(Rc<str>),
    Tuple(Rc<Node<Value>>),
    List(Rc<Node<Value>>),
    Dict(Rc<Node<(Value, Value)>>),
    Global(Global),
    Storage(Rc<Storage>),
    Tensor(Rc<View>),
}

impl Value {
    fn depth(&self) -> u32 {
        match self {
            Self::Tuple(n) | Self::List(n) => n.depth,
            Self::Dict(n) => n.depth,
            _ => 0,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Self::None => "None",
            Self::Bool(_) => "bool",
            Self::Int(_) => "int",
            Self::Float => "float",
            Self::Str(_) => "str",
            Self::Tuple(_) => "tuple",
            Self::List(_) => "list",
            Self::Dict(_) => "dict",
            Self::Global(_) => "class or function",
            Self::Storage(_) => "storage",
            Self::Tensor(_) => "tensor",
        }
    }
}

/// Reads a `torch.save` zip archive. `path` only names the file in errors.
pub(super) fn load(path: &Path, bytes: &[u8]) -> Result<Loaded> {
    let error = |detail: String| Error::data(path, detail);
    let mut archive = ZipArchive::new(Cursor::new(bytes)).map_err(|e| {
        error(format!(
            "not a readable zip archive, as torch.save writes (truncated or damaged?): {e}"
        ))
    })?;
    let folder = pickle_folder(&archive).map_err(error)?;
    match read_entry(&mut archive, &format!("{folder}/byteorder"), 64).map_err(error)? {
        None => {}
        Some(order) if order.trim_ascii() == b"little" => {}
        Some(order) if order.trim_ascii() == b"big" => {
            return Err(error(
                "the tensors are stored big-endian; re-save the state_dict on a \
                 little-endian machine (x86, ARM), or as safetensors"
                    .into(),
            ));
        }
        Some(order) => {
            return Err(error(format!(
                "unknown byte order {:?} in {folder}/byteorder; expected \"little\"",
                String::from_utf8_lossy(&order)
            )));
        }
    }
    let pickle = read_entry(&mut archive, &format!("{folder}/data.pkl"), PICKLE_LIMIT)
        .map_err(error)?
        .ok_or_else(|| error(format!("{folder}/data.pkl is missing")))?;
    let root = Machine::new(&pickle)
        .run()
        .map_err(|e| error(format!("{folder}/data.pkl: {e}")))?;
    let entries = state_dict(&root).map_err(error)?;
    tensors_of(path, entries, |name, storage| {
        read_storage(&mut archive, &folder, name, storage)
    })
}

/// Reads torch.save's legacy format (PyTorch before 1.6, e.g. 2020's pretrained files): five
/// pickles in a row (magic number, protocol, system info, the state dict, its storage keys),
/// then each storage in the keys' order as an int64 element count and its raw elements.
pub(super) fn load_legacy(path: &Path, bytes: &[u8]) -> Result<Loaded> {
    let error = |detail: String| Error::data(path, detail);
    let legacy = |what: &str, e: String| error(format!("legacy torch.save file, {what}: {e}"));
    let pickle = |at: usize, what: &str| -> Result<(Value, usize)> {
        let rest = bytes.get(at..).unwrap_or_default();
        let (value, used) = Machine::new(rest)
            .run_prefix()
            .map_err(|e| legacy(what, e))?;
        Ok((value, at + used))
    };
    // The magic number (a long beyond i64) is checked by `is_legacy`: skip its pickle.
    let at = 2 + LEGACY_MAGIC.len() + 1;
    let (protocol, at) = pickle(at, "protocol")?;
    if !matches!(protocol, Value::Int(1001)) {
        return Err(legacy("protocol", "not the 1001 torch.save wrote".into()));
    }
    let (info, at) = pickle(at, "system info")?;
    let little = match &info {
        Value::Dict(d) => d.items.iter().find_map(|(k, v)| match (k, v) {
            (Value::Str(k), Value::Bool(b)) if &**k == "little_endian" => Some(*b),
            _ => None,
        }),
        _ => None,
    };
    if little != Some(true) {
        return Err(error(
            "the tensors are stored big-endian (or the byte order is not recorded); re-save \
             the state_dict on a little-endian machine, or as safetensors"
                .into(),
        ));
    }
    let (root, at) = pickle(at, "state dict")?;
    let entries = state_dict(&root).map_err(error)?;
    let (keys, mut at) = pickle(at, "storage keys")?;
    let Value::List(keys) = keys else {
        return Err(legacy("storage keys", "not a list".into()));
    };
    // The raw storages, in the keys' order, each `elements: i64` then its bytes.
    let mut raw: HashMap<String, &[u8]> = HashMap::new();
    for key in &keys.items {
        let Value::Str(key) = key else {
            return Err(legacy("storage keys", format!("a key is a {}", key.kind())));
        };
        let count = bytes
            .get(at..at + 8)
            .and_then(|b| b.first_chunk::<8>())
            .map(|b| u64::from_le_bytes(*b))
            .ok_or_else(|| legacy("storages", format!("storage {key} is cut off")))?;
        let size = entries
            .iter()
            .map(|(_, v)| &v.storage)
            .find(|s| *s.key == **key)
            .map(|s| s.dtype.size())
            .ok_or_else(|| legacy("storages", format!("no tensor uses storage {key}")))?;
        let length = count
            .checked_mul(size)
            .and_then(|n| usize::try_from(n).ok())
            .filter(|&n| n <= bytes.len())
            .ok_or_else(|| legacy("storages", format!("storage {key} claims {count} elements")))?;
        let start = at + 8;
        let data = bytes
            .get(start..start + length)
            .ok_or_else(|| legacy("storages", format!("storage {key} is cut off")))?;
        raw.insert(key.to_string(), data);
        at = start + length;
    }
    tensors_of(path, entries, |name, storage| {
        let data = raw.get(&storage.key).ok_or_else(|| {
            format!(
                "storage {}, of tensor {name:?}, is not in the file",
                storage.key
            )
        })?;
        if data.len() as u64 != storage_bytes(storage)? {
            return Err(format!(
                "storage {} holds {} bytes, tensor {name:?} needs {} {} elements",
                storage.key,
                data.len(),
                storage.elements,
                storage.dtype.name()
            ));
        }
        Ok(data.to_vec())
    })
}

/// The state dict's tensors, each storage's bytes fetched once by `read`.
fn tensors_of(
    path: &Path,
    entries: Vec<(String, Rc<View>)>,
    mut read: impl FnMut(&str, &Storage) -> Step<Vec<u8>>,
) -> Result<Loaded> {
    let error = |detail: String| Error::data(path, detail);
    let mut storages: HashMap<String, Vec<u8>> = HashMap::new();
    let (mut tensors, mut integers) = (Vec::new(), Vec::new());
    for (name, view) in entries {
        let storage = &view.storage;
        if !storages.contains_key(&storage.key) {
            if let Dtype::Other(_) = storage.dtype {
                return Err(error(unsupported_dtype(&name, storage.dtype)));
            }
            let bytes = read(&name, storage).map_err(error)?;
            storages.insert(storage.key.clone(), bytes);
        }
        let bytes = storages
            .get(&storage.key)
            .ok_or_else(|| error(format!("storage data/{} was not read", storage.key)))?;
        let expected = storage_bytes(storage).map_err(error)?;
        if bytes.len() as u64 != expected {
            return Err(error(format!(
                "tensors disagree on the size of storage data/{}: {name:?} needs {expected} bytes, \
                 it holds {}",
                storage.key,
                bytes.len()
            )));
        }
        let shape = &view.shape;
        match storage.dtype {
            Dtype::F32 => {
                let values = gather(&view, bytes, f32::from_le_bytes);
                tensors.push(shaped(path, name, shape, values)?);
            }
            Dtype::F16 => {
                let values = gather(&view, bytes, |b| f16_to_f32(u16::from_le_bytes(b)));
                tensors.push(shaped(path, name, shape, values)?);
            }
            Dtype::Bf16 => {
                let values = gather(&view, bytes, |b| bf16_to_f32(u16::from_le_bytes(b)));
                tensors.push(shaped(path, name, shape, values)?);
            }
            Dtype::F64 => {
                // Rounded to nearest, ties to even, as torch's `.float()`.
                let values = gather(&view, bytes, |b| f64::from_le_bytes(b) as f32);
                tensors.push(shaped(path, name, shape, values)?);
            }
            Dtype::I64 => {
                let values = gather(&view, bytes, i64::from_le_bytes);
                integers.push(shaped(path, name, shape, values)?);
            }
            Dtype::I32 => {
                let values = gather(&view, bytes, |b| i64::from(i32::from_le_bytes(b)));
                integers.push(shaped(path, name, shape, values)?);
            }
            Dtype::Other(_) => return Err(error(unsupported_dtype(&name, storage.dtype))),
        }
    }
    Ok((tensors, integers))
}

/// A named array from gathered values.
fn shaped<T>(
    path: &Path,
    name: String,
    shape: &[usize],
    values: Step<Vec<T>>,
) -> Result<(String, ArrayD<T>)> {
    let values = values.map_err(|e| Error::data(path, format!("tensor {name:?}: {e}")))?;
    let array = ArrayD::from_shape_vec(IxDyn(shape), values)
        .map_err(|e| Error::data(path, format!("tensor {name:?}: {e}")))?;
    Ok((name, array))
}

fn unsupported_dtype(name: &str, dtype: Dtype) -> String {
    format!(
        "tensor {name:?} has dtype {}; wgcnn reads float32, float16, bfloat16 and float64 \
         (as f32) and int64 and int32 (as int64): convert it before saving",
        dtype.name()
    )
}

/// The one folder holding `data.pkl` (torch names it after the file; any name is accepted).
fn pickle_folder(archive: &Archive<'_>) -> std::result::Result<String, String> {
    let mut folders = Vec::new();
    let mut torchscript = false;
    for name in archive.file_names_raw() {
        if let Some(folder) = name.strip_suffix(b"/data.pkl")
            && !folder.is_empty()
            && !folder.contains(&b'/')
        {
            folders.push(folder.to_vec());
        }
        torchscript |= name.ends_with(b"/constants.pkl");
    }
    match folders.as_slice() {
        [folder] => String::from_utf8(folder.clone())
            .map_err(|_| "the archive's folder name is not UTF-8".to_string()),
        [] if torchscript => Err("this is a TorchScript archive (torch.jit.save), not a \
                                  state_dict: save model.state_dict() with torch.save"
            .into()),
        [] => Err(
            "the zip holds no <folder>/data.pkl: not a checkpoint written by torch.save \
                   (a damaged file, or another kind of zip)"
                .into(),
        ),
        _ => Err("the zip holds more than one <folder>/data.pkl; torch.save writes one".into()),
    }
}

/// Entry `name`, decompressed as it is read (`by_name_raw` would hand back the compressed
/// bytes), or `None` if the archive has none.
fn open_entry<'z, 'a>(
    archive: &'z mut Archive<'a>,
    name: &str,
) -> std::result::Result<Option<zip::read::ZipFile<'z, Cursor<&'a [u8]>>>, String> {
    let Some(index) = archive.index_for_name_raw(name.as_bytes()) else {
        return Ok(None);
    };
    archive
        .by_index(index)
        .map(Some)
        .map_err(|e| format!("cannot open {name} in the archive: {e}"))
}

/// The bytes of entry `name`, or `None` if the archive has no such entry; at most `limit` bytes.
fn read_entry(
    archive: &mut Archive<'_>,
    name: &str,
    limit: u64,
) -> std::result::Result<Option<Vec<u8>>, String> {
    let Some(entry) = open_entry(archive, name)? else {
        return Ok(None);
    };
    if entry.size() > limit {
        return Err(format!(
            "{name} is {} bytes, more than the {limit} wgcnn reads",
            entry.size()
        ));
    }
    let mut bytes = Vec::new();
    entry
        .take(limit)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read {name} from the archive (damaged?): {e}"))?;
    Ok(Some(bytes))
}

/// The byte length of a storage: elements × element size, checked.
fn storage_bytes(storage: &Storage) -> std::result::Result<u64, String> {
    storage
        .elements
        .checked_mul(storage.dtype.size())
        .ok_or_else(|| {
            format!(
                "storage data/{} claims {} elements, more than any file holds",
                storage.key, storage.elements
            )
        })
}

/// Reads storage `data/<key>` whole, after checking its size against the pickle's claim.
fn read_storage(
    archive: &mut Archive<'_>,
    folder: &str,
    tensor: &str,
    storage: &Storage,
) -> std::result::Result<Vec<u8>, String> {
    if let Dtype::Other(_) = storage.dtype {
        return Err(unsupported_dtype(tensor, storage.dtype));
    }
    let expected = storage_bytes(storage)?;
    let name = format!("{folder}/data/{}", storage.key);
    let entry = open_entry(archive, &name)?.ok_or_else(|| {
        format!("{name}, the storage of tensor {tensor:?}, is missing from the archive")
    })?;
    let short = |held: u64| {
        format!(
            "{name} holds {held} bytes, but tensor {tensor:?} needs a storage of {} {} elements \
             ({expected} bytes): the file is damaged",
            storage.elements,
            storage.dtype.name()
        )
    };
    if entry.size() != expected {
        return Err(short(entry.size()));
    }
    // No capacity from the header: the buffer grows only as bytes actually arrive.
    let mut bytes = Vec::new();
    entry
        .take(expected)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read {name} from the archive (damaged?): {e}"))?;
    if bytes.len() as u64 != expected {
        return Err(short(bytes.len() as u64));
    }
    Ok(bytes)
}

/// The view's elements in row-major order, each decoded from its `N` bytes.
fn gather<T, const N: usize>(
    view: &View,
    bytes: &[u8],
    decode: impl Fn([u8; N]) -> T,
) -> std::result::Result<Vec<T>, String> {
    let outside = || format!("storage data/{} is read past its end", view.storage.key);
    let element = |index: u64| -> std::result::Result<T, String> {
        let start = usize::try_from(index)
            .ok()
            .and_then(|i| i.checked_mul(N))
            .ok_or_else(outside)?;
        let chunk = bytes.get(start..).and_then(|b| b.first_chunk::<N>());
        chunk.map(|c| decode(*c)).ok_or_else(outside)
    };
    // Validated when the view was built: no more elements than its storage holds.
    let count: usize = view.shape.iter().product();
    let mut values = Vec::with_capacity(count);
    if count == 0 {
        return Ok(values);
    }
    let rank = view.shape.len();
    let mut index = vec![0usize; rank];
    for _ in 0..count {
        let mut at = view.offset;
        for (i, stride) in index.iter().zip(&view.strides) {
            at = (*i as u64)
                .checked_mul(*stride)
                .and_then(|step| at.checked_add(step))
                .ok_or_else(outside)?;
        }
        values.push(element(at)?);
        // The next index in row-major order.
        for axis in (0..rank).rev() {
            index[axis] += 1;
            if index[axis] < view.shape[axis] {
                break;
            }
            index[axis] = 0;
        }
    }
    Ok(values)
}

/// The `(name, tensor)` entries of the state dict in `root`: the root dict itself, or the
/// dict under its `"state_dict"` or `"model"` key (a training checkpoint).
fn state_dict(root: &Value) -> std::result::Result<Vec<(String, Rc<View>)>, String> {
    let Value::Dict(dict) = root else {
        return Err(match root {
            Value::Tensor(_) => "the file holds a single tensor, not a state_dict: save a dict \
                                 of named tensors (model.state_dict())"
                .into(),
            other => format!(
                "the file holds a {}, not a state_dict (a dict of named tensors): save \
                 model.state_dict()",
                other.kind()
            ),
        });
    };
    let all_tensors =
        |d: &Node<(Value, Value)>| d.items.iter().all(|(_, v)| matches!(v, Value::Tensor(_)));
    let chosen = if all_tensors(dict) {
        dict
    } else {
        let nested = ["state_dict", "model"].iter().find_map(|wanted| {
            dict.items.iter().find_map(|(k, v)| match (k, v) {
                (Value::Str(k), Value::Dict(d)) if &**k == *wanted && all_tensors(d) => Some(d),
                _ => None,
            })
        });
        match nested {
            Some(d) => d,
            None => {
                let (key, value) = dict
                    .items
                    .iter()
                    .find(|(_, v)| !matches!(v, Value::Tensor(_)))
                    .ok_or("the state dict holds no tensors")?;
                let key = match key {
                    Value::Str(s) => format!("{s:?}"),
                    other => other.kind().to_string(),
                };
                return Err(format!(
                    "the file's dict holds {key}, a {}, not a tensor: pass the state_dict itself \
                     (torch.save(model.state_dict(), path)); of a training checkpoint, wgcnn \
                     reads the dict under \"state_dict\" or \"model\"",
                    value.kind()
                ));
            }
        }
    };
    let mut entries = Vec::with_capacity(chosen.items.len());
    for (key, value) in &chosen.items {
        let (Value::Str(name), Value::Tensor(view)) = (key, value) else {
            return Err(format!(
                "a state_dict name is a {}, not a string",
                key.kind()
            ));
        };
        entries.push((name.to_string(), Rc::clone(view)));
    }
    let mut names: Vec<&str> = entries.iter().map(|(n, _)| n.as_str()).collect();
    names.sort_unstable();
    if let Some(pair) = names.windows(2).find(|w| w[0] == w[1]) {
        return Err(format!("the state_dict holds the name {:?} twice", pair[0]));
    }
    Ok(entries)
}

/// The nesting depth of a container holding `items`, within `DEPTH_LIMIT`.
fn container_depth(items: &[Value]) -> Step<u32> {
    let depth = items.iter().map(Value::depth).max().unwrap_or(0) + 1;
    if depth > DEPTH_LIMIT {
        return Err(format!(
            "values nested more than {DEPTH_LIMIT} deep: not a state_dict"
        ));
    }
    Ok(depth)
}

/// The restricted pickle machine.
struct Machine<'a> {
    data: &'a [u8],
    at: usize,
    stack: Vec<Value>,
    /// Stack lengths at each open MARK.
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    /// Objects made so far, against `OBJECT_LIMIT`.
    made: usize,
}

type Step<T> = std::result::Result<T, String>;

impl<'a> Machine<'a> {
    fn new(data: &'a [u8]) -> Self {
        Self {
            data,
            at: 0,
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
            made: 0,
        }
    }

    /// Runs to STOP; the value on top of the stack is the result.
    fn run(self) -> Step<Value> {
        Ok(self.run_prefix()?.0)
    }

    /// Runs to STOP, and returns the result and where the pickle ended (the legacy format
    /// writes several pickles one after another).
    fn run_prefix(mut self) -> Step<(Value, usize)> {
        loop {
            let start = self.at;
            let opcode = self.byte()?;
            let done = self
                .step(opcode)
                .map_err(|e| format!("{e} (opcode 0x{opcode:02x} at byte {start})"))?;
            if done {
                let value = self
                    .stack
                    .pop()
                    .ok_or("the pickle stops with an empty stack")?;
                return Ok((value, self.at));
            }
        }
    }

    fn charge(&mut self, count: usize) -> Step<()> {
        self.made = self.made.saturating_add(count);
        if self.made > OBJECT_LIMIT {
            return Err(format!(
                "more than {OBJECT_LIMIT} objects: not a state_dict wgcnn reads"
            ));
        }
        Ok(())
    }

    fn take(&mut self, count: usize) -> Step<&'a [u8]> {
        let end = self.at.checked_add(count).filter(|&e| e <= self.data.len());
        let end = end.ok_or("the pickle ends early (truncated data.pkl?)")?;
        let bytes = &self.data[self.at..end];
        self.at = end;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self) -> Step<[u8; N]> {
        let bytes = self.take(N)?;
        bytes
            .first_chunk::<N>()
            .copied()
            .ok_or_else(|| "the pickle ends early".into())
    }

    fn byte(&mut self) -> Step<u8> {
        Ok(self.array::<1>()?[0])
    }

    fn length(&mut self, count: u64) -> Step<usize> {
        usize::try_from(count).map_err(|_| format!("a length of {count} bytes"))
    }

    fn string(&mut self, count: usize) -> Step<()> {
        let bytes = self.take(count)?;
        let text = std::str::from_utf8(bytes).map_err(|_| "a string is not UTF-8")?;
        self.push(Value::Str(Rc::from(text)))
    }

    /// One newline-terminated line of GLOBAL's text.
    fn line(&mut self) -> Step<&'a str> {
        let rest = self.data.get(self.at..).unwrap_or_default();
        let end = rest
            .iter()
            .take(256)
            .position(|&b| b == b'\n')
            .ok_or("a GLOBAL name without its newline")?;
        let line = self.take(end + 1)?;
        std::str::from_utf8(&line[..end]).map_err(|_| "a GLOBAL name is not UTF-8".into())
    }

    fn push(&mut self, value: Value) -> Step<()> {
        if value.depth() > DEPTH_LIMIT {
            return Err(format!(
                "values nested more than {DEPTH_LIMIT} deep: not a state_dict"
            ));
        }
        self.charge(1)?;
        self.stack.push(value);
        Ok(())
    }

    /// The stack length below which the innermost MARK hides values.
    fn floor(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn pop(&mut self) -> Step<Value> {
        if self.stack.len() <= self.floor() {
            return Err("stack underflow: the pickle is malformed".into());
        }
        self.stack.pop().ok_or_else(|| "stack underflow".into())
    }

    /// The values pushed since the innermost MARK, which is closed.
    fn pop_mark(&mut self) -> Step<Vec<Value>> {
        let mark = self.marks.pop().ok_or("no MARK to close")?;
        if mark > self.stack.len() {
            return Err("stack underflow below a MARK".into());
        }
        Ok(self.stack.split_off(mark))
    }

    fn top(&mut self) -> Step<&mut Value> {
        if self.stack.len() <= self.floor() {
            return Err("stack underflow: the pickle is malformed".into());
        }
        self.stack
            .last_mut()
            .ok_or_else(|| "stack underflow".into())
    }

    fn tuple(&mut self, items: Vec<Value>) -> Step<()> {
        let depth = container_depth(&items)?;
        self.push(Value::Tuple(Rc::new(Node { depth, items })))
    }

    fn int(&mut self, value: i64) -> Step<()> {
        self.push(Value::Int(value))
    }

    /// LONG1/LONG4: little-endian two's complement of up to 8 bytes.
    fn long(&mut self, count: usize) -> Step<()> {
        if count > 8 {
            return Err(format!(
                "an integer of {count} bytes, wider than 64 bits: no size fits that"
            ));
        }
        let bytes = self.take(count)?;
        let fill = if bytes.last().is_some_and(|b| b & 0x80 != 0) {
            0xff
        } else {
            0
        };
        let mut wide = [fill; 8];
        wide[..count].copy_from_slice(bytes);
        self.int(i64::from_le_bytes(wide))
    }

    fn memo_put(&mut self, index: u32) -> Step<()> {
        let value = self.top()?.clone();
        self.charge(1)?;
        self.memo.insert(index, value);
        Ok(())
    }

    fn memo_get(&mut self, index: u32) -> Step<()> {
        let value = self
            .memo
            .get(&index)
            .cloned()
            .ok_or_else(|| format!("memo entry {index} is read before it is written"))?;
        self.push(value)
    }

    fn global(&mut self, module: &str, name: &str) -> Step<()> {
        let global = match (module, name) {
            ("collections", "OrderedDict") => Global::OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensor,
            ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
            ("torch._utils", "_rebuild_parameter_with_state") => Global::RebuildParameterWithState,
            ("torch", storage) if Dtype::of_storage(storage).is_some() => {
                Global::Storage(Dtype::of_storage(storage).ok_or("no storage type")?)
            }
            // What torch writes for dtypes without a typed storage (uint16, float8, ...).
            ("torch._utils", "_rebuild_tensor_v3") | ("torch.storage", "UntypedStorage") => {
                return Err(format!(
                    "a tensor in a dtype wgcnn does not read ({module}.{name}: uint16, uint32, \
                     float8 and the like); convert it to float32 before saving"
                ));
            }
            _ if module == "__main__" || module.starts_with("torch.nn") => {
                return Err(format!(
                    "the file holds a whole pickled module or object ({module}.{name}), not a \
                     state_dict: save model.state_dict() instead (torch.save(model.state_dict(), \
                     path)); wgcnn never runs code from a checkpoint"
                ));
            }
            _ => {
                return Err(format!(
                    "the pickle calls {module}.{name}, which is not allowed: wgcnn reads \
                     state_dicts of tensors and never runs code from a checkpoint"
                ));
            }
        };
        self.push(Value::Global(global))
    }

    fn reduce(&mut self) -> Step<()> {
        let args = self.pop()?;
        let callable = self.pop()?;
        let Value::Tuple(args) = args else {
            return Err(format!(
                "REDUCE's arguments are a {}, not a tuple",
                args.kind()
            ));
        };
        let Value::Global(global) = callable else {
            return Err(format!("REDUCE calls a {}", callable.kind()));
        };
        let args = args.items.as_slice();
        let value = match (global, args) {
            (Global::OrderedDict, []) => Value::Dict(Rc::default()),
            (Global::RebuildTensor, [storage, offset, size, stride, _, _])
            | (Global::RebuildTensor, [storage, offset, size, stride, _, _, _]) => {
                Value::Tensor(Rc::new(view(storage, offset, size, stride)?))
            }
            (Global::RebuildParameter, [tensor @ Value::Tensor(_), _, _])
            | (Global::RebuildParameterWithState, [tensor @ Value::Tensor(_), _, _, _]) => {
                tensor.clone()
            }
            (Global::Storage(dtype), _) => {
                return Err(format!(
                    "a {} storage type is called; torch.save names it only in a storage reference",
                    dtype.name()
                ));
            }
            (global, args) => {
                return Err(format!(
                    "{global:?} is called with {} unexpected arguments",
                    args.len()
                ));
            }
        };
        self.push(value)
    }

    /// BINPERSID: `('storage', storage type, key, location, elements)`, with a sixth item
    /// `None` in the legacy format (a view of another storage, which torch.save stopped
    /// writing long ago, is refused).
    fn persistent(&mut self) -> Step<()> {
        let id = self.pop()?;
        let Value::Tuple(id) = &id else {
            return Err(format!("a persistent id is a {}, not a tuple", id.kind()));
        };
        let ([
            Value::Str(tag),
            Value::Global(Global::Storage(dtype)),
            Value::Str(key),
            Value::Str(_location),
            Value::Int(elements),
        ]
        | [
            Value::Str(tag),
            Value::Global(Global::Storage(dtype)),
            Value::Str(key),
            Value::Str(_location),
            Value::Int(elements),
            Value::None,
        ]) = id.items.as_slice()
        else {
            return Err("a persistent id is not ('storage', type, key, location, elements)".into());
        };
        if &**tag != "storage" {
            return Err(format!("a persistent id of kind {tag:?}, not 'storage'"));
        }
        if key.is_empty() || key.len() > 64 || key.contains('/') {
            return Err(format!("a storage key {key:?} that is no file name"));
        }
        let elements = u64::try_from(*elements)
            .map_err(|_| format!("storage {key:?} has {elements} elements"))?;
        self.push(Value::Storage(Rc::new(Storage {
            key: key.to_string(),
            dtype: *dtype,
            elements,
        })))
    }

    /// Executes one opcode; true at STOP.
    fn step(&mut self, opcode: u8) -> Step<bool> {
        match opcode {
            // PROTO
            0x80 => {
                let version = self.byte()?;
                if !(2..=5).contains(&version) {
                    return Err(format!(
                        "pickle protocol {version}; torch.save writes 2 to 5"
                    ));
                }
            }
            // FRAME: a length hint only.
            0x95 => {
                self.take(8)?;
            }
            b'}' => self.push(Value::Dict(Rc::default()))?,
            b']' => self.push(Value::List(Rc::default()))?,
            b')' => self.tuple(Vec::new())?,
            b'(' => {
                self.charge(1)?;
                self.marks.push(self.stack.len());
            }
            b'X' => {
                let n = u32::from_le_bytes(self.array()?);
                let n = self.length(u64::from(n))?;
                self.string(n)?;
            }
            0x8c => {
                let n = usize::from(self.byte()?);
                self.string(n)?;
            }
            0x8d => {
                let n = u64::from_le_bytes(self.array()?);
                let n = self.length(n)?;
                self.string(n)?;
            }
            b'q' => {
                let i = self.byte()?;
                self.memo_put(u32::from(i))?;
            }
            b'r' => {
                let i = u32::from_le_bytes(self.array()?);
                self.memo_put(i)?;
            }
            0x94 => {
                let i = u32::try_from(self.memo.len()).map_err(|_| "too many memo entries")?;
                self.memo_put(i)?;
            }
            b'h' => {
                let i = self.byte()?;
                self.memo_get(u32::from(i))?;
            }
            b'j' => {
                let i = u32::from_le_bytes(self.array()?);
                self.memo_get(i)?;
            }
            b'J' => {
                let v = i32::from_le_bytes(self.array()?);
                self.int(i64::from(v))?;
            }
            b'K' => {
                let v = self.byte()?;
                self.int(i64::from(v))?;
            }
            b'M' => {
                let v = u16::from_le_bytes(self.array()?);
                self.int(i64::from(v))?;
            }
            0x8a => {
                let n = usize::from(self.byte()?);
                self.long(n)?;
            }
            0x8b => {
                let n = u32::from_le_bytes(self.array()?);
                let n = self.length(u64::from(n))?;
                self.long(n)?;
            }
            b'G' => {
                self.take(8)?;
                self.push(Value::Float)?;
            }
            0x88 | 0x89 => self.push(Value::Bool(opcode == 0x88))?,
            b'N' => self.push(Value::None)?,
            b't' => {
                let items = self.pop_mark()?;
                self.tuple(items)?;
            }
            0x85..=0x87 => {
                let count = usize::from(opcode - 0x84);
                let mut items = Vec::with_capacity(count);
                for _ in 0..count {
                    items.push(self.pop()?);
                }
                items.reverse();
                self.tuple(items)?;
            }
            b's' => {
                let value = self.pop()?;
                let key = self.pop()?;
                self.set_items(vec![key, value])?;
            }
            b'u' => {
                let items = self.pop_mark()?;
                self.set_items(items)?;
            }
            b'a' => {
                let value = self.pop()?;
                self.append(vec![value])?;
            }
            b'e' => {
                let items = self.pop_mark()?;
                self.append(items)?;
            }
            b'c' => {
                let module = self.line()?;
                let name = self.line()?;
                self.global(module, name)?;
            }
            0x93 => {
                let name = self.pop()?;
                let module = self.pop()?;
                let (Value::Str(module), Value::Str(name)) = (&module, &name) else {
                    return Err("STACK_GLOBAL without two strings".into());
                };
                self.global(module, name)?;
            }
            b'R' => self.reduce()?,
            b'Q' => self.persistent()?,
            b'b' => {
                // An OrderedDict's state (`_metadata`): not needed to read tensors.
                let _state = self.pop()?;
                let target = self.top()?;
                if !matches!(target, Value::Dict(_)) {
                    return Err(format!("BUILD on a {}", target.kind()));
                }
            }
            b'.' => return Ok(true),
            other => {
                let name = match other {
                    0x81 => "NEWOBJ",
                    0x92 => "NEWOBJ_EX",
                    b'i' => "INST",
                    b'o' => "OBJ",
                    b'P' => "PERSID",
                    b'S' | b'T' | b'U' => "a protocol-0/1 string",
                    _ => "an opcode",
                };
                return Err(format!(
                    "{name} (0x{other:02x}), which torch.save does not write for a state_dict"
                ));
            }
        }
        Ok(false)
    }

    /// SETITEM(S): key-value pairs into the dict below them.
    fn set_items(&mut self, items: Vec<Value>) -> Step<()> {
        if !items.len().is_multiple_of(2) {
            return Err("SETITEMS with an odd number of values".into());
        }
        let depth = container_depth(&items)?;
        let shared = match self.top()? {
            Value::Dict(dict) => Rc::strong_count(dict) > 1,
            other => return Err(format!("SETITEM on a {}, not a dict", other.kind())),
        };
        self.charge_copy(shared)?;
        let Value::Dict(dict) = self.top()? else {
            return Err("SETITEM on a value that is no dict".into());
        };
        let dict = Rc::make_mut(dict);
        dict.depth = dict.depth.max(depth);
        let mut items = items.into_iter();
        while let (Some(key), Some(value)) = (items.next(), items.next()) {
            dict.items.push((key, value));
        }
        Ok(())
    }

    /// APPEND(S): values onto the list below them.
    fn append(&mut self, items: Vec<Value>) -> Step<()> {
        let depth = container_depth(&items)?;
        let shared = match self.top()? {
            Value::List(list) => Rc::strong_count(list) > 1,
            other => return Err(format!("APPEND on a {}, not a list", other.kind())),
        };
        self.charge_copy(shared)?;
        let Value::List(list) = self.top()? else {
            return Err("APPEND on a value that is no list".into());
        };
        let list = Rc::make_mut(list);
        list.depth = list.depth.max(depth);
        list.items.extend(items);
        Ok(())
    }

    /// Charges the copy a write to a shared container makes (its item count).
    fn charge_copy(&mut self, shared: bool) -> Step<()> {
        if !shared {
            return Ok(());
        }
        let count = match self.top()? {
            Value::Dict(d) => d.items.len(),
            Value::List(l) => l.items.len(),
            _ => 0,
        };
        self.charge(count)
    }
}

/// `_rebuild_tensor_v2`'s view, checked: every element inside the storage, no more elements
/// than the storage holds.
fn view(storage: &Value, offset: &Value, size: &Value, stride: &Value) -> Step<View> {
    let Value::Storage(storage) = storage else {
        return Err(format!(
            "a tensor's storage is a {}, not a storage reference",
            storage.kind()
        ));
    };
    let key = &storage.key;
    let numbers = |value: &Value, what: &str| -> Step<Vec<u64>> {
        let Value::Tuple(tuple) = value else {
            return Err(format!(
                "a tensor's {what} is a {}, not a tuple",
                value.kind()
            ));
        };
        if tuple.items.len() > RANK_LIMIT {
            return Err(format!(
                "a tensor of {} dimensions (at most {RANK_LIMIT})",
                tuple.items.len()
            ));
        }
        tuple
            .items
            .iter()
            .map(|v| match v {
                Value::Int(n) => u64::try_from(*n)
                    .map_err(|_| format!("a tensor of storage {key:?} has a negative {what} {n}")),
                other => Err(format!("a tensor's {what} holds a {}", other.kind())),
            })
            .collect()
    };
    let shape = numbers(size, "size")?;
    let strides = numbers(stride, "stride")?;
    if shape.len() != strides.len() {
        return Err(format!(
            "a tensor of storage {key:?} has {} sizes but {} strides",
            shape.len(),
            strides.len()
        ));
    }
    let Value::Int(offset) = offset else {
        return Err(format!("a tensor's offset is a {}", offset.kind()));
    };
    let offset = u64::try_from(*offset)
        .map_err(|_| format!("a tensor of storage {key:?} has a negative offset {offset}"))?;
    let too_large = || format!("a tensor of storage {key:?} has sizes {shape:?}: too large");
    // Nonzero sizes must multiply to an addressable count even when another size is 0.
    shape
        .iter()
        .try_fold(1u64, |n, &d| n.checked_mul(d.max(1)))
        .filter(|&n| n <= isize::MAX as u64)
        .ok_or_else(too_large)?;
    let count: u64 = shape.iter().product();
    if count > storage.elements {
        let broadcast = shape.iter().zip(&strides).any(|(&d, &s)| d > 1 && s == 0);
        return Err(format!(
            "a tensor of {count} elements views storage {key:?} of only {} elements{}",
            storage.elements,
            if broadcast {
                "; a broadcast (stride 0) view larger than its storage is not read: save it \
                 .contiguous()"
            } else {
                ""
            }
        ));
    }
    if count > 0 {
        // The last element the view reaches.
        let last = shape
            .iter()
            .zip(&strides)
            .try_fold(offset, |at, (&d, &s)| {
                s.checked_mul(d - 1).and_then(|step| at.checked_add(step))
            })
            .ok_or_else(|| {
                format!("a tensor of storage {key:?} has strides {strides:?} that overflow")
            })?;
        if last >= storage.elements {
            return Err(format!(
                "a tensor (offset {offset}, sizes {shape:?}, strides {strides:?}) reaches element \
                 {last} of storage {key:?}, which holds {} elements",
                storage.elements
            ));
        }
    }
    let shape = shape
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| too_large()))
        .collect::<Step<Vec<usize>>>()?;
    // A size-1 axis never moves: its stride may be anything, so take 0.
    let strides = shape
        .iter()
        .zip(strides)
        .map(|(&d, s)| if d == 1 { 0 } else { s })
        .collect();
    Ok(View {
        storage: Rc::clone(storage),
        offset,
        shape,
        strides,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_precision_converts_exactly() {
        // Every f16 against the exact value it denotes, computed in f64.
        for bits in 0..=u16::MAX {
            let sign = if bits >> 15 == 1 { -1.0 } else { 1.0 };
            let exponent = i32::from((bits >> 10) & 0x1f);
            let mantissa = f64::from(bits & 0x3ff);
            let got = f16_to_f32(bits);
            match exponent {
                31 if mantissa == 0.0 => assert_eq!(f64::from(got), sign * f64::INFINITY),
                31 => {
                    assert!(got.is_nan());
                    assert_eq!(got.is_sign_negative(), sign < 0.0);
                }
                0 => assert_eq!(
                    f64::from(got),
                    sign * mantissa * 2f64.powi(-24),
                    "{bits:#x}"
                ),
                e => assert_eq!(
                    f64::from(got),
                    sign * (1.0 + mantissa / 1024.0) * 2f64.powi(e - 15),
                    "{bits:#x}"
                ),
            }
            if exponent == 0 && mantissa == 0.0 {
                assert_eq!(got.is_sign_negative(), sign < 0.0);
            }
        }
        assert_eq!(bf16_to_f32(0x3f80), 1.0);
        assert_eq!(bf16_to_f32(0x0001), f32::from_bits(0x0001_0000));
    }

    #[test]
    fn views_must_stay_inside_their_storage() {
        let storage = Value::Storage(Rc::new(Storage {
            key: "0".into(),
            dtype: Dtype::F32,
            elements: 6,
        }));
        let tuple = |v: &[i64]| {
            Value::Tuple(Rc::new(Node {
                depth: 1,
                items: v.iter().map(|&n| Value::Int(n)).collect(),
            }))
        };
        let ok = view(&storage, &Value::Int(0), &tuple(&[3, 2]), &tuple(&[1, 3])).unwrap();
        let bytes: Vec<u8> = (0..6).flat_map(|v| (v as f32).to_le_bytes()).collect();
        let t = gather(&ok, &bytes, f32::from_le_bytes).unwrap();
        assert_eq!(t, [0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
        for (offset, size, stride) in [
            (1, vec![3, 2], vec![1, 3]),
            (0, vec![7], vec![1]),
            (0, vec![2, 2], vec![i64::MAX, 1]),
            (-1, vec![1], vec![1]),
            (0, vec![2], vec![-1]),
        ] {
            let r = view(
                &storage,
                &Value::Int(offset),
                &tuple(&size),
                &tuple(&stride),
            );
            assert!(r.is_err(), "{offset} {size:?} {stride:?}");
        }
    }
}
