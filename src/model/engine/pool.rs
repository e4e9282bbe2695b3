//! The KV memory pool: how many cache positions all calls together may hold, and the rule that
//! grants a turn its room. Calls' caches are separate tensors; the pool only counts them, so a
//! grant is exact (a turn's cache is grown to its granted size at once, never by doubling past
//! it) and the budget is a hard ceiling on KV memory.

/// What a turn asks of the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ask {
    /// Positions its call's cache holds allocated now.
    pub held: usize,
    /// Positions it needs allocated to run (prompt after prefill plus the whole reply).
    pub needs: usize,
}

/// The answer to an [`Ask`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Grant {
    /// It fits now.
    Yes,
    /// It fits once this many positions of idle calls' caches are freed.
    AfterEvicting(usize),
    /// It fits only after running turns end (their caches stay).
    Wait,
    /// It can never fit: it needs more than the whole budget.
    Never,
}

/// Counts KV positions against a budget.
#[derive(Debug, Clone)]
pub(crate) struct KvPool {
    budget: usize,
    bytes_per_position: usize,
}

impl KvPool {
    pub(crate) fn new(budget: usize, bytes_per_position: usize) -> Self {
        Self {
            budget: budget.max(1),
            bytes_per_position,
        }
    }

    pub(crate) fn budget(&self) -> usize {
        self.budget
    }

    pub(crate) fn bytes(&self, positions: usize) -> u64 {
        (positions as u64).saturating_mul(self.bytes_per_position as u64)
    }

    /// Whether `ask` fits, given `used` positions allocated by every call (its own included)
    /// and `idle` of them held by calls between turns (which may be evicted).
    pub(crate) fn grant(&self, ask: Ask, used: usize, idle: usize) -> Grant {
        let grow = ask.needs.saturating_sub(ask.held);
        if ask.needs > self.budget {
            return Grant::Never;
        }
        if used + grow <= self.budget {
            return Grant::Yes;
        }
        let short = used + grow - self.budget;
        if short <= idle {
            Grant::AfterEvicting(short)
        } else {
            Grant::Wait
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_follow_the_budget() {
        let p = KvPool::new(1000, 2);
        assert_eq!(p.bytes(10), 20);
        let ask = Ask {
            held: 100,
            needs: 300,
        };
        assert_eq!(p.grant(ask, 700, 0), Grant::Yes, "700 + 200 fits");
        assert_eq!(p.grant(ask, 900, 150), Grant::AfterEvicting(100));
        assert_eq!(p.grant(ask, 900, 50), Grant::Wait);
        let huge = Ask {
            held: 0,
            needs: 1001,
        };
        assert_eq!(p.grant(huge, 0, 0), Grant::Never);
        let shrink = Ask {
            held: 500,
            needs: 300,
        };
        assert_eq!(
            p.grant(shrink, 1000, 0),
            Grant::Yes,
            "it already holds its room"
        );
    }
}
