//! AsyncAPI 3.0 documents (feature `asyncapi`), made from what a service's buses and processors
//! say about themselves ([`Manifest`]) and the payload schemas of its events
//! ([`schemars::JsonSchema`]).
//!
//! Every topic becomes a channel, every event or command a message (name, version, content
//! type, payload schema), every declared publication a `send` operation and every handler a
//! `receive` operation carrying its consumer group, delivery and dead-letter topic (as `x-`
//! extensions). An event without a schema gets an open object.
//!
//! ```
//! use cqrs::asyncapi::{schemars, Document};
//! use cqrs::{memory::MemoryBroker, Event, EventBus, EventProcessor};
//!
//! #[derive(serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
//! #[schemars(crate = "cqrs::asyncapi::schemars")]
//! struct Booked { seats: u32 }
//! impl Event for Booked { const NAME: &'static str = "tickets.Booked"; }
//!
//! let broker = MemoryBroker::new();
//! let bus = EventBus::new(broker.clone()).declare::<Booked>();
//! let mut p = EventProcessor::new(broker, "svc-mail");
//! p.handle("confirm", |_: Booked| async { Ok::<_, String>(()) }).unwrap();
//! let doc = Document::new("svc-tickets")
//!     .manifest(bus.manifest())
//!     .manifest(p.manifest())
//!     .schema::<Booked>()
//!     .to_json();
//! assert_eq!(doc["asyncapi"], "3.0.0");
//! assert_eq!(doc["channels"]["tickets.Booked"]["address"], "tickets.Booked");
//! assert_eq!(doc["operations"]["receive.svc-mail.confirm.confirm"]["action"], "receive");
//! assert_eq!(
//!     doc["components"]["messages"]["tickets.Booked"]["payload"]["properties"]["seats"]["type"],
//!     "integer"
//! );
//! ```

use std::collections::BTreeMap;

pub use schemars;
use serde_json::{json, Map, Value};

use crate::processor::{DeliveryMode, Manifest};
use crate::{Command, Event};

/// An AsyncAPI 3.0 document being assembled.
#[derive(Debug, Clone)]
pub struct Document {
    title: String,
    version: String,
    description: Option<String>,
    manifest: Manifest,
    schemas: BTreeMap<String, Value>,
}

/// An id AsyncAPI accepts (`[A-Za-z0-9._-]`), other characters as `_`.
fn id(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

impl Document {
    /// A document titled `title` (the service), version `1.0.0`.
    pub fn new(title: impl Into<String>) -> Self {
        Document {
            title: title.into(),
            version: "1.0.0".to_owned(),
            description: None,
            manifest: Manifest::default(),
            schemas: BTreeMap::new(),
        }
    }

    /// The version of the API described.
    pub fn version(mut self, version: impl Into<String>) -> Self {
        self.version = version.into();
        self
    }

    /// A description of the service.
    pub fn description(mut self, text: impl Into<String>) -> Self {
        self.description = Some(text.into());
        self
    }

    /// Adds what a bus publishes or a processor handles (their `manifest()`).
    pub fn manifest(mut self, manifest: Manifest) -> Self {
        self.manifest = std::mem::take(&mut self.manifest).merge(manifest);
        self
    }

    /// Describes the payload of `E` with its JSON Schema (subschemas inlined, draft 7, as
    /// AsyncAPI's schema format expects).
    pub fn schema<E: Event + schemars::JsonSchema>(self) -> Self {
        self.payload::<E>(E::NAME)
    }

    /// Describes the payload of the command `C` with its JSON Schema, as [`Document::schema`].
    pub fn command_schema<C: Command + schemars::JsonSchema>(self) -> Self {
        self.payload::<C>(C::NAME)
    }

    fn payload<T: schemars::JsonSchema>(mut self, name: &str) -> Self {
        let settings = schemars::generate::SchemaSettings::draft07().with(|s| {
            s.inline_subschemas = true;
            s.meta_schema = None;
        });
        let schema = settings.into_generator().into_root_schema_for::<T>();
        self.schemas.insert(name.to_owned(), schema.to_value());
        self
    }

    /// The document.
    pub fn to_json(&self) -> Value {
        let m = &self.manifest;
        // topic -> (event name -> version)
        let mut channels: BTreeMap<&str, BTreeMap<&str, u32>> = BTreeMap::new();
        for p in &m.publishes {
            channels
                .entry(&p.topic)
                .or_default()
                .insert(&p.name, p.version);
        }
        for g in &m.groups {
            for t in &g.topics {
                let on = channels.entry(t).or_default();
                for h in &g.handlers {
                    on.entry(&h.event).or_insert(h.version);
                }
            }
        }
        let mut messages = Map::new();
        let mut channel_docs = Map::new();
        for (topic, events) in &channels {
            let mut refs = Map::new();
            for (name, version) in events {
                refs.insert(
                    id(name),
                    json!({ "$ref": format!("#/components/messages/{}", id(name)) }),
                );
                messages.entry(id(name)).or_insert_with(|| {
                    json!({
                        "name": name,
                        "title": name,
                        "contentType": crate::wire::DEFAULT_CONTENT_TYPE,
                        "payload": self.schemas.get(*name).cloned()
                            .unwrap_or_else(|| json!({ "type": "object" })),
                        "x-cqrs-version": version,
                    })
                });
            }
            channel_docs.insert(id(topic), json!({ "address": topic, "messages": refs }));
        }
        let channel_ref = |topic: &str| json!({ "$ref": format!("#/channels/{}", id(topic)) });
        let message_ref = |topic: &str, name: &str| json!({ "$ref": format!("#/channels/{}/messages/{}", id(topic), id(name)) });
        let mut operations = Map::new();
        for p in &m.publishes {
            operations.insert(
                id(&format!("send.{}.{}", p.topic, p.name)),
                json!({
                    "action": "send",
                    "channel": channel_ref(&p.topic),
                    "messages": [message_ref(&p.topic, &p.name)],
                }),
            );
        }
        for g in &m.groups {
            for t in &g.topics {
                for h in &g.handlers {
                    operations.insert(
                        id(&format!("receive.{}.{}", g.group, h.name)),
                        json!({
                            "action": "receive",
                            "channel": channel_ref(t),
                            "messages": [message_ref(t, &h.event)],
                            "summary": format!("{} handles {} in group {}", h.name, h.event, g.group),
                            "x-consumer-group": g.group,
                            "x-delivery": match g.delivery {
                                DeliveryMode::AtLeastOnce => "at-least-once",
                                DeliveryMode::AtMostOnce => "at-most-once",
                            },
                            "x-dead-letter-topic": g.dead_letter_topic,
                            "x-concurrency": g.concurrency,
                        }),
                    );
                }
            }
        }
        let mut info = json!({ "title": self.title, "version": self.version });
        if let Some(d) = &self.description {
            info["description"] = json!(d);
        }
        json!({
            "asyncapi": "3.0.0",
            "info": info,
            "defaultContentType": crate::wire::DEFAULT_CONTENT_TYPE,
            "channels": channel_docs,
            "operations": operations,
            "components": { "messages": messages },
        })
    }
}
