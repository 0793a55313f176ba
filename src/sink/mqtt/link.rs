//! One MQTT connection, and the thread that owns its event loop and pairs
//! every acknowledgement with the call that waits for it.
//!
//! rumqttc's `publish` only queues a request and returns no packet id. The
//! event loop takes requests one at a time, in queue order, and reports
//! each as `Outgoing::Publish(pkid)` when it writes it (or
//! `Outgoing::AwaitAck(pkid)` when that id is still unacknowledged, and
//! `Outgoing::Publish(pkid)` once it is sent after all). So a caller queues
//! its request and its [`Waiter`] under one lock, in the same order; the
//! thread gives each `Publish(pkid)` the oldest waiter, and each PUBACK
//! (QoS 1) or PUBREC then PUBCOMP (QoS 2) answers the waiter of its pkid.
//! Nothing is answered "acknowledged" before its acknowledgement, and when
//! the connection ends every waiter still on it is answered "lost".

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use crossbeam_channel::Sender;
use rumqttc::v5::mqttbytes::v5::{
    Packet, PubAckReason, PubCompReason, PubRecReason, Publish, PublishProperties,
};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{Client, Connection, Event, MqttOptions};
use rumqttc::Outgoing;

use crate::sink::DeliveryError;

/// Room in rumqttc's request queue. Requests beyond the broker's receive
/// maximum wait there; the relay's batches are far smaller.
const QUEUE: usize = 1 << 16;

/// One message, ready to publish.
pub(super) struct Message {
    pub(super) topic: String,
    pub(super) qos: QoS,
    pub(super) payload: Vec<u8>,
    pub(super) properties: PublishProperties,
}

/// What became of one message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Answer {
    /// PUBACK (QoS 1) or PUBCOMP (QoS 2) with a success reason code;
    /// `no_subscribers`: reason code 0x10, "No matching subscribers".
    Acked { no_subscribers: bool },
    /// A reason code of 0x80 or above.
    Refused(u8),
    /// No acknowledgement: the connection failed or was closed first.
    Lost(String),
}

/// A caller waiting for one message's answer.
struct Waiter {
    index: usize,
    reply: Sender<(usize, Answer)>,
    /// A QoS 2 message whose PUBREC said "no matching subscribers".
    no_subscribers: bool,
}

impl Waiter {
    fn answer(self, answer: Answer) {
        // The caller may have stopped waiting (its timeout): nobody to tell.
        let _ = self.reply.send((self.index, answer));
    }
}

/// What the broker's CONNACK allows.
#[derive(Clone, Copy)]
struct Limits {
    max_packet_size: Option<u32>,
    max_qos: Option<u8>,
}

enum Phase {
    Connecting,
    Connected(Limits),
    /// Why it ended; every later call gets this as a transient failure.
    Closed(String),
}

struct Track {
    phase: Phase,
    /// Queued in rumqttc, not written yet (no packet id yet), oldest first.
    queued: VecDeque<Waiter>,
    /// A request rumqttc holds back until this packet id is acknowledged.
    collided: Option<(u16, Waiter)>,
    /// Written; waiting for PUBACK (QoS 1) or PUBREC (QoS 2).
    unacked: HashMap<u16, Waiter>,
    /// QoS 2, PUBREC received; waiting for PUBCOMP.
    unreleased: HashMap<u16, Waiter>,
    /// A refused PUBREC or PUBCOMP leaves rumqttc counting one message in
    /// flight for good: stop taking messages, and close once the rest are
    /// answered (the next call reconnects).
    retiring: bool,
}

impl Track {
    fn is_empty(&self) -> bool {
        self.queued.is_empty()
            && self.collided.is_none()
            && self.unacked.is_empty()
            && self.unreleased.is_empty()
    }

    /// Ends the connection's life: answers every waiter `Lost(reason)`.
    fn close(&mut self, reason: String) {
        if matches!(self.phase, Phase::Closed(_)) {
            return;
        }
        let waiters = self
            .queued
            .drain(..)
            .chain(self.collided.take().map(|(_, w)| w))
            .chain(self.unacked.drain().map(|(_, w)| w))
            .chain(self.unreleased.drain().map(|(_, w)| w));
        for waiter in waiters {
            waiter.answer(Answer::Lost(reason.clone()));
        }
        self.phase = Phase::Closed(reason);
    }
}

/// One connection to the broker, shared by every call until it ends.
pub(super) struct Link {
    client: Client,
    track: Mutex<Track>,
    /// Signalled when the connection is up or closed.
    changed: Condvar,
}

impl Link {
    /// Starts connecting, on a thread of its own that runs the event loop.
    pub(super) fn open(options: MqttOptions) -> Result<Arc<Link>, DeliveryError> {
        let (client, connection) = Client::new(options, QUEUE);
        let link = Arc::new(Link {
            client,
            track: Mutex::new(Track {
                phase: Phase::Connecting,
                queued: VecDeque::new(),
                collided: None,
                unacked: HashMap::new(),
                unreleased: HashMap::new(),
                retiring: false,
            }),
            changed: Condvar::new(),
        });
        let owner = link.clone();
        std::thread::Builder::new()
            .name("outbox-mqtt".into())
            .spawn(move || owner.run(connection))
            .map_err(|e| DeliveryError::transient(format!("MQTT: cannot start a thread: {e}")))?;
        Ok(link)
    }

    fn track(&self) -> MutexGuard<'_, Track> {
        self.track
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(super) fn is_closed(&self) -> bool {
        matches!(self.track().phase, Phase::Closed(_))
    }

    /// Waits until the connection is up (or fails, or `deadline` passes).
    pub(super) fn connected(&self, deadline: Instant) -> Result<(), DeliveryError> {
        let mut track = self.track();
        loop {
            match &track.phase {
                Phase::Connected(_) => return Ok(()),
                Phase::Closed(reason) => return Err(DeliveryError::transient(reason)),
                Phase::Connecting => {}
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let reason = "MQTT unreachable: no CONNACK in time".to_owned();
                drop(track);
                self.close(reason.clone());
                return Err(DeliveryError::transient(reason));
            }
            track = self
                .changed
                .wait_timeout(track, left)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }

    /// Queues `message`; its answer comes to `reply`, tagged `index`.
    pub(super) fn publish(
        &self,
        message: Message,
        index: usize,
        reply: Sender<(usize, Answer)>,
    ) -> Result<(), DeliveryError> {
        let mut track = self.track();
        let limits = match &track.phase {
            Phase::Closed(reason) => return Err(DeliveryError::transient(reason)),
            _ if track.retiring => {
                return Err(DeliveryError::transient(
                    "MQTT: reconnecting after a refused QoS 2 message",
                ))
            }
            Phase::Connected(limits) => *limits,
            Phase::Connecting => Limits {
                max_packet_size: None,
                max_qos: None,
            },
        };
        if message.qos == QoS::ExactlyOnce && limits.max_qos.is_some_and(|q| q < 2) {
            return Err(DeliveryError::transient(
                "MQTT: the broker takes QoS 1 at most; QoS 2 was configured",
            ));
        }
        if let Some(max) = limits.max_packet_size {
            let size = Publish::new(
                &message.topic,
                message.qos,
                message.payload.clone(),
                Some(message.properties.clone()),
            )
            .size();
            if size > max as usize {
                return Err(DeliveryError::permanent(format!(
                    "MQTT: the message to {} is {size} bytes, over the broker's maximum packet size of {max}",
                    message.topic
                )));
            }
        }
        self.client
            .try_publish_with_properties(
                message.topic,
                message.qos,
                false,
                message.payload,
                message.properties,
            )
            .map_err(|e| DeliveryError::transient(format!("MQTT: {e}")))?;
        track.queued.push_back(Waiter {
            index,
            reply,
            no_subscribers: false,
        });
        Ok(())
    }

    /// Ends the connection: every waiter on it is answered `Lost(reason)`,
    /// and the event loop's thread stops.
    pub(super) fn close(&self, reason: String) {
        self.track().close(reason);
        self.changed.notify_all();
        // Wakes the event loop, which then sees the link closed.
        let _ = self.client.try_disconnect();
    }

    /// The event loop's thread: runs until the connection fails or the
    /// link is closed.
    fn run(self: Arc<Self>, mut connection: Connection) {
        loop {
            let event = connection.recv();
            let mut track = self.track();
            if matches!(track.phase, Phase::Closed(_)) {
                return;
            }
            match event {
                Ok(Ok(event)) => handle(&mut track, event),
                Ok(Err(error)) => {
                    let reason = match track.phase {
                        Phase::Connecting => format!("MQTT unreachable: {error}"),
                        _ => format!("MQTT connection lost: {error}"),
                    };
                    track.close(reason);
                }
                Err(_) => track.close("MQTT: the event loop stopped".to_owned()),
            }
            if track.retiring && track.is_empty() {
                track.close("MQTT: reconnecting after a refused QoS 2 message".to_owned());
            }
            if matches!(track.phase, Phase::Closed(_)) {
                drop(track);
                self.changed.notify_all();
                return;
            }
            let connected = matches!(track.phase, Phase::Connected(_));
            drop(track);
            if connected {
                self.changed.notify_all();
            }
        }
    }
}

/// Applies one event of the event loop to the waiters.
fn handle(track: &mut Track, event: Event) {
    match event {
        Event::Incoming(Packet::ConnAck(connack)) => {
            let props = connack.properties.as_ref();
            track.phase = Phase::Connected(Limits {
                max_packet_size: props.and_then(|p| p.max_packet_size),
                max_qos: props.and_then(|p| p.max_qos),
            });
        }
        Event::Outgoing(Outgoing::Publish(pkid)) => {
            let waiter = match track.collided.take() {
                Some((held, waiter)) if held == pkid => Some(waiter),
                other => {
                    track.collided = other;
                    track.queued.pop_front()
                }
            };
            if let Some(waiter) = waiter {
                track.unacked.insert(pkid, waiter);
            }
        }
        Event::Outgoing(Outgoing::AwaitAck(pkid)) => {
            if let Some(waiter) = track.queued.pop_front() {
                track.collided = Some((pkid, waiter));
            }
        }
        Event::Incoming(Packet::PubAck(ack)) => {
            if let Some(waiter) = track.unacked.remove(&ack.pkid) {
                waiter.answer(match ack.reason {
                    PubAckReason::Success => Answer::Acked {
                        no_subscribers: false,
                    },
                    PubAckReason::NoMatchingSubscribers => Answer::Acked {
                        no_subscribers: true,
                    },
                    refused => Answer::Refused(puback_code(refused)),
                });
            }
        }
        Event::Incoming(Packet::PubRec(rec)) => {
            if let Some(mut waiter) = track.unacked.remove(&rec.pkid) {
                match rec.reason {
                    PubRecReason::Success => {}
                    PubRecReason::NoMatchingSubscribers => waiter.no_subscribers = true,
                    refused => {
                        waiter.answer(Answer::Refused(pubrec_code(refused)));
                        track.retiring = true;
                        return;
                    }
                }
                track.unreleased.insert(rec.pkid, waiter);
            }
        }
        Event::Incoming(Packet::PubComp(comp)) => {
            if let Some(waiter) = track.unreleased.remove(&comp.pkid) {
                match comp.reason {
                    PubCompReason::Success => {
                        let no_subscribers = waiter.no_subscribers;
                        waiter.answer(Answer::Acked { no_subscribers });
                    }
                    PubCompReason::PacketIdentifierNotFound => {
                        waiter.answer(Answer::Refused(0x92));
                        track.retiring = true;
                    }
                }
            }
        }
        _ => {}
    }
}

/// The reason code byte of a refused PUBACK (MQTT 5, 3.4.2.1).
pub(super) fn puback_code(reason: PubAckReason) -> u8 {
    match reason {
        PubAckReason::Success => 0x00,
        PubAckReason::NoMatchingSubscribers => 0x10,
        PubAckReason::UnspecifiedError => 0x80,
        PubAckReason::ImplementationSpecificError => 0x83,
        PubAckReason::NotAuthorized => 0x87,
        PubAckReason::TopicNameInvalid => 0x90,
        PubAckReason::PacketIdentifierInUse => 0x91,
        PubAckReason::QuotaExceeded => 0x97,
        PubAckReason::PayloadFormatInvalid => 0x99,
    }
}

/// The reason code byte of a refused PUBREC (the same codes as PUBACK).
fn pubrec_code(reason: PubRecReason) -> u8 {
    match reason {
        PubRecReason::Success => 0x00,
        PubRecReason::NoMatchingSubscribers => 0x10,
        PubRecReason::UnspecifiedError => 0x80,
        PubRecReason::ImplementationSpecificError => 0x83,
        PubRecReason::NotAuthorized => 0x87,
        PubRecReason::TopicNameInvalid => 0x90,
        PubRecReason::PacketIdentifierInUse => 0x91,
        PubRecReason::QuotaExceeded => 0x97,
        PubRecReason::PayloadFormatInvalid => 0x99,
    }
}

#[cfg(test)]
mod tests {
    use rumqttc::v5::mqttbytes::v5::{PubAck, PubComp, PubRec};

    use super::*;

    fn track() -> Track {
        Track {
            phase: Phase::Connecting,
            queued: VecDeque::new(),
            collided: None,
            unacked: HashMap::new(),
            unreleased: HashMap::new(),
            retiring: false,
        }
    }

    fn wait(track: &mut Track, index: usize, reply: &Sender<(usize, Answer)>) {
        track.queued.push_back(Waiter {
            index,
            reply: reply.clone(),
            no_subscribers: false,
        });
    }

    fn puback(pkid: u16, reason: PubAckReason) -> Event {
        Event::Incoming(Packet::PubAck(PubAck {
            pkid,
            reason,
            properties: None,
        }))
    }

    #[test]
    fn acknowledgements_reach_the_waiter_of_their_packet_id_in_request_order() {
        let (reply, answers) = crossbeam_channel::unbounded();
        let mut track = track();
        for index in 0..3 {
            wait(&mut track, index, &reply);
        }
        handle(&mut track, Event::Outgoing(Outgoing::Publish(7)));
        handle(&mut track, Event::Outgoing(Outgoing::Publish(8)));
        // pkid 7 is still unacknowledged when the third request gets it:
        // rumqttc holds it back, then sends it once 7 is acknowledged.
        handle(&mut track, Event::Outgoing(Outgoing::AwaitAck(7)));
        assert!(
            answers.try_recv().is_err(),
            "nothing answered before an ack"
        );
        handle(&mut track, puback(8, PubAckReason::NotAuthorized));
        handle(&mut track, puback(7, PubAckReason::Success));
        handle(&mut track, Event::Outgoing(Outgoing::Publish(7)));
        handle(&mut track, puback(7, PubAckReason::NoMatchingSubscribers));
        let got: Vec<_> = answers.try_iter().collect();
        assert_eq!(
            got,
            [
                (1, Answer::Refused(0x87)),
                (
                    0,
                    Answer::Acked {
                        no_subscribers: false
                    }
                ),
                (
                    2,
                    Answer::Acked {
                        no_subscribers: true
                    }
                ),
            ]
        );
        assert!(track.is_empty());
    }

    #[test]
    fn qos_2_is_answered_on_pubcomp_and_remembers_a_pubrec_without_subscribers() {
        let (reply, answers) = crossbeam_channel::unbounded();
        let mut track = track();
        wait(&mut track, 0, &reply);
        wait(&mut track, 1, &reply);
        handle(&mut track, Event::Outgoing(Outgoing::Publish(1)));
        handle(&mut track, Event::Outgoing(Outgoing::Publish(2)));
        let pubrec = |pkid, reason| {
            Event::Incoming(Packet::PubRec(PubRec {
                pkid,
                reason,
                properties: None,
            }))
        };
        handle(&mut track, pubrec(1, PubRecReason::NoMatchingSubscribers));
        handle(&mut track, pubrec(2, PubRecReason::Success));
        assert!(
            answers.try_recv().is_err(),
            "PUBREC is not the end of QoS 2"
        );
        for pkid in [2, 1] {
            let comp = PubComp {
                pkid,
                reason: PubCompReason::Success,
                properties: None,
            };
            handle(&mut track, Event::Incoming(Packet::PubComp(comp)));
        }
        let got: Vec<_> = answers.try_iter().collect();
        assert_eq!(
            got,
            [
                (
                    1,
                    Answer::Acked {
                        no_subscribers: false
                    }
                ),
                (
                    0,
                    Answer::Acked {
                        no_subscribers: true
                    }
                ),
            ]
        );
        // A refused PUBREC ends its message and retires the connection.
        wait(&mut track, 2, &reply);
        handle(&mut track, Event::Outgoing(Outgoing::Publish(3)));
        handle(&mut track, pubrec(3, PubRecReason::QuotaExceeded));
        assert_eq!(answers.try_recv().unwrap(), (2, Answer::Refused(0x97)));
        assert!(track.retiring);
    }

    #[test]
    fn closing_answers_every_waiter_lost() {
        let (reply, answers) = crossbeam_channel::unbounded();
        let mut track = track();
        for index in 0..3 {
            wait(&mut track, index, &reply);
        }
        handle(&mut track, Event::Outgoing(Outgoing::Publish(1)));
        track.close("MQTT connection lost: reset".into());
        let mut got: Vec<_> = answers.try_iter().collect();
        got.sort_by_key(|(index, _)| *index);
        let lost = Answer::Lost("MQTT connection lost: reset".into());
        assert_eq!(got, [(0, lost.clone()), (1, lost.clone()), (2, lost)]);
        assert!(track.is_empty());
    }
}
