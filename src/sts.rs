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
    /// ECR registries to fetch a pull token for with the issued session (DockerConfigJson).
    pub ecr_registry_ids: Vec<String>,
    /// The IAM user that calls GetSessionToken / GetFederationToken (`None`: the operator).
    pub source_credentials: Option<UserKeys>,
}

/// Long-term access keys of an IAM user (read from a Secret of the binding's namespace).
#[derive(Clone, PartialEq, Eq)]
pub struct UserKeys {
    pub access_key_id: String,
    pub secret_access_key: String,
}

impl std::fmt::Debug for UserKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserKeys")
            .field("access_key_id", &self.access_key_id)
            .finish_non_exhaustive()
    }
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
            .field("ecr_registry_ids", &self.ecr_registry_ids)
            .field("source_credentials", &self.source_credentials)
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
            | "InvalidParameterCombination"
            | "InvalidParameterException",
        ) => Reason::InvalidSpec,
        Some(_) => Reason::StsUnavailable,
    }
}

/// Adds what a user needs to fix an AccessDenied to STS's own message.
pub fn access_denied_hint(req: &IssueRequest, message: &str) -> String {
    let mut hints = Vec::new();
    if message.contains("ecr:") {
        hints.push(
            "the role's permissions policy must allow ecr:GetAuthorizationToken (and pulling needs ecr:BatchGetImage and ecr:GetDownloadUrlForLayer on the repositories)",
        );
    } else if message.contains("sts:TagSession") || (!req.tags.is_empty() && message.contains("TagSession")) {
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
    if !req.method.assumes_role() {
        hints.push(if req.source_credentials.is_some() {
            "the IAM user of sourceCredentialsSecretRef must exist, its keys be active, and its identity policy allow this action"
        } else {
            "this method is called with the operator's own identity, which must be an IAM user with long-term keys (not a role's session)"
        });
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

/// Why STS refused a `DurationSeconds` that every role allows an hour of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DurationRefusal {
    /// Above the role's MaxSessionDuration.
    RoleMaximum,
    /// The caller is itself a role session (IRSA, Pod Identity, a chain): AWS caps role
    /// chaining at one hour.
    RoleChaining,
}

/// Whether (and why) STS refused the requested duration.
pub fn duration_refusal(err: &StsError) -> Option<DurationRefusal> {
    if err.reason != Reason::InvalidSpec || !err.message.contains("DurationSeconds") {
        return None;
    }
    if err.message.contains("MaxSessionDuration") {
        Some(DurationRefusal::RoleMaximum)
    } else if err.message.contains("role chaining") {
        Some(DurationRefusal::RoleChaining)
    } else {
        None
    }
}

/// Talks to AWS STS with the operator's own identity (the standard SDK chain), through one
/// process-wide token bucket.
pub struct StsClient {
    base: SdkConfig,
    clock: Arc<crate::clock::Clock>,
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
        clock: Arc<crate::clock::Clock>,
    ) -> Self {
        // A hung STS must fail (and be retried with backoff), never stall a reconcile.
        let timeouts = aws_config::timeout::TimeoutConfig::builder()
            .connect_timeout(std::time::Duration::from_secs(5))
            .operation_attempt_timeout(std::time::Duration::from_secs(15))
            .operation_timeout(std::time::Duration::from_secs(45))
            .build();
        // One attempt per call: every request to STS passes the process-wide limit and is
        // counted; retries are the operator's own per-subject backoff.
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .timeout_config(timeouts)
            .retry_config(aws_config::retry::RetryConfig::standard().with_max_attempts(1));
        if let Some(region) = region {
            loader = loader.region(Region::new(region));
        }
        let base = loader.load().await;
        StsClient {
            base,
            clock,
            endpoint,
            clients: Mutex::new(HashMap::new()),
            limiter: RateLimiter::direct(Quota::per_second(qps).allow_burst(burst)),
            metrics,
        }
    }

    /// When an answer just received was issued: STS does not say, so its arrival (in STS's
    /// time, from the answer's `Date`) is the best clock there is.
    fn issued_now(&self) -> Timestamp {
        self.clock.now()
    }

    pub fn default_region(&self) -> Option<String> {
        self.base.region().map(|r| r.to_string())
    }

    fn config_builder(&self, region: Option<&str>) -> aws_sdk_sts::config::Builder {
        let mut builder =
            aws_sdk_sts::config::Builder::from(&self.base).interceptor(crate::clock::DateObserver(self.clock.clone()));
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
        Client::from_conf(
            self.config_builder(region)
                .credentials_provider(acting_as(creds))
                .build(),
        )
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
        to_credentials("AssumeRole", out.credentials(), arn, self.issued_now())
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
        to_credentials("AssumeRoleWithWebIdentity", out.credentials(), arn, self.issued_now())
    }

    /// The client GetSessionToken and GetFederationToken are called with: the team's IAM
    /// user when the binding names its keys, else the operator's own identity.
    fn session_client(&self, req: &IssueRequest) -> Client {
        match &req.source_credentials {
            Some(keys) => Client::from_conf(
                self.config_builder(req.region.as_deref())
                    .credentials_provider(aws_credential_types::Credentials::new(
                        &keys.access_key_id,
                        &keys.secret_access_key,
                        None,
                        None,
                        "kube-sts-source-credentials",
                    ))
                    .build(),
            ),
            None => self.client(req.region.as_deref()),
        }
    }

    async fn session_token(&self, req: &IssueRequest) -> Result<Credentials, StsError> {
        let mut call = self
            .session_client(req)
            .get_session_token()
            .set_duration_seconds(req.duration_seconds);
        if let Some((serial, code)) = &req.mfa {
            call = call.serial_number(serial).token_code(code);
        }
        let out = self.call("GetSessionToken", call.send()).await?;
        to_credentials("GetSessionToken", out.credentials(), None, self.issued_now())
    }

    async fn federation_token(&self, req: &IssueRequest) -> Result<Credentials, StsError> {
        let name = req
            .federated_name
            .clone()
            .unwrap_or_else(|| req.session_name.chars().take(32).collect());
        let call = self
            .session_client(req)
            .get_federation_token()
            .name(name)
            .set_duration_seconds(req.duration_seconds)
            .set_policy(req.session_policy.clone())
            .set_policy_arns(policy_arns(&req.policy_arns))
            .set_tags(tags(&req.tags));
        let out = self.call("GetFederationToken", call.send()).await?;
        let arn = out.federated_user().map(|u| u.arn().to_string());
        to_credentials("GetFederationToken", out.credentials(), arn, self.issued_now())
    }

    async fn issue_once(&self, req: &IssueRequest, duration: Option<i32>) -> Result<Credentials, StsError> {
        match req.method {
            Method::AssumeRole => self.assume_chain(req, duration).await,
            Method::AssumeRoleWithWebIdentity => self.web_identity(req, duration).await,
            Method::GetSessionToken => self.session_token(req).await,
            Method::GetFederationToken => self.federation_token(req).await,
        }
    }

    /// Fetches ECR pull tokens acting as the issued session. What is kept is the token (with
    /// its own issue and expiry times) and the session's public key ID; the session's secret
    /// parts are dropped.
    async fn ecr_token(&self, req: &IssueRequest, session: Credentials) -> Result<Credentials, StsError> {
        let region = req
            .region
            .clone()
            .ok_or_else(|| invalid("GetAuthorizationToken", "an ECR pull Secret needs a region"))?;
        let config = aws_sdk_ecr::config::Builder::from(&self.base)
            .interceptor(crate::clock::DateObserver(self.clock.clone()))
            .region(Region::new(region.clone()))
            .credentials_provider(acting_as(&session))
            .build();
        // No registryIds: ECR deprecated them, since one token serves every registry the
        // session may pull from; `registry_auths` writes it for each registry asked for.
        let call = aws_sdk_ecr::Client::from_conf(config).get_authorization_token();
        let out = self.call("GetAuthorizationToken", call.send()).await?;
        let answer: Vec<EcrAuthorization> = out
            .authorization_data()
            .iter()
            .map(|a| EcrAuthorization {
                proxy_endpoint: a.proxy_endpoint().map(str::to_string),
                token: a.authorization_token().map(str::to_string),
                expires_at: a.expires_at().and_then(|t| Timestamp::from_second(t.secs()).ok()),
            })
            .collect();
        let now = self.clock.now();
        let (registries, expiration) = registry_auths(&answer, &req.ecr_registry_ids, &region, now)?;
        Ok(Credentials {
            secret_access_key: String::new(),
            session_token: String::new(),
            issued_at: now,
            expiration,
            registries,
            ..session
        })
    }

    async fn issue_inner(&self, req: &IssueRequest) -> Result<Issued, StsError> {
        let Issued { creds } = self.issue_session(req).await?;
        if req.ecr_registry_ids.is_empty() {
            return Ok(Issued { creds });
        }
        Ok(Issued {
            creds: self.ecr_token(req, creds).await?,
        })
    }

    async fn issue_session(&self, req: &IssueRequest) -> Result<Issued, StsError> {
        match self.issue_once(req, req.duration_seconds).await {
            Ok(creds) => Ok(Issued { creds }),
            // Every role allows an hour: rather than failing forever, issue for an hour and
            // say so. (An MFA code cannot be sent twice, so MFA calls are not retried.)
            Err(err)
                if req.method.assumes_role()
                    && req.mfa.is_none()
                    && req.duration_seconds.is_some_and(|d| d > SAFE_ROLE_DURATION)
                    && duration_refusal(&err).is_some() =>
            {
                let mut creds = self.issue_once(req, Some(SAFE_ROLE_DURATION)).await?;
                creds.note = Some(duration_note(
                    req.duration_seconds.unwrap_or_default(),
                    duration_refusal(&err).expect("checked above"),
                ));
                Ok(Issued { creds })
            }
            Err(err) => Err(err),
        }
    }
}

/// What the Ready message says when the duration fell back to an hour.
pub fn duration_note(asked: i32, refusal: DurationRefusal) -> String {
    match refusal {
        DurationRefusal::RoleMaximum => format!(
            "durationSeconds {asked} exceeds the role's maximum session duration; issued for {SAFE_ROLE_DURATION} s"
        ),
        DurationRefusal::RoleChaining => format!(
            "durationSeconds {asked} exceeds the one hour AWS allows role chaining (the operator's own identity is a role session, e.g. IRSA or Pod Identity); issued for {SAFE_ROLE_DURATION} s"
        ),
    }
}

impl Issuer for StsClient {
    fn issue<'a>(&'a self, req: &'a IssueRequest) -> BoxFuture<'a, Result<Issued, StsError>> {
        Box::pin(self.issue_inner(req))
    }
}

/// One entry of an ECR GetAuthorizationToken answer.
#[derive(Clone, Default)]
pub struct EcrAuthorization {
    pub proxy_endpoint: Option<String>,
    pub token: Option<String>,
    pub expires_at: Option<Timestamp>,
}

/// ECR tokens this close to their expiry (or past it) are refused rather than written:
/// refreshing them would start over at once.
const MIN_TOKEN_LIFETIME: jiff::SignedDuration = jiff::SignedDuration::from_secs(300);

/// The registry host API.md promises for a registry ID.
pub fn registry_host(registry_id: &str, region: &str) -> String {
    format!("{registry_id}.dkr.ecr.{region}.amazonaws.com")
}

/// Turns an ECR answer into the pull credentials for `registry_ids` (sorted by host) and
/// their earliest expiry. A registry without its own entry gets the token of a single-entry
/// answer (one token serves every registry the session may pull from). A token that is
/// missing, undated or about to expire is an error, never a Secret.
pub fn registry_auths(
    answer: &[EcrAuthorization],
    registry_ids: &[String],
    region: &str,
    now: Timestamp,
) -> Result<(Vec<crate::render::RegistryAuth>, Timestamp), StsError> {
    let failed = |code: &str, message: String| StsError {
        reason: Reason::StsUnavailable,
        operation: "GetAuthorizationToken",
        code: code.into(),
        message,
    };
    let host_of = |a: &EcrAuthorization| {
        a.proxy_endpoint
            .as_deref()
            .map(|e| e.trim_start_matches("https://").trim_end_matches('/').to_string())
    };
    let mut registries = Vec::new();
    let mut expiration: Option<Timestamp> = None;
    for id in registry_ids {
        let host = registry_host(id, region);
        let entry = answer
            .iter()
            .find(|a| host_of(a).as_deref() == Some(host.as_str()))
            .or_else(|| (answer.len() == 1).then(|| &answer[0]))
            .ok_or_else(|| failed("NoToken", format!("ECR answered without a token for registry {host}")))?;
        let (Some(token), Some(expires_at)) = (&entry.token, entry.expires_at) else {
            return Err(failed(
                "NoToken",
                format!("ECR answered without a dated token for registry {host}"),
            ));
        };
        if expires_at < now + MIN_TOKEN_LIFETIME {
            return Err(failed(
                "TokenExpired",
                format!(
                    "ECR answered with a token for registry {host} that expires at {}, too soon to use; not written",
                    crate::render::rfc3339(expires_at)
                ),
            ));
        }
        expiration = Some(expiration.map_or(expires_at, |e| e.min(expires_at)));
        registries.push(crate::render::RegistryAuth {
            host,
            auth: token.clone(),
        });
    }
    registries.sort_by(|a, b| a.host.cmp(&b.host));
    let expiration = expiration.ok_or_else(|| failed("NoRegistry", "no ECR registry requested".into()))?;
    Ok((registries, expiration))
}

/// SDK credentials for a session the operator obtained (a chain's hop, an ECR call).
fn acting_as(creds: &Credentials) -> aws_credential_types::Credentials {
    aws_credential_types::Credentials::new(
        &creds.access_key_id,
        &creds.secret_access_key,
        Some(creds.session_token.clone()),
        None,
        "kube-sts-session",
    )
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
    let service = if operation == "GetAuthorizationToken" {
        "ECR"
    } else {
        "STS"
    };
    let message = match (&err, err.message()) {
        (_, Some(m)) => m.to_string(),
        (SdkError::DispatchFailure(_), _) => format!("cannot reach {service} (connection failed)"),
        (SdkError::TimeoutError(_), _) => format!("{service} did not answer in time"),
        (SdkError::ResponseError(_), _) => format!("{service} sent an unreadable response"),
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
    issued_at: Timestamp,
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
        issued_at,
        expiration,
        arn,
        note: None,
        registries: Vec::new(),
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
            ecr_registry_ids: vec![],
            source_credentials: None,
        }
    }

    fn ecr(endpoint: &str, token: &str, expires_at: &str) -> EcrAuthorization {
        EcrAuthorization {
            proxy_endpoint: Some(endpoint.into()),
            token: Some(token.into()),
            expires_at: Some(expires_at.parse().unwrap()),
        }
    }

    #[test]
    fn ecr_answer_becomes_one_entry_per_registry() {
        let now: Timestamp = "2026-11-26T09:00:00Z".parse().unwrap();
        let ids = vec!["222222222222".to_string(), "111111111111".to_string()];
        let answer = [
            ecr(
                "https://111111111111.dkr.ecr.eu-west-1.amazonaws.com",
                "b25l",
                "2026-11-26T21:00:00Z",
            ),
            ecr(
                "https://222222222222.dkr.ecr.eu-west-1.amazonaws.com",
                "dHdv",
                "2026-11-26T20:00:00Z",
            ),
        ];
        let (registries, expiration) = registry_auths(&answer, &ids, "eu-west-1", now).unwrap();
        let hosts: Vec<_> = registries.iter().map(|r| (r.host.as_str(), r.auth.as_str())).collect();
        assert_eq!(
            hosts,
            [
                ("111111111111.dkr.ecr.eu-west-1.amazonaws.com", "b25l"),
                ("222222222222.dkr.ecr.eu-west-1.amazonaws.com", "dHdv")
            ]
        );
        assert_eq!(expiration, "2026-11-26T20:00:00Z".parse::<Timestamp>().unwrap());

        // One token for every registry when ECR answers with a single entry.
        let single = [ecr(
            "https://111111111111.dkr.ecr.eu-west-1.amazonaws.com",
            "b25l",
            "2026-11-26T21:00:00Z",
        )];
        let (registries, _) = registry_auths(&single, &ids, "eu-west-1", now).unwrap();
        assert_eq!(registries.len(), 2);
        assert!(registries.iter().all(|r| r.auth == "b25l"));
        // Two entries, neither for the registry asked: no guessing.
        let other = [
            ecr(
                "https://333333333333.dkr.ecr.eu-west-1.amazonaws.com",
                "x",
                "2026-11-26T21:00:00Z",
            ),
            ecr(
                "https://444444444444.dkr.ecr.eu-west-1.amazonaws.com",
                "y",
                "2026-11-26T21:00:00Z",
            ),
        ];
        assert_eq!(
            registry_auths(&other, &ids, "eu-west-1", now).unwrap_err().code,
            "NoToken"
        );
    }

    #[test]
    fn expired_or_undated_ecr_tokens_are_refused() {
        let now: Timestamp = "2026-11-26T09:00:00Z".parse().unwrap();
        let ids = vec!["111111111111".to_string()];
        let host = "https://111111111111.dkr.ecr.eu-west-1.amazonaws.com";
        // What moto answers: a fixed date in 2015.
        let err = registry_auths(&[ecr(host, "t", "2015-01-01T00:00:00Z")], &ids, "eu-west-1", now).unwrap_err();
        assert_eq!(
            (err.reason, err.code.as_str()),
            (Reason::StsUnavailable, "TokenExpired")
        );
        assert!(err.message.contains("2015-01-01T00:00:00Z"), "{}", err.message);
        assert!(registry_auths(&[ecr(host, "t", "2026-11-26T09:04:00Z")], &ids, "eu-west-1", now).is_err());
        let undated = EcrAuthorization {
            expires_at: None,
            ..ecr(host, "t", "2026-11-26T21:00:00Z")
        };
        assert!(registry_auths(&[undated], &ids, "eu-west-1", now).is_err());
        assert!(registry_auths(&[], &ids, "eu-west-1", now).is_err());
    }

    #[test]
    fn ecr_denial_hint_names_the_permission() {
        let msg = access_denied_hint(
            &req(),
            "User: arn:aws:sts::1:assumed-role/r/s is not authorized to perform: ecr:GetAuthorizationToken",
        );
        assert!(
            msg.contains("permissions policy must allow ecr:GetAuthorizationToken"),
            "{msg}"
        );
        assert!(!msg.contains("trust policy"), "{msg}");
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
        assert_eq!(duration_refusal(&err), Some(DurationRefusal::RoleMaximum));
        // What AWS answers a role session (IRSA, Pod Identity) asking for more than an hour.
        let chained = StsError {
            message:
                "The requested DurationSeconds exceeds the 1 hour session limit for roles assumed by role chaining."
                    .into(),
            ..err.clone()
        };
        assert_eq!(duration_refusal(&chained), Some(DurationRefusal::RoleChaining));
        assert!(duration_note(7200, DurationRefusal::RoleChaining).contains("role chaining"));
        let other = StsError {
            message: "1 validation error detected".into(),
            ..err
        };
        assert_eq!(duration_refusal(&other), None);
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
