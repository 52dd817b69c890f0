//! The AsyncAPI 3.0.0 document of a service.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{json, Map, Value};

use crate::envelope::{attr, CONTENT_TYPE_JSON, VERSION};
use crate::message::MessageKind;
use crate::registry::MessageRoute;
use crate::runtime::ServicePlan;
use crate::topology::{QueueSpec, SubscriptionSpec, TopicSpec};

/// The SQS channel binding version this document writes (the one AsyncAPI 3.0.0 lists).
const SQS_BINDING: &str = "0.2.0";
/// The SNS channel and operation binding version.
const SNS_BINDING: &str = "0.1.0";

/// An AsyncAPI 3.0.0 document of `plan`'s service:
///
/// * **channels**: every queue this service consumes or sends to (`queue.<name>`) and
///   every topic (`topic.<name>`), addressed by their physical names, with `sqs` bindings
///   (FIFO, visibility, retention, delay, redrive to the dead-letter queue, tags) and `sns`
///   bindings (FIFO ordering);
/// * **messages**: one per wire name (`components.messages`): the JSON envelope sourceflow
///   sends, whose `payload` is the type's JSON Schema when the type derives
///   [`schemars::JsonSchema`] — otherwise a schema that says it is not described (it
///   accepts any value rather than invent one) — and the message attributes as headers;
///   an `encrypt` type's payload is the ciphertext object;
/// * **operations**: `send` for every command (to its queue) and event (to its topic) the
///   binary can send, and `receive` for every message a handler of this service takes,
///   on the queue it listens on; a receive through a topic subscription carries the
///   subscription (raw delivery, filter policy) as its `sns` binding.
pub fn asyncapi(plan: &ServicePlan) -> Value {
    let mut doc = Doc::default();
    let topology = &plan.topology;
    for m in &plan.messages {
        doc.message(m);
    }
    for q in topology.queues.iter().filter(|q| q.dead_letter.is_some()) {
        let carried: Vec<&MessageRoute> = plan
            .messages
            .iter()
            .copied()
            .filter(|m| {
                m.kind == MessageKind::Command && plan.naming.resource(m.destination) == q.name
            })
            .collect();
        let subscribed: BTreeSet<&str> = plan
            .listeners
            .iter()
            .filter(|l| l.queue == q.name)
            .flat_map(|l| l.handlers.iter().map(|(wire, _)| *wire))
            .filter(|wire| {
                plan.messages
                    .iter()
                    .any(|m| m.name == *wire && m.kind == MessageKind::Event)
            })
            .collect();
        let mut wires: Vec<&str> = carried.iter().map(|m| m.name).collect();
        wires.extend(subscribed);
        doc.queue_channel(q, &wires);
    }
    for t in &topology.topics {
        let wires: Vec<&str> = plan
            .messages
            .iter()
            .filter(|m| {
                m.kind == MessageKind::Event && plan.naming.resource(m.destination) == t.name
            })
            .map(|m| m.name)
            .collect();
        doc.topic_channel(t, &wires);
    }
    for m in &plan.messages {
        let (channel, verb) = match m.kind {
            MessageKind::Command => (
                format!("queue.{}", plan.naming.resource(m.destination)),
                "Send",
            ),
            MessageKind::Event => (
                format!("topic.{}", plan.naming.resource(m.destination)),
                "Publish",
            ),
        };
        let summary = format!("{verb} {} ({})", m.name, m.rust_path());
        doc.operation("send", &channel, m.name, summary, None);
    }
    for l in &plan.listeners {
        let channel = format!("queue.{}", l.queue);
        let mut by_wire: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (wire, handler) in &l.handlers {
            by_wire.entry(wire).or_default().push(handler);
        }
        for (wire, handlers) in by_wire {
            let is_event = plan
                .messages
                .iter()
                .any(|m| m.name == wire && m.kind == MessageKind::Event);
            let binding = match is_event {
                true => topology
                    .subscriptions
                    .iter()
                    .find(|s| {
                        s.queue == l.queue
                            && plan.messages.iter().any(|m| {
                                m.name == wire && plan.naming.resource(m.destination) == s.topic
                            })
                    })
                    .map(subscription_binding),
                false => None,
            };
            let summary = format!("Receive {wire} from {} ({})", l.queue, handlers.join(", "));
            doc.operation("receive", &channel, wire, summary, binding);
        }
    }
    let description = format!(
        "The queues, topics and messages of sourceflow service `{}`{}, generated from its compiled routes. \
         Every message body is a sourceflow JSON envelope (version {VERSION}); its attributes travel as SQS/SNS message attributes.",
        plan.service,
        match plan.naming.prefix() {
            "" => String::new(),
            p => format!(" (prefix `{p}`)"),
        }
    );
    json!({
        "asyncapi": "3.0.0",
        "info": {
            "title": plan.service,
            "version": env!("CARGO_PKG_VERSION"),
            "description": description,
        },
        "defaultContentType": CONTENT_TYPE_JSON,
        "channels": doc.channels,
        "operations": doc.operations,
        "components": {
            "schemas": doc.schemas,
            "messages": doc.messages,
        },
    })
}

#[derive(Default)]
struct Doc {
    channels: Map<String, Value>,
    operations: Map<String, Value>,
    schemas: Map<String, Value>,
    messages: Map<String, Value>,
    /// Wire name → its key in `components.messages`.
    keys: BTreeMap<String, String>,
}

/// A key of `components` (AsyncAPI allows `[a-zA-Z0-9.\-_]`).
fn component_key(name: &str) -> String {
    name.chars()
        .map(
            |c| match c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                true => c,
                false => '_',
            },
        )
        .collect()
}

impl Doc {
    fn key(&self, wire: &str) -> String {
        self.keys
            .get(wire)
            .cloned()
            .unwrap_or_else(|| component_key(wire))
    }

    fn message(&mut self, m: &MessageRoute) {
        let mut key = component_key(m.name);
        let base = key.clone();
        let mut n = 2;
        while self.messages.contains_key(&key) {
            key = format!("{base}_{n}");
            n += 1;
        }
        self.keys.insert(m.name.to_string(), key.clone());
        self.ensure_common_schemas();
        let plain = match m.schema {
            Some(schema) => {
                let name = format!("{key}.Payload");
                self.hoist(&key, &name, schema());
                json!({"$ref": format!("#/components/schemas/{name}")})
            }
            None => json!({
                "description": format!(
                    "Not described: `{}` does not derive `JsonSchema` (derive `sourceflow::schemars::JsonSchema` on it to describe its payload here). This schema accepts any value; it says nothing of the payload's shape.",
                    m.rust_path()
                )
            }),
        };
        let payload = match m.encrypt {
            true => json!({
                "allOf": [{"$ref": "#/components/schemas/sourceflow.EncryptedPayload"}],
                "description": format!(
                    "Encrypted: the payload, sealed with AES-256-GCM under a data key from the key provider. Its plaintext: {}",
                    match m.schema {
                        Some(_) => format!("`#/components/schemas/{key}.Payload`"),
                        None => "not described (no `JsonSchema`)".to_string(),
                    }
                ),
            }),
            false => plain,
        };
        let kind = match m.kind {
            MessageKind::Command => "command",
            MessageKind::Event => "event",
        };
        let mut headers = json!({
            "type": "object",
            "description": "Message attributes (SQS/SNS, all of type String).",
            "properties": {
                attr::TYPE: {"type": "string", "const": m.name, "description": "The wire name."},
                attr::CONTENT_TYPE: {"type": "string", "const": CONTENT_TYPE_JSON},
                attr::SEQUENCE: {"type": "string", "description": "The sender's sequence number."},
                attr::CORRELATION_ID: {"type": "string", "description": "The correlation id (also in the envelope)."},
                attr::TRACEPARENT: {"type": "string", "description": "W3C trace context."},
                attr::TRACESTATE: {"type": "string", "description": "W3C trace state."},
            },
            "required": [attr::TYPE, attr::CONTENT_TYPE, attr::SEQUENCE, attr::CORRELATION_ID],
        });
        if m.has_entity_id {
            headers["properties"][attr::ENTITY_ID] = json!({"type": "string", "description": "The entity id (the FIFO message group id)."});
            if let Some(r) = headers["required"].as_array_mut() {
                r.push(json!(attr::ENTITY_ID));
            }
        }
        if m.encrypt {
            headers["properties"][attr::ENCRYPTION] =
                json!({"type": "string", "const": attr::ENCRYPTION_V1});
            if let Some(r) = headers["required"].as_array_mut() {
                r.push(json!(attr::ENCRYPTION));
            }
        }
        self.messages.insert(
            key,
            json!({
                "name": m.name,
                "title": m.type_name,
                "summary": format!("A {kind} ({}), on {} `{}`", m.rust_path(), match m.kind { MessageKind::Command => "queue", MessageKind::Event => "topic" }, m.destination),
                "contentType": CONTENT_TYPE_JSON,
                "correlationId": {"location": "$message.payload#/correlation_id"},
                "headers": headers,
                "payload": {
                    "allOf": [{"$ref": "#/components/schemas/sourceflow.Envelope"}],
                    "type": "object",
                    "properties": {
                        "type": {"const": m.name},
                        "entity_id": match m.has_entity_id {
                            true => json!({"type": "string"}),
                            false => json!({"type": "null"}),
                        },
                        "payload": payload,
                    },
                },
            }),
        );
    }

    /// A standalone schema (schemars, draft 7) under `components.schemas[name]`, its
    /// `definitions` hoisted beside it as `{key}.{Definition}` and its references rewritten,
    /// so that they resolve inside the document and never collide with another type's.
    fn hoist(&mut self, key: &str, name: &str, mut schema: Value) {
        if let Some(obj) = schema.as_object_mut() {
            obj.remove("$schema");
            let defs = obj.remove("definitions").or_else(|| obj.remove("$defs"));
            if let Some(Value::Object(defs)) = defs {
                for (def, mut s) in defs {
                    rewrite_refs(&mut s, key);
                    self.schemas
                        .insert(format!("{key}.{}", component_key(&def)), s);
                }
            }
        }
        rewrite_refs(&mut schema, key);
        self.schemas.insert(name.to_string(), schema);
    }

    fn ensure_common_schemas(&mut self) {
        if self.schemas.contains_key("sourceflow.Envelope") {
            return;
        }
        self.schemas.insert(
            "sourceflow.Envelope".into(),
            json!({
                "type": "object",
                "description": "The sourceflow envelope: the body of every message, on every transport.",
                "properties": {
                    "v": {"type": "integer", "const": VERSION, "description": "Envelope version; readers reject versions they do not know."},
                    "type": {"type": "string", "description": "The wire name."},
                    "id": {"type": "string", "description": "Message id, stable across redeliveries and retried sends (the FIFO deduplication id)."},
                    "entity_id": {"type": ["string", "null"], "description": "The entity id (the FIFO message group id)."},
                    "correlation_id": {"type": "string", "description": "The conversation the message belongs to."},
                    "causation_id": {"type": ["string", "null"], "description": "The message whose handler sent this one."},
                    "seq": {"type": "integer", "minimum": 0, "description": "The sender's sequence number."},
                    "ts": {"type": "integer", "minimum": 0, "description": "Send time, milliseconds since the Unix epoch."},
                    "payload": {"description": "The message itself."},
                },
                "required": ["v", "type", "id", "correlation_id", "seq", "ts", "payload"],
            }),
        );
        self.schemas.insert(
            "sourceflow.EncryptedPayload".into(),
            json!({
                "type": "object",
                "description": "An encrypted payload (sfenc/1): AES-256-GCM under a data key from KMS or the configured key provider.",
                "properties": {
                    "sfenc": {"type": "integer", "const": 1},
                    "alg": {"type": "string", "const": "AES-256-GCM"},
                    "kid": {"type": "string", "description": "The master key id."},
                    "edk": {"type": "string", "contentEncoding": "base64", "description": "The encrypted data key."},
                    "iv": {"type": "string", "contentEncoding": "base64", "description": "The 96-bit nonce."},
                    "ct": {"type": "string", "contentEncoding": "base64", "description": "Ciphertext and tag."},
                },
                "required": ["sfenc", "alg", "kid", "edk", "iv", "ct"],
            }),
        );
    }

    fn queue_channel(&mut self, q: &QueueSpec, wires: &[&str]) {
        let s = &q.settings;
        let mut queue = json!({
            "name": q.name,
            "fifoQueue": q.fifo,
            "visibilityTimeout": s.visibility_timeout.as_secs().min(43_200),
            "messageRetentionPeriod": s.retention.as_secs(),
            "deliveryDelay": s.delay.as_secs(),
        });
        if q.fifo {
            let (scope, limit) = match s.high_throughput {
                true => ("messageGroup", "perMessageGroupId"),
                false => ("queue", "perQueue"),
            };
            queue["deduplicationScope"] = json!(scope);
            queue["fifoThroughputLimit"] = json!(limit);
        }
        if let Some(d) = &q.dead_letter {
            queue["redrivePolicy"] = json!({
                "deadLetterQueue": {"name": d.queue},
                "maxReceiveCount": d.max_receive_count,
            });
        }
        if !s.tags.is_empty() {
            queue["tags"] = json!(s.tags);
        }
        let messages = self.channel_messages(wires);
        self.channels.insert(
            format!("queue.{}", q.name),
            json!({
                "address": q.name,
                "title": format!("SQS queue {}", q.name),
                "description": format!(
                    "{} queue; dead letters go to `{}`.",
                    match q.ownership {
                        crate::topology::Ownership::Consumed => "A consumed",
                        crate::topology::Ownership::SendOnly => "A send-only",
                    },
                    q.dead_letter.as_ref().map_or("", |d| d.queue.as_str())
                ),
                "messages": messages,
                "bindings": {"sqs": {"queue": queue, "bindingVersion": SQS_BINDING}},
            }),
        );
    }

    fn topic_channel(&mut self, t: &TopicSpec, wires: &[&str]) {
        let mut sns = json!({"name": t.name, "bindingVersion": SNS_BINDING});
        sns["ordering"] = match t.fifo {
            true => json!({"type": "FIFO", "contentBasedDeduplication": false}),
            false => json!({"type": "standard"}),
        };
        let messages = self.channel_messages(wires);
        self.channels.insert(
            format!("topic.{}", t.name),
            json!({
                "address": t.name,
                "title": format!("SNS topic {}", t.name),
                "messages": messages,
                "bindings": {"sns": sns},
            }),
        );
    }

    fn channel_messages(&self, wires: &[&str]) -> Value {
        let mut out = Map::new();
        for w in wires {
            let key = self.key(w);
            out.insert(
                key.clone(),
                json!({"$ref": format!("#/components/messages/{key}")}),
            );
        }
        Value::Object(out)
    }

    fn operation(
        &mut self,
        action: &str,
        channel: &str,
        wire: &str,
        summary: String,
        sns: Option<Value>,
    ) {
        let key = self.key(wire);
        let mut op = json!({
            "action": action,
            "channel": {"$ref": format!("#/channels/{}", pointer(channel))},
            "summary": summary,
            "messages": [{"$ref": format!("#/channels/{}/messages/{}", pointer(channel), pointer(&key))}],
        });
        if let Some(sns) = sns {
            op["bindings"] = json!({"sns": sns});
        }
        self.operations.insert(format!("{action}.{key}"), op);
    }
}

/// The `sns` operation binding of a subscription: this service's queue as a consumer.
fn subscription_binding(s: &SubscriptionSpec) -> Value {
    let mut consumer = json!({
        "protocol": "sqs",
        "endpoint": {"name": s.queue},
        "rawMessageDelivery": true,
        "filterPolicyScope": "MessageAttributes",
    });
    if let Some(f) = &s.filter {
        // The binding's schema takes a filter of plain values (strings, lists of strings,
        // objects); SNS's full syntax (`$or`, numeric lists) goes into an extension.
        let plain = f.as_object().is_some_and(|o| {
            o.iter().all(|(k, v)| {
                !k.starts_with('$')
                    && match v {
                        Value::String(_) | Value::Object(_) => true,
                        Value::Array(a) => a.iter().all(Value::is_string),
                        _ => false,
                    }
            })
        });
        match plain {
            true => consumer["filterPolicy"] = f.clone(),
            false => consumer["x-sourceflow-filterPolicy"] = f.clone(),
        }
    }
    json!({
        "topic": {"name": s.topic},
        "consumers": [consumer],
        "bindingVersion": SNS_BINDING,
    })
}

/// Rewrites `#/definitions/X` (schemars, draft 7) to the hoisted `#/components/schemas/{key}.X`.
fn rewrite_refs(v: &mut Value, key: &str) {
    match v {
        Value::Object(o) => {
            if let Some(Value::String(r)) = o.get_mut("$ref") {
                for from in ["#/definitions/", "#/$defs/"] {
                    if let Some(def) = r.strip_prefix(from) {
                        *r = format!("#/components/schemas/{key}.{}", component_key(def));
                        break;
                    }
                }
            }
            o.values_mut().for_each(|v| rewrite_refs(v, key));
        }
        Value::Array(a) => a.iter_mut().for_each(|v| rewrite_refs(v, key)),
        _ => {}
    }
}

/// A JSON pointer segment (`~` and `/` escaped).
fn pointer(segment: &str) -> String {
    segment.replace('~', "~0").replace('/', "~1")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::MessageKind;
    use crate::naming::Naming;
    use crate::registry::QueueOptions;
    use crate::runtime::ListenerSummary;
    use crate::topology::Topology;
    use std::time::Duration;

    fn route(
        name: &'static str,
        kind: MessageKind,
        destination: &'static str,
        schema: Option<fn() -> Value>,
    ) -> &'static MessageRoute {
        Box::leak(Box::new(MessageRoute {
            name,
            kind,
            destination,
            fifo: destination.ends_with(".fifo"),
            has_entity_id: destination.ends_with(".fifo"),
            encrypt: false,
            module_path: "shop",
            type_name: "T",
            queue_options: QueueOptions::NONE,
            schema,
        }))
    }

    fn order_schema() -> Value {
        json!({
            "$schema": "http://json-schema.org/draft-07/schema#",
            "title": "PlaceOrder",
            "type": "object",
            "properties": {"line": {"$ref": "#/definitions/Line"}},
            "definitions": {"Line": {"type": "object", "properties": {"sku": {"type": "string"}}}},
        })
    }

    fn plan() -> ServicePlan {
        let place = route(
            "shop.PlaceOrder.v1",
            MessageKind::Command,
            "orders.fifo",
            Some(order_schema),
        );
        let placed = route(
            "shop.OrderPlaced.v1",
            MessageKind::Event,
            "order-events",
            None,
        );
        let topology = Topology {
            queues: vec![
                QueueSpec::new("orders-dlq.fifo"),
                QueueSpec::new("orders.fifo").with_dead_letter("orders-dlq.fifo", 100),
                QueueSpec::new("shop-order-events-dlq"),
                QueueSpec::new("shop-order-events").with_dead_letter("shop-order-events-dlq", 100),
            ],
            topics: vec![TopicSpec::new("order-events")],
            subscriptions: vec![SubscriptionSpec::new("order-events", "shop-order-events")
                .types(["shop.OrderPlaced.v1"])],
            subscriber_prefix: None,
            bucket: None,
        };
        let listener = |queue: &str, wire: &'static str| ListenerSummary {
            queue: queue.into(),
            fifo: queue.ends_with(".fifo"),
            handlers: vec![(wire, "shop::handle".into())],
            visibility_timeout: Duration::from_secs(30),
            max_attempts: 5,
        };
        ServicePlan {
            service: "shop".into(),
            naming: Naming::new(""),
            topology,
            listeners: vec![
                listener("orders.fifo", "shop.PlaceOrder.v1"),
                listener("shop-order-events", "shop.OrderPlaced.v1"),
            ],
            messages: vec![place, placed],
        }
    }

    #[test]
    fn channels_are_queues_and_topics_by_physical_name() {
        let d = asyncapi(&plan());
        assert_eq!(d["asyncapi"], "3.0.0");
        let ch = &d["channels"];
        assert_eq!(ch["queue.orders.fifo"]["address"], "orders.fifo");
        assert_eq!(ch["topic.order-events"]["address"], "order-events");
        assert_eq!(
            ch["queue.shop-order-events"]["address"],
            "shop-order-events"
        );
        assert!(
            ch.get("queue.orders-dlq.fifo").is_none(),
            "dead-letter queues are bindings"
        );
        let sqs = &ch["queue.orders.fifo"]["bindings"]["sqs"];
        assert_eq!(sqs["bindingVersion"], "0.2.0");
        assert_eq!(sqs["queue"]["fifoQueue"], true);
        assert_eq!(
            sqs["queue"]["redrivePolicy"]["deadLetterQueue"]["name"],
            "orders-dlq.fifo"
        );
        assert_eq!(
            ch["topic.order-events"]["bindings"]["sns"]["ordering"]["type"],
            "standard"
        );
        assert_eq!(
            ch["queue.shop-order-events"]["messages"]["shop.OrderPlaced.v1"]["$ref"],
            "#/components/messages/shop.OrderPlaced.v1"
        );
    }

    #[test]
    fn messages_carry_the_schema_or_say_there_is_none() {
        let d = asyncapi(&plan());
        let m = &d["components"]["messages"]["shop.PlaceOrder.v1"];
        assert_eq!(m["name"], "shop.PlaceOrder.v1");
        assert_eq!(
            m["payload"]["properties"]["payload"]["$ref"],
            "#/components/schemas/shop.PlaceOrder.v1.Payload"
        );
        let s = &d["components"]["schemas"];
        assert_eq!(
            s["shop.PlaceOrder.v1.Payload"]["properties"]["line"]["$ref"],
            "#/components/schemas/shop.PlaceOrder.v1.Line",
            "definitions are hoisted and their references rewritten"
        );
        assert_eq!(
            s["shop.PlaceOrder.v1.Line"]["properties"]["sku"]["type"],
            "string"
        );
        assert!(s["shop.PlaceOrder.v1.Payload"].get("$schema").is_none());
        let unknown =
            &d["components"]["messages"]["shop.OrderPlaced.v1"]["payload"]["properties"]["payload"];
        assert!(unknown["description"]
            .as_str()
            .is_some_and(|t| t.contains("does not derive `JsonSchema`")));
        assert!(
            unknown.get("type").is_none() && unknown.get("properties").is_none(),
            "no invented shape"
        );
    }

    #[test]
    fn operations_send_and_receive_per_route() {
        let d = asyncapi(&plan());
        let ops = &d["operations"];
        assert_eq!(ops["send.shop.PlaceOrder.v1"]["action"], "send");
        assert_eq!(
            ops["send.shop.PlaceOrder.v1"]["channel"]["$ref"],
            "#/channels/queue.orders.fifo"
        );
        assert_eq!(
            ops["send.shop.OrderPlaced.v1"]["channel"]["$ref"],
            "#/channels/topic.order-events"
        );
        let rx = &ops["receive.shop.OrderPlaced.v1"];
        assert_eq!(rx["action"], "receive");
        assert_eq!(rx["channel"]["$ref"], "#/channels/queue.shop-order-events");
        assert_eq!(
            rx["messages"][0]["$ref"],
            "#/channels/queue.shop-order-events/messages/shop.OrderPlaced.v1"
        );
        let consumer = &rx["bindings"]["sns"]["consumers"][0];
        assert_eq!(consumer["protocol"], "sqs");
        assert_eq!(consumer["rawMessageDelivery"], true);
        assert_eq!(
            consumer["filterPolicy"],
            json!({"sourceflow.type": ["shop.OrderPlaced.v1"]})
        );
        assert_eq!(ops.as_object().map(|o| o.len()), Some(4));
    }
}
