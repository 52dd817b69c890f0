//! The startup plan: the topology and listeners the routes need, and every check that
//! needs all routes linked.

use std::any::TypeId;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use crate::error::{Error, Result, TopologyProblems};
use crate::message::MessageKind;
use crate::naming::{check_queue_name, Naming};
use crate::registry::{self, HandlerRoute, MessageRoute};
use crate::transport::{DeadLetterSpec, QueueSpec, SubscriptionSpec, TopicSpec, Topology};

use super::config::Resolved;

pub(super) struct ListenerPlan {
    pub(super) queue: Arc<str>,
    pub(super) fifo: bool,
    pub(super) handlers: HashMap<&'static str, Vec<&'static HandlerRoute>>,
}

pub(super) struct Plan {
    pub(super) topology: Topology,
    pub(super) listeners: Vec<ListenerPlan>,
    pub(super) destinations: HashMap<&'static str, Arc<str>>,
}

/// Works out the topology and listeners, and runs every check that needs all routes.
pub(super) fn plan(r: &Resolved, messages: &[&'static MessageRoute]) -> Result<Plan> {
    let mut problems = Vec::new();
    registry::check_messages(messages, &mut problems);
    let states: HashSet<TypeId> = r.states.keys().copied().collect();
    registry::check_handlers(&r.handlers, &states, &mut problems);

    if r.encryption.is_none() {
        // Receiving needs the key from the start; a send of an encrypted type without a key
        // fails at the call with the same advice.
        let handled: HashSet<&str> = r.handlers.iter().map(|h| h.message).collect();
        let mut needing: Vec<&str> = messages
            .iter()
            .filter(|m| (m.encrypt || r.encrypt_all) && handled.contains(m.name))
            .map(|m| m.name)
            .collect();
        needing.sort_unstable();
        needing.dedup();
        if !needing.is_empty() {
            problems.push(format!(
                "this service handles {}, which must be encrypted, but no key provider is configured: set SOURCEFLOW_KMS_KEY_ID (KMS) or SOURCEFLOW_LOCAL_KEY (development), or call `.key_provider(..)`",
                needing.join(", ")
            ));
        }
    }
    let naming = &r.naming;
    let mut destinations = HashMap::new();
    // Queues and topics of every message known to the binary: a service may send any.
    let mut queues: BTreeMap<String, bool> = BTreeMap::new();
    let mut topics: BTreeMap<String, bool> = BTreeMap::new();
    for m in messages {
        let full = naming.resource(m.destination);
        destinations.insert(m.name, Arc::from(full.as_str()));
        match m.kind {
            MessageKind::Command => {
                queues.insert(full, m.fifo);
            }
            MessageKind::Event => {
                topics.insert(full, m.fifo);
            }
        }
    }

    // Listeners: command queues, and one subscriber queue per (service, topic).
    let mut listeners: BTreeMap<String, (bool, HashMap<&'static str, Vec<&'static HandlerRoute>>)> =
        BTreeMap::new();
    let mut subscriptions: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for h in &r.handlers {
        let queue = match h.kind {
            MessageKind::Command => naming.resource(h.destination),
            MessageKind::Event => {
                let q = match h.queue {
                    Some(q) => naming.resource(q),
                    None => naming.subscriber(&r.service, h.destination),
                };
                let types = subscriptions
                    .entry((naming.resource(h.destination), q.clone()))
                    .or_default();
                if !types.iter().any(|t| t == h.message) {
                    types.push(h.message.to_string());
                }
                q
            }
        };
        let fifo = queue.ends_with(".fifo");
        queues.entry(queue.clone()).or_insert(fifo);
        listeners
            .entry(queue)
            .or_insert_with(|| (fifo, HashMap::new()))
            .1
            .entry(h.message)
            .or_default()
            .push(h);
    }

    // A command queue this service consumes must not carry commands it cannot handle.
    for m in messages.iter().filter(|m| m.kind == MessageKind::Command) {
        let q = naming.resource(m.destination);
        if let Some((_, hs)) = listeners.get(&q) {
            if !hs.contains_key(m.name) {
                let handled: Vec<_> = hs.keys().copied().collect();
                problems.push(format!(
                    "service `{}` consumes queue `{q}` (for {}), which also carries command `{}` ({}) that it has no handler for; such messages would be dead-lettered: add a handler, or give `{}` its own queue",
                    r.service,
                    handled.join(", "),
                    m.name,
                    m.rust_path(),
                    m.type_name
                ));
            }
        }
    }

    for q in queues.keys() {
        if let Err(e) = check_queue_name(q) {
            problems.push(e);
        }
    }
    for t in topics.keys() {
        if t.len() > crate::naming::SNS_NAME_MAX {
            problems.push(format!(
                "topic name `{t}` is longer than {} characters",
                crate::naming::SNS_NAME_MAX
            ));
        }
    }
    if !problems.is_empty() {
        problems.sort();
        problems.dedup();
        return Err(Error::Topology(TopologyProblems(problems)));
    }

    let mut topology = Topology::default();
    for (name, fifo) in &queues {
        let dlq = Naming::dead_letter(name);
        topology.queues.push(QueueSpec {
            name: dlq.clone(),
            fifo: *fifo,
            visibility_timeout: r.visibility_timeout,
            dead_letter: None,
        });
        topology.queues.push(QueueSpec {
            name: name.clone(),
            fifo: *fifo,
            visibility_timeout: r.visibility_timeout,
            dead_letter: Some(DeadLetterSpec {
                queue: dlq,
                max_receive_count: r.redrive_limit,
            }),
        });
    }
    for (name, fifo) in &topics {
        topology.topics.push(TopicSpec {
            name: name.clone(),
            fifo: *fifo,
        });
    }
    for ((topic, queue), mut types) in subscriptions {
        types.sort();
        topology.subscriptions.push(SubscriptionSpec {
            topic,
            queue,
            message_types: types,
        });
    }
    let listeners = listeners
        .into_iter()
        .map(|(queue, (fifo, handlers))| ListenerPlan {
            queue: Arc::from(queue.as_str()),
            fifo,
            handlers,
        })
        .collect();
    Ok(Plan {
        topology,
        listeners,
        destinations,
    })
}
