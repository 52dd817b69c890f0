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
    ];
    for e in expected {
        assert!(text.contains(e), "missing problem {e:?} in:\n{text}");
    }
    assert_eq!(problems.0.len(), expected.len(), "{text}");
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
