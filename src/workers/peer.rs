//! A peer system (UCS, GWS) as the integration workers call it: where it is per tenant, one
//! JSON call with its outcome classified and measured, and a circuit per target.
//!
//! Each target (the global URL, a tenant's own) has its own circuit. While a target keeps
//! failing its circuit opens: calls to it are refused at once, without calling, with a
//! retryable failure that does not count against the event's retry limit and asks it to wait
//! until the next probe ([`PeerFailure::Retry`]'s `wait`); one caller probes after a growing,
//! jittered pause, and the role's `nexus_worker_paused` gauge is 1 while any target is open.
//! Refused events go to the role's retry backlog and their lanes move on, so one tenant's
//! failing target holds back no other tenant. Failures count per subject (the conversation a
//! call is for): it takes failures for `pause_after_failures` different conversations, with no
//! success between, to open it, so one conversation the peer keeps failing (retried from the
//! backlog) pauses nobody.
//!
//! A failure says whether it [`counts`](PeerFailure::Retry) against the event's retry limit:
//! only when the same target answered another call lately and the call was not a probe of a
//! paused target. A peer that is down for everyone (an outage, a night with one conversation)
//! makes failures that do not count, so retries never run out because of it.
//!
//! A target that refuses nexus itself, not the request, is taken for down too (outcome
//! `misconfigured`): 401 and 407 (the credential), and, for a peer with an identity check
//! ([`Peer::with_identity_check`]: GWS's own user), a 403 or a write's 404 only when the
//! identity is refused as well (a rotated key, a
//! wrong base path; else the refusal is the request's: the agent out of the chat, a chat GWS
//! does not know). Their events wait in the backlog while the target is paused and go once it
//! takes nexus again (a fixed credential or URL), instead of each being dead-lettered.
//! A peer with no such check (UCS) has its caller say what a write's 404 means
//! ([`NotFound`]): a wrong base path answers 404 to everything, and taken for each request's
//! refusal it would dead-letter every event.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::bus::consumer::HandleError;
use crate::telemetry::metrics as m;

/// Where one peer is, globally or for one tenant.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PeerTarget {
    /// Base URL (`https://ucs.example.com`); "" = not configured.
    pub url: String,
    /// Secret: sent as `Authorization: Bearer <credential>`; "" = no header. Redacted when printed.
    pub credential: String,
    /// Per-call timeout in ms; 0 = the role's `timeout_ms`.
    pub timeout_ms: u64,
}

/// The identity check's timeout unless configured (ms): the check is a small read that a
/// peer which is up answers at once, and it comes on top of the call it follows, within the
/// same try; a few seconds leave a slow peer room without making that try much longer.
pub const DEFAULT_IDENTITY_TIMEOUT_MS: u64 = 2_000;

/// How long the identity check after a call with `timeout_ms` may take: `configured` (else
/// [`DEFAULT_IDENTITY_TIMEOUT_MS`]), never longer than the call itself may.
fn identity_timeout_ms(configured: Option<u64>, timeout_ms: u64) -> u64 {
    configured
        .unwrap_or(DEFAULT_IDENTITY_TIMEOUT_MS)
        .min(timeout_ms)
        .max(1)
}

/// A peer's config: the global target, per-tenant overrides and the pause circuit.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PeerConfig {
    /// Base URL for every tenant without an override; "" = only the tenants listed below.
    pub url: String,
    /// Secret: `Authorization: Bearer` value for the global target.
    pub credential: String,
    /// Per-call timeout in ms.
    pub timeout_ms: u64,
    /// Timeout in ms of the check that tells whose a refusal is: GWS's `GET /api/v2/me`
    /// after a 403 or a write's 404 ([`Peer::with_identity_check`]), UCS's IdentifyContact
    /// asked again after a 404 ([`NotFound::Ask`]); never more than the target's own timeout;
    /// unset = [`DEFAULT_IDENTITY_TIMEOUT_MS`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity_timeout_ms: Option<u64>,
    /// Failed calls (5xx, timeout, refused) for this many different conversations, with no
    /// success between, pause the role.
    pub pause_after_failures: u32,
    /// First pause before a probe call; doubles per failed probe, with jitter.
    pub pause_initial_ms: u64,
    /// Longest pause between probes.
    pub pause_max_ms: u64,
    /// First wait before an event whose call failed is tried again from the backlog; doubles
    /// per failed try (with jitter) up to `retry_max_ms`.
    pub retry_initial_ms: u64,
    /// Longest wait between tries of a backlogged event.
    pub retry_max_ms: u64,
    /// Counted failures after which a backlogged event is dead-lettered (`retries_exhausted`)
    /// and its conversation goes on; a failure counts only while the target answers other
    /// calls ([`PeerFailure::Retry`]). 0 = never.
    pub retry_max_attempts: u32,
    /// Per-tenant targets, by tenant id; they win over the global one.
    pub tenants: BTreeMap<String, PeerTarget>,
}

impl Default for PeerConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            credential: String::new(),
            timeout_ms: 10_000,
            identity_timeout_ms: None,
            pause_after_failures: 3,
            pause_initial_ms: 1_000,
            pause_max_ms: 30_000,
            retry_initial_ms: 1_000,
            retry_max_ms: 300_000,
            retry_max_attempts: 20,
            tenants: BTreeMap::new(),
        }
    }
}

/// What `Debug` shows of a credential: whether there is one, never its value (a `?target` in
/// a log line or a test's failure message must not print it).
fn shown_credential(credential: &str) -> &'static str {
    if credential.is_empty() {
        ""
    } else {
        "<redacted>"
    }
}

impl std::fmt::Debug for PeerTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerTarget")
            .field("url", &crate::http_client::shown_url(&self.url))
            .field("credential", &shown_credential(&self.credential))
            .field("timeout_ms", &self.timeout_ms)
            .finish()
    }
}

impl std::fmt::Debug for PeerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerConfig")
            .field("url", &crate::http_client::shown_url(&self.url))
            .field("credential", &shown_credential(&self.credential))
            .field("timeout_ms", &self.timeout_ms)
            .field("identity_timeout_ms", &self.identity_timeout_ms)
            .field("pause_after_failures", &self.pause_after_failures)
            .field("pause_initial_ms", &self.pause_initial_ms)
            .field("pause_max_ms", &self.pause_max_ms)
            .field("retry_initial_ms", &self.retry_initial_ms)
            .field("retry_max_ms", &self.retry_max_ms)
            .field("retry_max_attempts", &self.retry_max_attempts)
            .field("tenants", &self.tenants)
            .finish()
    }
}

impl PeerConfig {
    /// The target of `tenant`, `None` when the peer is not configured for it.
    pub fn target(&self, tenant: &str) -> Option<PeerTarget> {
        let t = match self.tenants.get(tenant) {
            Some(t) => t.clone(),
            None => PeerTarget {
                url: self.url.clone(),
                credential: self.credential.clone(),
                timeout_ms: self.timeout_ms,
            },
        };
        if t.url.is_empty() {
            return None;
        }
        Some(PeerTarget {
            url: t.url.trim_end_matches('/').to_string(),
            timeout_ms: if t.timeout_ms == 0 {
                self.timeout_ms
            } else {
                t.timeout_ms
            },
            ..t
        })
    }

    /// Whether `tenant` has a target ([`Self::target`] without building it).
    pub fn has_target(&self, tenant: &str) -> bool {
        match self.tenants.get(tenant) {
            Some(t) => !t.url.is_empty(),
            None => !self.url.is_empty(),
        }
    }

    /// Checks every URL; the error names the key.
    pub fn validate(&self, key: &str) -> Result<(), String> {
        let check = |k: String, url: &str| -> Result<(), String> {
            if url.is_empty() {
                return Ok(());
            }
            match reqwest::Url::parse(url) {
                // Paths are appended to the URL: a query or fragment would take them in.
                Ok(u) if u.query().is_some() || u.fragment().is_some() => Err(format!(
                    "{k}: `{}` has a query or fragment; the peer's paths are appended to the \
                     URL, so give the base URL only (credentials go in `credential`)",
                    crate::http_client::shown_url(url)
                )),
                Ok(u) if matches!(u.scheme(), "http" | "https") => Ok(()),
                _ => Err(format!(
                    "{k}: `{}` is not an http(s) URL",
                    crate::http_client::shown_url(url)
                )),
            }
        };
        // A credential a header cannot carry would fail every call before it is sent: a config
        // error, not a peer that is down. The message never shows the credential.
        let credential = |k: String, c: &str| -> Result<(), String> {
            if c.is_empty()
                || reqwest::header::HeaderValue::from_str(&format!("Bearer {c}")).is_ok()
            {
                return Ok(());
            }
            Err(format!(
                "{k}: holds a character an HTTP header cannot carry (a control character or \
                 line break); it is sent as `Authorization: Bearer <credential>`"
            ))
        };
        if self.retry_initial_ms == 0 {
            return Err(format!("{key}.retry_initial_ms: must be at least 1"));
        }
        check(format!("{key}.url"), &self.url)?;
        credential(format!("{key}.credential"), &self.credential)?;
        for (tenant, t) in &self.tenants {
            check(format!("{key}.tenants.{tenant}.url"), &t.url)?;
            credential(format!("{key}.tenants.{tenant}.credential"), &t.credential)?;
        }
        Ok(())
    }

    /// The call timeout of every configured target (its own, else the global one), with the
    /// key a startup error names for it (under `key`, the peer's table).
    pub fn call_timeouts(&self, key: &str) -> Vec<(String, u64)> {
        let global = (!self.url.is_empty()).then(|| (format!("{key}.timeout_ms"), self.timeout_ms));
        let tenants = self
            .tenants
            .iter()
            .filter(|(_, t)| !t.url.is_empty())
            .map(|(id, t)| match t.timeout_ms {
                0 => (
                    format!("{key}.timeout_ms (for tenant {id})"),
                    self.timeout_ms,
                ),
                own => (format!("{key}.tenants.{id}.timeout_ms"), own),
            });
        global.into_iter().chain(tenants).collect()
    }

    /// Checks every configured target (under `key`, the peer's table) against `try_time`, how
    /// long one try may run: `calls` calls, each followed by its check (see
    /// [`Self::identity_timeout_ms`]), one after another, must end within it, as `calls_are`
    /// says them. A try cut short does not count, so one that never fits would be tried for
    /// good. The error names the target's timeout key.
    pub fn validate_try(
        &self,
        key: &str,
        calls: u64,
        calls_are: &str,
        try_time: Duration,
    ) -> Result<(), String> {
        let most = u64::try_from(try_time.as_millis()).unwrap_or(u64::MAX);
        for (k, timeout) in self.call_timeouts(key) {
            let check = self.identity_timeout_for(timeout);
            let total = calls.saturating_mul(timeout.saturating_add(check));
            if timeout == 0 || total >= most {
                return Err(format!(
                    "{k}: {timeout} ms, with {key}.identity_timeout_ms at {check} ms (at most \
                     the call's timeout): {calls_are}, {total} ms, which must be under \
                     consumer.handler_timeout_ms ({most} ms), or a try that takes it is cut \
                     short and never counts; lower the timeouts or raise the handler timeout"
                ));
            }
        }
        Ok(())
    }

    /// How long the identity check after a call of `timeout_ms` may take (see
    /// [`Self::identity_timeout_ms`]).
    pub fn identity_timeout_for(&self, timeout_ms: u64) -> u64 {
        identity_timeout_ms(self.identity_timeout_ms, timeout_ms)
    }

    /// Replaces every credential with `with` (for printing the config).
    /// Credentials written into URLs go too: the user info and every query value.
    pub fn redact(&mut self, with: &str) {
        if !self.credential.is_empty() {
            self.credential = with.to_string();
        }
        self.url = crate::http_client::shown_url(&self.url);
        for t in self.tenants.values_mut() {
            if !t.credential.is_empty() {
                t.credential = with.to_string();
            }
            t.url = crate::http_client::shown_url(&t.url);
        }
    }
}

/// Whether the answer came from the URL asked, credentials aside (the client takes `user:pass@`
/// out of the URL it sends, into the `Authorization` header).
fn same_place(asked: &str, answered: &reqwest::Url) -> bool {
    let plain = |mut u: reqwest::Url| {
        let _ = u.set_username("");
        let _ = u.set_password(None);
        u
    };
    reqwest::Url::parse(asked).is_ok_and(|u| plain(u) == plain(answered.clone()))
}

/// Why a call did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum PeerFailure {
    /// 5xx, 408, 429, timeout, connection refused, an unreadable answer: worth another try.
    #[error("{detail}")]
    Retry {
        detail: String,
        /// Whether the failure is about this request (the target answered other calls within
        /// `retry_max_ms` and this call was no probe of a paused target), so retry limits
        /// count it.
        counts: bool,
        /// How long the peer asked to wait (`Retry-After`).
        wait: Option<Duration>,
        /// Whether the call surely took no effect at the peer: it was refused unsent (a paused
        /// target) or answered with a 4xx (the target refusing nexus itself, 408, 429, a
        /// refusal nobody could yet tell whose). `false` when that is unknown: a timeout or a
        /// connection lost after sending, a 5xx (a gateway's 502 or 504 may stand for a call
        /// the peer still runs), a 2xx that is not the peer's answer.
        not_applied: bool,
    },
    /// Any other non-2xx: the peer refuses this request and always will.
    #[error("{peer} answered {status}: {detail}")]
    Rejected {
        peer: &'static str,
        status: u16,
        /// The answer's body as errors may quote it: without the target's secrets, control
        /// characters escaped, at most 512 bytes.
        detail: String,
        /// The identity check, made with the call's headers, was refused as well: the peer
        /// refuses whoever those headers name (GWS: the agent), not only this request, so a
        /// refused read says nothing about what the request's call did.
        identity_refused: bool,
    },
}

impl PeerFailure {
    /// A retryable failure that counts, whose call may have taken effect.
    pub fn retry(detail: String) -> Self {
        PeerFailure::Retry {
            detail,
            counts: true,
            wait: None,
            not_applied: false,
        }
    }

    /// Whether the failed call surely took no effect (see [`PeerFailure::Retry`]); a
    /// rejection is a refusal, so none did.
    pub fn not_applied(&self) -> bool {
        match self {
            PeerFailure::Retry { not_applied, .. } => *not_applied,
            PeerFailure::Rejected { .. } => true,
        }
    }

    /// The consumer's view: retry (no earlier than the peer asked), or dead-letter with
    /// `reason`.
    pub fn into_handle_error(self, reason: &'static str) -> HandleError {
        match self {
            PeerFailure::Retry {
                detail,
                counts: true,
                wait: None,
                ..
            } => HandleError::Retry(detail),
            PeerFailure::Retry {
                detail,
                counts,
                wait,
                ..
            } => HandleError::RetryLater {
                reason: detail,
                not_before_ms: chrono::Utc::now().timestamp_millis().saturating_add(
                    i64::try_from(wait.unwrap_or_default().as_millis()).unwrap_or(i64::MAX),
                ),
                counts,
            },
            rejected => HandleError::Reject {
                reason,
                detail: rejected.to_string(),
            },
        }
    }
}

/// One peer of one role: its client, a circuit per target, and metrics.
pub struct Peer {
    role: &'static str,
    name: &'static str,
    client: reqwest::Client,
    settings: CircuitSettings,
    /// By target (URL, timeout, credential digest); as many as the config names.
    circuits: Arc<Circuits>,
    /// Targets whose circuit is open (the gauge is 1 while any is).
    open: Arc<OpenTargets>,
    /// A failure counts only if the target answered another call this recently.
    answered_within: Duration,
    /// A path that any caller nexus may act for can read (GWS: `/api/v2/me`), asked after a 403
    /// or a write's 404 to tell a refusal of nexus from one of the request.
    identity: Option<&'static str>,
    /// `identity_timeout_ms` as configured (see [`identity_timeout_ms`]).
    identity_timeout_ms: Option<u64>,
}

impl Peer {
    pub fn new(
        role: &'static str,
        name: &'static str,
        client: reqwest::Client,
        config: &PeerConfig,
    ) -> Self {
        metrics::gauge!(m::WORKER_PAUSED, "role" => role, "peer" => name).set(0.0);
        let circuits = Arc::new(Circuits::default());
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(report_paused(Arc::downgrade(&circuits), role, name));
            }
            Err(_) => tracing::warn!(
                role,
                peer = name,
                "no async runtime: nexus_worker_paused follows opens and closes only"
            ),
        }
        Self {
            role,
            name,
            client,
            settings: CircuitSettings::of(config),
            circuits,
            open: Arc::new(OpenTargets::new(role, name)),
            answered_within: Duration::from_millis(config.retry_max_ms.max(1)),
            identity: None,
            identity_timeout_ms: config.identity_timeout_ms,
        }
    }

    /// A peer whose 403s (to any call) and 404s (to writes) may be the request's own: the
    /// target's answer to a GET of `path` (with the call's credential and headers) tells.
    /// A 2xx there: the refusal is the request's (dead-lettered); 401, 403, 404 or 407 there
    /// too: the target refuses nexus (a credential or base path to fix), taken for down;
    /// anything else: a retryable failure, as the question went unanswered. Without one, a 403
    /// is the target's refusal of nexus and a 404 the request's.
    pub fn with_identity_check(mut self, path: &'static str) -> Self {
        self.identity = Some(path);
        self
    }

    /// Whether the role is paused on some target: its circuit refuses calls now, or its pause
    /// ended so lately that the refused callers have not come back to probe yet.
    pub fn paused(&self) -> bool {
        self.circuits.paused()
    }

    fn circuit(&self, target: &PeerTarget) -> Arc<Circuit> {
        // A target is its URL with its credential and timeout: tenants sharing one URL with
        // keys of their own are apart (one key's quota or expiry pauses no other), and the
        // credential is in the key only as a digest.
        let key = format!(
            "{}\u{1f}{}\u{1f}{:x}",
            target.url,
            target.timeout_ms,
            <sha2::Sha256 as sha2::Digest>::digest(target.credential.as_bytes())
        );
        let mut circuits = self.circuits.lock();
        if let Some(c) = circuits.get(&key) {
            return c.clone();
        }
        circuits
            .entry(key)
            .or_insert_with(|| {
                let host = reqwest::Url::parse(&target.url)
                    .ok()
                    .and_then(|u| u.host_str().map(str::to_string))
                    .unwrap_or_default();
                Arc::new(Circuit::new(
                    self.role,
                    self.name,
                    host,
                    self.settings,
                    self.open.clone(),
                ))
            })
            .clone()
    }

    /// How long a call to `target` would be refused now, unsent; `None` when it would go (as
    /// the probe, if the circuit is open). For a caller that must not start an attempt it
    /// cannot make (gws records its calls before making them).
    pub fn refuses(&self, target: &PeerTarget) -> Option<Duration> {
        let admission = self.circuit(target).peek();
        let wait = self.refusal_wait(admission, target)?;
        self.count_refused();
        Some(wait)
    }

    fn count_refused(&self) {
        metrics::counter!(m::PEER_CALLS_TOTAL, "role" => self.role, "peer" => self.name, "outcome" => "paused").increment(1);
    }

    /// The wait a refused call is given: until the pause ends, or while the probe is out, its
    /// call timeout; plus jitter up to the first pause (at most a second), so the refused
    /// events of one target do not all come back at the same instant.
    fn refusal_wait(&self, admission: Admission, target: &PeerTarget) -> Option<Duration> {
        let wait = match admission {
            Admission::Call | Admission::Probe => return None,
            Admission::Paused(wait) => wait,
            Admission::ProbeOut => Duration::from_millis(target.timeout_ms.max(1)),
        };
        let spread = self.settings.initial.min(REFUSAL_SPREAD);
        Some(wait + spread.mul_f64(rand::rng().random::<f64>()))
    }

    /// POSTs `body` to `{target.url}{path}` for `subject` (the conversation it is about) and
    /// returns the answer's JSON (`Null` for an empty body). While the target's circuit is open
    /// the call is refused unsent ([`Self::refuses`]), except for the probe.
    pub async fn post_json(
        &self,
        target: &PeerTarget,
        subject: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &serde_json::Value,
    ) -> Result<serde_json::Value, PeerFailure> {
        self.post_json_with(target, subject, path, headers, body, NotFound::Request)
            .await
    }

    /// [`Self::post_json`], the caller telling what a 404 to this call means (for a peer
    /// without an identity check; see [`NotFound`]).
    pub async fn post_json_with(
        &self,
        target: &PeerTarget,
        subject: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &serde_json::Value,
        not_found: NotFound<'_>,
    ) -> Result<serde_json::Value, PeerFailure> {
        let url = format!("{}{path}", target.url);
        let mut request = self
            .client
            .post(&url)
            .timeout(Duration::from_millis(target.timeout_ms.max(1)))
            .json(body);
        if !target.credential.is_empty() {
            request = request.bearer_auth(&target.credential);
        }
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        self.send(
            request,
            target,
            subject,
            &url,
            headers,
            Call::Write,
            not_found,
        )
        .await
    }

    /// GETs `{target.url}{path}` for `subject`; 404 is `Ok(None)`. A read that succeeds says
    /// nothing about whether writes would (a peer can serve reads while its writes fail), so it
    /// neither closes the circuit nor makes later failures count.
    pub async fn get_json(
        &self,
        target: &PeerTarget,
        subject: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<Option<serde_json::Value>, PeerFailure> {
        let url = format!("{}{path}", target.url);
        let mut request = self
            .client
            .get(&url)
            .timeout(Duration::from_millis(target.timeout_ms.max(1)));
        if !target.credential.is_empty() {
            request = request.bearer_auth(&target.credential);
        }
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        match self
            .send(
                request,
                target,
                subject,
                &url,
                headers,
                Call::Read,
                NotFound::Request,
            )
            .await
        {
            Ok(v) => Ok(Some(v)),
            Err(PeerFailure::Rejected { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    // `not_found` goes with `call` (a write's 404 only): one more argument than clippy likes.
    #[allow(clippy::too_many_arguments)]
    async fn send(
        &self,
        request: reqwest::RequestBuilder,
        target: &PeerTarget,
        subject: &str,
        url: &str,
        headers: &[(&str, &str)],
        call: Call,
        not_found: NotFound<'_>,
    ) -> Result<serde_json::Value, PeerFailure> {
        let asked = url;
        // What errors (logged, dead-letter headers) show: no credentials written in the URL.
        let url = crate::config::redact_url_password(url);
        let circuit = self.circuit(target);
        let admission = circuit.admit();
        let probing = match self.refusal_wait(admission, target) {
            None => admission == Admission::Probe,
            Some(wait) => {
                self.count_refused();
                return Err(PeerFailure::Retry {
                    detail: format!(
                        "{url}: not called, {} is paused after repeated failures (next probe in {} ms)",
                        self.name,
                        wait.as_millis()
                    ),
                    counts: false,
                    wait: Some(wait),
                    not_applied: true,
                });
            }
        };
        // A caller dropped mid-call (handler timeout, shutdown) must not hold the probe forever.
        let mut probe = ProbeGuard {
            circuit: &circuit,
            armed: probing,
        };
        let started = Instant::now();
        let mut retry_after = None;
        // A 4xx is the peer (or a proxy before it) declining the request: nothing took effect,
        // whatever the refusal is taken for.
        let mut refused = false;
        let result = match request.send().await {
            Err(e) if e.is_timeout() => {
                Err(("timeout", PeerFailure::retry(format!("{url}: timed out"))))
            }
            // Without reqwest's copy of the URL, which keeps a query's credentials; with the
            // causes (a certificate, DNS, a refused connection), which reqwest's text leaves out.
            Err(e) => Err((
                "failed",
                PeerFailure::retry(format!("{url}: {}", crate::http_client::describe(e))),
            )),
            Ok(response) => {
                let status = response.status();
                refused = status.is_client_error();
                // A 2xx reached through a redirect, or an HTML page (a gateway's login page
                // once its session lapsed), is not the peer's answer.
                let final_url = response.url().clone();
                let not_the_peer = !same_place(asked, &final_url)
                    || response
                        .headers()
                        .get(reqwest::header::CONTENT_TYPE)
                        .and_then(|v| v.to_str().ok())
                        .is_some_and(is_html);
                retry_after = crate::http_client::retry_after(&response);
                let body = crate::http_client::read_capped(response, MAX_ANSWER_BYTES).await;
                let text = match &body {
                    Ok(bytes) => String::from_utf8_lossy(bytes).into_owned(),
                    Err(_) => String::new(),
                };
                if let (true, Err(e)) = (status.is_success(), &body) {
                    // A 2xx whose body did not arrive whole says nothing yet: try again.
                    Err(("failed", PeerFailure::retry(format!("{url}: {e}"))))
                } else if status.is_success() && not_the_peer {
                    // Whatever its body (empty, `{}`): taken as success, an effect would be
                    // marked done that never reached the peer (a POST redirected is a GET).
                    Err((
                        "failed",
                        PeerFailure::retry(format!(
                            "{url}: a 2xx that is not the peer's answer (redirected to {}, or an HTML page)",
                            crate::config::redact_url_password(final_url.as_str())
                        )),
                    ))
                } else if status.is_success() {
                    // Any 2xx is the peer's success: a body that is not JSON (a proxy's `OK`)
                    // comes back as a string, for the callers that need an answer to refuse.
                    // Counted as a failure, it would pause the peer for good, every probe
                    // answered the same way.
                    match serde_json::from_str(&text) {
                        Ok(v) => Ok(v),
                        Err(_) if text.trim().is_empty() => Ok(serde_json::Value::Null),
                        Err(_) => Ok(serde_json::Value::String(text)),
                    }
                } else if status.is_redirection() {
                    // Not followed (the body would go elsewhere): a URL to fix, retried until
                    // it is, the role pausing meanwhile like for a peer that is down.
                    Err((
                        "failed",
                        PeerFailure::retry(format!(
                            "{url} answered {status}; redirects are not followed: configure the address it points to"
                        )),
                    ))
                } else if status.is_server_error() || matches!(status.as_u16(), 408 | 429) {
                    Err((
                        "failed",
                        PeerFailure::retry(format!("{url} answered {status}")),
                    ))
                } else {
                    let quoted = answer_text(&text, target);
                    match self
                        .refusal(status.as_u16(), call, target, headers, not_found)
                        .await
                    {
                        Refusal::Request { identity_refused } => Err((
                            "rejected",
                            PeerFailure::Rejected {
                                peer: self.name,
                                status: status.as_u16(),
                                detail: quoted,
                                identity_refused,
                            },
                        )),
                        // Taken for down, like a 5xx: the circuit counts it, the event waits.
                        Refusal::Caller(also) => Err((
                            "misconfigured",
                            PeerFailure::retry(format!(
                                "{url} answered {status}{also}: {} refuses nexus itself, not the \
                                 request (its credential or base URL to fix){}",
                                self.name,
                                if quoted.is_empty() {
                                    String::new()
                                } else {
                                    format!(": {quoted}")
                                }
                            )),
                        )),
                        Refusal::Unknown(why) => Err((
                            "failed",
                            PeerFailure::retry(format!("{url} answered {status}; {why}")),
                        )),
                    }
                }
            }
        };
        metrics::histogram!(m::PEER_CALL_SECONDS, "role" => self.role, "peer" => self.name)
            .record(started.elapsed().as_secs_f64());
        let outcome = match &result {
            Ok(_) => "ok",
            Err((outcome, _)) => *outcome,
        };
        metrics::counter!(m::PEER_CALLS_TOTAL, "role" => self.role, "peer" => self.name, "outcome" => outcome).increment(1);
        probe.armed = false;
        match result {
            // A refusal is an answer: the peer is up.
            Ok(_) | Err((_, PeerFailure::Rejected { .. })) => {
                match call {
                    Call::Write => circuit.succeeded(),
                    Call::Read if probing => circuit.abandoned(),
                    Call::Read => {}
                }
                result.map_err(|(_, e)| e)
            }
            Err((_, PeerFailure::Retry { detail, .. })) => {
                // Decided before this failure is recorded: it may open the circuit itself.
                let counts =
                    !probing && circuit.answered_since_last_failure(subject, self.answered_within);
                circuit.failed(subject, retry_after, probing);
                Err(PeerFailure::Retry {
                    detail,
                    counts,
                    wait: retry_after.map(|w| w.min(self.settings.max_wait)),
                    not_applied: refused,
                })
            }
        }
    }
}

/// What a write's 404 means at a peer without an identity check: only the caller knows
/// whether its call can be answered 404 for the request's own sake (UCS: see
/// `workers::history::ucs`). A wrong base path, or a proxy with no such route, answers 404 to
/// everything; taken for the request's, it would dead-letter every event.
#[derive(Debug, Clone, Copy)]
pub enum NotFound<'a> {
    /// Something the request names is unknown: the request's refusal (dead-lettered).
    Request,
    /// The call has no 404 at the right address: the target refuses nexus's URL (a base path
    /// to fix), taken for down (`misconfigured`).
    Address,
    /// Tell by POSTing `body` to `path`, a call with no 404 at the right address. A 404 (or a
    /// 401, 407) there too is the address's; the peer answering it otherwise (2xx, another
    /// 4xx) shows the address right, and the first 404 was the request's; no answer: a
    /// retryable failure, nobody's refusal yet.
    Ask {
        path: &'a str,
        body: &'a serde_json::Value,
    },
}

/// Whose a 4xx refusal is.
enum Refusal {
    /// The request's: dead-lettered. `identity_refused`: see [`PeerFailure::Rejected`].
    Request { identity_refused: bool },
    /// nexus's (its credential, its base URL), with what the identity check said.
    Caller(String),
    /// Unknown: the identity check got no answer.
    Unknown(String),
}

impl Peer {
    /// Whose refusal `status` is (a 4xx other than 408 and 429) of a `call` to `target` made
    /// with `headers` (see [`Self::with_identity_check`]; without one, a write's 404 is as
    /// `not_found` says).
    async fn refusal(
        &self,
        status: u16,
        call: Call,
        target: &PeerTarget,
        headers: &[(&str, &str)],
        not_found: NotFound<'_>,
    ) -> Refusal {
        // Only an authentication refusal (401, 407) is surely nexus's. A 403 may be one
        // request's (a policy refusal of one document, an agent GWS no longer knows): taken
        // for nexus's only when the identity check is refused as an authentication too, or,
        // for a read, at all (a read is never dead-lettered for it; see gws's reconciliation).
        match (status, self.identity) {
            (401 | 407, _) => Refusal::Caller(String::new()),
            (403, Some(path)) => self.identity_refusal(path, target, headers).await,
            (404, Some(path)) if call == Call::Write => {
                self.identity_refusal(path, target, headers).await
            }
            (404, None) if call == Call::Write => match not_found {
                NotFound::Request => Refusal::Request {
                    identity_refused: false,
                },
                NotFound::Address => Refusal::Caller(String::new()),
                NotFound::Ask { path, body } => {
                    self.address_refusal(path, body, target, headers).await
                }
            },
            _ => Refusal::Request {
                identity_refused: false,
            },
        }
    }

    /// Sends a check that tells whose a refusal is (`request` to `asked`, with the call's
    /// credential and `headers`), within `timeout` (the identity timeout, or what a check
    /// asked twice has left of it): a check comes on top of the call
    /// it follows, within one try (see `workers::gws::config::validate_try` and
    /// `workers::history::config::validate_try`). Answers its status and whether the answer is
    /// the peer's own (no HTML page, not redirected elsewhere); a check that got no answer is
    /// an unknown refusal, named by `what` (the check and what it is for).
    async fn check(
        &self,
        request: reqwest::RequestBuilder,
        asked: &str,
        target: &PeerTarget,
        headers: &[(&str, &str)],
        what: &str,
        timeout: Duration,
    ) -> Result<(reqwest::StatusCode, bool), Refusal> {
        let mut request = request.timeout(timeout);
        if !target.credential.is_empty() {
            request = request.bearer_auth(&target.credential);
        }
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        let response = request.send().await.map_err(|e| {
            Refusal::Unknown(format!(
                "{what} failed: {}",
                crate::http_client::describe(e)
            ))
        })?;
        let html = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(is_html);
        Ok((
            response.status(),
            !html && same_place(asked, response.url()),
        ))
    }

    /// Asks `path` (a call with no 404 at the right address, see [`NotFound::Ask`]) whether a
    /// 404 `target` gave is its address's: not the peer there, or no such route.
    async fn address_refusal(
        &self,
        path: &str,
        body: &serde_json::Value,
        target: &PeerTarget,
        headers: &[(&str, &str)],
    ) -> Refusal {
        let asked = format!("{}{path}", target.url);
        let what = format!("POST {path}, to tell whether the address is wrong,");
        let request = self.client.post(&asked).json(body);
        let budget = Duration::from_millis(identity_timeout_ms(
            self.identity_timeout_ms,
            target.timeout_ms,
        ));
        let (status, peers_answer) = match self
            .check(request, &asked, target, headers, &what, budget)
            .await
        {
            Ok(answer) => answer,
            Err(unknown) => return unknown,
        };
        if matches!(status.as_u16(), 401 | 404 | 407) {
            Refusal::Caller(format!(", and POST {path} {status}"))
        } else if peers_answer
            && (status.is_success()
                || (status.is_client_error() && !matches!(status.as_u16(), 408 | 429)))
        {
            // The peer took the call or refused it for its own reasons: the address is its,
            // so the 404 was the request's.
            Refusal::Request {
                identity_refused: false,
            }
        } else {
            Refusal::Unknown(format!("{what} answered {status}"))
        }
    }

    /// Asks `path` whether `target` still takes nexus's credential and address, with the
    /// call's headers (GWS's `X-Agent-Id`): a 2xx, the refusal is the request's; 401 or 407,
    /// the target refuses nexus; 403, it refuses whoever the headers name (an agent GWS no
    /// longer knows), so the request's, for one agent must not pause the target for everyone;
    /// 404, asked again without the call's headers, within what is left of the same check
    /// time: a 404 there too is the address's (a wrong base path answers 404 to everything),
    /// any other answer makes the first one the named caller's.
    async fn identity_refusal(
        &self,
        path: &str,
        target: &PeerTarget,
        headers: &[(&str, &str)],
    ) -> Refusal {
        let asked = format!("{}{path}", target.url);
        let what = format!("GET {path}, to tell whether it refuses nexus itself,");
        let budget = Duration::from_millis(identity_timeout_ms(
            self.identity_timeout_ms,
            target.timeout_ms,
        ));
        let started = Instant::now();
        let request = self.client.get(&asked);
        let (status, peers_answer) = match self
            .check(request, &asked, target, headers, &what, budget)
            .await
        {
            Ok(answer) => answer,
            Err(unknown) => return unknown,
        };
        let named_refused = Refusal::Request {
            identity_refused: true,
        };
        match status.as_u16() {
            _ if status.is_success() && peers_answer => Refusal::Request {
                identity_refused: false,
            },
            401 | 407 => Refusal::Caller(format!(", and GET {path} {status}")),
            403 if peers_answer => named_refused,
            404 if peers_answer && !headers.is_empty() => {
                let what = format!(
                    "GET {path} without the call's headers, to tell whether the address is wrong,"
                );
                let left = budget.saturating_sub(started.elapsed());
                if left.is_zero() {
                    return Refusal::Unknown(format!("{what} had no time left"));
                }
                let request = self.client.get(&asked);
                match self.check(request, &asked, target, &[], &what, left).await {
                    Err(unknown) => unknown,
                    Ok((again, true)) if again.as_u16() == 404 => Refusal::Caller(format!(
                        ", and GET {path} {again} with or without the call's headers"
                    )),
                    Ok((_, true)) => named_refused,
                    Ok((again, false)) => {
                        Refusal::Unknown(format!("{what} answered {again}, not the peer's answer"))
                    }
                }
            }
            404 if peers_answer => Refusal::Caller(format!(", and GET {path} {status}")),
            _ => Refusal::Unknown(format!("{what} answered {status}")),
        }
    }
}

fn truncate(s: &str, max: usize) -> String {
    s.char_indices()
        .take_while(|(i, _)| *i < max)
        .map(|(_, c)| c)
        .collect()
}

/// The most of a refusal's body an error quotes.
const MAX_QUOTED_ANSWER: usize = 512;

/// A refusal's body as errors quote it (logs, dead-letter headers, the backlog's `last_error`):
/// the target's secrets taken out (a peer or gateway may echo the request's `Authorization`),
/// control characters escaped (PostgreSQL refuses a NUL, so a backlogged event could never be
/// marked dead-lettered; a line break would forge log lines), at most [`MAX_QUOTED_ANSWER`]
/// bytes of it.
fn answer_text(text: &str, target: &PeerTarget) -> String {
    let mut shown = text.to_string();
    for secret in secrets_of(target) {
        shown = shown.replace(&secret, "<redacted>");
    }
    let mut escaped = String::with_capacity(shown.len());
    for c in shown.chars() {
        if c.is_control() {
            escaped.push_str(&format!("\\u{{{:04x}}}", u32::from(c)));
        } else {
            escaped.push(c);
        }
    }
    truncate(&escaped, MAX_QUOTED_ANSWER)
}

/// What of `target` must never be shown: its credential and a password written in its URL,
/// as written and as sent (percent-decoded, and the `Basic` base64 of `user:password`).
fn secrets_of(target: &PeerTarget) -> Vec<String> {
    use base64::Engine;
    let mut secrets = vec![target.credential.clone()];
    if let Ok(u) = reqwest::Url::parse(&target.url) {
        if let Some(password) = u.password() {
            let decoded = percent_decoded(password);
            let basic = format!("{}:{decoded}", percent_decoded(u.username()));
            secrets.push(base64::engine::general_purpose::STANDARD.encode(basic));
            secrets.extend([password.to_string(), decoded]);
        }
    }
    secrets.retain(|s| !s.is_empty());
    // Longest first: a secret that holds another is taken out whole.
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    secrets
}

/// `%XX` sequences decoded (as the client does for the user info it sends); bytes that do not
/// make UTF-8 are replaced.
fn percent_decoded(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether a call may go to its target now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admission {
    /// The circuit is closed.
    Call,
    /// The circuit is open and this call is its probe.
    Probe,
    /// The circuit is open and its pause is not over: no call before this wait is over.
    Paused(Duration),
    /// The circuit is open and its probe is out: no call until its outcome is known.
    ProbeOut,
}

/// What a call does at the peer: a read's success is no evidence about writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    Read,
    Write,
}

/// The number of a peer's targets whose circuit is open, behind `nexus_worker_paused`.
struct OpenTargets {
    role: &'static str,
    peer: &'static str,
    count: Mutex<usize>,
}

impl OpenTargets {
    fn new(role: &'static str, peer: &'static str) -> Self {
        Self {
            role,
            peer,
            count: Mutex::new(0),
        }
    }

    /// One more (`true`) or one fewer open target; the gauge is set under the same lock, so
    /// concurrent changes cannot leave it disagreeing with the count.
    fn change(&self, opened: bool) {
        let mut n = self.count.lock().unwrap_or_else(|p| p.into_inner());
        *n = if opened {
            n.saturating_add(1)
        } else {
            n.saturating_sub(1)
        };
        let paused = if *n > 0 { 1.0 } else { 0.0 };
        metrics::gauge!(m::WORKER_PAUSED, "role" => self.role, "peer" => self.peer).set(paused);
    }
}

/// A peer's circuits by target.
#[derive(Default)]
struct Circuits(Mutex<BTreeMap<String, Arc<Circuit>>>);

impl Circuits {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<Circuit>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether some circuit holds its role paused ([`Circuit::paused`]).
    fn paused(&self) -> bool {
        let now = Instant::now();
        self.lock().values().any(|c| c.paused(now))
    }
}

/// How often `nexus_worker_paused` is brought in line with the circuits.
const PAUSED_REFRESH: Duration = Duration::from_secs(1);

/// Keeps `nexus_worker_paused` true to what the circuits do now. Open and close set it as they
/// happen; this catches the one change no call makes: a pause that ended [`PROBE_GRACE`] ago
/// with no call coming for its target (another pod drained that tenant's backlog) refuses
/// nothing, so the role is not paused on it, though nobody has probed the peer yet; a failed
/// probe counts it again.
async fn report_paused(
    circuits: std::sync::Weak<Circuits>,
    role: &'static str,
    peer: &'static str,
) {
    let mut tick = tokio::time::interval(PAUSED_REFRESH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // The peer is gone (its role stopped): so is its report.
        let Some(circuits) = circuits.upgrade() else {
            return;
        };
        let paused = if circuits.paused() { 1.0 } else { 0.0 };
        metrics::gauge!(m::WORKER_PAUSED, "role" => role, "peer" => peer).set(paused);
    }
}

/// The largest answer a peer call reads (UCS and GWS answer small JSON documents).
const MAX_ANSWER_BYTES: usize = 4 << 20;

/// A pause longer than this (a huge `pause_max_ms`) is cut to it.
const LONGEST_PAUSE: Duration = Duration::from_secs(24 * 3600);

/// Longest jitter added to a refused call's wait.
const REFUSAL_SPREAD: Duration = Duration::from_secs(1);

/// How long after its pause ends an open circuit still counts as pausing its role with no
/// probe out: the callers it refused come back at the pause's end plus up to
/// [`REFUSAL_SPREAD`], and the backlog polls every 250 ms. Without it the gauge would drop to 0
/// between every two probes of a peer that is down.
const PROBE_GRACE: Duration = Duration::from_secs(5);

/// Subjects whose last failure a circuit remembers, at most.
const MAX_REMEMBERED_FAILURES: usize = 10_000;

/// Gives the probe back if the call's future is dropped before its outcome is known.
struct ProbeGuard<'a> {
    circuit: &'a Circuit,
    armed: bool,
}

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.circuit.abandoned();
        }
    }
}

/// The circuit settings of a peer, from its config.
#[derive(Debug, Clone, Copy)]
struct CircuitSettings {
    threshold: usize,
    initial: Duration,
    max: Duration,
    /// Longest `Retry-After` an event is held back for (`retry_max_ms`).
    max_wait: Duration,
}

impl CircuitSettings {
    fn of(c: &PeerConfig) -> Self {
        Self {
            threshold: usize::try_from(c.pause_after_failures.max(1)).unwrap_or(usize::MAX),
            initial: Duration::from_millis(c.pause_initial_ms.max(1)),
            max: Duration::from_millis(c.pause_max_ms.max(c.pause_initial_ms).max(1)),
            max_wait: Duration::from_millis(c.retry_max_ms.max(1)),
        }
    }
}

/// One target's circuit: closed while calls succeed; open (paused) once calls for
/// `pause_after_failures` different subjects failed with no success between.
struct Circuit {
    role: &'static str,
    peer: &'static str,
    /// The target's host, for logs.
    host: String,
    settings: CircuitSettings,
    /// The peer's count of open targets, shared by its circuits.
    open: Arc<OpenTargets>,
    state: Mutex<CircuitState>,
}

#[derive(Default)]
struct CircuitState {
    /// Subjects whose calls failed since the last success (up to the threshold).
    failing: Vec<String>,
    /// Failed probes since the circuit opened: the pause doubles with each.
    failed_probes: u32,
    /// While open: when the next probe may go.
    probe_at: Option<Instant>,
    probing: bool,
    last_success: Option<Instant>,
    /// When each subject last failed (bounded), to tell whether the target answered anyone
    /// since.
    last_failure: HashMap<String, Instant>,
}

impl Circuit {
    fn new(
        role: &'static str,
        peer: &'static str,
        host: String,
        settings: CircuitSettings,
        open: Arc<OpenTargets>,
    ) -> Self {
        Self {
            role,
            peer,
            host,
            settings,
            open,
            state: Mutex::new(CircuitState::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CircuitState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    #[cfg(test)]
    fn is_open(&self) -> bool {
        self.lock().probe_at.is_some()
    }

    /// Whether the target answered a call since `subject` last failed (or, for its first
    /// failure, within `window`): only then is a failure about the subject, not the target.
    fn answered_since_last_failure(&self, subject: &str, window: Duration) -> bool {
        let s = self.lock();
        let Some(success) = s.last_success else {
            return false;
        };
        match s.last_failure.get(subject) {
            Some(failed) => success > *failed,
            None => success.elapsed() <= window,
        }
    }

    /// Whether a call may go now: always while closed; while open, one prober at a time once
    /// the pause is over, and nobody else. The prober takes the probe.
    fn admit(&self) -> Admission {
        let mut s = self.lock();
        let admission = Self::admission(&s);
        if admission == Admission::Probe {
            s.probing = true;
        }
        admission
    }

    /// What [`Self::admit`] would answer, without taking the probe.
    fn peek(&self) -> Admission {
        Self::admission(&self.lock())
    }

    /// Whether the circuit holds its role paused at `now`: open, and its probe out or its pause
    /// over less than [`PROBE_GRACE`] ago.
    fn paused(&self, now: Instant) -> bool {
        let s = self.lock();
        s.probe_at
            .is_some_and(|at| s.probing || now < at.checked_add(PROBE_GRACE).unwrap_or(at))
    }

    fn admission(s: &CircuitState) -> Admission {
        let Some(at) = s.probe_at else {
            return Admission::Call;
        };
        let now = Instant::now();
        if now < at {
            Admission::Paused(at - now)
        } else if s.probing {
            Admission::ProbeOut
        } else {
            Admission::Probe
        }
    }

    fn succeeded(&self) {
        let was_open = {
            let mut s = self.lock();
            let was_open = s.probe_at.is_some();
            s.failing.clear();
            s.failed_probes = 0;
            s.probe_at = None;
            s.probing = false;
            s.last_success = Some(Instant::now());
            was_open
        };
        if was_open {
            tracing::info!(
                role = self.role,
                peer = self.peer,
                target = %self.host,
                "peer answers again; resuming"
            );
            self.open.change(false);
        }
    }

    /// A call ended without an outcome: whoever held the probe lets the next caller have it.
    fn abandoned(&self) {
        self.lock().probing = false;
    }

    /// A failed call for `subject` (`probing`: it was the probe of the open circuit). Once
    /// open, the pause is at least what the peer asked for (`Retry-After`, up to
    /// `pause_max_ms`). One subject's `Retry-After` alone does not open it: that call's event
    /// waits as long ([`PeerFailure::Retry`]'s `wait`).
    fn failed(&self, subject: &str, retry_after: Option<Duration>, probing: bool) {
        let opened = {
            let mut s = self.lock();
            let now = Instant::now();
            if s.last_failure.len() >= MAX_REMEMBERED_FAILURES {
                s.last_failure.clear();
            }
            s.last_failure.insert(subject.to_string(), now);
            let open = s.probe_at.is_some();
            if open && !probing {
                // A call admitted before the circuit opened, failing late: the probe and its
                // pause are not its business.
                return;
            }
            s.probing = false;
            if !open && !s.failing.iter().any(|f| f == subject) {
                s.failing.push(subject.to_string());
            }
            if !open && s.failing.len() < self.settings.threshold {
                return;
            }
            let doublings = if open {
                s.failed_probes = s.failed_probes.saturating_add(1);
                s.failed_probes
            } else {
                0
            };
            let pause = self
                .settings
                .initial
                .saturating_mul(1u32 << doublings.min(16))
                .min(self.settings.max);
            let half = pause / 2;
            let pause = half + half.mul_f64(rand::rng().random::<f64>());
            let pause = pause.max(retry_after.unwrap_or_default().min(self.settings.max));
            s.probe_at = Some(now.checked_add(pause).unwrap_or(now + LONGEST_PAUSE));
            !open
        };
        if opened {
            tracing::warn!(
                role = self.role,
                peer = self.peer,
                target = %self.host,
                "peer keeps failing; pausing calls to it until a probe succeeds"
            );
            self.open.change(true);
        }
    }
}

/// Whether a Content-Type is an HTML page (media types are case-insensitive: `Text/HTML` too).
fn is_html(content_type: &str) -> bool {
    content_type
        .split(';')
        .next()
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("text/html"))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn config() -> PeerConfig {
        PeerConfig {
            pause_after_failures: 2,
            pause_initial_ms: 50,
            pause_max_ms: 200,
            ..PeerConfig::default()
        }
    }

    #[test]
    fn tenant_targets_win_over_the_global_one() {
        let mut c = config();
        assert_eq!(c.target("t1"), None);
        c.url = "http://ucs/".into();
        c.tenants.insert(
            "t2".into(),
            PeerTarget {
                url: "http://other".into(),
                credential: "k".into(),
                timeout_ms: 0,
            },
        );
        assert_eq!(c.target("t1").map(|t| t.url), Some("http://ucs".into()));
        let t2 = c.target("t2").expect("t2 has a target");
        assert_eq!((t2.url.as_str(), t2.timeout_ms), ("http://other", 10_000));
        c.tenants.insert("t3".into(), PeerTarget::default());
        assert_eq!(c.target("t3"), None, "an empty override turns the peer off");
        for t in ["t1", "t2", "t3", "t4"] {
            assert_eq!(c.has_target(t), c.target(t).is_some(), "{t}");
        }
    }

    /// A refusal's body is quoted without the target's secrets (as configured and as sent) and
    /// with its control characters escaped, whatever the peer echoed.
    #[test]
    fn a_refusal_quotes_no_secret_and_no_control_character() {
        use base64::Engine;
        let target = PeerTarget {
            url: "https://svc:p%40ss-w0rd@ucs.example.com".into(),
            credential: "tok-3141".into(),
            timeout_ms: 1_000,
        };
        let basic = base64::engine::general_purpose::STANDARD.encode("svc:p@ss-w0rd");
        let body = format!(
            "denied\0 for Bearer tok-3141\r\nX-Forged: 1 basic {basic} raw p%40ss-w0rd decoded p@ss-w0rd"
        );
        let shown = answer_text(&body, &target);
        for secret in ["tok-3141", basic.as_str(), "p%40ss-w0rd", "p@ss-w0rd"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert!(!shown.chars().any(char::is_control), "{shown:?}");
        assert!(
            shown.starts_with("denied\\u{0000} for Bearer <redacted>\\u{000d}\\u{000a}X-Forged"),
            "{shown}"
        );
        // Cut at a character boundary, after the secrets are out (none is left half shown).
        let long = format!("{}tok-3141", "é".repeat(400));
        let shown = answer_text(&long, &target);
        assert!(shown.len() <= MAX_QUOTED_ANSWER + 4, "{}", shown.len());
        assert!(!shown.contains("tok-"), "{shown}");
        let no_secrets = PeerTarget::default();
        assert_eq!(answer_text("plain", &no_secrets), "plain");
    }

    /// `Debug` (a `?config` in a log line, a failed assertion) shows no credential, neither
    /// configured nor written in a URL.
    #[test]
    fn debug_shows_no_secret() {
        let mut c = config();
        c.url = "https://svc:url-pass-1@ucs.example.com".into();
        c.credential = "global-secret-2".into();
        c.tenants.insert(
            "t".into(),
            PeerTarget {
                url: "https://ucs.example.com".into(),
                credential: "tenant-secret-3".into(),
                timeout_ms: 0,
            },
        );
        let shown = format!("{c:?} {:?}", c.target("t"));
        for secret in ["url-pass-1", "global-secret-2", "tenant-secret-3"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert!(
            shown.contains("<redacted>") && shown.contains("ucs.example.com"),
            "{shown}"
        );
    }

    #[test]
    fn a_credential_no_header_can_carry_is_a_config_error() {
        let mut c = config();
        c.url = "http://ucs".into();
        c.credential = "ok-token".into();
        assert_eq!(c.validate("workers.history.ucs"), Ok(()));
        c.credential = "s3cret\nX-Injected: 1".into();
        let e = c.validate("workers.history.ucs").unwrap_err();
        assert!(
            e.contains("workers.history.ucs.credential") && !e.contains("s3cret"),
            "{e}"
        );
        let mut c = config();
        c.tenants.insert(
            "t".into(),
            PeerTarget {
                url: "http://other".into(),
                credential: "bell\u{7}".into(),
                timeout_ms: 0,
            },
        );
        let e = c.validate("workers.gws").unwrap_err();
        assert!(e.contains("workers.gws.tenants.t.credential"), "{e}");
    }

    #[test]
    fn bad_urls_name_their_key() {
        let mut c = config();
        c.tenants.insert(
            "t".into(),
            PeerTarget {
                url: "ftp://x".into(),
                ..PeerTarget::default()
            },
        );
        let e = c.validate("workers.history.ucs").unwrap_err();
        assert!(e.contains("workers.history.ucs.tenants.t.url"), "{e}");
        // A query would swallow the paths appended to the URL; its token is not shown.
        for url in ["https://ucs.example?token=s3cret", "https://ucs.example/#x"] {
            let mut c = config();
            c.url = url.into();
            let e = c.validate("workers.history.ucs").unwrap_err();
            assert!(
                e.contains("workers.history.ucs.url")
                    && e.contains("query")
                    && !e.contains("s3cret"),
                "{e}"
            );
        }
    }

    fn circuit(c: &PeerConfig) -> Circuit {
        Circuit::new(
            "r",
            "p",
            "peer".into(),
            CircuitSettings::of(c),
            Arc::new(OpenTargets::new("r", "p")),
        )
    }

    /// The wait of a refused admission.
    fn paused(a: Admission) -> Duration {
        match a {
            Admission::Paused(wait) => wait,
            other => panic!("admitted while paused: {other:?}"),
        }
    }

    #[tokio::test]
    async fn the_circuit_opens_after_failures_and_one_probe_closes_it() {
        let c = circuit(&config());
        assert_eq!(c.admit(), Admission::Call);
        c.failed("chat-1", None, false);
        assert!(!c.is_open(), "one failure is below the threshold");
        c.failed("chat-1", None, false);
        c.failed("chat-1", None, false);
        assert!(!c.is_open(), "one conversation failing again pauses nobody");
        c.failed("chat-2", None, false);
        assert!(c.is_open(), "two conversations failing do");
        // While open, calls are refused (not held) until the pause (25-50 ms) is over.
        let wait = paused(c.admit());
        assert!(wait <= Duration::from_millis(50), "{wait:?}");
        tokio::time::sleep(wait).await;
        assert_eq!(c.peek(), Admission::Probe, "a look does not take the probe");
        assert_eq!(
            c.admit(),
            Admission::Probe,
            "the first caller after it probes"
        );
        // Nobody else goes while the probe is out.
        assert_eq!(c.admit(), Admission::ProbeOut);
        c.succeeded();
        assert!(!c.is_open());
        assert_eq!(c.admit(), Admission::Call);
    }

    #[tokio::test]
    async fn once_open_the_pause_is_at_least_what_the_peer_asked() {
        let c = circuit(&config());
        c.failed("chat-1", Some(Duration::from_millis(150)), false);
        assert!(!c.is_open(), "one conversation's Retry-After pauses nobody");
        c.failed("chat-2", Some(Duration::from_millis(150)), false);
        assert!(c.is_open());
        let wait = paused(c.admit());
        assert!(wait >= Duration::from_millis(140), "{wait:?}");
        tokio::time::sleep(wait).await;
        assert_eq!(c.admit(), Admission::Probe);
        c.succeeded();
        // A longer wait is cut to pause_max_ms (200 ms here).
        c.failed("chat-1", Some(Duration::from_secs(3600)), false);
        c.failed("chat-2", Some(Duration::from_secs(3600)), false);
        let wait = paused(c.admit());
        assert!(
            wait >= Duration::from_millis(150) && wait <= Duration::from_millis(200),
            "{wait:?}"
        );
    }

    /// A loopback peer: `/ok` answers 200, `/busy` 503 with `Retry-After: 1`, GET `/read` 200;
    /// with the number of calls it got.
    async fn peer_server() -> (String, Arc<AtomicUsize>) {
        use axum::http::StatusCode;
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let app = axum::Router::new()
            .route("/ok", axum::routing::post(|| async { "{}" }))
            .route("/plain", axum::routing::post(|| async { "OK" }))
            .route(
                "/login",
                axum::routing::get(|| async {
                    axum::response::Html("<html><form>sign in</form></html>")
                }),
            )
            .route(
                "/login-caps",
                axum::routing::get(|| async {
                    (
                        [("content-type", "Text/HTML; charset=UTF-8")],
                        "<html><form>sign in</form></html>",
                    )
                }),
            )
            .route(
                "/moved",
                axum::routing::post(|| async { axum::response::Redirect::temporary("/plain") }),
            )
            .route("/read", axum::routing::get(|| async { "{}" }))
            // An identity that does not know the agent a request names (and answers without).
            .route(
                "/agent-unknown",
                axum::routing::get(|headers: axum::http::HeaderMap| async move {
                    if headers.contains_key("x-agent") {
                        (StatusCode::NOT_FOUND, "no such agent")
                    } else {
                        (StatusCode::OK, "{}")
                    }
                }),
            )
            .route(
                "/unauthorized",
                axum::routing::post(|| async { (StatusCode::UNAUTHORIZED, "no such key") })
                    .get(|| async { (StatusCode::UNAUTHORIZED, "no such key") }),
            )
            .route(
                "/forbidden",
                axum::routing::post(|| async { StatusCode::FORBIDDEN })
                    .get(|| async { StatusCode::FORBIDDEN }),
            )
            .route(
                "/conflict",
                axum::routing::post(|| async { StatusCode::CONFLICT }),
            )
            // A gateway sending a POST elsewhere: the GET it becomes finds an empty or JSON 200.
            .route(
                "/see-other-empty",
                axum::routing::post(|| async { axum::response::Redirect::to("/empty") }),
            )
            .route(
                "/see-other-json",
                axum::routing::post(|| async { axum::response::Redirect::to("/read") }),
            )
            .route("/empty", axum::routing::get(|| async { "" }))
            .route(
                "/busy",
                axum::routing::post(|| async {
                    (StatusCode::SERVICE_UNAVAILABLE, [("retry-after", "1")], "")
                }),
            )
            .layer(axum::middleware::from_fn(
                move |r: axum::extract::Request, next: axum::middleware::Next| {
                    counted.fetch_add(1, Ordering::SeqCst);
                    next.run(r)
                },
            ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        (url, calls)
    }

    fn target(url: &str) -> PeerTarget {
        PeerTarget {
            url: url.to_string(),
            credential: String::new(),
            timeout_ms: 2_000,
        }
    }

    async fn post(
        peer: &Peer,
        t: &PeerTarget,
        subject: &str,
        path: &str,
    ) -> Result<(), PeerFailure> {
        peer.post_json(t, subject, path, &[], &serde_json::json!({}))
            .await
            .map(|_| ())
    }

    /// A plain-text 2xx is the peer's success; a 2xx reached through a redirect or an HTML
    /// page (a gateway's sign-in) is not: the effect is tried again, not marked done.
    #[tokio::test]
    async fn only_the_peers_own_2xx_is_success() {
        let (url, _) = peer_server().await;
        let peer = Peer::new("r", "p", reqwest::Client::new(), &config());
        let t = target(&url);
        let answer = peer
            .post_json(&t, "chat-1", "/plain", &[], &serde_json::json!({}))
            .await
            .expect("plain text is success");
        assert_eq!(answer, serde_json::json!("OK"));
        // Credentials in the URL: the answer is still the peer's, and errors do not show them.
        let with_credentials = target(&url.replacen("http://", "http://u:p4ss@", 1));
        post(&peer, &with_credentials, "chat-1", "/ok")
            .await
            .expect("a 2xx from the URL asked, credentials aside");
        match post(&peer, &with_credentials, "chat-1", "/busy").await {
            Err(PeerFailure::Retry { detail, .. }) => {
                assert!(!detail.contains("p4ss"), "{detail}")
            }
            other => panic!("{other:?}"),
        }
        // Nothing listening: the connection error names no token the URL's query carried
        // (reqwest's own message repeats the whole URL).
        let refused = target("http://127.0.0.1:1/base?token=s3cret-t0ken");
        match post(&peer, &refused, "chat-1", "/ok").await {
            Err(PeerFailure::Retry { detail, .. }) => {
                assert!(!detail.contains("s3cret-t0ken"), "{detail}")
            }
            other => panic!("{other:?}"),
        }
        assert!(
            matches!(
                post(&peer, &t, "chat-1", "/moved").await,
                Err(PeerFailure::Retry { .. })
            ),
            "a redirected 2xx"
        );
        // nexus's own client follows no redirect: the body is posted once, to the URL asked.
        let (url2, calls2) = peer_server().await;
        let own = crate::http_client::build(&crate::config::Config::defaults().http_client)
            .expect("client");
        let strict = Peer::new("r", "p", own, &config());
        match post(&strict, &target(&url2), "chat-1", "/moved").await {
            Err(PeerFailure::Retry { detail, .. }) => {
                assert!(detail.contains("307"), "{detail}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            calls2.load(Ordering::SeqCst),
            1,
            "the redirect was followed"
        );
        for path in ["/see-other-empty", "/see-other-json"] {
            assert!(
                matches!(
                    post(&peer, &t, "chat-1", path).await,
                    Err(PeerFailure::Retry { .. })
                ),
                "{path}: a 2xx at the end of a redirect, whatever its body"
            );
        }
        for path in ["/login", "/login-caps"] {
            assert!(
                matches!(
                    peer.get_json(&t, "chat-1", path, &[]).await,
                    Err(PeerFailure::Retry { .. })
                ),
                "{path}: an HTML page, its media type in any case"
            );
        }
    }

    #[tokio::test]
    async fn failures_count_only_while_the_target_answers_others() {
        let (url, calls) = peer_server().await;
        let mut c = config();
        c.pause_after_failures = 2;
        c.pause_max_ms = 5_000;
        let peer = Peer::new("r", "p", reqwest::Client::new(), &c);
        let t = target(&url);
        // Nothing answered yet: the peer may be down for everyone, so this does not count.
        match post(&peer, &t, "chat-1", "/busy").await {
            Err(PeerFailure::Retry { counts, wait, .. }) => {
                assert!(!counts, "counted without evidence the peer is up");
                assert_eq!(wait, Some(Duration::from_secs(1)), "Retry-After passed on");
            }
            other => panic!("{other:?}"),
        }
        assert!(!peer.paused(), "one conversation's 503 pauses nobody");
        post(&peer, &t, "chat-2", "/ok").await.expect("ok");
        match post(&peer, &t, "chat-1", "/busy").await {
            Err(PeerFailure::Retry { counts, .. }) => {
                assert!(counts, "the target answered chat-2 just now");
            }
            other => panic!("{other:?}"),
        }
        // Failing again with no answer to anyone since: the target may have gone down.
        match post(&peer, &t, "chat-1", "/busy").await {
            Err(PeerFailure::Retry { counts, .. }) => assert!(!counts),
            other => panic!("{other:?}"),
        }
        // A read that succeeds is no evidence that writes would.
        peer.get_json(&t, "chat-2", "/read", &[])
            .await
            .expect("read");
        match post(&peer, &t, "chat-1", "/busy").await {
            Err(PeerFailure::Retry { counts, .. }) => assert!(!counts, "a read counted"),
            other => panic!("{other:?}"),
        }
        assert!(!peer.paused(), "still one conversation failing");
        // Two conversations failing open it, for at least the Retry-After (1 s).
        let _ = post(&peer, &t, "chat-3", "/busy").await;
        assert!(peer.paused());
        // Meanwhile calls are refused at once, without reaching the peer, and do not count.
        let before = calls.load(Ordering::SeqCst);
        let wait = match post(&peer, &t, "chat-2", "/busy").await {
            Err(PeerFailure::Retry {
                counts,
                wait: Some(wait),
                ..
            }) => {
                assert!(!counts, "a refused call counted");
                wait
            }
            other => panic!("{other:?}"),
        };
        assert_eq!(
            calls.load(Ordering::SeqCst),
            before,
            "a paused target called"
        );
        assert!(wait >= Duration::from_millis(900), "asked to wait {wait:?}");
        tokio::time::sleep(wait).await;
        match post(&peer, &t, "chat-2", "/busy").await {
            Err(PeerFailure::Retry { counts, .. }) => {
                assert!(!counts, "a probe of a paused target does not count")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(calls.load(Ordering::SeqCst), before + 1, "one probe went");
    }

    /// A target that refuses nexus itself (401, 407) is taken for down, outcome
    /// `misconfigured`: a retryable failure that opens the circuit like a 5xx and does not
    /// count while the target answers nobody. Other 4xx (403 without an identity check to tell
    /// otherwise, 404, 409) are the request's. Before, a 401 was a refusal of the event
    /// (dead-lettered) and counted as the peer being up.
    #[tokio::test]
    async fn a_target_refusing_nexus_itself_is_down() {
        crate::telemetry::init_metrics();
        let (url, _) = peer_server().await;
        let mut c = config();
        c.pause_after_failures = 2;
        c.pause_initial_ms = 5_000;
        c.pause_max_ms = 5_000;
        let peer = Peer::new("refusing", "p", reqwest::Client::new(), &c);
        let t = target(&url);
        let other = Peer::new("r", "p", reqwest::Client::new(), &c);
        for path in ["/nowhere", "/conflict", "/forbidden"] {
            assert!(
                matches!(
                    post(&other, &t, "chat-0", path).await,
                    Err(PeerFailure::Rejected { .. })
                ),
                "{path}: the request's refusal"
            );
        }
        match post(&peer, &t, "chat-1", "/unauthorized").await {
            Err(PeerFailure::Retry { detail, .. }) => {
                assert!(
                    detail.contains("401") && detail.contains("no such key"),
                    "{detail}"
                )
            }
            other => panic!("{other:?}"),
        }
        assert!(!peer.paused(), "one conversation pauses nobody");
        match post(&peer, &t, "chat-2", "/unauthorized").await {
            Err(PeerFailure::Retry { counts, .. }) => {
                assert!(
                    !counts,
                    "nothing answered since: the target may refuse everyone"
                )
            }
            other => panic!("{other:?}"),
        }
        assert!(
            peer.paused(),
            "refused for two conversations: taken for down"
        );
        let rendered = crate::telemetry::init_metrics().render();
        let misconfigured = rendered
            .lines()
            .find(|l| {
                l.starts_with(m::PEER_CALLS_TOTAL)
                    && l.contains("role=\"refusing\"")
                    && l.contains("outcome=\"misconfigured\"")
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok());
        assert_eq!(misconfigured, Some(2.0), "{rendered}");
    }

    /// With an identity check (GWS's own user), a 403, or a write's 404, is the request's when
    /// the identity is answered, or refused with a 403 (the check carries the call's agent: it
    /// is that agent refused, not nexus), or with a 404 only when asked for that agent; nexus's
    /// when the identity is refused as an authentication (401, 407), or is 404 with and without
    /// the call's headers (a wrong base path). A read's 403 is the request's as well, marked
    /// when the identity refused the agent (the read then says nothing of the agent's calls);
    /// a read's 404 is no refusal at all.
    #[tokio::test]
    async fn an_identity_check_tells_whose_refusal_it_is() {
        let (url, _) = peer_server().await;
        let t = target(&url);
        let agent = [("x-agent", "a1")];
        let answered =
            Peer::new("r", "p", reqwest::Client::new(), &config()).with_identity_check("/read");
        for path in ["/forbidden", "/nowhere"] {
            assert!(
                matches!(
                    post(&answered, &t, "chat-1", path).await,
                    Err(PeerFailure::Rejected {
                        identity_refused: false,
                        ..
                    })
                ),
                "{path}, the identity answered: the request's refusal"
            );
        }
        assert!(matches!(
            answered.get_json(&t, "chat-1", "/forbidden", &[]).await,
            Err(PeerFailure::Rejected {
                status: 403,
                identity_refused: false,
                ..
            })
        ));
        let unauthenticated = Peer::new("r", "p", reqwest::Client::new(), &config())
            .with_identity_check("/unauthorized");
        for path in ["/forbidden", "/nowhere"] {
            match post(&unauthenticated, &t, "chat-1", path).await {
                Err(PeerFailure::Retry { detail, .. }) => {
                    assert!(detail.contains("GET /unauthorized 401"), "{detail}")
                }
                other => panic!("{path}, the identity unauthenticated: {other:?}"),
            }
        }
        let refused = Peer::new("r", "p", reqwest::Client::new(), &config())
            .with_identity_check("/forbidden");
        for path in ["/forbidden", "/nowhere"] {
            assert!(
                matches!(
                    post(&refused, &t, "chat-1", path).await,
                    Err(PeerFailure::Rejected {
                        identity_refused: true,
                        ..
                    })
                ),
                "{path}, the agent's identity refused: that agent's request refused"
            );
        }
        assert!(matches!(
            refused.get_json(&t, "chat-1", "/forbidden", &agent).await,
            Err(PeerFailure::Rejected {
                status: 403,
                identity_refused: true,
                ..
            })
        ));
        // A wrong base path answers 404 to everything, the identity too, with or without the
        // agent: nexus's address to fix, not every agent's request.
        let nowhere =
            Peer::new("r", "p", reqwest::Client::new(), &config()).with_identity_check("/nowhere");
        for (path, headers) in [
            ("/forbidden", &[][..]),
            ("/nowhere", &[][..]),
            ("/nowhere", &agent[..]),
        ] {
            match nowhere
                .post_json(&t, "chat-1", path, headers, &serde_json::json!({}))
                .await
            {
                Err(PeerFailure::Retry { detail, .. }) => {
                    assert!(detail.contains("GET /nowhere 404"), "{path}: {detail}")
                }
                other => panic!("{path}, the identity not found: {other:?}"),
            }
        }
        assert!(matches!(
            nowhere.get_json(&t, "chat-1", "/forbidden", &agent).await,
            Err(PeerFailure::Retry { .. })
        ));
        assert!(
            matches!(
                nowhere.get_json(&t, "chat-1", "/nowhere", &agent).await,
                Ok(None)
            ),
            "a read's 404 is an answer"
        );
        // The identity not found for this agent only: that agent's.
        let unknown_agent = Peer::new("r", "p", reqwest::Client::new(), &config())
            .with_identity_check("/agent-unknown");
        assert!(matches!(
            unknown_agent
                .post_json(&t, "chat-1", "/nowhere", &agent, &serde_json::json!({}))
                .await,
            Err(PeerFailure::Rejected {
                identity_refused: true,
                ..
            })
        ));
        // The identity answering neither way (a 405 here, or a 5xx, a timeout): a retryable
        // failure, nobody's refusal yet.
        let unknown =
            Peer::new("r", "p", reqwest::Client::new(), &config()).with_identity_check("/busy");
        assert!(matches!(
            post(&unknown, &t, "chat-1", "/forbidden").await,
            Err(PeerFailure::Retry { .. })
        ));
    }

    /// A call that reached no peer names its cause (what the operator reads in the backlog's
    /// `last_error`), not only reqwest's "error sending request".
    #[tokio::test]
    async fn a_call_that_reached_no_peer_names_its_cause() {
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", closed.local_addr().expect("addr"));
        drop(closed);
        let peer = Peer::new("r", "p", reqwest::Client::new(), &config());
        match post(&peer, &target(&url), "chat-1", "/ok").await {
            Err(PeerFailure::Retry { detail, .. }) => assert!(
                detail.to_ascii_lowercase().contains("connection refused"),
                "{detail}"
            ),
            other => panic!("{other:?}"),
        }
    }

    /// `nexus_worker_paused` of a role, as /metrics renders it.
    fn paused_gauge(role: &str) -> Option<f64> {
        let rendered = crate::telemetry::init_metrics().render();
        rendered
            .lines()
            .find(|l| l.starts_with(m::WORKER_PAUSED) && l.contains(&format!("role=\"{role}\"")))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    /// A pause that ends with no call coming for its target refuses nothing: the role is not
    /// reported paused on it for good (another pod may have drained that tenant's backlog),
    /// but neither between two probes of a peer that is down.
    #[tokio::test]
    async fn a_pause_no_call_comes_for_ends_in_the_gauge() {
        crate::telemetry::init_metrics();
        let (url, _) = peer_server().await;
        let mut c = config();
        c.pause_after_failures = 2;
        c.pause_initial_ms = 200;
        c.pause_max_ms = 200;
        let peer = Peer::new("pause-report", "p", reqwest::Client::new(), &c);
        let t = target(&url);
        let _ = post(&peer, &t, "chat-1", "/busy").await;
        let _ = post(&peer, &t, "chat-2", "/busy").await;
        assert!(peer.paused());
        assert_eq!(paused_gauge("pause-report"), Some(1.0));
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        assert_eq!(
            peer.circuit(&t).peek(),
            Admission::Probe,
            "the pause is over"
        );
        assert!(peer.paused(), "no probe yet: still paused, not flickering");
        assert_eq!(paused_gauge("pause-report"), Some(1.0));
        tokio::time::sleep(PROBE_GRACE).await;
        assert!(!peer.paused(), "no caller came back to probe");
        // The gauge follows at its next refresh.
        let deadline = Instant::now() + PAUSED_REFRESH * 10;
        while paused_gauge("pause-report") != Some(0.0) {
            assert!(Instant::now() < deadline, "the gauge still says paused");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    #[tokio::test]
    async fn each_target_has_its_own_circuit() {
        let (url, _) = peer_server().await;
        let mut c = config();
        c.pause_after_failures = 2;
        c.pause_initial_ms = 5_000;
        c.pause_max_ms = 5_000;
        let peer = Peer::new("r", "p", reqwest::Client::new(), &c);
        // The same server under two names: two targets, as two tenants' URLs would be.
        let down = target(&url);
        let up = target(&url.replace("127.0.0.1", "localhost"));
        // One URL with two tenants' own credentials: two targets too.
        let shared_up = PeerTarget {
            credential: "another-tenants-key".into(),
            ..target(&url)
        };
        let _ = post(&peer, &down, "chat-1", "/busy").await;
        let _ = post(&peer, &down, "chat-2", "/busy").await;
        assert!(peer.paused(), "the failing target is paused");
        let started = Instant::now();
        match post(&peer, &down, "chat-4", "/ok").await {
            Err(PeerFailure::Retry { counts: false, .. }) => {}
            other => panic!("a paused target took a call: {other:?}"),
        }
        post(&peer, &up, "chat-3", "/ok")
            .await
            .expect("the other target answers");
        post(&peer, &shared_up, "chat-5", "/ok")
            .await
            .expect("the same URL with another credential answers");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "a call to the other target waited {:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn a_prober_dropped_mid_call_hands_the_probe_on() {
        let c = circuit(&config());
        c.failed("chat-1", None, false);
        c.failed("chat-2", None, false);
        tokio::time::sleep(paused(c.admit())).await;
        assert_eq!(
            c.admit(),
            Admission::Probe,
            "the first caller after the pause"
        );
        drop(ProbeGuard {
            circuit: &c,
            armed: true,
        });
        assert_eq!(
            c.admit(),
            Admission::Probe,
            "the next caller gets the probe"
        );
    }
}
