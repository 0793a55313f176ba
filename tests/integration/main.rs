//! Integration tests against a real PostgreSQL: one database per test.

#[path = "../support/pg.rs"]
mod pg;

mod admin;
mod bad_inputs;
#[cfg(feature = "cli")]
mod cli;
mod common;
#[cfg(feature = "kafka")]
#[path = "../support/kafka_admin.rs"]
mod kafka_admin;
mod migrate;
mod pgbouncer;
mod properties;
mod publish;
mod publish_idempotent;
mod publish_in_transaction;
mod relay_blocked_keys;
mod relay_connections;
mod relay_delivery;
mod relay_failures;
mod relay_housekeeping;
mod relay_leases;
mod relay_order;
mod relay_processes;
mod relay_rate_limit;
mod relay_schedule;
mod relay_subscriptions;
mod relay_support;
mod relay_wakeup;
mod schema_contract;
mod security;
#[cfg(feature = "amqp")]
mod sink_amqp;
#[cfg(feature = "kafka")]
mod sink_kafka;
#[cfg(feature = "mqtt")]
mod sink_mqtt;
#[cfg(feature = "nats")]
mod sink_nats;
#[cfg(feature = "redis")]
mod sink_redis;
#[cfg(feature = "webhook")]
mod sink_webhook;
#[cfg(any(
    feature = "redis",
    feature = "nats",
    feature = "amqp",
    feature = "mqtt"
))]
mod tcp_proxy;
#[cfg(feature = "opentelemetry")]
mod tracing_context;
