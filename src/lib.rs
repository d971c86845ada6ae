//! xsender-events: verified email-delivery webhooks in, Campaign Dispatch projections out.
//!
//! # Layout
//!
//! The pipeline is event-sourced and has three stages, each in its own module:
//!
//! 1. [`ingress`] (hyper): verifies a webhook over its raw bytes with the [`providers`] adapter,
//!    resolves the tenant, appends the verified raw envelope to the [`log`] and only then answers
//!    2xx. It also serves the read API, the admin API and the probes.
//! 2. [`stages::normalizer`]: raw envelopes → normalized [`event::DeliveryEvent`]s (Avro, see
//!    [`avro`] and `schemas/`), appended to the events log; unparseable items go to the
//!    dead-letter log with a reason.
//! 3. [`stages::projector`]: folds events with the pure [`fold`] into the [`projection`] store,
//!    keeping its checkpoint in the same transaction as the state it produced.
//!
//! [`tenants`] holds who may write what; [`config`] the documented settings; [`app`] wires the
//! stages together for `serve` and `rebuild`.

pub mod app;
pub mod avro;
pub mod config;
pub mod event;
pub mod fold;
pub mod ingress;
pub mod log;
pub mod progress;
pub mod projection;
pub mod providers;
pub mod secret;
pub mod shutdown;
pub mod stages;
pub mod telemetry;
pub mod tenants;
