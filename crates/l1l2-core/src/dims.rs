//! Per-dimension lists (shapes, strides, layout dimensions) stored inline up to `INLINE`
//! dimensions: a model's parameter list has hundreds of small tensors, and a heap allocation per
//! list per tensor cost more than summing a tensor of a thousand elements.

use std::ops::{Deref, DerefMut};

/// Dimensions kept without allocating; more spill to the heap.
const INLINE: usize = 4;

/// A vector of `Copy` values, inline up to `INLINE` of them.
#[derive(Clone, Debug)]
pub(crate) enum Dims<T: Copy + Default> {
    Inline { values: [T; INLINE], len: usize },
    Heap(Vec<T>),
}

impl<T: Copy + Default> Dims<T> {
    pub(crate) fn new() -> Self {
        Self::Inline {
            values: [T::default(); INLINE],
            len: 0,
        }
    }

    pub(crate) fn push(&mut self, value: T) {
        match self {
            Self::Inline { values, len } if *len < INLINE => {
                values[*len] = value;
                *len += 1;
            }
            Self::Inline { values, len } => {
                let mut heap = values[..*len].to_vec();
                heap.push(value);
                *self = Self::Heap(heap);
            }
            Self::Heap(heap) => heap.push(value),
        }
    }

    pub(crate) fn pop(&mut self) -> Option<T> {
        match self {
            Self::Inline { len: 0, .. } => None,
            Self::Inline { values, len } => {
                *len -= 1;
                Some(values[*len])
            }
            Self::Heap(heap) => heap.pop(),
        }
    }
}

impl<T: Copy + Default> Default for Dims<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Copy + Default> FromIterator<T> for Dims<T> {
    fn from_iter<I: IntoIterator<Item = T>>(iter: I) -> Self {
        let mut dims = Self::new();
        for value in iter {
            dims.push(value);
        }
        dims
    }
}

impl<T: Copy + Default> Deref for Dims<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        match self {
            Self::Inline { values, len } => &values[..*len],
            Self::Heap(heap) => heap,
        }
    }
}

impl<T: Copy + Default> DerefMut for Dims<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        match self {
            Self::Inline { values, len } => &mut values[..*len],
            Self::Heap(heap) => heap,
        }
    }
}

impl<'a, T: Copy + Default> IntoIterator for &'a Dims<T> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl<T: Copy + Default + PartialEq> PartialEq for Dims<T> {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl<T: Copy + Default + Eq> Eq for Dims<T> {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spills_to_the_heap_and_keeps_order() {
        let mut dims: Dims<usize> = (0..INLINE).collect();
        assert!(matches!(dims, Dims::Inline { .. }));
        dims.push(INLINE);
        dims.push(INLINE + 1);
        assert!(matches!(dims, Dims::Heap(_)));
        assert_eq!(&*dims, &(0..INLINE + 2).collect::<Vec<_>>()[..]);
        assert_eq!(dims.pop(), Some(INLINE + 1));
        let mut empty: Dims<usize> = Dims::new();
        assert_eq!(empty.pop(), None);
    }
}
