//! The webhook's serving certificate without cert-manager: what the Secret holds, when it
//! must change, and how. Pure but for generating keys; the I/O is in `keeper`.
//!
//! Every generation is a CA made for it alone plus the serving certificate that CA signed;
//! the CA's key is dropped as soon as it has signed, so the Secret never holds a key that
//! can sign anything. A rotation never leaves the API server trusting a CA that does not
//! sign what a replica serves:
//!
//! 1. **stage**: when two thirds of the serving certificate's lifetime have passed (or the
//!    names it must carry changed), a new generation is stored beside the active one and
//!    its CA is added to the `caBundle` (old and new trusted, old still served);
//! 2. **promote**: once the `caBundle` shows the new CA and `overlap` has passed since
//!    staging, the new generation becomes the active one, which every replica serves as
//!    soon as it sees the Secret change; the old CA stays trusted as `previous`;
//! 3. **retire**: the previous CA leaves the `caBundle` when the certificate it signed
//!    expires.

use std::collections::BTreeMap;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::ByteString;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData, SerialNumber,
};
use rustls::pki_types::{CertificateDer, pem::PemObject};

/// The active generation (cert-manager's key names, so either can fill the Secret).
pub const KEY_CERT: &str = "tls.crt";
pub const KEY_KEY: &str = "tls.key";
pub const KEY_CA: &str = "ca.crt";
/// The staged generation.
pub const KEY_NEXT_CERT: &str = "next.crt";
pub const KEY_NEXT_KEY: &str = "next.key";
pub const KEY_NEXT_CA: &str = "next-ca.crt";
/// The CA of the generation that was active before, still trusted.
pub const KEY_PREVIOUS_CA: &str = "previous-ca.crt";

/// Certificates start this long before they are made, so that an API server whose clock is
/// a little behind accepts them at once.
pub const BACKDATE: SignedDuration = SignedDuration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{0}")]
    Invalid(String),
}

fn invalid(what: impl Into<String>) -> CertError {
    CertError::Invalid(what.into())
}

/// How certificates are made and rotated (from the command line).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// DNS names and IP addresses the serving certificate is for.
    pub names: Vec<String>,
    /// Lifetime of each generation.
    pub validity: SignedDuration,
    /// How long a staged CA is trusted before its certificate is served.
    pub overlap: SignedDuration,
}

/// The shortest overlap: every API server must have seen the new CA in the `caBundle`
/// (through its watch of the configuration; seconds, but more when it is busy) before a
/// replica serves a certificate it signed.
pub const MIN_OVERLAP: SignedDuration = SignedDuration::from_mins(1);

impl Policy {
    /// Refuses settings under which a rotation could not finish before the certificate it
    /// replaces expires (staging starts with a third of the lifetime left), or could serve
    /// a certificate before the API servers trust its CA.
    pub fn check(&self) -> Result<(), String> {
        if self.names.is_empty() {
            return Err("the serving certificate needs at least one name (--cert-name)".into());
        }
        if self.overlap < MIN_OVERLAP || self.overlap * 4 > self.validity {
            return Err(format!(
                "--cert-overlap must be at least {MIN_OVERLAP:#} and at most a quarter of --cert-validity ({:#} and {:#})",
                self.overlap, self.validity
            ));
        }
        Ok(())
    }
}

/// One generation: the CA that signed the serving certificate, the certificate and its key
/// (PEM). `Debug` never shows the key.
#[derive(Clone, PartialEq, Eq)]
pub struct Generation {
    pub ca: String,
    pub cert: String,
    pub key: String,
}

impl std::fmt::Debug for Generation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generation")
            .field("cert", &self.cert)
            .finish_non_exhaustive()
    }
}

fn to_time(at: Timestamp) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(at.as_second()).expect("a timestamp jiff holds fits")
}

fn serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f; // positive, as RFC 5280 wants
    SerialNumber::from_slice(&bytes)
}

/// A new generation for `names`, valid from `now` (minus [`BACKDATE`]) for `validity`.
pub fn issue(names: &[String], validity: SignedDuration, now: Timestamp) -> Result<Generation, CertError> {
    let (not_before, not_after) = (to_time(now - BACKDATE), to_time(now + validity));
    let mut ca = CertificateParams::default();
    ca.distinguished_name = DistinguishedName::new();
    ca.distinguished_name.push(
        DnType::CommonName,
        format!("kube-sts webhook CA {}", now.as_millisecond()),
    );
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    (ca.not_before, ca.not_after, ca.serial_number) = (not_before, not_after, Some(serial()));
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca.self_signed(&ca_key)?;
    // The CA key signs this one certificate and is dropped with the issuer.
    let issuer = Issuer::new(ca, ca_key);

    let mut leaf = CertificateParams::new(names.to_vec())?;
    leaf.distinguished_name = DistinguishedName::new();
    leaf.distinguished_name.push(DnType::CommonName, names[0].clone());
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf.use_authority_key_identifier_extension = true;
    (leaf.not_before, leaf.not_after, leaf.serial_number) = (not_before, not_after, Some(serial()));
    let key = KeyPair::generate()?;
    let cert = leaf.signed_by(&key, &issuer)?;
    Ok(Generation {
        ca: ca_cert.pem(),
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// The DER of every certificate in a PEM text.
pub fn ders(pem: &str) -> Vec<Vec<u8>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .filter_map(Result::ok)
        .map(|c| c.to_vec())
        .collect()
}

fn parse<'a>(der: &'a [u8], what: &str) -> Result<x509_parser::certificate::X509Certificate<'a>, CertError> {
    x509_parser::parse_x509_certificate(der)
        .map(|(_, cert)| cert)
        .map_err(|e| invalid(format!("{what}: {e}")))
}

fn one_der(pem: &str, what: &str) -> Result<Vec<u8>, CertError> {
    ders(pem)
        .into_iter()
        .next()
        .ok_or_else(|| invalid(format!("{what}: no PEM certificate")))
}

/// When the first certificate of a PEM text expires.
pub fn not_after(pem: &str) -> Result<Timestamp, CertError> {
    let der = one_der(pem, "certificate")?;
    let cert = parse(&der, "certificate")?;
    Timestamp::from_second(cert.validity().not_after.timestamp()).map_err(|e| invalid(e.to_string()))
}

/// What the rotation policy needs to know of a generation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertInfo {
    pub issued_at: Timestamp,
    pub not_after: Timestamp,
    /// DNS names and IP addresses, sorted.
    pub names: Vec<String>,
}

/// Reads a generation: its serving certificate's times and names, after checking that the
/// key belongs to the certificate and that the CA is the certificate's issuer.
pub fn inspect(generation: &Generation) -> Result<CertInfo, CertError> {
    let der = one_der(&generation.cert, "serving certificate")?;
    let cert = parse(&der, "serving certificate")?;
    let ca_der = one_der(&generation.ca, "CA certificate")?;
    let ca = parse(&ca_der, "CA certificate")?;
    if cert.issuer().as_raw() != ca.subject().as_raw() || cert.verify_signature(Some(ca.public_key())).is_err() {
        return Err(invalid("the CA did not issue the serving certificate"));
    }
    let key = KeyPair::from_pem(&generation.key).map_err(|e| invalid(format!("serving key: {e}")))?;
    if key.subject_public_key_info() != cert.public_key().raw {
        return Err(invalid("the key does not belong to the serving certificate"));
    }
    let mut names: Vec<String> = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    x509_parser::extensions::GeneralName::DNSName(dns) => Some(dns.to_string()),
                    x509_parser::extensions::GeneralName::IPAddress(ip) => ip_text(ip),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    let time =
        |t: &x509_parser::time::ASN1Time| Timestamp::from_second(t.timestamp()).map_err(|e| invalid(e.to_string()));
    Ok(CertInfo {
        issued_at: time(&cert.validity().not_before)? + BACKDATE,
        not_after: time(&cert.validity().not_after)?,
        names,
    })
}

fn ip_text(bytes: &[u8]) -> Option<String> {
    match bytes.len() {
        4 => Some(std::net::Ipv4Addr::from(<[u8; 4]>::try_from(bytes).ok()?).to_string()),
        16 => Some(std::net::Ipv6Addr::from(<[u8; 16]>::try_from(bytes).ok()?).to_string()),
        _ => None,
    }
}

/// What the Secret holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stored {
    pub active: Option<Generation>,
    pub next: Option<Generation>,
    pub previous_ca: Option<String>,
}

impl Stored {
    pub fn from_data(data: &BTreeMap<String, ByteString>) -> Self {
        let text = |key: &str| {
            data.get(key)
                .and_then(|v| String::from_utf8(v.0.clone()).ok())
                .filter(|v| !v.trim().is_empty())
        };
        let generation = |ca: &str, cert: &str, key: &str| {
            Some(Generation {
                ca: text(ca)?,
                cert: text(cert)?,
                key: text(key)?,
            })
        };
        Stored {
            active: generation(KEY_CA, KEY_CERT, KEY_KEY),
            next: generation(KEY_NEXT_CA, KEY_NEXT_CERT, KEY_NEXT_KEY),
            previous_ca: text(KEY_PREVIOUS_CA),
        }
    }

    pub fn to_data(&self) -> BTreeMap<String, ByteString> {
        let mut data = BTreeMap::new();
        let mut put = |key: &str, value: &str| {
            data.insert(key.to_string(), ByteString(value.as_bytes().to_vec()));
        };
        if let Some(g) = &self.active {
            put(KEY_CA, &g.ca);
            put(KEY_CERT, &g.cert);
            put(KEY_KEY, &g.key);
        }
        if let Some(g) = &self.next {
            put(KEY_NEXT_CA, &g.ca);
            put(KEY_NEXT_CERT, &g.cert);
            put(KEY_NEXT_KEY, &g.key);
        }
        if let Some(ca) = &self.previous_ca {
            put(KEY_PREVIOUS_CA, ca);
        }
        data
    }
}

/// The Secret as the rotation policy sees it: a generation that cannot be read counts as
/// missing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct View {
    pub active: Option<CertInfo>,
    pub next: Option<CertInfo>,
    pub previous_ca_expires: Option<Timestamp>,
}

impl View {
    pub fn of(stored: &Stored) -> Self {
        View {
            active: stored.active.as_ref().and_then(|g| inspect(g).ok()),
            next: stored.next.as_ref().and_then(|g| inspect(g).ok()),
            previous_ca_expires: stored.previous_ca.as_deref().and_then(|ca| not_after(ca).ok()),
        }
    }
}

/// A change of the Secret.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// A fresh active generation; nothing usable to keep.
    Issue,
    /// A new generation beside the active one, its CA trusted from now on.
    Stage,
    /// The staged generation becomes the active one.
    Promote,
    /// The previous CA leaves the `caBundle`.
    Retire,
}

/// Why a step is due.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Why {
    /// No active generation that can be read (a new Secret, or one edited by hand).
    Missing,
    Expired,
    RenewalDue,
    NamesChanged,
    /// The staged CA is trusted, and has been for the overlap.
    OverlapOver,
    PreviousExpired,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    pub step: Option<(Step, Why)>,
    /// When to look again if nothing changes before.
    pub wake_at: Option<Timestamp>,
}

/// When a generation is renewed: once two thirds of its lifetime have passed.
pub fn renew_at(info: &CertInfo) -> Timestamp {
    let lifetime = info.not_after.duration_since(info.issued_at);
    info.issued_at + lifetime * 2 / 3
}

/// The next change of the Secret. `next_trusted`: the `caBundle` the API server uses
/// already holds the staged generation's CA.
pub fn plan(view: &View, policy: &Policy, next_trusted: bool, now: Timestamp) -> Plan {
    let mut wanted = policy.names.clone();
    wanted.sort();
    let live = |c: &Option<CertInfo>| c.clone().filter(|c| c.not_after > now);
    let due = |step, why| Plan {
        step: Some((step, why)),
        wake_at: None,
    };
    let wait = |at: Option<Timestamp>| {
        let retire = view.previous_ca_expires;
        match retire {
            Some(expires) if expires <= now => due(Step::Retire, Why::PreviousExpired),
            _ => Plan {
                step: None,
                wake_at: [at, retire].into_iter().flatten().min(),
            },
        }
    };
    match (live(&view.active), live(&view.next)) {
        // Nothing usable is served: no overlap to wait for.
        (None, Some(_)) => due(Step::Promote, Why::Expired),
        (None, None) if view.active.is_some() => due(Step::Issue, Why::Expired),
        (None, None) => due(Step::Issue, Why::Missing),
        (Some(_), Some(next)) if next.names != wanted => due(Step::Stage, Why::NamesChanged),
        (Some(_), Some(next)) => {
            let trusted_long_enough = next.issued_at + policy.overlap;
            if next_trusted && now >= trusted_long_enough {
                due(Step::Promote, Why::OverlapOver)
            } else {
                // Not yet trusted: the caBundle's change wakes the keeper.
                wait(next_trusted.then_some(trusted_long_enough))
            }
        }
        (Some(active), None) if active.names != wanted => due(Step::Stage, Why::NamesChanged),
        (Some(active), None) if now >= renew_at(&active) => due(Step::Stage, Why::RenewalDue),
        (Some(active), None) => wait(Some(renew_at(&active))),
    }
}

/// The Secret after `step`.
pub fn apply(stored: &Stored, step: Step, policy: &Policy, now: Timestamp) -> Result<Stored, CertError> {
    let fresh = || issue(&policy.names, policy.validity, now);
    Ok(match step {
        Step::Issue => Stored {
            active: Some(fresh()?),
            next: None,
            previous_ca: None,
        },
        Step::Stage => Stored {
            next: Some(fresh()?),
            ..stored.clone()
        },
        Step::Promote => {
            let current = stored
                .active
                .as_ref()
                .filter(|g| inspect(g).is_ok_and(|info| info.not_after > now));
            Stored {
                active: stored.next.clone(),
                next: None,
                previous_ca: current.map(|g| g.ca.clone()),
            }
        }
        Step::Retire => Stored {
            previous_ca: None,
            ..stored.clone()
        },
    })
}

/// The CAs the API server must trust now (PEM, one after the other): the active one and
/// the staged one, always (a replica may serve either), and the previous one until it
/// expires; each once.
pub fn bundle(stored: &Stored, now: Timestamp) -> String {
    let cas = [
        (stored.active.as_ref().map(|g| g.ca.as_str()), true),
        (stored.next.as_ref().map(|g| g.ca.as_str()), true),
        (stored.previous_ca.as_deref(), false),
    ];
    let mut seen = Vec::new();
    let mut out = String::new();
    for (ca, always) in cas {
        let Some(ca) = ca else { continue };
        let Some(der) = ders(ca).into_iter().next() else {
            continue;
        };
        if seen.contains(&der) || (!always && not_after(ca).map_or(true, |at| at <= now)) {
            continue;
        }
        seen.push(der);
        out.push_str(ca.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: SignedDuration = SignedDuration::from_hours(1);

    fn policy() -> Policy {
        Policy {
            names: vec!["hook.kube-sts.svc".into(), "127.0.0.1".into()],
            validity: HOUR * 90,
            overlap: SignedDuration::from_mins(5),
        }
    }

    fn t0() -> Timestamp {
        "2026-11-29T10:00:00Z".parse().unwrap()
    }

    fn info(issued_at: Timestamp, lifetime: SignedDuration, names: &[&str]) -> CertInfo {
        let mut names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        names.sort();
        CertInfo {
            issued_at,
            not_after: issued_at + lifetime,
            names,
        }
    }

    fn ours(issued_at: Timestamp) -> CertInfo {
        info(issued_at, HOUR * 90, &["hook.kube-sts.svc", "127.0.0.1"])
    }

    #[test]
    fn a_generation_reads_back_as_issued() {
        let g = issue(&policy().names, HOUR * 90, t0()).unwrap();
        let info = inspect(&g).unwrap();
        assert_eq!(info, ours(t0()));
        assert_eq!(not_after(&g.ca).unwrap(), t0() + HOUR * 90);
        assert!(!format!("{g:?}").contains("PRIVATE KEY"));
        // A key of another generation, or a CA that did not sign the certificate, is caught.
        let other = issue(&policy().names, HOUR, t0()).unwrap();
        let swapped_key = Generation {
            key: other.key.clone(),
            ..g.clone()
        };
        assert!(
            inspect(&swapped_key)
                .unwrap_err()
                .to_string()
                .contains("key does not belong")
        );
        let swapped_ca = Generation { ca: other.ca, ..g };
        assert!(inspect(&swapped_ca).unwrap_err().to_string().contains("did not issue"));
    }

    #[test]
    fn the_secret_round_trips_and_half_written_generations_are_missing() {
        let g = issue(&policy().names, HOUR, t0()).unwrap();
        let stored = Stored {
            active: Some(g.clone()),
            next: None,
            previous_ca: Some(g.ca.clone()),
        };
        let data = stored.to_data();
        assert_eq!(
            data.keys().map(String::as_str).collect::<Vec<_>>(),
            [KEY_CA, KEY_PREVIOUS_CA, KEY_CERT, KEY_KEY]
        );
        assert_eq!(Stored::from_data(&data), stored);
        let mut partial = data;
        partial.remove(KEY_KEY);
        assert_eq!(Stored::from_data(&partial).active, None);
    }

    #[test]
    fn rotation_policy_table() {
        let p = policy();
        let t = t0();
        let renew = t + HOUR * 60; // two thirds of 90 h
        let view = |active: Option<CertInfo>, next: Option<CertInfo>, previous: Option<Timestamp>| View {
            active,
            next,
            previous_ca_expires: previous,
        };
        let step = |s, w| Some((s, w));
        // (case, the Secret, caBundle trusts the staged CA, now, step due, wake at)
        type Case = (
            &'static str,
            View,
            bool,
            Timestamp,
            Option<(Step, Why)>,
            Option<Timestamp>,
        );
        let cases: Vec<Case> = vec![
            (
                "empty Secret",
                View::default(),
                true,
                t,
                step(Step::Issue, Why::Missing),
                None,
            ),
            (
                "fresh: sleep until renewal",
                view(Some(ours(t)), None, None),
                true,
                t,
                None,
                Some(renew),
            ),
            (
                "renewal due: stage",
                view(Some(ours(t)), None, None),
                true,
                renew,
                step(Step::Stage, Why::RenewalDue),
                None,
            ),
            (
                "names changed: stage at once",
                view(Some(info(t, HOUR * 90, &["old.svc"])), None, None),
                true,
                t,
                step(Step::Stage, Why::NamesChanged),
                None,
            ),
            (
                "staged, trusted, overlap running",
                view(Some(ours(t)), Some(ours(renew)), None),
                true,
                renew + SignedDuration::from_mins(1),
                None,
                Some(renew + p.overlap),
            ),
            (
                "staged, overlap over, but the caBundle lacks the CA: wait for it",
                view(Some(ours(t)), Some(ours(renew)), None),
                false,
                renew + HOUR,
                None,
                None,
            ),
            (
                "staged, trusted for the overlap: promote",
                view(Some(ours(t)), Some(ours(renew)), None),
                true,
                renew + p.overlap,
                step(Step::Promote, Why::OverlapOver),
                None,
            ),
            (
                "staged with old names: stage again",
                view(Some(ours(t)), Some(info(renew, HOUR * 90, &["old.svc"])), None),
                true,
                renew + HOUR,
                step(Step::Stage, Why::NamesChanged),
                None,
            ),
            (
                "active expired, staged one usable: promote without overlap",
                view(Some(ours(t)), Some(ours(renew)), None),
                false,
                t + HOUR * 90,
                step(Step::Promote, Why::Expired),
                None,
            ),
            (
                "expired, nothing staged: issue",
                view(Some(ours(t)), None, None),
                true,
                t + HOUR * 91,
                step(Step::Issue, Why::Expired),
                None,
            ),
            (
                "previous CA trusted until it expires",
                view(Some(ours(renew)), None, Some(t + HOUR * 90)),
                true,
                renew + HOUR,
                None,
                Some(t + HOUR * 90),
            ),
            (
                "previous CA expired: retire",
                view(Some(ours(renew)), None, Some(t + HOUR * 90)),
                true,
                t + HOUR * 90,
                step(Step::Retire, Why::PreviousExpired),
                None,
            ),
        ];
        for (name, view, trusted, now, want_step, want_wake) in cases {
            let got = plan(&view, &p, trusted, now);
            assert_eq!((got.step, got.wake_at), (want_step, want_wake), "{name}");
        }
    }

    #[test]
    fn a_rotation_keeps_what_is_served_trusted_at_every_step() {
        let p = policy();
        let mut now = t0();
        let stored = apply(&Stored::default(), Step::Issue, &p, now).unwrap();
        let trusted = |s: &Stored, now| ders(&bundle(s, now));
        let served = |s: &Stored| ders(&s.active.as_ref().unwrap().ca)[0].clone();
        assert_eq!(trusted(&stored, now), [served(&stored)]);

        now += HOUR * 60;
        let plan_now = plan(&View::of(&stored), &p, true, now);
        assert_eq!(plan_now.step, Some((Step::Stage, Why::RenewalDue)));
        let staged = apply(&stored, Step::Stage, &p, now).unwrap();
        assert_eq!(staged.active, stored.active, "staging serves the old generation on");
        let new_ca = ders(&staged.next.as_ref().unwrap().ca)[0].clone();
        assert_eq!(trusted(&staged, now), [served(&stored), new_ca.clone()]);

        now += p.overlap;
        assert_eq!(
            plan(&View::of(&staged), &p, true, now).step,
            Some((Step::Promote, Why::OverlapOver))
        );
        let promoted = apply(&staged, Step::Promote, &p, now).unwrap();
        assert_eq!(served(&promoted), new_ca);
        // A replica that has not seen the Secret change still serves the old generation.
        assert_eq!(trusted(&promoted, now), [new_ca.clone(), served(&stored)]);

        now = t0() + HOUR * 90;
        assert_eq!(
            plan(&View::of(&promoted), &p, true, now).step,
            Some((Step::Retire, Why::PreviousExpired))
        );
        let retired = apply(&promoted, Step::Retire, &p, now).unwrap();
        assert_eq!(trusted(&retired, now), [new_ca]);
        assert_eq!(plan(&View::of(&retired), &p, true, now).step, None);
    }

    #[test]
    fn settings_that_cannot_rotate_in_time_are_refused() {
        let mut p = policy();
        assert!(p.check().is_ok());
        p.overlap = p.validity / 3;
        assert!(p.check().unwrap_err().contains("quarter"));
        p.overlap = SignedDuration::ZERO;
        assert!(p.check().is_err());
        // Under a minute the API servers may not all trust the new CA when it is served.
        p.overlap = SignedDuration::from_secs(59);
        assert!(p.check().unwrap_err().contains("at least 1m"), "{:?}", p.check());
        p.overlap = MIN_OVERLAP;
        assert!(p.check().is_ok());
        p.names.clear();
        assert!(p.check().unwrap_err().contains("--cert-name"));
    }

    #[test]
    fn the_bundle_always_holds_the_active_and_the_staged_ca() {
        let p = policy();
        let t = t0();
        let active = issue(&p.names, HOUR, t).unwrap();
        let next = issue(&p.names, HOUR, t).unwrap();
        let previous = issue(&p.names, HOUR, t).unwrap();
        let stored = Stored {
            active: Some(active.clone()),
            next: Some(next.clone()),
            previous_ca: Some(previous.ca.clone()),
        };
        let ca = |g: &Generation| ders(&g.ca)[0].clone();
        assert_eq!(ders(&bundle(&stored, t)), [ca(&active), ca(&next), ca(&previous)]);
        // Past their expiry only the previous CA goes: a replica may still serve the
        // others until the keeper has replaced them.
        assert_eq!(ders(&bundle(&stored, t + HOUR * 2)), [ca(&active), ca(&next)]);
    }
}
