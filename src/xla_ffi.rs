//! XLA FFI handlers: the penalty and its fused value-and-gradient as XLA custom calls on CPU,
//! exported to Python as PyCapsules (`xla_ffi_handlers`) that `l1l2_rs.jax` registers with
//! `jax.ffi.register_ffi_target`.
//!
//! No crate binds the XLA FFI, so the `#[repr(C)]` structs below transcribe the parts of
//! `xla/ffi/api/c_api.h` (API 0.3, as shipped with jaxlib 0.10) that the handlers use. A handler
//! receives a call frame: operand buffers (row-major, dims given), result buffers and the
//! attributes `l1` and `l2` (f64 scalars). It answers the metadata query XLA makes at
//! registration (the API version it was written against, no traits), turns each buffer into a
//! core view and runs the core. Every failure, and any panic, becomes an `XLA_FFI_Error` that JAX
//! raises as a Python exception with the message.
//!
//! Batching: when the penalty result has rank `k > 0` (`vmap` with `vmap_method="expand_dims"`
//! prepends the batch dimensions to every result, and to every operand: the batch's own for a
//! batched operand, 1 for the others), the first `k` dimensions of every operand index the batch
//! (a dimension of 1 stands for every index), and each batch element gets its own penalty. An
//! operand that is not batched is read in place for every batch element, never copied.

use std::ffi::{c_int, c_void, CStr, CString};
use std::mem::{offset_of, size_of};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr::{null_mut, NonNull};

use l1l2_core::{ArrayView, ArrayViewMut, DType, Factors, Sums, Update};
use pyo3::prelude::*;
use pyo3::types::{PyCapsule, PyDict};

/// The XLA FFI API version these structs transcribe; XLA checks it when the handler is
/// registered.
const API_MAJOR: c_int = 0;
const API_MINOR: c_int = 3;

/// The struct definitions of `c_api.h` used here (field names as there, in snake case).
mod abi {
    use std::ffi::{c_char, c_int, c_void};

    pub const EXTENSION_METADATA: c_int = 1;
    pub const ARG_BUFFER: c_int = 1;
    pub const RET_BUFFER: c_int = 1;
    pub const ATTR_SCALAR: c_int = 3;
    pub const ERROR_INVALID_ARGUMENT: c_int = 3;
    pub const ERROR_INTERNAL: c_int = 13;
    pub const STAGE_EXECUTE: c_int = 3;

    pub const DTYPE_F16: c_int = 10;
    pub const DTYPE_F32: c_int = 11;
    pub const DTYPE_F64: c_int = 12;
    pub const DTYPE_BF16: c_int = 16;

    #[repr(C)]
    pub struct ExtensionBase {
        pub struct_size: usize,
        pub type_: c_int,
        pub next: *mut ExtensionBase,
    }

    #[repr(C)]
    pub struct ApiVersion {
        pub struct_size: usize,
        pub extension_start: *mut ExtensionBase,
        pub major_version: c_int,
        pub minor_version: c_int,
    }

    /// `XLA_FFI_Metadata` up to `traits` (its `STRUCT_SIZE`); the trailing `state_type_id`
    /// is left as XLA initialised it (unknown: a stateless handler).
    #[repr(C)]
    pub struct Metadata {
        pub struct_size: usize,
        pub api_version: ApiVersion,
        pub traits: u32,
    }

    #[repr(C)]
    pub struct MetadataExtension {
        pub extension_base: ExtensionBase,
        pub metadata: *mut Metadata,
    }

    /// Opaque: created by XLA, owned by whoever receives it.
    #[repr(C)]
    pub struct Error {
        _opaque: [u8; 0],
    }

    #[repr(C)]
    pub struct ErrorCreateArgs {
        pub struct_size: usize,
        pub extension_start: *mut ExtensionBase,
        pub message: *const c_char,
        pub errc: c_int,
    }

    pub type ErrorCreate = unsafe extern "C" fn(args: *mut ErrorCreateArgs) -> *mut Error;

    /// `XLA_FFI_Api` up to `XLA_FFI_Error_Create`, the only entry used.
    #[repr(C)]
    pub struct Api {
        pub struct_size: usize,
        pub extension_start: *mut ExtensionBase,
        pub api_version: ApiVersion,
        pub internal_api: *const c_void,
        pub error_create: Option<ErrorCreate>,
    }

    #[repr(C)]
    pub struct Buffer {
        pub struct_size: usize,
        pub extension_start: *mut ExtensionBase,
        pub dtype: c_int,
        pub data: *mut c_void,
        pub rank: i64,
        pub dims: *const i64,
    }

    #[repr(C)]
    pub struct Args {
        pub struct_size: usize,
        pub extension_start: *mut ExtensionBase,
        pub size: i64,
        pub types: *const c_int,
        pub args: *const *mut c_void,
    }

    #[repr(C)]
    pub struct Rets {
        pub struct_size: usize,
        pub extension_start: *mut ExtensionBase,
        pub size: i64,
        pub types: *const c_int,
        pub rets: *const *mut c_void,
    }

    #[repr(C)]
    pub struct ByteSpan {
        pub ptr: *const c_char,
        pub len: usize,
    }

    #[repr(C)]
    pub struct Scalar {
        pub dtype: c_int,
        pub value: *const c_void,
    }

    #[repr(C)]
    pub struct Attrs {
        pub struct_size: usize,
        pub extension_start: *mut ExtensionBase,
        pub size: i64,
        pub types: *const c_int,
        pub names: *const *const ByteSpan,
        pub attrs: *const *const c_void,
    }

    /// `XLA_FFI_CallFrame` up to `attrs` (its `STRUCT_SIZE`); `future` is not used.
    #[repr(C)]
    pub struct CallFrame {
        pub struct_size: usize,
        pub extension_start: *mut ExtensionBase,
        pub api: *const Api,
        pub ctx: *mut c_void,
        pub stage: c_int,
        pub args: Args,
        pub rets: Rets,
        pub attrs: Attrs,
    }
}

/// `STRUCT_SIZE` of a C struct: the end of its last field.
const fn end_of(offset: usize, size: usize) -> usize {
    offset + size
}
const CALL_FRAME_SIZE: usize = size_of::<abi::CallFrame>();
const CALL_FRAME_API_END: usize = end_of(offset_of!(abi::CallFrame, api), size_of::<usize>());
const METADATA_SIZE: usize = end_of(offset_of!(abi::Metadata, traits), size_of::<u32>());
const METADATA_EXTENSION_SIZE: usize = size_of::<abi::MetadataExtension>();
const BUFFER_SIZE: usize = size_of::<abi::Buffer>();
const ERROR_CREATE_ARGS_SIZE: usize =
    end_of(offset_of!(abi::ErrorCreateArgs, errc), size_of::<c_int>());
const API_ERROR_CREATE_END: usize = end_of(offset_of!(abi::Api, error_create), size_of::<usize>());

/// What a handler computes.
#[derive(Clone, Copy)]
enum Op {
    /// Operands `x_i`; result: the penalty (per batch element).
    Penalty,
    /// Operands `x_i`; results: the penalty, then the gradient of each `x_i`.
    ValueAndGrad,
}

type Failure = String;

/// Runs `op` on XLA's call frame (or answers its metadata query) and reports any failure, a
/// panic included, as an `XLA_FFI_Error`.
///
/// # Safety
/// `frame` is the call frame XLA passes to a handler, valid for the duration of the call.
unsafe fn handle(frame: *mut abi::CallFrame, op: Op) -> *mut abi::Error {
    // Returning no error without writing the results would hand XLA garbage as the answer, so
    // a call that is not from XLA at all (no frame, or one too small to hold the API through
    // which errors are reported) stops the process instead.
    if frame.is_null() {
        eprintln!("l1l2_rs: XLA FFI handler called without a call frame");
        std::process::abort();
    }
    // SAFETY: XLA passes a valid call frame that outlives the call (the caller's contract); its
    // first field is the size XLA filled it to.
    let size = unsafe { (*frame).struct_size };
    if size < CALL_FRAME_API_END {
        eprintln!("l1l2_rs: XLA FFI call frame of {size} bytes");
        std::process::abort();
    }
    // SAFETY: as above; the frame holds at least the fields up to `api`.
    let (api, extension) = unsafe { ((*frame).api, (*frame).extension_start) };
    let outcome = if size < CALL_FRAME_SIZE {
        Err((
            abi::ERROR_INVALID_ARGUMENT,
            format!(
                "l1l2_rs: XLA FFI call frame of {size} bytes, expected at least \
                 {CALL_FRAME_SIZE}: jaxlib is older than the XLA FFI API {API_MAJOR}.{API_MINOR}"
            ),
        ))
    } else {
        // SAFETY: the frame is valid and filled to at least our size (checked above).
        let frame = unsafe { &*frame };
        // SAFETY: as above.
        match catch_unwind(AssertUnwindSafe(|| unsafe { run(frame, op) })) {
            Ok(result) => result.map_err(|message| (abi::ERROR_INVALID_ARGUMENT, message)),
            Err(_) => Err((
                abi::ERROR_INTERNAL,
                "l1l2_rs: internal error (a panic) in the XLA FFI handler".to_owned(),
            )),
        }
    };
    let Err((code, message)) = outcome else {
        return null_mut();
    };
    // SAFETY: `api` comes from the frame XLA passed.
    let error = unsafe { create_error(api, code, &message) };
    if error.is_null() && extension.is_null() {
        // An execution whose failure cannot be reported must not pass for a success (a failed
        // metadata query leaves the version unset, which XLA refuses on its own).
        eprintln!("{message}");
        std::process::abort();
    }
    error
}

/// # Safety
/// `frame` is a valid call frame of at least `CALL_FRAME_SIZE` bytes.
unsafe fn run(frame: &abi::CallFrame, op: Op) -> Result<(), Failure> {
    if !frame.extension_start.is_null() {
        // SAFETY: a non-null extension chain starts with an `ExtensionBase` (c_api.h).
        let extension = unsafe { &*frame.extension_start };
        if extension.type_ == abi::EXTENSION_METADATA {
            // SAFETY: an extension of type Metadata is an `XLA_FFI_Metadata_Extension`.
            return unsafe { report_metadata(frame.extension_start.cast()) };
        }
    }
    // SAFETY: the caller's contract.
    unsafe { execute(frame, op) }
}

/// An `XLA_FFI_Error` carrying `message`, or null when XLA gave no API to create one with.
///
/// # Safety
/// `api` is null or the `XLA_FFI_Api` of a valid call frame.
unsafe fn create_error(api: *const abi::Api, code: c_int, message: &str) -> *mut abi::Error {
    // SAFETY: `api` is null or valid (the caller's contract).
    let Some(api) = (unsafe { api.as_ref() }) else {
        return null_mut();
    };
    if api.struct_size < API_ERROR_CREATE_END {
        return null_mut();
    }
    let Some(error_create) = api.error_create else {
        return null_mut();
    };
    let message = CString::new(message.replace('\0', " ")).unwrap_or_default();
    let mut args = abi::ErrorCreateArgs {
        struct_size: ERROR_CREATE_ARGS_SIZE,
        extension_start: null_mut(),
        message: message.as_ptr(),
        errc: code,
    };
    // SAFETY: `error_create` is XLA's `XLA_FFI_Error_Create`; `args` and the message it points
    // to live across the call (XLA copies the message into the error).
    unsafe { error_create(&mut args) }
}

/// Answers XLA's registration-time query: the API version and traits of this handler.
///
/// # Safety
/// `extension` is the metadata extension XLA put in the call frame.
unsafe fn report_metadata(extension: *mut abi::MetadataExtension) -> Result<(), Failure> {
    // SAFETY: the caller's contract; its size is checked before the `metadata` field is read.
    let extension = unsafe { &mut *extension };
    if extension.extension_base.struct_size < METADATA_EXTENSION_SIZE {
        return Err("l1l2_rs: XLA FFI metadata extension too small".into());
    }
    // SAFETY: XLA points `metadata` at its own `XLA_FFI_Metadata`, checked for size before use.
    let metadata = unsafe { extension.metadata.as_mut() }
        .ok_or_else(|| Failure::from("l1l2_rs: XLA FFI metadata query without a struct"))?;
    if metadata.struct_size < METADATA_SIZE {
        return Err("l1l2_rs: XLA FFI metadata struct too small".into());
    }
    metadata.api_version = abi::ApiVersion {
        struct_size: size_of::<abi::ApiVersion>(),
        extension_start: null_mut(),
        major_version: API_MAJOR,
        minor_version: API_MINOR,
    };
    metadata.traits = 0;
    Ok(())
}

/// One operand or result buffer, decoded.
struct Buffer {
    dtype: c_int,
    data: *mut u8,
    dims: Vec<usize>,
}

/// # Safety
/// `entries` and `types` point at `size` entries each (the call frame's arrays), and each entry
/// of type buffer points at an `XLA_FFI_Buffer` valid for the call.
unsafe fn buffers(
    size: i64,
    types: *const c_int,
    entries: *const *mut c_void,
    buffer_type: c_int,
    what: &str,
) -> Result<Vec<Buffer>, Failure> {
    let count = usize::try_from(size).map_err(|_| format!("l1l2_rs: {size} {what}s"))?;
    if count == 0 {
        return Ok(Vec::new());
    }
    // SAFETY: the caller's contract: `count` types and entries.
    let (types, entries) = unsafe {
        (
            std::slice::from_raw_parts(types, count),
            std::slice::from_raw_parts(entries, count),
        )
    };
    let mut decoded = Vec::with_capacity(count);
    for (index, (&kind, &entry)) in types.iter().zip(entries).enumerate() {
        if kind != buffer_type || entry.is_null() {
            return Err(format!("l1l2_rs: {what} {index} is not an array buffer"));
        }
        // SAFETY: an entry of buffer type is an `XLA_FFI_Buffer` (the caller's contract); its
        // size is checked before the fields after it are read.
        let buffer = unsafe { &*entry.cast::<abi::Buffer>() };
        if buffer.struct_size < BUFFER_SIZE {
            return Err(format!(
                "l1l2_rs: {what} {index}: XLA FFI buffer struct too small"
            ));
        }
        let rank = usize::try_from(buffer.rank)
            .map_err(|_| format!("l1l2_rs: {what} {index} has rank {}", buffer.rank))?;
        let dims = if rank == 0 {
            Vec::new()
        } else {
            // SAFETY: `dims` holds `rank` entries (c_api.h: "length == rank").
            unsafe { std::slice::from_raw_parts(buffer.dims, rank) }
                .iter()
                .map(|&dim| usize::try_from(dim))
                .collect::<Result<_, _>>()
                .map_err(|_| format!("l1l2_rs: {what} {index} has a negative dimension"))?
        };
        decoded.push(Buffer {
            dtype: buffer.dtype,
            data: buffer.data.cast(),
            dims,
        });
    }
    Ok(decoded)
}

fn float_dtype(code: c_int) -> Option<DType> {
    match code {
        abi::DTYPE_F16 => Some(DType::F16),
        abi::DTYPE_BF16 => Some(DType::BF16),
        abi::DTYPE_F32 => Some(DType::F32),
        abi::DTYPE_F64 => Some(DType::F64),
        _ => None,
    }
}

/// The factors from the attributes `l1` and `l2` (f64 or f32 scalars, nothing else), with
/// `L1L2` semantics: a zero factor drops its term.
///
/// # Safety
/// `attrs` is the attribute table of a valid call frame.
unsafe fn factors(attrs: &abi::Attrs) -> Result<Factors, Failure> {
    let count = usize::try_from(attrs.size).unwrap_or(0);
    let (mut l1, mut l2) = (None, None);
    for index in 0..count {
        // SAFETY: the table holds `size` types, names and values (c_api.h); a name is a byte span.
        let (kind, name, value) = unsafe {
            let span = &**attrs.names.add(index);
            let name = std::slice::from_raw_parts(span.ptr.cast::<u8>(), span.len);
            (*attrs.types.add(index), name, *attrs.attrs.add(index))
        };
        let name = String::from_utf8_lossy(name);
        let slot = match name.as_ref() {
            "l1" => &mut l1,
            "l2" => &mut l2,
            other => {
                return Err(format!(
                    "l1l2_rs: unexpected attribute {other:?} (takes l1, l2)"
                ))
            }
        };
        if kind != abi::ATTR_SCALAR {
            return Err(format!("l1l2_rs: attribute {name} must be a float scalar"));
        }
        // SAFETY: a scalar attribute is an `XLA_FFI_Scalar` whose value has its dtype.
        let number = unsafe {
            let scalar = &*value.cast::<abi::Scalar>();
            match scalar.dtype {
                abi::DTYPE_F64 => Some(*scalar.value.cast::<f64>()),
                abi::DTYPE_F32 => Some(f64::from(*scalar.value.cast::<f32>())),
                _ => None,
            }
        };
        *slot = Some(number.ok_or_else(|| {
            format!("l1l2_rs: attribute {name} must be a float64 or float32 scalar")
        })?);
    }
    let (Some(l1), Some(l2)) = (l1, l2) else {
        return Err("l1l2_rs: the attributes l1 and l2 are required".into());
    };
    Factors::l1l2(l1, l2).map_err(|error| format!("l1l2_rs: {error}"))
}

/// Refuses an XLA whose FFI API has another major version, and stages other than execute.
///
/// # Safety
/// `frame` is a valid call frame of at least `CALL_FRAME_SIZE` bytes.
unsafe fn check_caller(frame: &abi::CallFrame) -> Result<(), Failure> {
    // SAFETY: `api` is null or XLA's API struct, whose leading fields every version has.
    if let Some(api) = unsafe { frame.api.as_ref() } {
        let version = &api.api_version;
        if version.major_version != API_MAJOR {
            return Err(format!(
                "l1l2_rs: XLA FFI API {}.{} is not compatible with the {API_MAJOR}.{API_MINOR} \
                 this handler was written for",
                version.major_version, version.minor_version
            ));
        }
    }
    if frame.stage != abi::STAGE_EXECUTE {
        return Err(format!("l1l2_rs: called for stage {}", frame.stage));
    }
    Ok(())
}

/// Decodes the call, checks the results against the operands and runs the core.
///
/// # Safety
/// `frame` is a valid call frame of at least `CALL_FRAME_SIZE` bytes.
unsafe fn execute(frame: &abi::CallFrame, op: Op) -> Result<(), Failure> {
    // SAFETY: the caller's contract.
    unsafe { check_caller(frame) }?;
    // SAFETY: the frame's tables are valid for the call (the caller's contract).
    let (operands, results, factors) = unsafe {
        let args = &frame.args;
        let rets = &frame.rets;
        (
            buffers(args.size, args.types, args.args, abi::ARG_BUFFER, "operand")?,
            buffers(
                rets.size,
                rets.types,
                rets.rets.cast(),
                abi::RET_BUFFER,
                "result",
            )?,
            factors(&frame.attrs)?,
        )
    };
    let expected_results = match op {
        Op::Penalty => 1,
        Op::ValueAndGrad => 1 + operands.len(),
    };
    if results.len() != expected_results {
        return Err(format!(
            "l1l2_rs: {} operands need {expected_results} results, got {}",
            operands.len(),
            results.len()
        ));
    }
    let (penalty, gradients) = results.split_first().expect("at least one result");
    let batch = penalty.dims.clone();
    let batch_len = batch
        .iter()
        .try_fold(1usize, |acc, &dim| acc.checked_mul(dim))
        .ok_or_else(|| Failure::from("l1l2_rs: the batch is too large"))?;
    let operands = operands
        .iter()
        .enumerate()
        .map(|(index, buffer)| Operand::new(index, buffer, &batch))
        .collect::<Result<Vec<_>, _>>()?;
    for (index, (operand, gradient)) in operands.iter().zip(gradients).enumerate() {
        let shape: Vec<usize> = batch.iter().chain(&operand.inner_dims).copied().collect();
        if gradient.dtype != operand.dtype_code || gradient.dims != shape {
            return Err(format!(
                "l1l2_rs: result {} must have operand {index}'s dtype and the shape {shape:?} \
                 (the batch shape, then the operand's own)",
                index + 1
            ));
        }
    }
    let mut totals = vec![0.0f64; batch_len];
    match op {
        Op::Penalty => penalties(&operands, &batch, &factors, &mut totals)?,
        Op::ValueAndGrad => value_and_grads(&operands, &batch, gradients, &factors, &mut totals)?,
    }
    // SAFETY: the penalty result is a buffer XLA allocated for this call with dims `batch`.
    unsafe { write_totals(penalty, &totals) }
}

/// An operand: its dtype, the layout of its batch elements and the data pointer.
struct Operand {
    dtype: DType,
    dtype_code: c_int,
    data: *mut u8,
    /// The batch shape's dims, each either the batch's own or 1 (one element for the whole
    /// batch: `vmap_method="expand_dims"` gives an operand that is not batched a leading 1).
    batch_dims: Vec<usize>,
    /// The dims after the batch dims, and the bytes one batch element spans.
    inner_dims: Vec<usize>,
    inner_bytes: usize,
}

impl Operand {
    fn new(index: usize, buffer: &Buffer, batch: &[usize]) -> Result<Self, Failure> {
        let dtype = float_dtype(buffer.dtype).ok_or_else(|| {
            format!(
                "l1l2_rs: operand {index} has XLA dtype code {}; expected float16, bfloat16, \
                 float32 or float64",
                buffer.dtype
            )
        })?;
        let leading = buffer.dims.get(..batch.len()).unwrap_or(&[]);
        let batched = leading.len() == batch.len()
            && leading
                .iter()
                .zip(batch)
                .all(|(&dim, &full)| dim == full || dim == 1);
        if !batched {
            return Err(format!(
                "l1l2_rs: operand {index} has shape {:?}, whose leading dims must each be those \
                 of the penalty result's batch shape {batch:?}, or 1",
                buffer.dims
            ));
        }
        let inner_dims = buffer.dims[batch.len()..].to_vec();
        let inner_bytes = inner_dims
            .iter()
            .try_fold(dtype.itemsize(), |acc, &dim| acc.checked_mul(dim))
            .ok_or_else(|| format!("l1l2_rs: operand {index} is too large"))?;
        Ok(Self {
            dtype,
            dtype_code: buffer.dtype,
            data: buffer.data,
            batch_dims: leading.to_vec(),
            inner_dims,
            inner_bytes,
        })
    }

    /// The byte offset of batch element `b` (a row-major index into the batch shape `batch`),
    /// reading a dim of 1 as that one element for every index.
    fn batch_offset(&self, batch: &[usize], mut b: usize) -> usize {
        let (mut offset, mut stride) = (0, self.inner_bytes);
        for (&full, &dim) in batch.iter().zip(&self.batch_dims).rev() {
            let index = b % full;
            b /= full;
            if dim != 1 {
                offset += index * stride;
            }
            stride *= dim;
        }
        offset
    }

    /// Row-major byte strides of one batch element.
    fn inner_strides(&self) -> Vec<isize> {
        let mut strides = vec![0isize; self.inner_dims.len()];
        let mut stride = self.dtype.itemsize() as isize;
        for (slot, &dim) in strides.iter_mut().zip(&self.inner_dims).rev() {
            *slot = stride;
            stride = stride.saturating_mul(dim.max(1) as isize);
        }
        strides
    }

    /// Batch element `b` of the operand, read-only.
    fn view(&self, batch: &[usize], b: usize) -> Result<ArrayView<'_>, Failure> {
        let data = self.data.wrapping_add(self.batch_offset(batch, b));
        // SAFETY: XLA's operand buffer holds the whole row-major array for the call, and nothing
        // writes it meanwhile; batch element `b` (within the batch) spans `inner_bytes` from
        // `data`.
        unsafe {
            ArrayView::from_raw_parts(data, self.dtype, &self.inner_dims, &self.inner_strides())
        }
        .map_err(|error| format!("l1l2_rs: {error}"))
    }

    /// Batch element `b` of this operand's gradient: a result buffer of the batch shape
    /// followed by the operand's inner dims.
    ///
    /// # Safety
    /// `result` is a result buffer XLA allocated for this call with this operand's dtype and
    /// the batch shape followed by its inner dims, not aliased by any operand, and `b` is within
    /// the batch.
    unsafe fn gradient_view<'a>(
        &self,
        result: &Buffer,
        b: usize,
    ) -> Result<ArrayViewMut<'a>, Failure> {
        let data = result.data.wrapping_add(b * self.inner_bytes);
        // SAFETY: the caller's contract; each batch element's range is disjoint from the others.
        unsafe {
            ArrayViewMut::from_raw_parts(data, self.dtype, &self.inner_dims, &self.inner_strides())
        }
        .map_err(|error| format!("l1l2_rs: {error}"))
    }
}

/// The views of every operand's batch elements, batch-major: `b * operands + i`.
fn views<'a>(operands: &'a [Operand], batch: &[usize]) -> Result<Vec<ArrayView<'a>>, Failure> {
    let batch_len: usize = batch.iter().product();
    (0..batch_len)
        .flat_map(|b| operands.iter().map(move |operand| operand.view(batch, b)))
        .collect()
}

/// A leaf's penalty as the adapter reports it: rounded once to float32 for float16, bfloat16
/// and float32 leaves (whose penalty JAX returns in float32), kept in float64 for float64.
fn leaf_penalty(dtype: DType, value: f64) -> f64 {
    if dtype == DType::F64 {
        value
    } else {
        value as f32 as f64
    }
}

/// Adds each batch element's leaf penalties, in operand order, into `totals`.
fn add_penalties(operands: &[Operand], values: &[f64], totals: &mut [f64]) {
    for (b, total) in totals.iter_mut().enumerate() {
        for (i, operand) in operands.iter().enumerate() {
            *total += leaf_penalty(operand.dtype, values[b * operands.len() + i]);
        }
    }
}

fn penalties(
    operands: &[Operand],
    batch: &[usize],
    factors: &Factors,
    totals: &mut [f64],
) -> Result<(), Failure> {
    let views = views(operands, batch)?;
    let values: Vec<f64> = l1l2_core::sums_many(&views)
        .iter()
        .map(|sums: &Sums| factors.penalty(sums))
        .collect();
    add_penalties(operands, &values, totals);
    Ok(())
}

fn value_and_grads(
    operands: &[Operand],
    batch: &[usize],
    gradients: &[Buffer],
    factors: &Factors,
    totals: &mut [f64],
) -> Result<(), Failure> {
    let views = views(operands, batch)?;
    let mut grads = Vec::with_capacity(views.len());
    for b in 0..totals.len() {
        for (operand, gradient) in operands.iter().zip(gradients) {
            // SAFETY: `gradient` is the result buffer XLA allocated for this operand's gradient
            // (dtype and dims checked in `execute`); results never alias operands (no
            // input_output_aliases are declared), and `b` is within the batch.
            grads.push(unsafe { operand.gradient_view(gradient, b) }?);
        }
    }
    let mut values = l1l2_core::value_and_grad_many(&views, &mut grads, factors, Update::Overwrite)
        .map_err(|error| format!("l1l2_rs: {error}"))?;
    // The fused call rounds each penalty to its leaf's dtype; a float16 or bfloat16 leaf's
    // penalty is reported in float32, so it is taken from the sums (the same float64 value
    // before rounding: value_and_grad's penalty is defined as the rounded penalty of the sums).
    let narrow: Vec<usize> = (0..views.len())
        .filter(|&k| matches!(views[k].dtype(), DType::F16 | DType::BF16))
        .collect();
    if !narrow.is_empty() {
        let narrow_views: Vec<ArrayView<'_>> = narrow.iter().map(|&k| views[k].clone()).collect();
        for (&k, sums) in narrow.iter().zip(l1l2_core::sums_many(&narrow_views)) {
            values[k] = factors.penalty(&sums);
        }
    }
    add_penalties(operands, &values, totals);
    Ok(())
}

/// Writes the per-batch-element totals into the penalty result, rounded once to its dtype.
///
/// # Safety
/// `penalty` is a result buffer XLA allocated for this call, of `totals.len()` elements.
unsafe fn write_totals(penalty: &Buffer, totals: &[f64]) -> Result<(), Failure> {
    if totals.is_empty() {
        return Ok(());
    }
    match penalty.dtype {
        abi::DTYPE_F32 => {
            let out = penalty.data.cast::<f32>();
            if !out.is_aligned() {
                return Err("l1l2_rs: misaligned result buffer".into());
            }
            // SAFETY: the caller's contract: `totals.len()` aligned float32 elements, ours to write.
            let out = unsafe { std::slice::from_raw_parts_mut(out, totals.len()) };
            for (slot, &total) in out.iter_mut().zip(totals) {
                *slot = total as f32;
            }
        }
        abi::DTYPE_F64 => {
            let out = penalty.data.cast::<f64>();
            if !out.is_aligned() {
                return Err("l1l2_rs: misaligned result buffer".into());
            }
            // SAFETY: as above, float64.
            let out = unsafe { std::slice::from_raw_parts_mut(out, totals.len()) };
            out.copy_from_slice(totals);
        }
        other => {
            return Err(format!(
                "l1l2_rs: the penalty result must be float32 or float64, got XLA dtype code {other}"
            ))
        }
    }
    Ok(())
}

/// XLA handler: the penalty of every operand, summed per batch element.
///
/// # Safety
/// Called by XLA with a valid call frame.
unsafe extern "C" fn penalty_handler(frame: *mut abi::CallFrame) -> *mut abi::Error {
    // SAFETY: XLA's call frame, valid for the call.
    unsafe { handle(frame, Op::Penalty) }
}

/// XLA handler: the penalty and the gradient of every operand, in one pass.
///
/// # Safety
/// Called by XLA with a valid call frame.
unsafe extern "C" fn value_and_grad_handler(frame: *mut abi::CallFrame) -> *mut abi::Error {
    // SAFETY: XLA's call frame, valid for the call.
    unsafe { handle(frame, Op::ValueAndGrad) }
}

type Handler = unsafe extern "C" fn(*mut abi::CallFrame) -> *mut abi::Error;

fn capsule<'py>(
    py: Python<'py>,
    handler: Handler,
    name: &'static CStr,
) -> PyResult<Bound<'py, PyCapsule>> {
    let pointer = NonNull::new(handler as *mut c_void).expect("a function pointer is not null");
    // SAFETY: the pointer is a function with the `XLA_FFI_Handler` signature, which lives as
    // long as the module (it is never unloaded while Python runs).
    unsafe { PyCapsule::new_with_pointer(py, pointer, name) }
}

/// The XLA FFI handlers, by target name, as PyCapsules for `jax.ffi.register_ffi_target`
/// (platform "cpu"), and the XLA FFI API version they were written against.
#[pyfunction]
fn xla_ffi_handlers(py: Python<'_>) -> PyResult<(Bound<'_, PyDict>, (i32, i32))> {
    let handlers = PyDict::new(py);
    handlers.set_item(
        "l1l2_rs_penalty",
        capsule(py, penalty_handler, c"l1l2_rs.xla_ffi.penalty")?,
    )?;
    handlers.set_item(
        "l1l2_rs_value_and_grad",
        capsule(
            py,
            value_and_grad_handler,
            c"l1l2_rs.xla_ffi.value_and_grad",
        )?,
    )?;
    Ok((handlers, (API_MAJOR, API_MINOR)))
}

/// Adds the handlers' export to the module.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(xla_ffi_handlers, m)?)
}
