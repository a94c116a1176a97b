//! Which translation runs after an exit at a RIP that two may serve: one that
//! starts there (its *own*) and one that holds it as an exiting instruction
//! further in (the *tail* of that one from there). They differ: a small own
//! translation may stop after an exit or two where the containing one goes round
//! a loop, and a containing one may leave at once where the own one goes on.
//! Which absorbs more shows in their runs, not in their shape (a guard that has
//! not learned its destinations yet, say), so the handler counts what the runs
//! from each RIP absorbed, each way, and runs the one that absorbed more per run
//! ([`Served::choose`]). A tail that absorbs less than an exit per run is poor:
//! with no own translation, in dynamic modes, its RIP is translated on its own.

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
    /// The way to enter when both are there. Its own translation is tried first;
    /// the tail once its own turns out poor, or at once if `tail_reaches_more`
    /// says the tail's code can absorb more from there (a loop its own lacks, or
    /// more exiting instructions; a tail that reaches no more than the own
    /// translation is not worth a run that may absorb less). Once both have run,
    /// the one that absorbed more per run; on a tie, its own.
    pub fn choose(&self, tail_reaches_more: impl FnOnce() -> bool) -> Way {
        if self.own.runs == 0 {
            Way::Own
        } else if self.tail.runs == 0 {
            if self.own.poor() || tail_reaches_more() {
                Way::Tail
            } else {
                Way::Own
            }
        } else if self.tail.better_than(&self.own) {
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
    fn own_first_then_the_tail_if_it_may_absorb_more_then_the_better() {
        let mut s = Served::default();
        assert_eq!(s.choose(|| true), Way::Own);
        s.count(Way::Own, 2);
        // Its own absorbs: the tail is tried only if its code reaches more.
        assert_eq!(s.choose(|| false), Way::Own);
        assert_eq!(s.choose(|| true), Way::Tail);
        s.count(Way::Tail, 0);
        assert_eq!(s.choose(|| true), Way::Own);
        s.count(Way::Own, 1);
        s.count(Way::Tail, 90);
        // Tail: 90 in 2 runs; own: 3 in 2.
        assert_eq!(s.choose(|| false), Way::Tail);
        // A poor own translation: the tail is tried whatever its code.
        let mut poor = Served::default();
        poor.count(Way::Own, 0);
        assert_eq!(poor.choose(|| false), Way::Tail);
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
        assert_eq!(tie.choose(|| true), Way::Own);
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
