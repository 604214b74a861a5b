//! Turns a counter value into an answer for one descriptor, as the reference's
//! `GetResponseDescriptorStatus` does (before per-rule shadow mode is applied).

/// Outcome for one limited descriptor after its counter was incremented.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// The counter after this request exceeds the limit.
    pub over_limit: bool,
    /// Requests left in the window (0 when over the limit).
    pub remaining: u32,
}

/// `after` is the counter value returned by the store after adding this request's hits.
pub fn decide(requests_per_unit: u32, after: u64) -> Decision {
    let limit = u64::from(requests_per_unit);
    if after > limit {
        Decision {
            over_limit: true,
            remaining: 0,
        }
    } else {
        // after <= limit <= u32::MAX, so the difference fits.
        Decision {
            over_limit: false,
            remaining: u32::try_from(limit - after).unwrap_or(u32::MAX),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_the_limit_is_ok_with_zero_remaining_and_one_more_is_over() {
        assert_eq!(
            decide(3, 1),
            Decision {
                over_limit: false,
                remaining: 2
            }
        );
        assert_eq!(
            decide(3, 3),
            Decision {
                over_limit: false,
                remaining: 0
            }
        );
        assert_eq!(
            decide(3, 4),
            Decision {
                over_limit: true,
                remaining: 0
            }
        );
        assert!(decide(0, 1).over_limit);
        assert_eq!(decide(u32::MAX, 0).remaining, u32::MAX);
    }
}
