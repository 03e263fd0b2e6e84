//! A workload as the README tells users to write one: the AWS SDK's default credential
//! chain reads `AWS_CONFIG_FILE` (the `config` key of a mounted kube-sts Secret, whose
//! profile runs `credential_process = cat <mountPath>/credentials.json`), and the program
//! calls STS `GetCallerIdentity` every second (`CONSUMER_INTERVAL_MS`), one long-lived
//! client, printing one JSON line per call:
//!
//! ```text
//! {"at":"...","ok":true,"arn":"arn:aws:sts::123456789012:assumed-role/r/s"}
//! {"at":"...","ok":false,"error":"..."}
//! ```
//!
//! Built statically into the consumer image (`e2e/scripts/build-image.sh consumer`), with
//! busybox's `sh` and `cat` for `credential_process`.

use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_smithy_types::error::display::DisplayErrorContext;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let interval = std::env::var("CONSUMER_INTERVAL_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let config = aws_config::load_defaults(BehaviorVersion::latest()).await;
    let client = aws_sdk_sts::Client::new(&config);
    loop {
        let at = jiff::Timestamp::now().to_string();
        let line = match client.get_caller_identity().send().await {
            Ok(out) => serde_json::json!({"at": at, "ok": true, "arn": out.arn()}),
            Err(e) => serde_json::json!({"at": at, "ok": false, "error": DisplayErrorContext(&e).to_string()}),
        };
        println!("{line}");
        tokio::time::sleep(Duration::from_millis(interval)).await;
    }
}
