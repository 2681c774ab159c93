//! numpy arrays as core views, and core results as numpy objects. This is the buffer boundary:
//! the only place that turns Python-owned memory into views.

use l1l2_core::{ArrayView, ArrayViewMut, DType};
use numpy::npyffi::{self, NPY_ORDER, PY_ARRAY_API};
use numpy::{PyArrayDescr, PyArrayDescrMethods, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::type_object::PyTypeInfo;
use pyo3::types::PyList;

use crate::errors::{to_py, NotReadable, SINGLE};

/// The core's type of a numpy dtype, or a `TypeError` naming the dtype.
fn dtype_of(descr: &Bound<'_, PyArrayDescr>) -> PyResult<DType> {
    let name = if descr.kind() == b'V' {
        // The scalar type's `__name__` ("bfloat16"): `dtype.name` would run numpy's Python code,
        // ~1.5 us per array. Looked up by a plain string, not `PyType::name`: that one interns
        // "__name__" behind a once-cell, which a child forked mid-initialisation waits on forever.
        descr.typeobj().getattr("__name__")?.extract::<String>()?
    } else {
        String::new()
    };
    DType::from_array_interface(descr.kind(), descr.itemsize(), &name).ok_or_else(|| {
        PyTypeError::new_err(format!(
            "l1l2_rs: unsupported dtype {descr} of the input array (expected {})",
            DType::SUPPORTED
        ))
    })
}

/// Whether the core can address the array's memory as it is: native byte order, aligned, byte
/// strides a multiple of the item size.
fn addressable(array: &Bound<'_, PyUntypedArray>, descr: &Bound<'_, PyArrayDescr>) -> bool {
    let itemsize = descr.itemsize() as isize;
    descr.is_native_byteorder().unwrap_or(true)
        && array.is_aligned()
        && array.strides().iter().all(|stride| stride % itemsize == 0)
}

fn data_pointer(array: &Bound<'_, PyUntypedArray>) -> *mut u8 {
    // SAFETY: `as_array_ptr` points at the live array object that `array` holds a reference to.
    unsafe { (*array.as_array_ptr()).data.cast::<u8>() }
}

/// Whether `array` is a `numpy.ma.MaskedArray` (an ndarray subclass whose data the core would
/// otherwise read unmasked). Plain arrays answer by one type comparison.
fn is_masked(array: &Bound<'_, PyUntypedArray>) -> PyResult<bool> {
    let py = array.py();
    if array.get_type().is(PyUntypedArray::type_object(py)) {
        return Ok(false);
    }
    array.hasattr("_mask")
}

/// `x` as a read view, or `NotReadable` when it is not a numpy array the core can read in place
/// (the Python layer converts it and calls again).
pub(crate) fn read_view<'a>(x: &'a Bound<'_, PyAny>) -> PyResult<ArrayView<'a>> {
    let array = x
        .cast::<PyUntypedArray>()
        .map_err(|_| NotReadable::new_err("not a numpy array"))?;
    if is_masked(array)? {
        // Its data hold values the mask hides: the Python layer fills them with zeros.
        return Err(NotReadable::new_err("a masked array"));
    }
    let descr = array.dtype();
    let dtype = dtype_of(&descr)?;
    if !addressable(array, &descr) {
        return Err(NotReadable::new_err(
            "byte-swapped, unaligned or oddly strided",
        ));
    }
    // SAFETY: a numpy array's shape and strides address elements of its dtype inside memory it
    // owns or keeps alive through its base; `x` holds a reference to the array for `'a`, so the
    // memory outlives the view. Concurrent writes from Python code are as unsynchronised as for
    // any numpy reader.
    unsafe { ArrayView::from_raw_parts(data_pointer(array), dtype, array.shape(), array.strides()) }
        .map_err(|error| to_py(error, SINGLE))
}

/// An argument's name for messages: `x`, or `outs[3]`.
#[derive(Clone, Copy)]
pub(crate) struct Arg<'n> {
    pub name: &'n str,
    pub index: Option<usize>,
}

impl std::fmt::Display for Arg<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.index {
            Some(index) => write!(f, "{}[{index}]", self.name),
            None => f.write_str(self.name),
        }
    }
}

/// `x` as a writable view; `name` names the argument in messages.
pub(crate) fn write_view<'a>(x: &'a Bound<'_, PyAny>, name: Arg<'_>) -> PyResult<ArrayViewMut<'a>> {
    let array = x.cast::<PyUntypedArray>().map_err(|_| {
        PyTypeError::new_err(format!(
            "l1l2_rs: {name} is written in place, so it must be a numpy array, got {}",
            x.get_type()
        ))
    })?;
    if is_masked(array)? {
        return Err(PyTypeError::new_err(format!(
            "l1l2_rs: {name} is a masked array, which cannot be written in place (pass its .data \
             to write through the mask, or np.ma.filled(...))"
        )));
    }
    let descr = array.dtype();
    let dtype = dtype_of(&descr)?;
    // SAFETY: as in `data_pointer`.
    let flags = unsafe { (*array.as_array_ptr()).flags };
    if flags & npyffi::NPY_ARRAY_WRITEABLE == 0 {
        return Err(PyValueError::new_err(format!(
            "l1l2_rs: {name} is read-only (its WRITEABLE flag is False)"
        )));
    }
    if !addressable(array, &descr) {
        return Err(PyValueError::new_err(format!(
            "l1l2_rs: {name} must be aligned and in native byte order to be written in place \
             (dtype {})",
            array.dtype()
        )));
    }
    // SAFETY: as in `read_view`; the array is writeable (checked), and the core checks that no
    // other view of the call shares its memory before it writes.
    unsafe {
        ArrayViewMut::from_raw_parts(data_pointer(array), dtype, array.shape(), array.strides())
    }
    .map_err(|error| PyValueError::new_err(format!("l1l2_rs: {name}: {error}")))
}

/// A new array like `prototype` (dtype, shape, memory order), for a gradient.
pub(crate) fn new_like<'py>(prototype: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
    let array = prototype.cast::<PyUntypedArray>()?;
    let py = prototype.py();
    // SAFETY: `PyArray_NewLikeArray` reads the live prototype array; a null descr means "the
    // prototype's" (it is not stolen); it returns a new reference or null with an exception set.
    unsafe {
        let new = PY_ARRAY_API.PyArray_NewLikeArray(
            py,
            array.as_array_ptr(),
            NPY_ORDER::NPY_KEEPORDER,
            std::ptr::null_mut(),
            0,
        );
        Bound::from_owned_ptr_or_err(py, new)
    }
}

/// The penalty of an input of `dtype` as a numpy scalar of the result type (the input's float
/// dtype, float64 otherwise); `value` is already rounded to it.
pub(crate) fn penalty_scalar<'py>(
    x: &Bound<'py, PyAny>,
    dtype: DType,
    value: f64,
) -> PyResult<Bound<'py, PyAny>> {
    let py = x.py();
    let descr = if dtype.result_dtype() == dtype {
        x.cast::<PyUntypedArray>()?.dtype()
    } else {
        numpy::dtype::<f64>(py)
    };
    let mut bytes = dtype.encode_result(value);
    numpy_scalar(&descr, &mut bytes)
}

/// A numpy scalar of `descr` from its native bytes (numpy's C constructor: ~20x cheaper than
/// calling the scalar type from Python).
fn numpy_scalar<'py>(
    descr: &Bound<'py, PyArrayDescr>,
    bytes: &mut [u8; 8],
) -> PyResult<Bound<'py, PyAny>> {
    debug_assert!(descr.itemsize() <= bytes.len());
    let py = descr.py();
    // SAFETY: `PyArray_Scalar` copies `itemsize` (<= 8) bytes from `bytes`, which hold a value of
    // the descr's type (`encode_result`); it borrows, not steals, `descr`; a null `base` is allowed
    // for non-object, non-void dtypes (bfloat16's scalar type copies its two bytes). It returns a
    // new reference, or null with a Python exception set.
    unsafe {
        let scalar = PY_ARRAY_API.PyArray_Scalar(
            py,
            bytes.as_mut_ptr().cast(),
            descr.as_dtype_ptr(),
            std::ptr::null_mut(),
        );
        Bound::from_owned_ptr_or_err(py, scalar)
    }
}

/// The items of a list argument.
pub(crate) fn items<'py>(list: &Bound<'py, PyAny>, name: &str) -> PyResult<Vec<Bound<'py, PyAny>>> {
    if let Ok(list) = list.cast::<PyList>() {
        return Ok(list.iter().collect());
    }
    list.try_iter()
        .map_err(|_| {
            PyTypeError::new_err(format!(
                "l1l2_rs: {name} must be a list of arrays, got {}",
                list.get_type()
            ))
        })?
        .collect()
}
