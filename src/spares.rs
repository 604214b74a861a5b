//! Per-thread spares: what a finished call gives back, the next call on its thread takes, so
//! a warm thread's calls allocate nothing for it (counter keys, Redis reply slots and reply
//! arrays). Each kind keeps at most a bound its owner sets, and owners keep only buffers of
//! bounded size, so what clients send cannot grow them. A thread being torn down has none:
//! what it gives back is freed, and what it asks for is made new.

use std::{cell::RefCell, thread::LocalKey};

/// One kind of spare: `thread_local! { static S: Spares<T> = const { Spares::new() }; }`.
pub struct Spares<T>(RefCell<Vec<T>>);

impl<T> Spares<T> {
    pub const fn new() -> Self {
        Self(RefCell::new(Vec::new()))
    }

    /// How many this thread keeps (for tests).
    pub fn len(&self) -> usize {
        self.0.borrow().len()
    }

    /// Whether this thread keeps none (for tests).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Frees what this thread keeps (for tests, which share their threads).
    pub fn clear(&self) {
        self.0.borrow_mut().clear();
    }
}

impl<T> Default for Spares<T> {
    fn default() -> Self {
        Self::new()
    }
}

/// A spare from this thread's `spares`, if it has one.
pub fn take<T: 'static>(spares: &'static LocalKey<Spares<T>>) -> Option<T> {
    spares
        .try_with(|s| s.0.try_borrow_mut().ok().and_then(|mut s| s.pop()))
        .ok()
        .flatten()
}

/// Keeps `item` in this thread's `spares` unless they already hold `max`; frees it otherwise.
pub fn give<T: 'static>(spares: &'static LocalKey<Spares<T>>, item: T, max: usize) {
    let _ = spares.try_with(|s| {
        if let Ok(mut s) = s.0.try_borrow_mut() {
            if s.len() < max {
                s.push(item);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    thread_local! {
        static NUMBERS: Spares<u32> = const { Spares::new() };
    }

    #[test]
    fn what_is_given_back_is_taken_again_up_to_the_bound() {
        NUMBERS.with(Spares::clear);
        assert_eq!(take(&NUMBERS), None);
        give(&NUMBERS, 7, 2);
        give(&NUMBERS, 8, 2);
        give(&NUMBERS, 9, 2);
        assert_eq!(NUMBERS.with(Spares::len), 2, "the third is freed");
        assert_eq!(take(&NUMBERS), Some(8));
        assert_eq!(take(&NUMBERS), Some(7));
        assert_eq!(take(&NUMBERS), None);
    }
}
