//! The transport conformance suite: what every [`Transport`](sourceflow::transport::Transport)
//! must do, written once against the trait and run on the embedded transport and on an AWS
//! API (an emulator on loopback, or real AWS when told so).
//!
//! ```text
//! cargo test -p sourceflow --all-features --test transport                                 # embedded
//! SOURCEFLOW_TEST_TRANSPORT=aws cargo test -p sourceflow --all-features --test transport   # AWS API
//! ```
//!
//! Each test provisions its own queues and topics under a name prefix of its own, keeps its
//! visibility timeouts and delays to a few seconds, and waits with polling loops bounded by
//! deadlines (an emulator answers late), so every test ends within about 20 seconds.

mod world;

mod batch;
mod delay;
mod fan_out;
mod fifo;
mod filters;
mod long_poll;
mod receipts;
mod redrive;
mod size;
mod visibility;
