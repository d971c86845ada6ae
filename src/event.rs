//! The two records that flow through the logs: the verified raw envelope (what the ESP sent,
//! byte for byte) and the normalized delivery event (one per recipient and happening).
//! Their Avro schemas live in `schemas/` and are the contract with analytics.

use serde::{Deserialize, Serialize};

/// What ingress appends after verification, before answering 2xx. Replaying these through the
/// normalizer must reproduce every downstream record, so it keeps the exact body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RawEnvelope {
    /// Unique per request (random, 128 bits as hex): ties events and dead letters to a request.
    pub id: String,
    pub provider: String,
    pub received_at_ms: i64,
    /// Tenants whose credentials verified this request; events naming any other tenant are
    /// dead-lettered, so one tenant can never write another's rows.
    pub verified_tenants: Vec<String>,
    /// Tenant for events that name none: the URL's tenant, or the only tenant that verified.
    pub default_tenant: Option<String>,
    pub content_type: Option<String>,
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
    /// W3C `traceparent` of the ingress span, so the normalizer's and projector's spans join
    /// the request's trace. `None` when tracing export is off.
    pub trace_parent: Option<String>,
}

impl RawEnvelope {
    /// An envelope as ingress stores it after `verified` tenants' credentials verified it (the
    /// only one becomes the default tenant). For tests, benches and tools; ingress builds its
    /// own with a random id and the real receive time.
    pub fn verified(provider: &str, body: impl Into<Vec<u8>>, verified: &[&str]) -> RawEnvelope {
        RawEnvelope {
            id: "env1".into(),
            provider: provider.into(),
            received_at_ms: 1_700_000_000_000,
            verified_tenants: verified.iter().map(|s| s.to_string()).collect(),
            default_tenant: (verified.len() == 1).then(|| verified[0].to_string()),
            content_type: None,
            body: body.into(),
            trace_parent: None,
        }
    }
}

/// What happened to one email for one recipient, provider-neutral.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum EventKind {
    /// Accepted by the ESP for delivery (SendGrid processed, Mailgun accepted, SES Send).
    Sent,
    /// The ESP refused to send (SendGrid dropped, SES Reject, Mailgun rejected, Mailjet blocked).
    Dropped,
    /// Temporarily delayed; the ESP keeps trying. Never a suppression.
    Deferred,
    Delivered,
    /// Hard or soft per [`BounceClass`]; only hard bounces suppress.
    Bounced,
    Opened,
    Clicked,
    Complained,
    Unsubscribed,
    GroupUnsubscribed,
    GroupResubscribed,
    /// Known to the ESP but with no effect on projections (e.g. Mailgun stored, SES rendering
    /// failure); kept in the events log for analytics.
    Other,
}

impl EventKind {
    /// Every kind, in declaration order, which is also the symbol order of the Avro schema's
    /// `EventKind` enum (the codec relies on it).
    pub const ALL: [EventKind; 12] = [
        EventKind::Sent,
        EventKind::Dropped,
        EventKind::Deferred,
        EventKind::Delivered,
        EventKind::Bounced,
        EventKind::Opened,
        EventKind::Clicked,
        EventKind::Complained,
        EventKind::Unsubscribed,
        EventKind::GroupUnsubscribed,
        EventKind::GroupResubscribed,
        EventKind::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Sent => "sent",
            EventKind::Dropped => "dropped",
            EventKind::Deferred => "deferred",
            EventKind::Delivered => "delivered",
            EventKind::Bounced => "bounced",
            EventKind::Opened => "opened",
            EventKind::Clicked => "clicked",
            EventKind::Complained => "complained",
            EventKind::Unsubscribed => "unsubscribed",
            EventKind::GroupUnsubscribed => "group_unsubscribed",
            EventKind::GroupResubscribed => "group_resubscribed",
            EventKind::Other => "other",
        }
    }

    pub fn parse(s: &str) -> Option<EventKind> {
        EventKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum BounceClass {
    /// Permanent: the address will never accept mail. Suppresses the contact.
    Hard,
    /// Temporary (mailbox full, blocked, greylisted): recorded, never suppresses.
    Soft,
}

impl BounceClass {
    pub fn as_str(self) -> &'static str {
        match self {
            BounceClass::Hard => "hard",
            BounceClass::Soft => "soft",
        }
    }

    pub fn parse(s: &str) -> Option<BounceClass> {
        match s {
            "hard" => Some(BounceClass::Hard),
            "soft" => Some(BounceClass::Soft),
            _ => None,
        }
    }
}

/// One normalized delivery event. Field docs are mirrored in `schemas/delivery_event.avsc`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DeliveryEvent {
    /// Identity of the happening, stable across ESP retries: duplicates share it, and the fold
    /// counts each key once. It binds `occurred_at_ms` (every provider hashes the event's time
    /// into it), so two events with one key have one time: the embedded store dedupes by both.
    pub event_key: String,
    pub tenant: String,
    pub provider: String,
    pub kind: EventKind,
    /// Partition key of the dispatch: `d:<xs_dispatch>` when XSender attributed the send,
    /// else `m:<message id>:<recipient>` (unattributed, never dropped).
    pub dispatch_key: String,
    pub dispatch_id: Option<String>,
    pub campaign_id: Option<String>,
    pub message_id: Option<String>,
    /// Lower-cased recipient address.
    pub recipient: String,
    pub occurred_at_ms: i64,
    pub received_at_ms: i64,
    pub envelope_id: String,
    /// The provider's own name for the event (`processed`, `Bounce`, `failed`, …).
    pub provider_event: String,
    pub provider_event_id: Option<String>,
    pub bounce_class: Option<BounceClass>,
    /// Human-readable reason (bounce diagnostic, drop reason, complaint feedback type).
    pub reason: Option<String>,
    pub smtp_status: Option<String>,
    pub url: Option<String>,
    pub user_agent: Option<String>,
    pub ip: Option<String>,
    /// Opens by a proxy or privacy feature (Apple MPP), clicks by a bot/scanner.
    pub machine: bool,
    /// Subscription group for group (un)subscribes.
    pub group_id: Option<String>,
    /// W3C `traceparent` of the normalizer span that produced it (see [`RawEnvelope`]).
    pub trace_parent: Option<String>,
}

impl DeliveryEvent {
    /// The fallback key for events that carry no XSender metadata.
    pub fn fallback_dispatch_key(message_id: Option<&str>, recipient: &str) -> String {
        format!("m:{}:{}", message_id.unwrap_or("-"), recipient)
    }

    pub fn attributed_dispatch_key(dispatch_id: &str) -> String {
        format!("d:{dispatch_id}")
    }
}

/// An item the normalizer could not turn into an event. Kept, with its reason, never dropped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub envelope_id: String,
    pub provider: String,
    /// A short stable code for metrics and filtering (`missing_field`, `tenant_not_verified`, …).
    pub reason: String,
    /// What exactly is wrong, for a person.
    pub detail: String,
    /// The offending item as text (the JSON element, or a prefix of the body).
    pub item: String,
    pub received_at_ms: i64,
}
