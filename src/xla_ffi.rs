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
//! raises as a Python exception with the message: INVALID_ARGUMENT for what the call was given
//! (operands, results, attributes, an XLA of another API version), INTERNAL for a malformed call
//! frame or a view of XLA's buffers the core refuses. Every struct XLA passes is read through its
//! raw pointer up to its `struct_size` before a reference to it is made, and null tables are
//! refused unless they are empty.
//!
//! Batching: when the penalty result has rank `k > 0` (`vmap` with `vmap_method="expand_dims"`
//! prepends the batch dimensions to every result, and to every operand: the batch's own for a
//! batched operand, 1 for the others), the first `k` dimensions of every operand index the batch
//! (a dimension of 1 stands for every index), and each batch element gets its own penalty. An
//! operand that is not batched along a batch dimension is read in place, never copied, and its
//! sums and gradient are computed once for all the indices along it (the gradient is then copied
//! into each batch element's result).

use std::ffi::{c_int, c_void, CStr, CString};
use std::mem::{offset_of, size_of};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr::{addr_of, addr_of_mut, null_mut, NonNull};

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

    #[repr(C)]
    pub struct TypeId {
        pub type_id: i64,
    }

    /// `XLA_FFI_Metadata`; its `STRUCT_SIZE` ends at `traits`, so `state_type_id` is written
    /// only when XLA's struct is large enough to hold it.
    #[repr(C)]
    pub struct Metadata {
        pub struct_size: usize,
        pub api_version: ApiVersion,
        pub traits: u32,
        pub state_type_id: TypeId,
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
const EXTENSION_BASE_SIZE: usize = size_of::<abi::ExtensionBase>();
const API_VERSION_SIZE: usize = size_of::<abi::ApiVersion>();
const METADATA_SIZE: usize = end_of(offset_of!(abi::Metadata, traits), size_of::<u32>());
const METADATA_STATE_TYPE_ID_END: usize = size_of::<abi::Metadata>();
const METADATA_EXTENSION_SIZE: usize = size_of::<abi::MetadataExtension>();
const BUFFER_SIZE: usize = size_of::<abi::Buffer>();
const ERROR_CREATE_ARGS_SIZE: usize =
    end_of(offset_of!(abi::ErrorCreateArgs, errc), size_of::<c_int>());
const API_VERSION_END: usize = end_of(offset_of!(abi::Api, api_version), API_VERSION_SIZE);
const API_ERROR_CREATE_END: usize = end_of(offset_of!(abi::Api, error_create), size_of::<usize>());

/// `XLA_FFI_UNKNOWN_TYPE_ID`: the state type of a stateless handler.
const UNKNOWN_TYPE_ID: i64 = 0;
/// How many extensions of a call frame's chain are looked at for the metadata query (XLA
/// passes one; the bound only keeps a corrupt, cyclic chain from hanging the call).
const MAX_EXTENSIONS: usize = 64;

// The layout of c_api.h's structs on the 64-bit targets jaxlib ships for (the transcription is
// also compared with the installed header by tests/test_jax.py).
#[cfg(target_pointer_width = "64")]
const _: () = {
    assert!(size_of::<abi::CallFrame>() == 168);
    assert!(size_of::<abi::Buffer>() == 48);
    assert!(size_of::<abi::MetadataExtension>() == 32);
    assert!(EXTENSION_BASE_SIZE == 24);
    assert!(API_VERSION_SIZE == 24);
    assert!(METADATA_SIZE == 36);
    assert!(METADATA_STATE_TYPE_ID_END == 48);
    assert!(ERROR_CREATE_ARGS_SIZE == 28);
    assert!(API_VERSION_END == 40);
    assert!(API_ERROR_CREATE_END == 56);
};

/// What a handler computes.
#[derive(Clone, Copy)]
enum Op {
    /// Operands `x_i`; result: the penalty (per batch element).
    Penalty,
    /// Operands `x_i`; results: the penalty, then the gradient of each `x_i`.
    ValueAndGrad,
}

/// Why a call was refused: the message, and the XLA error code JAX raises it with.
#[derive(Debug)]
struct Failure {
    code: c_int,
    message: String,
}

impl Failure {
    /// What the call was given does not fit: an operand, result or attribute, or an XLA whose
    /// FFI API does not match (as XLA's own handler helpers report it).
    fn invalid(message: impl Into<String>) -> Self {
        Self {
            code: abi::ERROR_INVALID_ARGUMENT,
            message: message.into(),
        }
    }

    /// Not the caller's doing: a malformed call frame, or a panic.
    fn internal(message: impl Into<String>) -> Self {
        Self {
            code: abi::ERROR_INTERNAL,
            message: message.into(),
        }
    }

    /// A refusal of the core: an invalid argument when it is about a value the caller chose (a
    /// factor, a dtype), internal when it is about a view the handler built from XLA's buffers
    /// (size, alignment, bounds, overlap).
    fn core(error: &l1l2_core::Error) -> Self {
        let message = format!("l1l2_rs: {error}");
        match error.root() {
            l1l2_core::Error::InvalidArgument { .. } | l1l2_core::Error::NotFloat { .. } => {
                Self::invalid(message)
            }
            _ => Self::internal(message),
        }
    }
}

/// Runs `op` on XLA's call frame (or answers its metadata query) and reports any failure, a
/// panic included, as an `XLA_FFI_Error`.
///
/// # Safety
/// `frame` is the call frame XLA passes to a handler, valid for the duration of the call.
unsafe fn handle(frame: *mut abi::CallFrame, op: Op) -> *mut abi::Error {
    // Returning no error without writing the results would hand XLA garbage as the answer, so
    // a call that is not from XLA at all (no frame, a misaligned one, or one too small to hold
    // the API through which errors are reported) stops the process instead.
    if frame.is_null() || !frame.is_aligned() {
        eprintln!("l1l2_rs: XLA FFI handler called without a usable call frame");
        std::process::abort();
    }
    // SAFETY: XLA passes a valid call frame that outlives the call (the caller's contract); its
    // first field is the size XLA filled it to, read before anything after it.
    let size = unsafe { addr_of!((*frame).struct_size).read() };
    if size < CALL_FRAME_API_END {
        eprintln!("l1l2_rs: XLA FFI call frame of {size} bytes");
        std::process::abort();
    }
    // SAFETY: as above; the frame holds at least the fields up to `api`.
    let (api, extension) = unsafe {
        (
            addr_of!((*frame).api).read(),
            addr_of!((*frame).extension_start).read(),
        )
    };
    // SAFETY: the extension chain of XLA's call frame.
    let query = unsafe { metadata_query(extension) };
    // A chain that cannot be walked counts as an execution: if its failure cannot be reported
    // either, the process stops rather than XLA reading unwritten results.
    let is_metadata_query = matches!(query, Ok(Some(_)));
    let outcome = if size < CALL_FRAME_SIZE {
        Err(Failure::invalid(format!(
            "l1l2_rs: XLA FFI call frame of {size} bytes, expected at least \
             {CALL_FRAME_SIZE}: jaxlib is older than the XLA FFI API {API_MAJOR}.{API_MINOR}"
        )))
    } else {
        // SAFETY: the frame is valid and filled to at least our size (checked above).
        let frame = unsafe { &*frame };
        // SAFETY: as above; `query` comes from this frame's extension chain.
        match catch_unwind(AssertUnwindSafe(|| unsafe { run(frame, query, op) })) {
            Ok(result) => result,
            Err(_) => Err(Failure::internal(
                "l1l2_rs: internal error (a panic) in the XLA FFI handler",
            )),
        }
    };
    let Err(Failure { code, message }) = outcome else {
        return null_mut();
    };
    // SAFETY: `api` comes from the frame XLA passed.
    let error = unsafe { create_error(api, code, &message) };
    if error.is_null() && !is_metadata_query {
        // An execution whose failure cannot be reported must not pass for a success (a failed
        // metadata query leaves the version unset, which XLA refuses on its own).
        eprintln!("{message}");
        std::process::abort();
    }
    error
}

/// Answers the metadata query or executes `op`, as the frame's extension chain says.
///
/// # Safety
/// `frame` is a valid call frame of at least `CALL_FRAME_SIZE` bytes, and `query` was found in
/// its extension chain by [`metadata_query`].
unsafe fn run(
    frame: &abi::CallFrame,
    query: Result<Option<*mut abi::MetadataExtension>, Failure>,
    op: Op,
) -> Result<(), Failure> {
    match query? {
        // SAFETY: the metadata extension XLA put in the frame (the caller's contract).
        Some(extension) => unsafe { report_metadata(extension) },
        // SAFETY: the caller's contract.
        None => unsafe { execute(frame, op) },
    }
}

/// The metadata extension in the chain starting at `extension`, if there is one: XLA asks for
/// the handler's metadata with a call frame that carries it (c_api.h).
///
/// # Safety
/// `extension` is null or the start of a call frame's extension chain, each node an
/// `XLA_FFI_Extension_Base` (followed by its type's fields) valid for the call.
unsafe fn metadata_query(
    mut extension: *mut abi::ExtensionBase,
) -> Result<Option<*mut abi::MetadataExtension>, Failure> {
    for _ in 0..MAX_EXTENSIONS {
        if extension.is_null() {
            return Ok(None);
        }
        if !extension.is_aligned() {
            return Err(Failure::internal("l1l2_rs: misaligned XLA FFI extension"));
        }
        // SAFETY: a node of the chain starts with its size (the caller's contract), read before
        // the fields after it.
        let size = unsafe { addr_of!((*extension).struct_size).read() };
        if size < EXTENSION_BASE_SIZE {
            return Err(Failure::internal(format!(
                "l1l2_rs: XLA FFI extension of {size} bytes"
            )));
        }
        // SAFETY: the node holds a whole `XLA_FFI_Extension_Base` (checked above).
        let base = unsafe { &*extension };
        if base.type_ == abi::EXTENSION_METADATA {
            return Ok(Some(extension.cast()));
        }
        extension = base.next;
    }
    Err(Failure::internal(format!(
        "l1l2_rs: more than {MAX_EXTENSIONS} XLA FFI extensions in the call frame"
    )))
}

/// An `XLA_FFI_Error` carrying `message`, or null when XLA gave no API to create one with.
///
/// # Safety
/// `api` is null or the `XLA_FFI_Api` of a valid call frame.
unsafe fn create_error(api: *const abi::Api, code: c_int, message: &str) -> *mut abi::Error {
    if api.is_null() || !api.is_aligned() {
        return null_mut();
    }
    // SAFETY: `api` is XLA's API struct (the caller's contract), whose first field is its size;
    // `error_create` is read only when the struct holds it.
    let error_create = unsafe {
        if addr_of!((*api).struct_size).read() < API_ERROR_CREATE_END {
            return null_mut();
        }
        addr_of!((*api).error_create).read()
    };
    let Some(error_create) = error_create else {
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

/// Answers XLA's registration-time query: the API version and traits of this handler, and no
/// state type (it is stateless).
///
/// # Safety
/// `extension` is the metadata extension XLA put in the call frame, valid for the call.
unsafe fn report_metadata(extension: *mut abi::MetadataExtension) -> Result<(), Failure> {
    // SAFETY: the caller's contract: the extension starts with an `XLA_FFI_Extension_Base`
    // whose size (checked by `metadata_query` to cover the base) is read before `metadata`.
    let metadata = unsafe {
        if addr_of!((*extension).extension_base.struct_size).read() < METADATA_EXTENSION_SIZE {
            return Err(Failure::invalid(
                "l1l2_rs: XLA FFI metadata extension too small",
            ));
        }
        addr_of!((*extension).metadata).read()
    };
    if metadata.is_null() || !metadata.is_aligned() {
        return Err(Failure::internal(
            "l1l2_rs: XLA FFI metadata query without a usable struct",
        ));
    }
    // SAFETY: XLA points `metadata` at its own `XLA_FFI_Metadata`, ours to fill for the call.
    // Its size is read first, and each field is written through a raw pointer only when the
    // struct holds it (a reference to the whole struct could outrun a smaller one).
    unsafe {
        let size = addr_of!((*metadata).struct_size).read();
        if size < METADATA_SIZE {
            return Err(Failure::invalid(
                "l1l2_rs: XLA FFI metadata struct too small",
            ));
        }
        addr_of_mut!((*metadata).api_version).write(abi::ApiVersion {
            struct_size: API_VERSION_SIZE,
            extension_start: null_mut(),
            major_version: API_MAJOR,
            minor_version: API_MINOR,
        });
        addr_of_mut!((*metadata).traits).write(0);
        if size >= METADATA_STATE_TYPE_ID_END {
            addr_of_mut!((*metadata).state_type_id).write(abi::TypeId {
                type_id: UNKNOWN_TYPE_ID,
            });
        }
    }
    Ok(())
}

/// One operand or result buffer, decoded.
struct Buffer {
    dtype: c_int,
    data: *mut u8,
    dims: Vec<usize>,
}

/// A count from a call-frame table; a negative one is a malformed frame.
fn table_len(size: i64, what: &str) -> Result<usize, Failure> {
    usize::try_from(size)
        .map_err(|_| Failure::internal(format!("l1l2_rs: XLA FFI call frame with {size} {what}")))
}

/// The `len` entries of a table of the call frame: empty when `len` is 0, whatever the pointer
/// (XLA may pass null then), and a failure when the pointer is null or misaligned otherwise.
///
/// # Safety
/// When `len > 0` and `table` is non-null and aligned, it points at `len` initialised entries
/// valid (and not written) for `'a`.
unsafe fn table<'a, T>(table: *const T, len: usize, what: &str) -> Result<&'a [T], Failure> {
    if len == 0 {
        return Ok(&[]);
    }
    if table.is_null() || !table.is_aligned() {
        return Err(Failure::internal(format!(
            "l1l2_rs: XLA FFI call frame with {len} {what} but a null or misaligned table"
        )));
    }
    // SAFETY: the caller's contract, for a non-null aligned pointer and `len > 0`.
    Ok(unsafe { std::slice::from_raw_parts(table, len) })
}

/// # Safety
/// `types` and `entries` are the call frame's tables of `size` entries each, and each entry
/// of type buffer points at an `XLA_FFI_Buffer` valid for the call.
unsafe fn buffers(
    size: i64,
    types: *const c_int,
    entries: *const *mut c_void,
    buffer_type: c_int,
    what: &str,
) -> Result<Vec<Buffer>, Failure> {
    let count = table_len(size, &format!("{what}s"))?;
    // SAFETY: the caller's contract: `count` types and entries.
    let (types, entries) = unsafe {
        (
            table(types, count, &format!("{what} types"))?,
            table(entries, count, &format!("{what}s"))?,
        )
    };
    let mut decoded = Vec::with_capacity(count);
    for (index, (&kind, &entry)) in types.iter().zip(entries).enumerate() {
        if kind != buffer_type {
            return Err(Failure::invalid(format!(
                "l1l2_rs: {what} {index} is not an array buffer"
            )));
        }
        // SAFETY: an entry of buffer type is an `XLA_FFI_Buffer` (the caller's contract).
        decoded.push(unsafe { buffer(entry.cast(), index, what) }?);
    }
    Ok(decoded)
}

/// One `XLA_FFI_Buffer`, decoded.
///
/// # Safety
/// `entry` is null or points at an `XLA_FFI_Buffer` (of the size its first field says) valid
/// for the call, whose `dims` hold `rank` entries.
unsafe fn buffer(entry: *const abi::Buffer, index: usize, what: &str) -> Result<Buffer, Failure> {
    let malformed = |problem: &str| {
        Failure::internal(format!("l1l2_rs: {what} {index}: XLA FFI buffer {problem}"))
    };
    if entry.is_null() || !entry.is_aligned() {
        return Err(malformed("is null or misaligned"));
    }
    // SAFETY: the caller's contract; the size is read on its own, before a reference to the
    // whole struct is made.
    if unsafe { addr_of!((*entry).struct_size).read() } < BUFFER_SIZE {
        return Err(malformed("struct too small"));
    }
    // SAFETY: the struct holds every field of `abi::Buffer` (checked above).
    let buffer = unsafe { &*entry };
    let rank = usize::try_from(buffer.rank).map_err(|_| malformed("of negative rank"))?;
    // SAFETY: `dims` holds `rank` entries (c_api.h: "length == rank"); null is refused.
    let dims = unsafe { table(buffer.dims, rank, "dims") }
        .map_err(|_| malformed("with null or misaligned dims"))?
        .iter()
        .map(|&dim| usize::try_from(dim))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| malformed("with a negative dimension"))?;
    let elements = dims
        .iter()
        .try_fold(1usize, |acc, &dim| acc.checked_mul(dim))
        .ok_or_else(|| malformed("with more elements than fit in memory"))?;
    if elements > 0 && buffer.data.is_null() {
        return Err(malformed("without data"));
    }
    Ok(Buffer {
        dtype: buffer.dtype,
        data: buffer.data.cast(),
        dims,
    })
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
    let count = table_len(attrs.size, "attributes")?;
    // SAFETY: the table holds `size` types, names and values (c_api.h).
    let (types, names, values) = unsafe {
        (
            table(attrs.types, count, "attribute types")?,
            table(attrs.names, count, "attribute names")?,
            table(attrs.attrs, count, "attributes")?,
        )
    };
    let (mut l1, mut l2) = (None, None);
    for ((&kind, &name), &value) in types.iter().zip(names).zip(values) {
        // SAFETY: an attribute's name is a byte span valid for the call (c_api.h).
        let name = unsafe { attribute_name(name) }?;
        let name = String::from_utf8_lossy(name);
        let slot = match name.as_ref() {
            "l1" => &mut l1,
            "l2" => &mut l2,
            other => {
                return Err(Failure::invalid(format!(
                    "l1l2_rs: unexpected attribute {other:?} (takes l1, l2)"
                )))
            }
        };
        if kind != abi::ATTR_SCALAR {
            return Err(Failure::invalid(format!(
                "l1l2_rs: attribute {name} must be a float scalar"
            )));
        }
        // SAFETY: a scalar attribute is an `XLA_FFI_Scalar` valid for the call (c_api.h).
        let number = unsafe { scalar(value.cast()) }?;
        *slot = Some(number.ok_or_else(|| {
            Failure::invalid(format!(
                "l1l2_rs: attribute {name} must be a float64 or float32 scalar"
            ))
        })?);
    }
    let (Some(l1), Some(l2)) = (l1, l2) else {
        return Err(Failure::invalid(
            "l1l2_rs: the attributes l1 and l2 are required",
        ));
    };
    Factors::l1l2(l1, l2).map_err(|error| Failure::core(&error))
}

/// The bytes of an attribute's name.
///
/// # Safety
/// `span` is null or points at an `XLA_FFI_ByteSpan` whose `ptr` holds `len` bytes, both
/// valid for `'a`.
unsafe fn attribute_name<'a>(span: *const abi::ByteSpan) -> Result<&'a [u8], Failure> {
    if span.is_null() || !span.is_aligned() {
        return Err(Failure::internal(
            "l1l2_rs: XLA FFI attribute without a name",
        ));
    }
    // SAFETY: the caller's contract; the span's bytes go through `table`, which refuses a null
    // pointer with a non-zero length.
    unsafe {
        let span = &*span;
        table(
            span.ptr.cast::<u8>(),
            span.len,
            "bytes of an attribute name",
        )
    }
}

/// The value of a scalar attribute as f64: `Some` for a float64 or float32 scalar, `None` for
/// another dtype.
///
/// # Safety
/// `scalar` is null or points at an `XLA_FFI_Scalar` whose `value` holds one element of its
/// dtype, both valid for the call.
unsafe fn scalar(scalar: *const abi::Scalar) -> Result<Option<f64>, Failure> {
    if scalar.is_null() || !scalar.is_aligned() {
        return Err(Failure::internal(
            "l1l2_rs: XLA FFI scalar attribute is null",
        ));
    }
    // SAFETY: the caller's contract.
    let abi::Scalar { dtype, value } = unsafe { scalar.read() };
    if value.is_null() {
        return Err(Failure::internal(
            "l1l2_rs: XLA FFI scalar attribute without a value",
        ));
    }
    // SAFETY: `value` holds one element of `dtype` (the caller's contract); XLA promises no
    // alignment for it, so it is read unaligned.
    Ok(unsafe {
        match dtype {
            abi::DTYPE_F64 => Some(value.cast::<f64>().read_unaligned()),
            abi::DTYPE_F32 => Some(f64::from(value.cast::<f32>().read_unaligned())),
            _ => None,
        }
    })
}

/// Refuses an XLA whose FFI API has another major version, and stages other than execute.
///
/// # Safety
/// `frame` is a valid call frame of at least `CALL_FRAME_SIZE` bytes.
unsafe fn check_caller(frame: &abi::CallFrame) -> Result<(), Failure> {
    let api = frame.api;
    if !api.is_null() && api.is_aligned() {
        // SAFETY: `api` is XLA's API struct, valid for the call; its size is read first, and
        // the version only when the struct (and the version struct in it) holds it.
        let (major, minor) = unsafe {
            if addr_of!((*api).struct_size).read() < API_VERSION_END {
                return Err(Failure::invalid(
                    "l1l2_rs: XLA FFI API struct too small to hold its version",
                ));
            }
            (
                addr_of!((*api).api_version.major_version).read(),
                addr_of!((*api).api_version.minor_version).read(),
            )
        };
        if major != API_MAJOR {
            return Err(Failure::invalid(format!(
                "l1l2_rs: XLA FFI API {major}.{minor} is not compatible with the \
                 {API_MAJOR}.{API_MINOR} this handler was written for"
            )));
        }
    }
    if frame.stage != abi::STAGE_EXECUTE {
        return Err(Failure::invalid(format!(
            "l1l2_rs: called for stage {}",
            frame.stage
        )));
    }
    Ok(())
}

/// Decodes the call, checks the results against the operands and runs the core. Every check
/// runs before anything is written, so a refused call leaves the results untouched.
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
        return Err(Failure::invalid(format!(
            "l1l2_rs: {} operands need {expected_results} results, got {}",
            operands.len(),
            results.len()
        )));
    }
    let (penalty, gradients) = results.split_first().expect("at least one result");
    let penalty_result = PenaltyResult::new(penalty)?;
    let batch = penalty.dims.clone();
    let batch_len = batch
        .iter()
        .try_fold(1usize, |acc, &dim| acc.checked_mul(dim))
        .ok_or_else(|| Failure::internal("l1l2_rs: the batch is too large"))?;
    let operands = operands
        .iter()
        .enumerate()
        .map(|(index, buffer)| Operand::new(index, buffer, &batch))
        .collect::<Result<Vec<_>, _>>()?;
    for (index, (operand, gradient)) in operands.iter().zip(gradients).enumerate() {
        let shape: Vec<usize> = batch.iter().chain(&operand.inner_dims).copied().collect();
        if gradient.dtype != operand.dtype_code || gradient.dims != shape {
            return Err(Failure::invalid(format!(
                "l1l2_rs: result {} must have operand {index}'s dtype and the shape {shape:?} \
                 (the batch shape, then the operand's own)",
                index + 1
            )));
        }
        if batch_len.checked_mul(operand.inner_bytes).is_none() {
            return Err(Failure::internal(format!(
                "l1l2_rs: result {} is too large",
                index + 1
            )));
        }
    }
    if batch_len == 0 {
        return Ok(()); // every result is empty
    }
    // SAFETY: the operands were decoded from the operand buffers XLA passed to this call, which
    // hold their arrays and are not written during it; `batch_len` is the batch's size.
    let elements = unsafe { Elements::new(&operands, &batch, batch_len) }?;
    let mut totals = vec![0.0f64; batch_len];
    match op {
        Op::Penalty => penalties(&operands, &elements, &factors, &mut totals),
        // SAFETY: `gradients` are this call's result buffers, checked above against the
        // operands (dtype, then the batch shape and the operand's inner dims); results never
        // alias operands (no input_output_aliases are declared).
        Op::ValueAndGrad => {
            unsafe { value_and_grads(&operands, &elements, gradients, &factors, &mut totals) }?
        }
    }
    // SAFETY: the penalty result is a buffer XLA allocated for this call with dims `batch`, so
    // `batch_len` elements, written by nothing else.
    unsafe { penalty_result.write(&totals) };
    Ok(())
}

/// The penalty result, checked before anything is computed: a float32 or float64 buffer,
/// aligned for its dtype.
enum PenaltyResult {
    F32(*mut f32),
    F64(*mut f64),
}

impl PenaltyResult {
    fn new(buffer: &Buffer) -> Result<Self, Failure> {
        let (result, aligned) = match buffer.dtype {
            abi::DTYPE_F32 => {
                let data = buffer.data.cast::<f32>();
                (Self::F32(data), data.is_aligned())
            }
            abi::DTYPE_F64 => {
                let data = buffer.data.cast::<f64>();
                (Self::F64(data), data.is_aligned())
            }
            other => {
                return Err(Failure::invalid(format!(
                    "l1l2_rs: the penalty result must be float32 or float64, got XLA dtype \
                     code {other}"
                )))
            }
        };
        if !aligned {
            return Err(Failure::internal(
                "l1l2_rs: misaligned penalty result buffer",
            ));
        }
        Ok(result)
    }

    /// Writes the per-batch-element totals, rounded once to the result's dtype.
    ///
    /// # Safety
    /// The buffer is a result buffer XLA allocated for this call, of `totals.len()` elements,
    /// not accessed by anything else meanwhile.
    unsafe fn write(&self, totals: &[f64]) {
        if totals.is_empty() {
            return;
        }
        match *self {
            Self::F32(out) => {
                // SAFETY: the caller's contract; non-null (a buffer with elements has data) and
                // aligned (checked in `new`).
                let out = unsafe { std::slice::from_raw_parts_mut(out, totals.len()) };
                for (slot, &total) in out.iter_mut().zip(totals) {
                    *slot = total as f32;
                }
            }
            Self::F64(out) => {
                // SAFETY: as above, float64.
                let out = unsafe { std::slice::from_raw_parts_mut(out, totals.len()) };
                out.copy_from_slice(totals);
            }
        }
    }
}

/// An operand: its dtype, the layout of its batch elements and the data pointer.
struct Operand {
    dtype: DType,
    dtype_code: c_int,
    data: *mut u8,
    /// The batch shape's dims, each either the batch's own or 1 (one element for the whole
    /// batch: `vmap_method="expand_dims"` gives an operand that is not batched a leading 1).
    batch_dims: Vec<usize>,
    /// The distinct batch elements the operand holds: the product of `batch_dims`.
    elements: usize,
    /// The dims after the batch dims, and the bytes one batch element spans.
    inner_dims: Vec<usize>,
    inner_bytes: usize,
}

impl Operand {
    fn new(index: usize, buffer: &Buffer, batch: &[usize]) -> Result<Self, Failure> {
        let dtype = float_dtype(buffer.dtype).ok_or_else(|| {
            Failure::invalid(format!(
                "l1l2_rs: operand {index} has XLA dtype code {}; expected float16, bfloat16, \
                 float32 or float64",
                buffer.dtype
            ))
        })?;
        let leading = buffer.dims.get(..batch.len()).unwrap_or(&[]);
        let batched = leading.len() == batch.len()
            && leading
                .iter()
                .zip(batch)
                .all(|(&dim, &full)| dim == full || dim == 1);
        if !batched {
            return Err(Failure::invalid(format!(
                "l1l2_rs: operand {index} has shape {:?}, whose leading dims must each be those \
                 of the penalty result's batch shape {batch:?}, or 1",
                buffer.dims
            )));
        }
        let too_large = || Failure::internal(format!("l1l2_rs: operand {index} is too large"));
        let inner_dims = buffer.dims[batch.len()..].to_vec();
        let inner_bytes = inner_dims
            .iter()
            .try_fold(dtype.itemsize(), |acc, &dim| acc.checked_mul(dim))
            .ok_or_else(too_large)?;
        let elements = leading
            .iter()
            .try_fold(1usize, |acc, &dim| acc.checked_mul(dim))
            .ok_or_else(too_large)?;
        elements.checked_mul(inner_bytes).ok_or_else(too_large)?;
        Ok(Self {
            dtype,
            dtype_code: buffer.dtype,
            data: buffer.data,
            batch_dims: leading.to_vec(),
            elements,
            inner_dims,
            inner_bytes,
        })
    }

    /// The operand's element that batch element `b` (a row-major index into the batch shape
    /// `batch`, every dim of which is non-zero) reads: a dim of 1 gives that one element for
    /// every index along it.
    fn element_of(&self, batch: &[usize], mut b: usize) -> usize {
        let (mut element, mut stride) = (0, 1);
        for (&full, &dim) in batch.iter().zip(&self.batch_dims).rev() {
            let index = b % full;
            b /= full;
            if dim != 1 {
                element += index * stride;
            }
            stride *= dim;
        }
        element
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

    /// The operand's element `e` (one batch element's array), read-only.
    ///
    /// # Safety
    /// The operand was decoded from an operand buffer XLA passed to this call, which holds the
    /// whole row-major array (`elements` batch elements of `inner_bytes` each) and is not
    /// written while the view lives; `e < self.elements`.
    unsafe fn view(&self, e: usize) -> Result<ArrayView<'_>, Failure> {
        let data = self.data.wrapping_add(e * self.inner_bytes);
        // SAFETY: the caller's contract: element `e` spans `inner_bytes` from `data`, inside
        // the buffer, unwritten while the view lives.
        unsafe {
            ArrayView::from_raw_parts(data, self.dtype, &self.inner_dims, &self.inner_strides())
        }
        .map_err(|error| Failure::core(&error))
    }

    /// Batch element `b` of this operand's gradient: a result buffer of the batch shape
    /// followed by the operand's inner dims.
    ///
    /// # Safety
    /// `result` is a result buffer XLA allocated for this call with this operand's dtype and
    /// the batch shape followed by its inner dims, not aliased by any operand nor accessed by
    /// anything else while the view lives, and `b` is within the batch.
    unsafe fn gradient_view<'a>(
        &self,
        result: &'a Buffer,
        b: usize,
    ) -> Result<ArrayViewMut<'a>, Failure> {
        let data = result.data.wrapping_add(b * self.inner_bytes);
        // SAFETY: the caller's contract; each batch element's range is disjoint from the others.
        unsafe {
            ArrayViewMut::from_raw_parts(data, self.dtype, &self.inner_dims, &self.inner_strides())
        }
        .map_err(|error| Failure::core(&error))
    }

    /// Copies batch element `from` of this operand's gradient to batch element `to`.
    ///
    /// # Safety
    /// As for [`Operand::gradient_view`], for both `from` and `to`, which differ; no view of
    /// `result` is alive.
    unsafe fn copy_gradient(&self, result: &Buffer, from: usize, to: usize) {
        if self.inner_bytes == 0 {
            return;
        }
        // SAFETY: the caller's contract: both ranges of `inner_bytes` lie in the result buffer
        // (non-null: it has elements), and they are disjoint since `from != to`.
        unsafe {
            std::ptr::copy_nonoverlapping(
                result.data.add(from * self.inner_bytes),
                result.data.add(to * self.inner_bytes),
                self.inner_bytes,
            );
        }
    }
}

/// The arrays the core reads: each operand's distinct batch elements, once. An operand that is
/// not batched along a batch dim (a dim of 1) reads the same element for every index along it,
/// so its sums and gradient are computed once rather than once per batch element.
struct Elements<'a> {
    /// The views, operand by operand.
    views: Vec<ArrayView<'a>>,
    /// For each view: its operand, and the first batch element that reads it.
    owners: Vec<(usize, usize)>,
    /// For each operand, the index into `views` of each batch element's array.
    slots: Vec<Vec<usize>>,
}

impl<'a> Elements<'a> {
    /// # Safety
    /// Each operand was decoded from an operand buffer XLA passed to this call, valid and not
    /// written for `'a`; `batch_len` is the product of `batch`.
    unsafe fn new(
        operands: &'a [Operand],
        batch: &[usize],
        batch_len: usize,
    ) -> Result<Self, Failure> {
        let mut views = Vec::new();
        let mut owners = Vec::new();
        let mut slots = Vec::with_capacity(operands.len());
        for (index, operand) in operands.iter().enumerate() {
            let mut seen = vec![None; operand.elements];
            let mut operand_slots = Vec::with_capacity(batch_len);
            for b in 0..batch_len {
                let e = operand.element_of(batch, b);
                let slot = match seen[e] {
                    Some(slot) => slot,
                    None => {
                        // SAFETY: the caller's contract; `e < operand.elements` (a row-major
                        // index into the operand's batch dims).
                        views.push(unsafe { operand.view(e) }?);
                        owners.push((index, b));
                        seen[e] = Some(views.len() - 1);
                        views.len() - 1
                    }
                };
                operand_slots.push(slot);
            }
            slots.push(operand_slots);
        }
        Ok(Self {
            views,
            owners,
            slots,
        })
    }
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

/// Adds each batch element's leaf penalties (`values`, one per view), in operand order, into
/// `totals`.
fn add_penalties(
    operands: &[Operand],
    elements: &Elements<'_>,
    values: &[f64],
    totals: &mut [f64],
) {
    for (b, total) in totals.iter_mut().enumerate() {
        for (operand, slots) in operands.iter().zip(&elements.slots) {
            *total += leaf_penalty(operand.dtype, values[slots[b]]);
        }
    }
}

fn penalties(operands: &[Operand], elements: &Elements<'_>, factors: &Factors, totals: &mut [f64]) {
    let values: Vec<f64> = l1l2_core::sums_many(&elements.views)
        .iter()
        .map(|sums: &Sums| factors.penalty(sums))
        .collect();
    add_penalties(operands, elements, &values, totals);
}

/// # Safety
/// `gradients` are the gradient result buffers XLA allocated for this call, one per operand,
/// each of its operand's dtype and of the batch shape followed by its inner dims, aliasing no
/// operand and accessed by nothing else during the call.
unsafe fn value_and_grads(
    operands: &[Operand],
    elements: &Elements<'_>,
    gradients: &[Buffer],
    factors: &Factors,
    totals: &mut [f64],
) -> Result<(), Failure> {
    let mut grads = elements
        .owners
        .iter()
        .map(|&(index, b)| {
            // SAFETY: the caller's contract; `b` is within the batch, and every view is of a
            // different batch element of its result, so the views are disjoint.
            unsafe { operands[index].gradient_view(&gradients[index], b) }
        })
        .collect::<Result<Vec<_>, _>>()?;
    let views = &elements.views;
    let mut values = l1l2_core::value_and_grad_many(views, &mut grads, factors, Update::Overwrite)
        .map_err(|error| Failure::core(&error))?;
    drop(grads);
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
    add_penalties(operands, elements, &values, totals);
    // A batch element that reads the same operand element as an earlier one gets a copy of
    // that one's gradient: the bits computing it again would give.
    for (index, (operand, gradient)) in operands.iter().zip(gradients).enumerate() {
        for (b, &slot) in elements.slots[index].iter().enumerate() {
            let (_, first) = elements.owners[slot];
            if first != b {
                // SAFETY: the caller's contract; `first` and `b` are distinct batch elements,
                // and the views into the results were dropped above.
                unsafe { operand.copy_gradient(gradient, first, b) };
            }
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
