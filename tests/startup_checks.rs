//! What can only be known once every crate is linked is rejected by `start()`/`run()`
//! before any message moves, with every problem listed.
//!
//! This binary links deliberately inconsistent routes, so it is separate from the behaviour
//! suite.

use serde::{Deserialize, Serialize};
use sourceflow::{command, event, handler, Error, MemoryTransport};

// Two handlers for one command.
#[command(queue = "checks-invoices")]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IssueInvoice {
    pub id: u64,
}

mod first {
    #[sourceflow::handler]
    async fn issue_invoice(_cmd: super::IssueInvoice) {}
}

mod second {
    #[sourceflow::handler]
    async fn issue_invoice_again(_cmd: super::IssueInvoice) {}
}

// Two types claiming one wire name.
mod v1 {
    #[sourceflow::event(topic = "checks-customers", name = "customers.Registered")]
    #[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
    pub struct Registered {
        pub id: u64,
    }
}
mod v2 {
    #[sourceflow::event(topic = "checks-customers", name = "customers.Registered")]
    #[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
    pub struct Registered {
        pub id: u64,
        pub email: String,
    }
}

// A FIFO topic feeding a standard subscriber queue, and the reverse.
#[event(topic = "checks-ledger.fifo")]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LedgerPosted {
    #[entity_id]
    pub account: u64,
}

#[handler(queue = "checks-ledger-audit")]
async fn audit(_evt: LedgerPosted) {}

#[handler]
async fn on_ledger(_evt: LedgerPosted) {}

#[event(topic = "checks-news")]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NewsPublished {
    pub id: u64,
}

#[handler(queue = "checks-news-reader.fifo")]
async fn read_news(_evt: NewsPublished) {}

// A command handler that tries to pick its queue.
#[command(queue = "checks-refunds")]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Refund {
    pub id: u64,
}

#[handler(queue = "checks-elsewhere")]
async fn refund(_cmd: Refund) {}

// A handler that needs state nobody gave.
mod needs_state {
    #[derive(Clone)]
    pub struct Mailer;

    #[sourceflow::command(queue = "checks-mail")]
    #[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
    pub struct SendMail {
        pub to: String,
    }

    #[sourceflow::handler]
    async fn send_mail(_cmd: SendMail, _m: sourceflow::State<Mailer>) {}
}

// A queue this service consumes carries a command it does not handle.
#[command(queue = "checks-shared")]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Handled {
    pub id: u64,
}

#[command(queue = "checks-shared")]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NotHandledHere {
    pub id: u64,
}

#[handler]
async fn handled(_cmd: Handled) {}

// Two types on one subscriber queue whose filters are each fine, but merged into one
// subscription policy have more combinations than SNS takes (80 + 80 > 150).
#[event(topic = "checks-prices")]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PriceRaised {
    pub sku: u64,
}

#[event(topic = "checks-prices")]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PriceCut {
    pub sku: u64,
}

#[handler(
    filter = r#"{"store": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70, 71, 72, 73, 74, 75, 76, 77, 78, 79, 80]}"#
)]
async fn on_raise(_evt: PriceRaised) {}

#[handler(
    filter = r#"{"store": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70, 71, 72, 73, 74, 75, 76, 77, 78, 79, 80]}"#
)]
async fn on_cut(_evt: PriceCut) {}

// Two handlers for one query.
#[sourceflow::query(response = u64)]
pub struct CountInvoices;

mod first_answer {
    #[sourceflow::handler]
    async fn count_invoices(_q: super::CountInvoices) -> sourceflow::Result<u64> {
        Ok(1)
    }
}

mod second_answer {
    #[sourceflow::handler]
    async fn count_invoices_again(_q: super::CountInvoices) -> sourceflow::Result<u64> {
        Ok(2)
    }
}

#[tokio::test]
async fn startup_rejects_inconsistent_routes_before_any_message_moves() {
    let transport = MemoryTransport::new();
    let err = sourceflow::builder()
        .service("checks")
        .transport(transport.clone())
        .start()
        .await
        .expect_err("inconsistent routes must not start");
    let Error::Topology(problems) = &err else {
        panic!("expected a topology error, got {err:?}");
    };
    let text = err.to_string();
    println!("{text}");
    let expected = [
        "command `IssueInvoice` has 2 handlers: startup_checks::first::issue_invoice",
        "wire name `customers.Registered` is claimed by startup_checks::v1::Registered and startup_checks::v2::Registered",
        "subscribes standard queue `checks-ledger-audit` to FIFO topic `checks-ledger.fifo`",
        "subscribes FIFO queue `checks-news-reader.fifo` to standard topic `checks-news`",
        "sets `queue = \"checks-elsewhere\"`, but it handles the command Refund",
        "takes `State<startup_checks::needs_state::Mailer>`, but the runtime was not given one",
        "consumes queue `checks-shared` (for Handled), which also carries command `NotHandledHere`",
        "query `CountInvoices` has 2 handlers: startup_checks::first_answer::count_invoices (",
        "), startup_checks::second_answer::count_invoices_again (",
        "the subscription of `checks-checks-prices` to `checks-prices`: its filter policy (the types its handlers take, merged with their filters) is one SNS refuses: a filter policy has at most 150 combinations of values (the product of its lists' lengths, summed over `$or`), this one has 160",
    ];
    for e in expected {
        assert!(text.contains(e), "missing problem {e:?} in:\n{text}");
    }
    // The query's problem is one line naming both handlers.
    assert_eq!(problems.0.len(), expected.len() - 1, "{text}");
    assert!(
        problems
            .0
            .iter()
            .any(|p| p.contains("query `CountInvoices` has 2 handlers")
                && p.ends_with("a query is answered by exactly one handler, so keep one")),
        "{text}"
    );
    // `plan` runs the same checks without provisioning anything.
    let err = sourceflow::builder()
        .service("checks")
        .plan()
        .await
        .expect_err("the plan sees the duplicate query handlers too");
    assert!(
        err.to_string()
            .contains("query `CountInvoices` has 2 handlers"),
        "{err}"
    );
    assert!(
        transport.queue_names().is_empty() && transport.topic_names().is_empty(),
        "nothing was provisioned"
    );

    // Running a subset only reports that subset's problems (plus the binary-wide one).
    let err = sourceflow::builder()
        .service("checks")
        .transport(transport.clone())
        .handlers_in("startup_checks::first")
        .start()
        .await
        .expect_err("the wire-name clash is binary-wide");
    let text = err.to_string();
    assert!(text.contains("customers.Registered"), "{text}");
    assert!(!text.contains("has 2 handlers"), "{text}");
    // `handlers_in` selects query handlers by the same prefix: one of the two is left.
    let err = sourceflow::builder()
        .service("checks")
        .transport(transport.clone())
        .handlers_in("startup_checks::first_answer")
        .start()
        .await
        .expect_err("the wire-name clash is binary-wide");
    assert!(!err.to_string().contains("CountInvoices"), "{err}");

    // Generated names are checked too: a service name that makes the subscriber queue too long.
    let err = sourceflow::builder()
        .service("a-service-name-long-enough-to-push-the-subscriber-queue-over-eighty")
        .transport(transport.clone())
        .handlers(|h| h.name == "on_ledger")
        .start()
        .await
        .expect_err("bad names");
    let text = err.to_string();
    assert!(
        text.contains("queue name `a-service-name-long-enough-to-push-the-subscriber-queue-over-eighty-checks-ledger.fifo` is too long"),
        "{text}"
    );
    assert!(!text.contains("FIFO topic"), "{text}");

    // Configuration from the environment is validated with a clear message.
    std::env::set_var("SOURCEFLOW_CONCURRENCY", "lots");
    let err = sourceflow::builder()
        .transport(transport.clone())
        .handlers(|_| false)
        .start()
        .await
        .expect_err("bad env");
    std::env::remove_var("SOURCEFLOW_CONCURRENCY");
    assert_eq!(
        err.to_string(),
        "invalid configuration: SOURCEFLOW_CONCURRENCY=\"lots\" is not a valid value"
    );
}
