//! Why a view or an operation was refused. Every check runs before anything is written.

use std::fmt;

use crate::DType;

/// Why a view or an operation was refused.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Error {
    /// `shape` and `strides` have different lengths.
    ShapeStridesMismatch {
        /// Dimensions in `shape`.
        shape_len: usize,
        /// Dimensions in `strides`.
        strides_len: usize,
    },
    /// The view addresses elements outside the buffer.
    OutOfBounds {
        /// Lowest addressed index (may be negative).
        first: i128,
        /// Highest addressed index.
        last: i128,
        /// Length of the buffer.
        buffer_len: usize,
    },
    /// The element count or the byte extent overflows `usize`.
    TooLarge,
    /// The data pointer is not aligned for the element type.
    Misaligned {
        /// The element type.
        dtype: DType,
    },
    /// A byte stride is not a multiple of the item size.
    StrideNotMultiple {
        /// The offending stride, in bytes.
        stride: isize,
        /// The element type.
        dtype: DType,
    },
    /// A destination repeats elements: a broadcast (zero-stride) dimension.
    BroadcastDestination,
    /// A destination's strides make different elements share memory.
    SelfOverlappingDestination,
    /// A destination's memory range (from its lowest to its highest addressed byte) overlaps that
    /// of a source or another destination. (Conservative: interleaved views such as `x[::2]` and
    /// `x[1::2]` count as overlapping.)
    Overlap {
        /// What overlaps, e.g. "out and x".
        what: String,
    },
    /// Source and destination shapes differ.
    ShapeMismatch {
        /// The source's shape.
        source: Vec<usize>,
        /// The destination's shape.
        destination: Vec<usize>,
    },
    /// Source and destination element types differ.
    DTypeMismatch {
        /// The source's type.
        source: DType,
        /// The destination's type.
        destination: DType,
    },
    /// A gradient or prox step needs a float type to be written in.
    NotFloat {
        /// The element type.
        dtype: DType,
    },
    /// An operation that reads float inputs only got another type.
    FloatOnly {
        /// What refused it, e.g. "the orthogonality penalty".
        operation: &'static str,
        /// The element type.
        dtype: DType,
    },
    /// An operation on matrices got an input of another rank.
    NotAMatrix {
        /// The input's shape.
        shape: Vec<usize>,
    },
    /// A factor, learning rate or scale is out of its range.
    InvalidArgument {
        /// The argument's name.
        name: &'static str,
        /// Its value.
        value: f64,
        /// What it must be.
        expected: &'static str,
    },
    /// The lists of sources and destinations have different lengths.
    LengthMismatch {
        /// Number of sources.
        sources: usize,
        /// Number of destinations.
        destinations: usize,
    },
    /// Partial sums of different dtypes cannot be merged: they are not pieces of one array.
    MixedDTypes {
        /// The dtype of the first partial.
        first: DType,
        /// The dtype of the second.
        second: DType,
    },
    /// A byte string is not an encoded [`SumsPartial`](crate::SumsPartial), or two partials
    /// cannot come from one array.
    InvalidPartial {
        /// What is wrong.
        reason: &'static str,
    },
    /// An error about the tensor at `index` of a list.
    InList {
        /// Position in the list.
        index: usize,
        /// What is wrong with it.
        error: Box<Error>,
    },
}

impl Error {
    /// The error itself, without the list position of [`Error::InList`].
    pub fn root(&self) -> &Error {
        match self {
            Self::InList { error, .. } => error.root(),
            other => other,
        }
    }

    /// This error, about the tensor at `index` of a list.
    pub fn in_list(self, index: usize) -> Self {
        Self::InList {
            index,
            error: Box::new(self),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ShapeStridesMismatch {
                shape_len,
                strides_len,
            } => write!(
                f,
                "shape has {shape_len} dimensions but strides has {strides_len}"
            ),
            Self::OutOfBounds {
                first,
                last,
                buffer_len,
            } => write!(
                f,
                "view addresses elements {first}..={last} of a buffer of {buffer_len}"
            ),
            Self::TooLarge => write!(f, "element count or byte extent overflows usize"),
            Self::Misaligned { dtype } => write!(f, "data is not aligned for {dtype}"),
            Self::StrideNotMultiple { stride, dtype } => write!(
                f,
                "stride of {stride} bytes is not a multiple of the {dtype} item size ({})",
                dtype.itemsize()
            ),
            Self::BroadcastDestination => write!(
                f,
                "destination is a broadcast view (a zero stride): elements would be written twice"
            ),
            Self::SelfOverlappingDestination => write!(
                f,
                "destination's strides make different elements share memory"
            ),
            Self::Overlap { what } => write!(f, "the memory ranges of {what} overlap"),
            Self::ShapeMismatch {
                source,
                destination,
            } => write!(
                f,
                "shape {destination:?} of the destination does not match shape {source:?} of the input"
            ),
            Self::DTypeMismatch {
                source,
                destination,
            } => write!(
                f,
                "dtype {destination} of the destination does not match dtype {source} of the input"
            ),
            Self::NotFloat { dtype } => write!(
                f,
                "a gradient or prox step is written in the input's float dtype; got {dtype}"
            ),
            Self::FloatOnly { operation, dtype } => {
                write!(f, "{operation} reads float inputs only; got {dtype}")
            }
            Self::NotAMatrix { shape } => {
                write!(f, "the input must have rank 2 (a matrix), got shape {shape:?}")
            }
            Self::InvalidArgument {
                name,
                value,
                expected,
            } => write!(f, "{name} must be {expected}, got {value:?}"),
            Self::LengthMismatch {
                sources,
                destinations,
            } => write!(
                f,
                "{destinations} destinations given for {sources} inputs"
            ),
            Self::MixedDTypes { first, second } => write!(
                f,
                "cannot merge partial sums of {first} and {second} data: one array has one dtype"
            ),
            Self::InvalidPartial { reason } => write!(f, "invalid partial sums: {reason}"),
            Self::InList { index, error } => write!(f, "tensor {index}: {error}"),
        }
    }
}

impl std::error::Error for Error {}
