//! The binding of the core's orthogonality penalty (Keras' `OrthogonalRegularizer`).

use l1l2_core::Vectors;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::arrays::{penalty_scalar, read_view};
use crate::errors::{to_py, SINGLE};
use crate::functions::detach_if_large;

/// `factor` times the mean absolute dot product between the unit-norm rows (`mode="rows"`) or
/// columns (`mode="columns"`) of the matrix `x`, over every pair of them; a numpy scalar of `x`'s
/// float dtype, rounded once from float64.
#[pyfunction]
#[pyo3(signature = (x, factor, mode))]
pub(crate) fn orthogonal_penalty<'py>(
    x: &Bound<'py, PyAny>,
    factor: f64,
    mode: &str,
) -> PyResult<Bound<'py, PyAny>> {
    let vectors = match mode {
        "rows" => Vectors::Rows,
        "columns" => Vectors::Columns,
        other => {
            return Err(PyValueError::new_err(format!(
                "l1l2_rs: mode must be 'rows' or 'columns', got {other:?}"
            )))
        }
    };
    let view = read_view(x)?;
    // The pairs' work (about `len * count` multiply-adds), not the input's size, decides whether
    // the call is long enough to watch for Ctrl-C: a 2000 x 2000 matrix takes seconds.
    let count = match (vectors, view.shape()) {
        (Vectors::Rows, &[rows, _]) => rows,
        (Vectors::Columns, &[_, columns]) => columns,
        _ => 1, // not a matrix: the core refuses it
    };
    let work = view.len().saturating_mul(count);
    let value = detach_if_large(x.py(), work, || {
        l1l2_core::orthogonal_penalty(&view, factor, vectors)
    })?
    .map_err(|error| to_py(error, SINGLE))?;
    let dtype = view.dtype();
    penalty_scalar(x, dtype, dtype.round_result(value))
}
