//! The bad-input catalogue (docs/bad-inputs.md): what each kind of bad
//! input does, asserted exactly. Every case ends in a typed error or a
//! documented behaviour, with nothing half-written, no panic and nothing
//! lost. Cases already covered elsewhere are named in the catalogue.

#[cfg(feature = "cli")]
mod cli;
mod database;
mod publish;
#[cfg(feature = "webhook")]
mod webhook;
