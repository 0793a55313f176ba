use std::time::Duration;

use super::link::{puback_code, Answer};
use super::{mqtt_topic, verdict, Broker, MqttSink};
use crate::sink::DeliveryErrorKind;
use crate::Error;

fn config_field(result: Result<MqttSink, Error>) -> (&'static str, String) {
    match result {
        Err(Error::Config { field, reason }) => (field, reason),
        other => panic!("expected a config error, got {other:?}"),
    }
}

#[test]
fn credentials_leave_the_url_and_never_show() {
    let broker = Broker::parse("mqtt://app:s3%40cret@127.0.0.1:1884").unwrap();
    assert_eq!(
        broker,
        Broker {
            tls: false,
            host: "127.0.0.1".into(),
            port: 1884,
            credentials: Some(("app".into(), "s3@cret".into())),
        }
    );
    let builder = MqttSink::builder("mqtt://app:s3cret@127.0.0.1", "outbox");
    assert!(!format!("{builder:?}").contains("s3cret"), "{builder:?}");
    let sink = builder.build().unwrap();
    let debug = format!("{sink:?}");
    assert!(!debug.contains("s3cret"), "{debug}");
    assert!(debug.contains("127.0.0.1"), "{debug}");
    // A malformed URL's error does not quote it either.
    let (field, reason) = config_field(MqttSink::builder("mqtt://app:s3cret@h:x", "o").build());
    assert_eq!(field, "mqtt.url");
    assert!(!reason.contains("s3cret"), "{reason}");
}

#[test]
fn urls_give_host_port_and_scheme() {
    let parse = |url| Broker::parse(url).map(|b| (b.tls, b.host, b.port, b.credentials));
    assert_eq!(parse("mqtt://h"), Ok((false, "h".into(), 1883, None)));
    assert_eq!(parse("mqtts://h/"), Ok((true, "h".into(), 8883, None)));
    assert_eq!(
        parse("mqtt://[::1]:1999"),
        Ok((false, "::1".into(), 1999, None))
    );
    assert_eq!(
        parse("mqtt://u@h"),
        Ok((false, "h".into(), 1883, Some(("u".into(), "".into()))))
    );
    for bad in [
        "",
        "h:1883",
        "tcp://h",
        "mqtt://",
        "mqtt://h:0",
        "mqtt://h:x",
        "mqtt://h/a",
        "mqtt://h?x=1",
    ] {
        assert!(Broker::parse(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn bad_settings_are_config_errors() {
    let build = |b: super::MqttBuilder| config_field(b.build()).0;
    let url = "mqtt://127.0.0.1";
    assert_eq!(build(MqttSink::builder("http://h", "o")), "mqtt.url");
    assert_eq!(build(MqttSink::builder(url, "o").qos(0)), "mqtt.qos");
    assert_eq!(build(MqttSink::builder(url, "o").qos(3)), "mqtt.qos");
    assert_eq!(
        build(MqttSink::builder(url, "o").timeout(Duration::ZERO)),
        "mqtt.timeout"
    );
    assert_eq!(
        build(MqttSink::builder(url, "o").max_inflight(0)),
        "mqtt.max_inflight"
    );
    assert_eq!(
        build(MqttSink::builder(url, "o").client_id("")),
        "mqtt.client_id"
    );
    for prefix in ["", "a/+", "a/#", "a//b", "/a", "a/", "$SYS", "a\0b"] {
        assert_eq!(
            build(MqttSink::builder(url, prefix)),
            "mqtt.topic_prefix",
            "{prefix:?}"
        );
    }
    assert_eq!(
        build(MqttSink::builder("mqtts://h", "o").root_certificates_pem("not pem")),
        "mqtt.root_certificates"
    );
    assert!(MqttSink::builder(url, "a/b").qos(2).build().is_ok());
}

#[test]
fn topics_become_levels_under_the_prefix() {
    assert_eq!(
        mqtt_topic("outbox", "order.approved").unwrap(),
        "outbox/order/approved"
    );
    assert_eq!(mqtt_topic("a/b", "t").unwrap(), "a/b/t");
    assert_eq!(mqtt_topic("o", "with space").unwrap(), "o/with space");
    for (topic, problem) in [
        ("order.+", "wildcards (+, #) are not allowed"),
        ("a#", "wildcards (+, #) are not allowed"),
        ("a..b", "empty levels are not allowed"),
        ("a.", "empty levels are not allowed"),
        ("a\0", "NUL is not allowed"),
    ] {
        let error = mqtt_topic("o", topic).unwrap_err();
        assert_eq!(error.kind(), DeliveryErrorKind::Permanent);
        assert_eq!(
            error.message(),
            format!("topic {topic:?} does not make an MQTT topic name: {problem}")
        );
    }
}

#[test]
fn reason_codes_decide_the_verdict() {
    let kind = |answer, retry| verdict("o/t", answer, retry).map_err(|e| e.kind());
    let acked = |no_subscribers| Answer::Acked { no_subscribers };
    assert_eq!(kind(acked(false), false), Ok(()));
    assert_eq!(kind(acked(false), true), Ok(()));
    assert_eq!(kind(acked(true), false), Ok(()));
    assert_eq!(kind(acked(true), true), Err(DeliveryErrorKind::Transient));
    for code in [0x87, 0x90, 0x95, 0x99] {
        assert_eq!(
            kind(Answer::Refused(code), false),
            Err(DeliveryErrorKind::Permanent)
        );
    }
    for code in [0x80, 0x83, 0x91, 0x92, 0x97] {
        assert_eq!(
            kind(Answer::Refused(code), false),
            Err(DeliveryErrorKind::Transient)
        );
    }
    assert_eq!(
        kind(Answer::Lost("gone".into()), false),
        Err(DeliveryErrorKind::Transient)
    );
    assert_eq!(
        verdict("o/t", Answer::Refused(0x87), false)
            .unwrap_err()
            .message(),
        "MQTT: the broker refused topic o/t: not authorized (reason code 0x87)"
    );
    assert_eq!(
        verdict("o/t", acked(true), true).unwrap_err().message(),
        "MQTT: no subscriber matches topic o/t (reason code 0x10)"
    );
    use rumqttc::v5::mqttbytes::v5::PubAckReason;
    assert_eq!(puback_code(PubAckReason::NotAuthorized), 0x87);
    assert_eq!(puback_code(PubAckReason::PayloadFormatInvalid), 0x99);
    assert_eq!(puback_code(PubAckReason::QuotaExceeded), 0x97);
}
