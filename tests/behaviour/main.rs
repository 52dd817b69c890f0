//! The behaviour suite: written once, run against every transport.
//!
//! ```text
//! cargo test -p sourceflow --test behaviour                                  # embedded transport
//! SOURCEFLOW_TEST_TRANSPORT=aws cargo test -p sourceflow --test behaviour    # AWS API (emulator or real)
//! ```
//!
//! Every test declares its own message types and queues in its own module and runs only that
//! module's handlers (`Builder::handlers_in`), under a name prefix of its own, so tests do
//! not see each other's messages.

mod harness;
#[cfg(feature = "postgres")]
#[path = "../common/postgres.rs"]
mod postgres;

mod claim_check;
mod context;
mod dead_letter;
mod dedup;
mod delays;
mod encryption;
mod fan_out;
mod filters;
mod headers;
mod heartbeat;
mod idempotency;
mod liveness;
mod middleware;
mod ordering;
mod outbox;
mod outcomes;
mod poison;
mod queries;
mod retry;
mod send_all;
mod shutdown;
mod size_and_delay;
mod telemetry;
#[cfg(feature = "testing")]
mod testing;
mod topology;
mod transactional;
mod transactional_outbox;
