//! Procedural macros for [sourceflow](https://docs.rs/sourceflow).
//!
//! Use them through the `sourceflow` crate, which re-exports them:
//! `use sourceflow::{command, event, handler};`. This crate only parses and generates
//! code; every rule it enforces is reported as a `syn::Error` at the offending token.

mod filter_rules;
mod handler;
mod message;
mod names;
mod options;
mod query;

use proc_macro::TokenStream;

/// Declares a command: a message sent to exactly one SQS queue and handled by one handler.
///
/// ```ignore
/// #[command(queue = "orders.fifo", name = "orders.CreateOrder.v1")]
/// #[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
/// pub struct CreateOrder {
///     #[entity_id]
///     pub order_id: u64,
///     #[sensitive]
///     pub card_number: String,
/// }
/// ```
///
/// * `queue` (required): the SQS queue name. A `.fifo` suffix makes it a FIFO queue, which
///   requires one `#[entity_id]` field (its value becomes the `MessageGroupId`).
/// * `name` (optional): the stable wire name; defaults to the type's name.
/// * `encrypt` (optional): the payload always travels encrypted.
/// * queue settings (optional), checked against SQS's limits: `visibility_timeout`,
///   `retention`, `delay` (whole seconds, or `"90s"`, `"5m"`, `"2h"`, `"4d"`),
///   `max_receive_count` (handler attempts), `high_throughput` (FIFO only), `sse` (`"sqs"`,
///   `"kms:<key>"` or `"none"`) and `tags(team = "orders")`. The consuming service
///   provisions its queue with them; a service that only sends creates the queue with them
///   if it is missing, and never changes it.
#[proc_macro_attribute]
pub fn command(args: TokenStream, input: TokenStream) -> TokenStream {
    message::expand(message::Kind::Command, args.into(), input.into())
        .unwrap_or_else(syn::Error::into_compile_error)
        .into()
}

/// Declares an event: a message published to an SNS topic and delivered once to every
/// service that handles it.
///
/// * `topic` (required): the SNS topic name. A `.fifo` suffix makes it a FIFO topic, which
///   requires one `#[entity_id]` field.
/// * `name` (optional): the stable wire name; defaults to the type's name.
#[proc_macro_attribute]
pub fn event(args: TokenStream, input: TokenStream) -> TokenStream {
    message::expand(message::Kind::Event, args.into(), input.into())
        .unwrap_or_else(syn::Error::into_compile_error)
        .into()
}

/// Declares a query: a request answered in process by exactly one handler, with a value of
/// its response type (the read side of CQRS). Queries never travel through a queue.
///
/// ```ignore
/// #[query(response = OrderView)]
/// pub struct GetOrder {
///     pub order_id: u64,
/// }
///
/// #[handler]
/// async fn get_order(q: GetOrder, State(db): State<Db>) -> sourceflow::Result<OrderView> { .. }
/// ```
///
/// * `response` (required): the type the handler answers with.
/// * `name` (optional): the name spans, metrics and errors use; defaults to the type's name.
#[proc_macro_attribute]
pub fn query(args: TokenStream, input: TokenStream) -> TokenStream {
    query::expand(args.into(), input.into())
        .unwrap_or_else(syn::Error::into_compile_error)
        .into()
}

/// Registers an `async fn` as the handler of the command, event or query it takes first.
///
/// Further arguments, in any order: `&Context` and any number of `State<T>`.
/// The return type is `()` or `Result<(), E>` for any `E` convertible into a boxed error.
/// For an event handler, `#[handler(queue = "...")]` overrides the name of this service's
/// subscriber queue.
///
/// A handler that returns a value (anything but `()` or `Result<(), E>`) answers a
/// [`query`]: it returns `Result<Response, E>` with the query's response type, takes only
/// `State<T>` besides the query (a query is answered in process, outside any message, so
/// there is no `&Context`), and takes no arguments in `#[handler(..)]`.
#[proc_macro_attribute]
pub fn handler(args: TokenStream, input: TokenStream) -> TokenStream {
    let input = proc_macro2::TokenStream::from(input);
    match handler::expand(args.into(), input.clone()) {
        Ok(out) => out.into(),
        // Keep the function as written next to the error: what calls it or what it imports
        // then raises no follow-on errors or warnings that hide the one that matters.
        Err(e) => {
            let mut out = e.into_compile_error();
            out.extend(quote::quote!(#[allow(dead_code)]));
            out.extend(input);
            out.into()
        }
    }
}
