//! The STS edge: one request type for every way in, a client that sends it through the
//! process-wide rate limit, and the mapping from STS errors to condition reasons.

use std::{
    collections::HashMap,
    num::NonZeroU32,
    sync::{Arc, Mutex},
};

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_sts::{
    Client,
    error::{ProvideErrorMetadata, SdkError},
    types::{PolicyDescriptorType, Tag},
};
use futures::future::BoxFuture;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use jiff::Timestamp;

use crate::{conditions::Reason, crd::Method, metrics::Metrics, render::Credentials};

/// Everything one STS issuance needs, already validated and resolved (no Secret refs left).
#[derive(Clone, PartialEq, Eq)]
pub struct IssueRequest {
    pub method: Method,
    pub role_arn: Option<String>,
    /// Roles assumed before `role_arn`, each with its external ID.
    pub chain: Vec<(String, Option<String>)>,
    pub session_name: String,
    pub duration_seconds: Option<i32>,
    pub external_id: Option<String>,
    pub session_policy: Option<String>,
    pub policy_arns: Vec<String>,
    pub tags: Vec<(String, String)>,
    pub transitive_tag_keys: Vec<String>,
    pub source_identity: Option<String>,
    pub region: Option<String>,
    /// The ServiceAccount token for AssumeRoleWithWebIdentity (from TokenRequest).
    pub web_identity_token: Option<String>,
    /// MFA device and the TOTP code to send with it.
    pub mfa: Option<(String, String)>,
    /// Federated user name for GetFederationToken.
    pub federated_name: Option<String>,
}

/// Credentials as issued (their `note` says anything the user should know about how).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issued {
    pub creds: Credentials,
}

/// The duration every role allows (its default maximum session duration).
pub const SAFE_ROLE_DURATION: i32 = 3600;

impl std::fmt::Debug for IssueRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // External IDs are shared secrets of a kind: keep them out of logs.
        f.debug_struct("IssueRequest")
            .field("method", &self.method)
            .field("role_arn", &self.role_arn)
            .field("chain", &self.chain.iter().map(|(r, _)| r).collect::<Vec<_>>())
            .field("session_name", &self.session_name)
            .field("duration_seconds", &self.duration_seconds)
            .field("mfa_device", &self.mfa.as_ref().map(|(serial, _)| serial))
            .field("federated_name", &self.federated_name)
            .finish_non_exhaustive()
    }
}

/// An STS failure, classified.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{operation} failed ({code}): {message}")]
pub struct StsError {
    pub reason: Reason,
    pub operation: &'static str,
    pub code: String,
    pub message: String,
}

/// Maps an STS error code (or a transport failure, `code = None`) to a condition reason.
pub fn classify(code: Option<&str>) -> Reason {
    match code {
        None => Reason::StsUnavailable,
        Some(
            "AccessDenied"
            | "AccessDeniedException"
            | "InvalidClientTokenId"
            | "SignatureDoesNotMatch"
            | "ExpiredToken"
            | "ExpiredTokenException"
            | "RegionDisabledException"
            | "InvalidIdentityToken"
            | "IDPRejectedClaim"
            | "UnrecognizedClientException",
        ) => Reason::AccessDenied,
        Some("Throttling" | "ThrottlingException" | "RequestLimitExceeded" | "TooManyRequestsException") => {
            Reason::Throttled
        }
        Some(
            "ValidationError"
            | "MalformedPolicyDocument"
            | "PackedPolicyTooLarge"
            | "InvalidParameterValue"
            | "InvalidParameterCombination",
        ) => Reason::InvalidSpec,
        Some(_) => Reason::StsUnavailable,
    }
}

/// Adds what a user needs to fix an AccessDenied to STS's own message.
pub fn access_denied_hint(req: &IssueRequest, message: &str) -> String {
    let mut hints = Vec::new();
    if message.contains("sts:TagSession") || (!req.tags.is_empty() && message.contains("TagSession")) {
        hints.push(
            "the role's trust policy must also allow sts:TagSession, because session tags are sent (or start the operator with --session-tags=off)",
        );
    } else if req.method == Method::AssumeRole {
        if req.external_id.is_some() {
            hints.push("check that externalId matches the sts:ExternalId condition of the role's trust policy");
        } else {
            hints.push("check that the role's trust policy allows sts:AssumeRole for the operator's identity (and whether it requires an external ID)");
        }
        if !req.tags.is_empty() {
            hints.push("with session tags the trust policy must allow sts:TagSession too");
        }
    }
    if req.method == Method::GetFederationToken {
        hints.push("GetFederationToken must be called with an IAM user's long-term keys: run the operator as an IAM user, not with a role's session");
    }
    if req.method == Method::AssumeRoleWithWebIdentity {
        hints.push("the role's trust policy must trust the cluster's OIDC provider for this ServiceAccount (sub system:serviceaccount:<namespace>:<name>) and audience");
    }
    if hints.is_empty() {
        message.to_string()
    } else {
        format!("{message} (hint: {})", hints.join("; "))
    }
}

#[derive(Clone, Copy)]
struct Hop<'a> {
    role_arn: &'a str,
    external_id: Option<&'a str>,
    first: bool,
    last: bool,
}

/// Something that issues credentials. The real one is [`StsClient`].
pub trait Issuer: Send + Sync {
    fn issue<'a>(&'a self, req: &'a IssueRequest) -> BoxFuture<'a, Result<Issued, StsError>>;
}

/// STS refused the duration because the role's MaxSessionDuration is lower.
pub fn is_duration_above_role_maximum(err: &StsError) -> bool {
    err.reason == Reason::InvalidSpec
        && err.message.contains("DurationSeconds")
        && err.message.contains("MaxSessionDuration")
}

/// Talks to AWS STS with the operator's own identity (the standard SDK chain), through one
/// process-wide token bucket.
pub struct StsClient {
    base: SdkConfig,
    endpoint: Option<String>,
    clients: Mutex<HashMap<Option<String>, Client>>,
    limiter: DefaultDirectRateLimiter,
    metrics: Arc<Metrics>,
}

impl StsClient {
    pub async fn new(
        region: Option<String>,
        endpoint: Option<String>,
        qps: NonZeroU32,
        burst: NonZeroU32,
        metrics: Arc<Metrics>,
    ) -> Self {
        // A hung STS must fail (and be retried with backoff), never stall a reconcile.
        let timeouts = aws_config::timeout::TimeoutConfig::builder()
            .connect_timeout(std::time::Duration::from_secs(5))
            .operation_attempt_timeout(std::time::Duration::from_secs(15))
            .operation_timeout(std::time::Duration::from_secs(45))
            .build();
        let mut loader = aws_config::defaults(BehaviorVersion::latest()).timeout_config(timeouts);
        if let Some(region) = region {
            loader = loader.region(Region::new(region));
        }
        let base = loader.load().await;
        StsClient {
            base,
            endpoint,
            clients: Mutex::new(HashMap::new()),
            limiter: RateLimiter::direct(Quota::per_second(qps).allow_burst(burst)),
            metrics,
        }
    }

    pub fn default_region(&self) -> Option<String> {
        self.base.region().map(|r| r.to_string())
    }

    fn config_builder(&self, region: Option<&str>) -> aws_sdk_sts::config::Builder {
        let mut builder = aws_sdk_sts::config::Builder::from(&self.base);
        if let Some(region) = region {
            builder = builder.region(Region::new(region.to_string()));
        }
        if let Some(endpoint) = &self.endpoint {
            builder = builder.endpoint_url(endpoint);
        }
        builder
    }

    /// A client with the operator's own identity for `region` (cached).
    fn client(&self, region: Option<&str>) -> Client {
        let mut clients = self.clients.lock().expect("client cache lock");
        clients
            .entry(region.map(str::to_string))
            .or_insert_with(|| Client::from_conf(self.config_builder(region).build()))
            .clone()
    }

    /// A client acting as `creds` (for the next hop of a role chain).
    fn client_as(&self, region: Option<&str>, creds: &Credentials) -> Client {
        let provider = aws_credential_types::Credentials::new(
            &creds.access_key_id,
            &creds.secret_access_key,
            Some(creds.session_token.clone()),
            None,
            "kube-sts-chain",
        );
        Client::from_conf(self.config_builder(region).credentials_provider(provider).build())
    }

    async fn call<T, E>(
        &self,
        operation: &'static str,
        fut: impl std::future::Future<Output = Result<T, SdkError<E>>>,
    ) -> Result<T, StsError>
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        self.limiter.until_ready().await;
        let result = fut.await;
        let outcome = match &result {
            Ok(_) => "success",
            Err(e) => classify(e.code()).as_str(),
        };
        self.metrics.sts_call(operation, outcome);
        result.map_err(|e| sdk_error(operation, e))
    }

    /// One AssumeRole call of a chain: the first hop carries the MFA code, the last one the
    /// session policy, tags and source identity.
    async fn assume_role(
        &self,
        client: &Client,
        hop: Hop<'_>,
        req: &IssueRequest,
        duration: Option<i32>,
    ) -> Result<Credentials, StsError> {
        let mut call = client
            .assume_role()
            .role_arn(hop.role_arn)
            .role_session_name(&req.session_name)
            .set_external_id(hop.external_id.map(str::to_string))
            .set_duration_seconds(duration);
        if hop.first
            && let Some((serial, code)) = &req.mfa
        {
            call = call.serial_number(serial).token_code(code);
        }
        if hop.last {
            call = call
                .set_policy(req.session_policy.clone())
                .set_policy_arns(policy_arns(&req.policy_arns))
                .set_tags(tags(&req.tags))
                .set_transitive_tag_keys((!req.transitive_tag_keys.is_empty()).then(|| req.transitive_tag_keys.clone()))
                .set_source_identity(req.source_identity.clone());
        }
        let out = self.call("AssumeRole", call.send()).await?;
        let arn = out.assumed_role_user().map(|u| u.arn().to_string());
        to_credentials("AssumeRole", out.credentials(), arn)
    }

    async fn assume_chain(&self, req: &IssueRequest, duration: Option<i32>) -> Result<Credentials, StsError> {
        let region = req.region.as_deref();
        let role_arn = req
            .role_arn
            .as_deref()
            .ok_or_else(|| invalid("AssumeRole", "roleArn is required"))?;
        let hops: Vec<(&str, Option<&str>)> = req
            .chain
            .iter()
            .map(|(arn, id)| (arn.as_str(), id.as_deref()))
            .chain([(role_arn, req.external_id.as_deref())])
            .collect();
        let mut client = self.client(region);
        let mut creds = None;
        for (i, (role_arn, external_id)) in hops.iter().enumerate() {
            let hop = Hop {
                role_arn,
                external_id: *external_id,
                first: i == 0,
                last: i + 1 == hops.len(),
            };
            let issued = self.assume_role(&client, hop, req, duration).await?;
            if !hop.last {
                client = self.client_as(region, &issued);
            }
            creds = Some(issued);
        }
        Ok(creds.expect("a chain has at least its final role"))
    }

    async fn web_identity(&self, req: &IssueRequest, duration: Option<i32>) -> Result<Credentials, StsError> {
        let role_arn = req
            .role_arn
            .as_deref()
            .ok_or_else(|| invalid("AssumeRoleWithWebIdentity", "roleArn is required"))?;
        let token = req
            .web_identity_token
            .as_deref()
            .ok_or_else(|| invalid("AssumeRoleWithWebIdentity", "no ServiceAccount token"))?;
        // The SDK sends this call unsigned: the workload's token, not the operator, is the identity.
        let call = self
            .client(req.region.as_deref())
            .assume_role_with_web_identity()
            .role_arn(role_arn)
            .role_session_name(&req.session_name)
            .web_identity_token(token)
            .set_duration_seconds(duration)
            .set_policy(req.session_policy.clone())
            .set_policy_arns(policy_arns(&req.policy_arns));
        let out = self.call("AssumeRoleWithWebIdentity", call.send()).await?;
        let arn = out.assumed_role_user().map(|u| u.arn().to_string());
        to_credentials("AssumeRoleWithWebIdentity", out.credentials(), arn)
    }

    async fn session_token(&self, req: &IssueRequest) -> Result<Credentials, StsError> {
        let mut call = self
            .client(req.region.as_deref())
            .get_session_token()
            .set_duration_seconds(req.duration_seconds);
        if let Some((serial, code)) = &req.mfa {
            call = call.serial_number(serial).token_code(code);
        }
        let out = self.call("GetSessionToken", call.send()).await?;
        to_credentials("GetSessionToken", out.credentials(), None)
    }

    async fn federation_token(&self, req: &IssueRequest) -> Result<Credentials, StsError> {
        let name = req
            .federated_name
            .clone()
            .unwrap_or_else(|| req.session_name.chars().take(32).collect());
        let call = self
            .client(req.region.as_deref())
            .get_federation_token()
            .name(name)
            .set_duration_seconds(req.duration_seconds)
            .set_policy(req.session_policy.clone())
            .set_policy_arns(policy_arns(&req.policy_arns))
            .set_tags(tags(&req.tags));
        let out = self.call("GetFederationToken", call.send()).await?;
        let arn = out.federated_user().map(|u| u.arn().to_string());
        to_credentials("GetFederationToken", out.credentials(), arn)
    }

    async fn issue_once(&self, req: &IssueRequest, duration: Option<i32>) -> Result<Credentials, StsError> {
        match req.method {
            Method::AssumeRole => self.assume_chain(req, duration).await,
            Method::AssumeRoleWithWebIdentity => self.web_identity(req, duration).await,
            Method::GetSessionToken => self.session_token(req).await,
            Method::GetFederationToken => self.federation_token(req).await,
        }
    }

    async fn issue_inner(&self, req: &IssueRequest) -> Result<Issued, StsError> {
        match self.issue_once(req, req.duration_seconds).await {
            Ok(creds) => Ok(Issued { creds }),
            // Every role allows an hour: rather than failing forever, issue for an hour and
            // say so. (An MFA code cannot be sent twice, so MFA calls are not retried.)
            Err(err)
                if req.method.assumes_role()
                    && req.mfa.is_none()
                    && req.duration_seconds.is_some_and(|d| d > SAFE_ROLE_DURATION)
                    && is_duration_above_role_maximum(&err) =>
            {
                let mut creds = self.issue_once(req, Some(SAFE_ROLE_DURATION)).await?;
                creds.note = Some(format!(
                    "durationSeconds {} exceeds the role's maximum session duration; issued for {SAFE_ROLE_DURATION} s",
                    req.duration_seconds.unwrap_or_default()
                ));
                Ok(Issued { creds })
            }
            Err(err) => Err(err),
        }
    }
}

impl Issuer for StsClient {
    fn issue<'a>(&'a self, req: &'a IssueRequest) -> BoxFuture<'a, Result<Issued, StsError>> {
        Box::pin(self.issue_inner(req))
    }
}

fn invalid(operation: &'static str, message: &str) -> StsError {
    StsError {
        reason: Reason::InvalidSpec,
        operation,
        code: "InvalidSpec".into(),
        message: message.into(),
    }
}

fn policy_arns(arns: &[String]) -> Option<Vec<PolicyDescriptorType>> {
    (!arns.is_empty()).then(|| {
        arns.iter()
            .map(|a| PolicyDescriptorType::builder().arn(a).build())
            .collect()
    })
}

fn tags(tags: &[(String, String)]) -> Option<Vec<Tag>> {
    (!tags.is_empty()).then(|| {
        tags.iter()
            .map(|(k, v)| {
                Tag::builder()
                    .key(k)
                    .value(v)
                    .build()
                    .expect("tag key and value are set")
            })
            .collect()
    })
}

fn sdk_error<E>(operation: &'static str, err: SdkError<E>) -> StsError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let code = err.code().map(str::to_string);
    let message = match (&err, err.message()) {
        (_, Some(m)) => m.to_string(),
        (SdkError::DispatchFailure(_), _) => "cannot reach STS (connection failed)".to_string(),
        (SdkError::TimeoutError(_), _) => "STS did not answer in time".to_string(),
        (SdkError::ResponseError(_), _) => "STS sent an unreadable response".to_string(),
        _ => err.to_string(),
    };
    StsError {
        reason: classify(code.as_deref()),
        operation,
        code: code.unwrap_or_else(|| "Unavailable".into()),
        message,
    }
}

fn to_credentials(
    operation: &'static str,
    creds: Option<&aws_sdk_sts::types::Credentials>,
    arn: Option<String>,
) -> Result<Credentials, StsError> {
    let creds = creds.ok_or_else(|| StsError {
        reason: Reason::StsUnavailable,
        operation,
        code: "NoCredentials".into(),
        message: "STS answered without credentials".into(),
    })?;
    let expiration = Timestamp::from_second(creds.expiration().secs()).map_err(|_| StsError {
        reason: Reason::StsUnavailable,
        operation,
        code: "BadExpiration".into(),
        message: "STS answered with an unusable expiration".into(),
    })?;
    Ok(Credentials {
        access_key_id: creds.access_key_id().to_string(),
        secret_access_key: creds.secret_access_key().to_string(),
        session_token: creds.session_token().to_string(),
        // STS does not say when it issued; the answer's arrival is the best clock we have.
        // Whole seconds, as written into the Secret's annotations.
        issued_at: Timestamp::from_second(Timestamp::now().as_second()).expect("now is a valid timestamp"),
        expiration,
        arn,
        note: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> IssueRequest {
        IssueRequest {
            method: Method::AssumeRole,
            role_arn: Some("arn:aws:iam::123456789012:role/r".into()),
            chain: vec![],
            session_name: "ns.sa".into(),
            duration_seconds: None,
            external_id: None,
            session_policy: None,
            policy_arns: vec![],
            tags: vec![],
            transitive_tag_keys: vec![],
            source_identity: None,
            region: None,
            web_identity_token: None,
            mfa: None,
            federated_name: None,
        }
    }

    #[test]
    fn error_codes_map_to_reasons() {
        assert_eq!(classify(Some("AccessDenied")), Reason::AccessDenied);
        assert_eq!(classify(Some("InvalidClientTokenId")), Reason::AccessDenied);
        assert_eq!(classify(Some("Throttling")), Reason::Throttled);
        assert_eq!(classify(Some("MalformedPolicyDocument")), Reason::InvalidSpec);
        assert_eq!(classify(Some("InternalFailure")), Reason::StsUnavailable);
        assert_eq!(classify(None), Reason::StsUnavailable);
    }

    #[test]
    fn hint_names_tag_session_when_sts_says_so() {
        let mut r = req();
        r.tags = vec![("kubernetes-namespace".into(), "ns".into())];
        let msg = access_denied_hint(
            &r,
            "User: x is not authorized to perform: sts:TagSession on resource: y",
        );
        assert!(msg.contains("must also allow sts:TagSession"), "{msg}");
    }

    #[test]
    fn hint_names_external_id_when_one_was_sent() {
        let mut r = req();
        r.external_id = Some("abc".into());
        let msg = access_denied_hint(&r, "not authorized to perform: sts:AssumeRole");
        assert!(msg.contains("externalId"), "{msg}");
        let msg = access_denied_hint(&req(), "not authorized to perform: sts:AssumeRole");
        assert!(msg.contains("trust policy allows sts:AssumeRole"), "{msg}");
    }

    #[test]
    fn duration_refusal_is_recognised() {
        let err = StsError {
            reason: Reason::InvalidSpec,
            operation: "AssumeRole",
            code: "ValidationError".into(),
            message: "The requested DurationSeconds exceeds the MaxSessionDuration set for this role.".into(),
        };
        assert!(is_duration_above_role_maximum(&err));
        let other = StsError {
            message: "1 validation error detected".into(),
            ..err
        };
        assert!(!is_duration_above_role_maximum(&other));
    }

    #[test]
    fn hint_for_federation_names_the_iam_user_requirement() {
        let mut r = req();
        r.method = Method::GetFederationToken;
        let msg = access_denied_hint(&r, "Cannot call GetFederationToken with session credentials");
        assert!(msg.contains("IAM user"), "{msg}");
    }

    #[test]
    fn debug_hides_external_id() {
        let mut r = req();
        r.external_id = Some("very-secret-external".into());
        r.chain = vec![("arn:aws:iam::1:role/hub".into(), Some("hop-secret".into()))];
        let shown = format!("{r:?}");
        assert!(
            !shown.contains("very-secret-external") && !shown.contains("hop-secret"),
            "{shown}"
        );
    }
}
