//! Dtype-erased array views: a pointer, a [`DType`], a shape and strides, as numpy, DLPack and
//! ndarray describe arrays. Validated once on construction; read (and written) in place.

use std::marker::PhantomData;
use std::ops::Range;

use crate::dims::Dims;
use crate::element::{Element, Pod};
use crate::layout::Layout;
use crate::{DType, Error, Sums};

/// What both views hold: the span of memory the view addresses and its validated layout.
#[derive(Clone, Debug)]
pub(crate) struct Raw {
    /// The first element of the span (aligned for `dtype`; dangling but aligned when empty).
    base: *mut u8,
    /// Elements from `base` up to and including the highest addressed one.
    span_len: usize,
    dtype: DType,
    shape: Dims<usize>,
    /// Strides in elements.
    strides: Dims<isize>,
    /// The index, from `base`, of the element at index `[0, 0, ..]`.
    offset: usize,
    /// The source layout, normalised.
    layout: Layout,
}

impl Raw {
    /// A view of `span_len` elements at `base`, which the caller vouches for, with the element
    /// `[0, 0, ..]` at `offset`; checks that the layout stays inside the span.
    fn new(
        base: *mut u8,
        span_len: usize,
        dtype: DType,
        offset: usize,
        shape: &[usize],
        strides: &[isize],
    ) -> Result<Self, Error> {
        let layout = Layout::new(span_len, offset, shape, strides)?;
        Ok(Self::with_layout(
            base, span_len, dtype, offset, shape, strides, layout,
        ))
    }

    /// A view whose `layout` was already validated against the span.
    #[inline]
    fn with_layout(
        base: *mut u8,
        span_len: usize,
        dtype: DType,
        offset: usize,
        shape: &[usize],
        strides: &[isize],
        layout: Layout,
    ) -> Self {
        Self {
            base,
            span_len,
            dtype,
            shape: shape.iter().copied().collect(),
            strides: strides.iter().copied().collect(),
            offset,
            layout,
        }
    }

    /// A view from a pointer to element `[0, 0, ..]` and byte strides, the span derived from them.
    fn from_parts(
        data: *mut u8,
        dtype: DType,
        shape: &[usize],
        byte_strides: &[isize],
    ) -> Result<Self, Error> {
        let itemsize = dtype.itemsize();
        if shape.len() != byte_strides.len() {
            return Err(Error::ShapeStridesMismatch {
                shape_len: shape.len(),
                strides_len: byte_strides.len(),
            });
        }
        let mut strides: Dims<isize> = Dims::new();
        for &stride in byte_strides {
            if stride % itemsize as isize != 0 {
                return Err(Error::StrideNotMultiple { stride, dtype });
            }
            strides.push(stride / itemsize as isize);
        }
        let len = shape
            .iter()
            .try_fold(1usize, |acc, &n| acc.checked_mul(n))
            .ok_or(Error::TooLarge)?;
        if len == 0 {
            let dangling = std::ptr::null_mut::<u8>().wrapping_add(itemsize);
            return Self::new(dangling, 0, dtype, 0, shape, &strides);
        }
        if (data as usize) % itemsize != 0 {
            return Err(Error::Misaligned { dtype });
        }
        if is_c_contiguous(shape, &strides) {
            // The common case (every tensor of a model's parameter list, as a rule): one row
            // from `data`, with no normalisation to do.
            if len
                .checked_mul(itemsize)
                .is_none_or(|bytes| bytes > isize::MAX as usize)
            {
                return Err(Error::TooLarge);
            }
            let layout = Layout::contiguous(0, len);
            return Ok(Self::with_layout(
                data, len, dtype, 0, shape, &strides, layout,
            ));
        }
        // The lowest and highest addressed element, relative to `data`.
        let (mut low, mut high) = (0i128, 0i128);
        for (&dim, &stride) in shape.iter().zip(&strides) {
            let reach = (dim as i128 - 1) * stride as i128;
            if reach < 0 {
                low += reach;
            } else {
                high += reach;
            }
        }
        let span_len = usize::try_from(high - low + 1).map_err(|_| Error::TooLarge)?;
        if span_len
            .checked_mul(itemsize)
            .is_none_or(|bytes| bytes > isize::MAX as usize)
        {
            return Err(Error::TooLarge);
        }
        let offset = (-low) as usize;
        // Stays inside the allocation the caller vouches for (element `low` is addressed).
        let base = data.wrapping_sub(offset * itemsize);
        Self::new(base, span_len, dtype, offset, shape, &strides)
    }

    fn from_slice<T: Element>(
        data: *mut T,
        data_len: usize,
        offset: usize,
        shape: &[usize],
        strides: &[isize],
    ) -> Result<Self, Error> {
        Self::new(data.cast(), data_len, T::DTYPE, offset, shape, strides)
    }

    /// The span as a slice of `T`.
    ///
    /// # Safety
    /// `T` has the size of `dtype` (checked) and the span is readable for `'a` (the views'
    /// constructors establish it) and not written through another path while the slice lives.
    unsafe fn span<'a, T: Pod>(&self) -> &'a [T] {
        assert_eq!(
            size_of::<T>(),
            self.dtype.itemsize(),
            "element type of a view"
        );
        // SAFETY: `base` is aligned for `dtype`, whose alignment is at least `T`'s (same size,
        // every supported type is aligned to its size or less); `span_len` elements from `base`
        // are readable (the caller's contract); every bit pattern is a valid `T` (`Pod`).
        unsafe { std::slice::from_raw_parts(self.base.cast::<T>(), self.span_len) }
    }

    /// The addresses the view touches, as a byte range (empty for an empty view).
    fn byte_range(&self) -> Range<usize> {
        let itemsize = self.dtype.itemsize();
        let extent = self.layout.extent();
        let start = self.base as usize + extent.start * itemsize;
        start..start + extent.len() * itemsize
    }
}

/// Whether `strides` (in elements) lay `shape` out in C order without gaps, unit dimensions aside.
fn is_c_contiguous(shape: &[usize], strides: &[isize]) -> bool {
    let mut expected = 1usize;
    for (&dim, &stride) in shape.iter().zip(strides).rev() {
        if dim != 1 {
            if stride != expected as isize {
                return false;
            }
            expected = expected.saturating_mul(dim);
        }
    }
    true
}

/// The methods both views have, over their `raw` field.
macro_rules! shared_methods {
    () => {
        /// The element type.
        pub fn dtype(&self) -> DType {
            self.raw.dtype
        }

        /// The shape.
        pub fn shape(&self) -> &[usize] {
            &self.raw.shape
        }

        /// The number of elements.
        pub fn len(&self) -> usize {
            self.raw.layout.len()
        }

        /// Whether the view has no elements.
        pub fn is_empty(&self) -> bool {
            self.len() == 0
        }

        pub(crate) fn layout(&self) -> &Layout {
            &self.raw.layout
        }

        pub(crate) fn byte_range(&self) -> Range<usize> {
            self.raw.byte_range()
        }

        pub(crate) fn strides(&self) -> &[isize] {
            &self.raw.strides
        }

        pub(crate) fn offset(&self) -> usize {
            self.raw.offset
        }
    };
}

/// A read-only view of an n-dimensional array of any supported [`DType`]: element `[i0, i1, ..]`
/// is at `offset + i0 * strides[0] + i1 * strides[1] + ..` (negative and zero strides allowed).
///
/// ```
/// use l1l2_core::ArrayView;
/// let buffer = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
/// // The transpose of a 2x3 C-order matrix, then every column reversed.
/// let view = ArrayView::new(&buffer, 3, &[3, 2], &[1, -3])?;
/// assert_eq!(view.sums().sum_abs, 21.0);
/// // The second column of the 2x3 matrix.
/// let column = ArrayView::new(&buffer, 1, &[2], &[3])?;
/// assert_eq!(column.sums().sum_squares, 4.0 + 25.0);
/// # Ok::<(), l1l2_core::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct ArrayView<'a> {
    pub(crate) raw: Raw,
    _borrow: PhantomData<&'a [u8]>,
}

// SAFETY: a view is a shared borrow of plain data (`&'a [u8]` is Send and Sync); the raw pointer
// is only read through.
unsafe impl Send for ArrayView<'_> {}
// SAFETY: as above.
unsafe impl Sync for ArrayView<'_> {}

impl<'a> ArrayView<'a> {
    /// A one-dimensional view of a whole slice.
    pub fn from_slice<T: Element>(data: &'a [T]) -> Self {
        Self::new(data, 0, &[data.len()], &[1]).expect("a slice is its own valid layout")
    }

    /// A strided view into `data`, strides in elements; checks that every addressed element lies
    /// inside `data`.
    pub fn new<T: Element>(
        data: &'a [T],
        offset: usize,
        shape: &[usize],
        strides: &[isize],
    ) -> Result<Self, Error> {
        let raw = Raw::from_slice(data.as_ptr().cast_mut(), data.len(), offset, shape, strides)?;
        Ok(Self::wrap(raw))
    }

    /// A view of foreign memory (numpy, DLPack): `data` points at element `[0, 0, ..]`, strides are
    /// in bytes. Checks alignment, stride multiples and sizes.
    ///
    /// # Safety
    /// Every element the shape and strides address must be readable memory of `dtype` for `'a`,
    /// and must not be written through any other path while the view is used.
    pub unsafe fn from_raw_parts(
        data: *const u8,
        dtype: DType,
        shape: &[usize],
        byte_strides: &[isize],
    ) -> Result<Self, Error> {
        Raw::from_parts(data.cast_mut(), dtype, shape, byte_strides).map(Self::wrap)
    }

    fn wrap(raw: Raw) -> Self {
        Self {
            raw,
            _borrow: PhantomData,
        }
    }

    shared_methods!();

    /// `sum |x|` and `sum x^2` over the view, in one pass, in place.
    pub fn sums(&self) -> Sums {
        crate::ops::sums_of(self)
    }

    /// Keras' `L1L2(l1, l2)` penalty of the view, in f64; see [`Sums::penalty`].
    pub fn penalty(&self, l1: f64, l2: f64) -> f64 {
        self.sums().penalty(l1, l2)
    }

    /// The span as a slice of `T` (the type [`with_element!`] binds for this dtype).
    pub(crate) fn span<T: Pod>(&self) -> &'a [T] {
        // SAFETY: the constructors establish that the span is readable for `'a` and not written
        // elsewhere meanwhile; `span` checks the size of `T`.
        unsafe { self.raw.span() }
    }

    pub(crate) fn span_len(&self) -> usize {
        self.raw.span_len
    }
}

/// A writable view: an [`ArrayView`] whose elements each have an address of their own (no
/// broadcast dimension, no two elements sharing memory), so that they can be written in place.
///
/// ```
/// use l1l2_core::{prox, ArrayViewMut, Factors};
/// let mut weights = [0.5f32, -0.05, 2.0];
/// let mut view = ArrayViewMut::from_slice(&mut weights);
/// prox(&mut view, 0.1, &Factors::l1l2(1.0, 0.0)?)?;
/// assert_eq!(weights, [0.4, 0.0, 1.9]);
/// # Ok::<(), l1l2_core::Error>(())
/// ```
#[derive(Debug)]
pub struct ArrayViewMut<'a> {
    raw: Raw,
    _borrow: PhantomData<&'a mut [u8]>,
}

// SAFETY: a writable view is an exclusive borrow of plain data (`&'a mut [u8]` is Send and Sync).
unsafe impl Send for ArrayViewMut<'_> {}
// SAFETY: as above; shared access only reads.
unsafe impl Sync for ArrayViewMut<'_> {}

impl<'a> ArrayViewMut<'a> {
    /// A one-dimensional view of a whole slice.
    pub fn from_slice<T: Element>(data: &'a mut [T]) -> Self {
        let len = data.len();
        Self::new(data, 0, &[len], &[1]).expect("a slice is its own valid layout")
    }

    /// A strided view into `data`, strides in elements; checks bounds, and that no two elements
    /// share memory.
    pub fn new<T: Element>(
        data: &'a mut [T],
        offset: usize,
        shape: &[usize],
        strides: &[isize],
    ) -> Result<Self, Error> {
        Self::wrap(Raw::from_slice(
            data.as_mut_ptr(),
            data.len(),
            offset,
            shape,
            strides,
        )?)
    }

    /// A writable view of foreign memory; see [`ArrayView::from_raw_parts`].
    ///
    /// # Safety
    /// Every element the shape and strides address must be readable and writable memory of
    /// `dtype` for `'a`, and must not be accessed through any other path while the view is used.
    pub unsafe fn from_raw_parts(
        data: *mut u8,
        dtype: DType,
        shape: &[usize],
        byte_strides: &[isize],
    ) -> Result<Self, Error> {
        Self::wrap(Raw::from_parts(data, dtype, shape, byte_strides)?)
    }

    fn wrap(raw: Raw) -> Result<Self, Error> {
        raw.layout.check_one_to_one()?;
        Ok(Self {
            raw,
            _borrow: PhantomData,
        })
    }

    /// The same memory, read-only, for as long as this borrow.
    pub fn as_view(&self) -> ArrayView<'_> {
        ArrayView::wrap(self.raw.clone())
    }

    shared_methods!();

    /// The first element of the span, for writing.
    pub(crate) fn base<T: Pod>(&self) -> *mut T {
        assert_eq!(
            size_of::<T>(),
            self.raw.dtype.itemsize(),
            "element type of a view"
        );
        self.raw.base.cast()
    }
}
