//! Fencing tokens: a number per lock name that grows with every acquisition,
//! so that a holder can fence its own downstream writes (a database row that
//! keeps the highest token it has seen refuses a write with a lower one: the
//! write of a holder that lost its lock without knowing it).
//!
//! Each master keeps a counter per name (in the name's meta key, see
//! `store/claims.rs`) and advances it in the same script that grants the
//! claim. The token of an acquisition is the highest counter among the masters
//! that granted it. Counters on different masters drift apart (a master that
//! was down, or granted an attempt that was then undone, missed increments), so
//! when the granting masters did not all answer the highest value, the
//! acquisition first raises the counters of every master to it, and returns
//! only once a majority has it. Any two majorities share a master, so the next
//! acquisition (granted by a majority) sees a counter at least this high on one
//! of its masters and hands out a higher token.
//!
//! Where it does not hold: a master restarted without persistence (no AOF or
//! RDB) loses its counters; a counter also expires an hour after the last
//! acquisition of its name ([`META_KEEP`](crate::store::claims::META_KEEP)).
//! A lost counter starts again from the server's clock in microseconds, above
//! every token handed out before unless that clock went back; with several
//! masters, tokens stay monotonic as long as at most a minority lost its
//! counters at once. With one master and a clock set back (or a store without
//! counters, such as a custom [`Store`](crate::Store) that only implements
//! `set_nx`, which hands out 0), tokens are not monotonic: do not fence on them.

use super::quorum::quorum;

/// The token per name (the highest any granting master answered) and how many
/// masters already have counters at least that high.
pub fn settle(grants: &[Option<Vec<u64>>]) -> (Vec<u64>, usize) {
    let mut fences: Vec<u64> = Vec::new();
    for grant in grants.iter().flatten() {
        if fences.len() < grant.len() {
            fences.resize(grant.len(), 0);
        }
        for (f, g) in fences.iter_mut().zip(grant) {
            *f = (*f).max(*g);
        }
    }
    let up_to_date = grants
        .iter()
        .flatten()
        .filter(|g| g.len() == fences.len() && g.iter().zip(&fences).all(|(g, f)| g >= f))
        .count();
    (fences, up_to_date)
}

/// True when the counters must be raised before the tokens are handed out.
pub fn must_raise(up_to_date: usize, masters: usize) -> bool {
    up_to_date < quorum(masters)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_is_the_highest_grant_and_agreement_is_counted() {
        let grants = [Some(vec![7, 3]), None, Some(vec![9, 3]), Some(vec![9, 2])];
        let (fences, up_to_date) = settle(&grants);
        assert_eq!(fences, vec![9, 3]);
        assert_eq!(up_to_date, 1);
        assert!(must_raise(up_to_date, 5));
        let agreed = [Some(vec![4]), Some(vec![4]), None];
        assert_eq!(settle(&agreed), (vec![4], 2));
        assert!(!must_raise(2, 3));
        assert_eq!(settle(&[None, None]), (vec![], 0));
    }
}
