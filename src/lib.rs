//! `l1l2_rs._l1l2_rs`: the thin PyO3 layer over `l1l2-core`.
//!
//! Each function turns numpy arrays into core views (`arrays`), runs the core with the GIL
//! released and converts the result (`functions`); core errors become Python exceptions
//! (`errors`). Objects that are not numpy arrays the core can read in place raise `NotReadable`,
//! and the Python layer converts them with numpy and calls again: nothing here calls back into
//! Python but the regularizers' native `__call__` (`regularizer`), which hands such objects to its
//! Python subclass.

mod arrays;
mod checkpoint;
mod errors;
mod functions;
mod orthogonal;
mod partials;
#[cfg(feature = "probe")]
mod probe;
mod regularizer;
mod xla_ffi;

use numpy::PyArrayDescrMethods;
use pyo3::prelude::*;
use pyo3::type_object::PyTypeInfo;

#[pymodule(gil_used = false)]
fn _l1l2_rs(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // rust-numpy looks up numpy's C API and its ABI version lazily, behind once-cells: done here,
    // at import, before any thread can be inside that first lookup when the process forks (the
    // child would wait on it forever).
    numpy::PyUntypedArray::type_object(m.py());
    numpy::dtype::<f64>(m.py()).itemsize();
    arrays::init_masked_array(m.py())?;
    // The same for the state the thread pool's workers share.
    l1l2_core::parallel::init_globals();
    m.add_function(wrap_pyfunction!(functions::sums, m)?)?;
    m.add_function(wrap_pyfunction!(functions::penalty, m)?)?;
    m.add_function(wrap_pyfunction!(functions::value_and_grad, m)?)?;
    m.add_function(wrap_pyfunction!(functions::prox_, m)?)?;
    m.add_function(wrap_pyfunction!(functions::sums_many, m)?)?;
    m.add_function(wrap_pyfunction!(functions::penalty_many, m)?)?;
    m.add_function(wrap_pyfunction!(functions::value_and_grad_many, m)?)?;
    m.add_function(wrap_pyfunction!(functions::prox_many_, m)?)?;
    m.add_function(wrap_pyfunction!(functions::set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(functions::get_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(functions::simd_isa, m)?)?;
    m.add_function(wrap_pyfunction!(checkpoint::safetensors_layout, m)?)?;
    partials::register(m)?;
    m.add_class::<regularizer::PenaltyTerms>()?;
    m.add_function(wrap_pyfunction!(orthogonal::orthogonal_penalty, m)?)?;
    xla_ffi::register(m)?;
    #[cfg(feature = "probe")]
    m.add_function(wrap_pyfunction!(probe::_read_probe, m)?)?;
    #[cfg(feature = "probe")]
    m.add_function(wrap_pyfunction!(probe::_set_parallel_min_bytes, m)?)?;
    m.add("NotReadable", m.py().get_type::<errors::NotReadable>())?;
    m.add("CHUNK_LEN", l1l2_core::parallel::CHUNK)?;
    m.add(
        "PARALLEL_MIN_BYTES",
        l1l2_core::parallel::PARALLEL_MIN_BYTES,
    )?;
    m.add(
        "PARALLEL_MIN_BYTES_ASLEEP",
        l1l2_core::parallel::PARALLEL_MIN_BYTES_ASLEEP,
    )?;
    Ok(())
}
