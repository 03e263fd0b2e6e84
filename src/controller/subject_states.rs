//! What this process remembers of every subject (`decision::SubjectState`: the one copy of
//! its credentials, its failures and planned retry), kept compact.
//!
//! Nearly every subject has a state holding credentials, so its form in memory counts at
//! scale: as a `SubjectState` in a map keyed by three `String`s, a subject costs about
//! nine allocations and a map slot of some 260 bytes (with the map's spare capacity, often
//! twice over). Here it is one `namespace/binding/serviceAccount` key and one allocation
//! of its fields, written with `packing::Writer`: a slot of 32 bytes. A reconcile reads a
//! subject's state as a `SubjectState` (unpacked) and stores the one it ends with.

use std::{collections::HashMap, sync::Mutex};

use jiff::Timestamp;

use super::{
    SubjectKey,
    packing::{Reader, Writer},
};
use crate::{
    conditions::Reason,
    decision::SubjectState,
    render::{Credentials, RegistryAuth},
};

/// Every subject's state, by `namespace/binding/serviceAccount`.
#[derive(Default)]
pub struct SubjectStates(Mutex<HashMap<Box<str>, Box<[u8]>>>);

/// The key of a subject (no namespace, binding or ServiceAccount name holds a '/').
fn key((namespace, binding, service_account): &SubjectKey) -> Box<str> {
    format!("{namespace}/{binding}/{service_account}").into_boxed_str()
}

impl SubjectStates {
    pub(super) fn get(&self, subject: &SubjectKey) -> Option<SubjectState> {
        // Unpacked outside the lock.
        let packed = self.0.lock().expect("state lock").get(&key(subject)).cloned();
        packed.map(|packed| unpack(&packed))
    }

    pub(super) fn set(&self, subject: &SubjectKey, state: &SubjectState) {
        let packed = pack(state);
        self.0.lock().expect("state lock").insert(key(subject), packed);
    }

    pub(super) fn remove(&self, subject: &SubjectKey) {
        self.0.lock().expect("state lock").remove(&key(subject));
    }

    /// Forgets the state of every subject whose binding `(namespace, name)` is `gone`,
    /// telling `forgotten` each one's `(namespace, binding, serviceAccount)`.
    pub(super) fn forget_where(&self, gone: impl Fn(&str, &str) -> bool, mut forgotten: impl FnMut(&str, &str, &str)) {
        self.0.lock().expect("state lock").retain(|key, _| {
            let mut parts = key.splitn(3, '/');
            let (ns, binding, sa) = (
                parts.next().unwrap_or_default(),
                parts.next().unwrap_or_default(),
                parts.next().unwrap_or_default(),
            );
            let forget = gone(ns, binding);
            if forget {
                forgotten(ns, binding, sa);
            }
            !forget
        });
    }

    pub(super) fn count(&self) -> usize {
        self.0.lock().expect("state lock").len()
    }
}

fn pack(state: &SubjectState) -> Box<[u8]> {
    let mut out = Writer::default();
    out.len(state.failures);
    write_time(&mut out, state.retry_at);
    out.opt_str(state.last_error.as_ref().map(|(reason, _)| reason.as_str()));
    if let Some((_, message)) = &state.last_error {
        out.str(message);
    }
    out.opt_str(state.refused_spec.as_deref());
    let creds = state.creds.as_deref();
    out.opt_str(creds.map(|(spec_hash, _)| spec_hash.as_str()));
    if let Some((_, c)) = creds {
        out.str(&c.access_key_id);
        out.str(&c.secret_access_key);
        out.str(&c.session_token);
        write_time(&mut out, Some(c.issued_at));
        write_time(&mut out, Some(c.expiration));
        out.opt_str(c.arn.as_deref());
        out.opt_str(c.note.as_deref());
        out.opt_len(Some(c.registries.len()));
        for registry in &c.registries {
            out.str(&registry.host);
            out.str(&registry.auth);
        }
    }
    out.0.into_boxed_slice()
}

/// The fields in the order [`pack`] writes them, one statement each.
fn unpack(packed: &[u8]) -> SubjectState {
    let mut r = Reader(packed);
    let failures = r.len();
    let retry_at = read_time(&mut r);
    let last_error = r.opt_str_ref().map(|reason| {
        // As `SubjectState::resumed` reads a reason it does not know (only ever one this
        // process wrote, which `Reason::parse` knows).
        debug_assert!(Reason::parse(reason).is_some(), "{reason} is a Reason");
        let reason = Reason::parse(reason).unwrap_or(Reason::StsUnavailable);
        (reason, r.string())
    });
    let refused_spec = r.opt_str();
    let creds = r.opt_str().map(|spec_hash| {
        let access_key_id = r.string();
        let secret_access_key = r.string();
        let session_token = r.string();
        let issued_at = read_time(&mut r).expect("written");
        let expiration = read_time(&mut r).expect("written");
        let arn = r.opt_str();
        let note = r.opt_str();
        let registries = (0..r.opt_len().unwrap_or_default())
            .map(|_| RegistryAuth {
                host: r.string(),
                auth: r.string(),
            })
            .collect();
        Box::new((
            spec_hash,
            Credentials {
                access_key_id,
                secret_access_key,
                session_token,
                issued_at,
                expiration,
                arn,
                note,
                registries,
            },
        ))
    });
    SubjectState {
        creds,
        failures,
        retry_at,
        last_error,
        refused_spec,
    }
}

fn write_time(out: &mut Writer, at: Option<Timestamp>) {
    match at {
        Some(at) => {
            out.0.push(1);
            out.0.extend_from_slice(&at.as_nanosecond().to_le_bytes());
        }
        None => out.0.push(0),
    }
}

fn read_time(r: &mut Reader) -> Option<Timestamp> {
    (r.byte() == 1).then(|| {
        let (bytes, rest) = r.0.split_at(16);
        r.0 = rest;
        let nanos = i128::from_le_bytes(bytes.try_into().expect("16 bytes"));
        Timestamp::from_nanosecond(nanos).expect("a timestamp this process wrote")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subject(ns: &str, binding: &str, sa: &str) -> SubjectKey {
        (ns.into(), binding.into(), sa.into())
    }

    fn full_state() -> SubjectState {
        let at = |s: &str| s.parse::<Timestamp>().unwrap();
        SubjectState {
            creds: Some(Box::new((
                "spec-hash".into(),
                Credentials {
                    access_key_id: "ASIAEXAMPLE".into(),
                    secret_access_key: "secret".into(),
                    session_token: "t".repeat(1000),
                    issued_at: at("2026-11-30T06:00:00.123456789Z"),
                    expiration: at("2026-11-30T07:00:00Z"),
                    arn: Some("arn:aws:sts::123456789012:assumed-role/r/s".into()),
                    note: Some("shortened to 3600 s".into()),
                    registries: vec![
                        RegistryAuth {
                            host: "a.example".into(),
                            auth: "QQ==".into(),
                        },
                        RegistryAuth {
                            host: "b.example".into(),
                            auth: String::new(),
                        },
                    ],
                },
            ))),
            failures: 300,
            retry_at: Some(at("1969-12-31T23:59:59.5Z")),
            last_error: Some((Reason::Throttled, "ünïcode message".into())),
            refused_spec: Some("old-hash".into()),
        }
    }

    fn same(a: &SubjectState, b: &SubjectState) -> bool {
        a.creds == b.creds
            && a.failures == b.failures
            && a.retry_at == b.retry_at
            && a.last_error == b.last_error
            && a.refused_spec == b.refused_spec
    }

    #[test]
    fn a_state_reads_back_as_it_was_stored() {
        let states = SubjectStates::default();
        let full = full_state();
        let mut bare = full_state();
        if let Some(c) = bare.creds.as_mut() {
            c.1.arn = None;
            c.1.note = None;
            c.1.registries.clear();
        }
        for state in [SubjectState::default(), full, bare] {
            states.set(&subject("ns", "b", "app"), &state);
            assert!(
                same(&states.get(&subject("ns", "b", "app")).unwrap(), &state),
                "{state:?}"
            );
        }
        assert!(states.get(&subject("ns", "b", "other")).is_none());
        states.remove(&subject("ns", "b", "app"));
        assert_eq!(states.count(), 0);
    }

    #[test]
    fn the_subjects_of_bindings_gone_are_forgotten_and_named() {
        let states = SubjectStates::default();
        for (ns, b, sa) in [("a", "b1", "x"), ("a", "b1", "y"), ("a", "b2", "x"), ("c", "b1", "x")] {
            states.set(&subject(ns, b, sa), &SubjectState::default());
        }
        let mut forgotten = Vec::new();
        states.forget_where(
            |ns, b| ns == "a" && b == "b1",
            |ns, b, sa| forgotten.push(format!("{ns}/{b}/{sa}")),
        );
        forgotten.sort();
        assert_eq!(forgotten, ["a/b1/x", "a/b1/y"]);
        assert_eq!(states.count(), 2);
        assert!(states.get(&subject("a", "b2", "x")).is_some());
        assert!(states.get(&subject("c", "b1", "x")).is_some());
    }
}
