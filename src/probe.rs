//! The benchmarks' read-bandwidth roofline, built only with the `probe` feature.

use numpy::{PyArrayDescrMethods, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

/// Benchmark roofline: reads every byte of a C-contiguous array once (XOR of its 8-byte words)
/// through the same call path, chunking and pool as `sums`. Not part of the public API.
#[pyfunction]
pub(crate) fn _read_probe(array: &Bound<'_, PyUntypedArray>) -> PyResult<u64> {
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
    Ok(array.py().detach(|| l1l2_core::probe::read_probe(slice)))
}

/// Benchmark aid: sets the parallel threshold in bytes of work (`0` restores the default), so
/// that `benches/threshold.py` can time two threads below it. Not part of the public API.
#[pyfunction]
pub(crate) fn _set_parallel_min_bytes(bytes: usize) {
    l1l2_core::parallel::set_min_bytes_for_measurement(bytes);
}
