//! `PenaltyTerms`: the native base of the built-in L1/L2 regularizers. It holds their terms, so
//! that calling a regularizer on a numpy array runs no Python code: a Python `__call__` frame cost
//! more than the penalty of a thousand elements.

use l1l2_core::Factors;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

use crate::errors::NotReadable;
use crate::functions::{factors, penalty_of};

/// The terms `(l1, l2)` of a regularizer (`None` leaves a term out) and its call on them.
///
/// The Python subclass sets the terms whenever a factor changes (`_set_terms`). Input the core
/// cannot read in place, and any call before the terms were set (a subclass whose `__init__` never
/// set its factors), go to the subclass's `_python_call(x)`: it raises what the Python layer raises
/// for a missing factor, where terms of nothing would silently give a zero penalty.
#[pyclass(subclass, module = "l1l2_rs._l1l2_rs")]
pub(crate) struct PenaltyTerms {
    factors: Option<Factors>,
}

#[pymethods]
impl PenaltyTerms {
    /// No terms yet: the subclass's `__init__` sets them. Accepts (and leaves to `__init__`) the
    /// subclass's constructor arguments.
    #[new]
    #[pyo3(signature = (*_args, **_kwargs))]
    fn new(_args: &Bound<'_, PyTuple>, _kwargs: Option<&Bound<'_, PyDict>>) -> Self {
        Self { factors: None }
    }

    /// Replaces the terms: each `None` or a finite non-negative float.
    fn _set_terms(&mut self, l1: Option<f64>, l2: Option<f64>) -> PyResult<()> {
        self.factors = Some(factors(l1, l2)?);
        Ok(())
    }

    /// `l1 * sum(|x|) + l2 * sum(x**2)` of the terms present, as `l1l2_rs.penalty`.
    fn __call__<'py>(slf: &Bound<'py, Self>, x: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        // The method's name is a plain string, not `intern!`: that caches it behind a once-cell,
        // which a child forked while another thread fills it would wait on forever.
        let factors = slf.borrow().factors; // the borrow ends here, before any Python runs
        let Some(factors) = factors else {
            return slf.call_method1("_python_call", (x,));
        };
        match penalty_of(x, factors) {
            Err(error) if error.is_instance_of::<NotReadable>(x.py()) => {
                slf.call_method1("_python_call", (x,))
            }
            result => result,
        }
    }
}
