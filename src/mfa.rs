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
/// and the Secret write. That moment is kept as an `Instant` and placed on the clock anew at
/// each look, so a clock calibrated meanwhile (STS's time) still finds the right step. The
/// cost is one wait of at most a step for the first MFA issuance after a start.
#[derive(Default)]
pub struct CodeLedger {
    last_step: Mutex<HashMap<String, u64>>,
    /// When this process first needed a code.
    started: std::sync::OnceLock<std::time::Instant>,
}

/// A step remembered this far ahead of the current one was taken with a clock that was
/// ahead (corrected since): STS, on the right time, refused that code or never counted it
/// as used, so it does not hold the current step back for hours.
const CLOCK_CORRECTION_STEPS: u64 = 2;

impl CodeLedger {
    /// How long to wait before a code for `device` may be taken at `unix_seconds`:
    /// zero when this step is unused, else until the next unused step starts.
    pub fn wait_before(&self, device: &str, unix_seconds: u64) -> Duration {
        self.wait_before_at(device, unix_seconds, self.since_start())
    }

    /// Takes the code for `unix_seconds` if its step is unused (and marks it used).
    pub fn take(&self, device: &str, seed: &Seed, unix_seconds: u64) -> Option<String> {
        self.take_at(device, seed, unix_seconds, self.since_start())
    }

    fn since_start(&self) -> Duration {
        self.started.get_or_init(std::time::Instant::now).elapsed()
    }

    /// The newest step `device` may not use, at `unix_seconds`, `since_start` after this
    /// process first needed a code.
    fn used_up_to(&self, last: &HashMap<String, u64>, device: &str, unix_seconds: u64, since_start: Duration) -> u64 {
        let step = unix_seconds / STEP_SECONDS;
        let start_step = unix_seconds.saturating_sub(since_start.as_secs()) / STEP_SECONDS;
        let taken = last
            .get(device)
            .copied()
            .filter(|used| *used <= step + CLOCK_CORRECTION_STEPS)
            .unwrap_or(0);
        taken.max(start_step)
    }

    fn wait_before_at(&self, device: &str, unix_seconds: u64, since_start: Duration) -> Duration {
        let step = unix_seconds / STEP_SECONDS;
        let last = self.last_step.lock().expect("ledger lock");
        let used = self.used_up_to(&last, device, unix_seconds, since_start);
        if used >= step {
            Duration::from_secs((used + 1) * STEP_SECONDS - unix_seconds)
        } else {
            Duration::ZERO
        }
    }

    fn take_at(&self, device: &str, seed: &Seed, unix_seconds: u64, since_start: Duration) -> Option<String> {
        let step = unix_seconds / STEP_SECONDS;
        let mut last = self.last_step.lock().expect("ledger lock");
        if self.used_up_to(&last, device, unix_seconds, since_start) >= step {
            return None;
        }
        last.insert(device.to_string(), step);
        Some(seed.code_at(unix_seconds))
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
        // First needed at 45: that step may have been used by a previous process.
        let since = |t: u64| Duration::from_secs(t - 45);
        assert_eq!(ledger.wait_before_at("dev", 45, since(45)), Duration::from_secs(15));
        assert_eq!(ledger.take_at("dev", &seed, 59, since(59)), None, "the start's step");
        assert_eq!(ledger.take_at("other", &seed, 59, since(59)), None, "for every device");
        assert_eq!(ledger.wait_before_at("dev", 60, since(60)), Duration::ZERO);
        assert!(ledger.take_at("dev", &seed, 60, since(60)).is_some());
        assert_eq!(ledger.take_at("dev", &seed, 75, since(75)), None, "same step");
        assert_eq!(ledger.wait_before_at("dev", 75, since(75)), Duration::from_secs(15));
        assert!(
            ledger.take_at("other", &seed, 75, since(75)).is_some(),
            "devices are independent"
        );
        assert!(ledger.take_at("dev", &seed, 90, since(90)).is_some(), "next step");
    }

    #[test]
    fn the_start_step_follows_the_clock_once_it_is_corrected() {
        let ledger = CodeLedger::default();
        let seed = Seed::parse(RFC_SEED).unwrap();
        // First needed at true time 600 with a clock two hours ahead (its step 260 is
        // fenced, nothing is sent); 5 s later the clock is corrected: the start fell in true
        // step 20, whose code the previous process may have sent.
        assert_eq!(ledger.take_at("dev", &seed, 7200 + 600, Duration::ZERO), None);
        assert_eq!(
            ledger.take_at("dev", &seed, 605, Duration::from_secs(5)),
            None,
            "the true start step"
        );
        assert_eq!(
            ledger.wait_before_at("dev", 605, Duration::from_secs(5)),
            Duration::from_secs(25)
        );
        assert!(ledger.take_at("dev", &seed, 630, Duration::from_secs(30)).is_some());
        assert_eq!(ledger.take_at("dev", &seed, 640, Duration::from_secs(40)), None);
        // A code taken with a clock hours ahead does not hold the corrected clock back.
        let ledger = CodeLedger::default();
        assert!(
            ledger
                .take_at("dev", &seed, 7200 + 660, Duration::from_secs(60))
                .is_some()
        );
        assert!(ledger.take_at("dev", &seed, 690, Duration::from_secs(90)).is_some());
        // A small correction (within two steps) still counts the later step as used.
        let ledger = CodeLedger::default();
        assert!(ledger.take_at("dev", &seed, 125, Duration::from_secs(60)).is_some());
        assert_eq!(
            ledger.take_at("dev", &seed, 95, Duration::from_secs(61)),
            None,
            "one step back"
        );
        assert_eq!(
            ledger.wait_before_at("dev", 95, Duration::from_secs(61)),
            Duration::from_secs(55)
        );
    }
}
