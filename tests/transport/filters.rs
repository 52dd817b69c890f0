//! Subscription filter policies on typed message attributes: one table of (policy, attributes,
//! delivered?) cases, each run through a real topic and subscribed queue of the transport
//! under test, which must give the answer SNS documents.
//!
//! The expected answers come from SNS's pages "String value matching", "Numeric value
//! matching", "Key matching" and "Filter policy constraints": types matter (a string condition
//! never matches a `Number` attribute, a numeric one never a `String`), a `String.Array`
//! matches when one of its elements does, `"exists": false` needs the message to carry some
//! attribute.
//!
//! LocalStack 4.9.2, the emulator the AWS run uses, differs: its matcher
//! (`localstack/services/sns/filter.py`, `SubscriptionFilter`) compares every attribute's
//! `StringValue` whatever its `DataType`, so `"42"` matches a `Number` 42, a numeric condition
//! matches the string `"42"`, a bare number (`[42]`) never matches anything (it compares the
//! text "42" with the number 42), `anything-but` a list of numbers passes every value, and
//! `"exists": false` passes a message without attributes; its validator refuses
//! `anything-but` with `suffix` at `Subscribe`. Those cases carry LocalStack's answer (or
//! are left out of the emulator run) with the reason; on real AWS
//! (`SOURCEFLOW_TEST_REAL_AWS=1`) and on the embedded transport the documented answer holds.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tokio::time::Instant;

use sourceflow::envelope::{AttributeValue, OutgoingMessage};
use sourceflow::transport::{SubscriptionSpec, TopicSpec, Topology};

use crate::world::{rx, spec, World, PATIENCE};

/// What LocalStack 4.9.2 does with a case.
#[derive(Clone, Copy)]
enum Emulator {
    /// As SNS documents.
    Same,
    /// The other answer, for this reason.
    Differs(&'static str),
    /// Refuses the policy at `Subscribe`: the case does not run on the emulator.
    Refuses(&'static str),
}
use Emulator::*;

struct Case {
    policy: &'static str,
    attributes: Vec<(&'static str, AttributeValue)>,
    delivered: bool,
    emulator: Emulator,
}

fn s(v: &str) -> AttributeValue {
    AttributeValue::String(v.to_string().into())
}
fn n(v: &str) -> AttributeValue {
    AttributeValue::Number(v.to_string().into())
}
fn arr(json: &str) -> AttributeValue {
    AttributeValue::StringArray(json.to_string().into())
}

const UNTYPED: &str = "LocalStack compares StringValue whatever the DataType";
const BARE_NUMBER: &str =
    "LocalStack compares the text of a Number with the policy's number, never equal";

/// The table: every operator and every type rule.
fn cases() -> Vec<Case> {
    let c = |policy, attributes: Vec<(&'static str, AttributeValue)>, delivered, emulator| Case {
        policy,
        attributes,
        delivered,
        emulator,
    };
    const EXACT: &str = r#"{"region": ["eu"]}"#;
    const CODE: &str = r#"{"code": ["42"]}"#;
    const AMOUNT: &str = r#"{"amount": [42]}"#;
    const PREFIX: &str = r#"{"region": [{"prefix": "eu-"}]}"#;
    const NUM_PREFIX: &str = r#"{"code": [{"prefix": "4"}]}"#;
    const SUFFIX: &str = r#"{"region": [{"suffix": "-1"}]}"#;
    const IGNORE_CASE: &str = r#"{"region": [{"equals-ignore-case": "EU-West-1"}]}"#;
    const BUT: &str = r#"{"region": [{"anything-but": ["eu", "us"]}]}"#;
    const BUT_ONE: &str = r#"{"region": [{"anything-but": "eu"}]}"#;
    const BUT_NUMBERS: &str = r#"{"amount": [{"anything-but": [100, 500]}]}"#;
    const BUT_PREFIX: &str = r#"{"region": [{"anything-but": {"prefix": "eu-"}}]}"#;
    const BUT_SUFFIX: &str = r#"{"region": [{"anything-but": {"suffix": "-1"}}]}"#;
    const EQUALS: &str = r#"{"amount": [{"numeric": ["=", 301.5]}]}"#;
    const RANGE: &str = r#"{"amount": [{"numeric": [">", 0, "<=", 150]}]}"#;
    const BELOW: &str = r#"{"amount": [{"numeric": ["<", 0]}]}"#;
    const AT_LEAST: &str = r#"{"amount": [{"numeric": [">=", 10]}]}"#;
    const EXISTS: &str = r#"{"store": [{"exists": true}]}"#;
    const ABSENT: &str = r#"{"store": [{"exists": false}]}"#;
    const ARRAY: &str = r#"{"interests": ["rugby", "tennis"]}"#;
    const ARRAY_BUT: &str = r#"{"interests": [{"anything-but": ["rugby", "tennis"]}]}"#;
    const ARRAY_NUMERIC: &str = r#"{"scores": [{"numeric": [">", 10]}]}"#;
    const ARRAY_PREFIX: &str = r#"{"interests": [{"prefix": "bas"}]}"#;
    const AND: &str = r#"{"region": ["eu"], "amount": [{"numeric": [">", 100]}]}"#;
    const OR: &str = r#"{"$or": [{"region": ["eu"]}, {"amount": [{"numeric": [">", 100]}]}]}"#;
    const AND_OR: &str = r#"{"kind": ["a"], "$or": [{"region": ["eu"]}, {"tier": ["gold"]}]}"#;
    const CIDR: &str = r#"{"ip": [{"cidr": "10.0.0.0/24"}]}"#;
    vec![
        // Exact strings.
        c(EXACT, vec![("region", s("eu"))], true, Same),
        c(EXACT, vec![("region", s("us"))], false, Same),
        c(EXACT, vec![("other", s("eu"))], false, Same),
        c(CODE, vec![("code", s("42"))], true, Same),
        c(CODE, vec![("code", n("42"))], false, Differs(UNTYPED)),
        // Exact numbers.
        c(
            AMOUNT,
            vec![("amount", n("42"))],
            true,
            Differs(BARE_NUMBER),
        ),
        c(
            AMOUNT,
            vec![("amount", n("42.0"))],
            true,
            Differs(BARE_NUMBER),
        ),
        c(AMOUNT, vec![("amount", n("43"))], false, Same),
        c(AMOUNT, vec![("amount", s("42"))], false, Same),
        // Prefix, suffix, equals-ignore-case: strings only.
        c(PREFIX, vec![("region", s("eu-west-1"))], true, Same),
        c(PREFIX, vec![("region", s("us-east-1"))], false, Same),
        c(NUM_PREFIX, vec![("code", n("42"))], false, Differs(UNTYPED)),
        c(SUFFIX, vec![("region", s("eu-west-1"))], true, Same),
        c(SUFFIX, vec![("region", s("eu-west-2"))], false, Same),
        c(IGNORE_CASE, vec![("region", s("eu-WEST-1"))], true, Same),
        c(IGNORE_CASE, vec![("region", s("eu-west-2"))], false, Same),
        // anything-but.
        c(BUT, vec![("region", s("ap"))], true, Same),
        c(BUT, vec![("region", s("eu"))], false, Same),
        c(BUT, vec![("other", s("ap"))], false, Same),
        c(BUT_ONE, vec![("region", s("eu"))], false, Same),
        c(BUT_ONE, vec![("region", s("ap"))], true, Same),
        c(BUT_NUMBERS, vec![("amount", n("101"))], true, Same),
        c(BUT_NUMBERS, vec![("amount", n("100.1"))], true, Same),
        c(
            BUT_NUMBERS,
            vec![("amount", n("100"))],
            false,
            Differs(UNTYPED),
        ),
        c(BUT_PREFIX, vec![("region", s("us-east-1"))], true, Same),
        c(BUT_PREFIX, vec![("region", s("eu-west-1"))], false, Same),
        c(
            BUT_SUFFIX,
            vec![("region", s("eu-west-2"))],
            true,
            Refuses("anything-but suffix"),
        ),
        c(
            BUT_SUFFIX,
            vec![("region", s("eu-west-1"))],
            false,
            Refuses("anything-but suffix"),
        ),
        // Numeric comparisons and ranges: numbers only.
        c(EQUALS, vec![("amount", n("301.5"))], true, Same),
        c(EQUALS, vec![("amount", n("3.015e2"))], true, Same),
        c(EQUALS, vec![("amount", n("301"))], false, Same),
        c(RANGE, vec![("amount", n("150"))], true, Same),
        c(RANGE, vec![("amount", n("0"))], false, Same),
        c(RANGE, vec![("amount", n("150.5"))], false, Same),
        c(RANGE, vec![("amount", n("-3"))], false, Same),
        c(RANGE, vec![("amount", s("100"))], false, Differs(UNTYPED)),
        c(BELOW, vec![("amount", n("-0.5"))], true, Same),
        c(BELOW, vec![("amount", n("0"))], false, Same),
        c(AT_LEAST, vec![("amount", n("10"))], true, Same),
        c(AT_LEAST, vec![("amount", n("9.99"))], false, Same),
        // exists.
        c(EXISTS, vec![("store", s("x"))], true, Same),
        c(EXISTS, vec![("store", n("1"))], true, Same),
        c(EXISTS, vec![("other", s("x"))], false, Same),
        c(ABSENT, vec![("other", s("x"))], true, Same),
        c(ABSENT, vec![("store", s("x"))], false, Same),
        c(
            ABSENT,
            vec![],
            false,
            Differs("LocalStack does not require some attribute for exists: false"),
        ),
        // String.Array: one element is enough.
        c(
            ARRAY,
            vec![("interests", arr(r#"["rugby", "baseball"]"#))],
            true,
            Same,
        ),
        c(
            ARRAY,
            vec![("interests", arr(r#"["baseball"]"#))],
            false,
            Same,
        ),
        c(ARRAY, vec![("interests", s("rugby"))], true, Same),
        c(
            ARRAY_BUT,
            vec![("interests", arr(r#"["rugby", "baseball"]"#))],
            true,
            Same,
        ),
        c(
            ARRAY_BUT,
            vec![("interests", arr(r#"["rugby", "tennis"]"#))],
            false,
            Same,
        ),
        c(ARRAY_NUMERIC, vec![("scores", arr("[5, 20]"))], true, Same),
        c(ARRAY_NUMERIC, vec![("scores", arr("[5, 6]"))], false, Same),
        c(
            ARRAY_NUMERIC,
            vec![("scores", arr(r#"["20"]"#))],
            false,
            Differs(UNTYPED),
        ),
        c(
            ARRAY_PREFIX,
            vec![("interests", arr(r#"["rugby", "basketball"]"#))],
            true,
            Same,
        ),
        // AND across keys, $or.
        c(
            AND,
            vec![("region", s("eu")), ("amount", n("150"))],
            true,
            Same,
        ),
        c(
            AND,
            vec![("region", s("eu")), ("amount", n("50"))],
            false,
            Same,
        ),
        c(
            AND,
            vec![("region", s("us")), ("amount", n("150"))],
            false,
            Same,
        ),
        c(AND, vec![("region", s("eu"))], false, Same),
        c(OR, vec![("region", s("eu"))], true, Same),
        c(
            OR,
            vec![("region", s("us")), ("amount", n("150"))],
            true,
            Same,
        ),
        c(
            OR,
            vec![("region", s("us")), ("amount", n("50"))],
            false,
            Same,
        ),
        c(
            AND_OR,
            vec![("kind", s("a")), ("tier", s("gold"))],
            true,
            Same,
        ),
        c(
            AND_OR,
            vec![("kind", s("b")), ("region", s("eu"))],
            false,
            Same,
        ),
        c(
            AND_OR,
            vec![("kind", s("a")), ("region", s("us"))],
            false,
            Same,
        ),
        // IP address ranges.
        c(CIDR, vec![("ip", s("10.0.0.7"))], true, Same),
        c(CIDR, vec![("ip", s("10.0.1.7"))], false, Same),
    ]
}

/// Whether the transport under test is the emulator (an AWS run that is not real AWS).
fn on_emulator(w: &World) -> bool {
    w.t.name() == "aws" && std::env::var("SOURCEFLOW_TEST_REAL_AWS").as_deref() != Ok("1")
}

/// A message carrying exactly `attributes`, with the case number as its body.
fn message(case: usize, attributes: &[(&str, AttributeValue)]) -> OutgoingMessage {
    OutgoingMessage {
        body: case.to_string().into(),
        attributes: attributes
            .iter()
            .map(|(k, v)| (k.to_string().into(), v.clone()))
            .collect(),
        group_id: None,
        dedup_id: None,
        delay: None,
        wire_name: "transport.Filtered.v1".into(),
        message_id: uuid::Uuid::new_v4().to_string(),
    }
}

/// Everything `queue` delivers: until `expected` messages came and a quiet second followed,
/// or [`PATIENCE`] ran out. Deletes what it takes.
async fn received(w: &World, queue: &str, expected: usize) -> BTreeSet<usize> {
    let deadline = Instant::now() + PATIENCE;
    let mut got = BTreeSet::new();
    let mut quiet_since = Instant::now();
    while Instant::now() < deadline {
        let batch =
            w.t.receive(
                queue,
                rx(10, Duration::from_secs(1), Duration::from_secs(30)),
            )
            .await
            .expect("receive");
        if batch.is_empty() {
            if got.len() >= expected && quiet_since.elapsed() >= Duration::from_millis(1500) {
                break;
            }
            continue;
        }
        quiet_since = Instant::now();
        let receipts = batch.iter().map(|m| m.receipt.clone()).collect();
        w.t.delete(queue, receipts).await.expect("delete");
        got.extend(
            batch
                .iter()
                .map(|m| m.body.parse::<usize>().expect("case number")),
        );
    }
    got
}

#[tokio::test]
async fn every_operator_and_type_rule_as_sns_documents() {
    let w = World::new().await;
    let emulator = on_emulator(&w);
    let cases = cases();
    // One topic and one subscribed queue per policy: a case's message goes to its policy's
    // topic only.
    let mut policies: BTreeMap<&str, (String, String)> = BTreeMap::new();
    for c in &cases {
        if let (true, Refuses(what)) = (emulator, c.emulator) {
            eprintln!("not on the emulator, which refuses {what}: {}", c.policy);
            continue;
        }
        let i = policies.len();
        policies.entry(c.policy).or_insert_with(|| {
            (
                w.name(&format!("filter-{i}")),
                w.name(&format!("filtered-{i}")),
            )
        });
    }
    let mut topology = Topology::default();
    for (policy, (topic, queue)) in &policies {
        topology
            .queues
            .push(spec(queue, false, Duration::from_secs(30), None));
        topology.topics.push(TopicSpec::new(topic.clone()));
        let policy: serde_json::Value = serde_json::from_str(policy).expect("policy is JSON");
        topology
            .subscriptions
            .push(SubscriptionSpec::new(topic.clone(), queue.clone()).filtered(Some(policy)));
    }
    w.provision(topology).await;

    let mut want: BTreeMap<&str, BTreeSet<usize>> = BTreeMap::new();
    let mut asked: BTreeMap<usize, bool> = BTreeMap::new();
    for (i, c) in cases.iter().enumerate() {
        let Some((topic, _)) = policies.get(c.policy) else {
            continue;
        };
        let delivered = match c.emulator {
            Differs(_) if emulator => !c.delivered,
            _ => c.delivered,
        };
        asked.insert(i, delivered);
        if delivered {
            want.entry(c.policy).or_default().insert(i);
        }
        w.t.publish(topic, vec![message(i, &c.attributes)])
            .await
            .unwrap_or_else(|e| panic!("publish case {i} ({}): {e}", c.policy));
    }

    let got: Vec<(&str, BTreeSet<usize>)> =
        futures_util::future::join_all(policies.iter().map(|(policy, (_, queue))| {
            let expected = want.get(policy).map_or(0, BTreeSet::len);
            let w = &w;
            async move { (*policy, received(w, queue, expected).await) }
        }))
        .await;

    let mut wrong = Vec::new();
    for (policy, arrived) in &got {
        for (i, c) in cases
            .iter()
            .enumerate()
            .filter(|(_, c)| c.policy == *policy)
        {
            let Some(&expected) = asked.get(&i) else {
                continue;
            };
            if arrived.contains(&i) != expected {
                let note = match c.emulator {
                    Differs(why) if emulator => format!(" (expected LocalStack's answer: {why})"),
                    _ => String::new(),
                };
                wrong.push(format!(
                    "case {i}: {policy} with {:?}: expected {}, got {}{note}",
                    c.attributes
                        .iter()
                        .map(|(k, v)| format!("{k}={}:{}", v.data_type(), v.as_str()))
                        .collect::<Vec<_>>(),
                    if expected {
                        "delivered"
                    } else {
                        "filtered out"
                    },
                    if expected {
                        "filtered out"
                    } else {
                        "delivered"
                    },
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} cases disagree on {}:\n{}",
        wrong.len(),
        asked.len(),
        w.t.name(),
        wrong.join("\n")
    );
}

/// A producer's typed attributes arrive with their types, sent to a queue and published
/// through a topic to its subscribed queue (raw delivery), next to the type attribute.
#[tokio::test]
async fn typed_attributes_keep_their_types_through_a_queue_and_a_topic() {
    let w = World::new().await;
    let (topic, queues) = w.topic_with("typed", false, &[("typed-all", &[])]).await;
    let queue = w.queue("typed-direct", Duration::from_secs(30)).await;
    let sent = vec![
        ("region", s("eu-west-1")),
        ("amount", n("42.5")),
        ("tags", AttributeValue::string_array(["gift", "express"])),
    ];
    let m = || {
        let mut m = crate::world::msg("typed");
        m.attributes = (m.attributes.iter().cloned())
            .chain(sent.iter().map(|(k, v)| (k.to_string().into(), v.clone())))
            .collect();
        m
    };
    w.t.send(&queue, vec![m()]).await.expect("send");
    w.t.publish(&topic, vec![m()]).await.expect("publish");
    for q in [&queue, &queues[0]] {
        let got = w.drain(q, 1, PATIENCE).await;
        assert_eq!(got.len(), 1, "the message arrives on `{q}`");
        for (k, v) in &sent {
            let arrived = sourceflow::envelope::attribute_value(&got[0].attributes, k);
            assert_eq!(arrived, Some(v), "`{k}` on `{q}`");
        }
    }
}

/// Attributes SQS and SNS refuse — more than ten, a `Number` that is not one, an empty
/// string — refuse that entry only, on a queue and on a topic. (The AWS transport checks
/// them before the wire, as it checks sizes, so that one such entry never fails its batch.)
#[tokio::test]
async fn attributes_sqs_and_sns_refuse_are_refused_per_entry() {
    let w = World::new().await;
    let (topic, queues) = w
        .topic_with("refusing", false, &[("refusing-all", &[])])
        .await;
    let queue = w.queue("refusing-direct", Duration::from_secs(30)).await;
    let with = |body: &str, extra: Vec<(sourceflow::AttributeName, AttributeValue)>| {
        let mut m = crate::world::msg(body);
        m.attributes = m.attributes.iter().cloned().chain(extra).collect();
        m
    };
    let eleven: Vec<(sourceflow::AttributeName, AttributeValue)> = (0..10)
        .map(|i| (format!("a{i}").into(), n(&i.to_string())))
        .collect();
    let batch = || {
        vec![
            with("ok", vec![("amount".into(), n("1.5"))]),
            with("eleven", eleven.clone()),
            with("not a number", vec![("amount".into(), n("1,5"))]),
            with("empty", vec![("region".into(), s(""))]),
            with("ok too", vec![("tags".into(), arr(r#"["a", 1]"#))]),
        ]
    };
    for (what, result, target) in [
        ("send", w.t.send(&queue, batch()).await, &queue),
        ("publish", w.t.publish(&topic, batch()).await, &queues[0]),
    ] {
        let failed = crate::world::failures(result);
        let refused: Vec<usize> = failed
            .iter()
            .filter(|(_, e)| matches!(e, sourceflow::transport::EntryError::Refused(_)))
            .map(|(i, _)| *i)
            .collect();
        assert_eq!(refused, [1, 2, 3], "{what}: {failed:?}");
        let got = w.drain(target, 2, PATIENCE).await;
        let mut bodies = crate::world::bodies(&got);
        bodies.sort();
        assert_eq!(bodies, ["ok", "ok too"], "{what}");
    }
}
