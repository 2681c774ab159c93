//! `l1l2_rs._l1l2_rs`: the thin PyO3 layer over `l1l2-core`.
//!
//! Each function converts its arguments, runs the core with the GIL released and converts the
//! result. Objects that are not already a native-order, aligned numpy array of a supported dtype
//! go through `l1l2_rs._arrays.coerce` (Python), which owns the conversion policy and its errors.

use l1l2_core::{bf16, f16, Element, StridedView, Sums};
use numpy::{
    Element as NumpyElement, PyArrayDescr, PyArrayDescrMethods, PyArrayDyn, PyArrayMethods,
    PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyBufferError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyType;

/// Below this many elements the call is over before releasing the GIL would pay off.
const DETACH_MIN_LEN: usize = 1 << 13;

/// The element types the core reduces, identified from a numpy dtype.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    F16,
    Bf16,
    F32,
    F64,
    I8,
    I16,
    I32,
    I64,
    U8,
    U16,
    U32,
    U64,
    Bool,
}

impl Kind {
    /// The kind of a native-byte-order dtype the core supports, else `None`.
    fn of(py: Python<'_>, dtype: &Bound<'_, PyArrayDescr>) -> Option<Self> {
        if !dtype.is_native_byteorder().unwrap_or(true) {
            return None;
        }
        let kind = match (dtype.kind(), dtype.itemsize()) {
            (b'f', 2) => Self::F16,
            (b'f', 4) => Self::F32,
            (b'f', 8) => Self::F64,
            (b'i', 1) => Self::I8,
            (b'i', 2) => Self::I16,
            (b'i', 4) => Self::I32,
            (b'i', 8) => Self::I64,
            (b'u', 1) => Self::U8,
            (b'u', 2) => Self::U16,
            (b'u', 4) => Self::U32,
            (b'u', 8) => Self::U64,
            (b'b', 1) => Self::Bool,
            (b'V', 2) if is_bfloat16(py, dtype) => Self::Bf16,
            _ => return None,
        };
        Some(kind)
    }
}

/// Whether `dtype` is `ml_dtypes.bfloat16` (an array of it exists, so ml_dtypes is imported).
fn is_bfloat16(py: Python<'_>, dtype: &Bound<'_, PyArrayDescr>) -> bool {
    static BFLOAT16: PyOnceLock<Py<PyType>> = PyOnceLock::new();
    BFLOAT16
        .import(py, "ml_dtypes", "bfloat16")
        .is_ok_and(|bfloat16| dtype.typeobj().is(bfloat16))
}

/// An array the core can read in place: supported dtype, native byte order, aligned, strides a
/// multiple of the item size.
fn readable_kind(array: &Bound<'_, PyUntypedArray>) -> Option<Kind> {
    let dtype = array.dtype();
    let kind = Kind::of(array.py(), &dtype)?;
    let itemsize = dtype.itemsize() as isize;
    let strides_ok = array.strides().iter().all(|stride| stride % itemsize == 0);
    (array.is_aligned() && strides_ok).then_some(kind)
}

/// `x` as an array the core can read, converting through `l1l2_rs._arrays.coerce` when needed.
fn readable_array<'py>(x: &Bound<'py, PyAny>) -> PyResult<(Bound<'py, PyUntypedArray>, Kind)> {
    if let Ok(array) = x.cast::<PyUntypedArray>() {
        if let Some(kind) = readable_kind(array) {
            return Ok((array.clone(), kind));
        }
    }
    static COERCE: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    let coerced = COERCE
        .import(x.py(), "l1l2_rs._arrays", "coerce")?
        .call1((x,))?;
    let array = coerced.cast_into::<PyUntypedArray>()?;
    let kind = readable_kind(&array).ok_or_else(|| {
        PyTypeError::new_err(format!(
            "l1l2_rs: cannot read an array of dtype {}",
            array.dtype()
        ))
    })?;
    Ok((array, kind))
}

/// Runs `reduce::<T>` for the element type of `kind`.
macro_rules! dispatch {
    ($kind:expr, $array:expr, $reduce:ident) => {
        match $kind {
            Kind::F16 => $reduce::<f16>($array),
            Kind::Bf16 => $reduce::<bf16>($array),
            Kind::F32 => $reduce::<f32>($array),
            Kind::F64 => $reduce::<f64>($array),
            Kind::I8 => $reduce::<i8>($array),
            Kind::I16 => $reduce::<i16>($array),
            Kind::I32 => $reduce::<i32>($array),
            Kind::I64 => $reduce::<i64>($array),
            Kind::U8 => $reduce::<u8>($array),
            Kind::U16 => $reduce::<u16>($array),
            Kind::U32 => $reduce::<u32>($array),
            Kind::U64 => $reduce::<u64>($array),
            Kind::Bool => reduce_bool($array),
        }
    };
}

/// The sums of `array`, whose dtype `readable_kind` matched to `T`, read in place.
fn reduce<T: Element + NumpyElement>(array: &Bound<'_, PyUntypedArray>) -> PyResult<Sums> {
    let len = array.len();
    if len == 0 {
        return Ok(Sums::default());
    }
    // SAFETY: `readable_kind` matched the dtype's kind, item size and byte order to `T` (bool
    // arrays come as `u8`: same size, and every byte is a valid u8), which is all a typed view
    // relies on; the cast does not touch the data. It skips numpy's own dtype check because that
    // check cannot see bfloat16 unless ml_dtypes registered the name, and would refuse bool as u8.
    let typed = unsafe { array.cast_unchecked::<PyArrayDyn<T>>() };
    let readonly = typed
        .try_readonly()
        .map_err(|err| PyBufferError::new_err(format!("l1l2_rs: array is being written: {err}")))?;
    if readonly.is_c_contiguous() {
        // SAFETY: a C-contiguous array of `len` elements of `T` (dtype matched by
        // `readable_kind`, aligned: checked flag) starts at `data`; `readonly` keeps it alive and
        // registered as borrowed while the slice lives. Writes from Python code running
        // concurrently are as unsynchronised as for any numpy reader.
        let slice = unsafe { std::slice::from_raw_parts(readonly.data(), len) };
        return Ok(detach_if_large(array.py(), len, || l1l2_core::sums(slice)));
    }
    let itemsize = std::mem::size_of::<T>() as isize;
    let shape = readonly.shape();
    let strides: Vec<isize> = readonly.strides().iter().map(|s| s / itemsize).collect();
    // The lowest and highest element the array addresses, relative to its data pointer.
    let (mut low, mut high) = (0isize, 0isize);
    for (&dim, &stride) in shape.iter().zip(&strides) {
        let reach = (dim as isize - 1) * stride;
        if reach < 0 {
            low += reach;
        } else {
            high += reach;
        }
    }
    // SAFETY: for a non-empty numpy array every element `data + sum(i_k * stride_k)` lies inside
    // one allocation owned by the array (or its base), so `data + low ..= data + high` is readable
    // memory; it is aligned for `T` (checked flag; strides are multiples of the item size) and
    // holds valid `T` values of the matched dtype (bool arrays are read as u8). `readonly` keeps
    // the array alive and registered as borrowed for as long as `span` lives.
    let span = unsafe {
        std::slice::from_raw_parts(readonly.data().offset(low), (high - low + 1) as usize)
    };
    let view = StridedView::new(span, (-low) as usize, shape, &strides)
        .map_err(|err| PyValueError::new_err(format!("l1l2_rs: invalid array layout: {err}")))?;
    Ok(detach_if_large(array.py(), len, || view.sums()))
}

/// Runs `work` with the GIL released, unless the input is too small for that to pay.
fn detach_if_large<R: Send>(py: Python<'_>, len: usize, work: impl FnOnce() -> R + Send) -> R {
    if len >= DETACH_MIN_LEN {
        py.detach(work)
    } else {
        work()
    }
}

/// The sums of a bool array. It is read as bytes: a bool view of other bytes (`u8_array.view(bool)`)
/// may hold values other than 0 and 1, which are not valid Rust `bool`s. For bytes,
/// `sum x == sum x^2` exactly when every byte is 0 or 1; otherwise numpy's own truth values
/// (`x != 0`, a copy) are summed instead.
fn reduce_bool(array: &Bound<'_, PyUntypedArray>) -> PyResult<Sums> {
    let sums = reduce::<u8>(array)?;
    if sums.sum_abs == sums.sum_squares {
        return Ok(sums);
    }
    let truth = array.call_method1("__ne__", (0,))?; // a numpy bool scalar for 0-d input
    let (truth, _) = readable_array(&truth)?;
    reduce::<u8>(&truth)
}

fn sums_of<'py>(x: &Bound<'py, PyAny>) -> PyResult<(Sums, Kind, Bound<'py, PyArrayDescr>)> {
    let (array, kind) = readable_array(x)?;
    let sums = dispatch!(kind, &array, reduce)?;
    Ok((sums, kind, array.dtype()))
}

/// `(sum(|x|), sum(x**2))` of an array or array-like, as Python floats computed in float64.
#[pyfunction]
fn sums(x: &Bound<'_, PyAny>) -> PyResult<(f64, f64)> {
    let (sums, _, _) = sums_of(x)?;
    Ok((sums.sum_abs, sums.sum_squares))
}

/// `l1 * sum(|x|) + l2 * sum(x**2)` with `None` terms left out, as a numpy scalar of the input's
/// float dtype (float64 for integer and bool input), rounded once from float64.
#[pyfunction]
#[pyo3(signature = (x, l1, l2))]
fn penalty<'py>(
    x: &Bound<'py, PyAny>,
    l1: Option<f64>,
    l2: Option<f64>,
) -> PyResult<Bound<'py, PyAny>> {
    let (sums, kind, dtype) = sums_of(x)?;
    let value = sums.weighted(l1, l2);
    let py = x.py();
    // Each rounded value is exactly representable in its type, so the conversions are exact.
    match kind {
        Kind::F16 => numpy_scalar(&dtype, f16::from_f64(f16::round_result(value))),
        Kind::Bf16 => numpy_scalar(&dtype, bf16::from_f64(bf16::round_result(value))),
        Kind::F32 => numpy_scalar(&dtype, f32::round_result(value) as f32),
        Kind::F64 => numpy_scalar(&dtype, value),
        _ => numpy_scalar(&numpy::dtype::<f64>(py), value),
    }
}

/// A numpy scalar of `dtype` holding `value` (numpy's C constructor: ~20x cheaper than calling
/// the scalar type from Python).
fn numpy_scalar<'py, T: Copy>(
    dtype: &Bound<'py, PyArrayDescr>,
    value: T,
) -> PyResult<Bound<'py, PyAny>> {
    debug_assert_eq!(dtype.itemsize(), std::mem::size_of::<T>());
    let mut value = value;
    let py = dtype.py();
    // SAFETY: `PyArray_Scalar` copies `itemsize` bytes from `data`, which points at a live `T` of
    // exactly that size whose bit layout is the dtype's (the caller pairs them); it borrows, not
    // steals, `descr`; a null `base` is allowed for non-object, non-void dtypes. It returns a new
    // reference, or null with a Python exception set, which `from_owned_ptr_or_err` turns into
    // an error.
    unsafe {
        let scalar = numpy::npyffi::PY_ARRAY_API.PyArray_Scalar(
            py,
            std::ptr::from_mut(&mut value).cast(),
            dtype.as_dtype_ptr(),
            std::ptr::null_mut(),
        );
        Bound::from_owned_ptr_or_err(py, scalar)
    }
}

/// Benchmark roofline: reads every byte of a C-contiguous array once (XOR of its 8-byte words)
/// through the same call path, chunking and pool as `sums`. Not part of the public API.
#[pyfunction]
fn _read_probe(array: &Bound<'_, PyUntypedArray>) -> PyResult<u64> {
    if !array.is_c_contiguous() {
        return Err(PyValueError::new_err(
            "_read_probe needs a C-contiguous array",
        ));
    }
    let nbytes = array.len() * array.dtype().itemsize();
    if nbytes == 0 {
        return Ok(0);
    }
    // SAFETY: `as_array_ptr` points at the live array object `array` borrows.
    let data = unsafe { (*array.as_array_ptr()).data } as *const u8;
    let skip = data.align_offset(8).min(nbytes);
    let words = (nbytes - skip) / 8;
    // SAFETY: a C-contiguous array's `nbytes` bytes at `data` are readable and stay alive while
    // `array` is borrowed; `data + skip` is 8-aligned and `skip + 8 * words <= nbytes`; every bit
    // pattern is a valid u64.
    let slice = unsafe { std::slice::from_raw_parts(data.add(skip).cast::<u64>(), words) };
    Ok(detach_if_large(array.py(), array.len(), || {
        l1l2_core::probe::read_probe(slice)
    }))
}

/// Sets the thread count for large inputs; 0 restores the default.
#[pyfunction]
fn set_num_threads(threads: usize) {
    l1l2_core::set_num_threads(threads);
}

/// The thread count large inputs are reduced with.
#[pyfunction]
fn get_num_threads() -> usize {
    l1l2_core::num_threads()
}

/// The SIMD instruction set the kernels use on this CPU: "avx512", "avx2" or "baseline".
#[pyfunction]
fn simd_isa() -> &'static str {
    match l1l2_core::isa() {
        l1l2_core::Isa::Avx512 => "avx512",
        l1l2_core::Isa::Avx2 => "avx2",
        l1l2_core::Isa::Baseline => "baseline",
    }
}

#[pymodule(gil_used = false)]
fn _l1l2_rs(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(sums, m)?)?;
    m.add_function(wrap_pyfunction!(penalty, m)?)?;
    m.add_function(wrap_pyfunction!(set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(get_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(simd_isa, m)?)?;
    m.add_function(wrap_pyfunction!(_read_probe, m)?)?;
    m.add("CHUNK_LEN", l1l2_core::parallel::CHUNK)?;
    m.add(
        "PARALLEL_MIN_BYTES",
        l1l2_core::parallel::PARALLEL_MIN_BYTES,
    )?;
    Ok(())
}
