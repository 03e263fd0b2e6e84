//! A workload as the README tells users to write one: the AWS SDK's default credential
//! chain reads `AWS_CONFIG_FILE` (the `config` key of a mounted kube-sts Secret, whose
//! profile runs `credential_process = cat <mountPath>/credentials.json`), and the program
//! calls STS `GetCallerIdentity` every second (`CONSUMER_INTERVAL_MS`), one long-lived
//! client, printing one JSON line per call with the access key ID that signed it (not a
//! secret: AWS prints it in CloudTrail), so a rotation shows in the log:
//!
//! ```text
//! {"at":"...","ok":true,"key":"ASIA...","arn":"arn:aws:sts::123456789012:assumed-role/r/s"}
//! {"at":"...","ok":false,"key":"ASIA...","error":"..."}
//! ```
//!
//! Built statically into the consumer image (`e2e/scripts/build-image.sh consumer`), with
//! busybox's `sh` and `cat` for `credential_process`.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use aws_config::BehaviorVersion;
use aws_sdk_sts::{
    config::{ConfigBag, Intercept, RuntimeComponents, interceptors::BeforeTransmitInterceptorContextRef},
    error::BoxError,
};
use aws_smithy_types::error::display::DisplayErrorContext;

/// Remembers the access key ID of the last signed request (`Credential=<key>/...` of the
/// SigV4 `Authorization` header).
#[derive(Clone, Debug, Default)]
struct SigningKey(Arc<Mutex<Option<String>>>);

impl Intercept for SigningKey {
    fn name(&self) -> &'static str {
        "SigningKey"
    }

    fn read_before_transmit(
        &self,
        context: &BeforeTransmitInterceptorContextRef<'_>,
        _: &RuntimeComponents,
        _: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let key = context
            .request()
            .headers()
            .get("authorization")
            .and_then(|a| a.split_once("Credential="))
            .and_then(|(_, rest)| rest.split('/').next())
            .map(str::to_string);
        *self.0.lock().unwrap() = key;
        Ok(())
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let interval = std::env::var("CONSUMER_INTERVAL_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let config = aws_config::load_defaults(BehaviorVersion::latest()).await;
    let signing_key = SigningKey::default();
    let client = aws_sdk_sts::Client::from_conf(
        aws_sdk_sts::config::Builder::from(&config)
            .interceptor(signing_key.clone())
            .build(),
    );
    loop {
        let at = jiff::Timestamp::now().to_string();
        *signing_key.0.lock().unwrap() = None;
        let result = client.get_caller_identity().send().await;
        let key = signing_key.0.lock().unwrap().take();
        let line = match result {
            Ok(out) => serde_json::json!({"at": at, "ok": true, "key": key, "arn": out.arn()}),
            Err(e) => {
                serde_json::json!({"at": at, "ok": false, "key": key, "error": DisplayErrorContext(&e).to_string()})
            }
        };
        println!("{line}");
        tokio::time::sleep(Duration::from_millis(interval)).await;
    }
}
