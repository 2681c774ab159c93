//! Core errors as Python exceptions: `TypeError` for what no conversion fixes (a dtype), else
//! `ValueError`; and `NotReadable`, which tells the Python layer to convert the input and retry.

use l1l2_core::Error;
use pyo3::create_exception;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::PyErr;

create_exception!(
    _l1l2_rs,
    NotReadable,
    PyTypeError,
    "The input is not a numpy array the core reads in place (a foreign object, byte-swapped, \
     unaligned): convert it with numpy and call again."
);

/// How the arguments of one call are named in messages: the input and its destination.
#[derive(Clone, Copy)]
pub(crate) struct Names {
    pub input: &'static str,
    pub output: &'static str,
}

pub(crate) const SINGLE: Names = Names {
    input: "x",
    output: "out",
};
pub(crate) const MANY: Names = Names {
    input: "xs",
    output: "outs",
};

/// `error` as a Python exception whose message names the caller's arguments.
pub(crate) fn to_py(error: Error, names: Names) -> PyErr {
    let (prefix, root) = match &error {
        Error::InList { index, error } => (format!("{}[{index}]: ", names.input), error.root()),
        other => (String::new(), other),
    };
    let Names { input, output } = names;
    let message = match root {
        Error::DTypeMismatch {
            source,
            destination,
        } => format!("{output} has dtype {destination} but {input} has dtype {source}"),
        Error::ShapeMismatch {
            source,
            destination,
        } => format!("{output} has shape {destination:?} but {input} has shape {source:?}"),
        Error::Overlap { .. } => format!(
            "{root}: {output} must not share memory with {input} or another {output} (checked by \
             address range, so interleaved views such as a[::2] and a[1::2] count as sharing)"
        ),
        Error::NotAMatrix { shape } => {
            format!("{input} must have rank 2 (a matrix), got shape {shape:?}")
        }
        Error::BroadcastDestination | Error::SelfOverlappingDestination => {
            format!("cannot write through this view: {root}")
        }
        other => other.to_string(),
    };
    let message = format!("l1l2_rs: {prefix}{message}");
    match root {
        Error::NotFloat { .. } | Error::FloatOnly { .. } => PyTypeError::new_err(message),
        _ => PyValueError::new_err(message),
    }
}
