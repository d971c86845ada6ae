//! The fold: a pure function from delivery events to projections, with no I/O.
//!
//! Every field is a commutative, idempotent merge (max of a status rank, min of a timestamp,
//! max of a (time, url) pair, a count of distinct event keys), so any order of any multiset of
//! the same events gives the same projection, and a replay gives exactly what the live run gave.
//! Stores call [`fold_dispatch`], [`suppression_of`] and [`contact_change_of`] per event and
//! persist the results; [`Projections`] is the in-memory reference the property tests use.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::event::{BounceClass, DeliveryEvent, EventKind};

/// Dispatch status, in precedence order: a later event can only move a dispatch up this list,
/// so Complained and Bounced are never overwritten by a Delivered that arrives afterwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum DispatchStatus {
    /// Only events with no status effect seen so far.
    Pending,
    Sent,
    Deferred,
    SoftBounced,
    Delivered,
    Dropped,
    Bounced,
    Complained,
}

impl DispatchStatus {
    pub const ALL: [DispatchStatus; 8] = [
        DispatchStatus::Pending,
        DispatchStatus::Sent,
        DispatchStatus::Deferred,
        DispatchStatus::SoftBounced,
        DispatchStatus::Delivered,
        DispatchStatus::Dropped,
        DispatchStatus::Bounced,
        DispatchStatus::Complained,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DispatchStatus::Pending => "Pending",
            DispatchStatus::Sent => "Sent",
            DispatchStatus::Deferred => "Deferred",
            DispatchStatus::SoftBounced => "SoftBounced",
            DispatchStatus::Delivered => "Delivered",
            DispatchStatus::Dropped => "Dropped",
            DispatchStatus::Bounced => "Bounced",
            DispatchStatus::Complained => "Complained",
        }
    }

    /// Accepts the API spelling case-insensitively, so `?status=bounced` works.
    pub fn parse(s: &str) -> Option<DispatchStatus> {
        DispatchStatus::ALL
            .into_iter()
            .find(|st| st.as_str().eq_ignore_ascii_case(s))
    }

    /// The status an event is evidence of. Opens, clicks and unsubscribes prove delivery.
    pub fn of(ev: &DeliveryEvent) -> DispatchStatus {
        match ev.kind {
            EventKind::Sent => DispatchStatus::Sent,
            EventKind::Deferred => DispatchStatus::Deferred,
            EventKind::Bounced => match ev.bounce_class {
                Some(BounceClass::Hard) => DispatchStatus::Bounced,
                _ => DispatchStatus::SoftBounced,
            },
            EventKind::Delivered
            | EventKind::Opened
            | EventKind::Clicked
            | EventKind::Unsubscribed
            | EventKind::GroupUnsubscribed
            | EventKind::GroupResubscribed => DispatchStatus::Delivered,
            EventKind::Dropped => DispatchStatus::Dropped,
            EventKind::Complained => DispatchStatus::Complained,
            EventKind::Other => DispatchStatus::Pending,
        }
    }
}

/// The most severe bounce seen: hard before soft, then the earliest.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BounceInfo {
    pub class: BounceClass,
    pub at_ms: i64,
    pub reason: Option<String>,
    pub smtp_status: Option<String>,
}

/// A timestamped reason; the earliest one wins (ties broken by the text, for determinism).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Stamped {
    pub at_ms: i64,
    pub value: Option<String>,
}

/// One Campaign Dispatch row: one email to one recipient.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DispatchRow {
    pub tenant: String,
    pub dispatch_key: String,
    pub dispatch_id: Option<String>,
    pub campaign_id: Option<String>,
    pub message_id: Option<String>,
    pub email: String,
    pub status: DispatchStatus,
    pub delivered_at_ms: Option<i64>,
    /// Earliest human open; a click implies an open, so clicks count here too.
    pub opened_at_ms: Option<i64>,
    pub clicked_at_ms: Option<i64>,
    /// Distinct human opens.
    pub opens: u64,
    /// Distinct machine opens (Apple MPP and similar), counted apart from human opens.
    pub machine_opens: u64,
    pub first_machine_open_at_ms: Option<i64>,
    /// Distinct human clicks.
    pub clicks: u64,
    /// Distinct clicks flagged as bots/link scanners.
    pub bot_clicks: u64,
    /// The latest click (by event time, ties by URL): `(at, url)`.
    pub last_click: Option<(i64, String)>,
    pub bounce: Option<BounceInfo>,
    pub complaint: Option<Stamped>,
    pub drop: Option<Stamped>,
    /// Distinct events folded into this row.
    pub events: u64,
}

impl DispatchRow {
    pub fn empty(tenant: &str, dispatch_key: &str) -> Self {
        DispatchRow {
            tenant: tenant.to_string(),
            dispatch_key: dispatch_key.to_string(),
            dispatch_id: None,
            campaign_id: None,
            message_id: None,
            email: String::new(),
            status: DispatchStatus::Pending,
            delivered_at_ms: None,
            opened_at_ms: None,
            clicked_at_ms: None,
            opens: 0,
            machine_opens: 0,
            first_machine_open_at_ms: None,
            clicks: 0,
            bot_clicks: 0,
            last_click: None,
            bounce: None,
            complaint: None,
            drop: None,
            events: 0,
        }
    }
}

fn min_opt<T: Ord>(a: Option<T>, b: Option<T>) -> Option<T> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn max_opt<T: Ord>(a: Option<T>, b: Option<T>) -> Option<T> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

/// Identity fields are the same on every event of a dispatch; if two ever disagree the smaller
/// wins, so the result still does not depend on arrival order.
fn merge_ident(a: Option<String>, b: Option<&String>) -> Option<String> {
    min_opt(a, b.cloned())
}

/// Folds one *distinct* event into a dispatch row. The caller guarantees the event key was not
/// folded before (see [`Projections::apply`]); everything else here is order-insensitive.
pub fn fold_dispatch(row: Option<DispatchRow>, ev: &DeliveryEvent) -> DispatchRow {
    let mut r = row.unwrap_or_else(|| DispatchRow::empty(&ev.tenant, &ev.dispatch_key));
    r.events += 1;
    r.dispatch_id = merge_ident(r.dispatch_id, ev.dispatch_id.as_ref());
    r.campaign_id = merge_ident(r.campaign_id, ev.campaign_id.as_ref());
    r.message_id = merge_ident(r.message_id, ev.message_id.as_ref());
    r.email = if r.email.is_empty() {
        ev.recipient.clone()
    } else {
        r.email.min(ev.recipient.clone())
    };
    r.status = r.status.max(DispatchStatus::of(ev));
    let at = ev.occurred_at_ms;
    match ev.kind {
        EventKind::Delivered => r.delivered_at_ms = min_opt(r.delivered_at_ms, Some(at)),
        EventKind::Opened if ev.machine => {
            r.machine_opens += 1;
            r.first_machine_open_at_ms = min_opt(r.first_machine_open_at_ms, Some(at));
        }
        EventKind::Opened => {
            r.opens += 1;
            r.opened_at_ms = min_opt(r.opened_at_ms, Some(at));
        }
        EventKind::Clicked => {
            if ev.machine {
                r.bot_clicks += 1;
            } else {
                r.clicks += 1;
                r.clicked_at_ms = min_opt(r.clicked_at_ms, Some(at));
                // A human click implies the message was opened.
                r.opened_at_ms = min_opt(r.opened_at_ms, Some(at));
                if let Some(url) = &ev.url {
                    r.last_click = max_opt(r.last_click, Some((at, url.clone())));
                }
            }
        }
        EventKind::Bounced => {
            let info = BounceInfo {
                class: ev.bounce_class.unwrap_or(BounceClass::Soft),
                at_ms: at,
                reason: ev.reason.clone(),
                smtp_status: ev.smtp_status.clone(),
            };
            r.bounce = min_opt(r.bounce, Some(info));
        }
        EventKind::Complained => {
            let s = Stamped {
                at_ms: at,
                value: ev.reason.clone(),
            };
            r.complaint = min_opt(r.complaint, Some(s));
        }
        EventKind::Dropped => {
            let s = Stamped {
                at_ms: at,
                value: ev.reason.clone(),
            };
            r.drop = min_opt(r.drop, Some(s));
        }
        _ => {}
    }
    r
}

/// Why an address is on the suppression list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum SuppressionReason {
    HardBounce,
    Complaint,
    Unsubscribe,
}

impl SuppressionReason {
    pub fn as_str(self) -> &'static str {
        match self {
            SuppressionReason::HardBounce => "hard_bounce",
            SuppressionReason::Complaint => "complaint",
            SuppressionReason::Unsubscribe => "unsubscribe",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Self::HardBounce, Self::Complaint, Self::Unsubscribe]
            .into_iter()
            .find(|r| r.as_str() == s)
    }
}

/// One (tenant, email, reason) entry; the earliest event that caused it is kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SuppressionRow {
    pub tenant: String,
    pub email: String,
    pub reason: SuppressionReason,
    pub since_ms: i64,
    pub dispatch_key: String,
    pub provider: String,
}

/// The suppression an event causes, if any. Soft bounces and deferrals never suppress.
pub fn suppression_of(ev: &DeliveryEvent) -> Option<SuppressionRow> {
    let reason = match ev.kind {
        EventKind::Bounced if ev.bounce_class == Some(BounceClass::Hard) => {
            SuppressionReason::HardBounce
        }
        EventKind::Complained => SuppressionReason::Complaint,
        EventKind::Unsubscribed => SuppressionReason::Unsubscribe,
        _ => return None,
    };
    Some(SuppressionRow {
        tenant: ev.tenant.clone(),
        email: ev.recipient.clone(),
        reason,
        since_ms: ev.occurred_at_ms,
        dispatch_key: ev.dispatch_key.clone(),
        provider: ev.provider.clone(),
    })
}

/// Keeps the earliest cause; ties broken by dispatch key then provider.
pub fn merge_suppression(old: Option<SuppressionRow>, new: SuppressionRow) -> SuppressionRow {
    match old {
        None => new,
        Some(old) => {
            let k = |r: &SuppressionRow| (r.since_ms, r.dispatch_key.clone(), r.provider.clone());
            if k(&new) < k(&old) {
                new
            } else {
                old
            }
        }
    }
}

/// A contact's subscription state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContactRow {
    pub tenant: String,
    pub email: String,
    /// Earliest global unsubscribe; `None` while subscribed.
    pub unsubscribed_at_ms: Option<i64>,
    /// Per subscription group: the latest change wins, `(at, unsubscribed)`; at equal times
    /// an unsubscribe beats a resubscribe (the safe side).
    pub groups: BTreeMap<String, (i64, bool)>,
}

/// What an event changes on a contact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContactChange {
    Unsubscribe {
        at_ms: i64,
    },
    Group {
        group: String,
        at_ms: i64,
        unsubscribed: bool,
    },
}

pub fn contact_change_of(ev: &DeliveryEvent) -> Option<ContactChange> {
    match ev.kind {
        EventKind::Unsubscribed => Some(ContactChange::Unsubscribe {
            at_ms: ev.occurred_at_ms,
        }),
        EventKind::GroupUnsubscribed | EventKind::GroupResubscribed => Some(ContactChange::Group {
            group: ev.group_id.clone().unwrap_or_else(|| "-".to_string()),
            at_ms: ev.occurred_at_ms,
            unsubscribed: ev.kind == EventKind::GroupUnsubscribed,
        }),
        _ => None,
    }
}

pub fn apply_contact(
    row: Option<ContactRow>,
    ev: &DeliveryEvent,
    change: ContactChange,
) -> ContactRow {
    let mut c = row.unwrap_or_else(|| ContactRow {
        tenant: ev.tenant.clone(),
        email: ev.recipient.clone(),
        unsubscribed_at_ms: None,
        groups: BTreeMap::new(),
    });
    match change {
        ContactChange::Unsubscribe { at_ms } => {
            c.unsubscribed_at_ms = min_opt(c.unsubscribed_at_ms, Some(at_ms));
        }
        ContactChange::Group {
            group,
            at_ms,
            unsubscribed,
        } => {
            let new = (at_ms, unsubscribed);
            let e = c.groups.entry(group).or_insert(new);
            *e = (*e).max(new);
        }
    }
    c
}

/// The in-memory projection: the reference model of what every store must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Projections {
    pub seen: BTreeSet<(String, String)>,
    pub dispatches: BTreeMap<(String, String), DispatchRow>,
    pub suppressions: BTreeMap<(String, String, SuppressionReason), SuppressionRow>,
    pub contacts: BTreeMap<(String, String), ContactRow>,
}

impl Projections {
    /// Applies an event once per `(tenant, event_key)`; returns whether it was new.
    pub fn apply(&mut self, ev: &DeliveryEvent) -> bool {
        if !self.seen.insert((ev.tenant.clone(), ev.event_key.clone())) {
            return false;
        }
        let key = (ev.tenant.clone(), ev.dispatch_key.clone());
        let row = fold_dispatch(self.dispatches.remove(&key), ev);
        self.dispatches.insert(key, row);
        if let Some(s) = suppression_of(ev) {
            let k = (s.tenant.clone(), s.email.clone(), s.reason);
            let merged = merge_suppression(self.suppressions.remove(&k), s);
            self.suppressions.insert(k, merged);
        }
        if let Some(change) = contact_change_of(ev) {
            let k = (ev.tenant.clone(), ev.recipient.clone());
            let merged = apply_contact(self.contacts.remove(&k), ev, change);
            self.contacts.insert(k, merged);
        }
        true
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    pub fn ev(key: &str, dispatch: &str, kind: EventKind, at: i64) -> DeliveryEvent {
        DeliveryEvent {
            trace_parent: None,
            event_key: key.to_string(),
            tenant: "t1".into(),
            provider: "sendgrid".into(),
            kind,
            dispatch_key: format!("d:{dispatch}"),
            dispatch_id: Some(dispatch.to_string()),
            campaign_id: Some("c1".into()),
            message_id: Some("m1".into()),
            recipient: format!("{dispatch}@example.com"),
            occurred_at_ms: at,
            received_at_ms: 0,
            envelope_id: "e".into(),
            provider_event: kind.as_str().into(),
            provider_event_id: None,
            bounce_class: (kind == EventKind::Bounced).then_some(BounceClass::Hard),
            reason: None,
            smtp_status: None,
            url: (kind == EventKind::Clicked).then(|| format!("https://x.test/{at}")),
            user_agent: None,
            ip: None,
            machine: false,
            group_id: None,
        }
    }

    #[test]
    fn late_delivered_never_overwrites_bounce_or_complaint() {
        let mut p = Projections::default();
        p.apply(&ev("1", "a", EventKind::Bounced, 10));
        p.apply(&ev("2", "a", EventKind::Delivered, 5));
        let r = &p.dispatches[&("t1".into(), "d:a".into())];
        assert_eq!(r.status, DispatchStatus::Bounced);
        assert_eq!(r.delivered_at_ms, Some(5), "delivered_at is still recorded");
        p.apply(&ev("3", "a", EventKind::Complained, 20));
        p.apply(&ev("4", "a", EventKind::Delivered, 30));
        assert_eq!(
            p.dispatches[&("t1".into(), "d:a".into())].status,
            DispatchStatus::Complained
        );
    }

    #[test]
    fn soft_bounce_and_deferral_do_not_suppress() {
        let mut p = Projections::default();
        let mut soft = ev("1", "a", EventKind::Bounced, 1);
        soft.bounce_class = Some(BounceClass::Soft);
        p.apply(&soft);
        p.apply(&ev("2", "a", EventKind::Deferred, 2));
        assert!(p.suppressions.is_empty());
        assert_eq!(
            p.dispatches.values().next().unwrap().status,
            DispatchStatus::SoftBounced
        );
        p.apply(&ev("3", "a", EventKind::Bounced, 3));
        assert_eq!(p.suppressions.len(), 1);
    }

    #[test]
    fn machine_opens_and_bot_clicks_are_counted_apart() {
        let mut p = Projections::default();
        let mut m = ev("1", "a", EventKind::Opened, 1);
        m.machine = true;
        p.apply(&m);
        p.apply(&ev("2", "a", EventKind::Opened, 5));
        let mut bot = ev("3", "a", EventKind::Clicked, 0);
        bot.machine = true;
        p.apply(&bot);
        let r = p.dispatches.values().next().unwrap();
        assert_eq!(
            (r.opens, r.machine_opens, r.clicks, r.bot_clicks),
            (1, 1, 0, 1)
        );
        assert_eq!(r.opened_at_ms, Some(5));
        assert_eq!(r.first_machine_open_at_ms, Some(1));
        assert_eq!(r.last_click, None, "bot clicks store no URL");
    }

    #[test]
    fn counts_keep_going_past_any_threshold() {
        let mut p = Projections::default();
        for i in 0..1000 {
            p.apply(&ev(&format!("o{i}"), "a", EventKind::Opened, i));
        }
        assert_eq!(p.dispatches.values().next().unwrap().opens, 1000);
    }

    fn arb_event() -> impl Strategy<Value = DeliveryEvent> {
        (
            0u8..40,
            0usize..3,
            0usize..EventKind::ALL.len(),
            0i64..50,
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(|(id, d, k, at, machine, hard)| {
                let kind = EventKind::ALL[k];
                // The key names the happening, so it covers every field that varies.
                let mut e = ev(
                    &format!("k{id}-{d}-{k}-{at}-{machine}-{hard}"),
                    &format!("d{d}"),
                    kind,
                    at,
                );
                e.machine = machine && matches!(kind, EventKind::Opened | EventKind::Clicked);
                if kind == EventKind::Bounced {
                    e.bounce_class = Some(if hard {
                        BounceClass::Hard
                    } else {
                        BounceClass::Soft
                    });
                    e.reason = Some(format!("r{at}"));
                }
                if matches!(
                    kind,
                    EventKind::GroupUnsubscribed | EventKind::GroupResubscribed
                ) {
                    e.group_id = Some(format!("g{}", at % 2));
                }
                e
            })
    }

    proptest! {
        /// Any permutation of a set of events, with duplicates, yields the same projection.
        #[test]
        fn order_and_duplicates_do_not_matter(
            events in proptest::collection::vec(arb_event(), 0..60),
            dups in proptest::collection::vec(any::<prop::sample::Index>(), 0..30),
            seed in any::<u64>(),
        ) {
            let mut once = Projections::default();
            for e in &events { once.apply(e); }

            let mut shuffled: Vec<DeliveryEvent> = events.clone();
            if !events.is_empty() {
                for d in &dups { shuffled.push(d.get(&events).clone()); }
            }
            use rand::{seq::SliceRandom, SeedableRng};
            shuffled.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
            let mut again = Projections::default();
            for e in &shuffled { again.apply(e); }
            prop_assert_eq!(&once, &again);

            // Replaying everything onto the live state changes nothing.
            let mut replayed = again.clone();
            for e in &events { replayed.apply(e); }
            prop_assert_eq!(&once, &replayed);
        }
    }
}
