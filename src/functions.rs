//! The module's functions: each converts its arguments into core views, runs the core with the GIL
//! released (for inputs large enough for that to pay) and converts the result.

use l1l2_core::{ArrayView, ArrayViewMut, Error, Factors, Update};
use std::ffi::CString;
use std::sync::{Arc, Mutex, PoisonError};

use pyo3::exceptions::{PyKeyboardInterrupt, PyRuntimeWarning, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyList;

use crate::arrays::{items, new_like, penalty_scalar, read_view, write_view, Arg};
use crate::errors::{to_py, Names, MANY, SINGLE};

/// Below this many elements the call is over before releasing the GIL would pay off.
const DETACH_MIN_LEN: usize = 1 << 13;

/// From this many elements (8 Mi: milliseconds of work or more) a call looks for Ctrl-C while it
/// runs; shorter ones skip the few microseconds that costs.
const INTERRUPTIBLE_MIN_LEN: usize = 1 << 23;

/// Runs `work` with the GIL released, unless the input is too small for that to pay. `len` is
/// the work in elements read (or, for heavier ops, in multiply-adds).
pub(crate) fn detach_if_large<R: Send>(
    py: Python<'_>,
    len: usize,
    work: impl FnOnce() -> R + Send,
) -> PyResult<R> {
    if len < DETACH_MIN_LEN {
        return Ok(work());
    }
    if len < INTERRUPTIBLE_MIN_LEN {
        // Over in milliseconds: long before the first look for Ctrl-C would come (50 ms).
        let result = py.detach(work);
        warn_of_pool_error(py)?;
        return Ok(result);
    }
    // Ctrl-C is checked every 50 ms or so while the GIL is released; the exception it raised
    // (KeyboardInterrupt, or whatever the signal handler raised) replaces the result.
    let raised: Arc<Mutex<Option<PyErr>>> = Arc::default();
    let slot = Arc::clone(&raised);
    let result = py.detach(move || {
        let check = move || {
            Python::attach(|py| match py.check_signals() {
                Ok(()) => false,
                Err(error) => {
                    *slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(error);
                    true
                }
            })
        };
        l1l2_core::parallel::interruptible(check, work)
    });
    warn_of_pool_error(py)?;
    result.ok_or_else(|| {
        let error = raised.lock().unwrap_or_else(PoisonError::into_inner).take();
        error.unwrap_or_else(|| PyKeyboardInterrupt::new_err("l1l2_rs: interrupted"))
    })
}

/// For a call that writes in place over inputs of `input_bytes`: starts the thread pool first if
/// the call may use it, and warns of a failure to start it then, before anything is written (with
/// warnings turned into errors, the call raises with the data untouched).
fn warn_before_writing(py: Python<'_>, input_bytes: usize) -> PyResult<()> {
    l1l2_core::parallel::start_pool_before_writing(input_bytes);
    warn_of_pool_error(py)
}

/// The bytes of the arrays a call reads.
fn input_bytes<'v, V: 'v>(
    views: impl IntoIterator<Item = &'v V>,
    len: impl Fn(&V) -> usize,
    dtype: impl Fn(&V) -> l1l2_core::DType,
) -> usize {
    views
        .into_iter()
        .map(|view| len(view).saturating_mul(dtype(view).itemsize()))
        .fold(0, usize::saturating_add)
}

/// A `RuntimeWarning` if the thread pool could not be started (once per failure).
fn warn_of_pool_error(py: Python<'_>) -> PyResult<()> {
    if let Some(message) = l1l2_core::parallel::take_pool_error() {
        let category = py.get_type::<PyRuntimeWarning>();
        PyErr::warn(py, &category, &CString::new(message)?, 1)?;
    }
    Ok(())
}

pub(crate) fn factors(l1: Option<f64>, l2: Option<f64>) -> PyResult<Factors> {
    Factors::new(l1, l2).map_err(|error| to_py(error, SINGLE))
}

fn update(accumulate: bool, scale: f64, out_given: bool) -> PyResult<Update> {
    match (accumulate, out_given) {
        (false, _) if scale == 1.0 => Ok(Update::Overwrite),
        (false, _) => Ok(Update::Scaled { scale }),
        (true, true) => Ok(Update::Accumulate { scale }),
        (true, false) => Err(PyValueError::new_err(
            "l1l2_rs: accumulate=True adds into an existing gradient: pass it as out=",
        )),
    }
}

/// `(sum(|x|), sum(x**2))` of an array, as Python floats computed in float64.
#[pyfunction]
pub(crate) fn sums(x: &Bound<'_, PyAny>) -> PyResult<(f64, f64)> {
    let view = read_view(x)?;
    let sums = detach_if_large(x.py(), view.len(), || view.sums())?;
    Ok((sums.sum_abs, sums.sum_squares))
}

/// `l1 * sum(|x|) + l2 * sum(x**2)` with `None` terms left out, as a numpy scalar of the input's
/// float dtype (float64 for integer and bool input), rounded once from float64.
#[pyfunction]
#[pyo3(signature = (x, l1, l2))]
pub(crate) fn penalty<'py>(
    x: &Bound<'py, PyAny>,
    l1: Option<f64>,
    l2: Option<f64>,
) -> PyResult<Bound<'py, PyAny>> {
    penalty_of(x, factors(l1, l2)?)
}

/// `penalty` with validated factors (the regularizers' native `__call__` shares it).
pub(crate) fn penalty_of<'py>(
    x: &Bound<'py, PyAny>,
    factors: Factors,
) -> PyResult<Bound<'py, PyAny>> {
    let view = read_view(x)?;
    let sums = detach_if_large(x.py(), view.len(), || view.sums())?;
    let dtype = view.dtype();
    penalty_scalar(x, dtype, dtype.round_result(factors.penalty(&sums)))
}

/// The penalty (as `penalty`) and its gradient times `scale`, written into `out` (a new array like
/// `x` when `None`), or added to it with `accumulate`.
#[pyfunction]
#[pyo3(signature = (x, l1, l2, out=None, accumulate=false, scale=1.0))]
pub(crate) fn value_and_grad<'py>(
    x: &Bound<'py, PyAny>,
    l1: Option<f64>,
    l2: Option<f64>,
    out: Option<Bound<'py, PyAny>>,
    accumulate: bool,
    scale: f64,
) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>)> {
    let factors = factors(l1, l2)?;
    let update = update(accumulate, scale, out.is_some())?;
    let view = read_view(x)?;
    let out = match out {
        Some(out) => out,
        None => {
            check_float(&view).map_err(|error| to_py(error, SINGLE))?;
            new_like(x)?
        }
    };
    let mut grad = write_view(
        &out,
        Arg {
            name: "out",
            index: None,
        },
    )?;
    warn_before_writing(
        x.py(),
        input_bytes([&view], ArrayView::len, ArrayView::dtype),
    )?;
    let value = detach_if_large(x.py(), view.len(), || {
        l1l2_core::value_and_grad(&view, &mut grad, &factors, update)
    })?
    .map_err(|error| to_py(error, SINGLE))?;
    drop(grad);
    let dtype = view.dtype();
    Ok((penalty_scalar(x, dtype, value)?, out))
}

/// Refuses an input that has no float dtype to write a gradient in (before allocating one).
fn check_float(view: &ArrayView<'_>) -> Result<(), Error> {
    if view.dtype().is_float() {
        Ok(())
    } else {
        Err(Error::NotFloat {
            dtype: view.dtype(),
        })
    }
}

/// The proximal step of the penalty with learning rate `lr`, in place; returns `x`.
#[pyfunction]
#[pyo3(signature = (x, lr, l1, l2))]
pub(crate) fn prox_<'py>(
    x: &Bound<'py, PyAny>,
    lr: f64,
    l1: Option<f64>,
    l2: Option<f64>,
) -> PyResult<Bound<'py, PyAny>> {
    let factors = factors(l1, l2)?;
    let mut view = write_view(
        x,
        Arg {
            name: "x",
            index: None,
        },
    )?;
    warn_before_writing(
        x.py(),
        input_bytes([&view], ArrayViewMut::len, ArrayViewMut::dtype),
    )?;
    detach_if_large(x.py(), view.len(), || {
        l1l2_core::prox(&mut view, lr, &factors)
    })?
    .map_err(|error| to_py(error, SINGLE))?;
    Ok(x.clone())
}

// Filled by hand: `collect` into a `PyResult<Vec<_>>` does not know the length and grows the
// vector by reallocation, moving every view several times over.
fn read_views<'a>(arrays: &'a [Bound<'_, PyAny>]) -> PyResult<Vec<ArrayView<'a>>> {
    let mut views = Vec::with_capacity(arrays.len());
    for array in arrays {
        views.push(read_view(array)?);
    }
    Ok(views)
}

fn write_views<'a>(arrays: &'a [Bound<'_, PyAny>], name: &str) -> PyResult<Vec<ArrayViewMut<'a>>> {
    let mut views = Vec::with_capacity(arrays.len());
    for (index, array) in arrays.iter().enumerate() {
        let index = Some(index);
        views.push(write_view(array, Arg { name, index })?);
    }
    Ok(views)
}

fn total_len<V>(views: &[V], len: impl Fn(&V) -> usize) -> usize {
    views.iter().map(len).sum()
}

/// `sums` of every array of `xs`, in one call: a list of `(sum(|x|), sum(x**2))`.
#[pyfunction]
pub(crate) fn sums_many(xs: &Bound<'_, PyAny>) -> PyResult<Vec<(f64, f64)>> {
    let arrays = items(xs, "xs")?;
    let views = read_views(&arrays)?;
    let len = total_len(&views, ArrayView::len);
    let sums = detach_if_large(xs.py(), len, || l1l2_core::sums_many(&views))?;
    Ok(sums.iter().map(|s| (s.sum_abs, s.sum_squares)).collect())
}

/// The sum, in list order, of the penalties of `xs` (each rounded to its array's dtype first).
#[pyfunction]
#[pyo3(signature = (xs, l1, l2))]
pub(crate) fn penalty_many(
    xs: &Bound<'_, PyAny>,
    l1: Option<f64>,
    l2: Option<f64>,
) -> PyResult<f64> {
    let factors = factors(l1, l2)?;
    let arrays = items(xs, "xs")?;
    let views = read_views(&arrays)?;
    let len = total_len(&views, ArrayView::len);
    let sums = detach_if_large(xs.py(), len, || l1l2_core::sums_many(&views))?;
    Ok(views
        .iter()
        .zip(&sums)
        .map(|(view, sums)| view.dtype().round_result(factors.penalty(sums)))
        .sum())
}

/// `value_and_grad` of every array of `xs` in one call: `(total penalty, gradients)`.
#[pyfunction]
#[pyo3(signature = (xs, l1, l2, outs=None, accumulate=false, scale=1.0))]
pub(crate) fn value_and_grad_many<'py>(
    xs: &Bound<'py, PyAny>,
    l1: Option<f64>,
    l2: Option<f64>,
    outs: Option<Bound<'py, PyAny>>,
    accumulate: bool,
    scale: f64,
) -> PyResult<(f64, Bound<'py, PyList>)> {
    let factors = factors(l1, l2)?;
    let update = update(accumulate, scale, outs.is_some())?;
    let arrays = items(xs, "xs")?;
    let views = read_views(&arrays)?;
    let outs = match outs {
        Some(outs) => items(&outs, "outs")?,
        None => {
            for (index, view) in views.iter().enumerate() {
                check_float(view).map_err(|error| to_py(error.in_list(index), MANY))?;
            }
            arrays
                .iter()
                .map(|x| new_like(x))
                .collect::<PyResult<_>>()?
        }
    };
    let mut grads = write_views(&outs, "outs")?;
    let len = total_len(&views, ArrayView::len);
    warn_before_writing(
        xs.py(),
        input_bytes(&views, ArrayView::len, ArrayView::dtype),
    )?;
    let values = detach_if_large(xs.py(), len, || {
        l1l2_core::value_and_grad_many(&views, &mut grads, &factors, update)
    })?
    .map_err(|error| to_py(error, MANY))?;
    drop(grads);
    Ok((values.iter().sum(), PyList::new(xs.py(), outs)?))
}

/// `prox_` of every array of `xs` in one call; returns `xs`.
#[pyfunction]
#[pyo3(signature = (xs, lr, l1, l2))]
pub(crate) fn prox_many_<'py>(
    xs: &Bound<'py, PyAny>,
    lr: f64,
    l1: Option<f64>,
    l2: Option<f64>,
) -> PyResult<Bound<'py, PyAny>> {
    let factors = factors(l1, l2)?;
    let arrays = items(xs, "xs")?;
    let mut views = write_views(&arrays, "xs")?;
    let len = total_len(&views, ArrayViewMut::len);
    warn_before_writing(
        xs.py(),
        input_bytes(&views, ArrayViewMut::len, ArrayViewMut::dtype),
    )?;
    detach_if_large(xs.py(), len, || {
        l1l2_core::prox_many(&mut views, lr, &factors)
    })?
    .map_err(|error| {
        to_py(
            error,
            Names {
                output: "xs",
                ..MANY
            },
        )
    })?;
    Ok(xs.clone())
}

/// Sets the thread count for large inputs; 0 restores the default.
#[pyfunction]
pub(crate) fn set_num_threads(threads: usize) {
    l1l2_core::set_num_threads(threads);
}

/// The thread count large inputs are reduced with.
#[pyfunction]
pub(crate) fn get_num_threads() -> usize {
    l1l2_core::num_threads()
}

/// The SIMD instruction set the kernels use on this CPU: "avx512", "avx2" or "baseline".
#[pyfunction]
pub(crate) fn simd_isa() -> &'static str {
    match l1l2_core::isa() {
        l1l2_core::Isa::Avx512 => "avx512",
        l1l2_core::Isa::Avx2 => "avx2",
        l1l2_core::Isa::Baseline => "baseline",
    }
}
