//! Pushes each interval's profiles to a Pyroscope server's `/ingest`.
//!
//! Profiles wait in a bounded queue. A push that fails for a reason that may
//! pass (the server is down, overloaded or timing out) is retried with
//! exponential backoff and keeps its place at the head of the queue; one
//! the server rejects as malformed is dropped. When the queue is full the
//! oldest profile is dropped. Every drop is counted in the metrics.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::{Arc, Mutex},
    time::Duration,
};

use base64::Engine as _;
use log::{debug, info, warn};
use tokio::sync::Notify;

use super::{config::Auth, config::PushConfig, metrics::Metrics};

const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(60);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// One process's profile of one interval.
#[derive(Clone, Debug)]
pub struct Upload {
    pub app_name: String,
    pub labels: BTreeMap<String, String>,
    pub from_unix_s: u64,
    pub until_unix_s: u64,
    pub frequency_hz: u64,
    /// gzip-compressed pprof.
    pub pprof_gz: Vec<u8>,
}

/// The queue shared by the sampling loop and the push task.
pub struct Queue {
    items: Mutex<VecDeque<Upload>>,
    capacity: Mutex<usize>,
    wake: Notify,
    metrics: Arc<Metrics>,
}

impl Queue {
    pub fn new(capacity: usize, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            items: Mutex::new(VecDeque::new()),
            capacity: Mutex::new(capacity),
            wake: Notify::new(),
            metrics,
        })
    }

    /// Queues a profile; when the queue is full, the oldest one is dropped
    /// and counted.
    pub fn push(&self, upload: Upload) {
        let capacity = *self.capacity.lock().unwrap();
        let mut items = self.items.lock().unwrap();
        while items.len() >= capacity {
            let Some(dropped) = items.pop_front() else {
                break;
            };
            self.metrics.push_dropped(1);
            warn!(
                "the Pyroscope queue is full ({capacity} profiles); dropped the profile of {} \
                 from {}",
                dropped.app_name,
                crate::event_loop::rfc3339(dropped.from_unix_s as f64)
            );
        }
        items.push_back(upload);
        self.metrics.set_push_queue(items.len());
        drop(items);
        self.wake.notify_one();
    }

    pub fn set_capacity(&self, capacity: usize) {
        *self.capacity.lock().unwrap() = capacity;
    }

    pub fn len(&self) -> usize {
        self.items.lock().unwrap().len()
    }

    fn front(&self) -> Option<Upload> {
        self.items.lock().unwrap().front().cloned()
    }

    fn pop(&self) {
        let mut items = self.items.lock().unwrap();
        items.pop_front();
        self.metrics.set_push_queue(items.len());
    }
}

/// What a push attempt came to.
#[derive(Debug, PartialEq)]
enum Outcome {
    Sent,
    /// Worth trying again later.
    Retry(String),
    /// The server will not take this profile.
    Rejected(String),
}

/// Sends queued profiles until the queue is closed, backing off while the
/// server fails. `config` is read before each attempt, so a reload applies
/// to the next push.
pub async fn run(queue: Arc<Queue>, config: Arc<Mutex<PushConfig>>) {
    let mut backoff = FIRST_BACKOFF;
    loop {
        let Some(upload) = queue.front() else {
            queue.wake.notified().await;
            continue;
        };
        let target = config.lock().unwrap().clone();
        let outcome = tokio::task::spawn_blocking(move || send(&target, &upload))
            .await
            .unwrap_or_else(|err| Outcome::Retry(format!("push task failed: {err}")));
        match outcome {
            Outcome::Sent => {
                queue.metrics.push_result(true);
                queue.pop();
                if backoff > FIRST_BACKOFF {
                    info!("Pyroscope push works again");
                }
                backoff = FIRST_BACKOFF;
            }
            Outcome::Rejected(why) => {
                queue.metrics.push_result(false);
                queue.metrics.push_dropped(1);
                queue.pop();
                warn!("Pyroscope rejected a profile ({why}); dropped it");
            }
            Outcome::Retry(why) => {
                queue.metrics.push_result(false);
                if backoff == FIRST_BACKOFF {
                    warn!("cannot push to Pyroscope ({why}); retrying with backoff");
                } else {
                    debug!("push failed again ({why}); next try in {backoff:?}");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// Tries to empty the queue before exit, for at most `limit`.
pub async fn flush(queue: &Queue, config: &PushConfig, limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    while let Some(upload) = queue.front() {
        if tokio::time::Instant::now() >= deadline {
            break;
        }
        let target = config.clone();
        let outcome = tokio::task::spawn_blocking(move || send(&target, &upload)).await;
        match outcome {
            Ok(Outcome::Sent) => {
                queue.metrics.push_result(true);
                queue.pop();
            }
            Ok(Outcome::Rejected(_)) => queue.pop(),
            _ => break,
        }
    }
    let left = queue.len();
    if left > 0 {
        warn!("{left} profiles were not pushed to Pyroscope before exit; they are on disk");
    }
}

/// The `/ingest` URL of one profile: the application name with its labels,
/// the time range in Unix seconds, and the sampling rate.
fn ingest_url(config: &PushConfig, upload: &Upload) -> String {
    let mut labels = config.labels.clone();
    labels.extend(upload.labels.clone());
    let labels: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("{}={}", label_part(k), label_part(v)))
        .collect();
    let name = format!("{}.cpu{{{}}}", upload.app_name, labels.join(","));
    format!(
        "{}/ingest?name={}&from={}&until={}&format=pprof&sampleRate={}&spyName=ebpfspy\
         &units=samples&aggregationType=sum",
        config.url,
        percent_encode(&name),
        upload.from_unix_s,
        upload.until_unix_s,
        upload.frequency_hz,
    )
}

/// Label keys and values may not hold the characters that delimit them.
fn label_part(text: &str) -> String {
    text.chars()
        .map(|c| {
            if matches!(c, '{' | '}' | ',' | '=' | '"') {
                '_'
            } else {
                c
            }
        })
        .collect()
}

fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// The multipart body: the profile as the `profile` file field.
fn multipart_body(pprof_gz: &[u8], boundary: &str) -> Vec<u8> {
    let mut body = Vec::with_capacity(pprof_gz.len() + 256);
    body.extend_from_slice(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"profile\"; \
             filename=\"profile.pb.gz\"\r\nContent-Type: application/octet-stream\r\n\r\n"
        )
        .as_bytes(),
    );
    body.extend_from_slice(pprof_gz);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    body
}

fn send(config: &PushConfig, upload: &Upload) -> Outcome {
    let url = ingest_url(config, upload);
    let boundary = format!("profiler-{:016x}", upload.from_unix_s ^ 0x5eed_cafe_f00d);
    let body = multipart_body(&upload.pprof_gz, &boundary);
    let agent = ureq::Agent::config_builder()
        .timeout_global(Some(REQUEST_TIMEOUT))
        .http_status_as_error(false)
        .build()
        .new_agent();
    let mut request = agent.post(&url).header(
        "Content-Type",
        format!("multipart/form-data; boundary={boundary}"),
    );
    match &config.auth {
        Auth::None => {}
        Auth::Bearer(token) => request = request.header("Authorization", format!("Bearer {token}")),
        Auth::Basic { user, password } => {
            let encoded =
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
            request = request.header("Authorization", format!("Basic {encoded}"));
        }
    }
    if let Some(tenant) = &config.tenant {
        request = request.header("X-Scope-OrgID", tenant);
    }
    match request.send(&body[..]) {
        Ok(response) => {
            let status = response.status().as_u16();
            match status {
                200..=299 => Outcome::Sent,
                408 | 429 | 500..=599 => Outcome::Retry(format!("HTTP {status}")),
                _ => {
                    let mut text = response.into_body().read_to_string().unwrap_or_default();
                    text.truncate(200);
                    Outcome::Rejected(format!("HTTP {status}: {}", text.trim()))
                }
            }
        }
        Err(err) => Outcome::Retry(err.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> PushConfig {
        PushConfig {
            url: "http://127.0.0.1:4040".into(),
            app_name: None,
            auth: Auth::None,
            tenant: None,
            queue: 2,
            labels: BTreeMap::from([("env".into(), "prod".into())]),
        }
    }

    fn upload(from: u64) -> Upload {
        Upload {
            app_name: "node".into(),
            labels: BTreeMap::from([
                ("pid".into(), "42".into()),
                ("cgroup".into(), "/a,b".into()),
            ]),
            from_unix_s: from,
            until_unix_s: from + 60,
            frequency_hz: 19,
            pprof_gz: vec![1, 2, 3],
        }
    }

    #[test]
    fn url_carries_name_labels_and_range() {
        let url = ingest_url(&config(), &upload(100));
        assert_eq!(
            url,
            "http://127.0.0.1:4040/ingest?name=node.cpu%7Bcgroup%3D%2Fa_b%2Cenv%3Dprod%2Cpid%3D42%7D\
             &from=100&until=160&format=pprof&sampleRate=19&spyName=ebpfspy&units=samples\
             &aggregationType=sum"
        );
    }

    #[test]
    fn full_queue_drops_the_oldest_and_counts_it() {
        let metrics = Arc::new(Metrics::default());
        let queue = Queue::new(2, metrics.clone());
        for from in [1, 2, 3] {
            queue.push(upload(from));
        }
        assert_eq!(queue.len(), 2);
        assert_eq!(queue.front().unwrap().from_unix_s, 2);
        assert_eq!(metrics.snapshot().push_dropped, 1);
    }

    #[test]
    fn refused_connection_is_worth_a_retry() {
        // Port 9 (discard) is not listened on here.
        let mut target = config();
        target.url = "http://127.0.0.1:9".into();
        assert!(matches!(send(&target, &upload(1)), Outcome::Retry(_)));
    }

    #[test]
    fn multipart_body_frames_the_profile() {
        let body = multipart_body(b"PPROF", "xyz");
        let text = String::from_utf8(body).unwrap();
        assert!(text.starts_with("--xyz\r\nContent-Disposition: form-data; name=\"profile\""));
        assert!(text.ends_with("\r\n\r\nPPROF\r\n--xyz--\r\n"));
    }
}
