//! TOTP codes (RFC 6238: SHA-1, 6 digits, 30 s steps) for STS calls with MFA, computed with
//! totp-rs from the base32 seed a binding references. A code is never sent twice: STS
//! refuses a reused code, so a second call within the same step waits for the next one.

use std::{collections::HashMap, sync::Mutex, time::Duration};

use totp_rs::{Algorithm, Secret, TOTP};

pub const STEP_SECONDS: u64 = 30;

/// A decoded TOTP seed. `Debug` does not show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Seed(Vec<u8>);

impl std::fmt::Debug for Seed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Seed(..)")
    }
}

impl Seed {
    /// Parses a base32 seed (RFC 4648, padding and spaces allowed, any case).
    pub fn parse(base32: &str) -> Result<Seed, String> {
        let cleaned: String = base32
            .chars()
            .filter(|c| !c.is_whitespace() && *c != '=')
            .map(|c| c.to_ascii_uppercase())
            .collect();
        if cleaned.is_empty() {
            return Err("the TOTP seed is empty".into());
        }
        let bytes = Secret::Encoded(cleaned)
            .to_bytes()
            .map_err(|_| "the TOTP seed is not valid base32".to_string())?;
        if bytes.len() < 10 {
            return Err("the TOTP seed is shorter than 80 bits".into());
        }
        Ok(Seed(bytes))
    }

    /// The code for the step containing `unix_seconds`.
    pub fn code_at(&self, unix_seconds: u64) -> String {
        TOTP::new_unchecked(Algorithm::SHA1, 6, 0, STEP_SECONDS, self.0.clone()).generate(unix_seconds)
    }
}

/// Remembers the last step used per MFA device, so no code goes out twice.
///
/// A process also never sends a code of the step that was current when it first needed one:
/// a previous process (the leader before this one, or this operator before a restart) may
/// have sent that code already, and nothing it wrote survives a kill between the STS call
/// and the Secret write. The cost is one wait of at most a step for the first MFA issuance
/// after a start.
#[derive(Default)]
pub struct CodeLedger {
    last_step: Mutex<HashMap<String, u64>>,
    /// The step current when this process first needed a code.
    started: std::sync::OnceLock<u64>,
}

/// A step remembered this far ahead of the current one was taken with a clock that was
/// ahead (corrected since): STS, on the right time, refused that code or never counted it
/// as used, so it does not hold back the current step.
const CLOCK_CORRECTION_STEPS: u64 = 2;

impl CodeLedger {
    /// The newest step `device` may not use again, seen from `step`.
    fn used_up_to(&self, last: &HashMap<String, u64>, device: &str, step: u64) -> Option<u64> {
        let started = *self.started.get_or_init(|| step);
        [last.get(device).copied(), Some(started)]
            .into_iter()
            .flatten()
            .filter(|used| *used <= step + CLOCK_CORRECTION_STEPS)
            .max()
    }

    /// How long to wait before a code for `device` may be taken at `unix_seconds`:
    /// zero when this step is unused, else until the next unused step starts.
    pub fn wait_before(&self, device: &str, unix_seconds: u64) -> Duration {
        let step = unix_seconds / STEP_SECONDS;
        let last = self.last_step.lock().expect("ledger lock");
        match self.used_up_to(&last, device, step) {
            Some(used) if used >= step => Duration::from_secs((used + 1) * STEP_SECONDS - unix_seconds),
            _ => Duration::ZERO,
        }
    }

    /// Takes the code for `unix_seconds` if its step is unused (and marks it used).
    pub fn take(&self, device: &str, seed: &Seed, unix_seconds: u64) -> Option<String> {
        let step = unix_seconds / STEP_SECONDS;
        let mut last = self.last_step.lock().expect("ledger lock");
        match self.used_up_to(&last, device, step) {
            Some(used) if used >= step => None,
            _ => {
                last.insert(device.to_string(), step);
                Some(seed.code_at(unix_seconds))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 6238 appendix B seed ("12345678901234567890") in base32, SHA-1.
    const RFC_SEED: &str = "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ";

    #[test]
    fn rfc6238_test_vectors_six_digits() {
        let seed = Seed::parse(RFC_SEED).unwrap();
        // The RFC lists 8-digit codes; the last 6 digits are the 6-digit codes.
        for (time, eight) in [
            (59, "94287082"),
            (1_111_111_109, "07081804"),
            (1_234_567_890, "89005924"),
            (2_000_000_000, "69279037"),
        ] {
            assert_eq!(seed.code_at(time), eight[2..], "t={time}");
        }
    }

    #[test]
    fn seed_parsing_accepts_padding_spaces_and_case() {
        assert_eq!(
            Seed::parse("gezd gnbv gy3t qojq gezd gnbv gy3t qojq====").unwrap(),
            Seed::parse(RFC_SEED).unwrap()
        );
        assert!(Seed::parse("not base32 !").is_err());
        assert!(Seed::parse("").is_err());
        assert!(Seed::parse("GEZDGNBV").is_err(), "too short");
        assert_eq!(format!("{:?}", Seed::parse(RFC_SEED).unwrap()), "Seed(..)");
    }

    #[test]
    fn a_code_is_never_taken_twice() {
        let ledger = CodeLedger::default();
        let seed = Seed::parse(RFC_SEED).unwrap();
        // The step current at the first need may have been used by a previous process.
        assert_eq!(ledger.wait_before("dev", 45), Duration::from_secs(15));
        assert_eq!(ledger.take("dev", &seed, 59), None, "the start's step");
        assert_eq!(ledger.take("other", &seed, 59), None, "for every device");
        assert_eq!(ledger.wait_before("dev", 60), Duration::ZERO);
        assert!(ledger.take("dev", &seed, 60).is_some());
        assert_eq!(ledger.take("dev", &seed, 75), None, "same step");
        assert_eq!(ledger.wait_before("dev", 75), Duration::from_secs(15));
        assert!(ledger.take("other", &seed, 75).is_some(), "devices are independent");
        assert!(ledger.take("dev", &seed, 90).is_some(), "next step");
    }

    #[test]
    fn a_clock_corrected_backwards_does_not_hold_codes_back() {
        let ledger = CodeLedger::default();
        let seed = Seed::parse(RFC_SEED).unwrap();
        // First code needed (and taken a step later) with a clock two hours ahead.
        let ahead = 7200 + 600;
        assert_eq!(ledger.take("dev", &seed, ahead), None);
        assert!(ledger.take("dev", &seed, ahead + 30).is_some());
        // Corrected: the current step is usable at once, and then used.
        assert_eq!(ledger.wait_before("dev", 615), Duration::ZERO);
        assert!(ledger.take("dev", &seed, 615).is_some());
        assert_eq!(ledger.take("dev", &seed, 620), None);
        // A small correction (within two steps) still counts the later step as used.
        let ledger = CodeLedger::default();
        assert_eq!(ledger.take("dev", &seed, 100), None);
        assert!(ledger.take("dev", &seed, 125).is_some());
        assert_eq!(ledger.take("dev", &seed, 95), None, "one step back");
        assert_eq!(ledger.wait_before("dev", 95), Duration::from_secs(55));
    }
}
