//! The startup plan: the topology and listeners the routes need, and every check that
//! needs all routes linked.
//!
//! Ownership (see [`topology`](crate::topology)): the queues this service consumes — command
//! queues it has the handler of, its subscriber queues — and their dead-letter queues are
//! [`Ownership::Consumed`], with the settings their routes declare; every other command
//! queue of the binary is [`Ownership::SendOnly`]; every topic is created idempotently.

use std::any::TypeId;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, Result, TopologyProblems};
use crate::message::MessageKind;
use crate::naming::{check_queue_name, Naming};
use crate::registry::{self, HandlerRoute, MessageRoute, QueueOptions, Sse};
use crate::topology::{
    Ownership, QueueSettings, QueueSpec, ServerSideEncryption, SubscriptionSpec, TopicSpec,
    Topology, DEAD_LETTER_RETENTION, DEFAULT_RETENTION,
};

use super::config::{default_redrive_limit, Resolved};

pub(super) struct ListenerPlan {
    pub(super) queue: Arc<str>,
    pub(super) fifo: bool,
    pub(super) handlers: HashMap<&'static str, Vec<&'static HandlerRoute>>,
    /// The queue's visibility timeout.
    pub(super) visibility_timeout: Duration,
    /// Handler attempts before the dead-letter queue.
    pub(super) max_attempts: u32,
}

pub(super) struct Plan {
    pub(super) topology: Topology,
    pub(super) listeners: Vec<ListenerPlan>,
    pub(super) destinations: HashMap<&'static str, Arc<str>>,
    /// The query handlers, by query type (answered in process: no topology).
    pub(super) queries: crate::query::QueryTable,
}

/// What a service needs and runs, worked out from its routes and configuration alone:
/// nothing is contacted — no broker, store or key provider. The operator command line and
/// the exports (CloudFormation, AsyncAPI) are made from it.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> sourceflow::Result<()> {
/// let plan = sourceflow::builder().service("orders").plan().await?;
/// for q in &plan.topology.queues {
///     println!("{} ({:?})", q.name, q.ownership);
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct ServicePlan {
    /// The service name.
    pub service: String,
    /// Resource naming (the environment prefix).
    pub naming: Naming,
    /// The resources the service needs, with their settings and ownership.
    pub topology: Topology,
    /// The queues the service consumes, with their handlers.
    pub listeners: Vec<ListenerSummary>,
    /// Every message type linked into the binary.
    pub messages: Vec<&'static MessageRoute>,
}

/// A queue a service consumes, as planned.
#[derive(Debug, Clone)]
pub struct ListenerSummary {
    /// The queue's full name.
    pub queue: String,
    /// FIFO queue.
    pub fifo: bool,
    /// Its handlers: the wire name each handles, and the handler (`module::function`).
    pub handlers: Vec<(&'static str, String)>,
    /// The queue's visibility timeout.
    pub visibility_timeout: Duration,
    /// Handler attempts before the dead-letter queue.
    pub max_attempts: u32,
}

impl ServicePlan {
    pub(super) fn new(r: &Resolved, messages: Vec<&'static MessageRoute>, plan: Plan) -> Self {
        let listeners = plan
            .listeners
            .iter()
            .map(|l| {
                let mut handlers: Vec<(&'static str, String)> = l
                    .handlers
                    .iter()
                    .flat_map(|(wire, hs)| hs.iter().map(move |h| (*wire, h.qualified_name())))
                    .collect();
                handlers.sort();
                ListenerSummary {
                    queue: l.queue.to_string(),
                    fifo: l.fifo,
                    handlers,
                    visibility_timeout: l.visibility_timeout,
                    max_attempts: l.max_attempts,
                }
            })
            .collect();
        ServicePlan {
            service: r.service.clone(),
            naming: r.naming.clone(),
            topology: plan.topology,
            listeners,
            messages,
        }
    }
}

/// A queue this service consumes, as its routes declare it.
struct Consumed {
    fifo: bool,
    handlers: HashMap<&'static str, Vec<&'static HandlerRoute>>,
    options: QueueOptions,
    /// Where the options come from, for conflict messages.
    declared_by: Option<String>,
}

/// Works out the topology and listeners, and runs every check that needs all routes.
pub(super) fn plan(r: &Resolved, messages: &[&'static MessageRoute]) -> Result<Plan> {
    let mut problems = Vec::new();
    registry::check_messages(messages, &mut problems);
    let states: HashSet<TypeId> = r.states.keys().copied().collect();
    registry::check_handlers(&r.handlers, &states, &mut problems);
    registry::check_queries(&r.queries, &states, &mut problems);
    check_encryption(r, messages, &mut problems);
    let naming = &r.naming;
    let consumed = consumed_queues(r, messages, &mut problems);
    let subscriptions = subscriptions(r, &mut problems);
    check_shared_queues(r, messages, &consumed, &mut problems);
    let mut topology = Topology::default();
    let mut destinations = HashMap::new();
    let mut listeners = Vec::new();
    for (name, c) in &consumed {
        let settings = settings(r, &c.options, c.fifo, name, &mut problems);
        let attempts = c.options.max_receive_count.unwrap_or(r.max_receive_count);
        let limit = redrive_limit(r, attempts, name, &mut problems);
        push_queue(
            &mut topology,
            name,
            Ownership::Consumed,
            settings.clone(),
            limit,
        );
        listeners.push(ListenerPlan {
            queue: Arc::from(name.as_str()),
            fifo: c.fifo,
            handlers: c.handlers.clone(),
            visibility_timeout: settings.visibility_timeout,
            max_attempts: attempts,
        });
    }
    let mut topics: BTreeMap<String, bool> = BTreeMap::new();
    for m in messages {
        let full = naming.resource(m.destination);
        destinations.insert(m.name, Arc::from(full.as_str()));
        match m.kind {
            MessageKind::Event => {
                topics.insert(full, m.fifo);
            }
            MessageKind::Command if !consumed.contains_key(&full) => {
                if topology.queue(&full).is_some() {
                    continue;
                }
                let settings = settings(r, &m.queue_options, m.fifo, &full, &mut problems);
                let attempts = m
                    .queue_options
                    .max_receive_count
                    .unwrap_or(r.max_receive_count);
                let limit = redrive_limit(r, attempts, &full, &mut problems);
                push_queue(&mut topology, &full, Ownership::SendOnly, settings, limit);
            }
            MessageKind::Command => {}
        }
    }
    for (name, fifo) in &topics {
        topology.topics.push(TopicSpec {
            name: name.clone(),
            fifo: *fifo,
        });
    }
    topology.subscriptions = subscriptions;
    topology.subscriber_prefix = Some(r.naming.subscriber(&r.service, ""));
    topology.bucket = r.claim_check.as_ref().map(|c| crate::topology::BucketSpec {
        name: c.bucket.clone(),
        prefix: c.prefix.clone().unwrap_or_default(),
        expiration_days: c.expiration_days,
    });
    check_names(&topology, &mut problems);
    if !problems.is_empty() {
        problems.sort();
        problems.dedup();
        return Err(Error::Topology(TopologyProblems(problems)));
    }
    Ok(Plan {
        topology,
        listeners,
        destinations,
        queries: registry::query_table(&r.queries),
    })
}

/// Receiving an encrypted type needs the key from the start; a send of one without a key
/// fails at the call with the same advice.
fn check_encryption(r: &Resolved, messages: &[&'static MessageRoute], problems: &mut Vec<String>) {
    if r.encryption.is_some() || r.offline {
        return;
    }
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

/// The queue a handler listens on: its command's queue, or its subscriber queue.
fn queue_of(r: &Resolved, h: &HandlerRoute) -> String {
    match (h.kind, h.queue) {
        (MessageKind::Command, _) => r.naming.resource(h.destination),
        (MessageKind::Event, Some(q)) => r.naming.resource(q),
        (MessageKind::Event, None) => r.naming.subscriber(&r.service, h.destination),
    }
}

/// The queues this service consumes, with their handlers and declared settings.
fn consumed_queues(
    r: &Resolved,
    messages: &[&'static MessageRoute],
    problems: &mut Vec<String>,
) -> BTreeMap<String, Consumed> {
    let mut out: BTreeMap<String, Consumed> = BTreeMap::new();
    for h in &r.handlers {
        let queue = queue_of(r, h);
        let c = out.entry(queue.clone()).or_insert_with(|| Consumed {
            fifo: queue.ends_with(".fifo"),
            handlers: HashMap::new(),
            options: QueueOptions::NONE,
            declared_by: None,
        });
        c.handlers.entry(h.message).or_default().push(h);
        let (options, who) = match h.kind {
            MessageKind::Command => {
                if !h.queue_options.is_none() || h.filter.is_some() {
                    problems.push(format!(
                        "handler {} handles the command {}: a command's queue settings go on its #[command], and commands are not filtered; remove them from the #[handler]",
                        h.qualified_name(), h.message
                    ));
                }
                let declared = messages.iter().find(|m| m.name == h.message);
                (
                    declared.map_or(QueueOptions::NONE, |m| m.queue_options),
                    declared.map(|m| m.rust_path()),
                )
            }
            MessageKind::Event => (h.queue_options, Some(h.qualified_name())),
        };
        if options.is_none() {
            continue;
        }
        match &c.declared_by {
            Some(first) if c.options != options => problems.push(format!(
                "queue `{queue}` gets different settings from {first} and {}: declare them once",
                who.unwrap_or_default()
            )),
            Some(_) => {}
            None => {
                c.options = options;
                c.declared_by = who;
            }
        }
    }
    out
}

/// One subscription per (topic, queue), filtering on the handled types and each handler's
/// own filter policy.
fn subscriptions(r: &Resolved, problems: &mut Vec<String>) -> Vec<SubscriptionSpec> {
    let mut by_pair: BTreeMap<(String, String), Vec<&HandlerRoute>> = BTreeMap::new();
    for h in r.handlers.iter().filter(|h| h.kind == MessageKind::Event) {
        let key = (r.naming.resource(h.destination), queue_of(r, h));
        by_pair.entry(key).or_default().push(h);
    }
    by_pair
        .into_iter()
        .map(|((topic, queue), handlers)| {
            let filter = filter_policy(&handlers, problems);
            // What SNS would refuse at `Subscribe` is refused here, before anything moves.
            if let Err(e) = crate::filter::FilterPolicy::parse(&filter) {
                problems.push(format!(
                    "the subscription of `{queue}` to `{topic}`: its filter policy (the types its handlers take, merged with their filters) is one SNS refuses: {e}"
                ));
            }
            SubscriptionSpec::new(topic, queue).filtered(Some(filter))
        })
        .collect()
}

/// The filter policy of a subscription: the handled types, and where handlers declare a
/// filter of their own, one `$or` branch per type with its handler's conditions.
fn filter_policy(handlers: &[&HandlerRoute], problems: &mut Vec<String>) -> serde_json::Value {
    use crate::envelope::attr;
    let mut by_type: BTreeMap<&str, Option<serde_json::Map<String, serde_json::Value>>> =
        BTreeMap::new();
    for h in handlers {
        let own = h.filter.and_then(|f| match serde_json::from_str(f) {
            Ok(serde_json::Value::Object(m)) => Some(m),
            _ => {
                problems.push(format!(
                    "handler {}: its filter is not a JSON object",
                    h.qualified_name()
                ));
                None
            }
        });
        // Two handlers of one type on one queue: one filter for both, or none.
        match by_type.get_mut(h.message) {
            Some(existing) if *existing != own => problems.push(format!(
                "the handlers of {} on one queue declare different filters; they share one subscription: declare the same filter, or give one of them its own `queue`",
                h.message
            )),
            Some(_) => {}
            None => {
                by_type.insert(h.message, own);
            }
        }
    }
    if by_type.values().all(Option::is_none) {
        let types: Vec<&str> = by_type.keys().copied().collect();
        return serde_json::json!({ attr::TYPE: types });
    }
    let branches: Vec<serde_json::Value> = by_type
        .into_iter()
        .map(|(ty, own)| {
            let mut branch = own.unwrap_or_default();
            branch.insert(attr::TYPE.to_string(), serde_json::json!([ty]));
            serde_json::Value::Object(branch)
        })
        .collect();
    match <[serde_json::Value; 1]>::try_from(branches) {
        Ok([one]) => one,
        Err(branches) => serde_json::json!({ "$or": branches }),
    }
}

/// A command queue this service consumes must not carry commands it cannot handle.
fn check_shared_queues(
    r: &Resolved,
    messages: &[&'static MessageRoute],
    consumed: &BTreeMap<String, Consumed>,
    problems: &mut Vec<String>,
) {
    for m in messages.iter().filter(|m| m.kind == MessageKind::Command) {
        let q = r.naming.resource(m.destination);
        let Some(c) = consumed.get(&q) else {
            continue;
        };
        if !c.handlers.contains_key(m.name) {
            let handled: Vec<_> = c.handlers.keys().copied().collect();
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

/// A queue's settings: what its route declares over the builder's defaults.
fn settings(
    r: &Resolved,
    o: &QueueOptions,
    fifo: bool,
    queue: &str,
    problems: &mut Vec<String>,
) -> QueueSettings {
    if o.high_throughput && !fifo {
        problems.push(format!(
            "queue `{queue}` is standard, but its route asks for `high_throughput`, a FIFO setting"
        ));
    }
    let secs = |v: Option<u32>| v.map(|s| Duration::from_secs(u64::from(s)));
    QueueSettings {
        visibility_timeout: secs(o.visibility_timeout_secs).unwrap_or(r.visibility_timeout),
        retention: secs(o.retention_secs).unwrap_or(DEFAULT_RETENTION),
        delay: secs(o.delay_secs).unwrap_or_default(),
        high_throughput: o.high_throughput,
        encryption: match o.sse {
            None | Some(Sse::Sqs) => ServerSideEncryption::SqsManaged,
            Some(Sse::Kms(key)) => ServerSideEncryption::Kms(key.to_string()),
            Some(Sse::Disabled) => ServerSideEncryption::Disabled,
        },
        tags: o
            .tags
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

/// The broker's redrive limit of a queue whose handlers get `attempts`.
fn redrive_limit(r: &Resolved, attempts: u32, queue: &str, problems: &mut Vec<String>) -> u32 {
    let limit = r
        .redrive_limit
        .unwrap_or_else(|| default_redrive_limit(attempts));
    if limit <= attempts && attempts < 1000 {
        problems.push(format!(
            "queue `{queue}`: the broker's redrive limit ({limit}) must be above the handler attempts ({attempts}), so that sourceflow dead-letters first, with a reason"
        ));
    }
    limit
}

/// A queue and its dead-letter queue (listed first: the queue's redrive names it).
fn push_queue(
    topology: &mut Topology,
    name: &str,
    ownership: Ownership,
    settings: QueueSettings,
    redrive_limit: u32,
) {
    let dlq = Naming::dead_letter(name);
    let dlq_settings = QueueSettings {
        retention: DEAD_LETTER_RETENTION,
        delay: Duration::ZERO,
        ..settings.clone()
    };
    topology.queues.push(
        QueueSpec::new(dlq.clone())
            .owned_as(ownership)
            .with_settings(dlq_settings),
    );
    topology.queues.push(
        QueueSpec::new(name)
            .owned_as(ownership)
            .with_settings(settings)
            .with_dead_letter(dlq, redrive_limit),
    );
}

fn check_names(topology: &Topology, problems: &mut Vec<String>) {
    for q in topology.queues.iter().filter(|q| q.dead_letter.is_some()) {
        if let Err(e) = check_queue_name(&q.name) {
            problems.push(e);
        }
    }
    for t in &topology.topics {
        if t.name.len() > crate::naming::SNS_NAME_MAX {
            problems.push(format!(
                "topic name `{}` is longer than {} characters",
                t.name,
                crate::naming::SNS_NAME_MAX
            ));
        }
    }
}
