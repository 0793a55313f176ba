//! The recording receiver: a webhook endpoint that records every attempt
//! (event id, key, which relay, status, when) and answers like an unreliable
//! service. It fails a share of attempts at random with 503 (transient), and
//! always refuses poison events (payload `"poison": true`) with 422
//! (permanent).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver as Rx, Sender};

/// One HTTP request the receiver answered.
#[derive(Clone, Debug)]
pub struct Attempt {
    pub id: i64,
    pub key: Option<String>,
    /// The `chaos-relay` header: which relay process sent it.
    pub relay: String,
    /// The `outbox-attempt` header: the relay's attempt number.
    pub attempt: u32,
    pub status: u16,
    pub at: Instant,
}

impl Attempt {
    pub fn delivered(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

pub struct Receiver {
    server: Arc<tiny_http::Server>,
    /// In the order the answers were decided: the index is a global clock.
    attempts: Arc<Mutex<Vec<Attempt>>>,
    delivered: Rx<i64>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

/// The body of a poison event's refusal: the dead letter must quote it.
pub const POISON_REFUSAL: &str = "poison event refused";

impl Receiver {
    /// Serves on a free port with `threads` handler threads, failing
    /// `fail_ratio` of the attempts of non-poison events with 503.
    pub fn start(threads: usize, fail_ratio: f64) -> Receiver {
        Self::start_on("127.0.0.1:0", threads, fail_ratio)
    }

    /// As [`Receiver::start`], on a given address.
    pub fn start_on(addr: &str, threads: usize, fail_ratio: f64) -> Receiver {
        let server = Arc::new(tiny_http::Server::http(addr).expect("binding the receiver"));
        let attempts: Arc<Mutex<Vec<Attempt>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (delivered_tx, delivered) = crossbeam_channel::unbounded();
        let threads = (0..threads)
            .map(|_| {
                let (server, attempts, stop, delivered_tx) = (
                    server.clone(),
                    attempts.clone(),
                    stop.clone(),
                    delivered_tx.clone(),
                );
                std::thread::spawn(move || {
                    serve(&server, &attempts, &stop, &delivered_tx, fail_ratio)
                })
            })
            .collect();
        Receiver {
            server,
            attempts,
            delivered,
            stop,
            threads,
        }
    }

    /// The webhook URL.
    pub fn url(&self) -> String {
        format!("http://{}/hook", self.server.server_addr().to_ip().unwrap())
    }

    /// Every attempt so far, in answer order.
    pub fn attempts(&self) -> Vec<Attempt> {
        self.attempts.lock().unwrap().clone()
    }

    /// The id of each successful delivery, as it happens: what tests wait on.
    pub fn delivered(&self) -> &Rx<i64> {
        &self.delivered
    }
}

fn serve(
    server: &tiny_http::Server,
    attempts: &Mutex<Vec<Attempt>>,
    stop: &AtomicBool,
    delivered: &Sender<i64>,
    fail_ratio: f64,
) {
    while !stop.load(Ordering::SeqCst) {
        // A timeout, so the thread sees `stop` when the receiver is dropped.
        let Ok(Some(mut request)) = server.recv_timeout(Duration::from_millis(100)) else {
            continue;
        };
        let header = |name: &str| {
            request
                .headers()
                .iter()
                .find(|h| h.field.as_str().as_str().eq_ignore_ascii_case(name))
                .map(|h| h.value.to_string())
        };
        let id: i64 = header("webhook-id")
            .and_then(|id| id.parse().ok())
            .expect("a webhook-id header with the event id");
        let key = header("outbox-key");
        let relay = header("chaos-relay").unwrap_or_default();
        let attempt = header("outbox-attempt")
            .and_then(|a| a.parse().ok())
            .unwrap_or(0);
        let mut body = String::new();
        let _ = request.as_reader().read_to_string(&mut body);
        let poison = serde_json::from_str::<serde_json::Value>(&body)
            .map(|b| b["data"]["poison"] == true)
            .unwrap_or(false);
        let status = if poison {
            422
        } else if rand::random_bool(fail_ratio) {
            503
        } else {
            204
        };
        // Recorded before the answer leaves: a relay only learns of the
        // delivery (and may move on to the key's next event) after this.
        attempts.lock().unwrap().push(Attempt {
            id,
            key,
            relay,
            attempt,
            status,
            at: Instant::now(),
        });
        if status == 204 {
            let _ = delivered.send(id);
        }
        let response = if poison {
            tiny_http::Response::from_string(POISON_REFUSAL).with_status_code(422)
        } else {
            tiny_http::Response::from_string("").with_status_code(status)
        };
        let _ = request.respond(response);
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}
