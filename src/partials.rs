//! `SumsPartial`: the core's mergeable partial sums as a frozen, picklable Python object, for
//! reductions split across processes (the Dask integration builds on it).

use l1l2_core::Factors;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyTuple};

use crate::arrays::read_view;
use crate::errors::{to_py, NotReadable, SINGLE};
use crate::functions::detach_if_large;

/// The mergeable state of `(sum(|x|), sum(x**2))` of a piece of an array.
#[pyclass(frozen, module = "l1l2_rs._l1l2_rs")]
pub(crate) struct SumsPartial(l1l2_core::SumsPartial);

#[pymethods]
impl SumsPartial {
    /// The empty partial: merging it changes nothing.
    #[new]
    fn new() -> Self {
        Self(l1l2_core::SumsPartial::empty())
    }

    /// The partial of every element of the numpy array `x`, read in place.
    #[staticmethod]
    fn of(x: &Bound<'_, PyAny>) -> PyResult<Self> {
        let py = x.py();
        let view = read_view(x).map_err(|error| {
            if !error.is_instance_of::<NotReadable>(py) {
                return error;
            }
            // Nothing is converted here (the Dask integration converts blocks itself): say what to pass.
            NotReadable::new_err(format!(
                "l1l2_rs: SumsPartial.of reads a numpy array in place, and x is {}: convert it \
                 first (np.asarray for lists, np.ascontiguousarray(x, x.dtype.newbyteorder('=')) \
                 for byte-swapped or unaligned data, x.filled(0) for a masked array)",
                error.value(py)
            ))
        })?;
        let partial = detach_if_large(x.py(), view.len(), || l1l2_core::SumsPartial::of(&view))?;
        Ok(Self(partial))
    }

    /// The partial of both pieces (`self` first).
    fn merge(&self, other: &Self) -> PyResult<Self> {
        self.0
            .merge(&other.0)
            .map(Self)
            .map_err(|error| to_py(error, SINGLE))
    }

    /// `(sum(|x|), sum(x**2))`, each rounded once to float64.
    fn sums(&self) -> (f64, f64) {
        let sums = self.0.sums();
        (sums.sum_abs, sums.sum_squares)
    }

    /// `l1 * sum(|x|) + l2 * sum(x**2)` with `None` terms left out, rounded once to the data's
    /// result dtype (returned as a float).
    fn penalty(&self, l1: Option<f64>, l2: Option<f64>) -> PyResult<f64> {
        let factors = Factors::new(l1, l2).map_err(|error| to_py(error, SINGLE))?;
        Ok(self.0.penalty(&factors))
    }

    /// The numpy name of the data's dtype, `None` for the empty partial.
    #[getter]
    fn dtype(&self) -> Option<&'static str> {
        self.0.dtype().map(|dtype| dtype.name())
    }

    /// The stable, versioned encoding.
    fn to_bytes<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.0.to_bytes())
    }

    /// Decodes `to_bytes`; anything else raises `ValueError`.
    #[staticmethod]
    fn from_bytes(data: &[u8]) -> PyResult<Self> {
        l1l2_core::SumsPartial::from_bytes(data)
            .map(Self)
            .map_err(|error| PyValueError::new_err(format!("l1l2_rs: {error}")))
    }

    fn __reduce__<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyTuple>> {
        let py = slf.py();
        let from_bytes = slf.get_type().getattr("from_bytes")?;
        let state = PyTuple::new(py, [slf.get().to_bytes(py)])?;
        PyTuple::new(py, [from_bytes, state.into_any()])
    }

    /// Equal when the encodings are.
    fn __eq__(&self, other: &Bound<'_, PyAny>) -> bool {
        other
            .cast::<Self>()
            .is_ok_and(|other| other.get().0.to_bytes() == self.0.to_bytes())
    }

    fn __hash__(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        self.0.to_bytes().hash(&mut hasher);
        hasher.finish()
    }

    fn __repr__(&self) -> String {
        let (sum_abs, sum_squares) = self.sums();
        match self.dtype() {
            Some(dtype) => format!(
                "SumsPartial(dtype={dtype}, sum_abs={sum_abs:?}, sum_squares={sum_squares:?})"
            ),
            None => "SumsPartial()".to_string(),
        }
    }
}

/// Registers the class in the module.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<SumsPartial>()
}
