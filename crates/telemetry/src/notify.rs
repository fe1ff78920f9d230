//! Alerts to Feishu/Lark, Matrix and a generic JSON webhook.
//!
//! Anyone holding the [`crate::Telemetry`] handle may call its `alert`: it never blocks and never fails (a full queue drops the alert and
//! counts it). One task owns the rest: per cause (kind + subject, e.g. "key disabled" + the key's
//! name) the first alert is sent at once; repeats within `dedup` are only counted, and when that
//! window closes with repeats, one summary says how many. Each message goes to every channel off
//! that task, with a timeout and one retry, so a dead webhook slows nothing.
//! Messages name keys, models and gateways — never a secret.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keypool_config::Notify;
use serde_json::json;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::metrics::Metrics;

/// What went wrong. Client aborts and client errors are never alerts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cause {
    /// An upstream answered 401/403: the key is disabled.
    KeyDisabled,
    /// A key went into cooldown several times in a row.
    KeyCooling,
    /// Every attempt of a request failed.
    AllUpstreamsFailed,
    /// The usage store is unreachable (events are being spilled).
    StoreUnavailable,
    /// Redis (shared state) is unreachable.
    RedisUnavailable,
    /// A USD budget reached 80% or 100% of its period's amount.
    Budget,
    /// A guardrail rule (`data_masking`, `content_safety` with `alert: true`) matched.
    Guardrail,
}

impl Cause {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::KeyDisabled => "key_disabled",
            Self::KeyCooling => "key_cooling",
            Self::AllUpstreamsFailed => "all_upstreams_failed",
            Self::StoreUnavailable => "store_unavailable",
            Self::RedisUnavailable => "redis_unavailable",
            Self::Budget => "budget",
            Self::Guardrail => "guardrail",
        }
    }
}

/// One alert. `subject` (a key, model or gateway name) is part of the dedup key.
#[derive(Debug, Clone)]
pub struct Alert {
    pub cause: Cause,
    pub subject: String,
    pub text: String,
}

const QUEUE: usize = 1024;
const SEND_TIMEOUT: Duration = Duration::from_secs(5);
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Starts the alert task on the current tokio runtime: its queue and the task; `None` when no
/// channel is configured.
pub(crate) fn start(
    config: &Notify,
    instance: &str,
    metrics: Arc<Metrics>,
) -> Option<(mpsc::Sender<Alert>, tokio::task::JoinHandle<()>)> {
    if !config.any() {
        return None;
    }
    let (tx, rx) = mpsc::channel(QUEUE);
    let client = reqwest::Client::builder()
        .timeout(SEND_TIMEOUT)
        .build()
        .unwrap_or_default();
    let notifier = Notifier {
        config: config.clone(),
        client,
        instance: instance.to_owned(),
        metrics,
    };
    Some((tx, tokio::spawn(notifier.run(rx))))
}

struct Notifier {
    config: Notify,
    client: reqwest::Client,
    instance: String,
    metrics: Arc<Metrics>,
}

struct Slot {
    until: Instant,
    suppressed: u64,
    last: Alert,
}

impl Notifier {
    async fn run(self, mut rx: mpsc::Receiver<Alert>) {
        let mut slots: HashMap<(Cause, String), Slot> = HashMap::new();
        loop {
            let next_close = slots.values().map(|s| s.until).min();
            let received = match next_close {
                Some(t) => tokio::select! {
                    a = rx.recv() => a.map(Some),
                    () = tokio::time::sleep_until(t) => Some(None),
                },
                None => rx.recv().await.map(Some),
            };
            let now = Instant::now();
            match received {
                None => return,
                Some(Some(a)) => {
                    let key = (a.cause, a.subject.clone());
                    if let Some(slot) = slots.get_mut(&key).filter(|s| s.until > now) {
                        slot.suppressed += 1;
                        slot.last = a;
                        self.metrics
                            .alerts
                            .with_label_values(&["all", "suppressed"])
                            .inc();
                        continue;
                    }
                    self.dispatch(&a, None);
                    slots.insert(
                        key,
                        Slot {
                            until: now + self.config.dedup,
                            suppressed: 0,
                            last: a,
                        },
                    );
                }
                Some(None) => {}
            }
            // windows that closed: summarise their repeats
            let closed: Vec<_> = slots
                .iter()
                .filter(|(_, s)| s.until <= now)
                .map(|(k, _)| k.clone())
                .collect();
            for k in closed {
                if let Some(slot) = slots.remove(&k)
                    && slot.suppressed > 0
                {
                    self.dispatch(&slot.last, Some(slot.suppressed));
                }
            }
        }
    }

    /// Sends one message to every channel, each in its own task.
    fn dispatch(&self, a: &Alert, repeats: Option<u64>) {
        let mut text = format!("[keypool {}] {}", self.instance, a.text);
        if let Some(n) = repeats {
            text = format!(
                "{text}\n(repeated {n} more time{} in the last {} s; suppressed)",
                if n == 1 { "" } else { "s" },
                self.config.dedup.as_secs()
            );
        }
        if let Some(f) = &self.config.feishu {
            let mut body = json!({"msg_type": "text", "content": {"text": text}});
            if let Some(secret) = &f.secret {
                let ts = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs();
                body["timestamp"] = json!(ts.to_string());
                body["sign"] = json!(feishu_sign(ts, secret.expose()));
            }
            self.send(
                "feishu",
                reqwest::Method::POST,
                f.webhook.clone(),
                None,
                body,
            );
        }
        if let Some(m) = &self.config.matrix {
            let txn = format!(
                "keypool-{}-{}",
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_millis(),
                fastrand::u32(..)
            );
            let token = m.access_token.as_ref().map(|t| t.expose().to_owned());
            self.send(
                "matrix",
                reqwest::Method::PUT,
                matrix_url(m, &txn),
                token,
                json!({"msgtype": "m.text", "body": text}),
            );
        }
        if let Some(w) = &self.config.webhook {
            let body = json!({
                "source": "keypool",
                "instance": self.instance,
                "cause": a.cause.as_str(),
                "subject": a.subject,
                "text": text,
                "repeats": repeats.unwrap_or(0),
            });
            self.send("webhook", reqwest::Method::POST, w.clone(), None, body);
        }
    }

    fn send(
        &self,
        channel: &'static str,
        method: reqwest::Method,
        url: url::Url,
        bearer: Option<String>,
        body: serde_json::Value,
    ) {
        let (client, metrics) = (self.client.clone(), self.metrics.clone());
        tokio::spawn(async move {
            for attempt in 0..2 {
                let mut req = client.request(method.clone(), url.clone()).json(&body);
                if let Some(t) = &bearer {
                    req = req.bearer_auth(t);
                }
                match req.send().await {
                    Ok(r) if r.status().is_success() => {
                        metrics.alerts.with_label_values(&[channel, "sent"]).inc();
                        return;
                    }
                    Ok(r) => {
                        tracing::warn!(channel, status = r.status().as_u16(), "alert refused");
                    }
                    // the URL may hold a token (Feishu hook ids, Matrix access_token): not logged
                    Err(e) => tracing::warn!(channel, error = %e.without_url(), "alert not sent"),
                }
                if attempt == 0 {
                    tokio::time::sleep(RETRY_AFTER).await;
                }
            }
            metrics.alerts.with_label_values(&[channel, "failed"]).inc();
        });
    }
}

/// Feishu's signature: base64(HMAC-SHA256(key = "{timestamp}\n{secret}", message = "")).
pub fn feishu_sign(timestamp: u64, secret: &str) -> String {
    use base64::Engine;
    use hmac::{Hmac, Mac};
    let key = format!("{timestamp}\n{secret}");
    let Ok(mac) = Hmac::<sha2::Sha256>::new_from_slice(key.as_bytes()) else {
        return String::new();
    };
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// `PUT {homeserver}/_matrix/client/v3/rooms/{room}/send/m.room.message/{txn}`; a `MATRIX_API`
/// URL that already ends in `/send/m.room.message` gets only the transaction id appended.
fn matrix_url(m: &keypool_config::Matrix, txn: &str) -> url::Url {
    let mut url = m.homeserver.clone();
    let base = url.path().trim_end_matches('/').to_owned();
    let path = if let Some(room) = &m.room_id {
        let room = url::form_urlencoded::byte_serialize(room.as_bytes()).collect::<String>();
        format!("{base}/_matrix/client/v3/rooms/{room}/send/m.room.message/{txn}")
    } else {
        format!("{base}/{txn}")
    };
    url.set_path(&path);
    url
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feishu_signature_matches_the_documented_algorithm() {
        // computed independently: printf '' | openssl dgst -sha256 -hmac "1700000000\nsecret" -binary | base64
        assert_eq!(
            feishu_sign(1_700_000_000, "secret"),
            "fiWS2+gh28DOydAv7hzONH/mDn9+b1Y4Y5ivXWXy8vA="
        );
    }

    #[test]
    fn matrix_urls() {
        let m = keypool_config::Matrix {
            homeserver: url::Url::parse("http://127.0.0.1:9/").unwrap(),
            access_token: None,
            room_id: Some("!abc:example.org".into()),
        };
        assert_eq!(
            matrix_url(&m, "t1").as_str(),
            "http://127.0.0.1:9/_matrix/client/v3/rooms/%21abc%3Aexample.org/send/m.room.message/t1"
        );
        let legacy = keypool_config::Matrix {
            homeserver: url::Url::parse(
                "https://h/_matrix/client/r0/rooms/!r:h/send/m.room.message?access_token=x",
            )
            .unwrap(),
            access_token: None,
            room_id: None,
        };
        assert_eq!(
            matrix_url(&legacy, "t2").as_str(),
            "https://h/_matrix/client/r0/rooms/!r:h/send/m.room.message/t2?access_token=x"
        );
    }
}
