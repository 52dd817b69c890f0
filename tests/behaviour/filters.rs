//! Message attributes set by producers, and `#[handler(filter = ..)]` on them: an event
//! handler receives only the events whose attributes its filter accepts, merged with the type
//! filter sourceflow sets; the handler reads the attributes from its context.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sourceflow::{command, event, AttributeValue, Error, SendOptions};

use crate::harness::{eventually, Harness};

#[event(topic = "filters-payments")]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Payment {
    id: u64,
}

#[command(queue = "filters-approvals")]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Approve {
    id: u64,
}

#[event(topic = "filters-approved")]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Approved {
    id: u64,
}

/// The `region` (a String) and `amount` (a Number) a handler's context read.
type Read = (Option<String>, Option<f64>);

/// What a handler saw: id → what its context read.
#[derive(Clone, Default)]
pub struct Seen(pub Arc<Mutex<BTreeMap<u64, Read>>>);

impl Seen {
    fn ids(&self) -> Vec<u64> {
        self.0.lock().unwrap().keys().copied().collect()
    }
    fn record(&self, id: u64, ctx: &sourceflow::Context) {
        let region = ctx
            .attribute("region")
            .and_then(AttributeValue::as_string)
            .map(str::to_string);
        let amount = ctx.attribute("amount").and_then(AttributeValue::as_number);
        self.0.lock().unwrap().insert(id, (region, amount));
    }
}

/// Large payments in Europe only.
mod ledger {
    use super::{Payment, Seen};
    use sourceflow::{handler, Context, State};

    pub const MODULE: &str = module_path!();

    #[handler(
        filter = r#"{"region": ["eu-west-1", {"prefix": "eu-"}], "amount": [{"numeric": [">=", 100]}]}"#
    )]
    async fn large_european(
        evt: Payment,
        ctx: &Context,
        State(seen): State<Seen>,
    ) -> sourceflow::Result<()> {
        seen.record(evt.id, ctx);
        Ok(())
    }
}

/// Every payment and every approval: tells when all were delivered.
mod audit {
    use super::{Approved, Payment, Seen};
    use sourceflow::{handler, Context, State};

    pub const MODULE: &str = module_path!();

    #[handler]
    async fn every_payment(
        evt: Payment,
        ctx: &Context,
        State(seen): State<Seen>,
    ) -> sourceflow::Result<()> {
        seen.record(evt.id, ctx);
        Ok(())
    }

    #[derive(Clone, Default)]
    pub struct AllApproved(pub Seen);

    #[handler]
    async fn every_approval(
        evt: Approved,
        ctx: &Context,
        State(all): State<AllApproved>,
    ) -> sourceflow::Result<()> {
        all.0.record(evt.id, ctx);
        Ok(())
    }
}

/// Approves, raising `Approved` with a `tier` attribute from inside the handler.
mod approvals {
    use super::{Approve, Approved};
    use sourceflow::{handler, Context, SendOptions};

    pub const MODULE: &str = module_path!();

    #[handler]
    async fn approve(cmd: Approve, ctx: &Context) -> sourceflow::Result<()> {
        let tier = if cmd.id.is_multiple_of(2) {
            "gold"
        } else {
            "basic"
        };
        ctx.raise_with(
            Approved { id: cmd.id },
            SendOptions::new().attribute("tier", tier),
        )
        .await
    }
}

/// Gold approvals only.
mod concierge {
    use super::{Approved, Seen};
    use sourceflow::{handler, Context, State};

    pub const MODULE: &str = module_path!();

    #[handler(filter = r#"{"tier": ["gold"]}"#)]
    async fn gold(
        evt: Approved,
        ctx: &Context,
        State(seen): State<Seen>,
    ) -> sourceflow::Result<()> {
        seen.record(evt.id, ctx);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filtered_handler_gets_only_the_events_whose_attributes_match() {
    let h = Harness::new().await;
    let ledger_seen = Seen::default();
    let audit_seen = Seen::default();
    let ledger = h
        .service("ledger", ledger::MODULE)
        .state(ledger_seen.clone())
        .start()
        .await
        .expect("ledger");
    let audit = h
        .service("audit", audit::MODULE)
        .state(audit_seen.clone())
        .state(audit::AllApproved::default())
        .start()
        .await
        .expect("audit");
    let o = SendOptions::new;
    let payments = [
        (
            1,
            o().attribute("region", "eu-west-1")
                .attribute("amount", 150),
        ),
        (
            2,
            o().attribute("region", "us-east-1")
                .attribute("amount", 150),
        ),
        (
            3,
            o().attribute("region", "eu-central-1")
                .attribute("amount", 99.5),
        ),
        (
            4,
            o().attribute("region", "eu-central-1")
                .attribute("amount", 100),
        ),
        // A string is not a number: the numeric condition does not take it.
        (
            5,
            o().attribute("region", "eu-west-1")
                .attribute("amount", "150"),
        ),
        (6, o()),
        (7, o().attribute("amount", 500)),
    ];
    let all = payments.len();
    for (id, options) in payments {
        ledger
            .raise_with(Payment { id }, options)
            .await
            .expect("raise");
    }
    eventually("audit sees every payment", || {
        let n = audit_seen.ids().len();
        async move { n == all }
    })
    .await;
    // The filtered copies went nowhere; give a late delivery the time to show.
    tokio::time::sleep(Duration::from_secs(2)).await;
    // LocalStack 4.9.2 matches numeric conditions on a String's text (its matcher ignores
    // DataType, see tests/transport/filters.rs): there the string "150" passes too.
    let emulator = crate::harness::transport_kind() == "aws"
        && std::env::var("SOURCEFLOW_TEST_REAL_AWS").as_deref() != Ok("1");
    let expected: &[u64] = if emulator { &[1, 4, 5] } else { &[1, 4] };
    assert_eq!(
        ledger_seen.ids(),
        expected,
        "the ledger's filter on region and amount"
    );
    let seen = ledger_seen.0.lock().unwrap().clone();
    assert_eq!(seen[&1], (Some("eu-west-1".to_string()), Some(150.0)));
    assert_eq!(seen[&4], (Some("eu-central-1".to_string()), Some(100.0)));
    // The unfiltered handler reads the attributes with their types too.
    let audited = audit_seen.0.lock().unwrap().clone();
    assert_eq!(audited[&3].1, Some(99.5));
    assert_eq!(
        audited[&5],
        (Some("eu-west-1".to_string()), None),
        "a String is no number"
    );
    assert_eq!(audited[&6], (None, None));
    ledger.shutdown().await.expect("shutdown");
    audit.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attributes_raised_inside_a_handler_are_filtered_on() {
    let h = Harness::new().await;
    let gold = Seen::default();
    let all = audit::AllApproved::default();
    let approvals = h
        .service("approvals", approvals::MODULE)
        .start()
        .await
        .expect("approvals");
    let concierge = h
        .service("concierge", concierge::MODULE)
        .state(gold.clone())
        .start()
        .await
        .expect("concierge");
    let audit = h
        .service("audit", audit::MODULE)
        .state(Seen::default())
        .state(all.clone())
        .start()
        .await
        .expect("audit");
    for id in 1..=6 {
        approvals.send(Approve { id }).await.expect("send");
    }
    eventually("audit sees every approval", || {
        let n = all.0.ids().len();
        async move { n == 6 }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        gold.ids(),
        [2, 4, 6],
        "only gold approvals reach the concierge"
    );
    for s in [approvals, concierge, audit] {
        s.shutdown().await.expect("shutdown");
    }
}

#[tokio::test]
async fn attributes_sqs_or_sourceflow_would_refuse_are_refused_at_the_call() {
    let h = Harness::new().await;
    let app = h
        .service("refusals", ledger::MODULE)
        .state(Seen::default())
        .start()
        .await
        .expect("start");
    let refused = |r: sourceflow::Result<String>| match r {
        Err(Error::InvalidAttribute { name, reason, .. }) => format!("{name}: {reason}"),
        other => panic!("expected InvalidAttribute, got {other:?}"),
    };
    let raise = |o: SendOptions| app.raise_with(Payment { id: 1 }, o);
    let e = refused(raise(SendOptions::new().attribute("sourceflow.type", "x")).await);
    assert!(e.contains("sourceflow's own"), "{e}");
    let e = refused(raise(SendOptions::new().attribute("AWS.x", "x")).await);
    assert!(e.contains("reserved by AWS"), "{e}");
    let e = refused(raise(SendOptions::new().attribute("a b", "x")).await);
    assert!(e.contains("not allowed"), "{e}");
    let e = refused(raise(SendOptions::new().attribute("a", "")).await);
    assert!(e.contains("empty"), "{e}");
    let e = refused(raise(SendOptions::new().attribute("a", 1).attribute("a", 2)).await);
    assert!(e.contains("twice"), "{e}");
    let e = refused(raise(SendOptions::new().attribute("a", f64::INFINITY)).await);
    assert!(e.contains("finite"), "{e}");
    // Payment has no entity id and no trace here: sourceflow sets type, content type,
    // sequence and correlation id and keeps one for the dead-letter reason, so 5 are left.
    let mut five = SendOptions::new();
    for i in 0..5 {
        five = five.attribute(format!("a{i}"), i);
    }
    app.raise_with(Payment { id: 2 }, five.clone())
        .await
        .expect("ten attributes in all are accepted");
    let e = refused(raise(five.attribute("a5", 5)).await);
    assert!(
        e.contains("at most 10") && e.contains("at most 5 of yours"),
        "{e}"
    );
    app.shutdown().await.expect("shutdown");
}
