//! Which translation runs after an exit at a RIP that two may serve: one that
//! starts there (its *own*) and one that holds it as an exiting instruction
//! further in (the *tail* of that one from there). They differ: a small own
//! translation may stop after an exit or two where the containing one goes round
//! a loop, and a containing one may leave at once where the own one goes on.
//! Neither is known to be better from its shape, so the handler counts what the
//! runs from each RIP absorbed and runs the one that absorbed more per run, after
//! trying each once. A tail that absorbs less than an exit per run is poor: in
//! dynamic modes its RIP is translated on its own.

/// How a cluster was entered after an exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Way {
    /// At a translation that starts at the exiting instruction.
    Own,
    /// Inside a translation that holds the exiting instruction further in.
    Tail,
}

/// The runs entered one way at one RIP, and the exits they absorbed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Tally {
    pub runs: u64,
    pub absorbed: u64,
}

impl Tally {
    /// Absorbed more per run than `other` (both tried).
    fn better_than(&self, other: &Tally) -> bool {
        u128::from(self.absorbed) * u128::from(other.runs)
            > u128::from(other.absorbed) * u128::from(self.runs)
    }

    /// Tried, and absorbed less than one exit per run.
    pub fn poor(&self) -> bool {
        self.runs > 0 && self.absorbed < self.runs
    }
}

/// What the runs after exits at one RIP absorbed, each way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Served {
    pub own: Tally,
    pub tail: Tally,
}

impl Served {
    /// The way to enter when both are there: each is tried once (its own
    /// translation first), then the one that absorbed more per run; on a tie, the
    /// own translation (entered at its entry, as it was formed).
    pub fn choose(&self) -> Way {
        if self.own.runs == 0 {
            Way::Own
        } else if self.tail.runs == 0 || self.tail.better_than(&self.own) {
            Way::Tail
        } else {
            Way::Own
        }
    }

    pub fn count(&mut self, way: Way, absorbed: u64) {
        let t = match way {
            Way::Own => &mut self.own,
            Way::Tail => &mut self.tail,
        };
        t.runs += 1;
        t.absorbed += absorbed;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_way_is_tried_once_then_the_one_that_absorbs_more_runs() {
        let mut s = Served::default();
        assert_eq!(s.choose(), Way::Own);
        s.count(Way::Own, 2);
        assert_eq!(s.choose(), Way::Tail, "the tail is tried once");
        s.count(Way::Tail, 0);
        assert_eq!(s.choose(), Way::Own);
        s.count(Way::Own, 1);
        s.count(Way::Tail, 90);
        // Tail: 90 in 2 runs; own: 3 in 2.
        assert_eq!(s.choose(), Way::Tail);
        // Equal per run: the own translation.
        let tie = Served {
            own: Tally {
                runs: 2,
                absorbed: 4,
            },
            tail: Tally {
                runs: 1,
                absorbed: 2,
            },
        };
        assert_eq!(tie.choose(), Way::Own);
    }

    #[test]
    fn a_tail_is_poor_below_one_exit_per_run() {
        let mut t = Tally::default();
        assert!(!t.poor(), "untried");
        t.runs = 3;
        t.absorbed = 2;
        assert!(t.poor());
        t.absorbed = 3;
        assert!(!t.poor());
    }
}
