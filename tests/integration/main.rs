//! Integration tests against a real PostgreSQL: one database per test.

#[path = "../support/pg.rs"]
mod pg;

mod common;
mod migrate;
mod publish;
mod schema_contract;
