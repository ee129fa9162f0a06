//! Captures `tracing` events for assertions, without tracing-subscriber.
//!
//! [`capture`] installs a subscriber for the current thread until the returned
//! guard drops; use it on a `current_thread` runtime so that the cache's spawned
//! tasks run on the same thread and are captured too.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::subscriber::DefaultGuard;
use tracing::{Event, Level, Metadata, Subscriber};

/// One captured event: its level, target and fields (the message under
/// `"message"`), each rendered with `Debug` (strings without quotes).
#[derive(Debug, Clone)]
pub struct CapturedEvent {
    pub level: Level,
    pub target: String,
    pub fields: Vec<(String, String)>,
}

impl CapturedEvent {
    /// The value of field `name`, if the event has it.
    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Every field as `name=value`, space-separated.
    pub fn text(&self) -> String {
        self.fields
            .iter()
            .map(|(n, v)| format!("{n}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// The events captured so far; cheap to clone.
#[derive(Clone, Default)]
pub struct Captured(Arc<Mutex<Vec<CapturedEvent>>>);

impl Captured {
    /// A copy of every event captured so far.
    pub fn events(&self) -> Vec<CapturedEvent> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Events at `level` from locked-cache.
    pub fn at(&self, level: Level) -> Vec<CapturedEvent> {
        self.events()
            .into_iter()
            .filter(|e| e.level == level && e.target.starts_with("locked_cache"))
            .collect()
    }

    /// Forgets the events captured so far.
    pub fn clear(&self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

/// Starts capturing every event (all levels) on this thread until the guard drops.
pub fn capture() -> (Captured, DefaultGuard) {
    let captured = Captured::default();
    let subscriber = CaptureSubscriber {
        events: captured.clone(),
        next_span: AtomicU64::new(1),
    };
    (captured, tracing::subscriber::set_default(subscriber))
}

struct CaptureSubscriber {
    events: Captured,
    next_span: AtomicU64,
}

impl Subscriber for CaptureSubscriber {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }

    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(self.next_span.fetch_add(1, Ordering::Relaxed))
    }

    fn record(&self, _: &Id, _: &Record<'_>) {}

    fn record_follows_from(&self, _: &Id, _: &Id) {}

    fn event(&self, event: &Event<'_>) {
        let mut fields = Fields(Vec::new());
        event.record(&mut fields);
        let captured = CapturedEvent {
            level: *event.metadata().level(),
            target: event.metadata().target().to_owned(),
            fields: fields.0,
        };
        self.events
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(captured);
    }

    fn enter(&self, _: &Id) {}

    fn exit(&self, _: &Id) {}
}

struct Fields(Vec<(String, String)>);

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.push((field.name().to_owned(), value.to_owned()));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.push((field.name().to_owned(), format!("{value:?}")));
    }
}
