//! The layout of a `.safetensors` file, for the `l1l2` command: the `safetensors` crate parses and
//! validates the header (its length against the file's, offsets that overlap or leave gaps,
//! shapes against byte counts, unknown dtypes); Python then memory-maps the tensors it names.

use std::fs::File;

use memmap2::Mmap;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use safetensors::SafeTensors;

/// One tensor of the file: name, safetensors dtype ("F32", "BF16", ...), shape, and the absolute
/// byte range of its data in the file.
type TensorEntry = (String, String, Vec<usize>, u64, u64);

/// The tensors of the `.safetensors` file at `path`, in file order; `ValueError` for a malformed
/// header, `OSError` for a file that cannot be opened or mapped.
#[pyfunction]
pub(crate) fn safetensors_layout(py: Python<'_>, path: &str) -> PyResult<Vec<TensorEntry>> {
    py.detach(|| layout(path))
}

fn layout(path: &str) -> PyResult<Vec<TensorEntry>> {
    let file = File::open(path)?;
    // SAFETY: the map is read-only and only its header bytes are read, right here; the tensor
    // data is never touched through it. A file shortened while it is read would raise SIGBUS, as
    // any memory-mapped read does; the length checks below run against the size seen at mapping.
    let map = unsafe { Mmap::map(&file) }?;
    let (header_len, metadata) = SafeTensors::read_metadata(&map)
        .map_err(|error| PyValueError::new_err(format!("malformed safetensors header: {error}")))?;
    let data_start = (header_len + 8) as u64;
    let tensors = metadata.tensors();
    let entries = metadata
        .offset_keys()
        .into_iter()
        .map(|name| {
            let info = tensors[&name];
            let (start, end) = info.data_offsets;
            let dtype = info.dtype.to_string();
            let shape = info.shape.clone();
            (
                name,
                dtype,
                shape,
                data_start + start as u64,
                data_start + end as u64,
            )
        })
        .collect();
    Ok(entries)
}
