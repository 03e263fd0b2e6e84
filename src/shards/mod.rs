//! Sharding across replicas (`kube-sts run --shards N`, N > 1).
//!
//! A namespace belongs to shard `fnv1a64(name) mod N` (FNV-1a, 64 bits, over the UTF-8
//! bytes of the name: fixed by its definition, the same on every platform and version). Each
//! shard has a `coordination.k8s.io/v1` Lease `<lease-name>-shard-<i>`; a replica reconciles
//! the bindings of a namespace only while it holds that namespace's shard Lease, with the
//! discipline of [`crate::leader`]: every write a compare-and-swap on the resourceVersion, a
//! held Lease taken over only after its record was seen unchanged for a whole lease duration
//! on the taker's monotonic clock, and reconciling of a shard stopped (in-flight reconciles
//! cancelled) once it has not been renewed for `renew_deadline` (< lease duration).
//!
//! Live replicas are learned from membership Leases `<lease-name>-member-<identity>`, one per
//! process, renewed with the shard Leases and deleted on shutdown (a replica holding no shard
//! is visible there, so a restarted replica gets its share back). Each replica aims at its
//! fair share, `ceil(N / live replicas)`: it takes free or lapsed shards while below it, and
//! gives extras up while above it and another live replica is below it (stops reconciling
//! them, waits for their in-flight reconciles, then releases the Lease).
//!
//! - this file: the pure rules (shard of a namespace, what to acquire and release);
//! - `gate`: what the controller asks (may this binding be reconciled now? which namespaces
//!   are cached?) and the watch streams filtered and restarted by the held shards;
//! - `leases`: the Lease I/O loop.

use std::time::Duration;

pub mod gate;
pub mod leases;

pub use gate::{Gate, Scope};

/// The shard of a namespace: FNV-1a 64 of its name, modulo `shards`.
pub fn shard_of(namespace: &str, shards: u32) -> u32 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let hash = namespace
        .bytes()
        .fold(OFFSET, |h, b| (h ^ u64::from(b)).wrapping_mul(PRIME));
    u32::try_from(hash % u64::from(shards.max(1))).expect("below a u32")
}

/// Name of shard `i`'s Lease.
pub fn shard_lease_name(base: &str, shard: u32) -> String {
    format!("{base}-shard-{shard}")
}

/// Name of a replica's membership Lease: the identity made a valid object name (lower case,
/// `_` and other characters as `-`).
pub fn member_lease_name(base: &str, identity: &str) -> String {
    let identity: String = identity
        .chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9' | '-' | '.') => c,
            _ => '-',
        })
        .collect();
    format!("{base}-member-{}", identity.trim_matches(|c| c == '-' || c == '.'))
}

/// Whether this replica (of `shards` shards) may take shards, given the shard counts written
/// into the live members' and held shard Leases (`None`: not written). While replicas with
/// another `--shards` live (a rollout changing it), the same Lease name covers other
/// namespaces there: nobody takes a shard until one count is left; held shards are kept.
pub fn may_acquire<'a>(shards: u32, counts_seen: impl IntoIterator<Item = Option<&'a str>>) -> bool {
    let ours = shards.to_string();
    counts_seen.into_iter().all(|c| c == Some(ours.as_str()))
}

/// What this replica sees of one shard's Lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShardView {
    /// This replica holds it.
    Ours,
    /// Nobody holds it (missing, released, or its holder's record has been seen unchanged
    /// for a whole lease duration), for `for_` as far as this replica has seen.
    Free { for_: Duration },
    /// Another replica holds it.
    Held { holder: String },
}

/// What to do with the shard Leases this round.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub acquire: Vec<u32>,
    pub release: Vec<u32>,
}

/// Each live replica's fair share of `shards`.
pub fn fair_share(shards: u32, live: usize) -> usize {
    (shards as usize).div_ceil(live.max(1))
}

/// The pure rule. `views[i]` is shard `i`; `members` are the identities of the live
/// replicas other than this one; `draining` are ours already being given up (counted as
/// given up).
///
/// - A free shard is taken while below the fair share and no other live replica holds fewer
///   (they are left to the neediest), and by anyone once it has been free for
///   `orphaned_after` (whatever a replica believes about membership, no shard stays unheld
///   for long).
/// - Extras above the fair share are given up as far as other live replicas are below it;
///   and one shard when another live replica holds two fewer (with 4 shards and 3 replicas
///   a returning replica would otherwise stay at 0 beside 2 and 2) — only while no shard
///   is free or being given up already.
pub fn plan(views: &[ShardView], members: &[String], draining: &[u32], orphaned_after: Duration) -> Plan {
    let shards = u32::try_from(views.len()).expect("shard count fits u32");
    let fair = fair_share(shards, members.len() + 1);
    let ours: Vec<u32> = (0..shards)
        .filter(|i| views[*i as usize] == ShardView::Ours && !draining.contains(i))
        .collect();
    let held_by = |m: &String| {
        views
            .iter()
            .filter(|v| matches!(v, ShardView::Held { holder } if holder == m))
            .count()
    };
    let fewest = members.iter().map(held_by).min();
    let free = views.iter().filter(|v| matches!(v, ShardView::Free { .. })).count();
    let mut plan = Plan::default();
    let deficit: usize = members.iter().map(|m| fair.saturating_sub(held_by(m))).sum();
    // Shards already free (or being given up) fill deficits first.
    let unfilled = deficit.saturating_sub(free + draining.len());
    let mut release = ours.len().saturating_sub(fair).min(unfilled);
    if release == 0 && free + draining.len() == 0 && fewest.is_some_and(|f| ours.len() >= f + 2) {
        release = 1;
    }
    plan.release = ours.iter().rev().take(release).copied().collect();
    plan.release.sort_unstable();
    let neediest = fewest.is_none_or(|f| ours.len() <= f);
    let mut room = if neediest { fair.saturating_sub(ours.len()) } else { 0 };
    for (i, view) in (0..shards).zip(views) {
        if let ShardView::Free { for_ } = view {
            if room > 0 {
                room -= 1;
                plan.acquire.push(i);
            } else if *for_ >= orphaned_after {
                plan.acquire.push(i);
            }
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: Duration = Duration::from_secs(30);

    fn free() -> ShardView {
        ShardView::Free { for_: Duration::ZERO }
    }

    fn held(h: &str) -> ShardView {
        ShardView::Held { holder: h.into() }
    }

    fn members(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn shard_of_is_fnv1a_64_and_spreads() {
        // FNV-1a 64 reference values: "" = cbf29ce484222325, "a" = af63dc4c8601ec8c.
        assert_eq!(shard_of("", 1 << 31), (0xcbf2_9ce4_8422_2325u64 % (1 << 31)) as u32);
        assert_eq!(shard_of("a", 1 << 31), (0xaf63_dc4c_8601_ec8cu64 % (1 << 31)) as u32);
        assert_eq!(shard_of("team-a", 1), 0);
        assert_eq!(shard_of("team-a", 0), 0, "0 shards is treated as 1");
        let mut counts = [0u32; 4];
        for i in 0..400 {
            counts[shard_of(&format!("team-{i}"), 4) as usize] += 1;
        }
        assert!(counts.iter().all(|c| *c > 60), "{counts:?}");
    }

    #[test]
    fn lease_names() {
        assert_eq!(shard_lease_name("kube-sts", 3), "kube-sts-shard-3");
        assert_eq!(
            member_lease_name("kube-sts", "Kube-STS-7d9f_x1y2z3"),
            "kube-sts-member-kube-sts-7d9f-x1y2z3"
        );
    }

    #[test]
    fn nothing_is_taken_while_replicas_of_another_shard_count_live() {
        assert!(may_acquire(4, []));
        assert!(may_acquire(4, [Some("4"), Some("4")]));
        assert!(!may_acquire(4, [Some("4"), Some("8")]));
        assert!(
            !may_acquire(4, [None]),
            "a Lease without a count: from an unknown writer"
        );
    }

    #[test]
    fn fair_share_rounds_up() {
        assert_eq!(fair_share(8, 3), 3);
        assert_eq!(fair_share(8, 2), 4);
        assert_eq!(fair_share(3, 5), 1);
        assert_eq!(fair_share(4, 0), 4);
    }

    #[test]
    fn plans() {
        struct Case {
            what: &'static str,
            views: Vec<ShardView>,
            members: Vec<String>,
            draining: Vec<u32>,
            want: Plan,
        }
        let ours = || ShardView::Ours;
        let plan_of = |acquire: &[u32], release: &[u32]| Plan {
            acquire: acquire.to_vec(),
            release: release.to_vec(),
        };
        let cases = [
            Case {
                what: "alone: take every shard",
                views: vec![free(), free(), free(), free()],
                members: vec![],
                draining: vec![],
                want: plan_of(&[0, 1, 2, 3], &[]),
            },
            Case {
                what: "three replicas starting: each takes its share, lowest first",
                views: vec![free(), free(), free(), free()],
                members: members(&["b", "c"]),
                draining: vec![],
                want: plan_of(&[0, 1], &[]),
            },
            Case {
                what: "others hold their share: take what is free up to ours",
                views: vec![held("b"), held("b"), free(), held("c"), held("c"), free()],
                members: members(&["b", "c"]),
                draining: vec![],
                want: plan_of(&[2, 5], &[]),
            },
            Case {
                what: "held shards are never taken (lapse shows as Free)",
                views: vec![held("b"), held("b"), held("b"), held("b")],
                members: members(&[]),
                draining: vec![],
                want: plan_of(&[], &[]),
            },
            Case {
                what: "a replica came back holding nothing: give extras up",
                views: vec![ours(), ours(), ours(), held("b"), held("b"), held("b")],
                members: members(&["b", "c"]),
                draining: vec![],
                want: plan_of(&[], &[2]),
            },
            Case {
                what: "above the share but nobody could take more: keep",
                views: vec![ours(), ours(), ours(), held("b"), held("b"), held("b")],
                members: members(&["b"]),
                draining: vec![],
                want: plan_of(&[], &[]),
            },
            Case {
                what: "a newcomer: a free shard counts toward its deficit",
                views: vec![ours(), ours(), ours(), held("b"), held("b"), free()],
                members: members(&["b", "c"]),
                draining: vec![],
                want: plan_of(&[], &[2]),
            },
            Case {
                what: "4 shards, a replica back at 0 beside 2 and 2: one each is given up",
                views: vec![ours(), ours(), held("b"), held("b")],
                members: members(&["b", "c"]),
                draining: vec![],
                want: plan_of(&[], &[1]),
            },
            Case {
                what: "free shards are left to a replica holding fewer",
                views: vec![ours(), free(), held("b"), free()],
                members: members(&["b", "c"]),
                draining: vec![],
                want: plan_of(&[], &[]),
            },
            Case {
                what: "the neediest takes up to its share",
                views: vec![held("a"), free(), held("b"), free()],
                members: members(&["a", "b"]),
                draining: vec![],
                want: plan_of(&[1, 3], &[]),
            },
            Case {
                what: "a shard being given up counts as given up",
                views: vec![ours(), ours(), ours(), held("b"), held("b"), held("b")],
                members: members(&["b", "c"]),
                draining: vec![2],
                want: plan_of(&[], &[]),
            },
            Case {
                what: "at the share: a free shard is left to the replica below it",
                views: vec![ours(), ours(), held("b"), held("b"), free(), held("c")],
                members: members(&["b", "c"]),
                draining: vec![],
                want: plan_of(&[], &[]),
            },
            Case {
                what: "at the share: a shard free for long is taken anyway",
                views: vec![
                    ours(),
                    ours(),
                    held("b"),
                    held("b"),
                    ShardView::Free { for_: GRACE },
                    held("c"),
                ],
                members: members(&["b", "c"]),
                draining: vec![],
                want: plan_of(&[4], &[]),
            },
        ];
        for case in cases {
            assert_eq!(
                plan(&case.views, &case.members, &case.draining, GRACE),
                case.want,
                "{}",
                case.what
            );
        }
    }

    /// Replicas `names` acting in turn on one shared view for a few rounds, from `holders`;
    /// how many shards each holds then, fewest first.
    fn simulate<'a>(names: &[&'a str], holders: &mut [Option<&'a str>]) -> Vec<usize> {
        for _round in 0..6 {
            for me in names {
                let views: Vec<ShardView> = holders
                    .iter()
                    .map(|h| match h {
                        None => free(),
                        Some(h) if h == me => ShardView::Ours,
                        Some(h) => held(h),
                    })
                    .collect();
                let others: Vec<String> = names.iter().filter(|n| *n != me).map(|n| n.to_string()).collect();
                let p = plan(&views, &others, &[], GRACE);
                for i in p.release {
                    holders[i as usize] = None;
                }
                for i in p.acquire {
                    holders[i as usize] = Some(me);
                }
            }
        }
        assert!(holders.iter().all(Option::is_some), "{holders:?}");
        let mut counts: Vec<usize> = names
            .iter()
            .map(|n| holders.iter().filter(|h| **h == Some(*n)).count())
            .collect();
        counts.sort_unstable();
        counts
    }

    #[test]
    fn plans_converge_to_one_holder_each() {
        // One replica held all 8 shards; two more join: 3/3/2.
        assert_eq!(simulate(&["a", "b", "c"], &mut [Some("a"); 8]), [2, 3, 3]);
    }

    #[test]
    fn a_returning_replica_gets_shards_back() {
        // 4 shards held 2/2 by a and b; c comes back with none: 1/1/2.
        let mut holders = [Some("a"), Some("a"), Some("b"), Some("b")];
        assert_eq!(simulate(&["a", "b", "c"], &mut holders), [1, 1, 2]);
    }
}
