//! Captures `tracing` spans (with the fields recorded after creation and their
//! parent) and events, for assertions on the cache's telemetry, without
//! tracing-subscriber. Include with
//! `#[path = "support/spans.rs"] mod spans;`.
//!
//! [`capture_spans`] installs the subscriber for the current thread until the
//! guard drops: use a `current_thread` runtime so that spawned tasks are
//! captured too.
#![allow(dead_code)]

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::subscriber::DefaultGuard;
use tracing::{Event, Level, Metadata, Subscriber};

/// One span: its name, level, parent (index into [`Spans::spans`]) and every
/// field recorded on it, at creation or later (values rendered with
/// `Display`/`Debug`, strings without quotes).
#[derive(Debug, Clone)]
pub struct CapturedSpan {
    pub name: String,
    pub level: Level,
    pub parent: Option<usize>,
    pub fields: HashMap<String, String>,
    pub closed: bool,
}

impl CapturedSpan {
    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields.get(name).map(String::as_str)
    }
}

/// One event: level, message, fields, and the span it was in (index).
#[derive(Debug, Clone)]
pub struct CapturedEvent {
    pub level: Level,
    pub target: String,
    pub span: Option<usize>,
    pub fields: HashMap<String, String>,
}

impl CapturedEvent {
    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields.get(name).map(String::as_str)
    }

    pub fn message(&self) -> &str {
        self.field("message").unwrap_or("")
    }
}

#[derive(Default)]
struct State {
    spans: Vec<CapturedSpan>,
    events: Vec<CapturedEvent>,
    /// The entered spans, innermost last.
    stack: Vec<usize>,
    refs: HashMap<usize, usize>,
}

/// What was captured so far; cheap to clone.
#[derive(Clone, Default)]
pub struct Spans(Arc<Mutex<State>>);

impl Spans {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every span so far, in creation order.
    pub fn spans(&self) -> Vec<CapturedSpan> {
        self.state().spans.clone()
    }

    /// Spans named `name`.
    pub fn named(&self, name: &str) -> Vec<CapturedSpan> {
        self.spans()
            .into_iter()
            .filter(|s| s.name == name)
            .collect()
    }

    /// Every event so far.
    pub fn events(&self) -> Vec<CapturedEvent> {
        self.state().events.clone()
    }

    /// The names of the children of span `index`.
    pub fn children(&self, index: usize) -> Vec<String> {
        self.spans()
            .into_iter()
            .filter(|s| s.parent == Some(index))
            .map(|s| s.name)
            .collect()
    }

    /// Index of the `n`th span named `name`.
    pub fn index_of(&self, name: &str, n: usize) -> usize {
        self.spans()
            .iter()
            .enumerate()
            .filter(|(_, s)| s.name == name)
            .nth(n)
            .unwrap_or_else(|| panic!("no span {name} #{n}"))
            .0
    }

    /// Every field value of every span and event, as one string (to check that
    /// something never appears).
    pub fn all_text(&self) -> String {
        let state = self.state();
        let spans = state.spans.iter().flat_map(|s| s.fields.iter());
        let events = state.events.iter().flat_map(|e| e.fields.iter());
        spans
            .chain(events)
            .map(|(k, v)| format!("{k}={v}\n"))
            .collect()
    }
}

/// Starts capturing spans and events (all levels) on this thread until the
/// guard drops.
pub fn capture_spans() -> (Spans, DefaultGuard) {
    let spans = Spans::default();
    let guard = tracing::subscriber::set_default(SpanSubscriber(spans.clone()));
    (spans, guard)
}

struct SpanSubscriber(Spans);

fn index(id: &Id) -> usize {
    id.into_u64() as usize - 1
}

impl Subscriber for SpanSubscriber {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }

    fn new_span(&self, attributes: &Attributes<'_>) -> Id {
        let mut fields = Fields::default();
        attributes.record(&mut fields);
        let mut state = self.0.state();
        let parent = if attributes.is_root() {
            None
        } else if let Some(parent) = attributes.parent() {
            Some(index(parent))
        } else {
            state.stack.last().copied()
        };
        state.spans.push(CapturedSpan {
            name: attributes.metadata().name().to_owned(),
            level: *attributes.metadata().level(),
            parent,
            fields: fields.0,
            closed: false,
        });
        let i = state.spans.len() - 1;
        state.refs.insert(i, 1);
        Id::from_u64(i as u64 + 1)
    }

    fn record(&self, span: &Id, values: &Record<'_>) {
        let mut fields = Fields::default();
        values.record(&mut fields);
        let mut state = self.0.state();
        if let Some(s) = state.spans.get_mut(index(span)) {
            s.fields.extend(fields.0);
        }
    }

    fn record_follows_from(&self, _: &Id, _: &Id) {}

    fn event(&self, event: &Event<'_>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let mut state = self.0.state();
        let span = state.stack.last().copied();
        state.events.push(CapturedEvent {
            level: *event.metadata().level(),
            target: event.metadata().target().to_owned(),
            span,
            fields: fields.0,
        });
    }

    fn enter(&self, span: &Id) {
        self.0.state().stack.push(index(span));
    }

    fn exit(&self, span: &Id) {
        let mut state = self.0.state();
        if let Some(pos) = state.stack.iter().rposition(|&s| s == index(span)) {
            state.stack.remove(pos);
        }
    }

    fn clone_span(&self, id: &Id) -> Id {
        *self.0.state().refs.entry(index(id)).or_insert(0) += 1;
        id.clone()
    }

    fn try_close(&self, id: Id) -> bool {
        let mut state = self.0.state();
        let i = index(&id);
        let refs = state.refs.entry(i).or_insert(1);
        *refs = refs.saturating_sub(1);
        if *refs == 0 {
            if let Some(s) = state.spans.get_mut(i) {
                s.closed = true;
            }
            return true;
        }
        false
    }
}

#[derive(Default)]
struct Fields(HashMap<String, String>);

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
}
