//! The listener thread: one dedicated connection that LISTENs and turns
//! notifications into wake-ups for the workers
//! of every subscription.
//!
//! It only wakes; the workers decide what to claim. A burst of
//! notifications becomes at most one pending wake-up (the channel holds
//! one), and after every (re)connection it wakes the workers at once, since
//! notifications sent while it was away are lost. After a notification it
//! disarms the wake-up flag this relay armed (see `wakeup`), so publishers
//! stop notifying while the relay is awake.

use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{select, Receiver, Sender, TryRecvError};
use rand::SeedableRng;

use super::pq::PqListener;
use super::Shared;
use crate::backoff::Backoff;
use crate::error::Error;
use crate::observe::Counters;

/// How long one wait on the socket lasts at most: bounds how late the
/// listener notices a shutdown. Not a poll: the wait ends at once when a
/// notification arrives.
const WAIT_SLICE: Duration = Duration::from_millis(250);

/// Wakes one worker of every subscription.
fn wake_all(wake: &[Sender<()>]) {
    for sender in wake {
        let _ = sender.try_send(());
    }
}

pub(super) fn run(shared: Arc<Shared>, url: String, wake: Vec<Sender<()>>, shutdown: Receiver<()>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(rand::random());
    let reconnect = Backoff::new(Duration::from_millis(100), Duration::from_secs(5), 2.0, 0.5);
    let mut failures: u32 = 0;
    loop {
        match connect(&url) {
            Ok(mut listener) => {
                if failures > 0 {
                    Counters::add(&shared.counters.reconnects, 1);
                    shared.observer.on_reconnect("listener");
                    tracing::info!(relay = %shared.name, "listener reconnected");
                }
                failures = 0;
                wake_all(&wake);
                loop {
                    if matches!(shutdown.try_recv(), Err(TryRecvError::Disconnected)) {
                        return;
                    }
                    match listener.wait(WAIT_SLICE) {
                        Ok(0) => {}
                        Ok(notifications) => {
                            wake_all(&wake);
                            shared.wakeup.notified(notifications);
                            // After the wake-up, so the claim does not wait
                            // for it. Publishers stop notifying now; this
                            // relay re-arms once its workers sleep again.
                            if shared.wakeup.take_armed() {
                                if let Err(message) = listener.execute(crate::store::wakeup::DISARM)
                                {
                                    report(&shared, "listener connection lost", message);
                                    break;
                                }
                            }
                        }
                        Err(message) => {
                            report(&shared, "listener connection lost", message);
                            break;
                        }
                    }
                }
            }
            Err(message) => report(&shared, "listener could not connect", message),
        }
        failures = failures.saturating_add(1);
        select! {
            recv(shutdown) -> _ => return,
            default(reconnect.delay(failures, &mut rng)) => {}
        }
    }
}

fn connect(url: &str) -> Result<PqListener, String> {
    let mut listener = PqListener::connect(url)?;
    listener.execute(&format!("LISTEN {}", crate::NOTIFY_CHANNEL))?;
    Ok(listener)
}

fn report(shared: &Shared, what: &'static str, message: String) {
    Counters::add(&shared.counters.errors, 1);
    tracing::warn!(relay = %shared.name, error = %message, "{what}; polling until it is back");
    shared.observer.on_error(&Error::Listener(message));
}
