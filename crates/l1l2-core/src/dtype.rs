//! The element types as a value: what a dtype-erased view carries, and the one place that maps a
//! [`DType`] to the Rust type the generic kernels are instantiated for.

use std::fmt;

/// `match $dtype`, binding `$T` to each listed variant's type in `$body`; `$other` for the rest.
macro_rules! match_dtype {
    ($dtype:expr, |$T:ident| $body:expr, { $($variant:ident => $ty:ty),* }, $other:expr) => {{
        #[allow(unreachable_patterns)]
        match $dtype {
            $($crate::dtype::DType::$variant => {
                type $T = $ty;
                $body
            })*
            _ => $other,
        }
    }};
}

/// Runs `$body` with `$T` bound to the float type of `$dtype`; `$other` is evaluated for the rest.
macro_rules! with_float {
    ($dtype:expr, |$T:ident| $body:expr, $other:expr) => {
        $crate::dtype::match_dtype!($dtype, |$T| $body, {
            F16 => $crate::f16, BF16 => $crate::bf16, F32 => f32, F64 => f64
        }, $other)
    };
}

/// Runs `$body` with `$T` bound to the integer or bool type of `$dtype` (floats are unreachable).
macro_rules! with_integer {
    ($dtype:expr, |$T:ident| $body:expr) => {
        $crate::dtype::match_dtype!($dtype, |$T| $body, {
            I8 => i8, I16 => i16, I32 => i32, I64 => i64,
            U8 => u8, U16 => u16, U32 => u32, U64 => u64,
            Bool => $crate::dtype::BoolByte
        }, unreachable!("with_integer on a float type"))
    };
}

/// Runs `$body` with `$T` bound to the element type of `$dtype`: the one dispatch from a
/// [`DType`] to the generic code.
macro_rules! with_element {
    ($dtype:expr, |$T:ident| $body:expr) => {{
        let dtype: $crate::dtype::DType = $dtype;
        $crate::dtype::with_float!(
            dtype,
            |$T| $body,
            $crate::dtype::with_integer!(dtype, |$T| $body)
        )
    }};
}

pub(crate) use {match_dtype, with_element, with_float, with_integer};

/// The element type of an [`ArrayView`](crate::ArrayView): every type the library reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DType {
    /// IEEE binary16.
    F16,
    /// bfloat16 (the top half of an f32).
    BF16,
    /// IEEE binary32.
    F32,
    /// IEEE binary64.
    F64,
    /// 8-bit signed integer.
    I8,
    /// 16-bit signed integer.
    I16,
    /// 32-bit signed integer.
    I32,
    /// 64-bit signed integer.
    I64,
    /// 8-bit unsigned integer.
    U8,
    /// 16-bit unsigned integer.
    U16,
    /// 32-bit unsigned integer.
    U32,
    /// 64-bit unsigned integer.
    U64,
    /// One byte per value; any non-zero byte counts as true (as numpy's `x != 0`).
    Bool,
}

impl DType {
    /// Bytes per element.
    pub fn itemsize(self) -> usize {
        match self {
            Self::I8 | Self::U8 | Self::Bool => 1,
            Self::F16 | Self::BF16 | Self::I16 | Self::U16 => 2,
            Self::F32 | Self::I32 | Self::U32 => 4,
            Self::F64 | Self::I64 | Self::U64 => 8,
        }
    }

    /// Whether the type is a float type (the only ones a gradient or prox step can be written in).
    pub fn is_float(self) -> bool {
        matches!(self, Self::F16 | Self::BF16 | Self::F32 | Self::F64)
    }

    /// numpy's name of the type.
    pub fn name(self) -> &'static str {
        match self {
            Self::F16 => "float16",
            Self::BF16 => "bfloat16",
            Self::F32 => "float32",
            Self::F64 => "float64",
            Self::I8 => "int8",
            Self::I16 => "int16",
            Self::I32 => "int32",
            Self::I64 => "int64",
            Self::U8 => "uint8",
            Self::U16 => "uint16",
            Self::U32 => "uint32",
            Self::U64 => "uint64",
            Self::Bool => "bool",
        }
    }

    /// The type of a native-byte-order array from its array-interface kind character (`f`, `i`,
    /// `u`, `b`, `V`), item size and type name (`"bfloat16"` tells ml_dtypes' 2-byte void type
    /// apart); `None` for everything the library does not read.
    pub fn from_array_interface(kind: u8, itemsize: usize, name: &str) -> Option<Self> {
        let dtype = match (kind, itemsize) {
            (b'f', 2) => Self::F16,
            (b'f', 4) => Self::F32,
            (b'f', 8) => Self::F64,
            (b'i', 1) => Self::I8,
            (b'i', 2) => Self::I16,
            (b'i', 4) => Self::I32,
            (b'i', 8) => Self::I64,
            (b'u', 1) => Self::U8,
            (b'u', 2) => Self::U16,
            (b'u', 4) => Self::U32,
            (b'u', 8) => Self::U64,
            (b'b', 1) => Self::Bool,
            (b'V', 2) if name == "bfloat16" => Self::BF16,
            _ => return None,
        };
        Some(dtype)
    }

    /// What the supported types are, for error messages.
    pub const SUPPORTED: &'static str =
        "float16, bfloat16, float32, float64, an integer of up to 64 bits or bool";

    /// Rounds an f64 result correctly, once, to the type results are reported in: the input's own
    /// float type, or f64 for integer and bool inputs.
    pub fn round_result(self, value: f64) -> f64 {
        with_element!(self, |T| <T as crate::element::Reduce>::round_result(value))
    }
}

impl DType {
    /// The type results are reported in: the input's own float type, or f64 for integer and bool
    /// inputs (whose penalty must not be truncated to an integer).
    pub fn result_dtype(self) -> DType {
        if self.is_float() {
            self
        } else {
            Self::F64
        }
    }

    /// The native-endian bytes of `value` in [`DType::result_dtype`], rounded once (the first
    /// `result_dtype().itemsize()` bytes count): how a binding builds a scalar of that type.
    pub fn encode_result(self, value: f64) -> [u8; 8] {
        use crate::element::Float;
        let mut bytes = [0u8; 8];
        with_float!(
            self.result_dtype(),
            |T| T::narrow(value).write_ne_bytes(&mut bytes),
            unreachable!("result types are floats")
        );
        bytes
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A byte read as a bool: any non-zero value is true, so a bool view of arbitrary bytes (which
/// would not be a valid Rust `bool`) is still read soundly and counted as numpy counts it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(transparent)]
pub struct BoolByte(pub u8);
