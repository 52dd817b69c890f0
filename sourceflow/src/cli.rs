//! The operator command line every service binary gets with one line (feature `cli`, on by
//! default):
//!
//! ```no_run
//! #[tokio::main]
//! async fn main() -> std::process::ExitCode {
//!     sourceflow::cli::main().await
//! }
//! ```
//!
//! or, with a configured builder, `sourceflow::builder().state(db).run_cli().await`.
//!
//! | command | what it does | contacts the broker |
//! |---|---|---|
//! | `serve` (the default) | runs the service until SIGINT/SIGTERM | yes |
//! | `topology` | the queues, topics, subscriptions and listeners the routes need, as tables | no |
//! | `iam-policy` | the IAM policy the service needs | no |
//! | `export cloudformation` / `export asyncapi` | a CloudFormation template / an AsyncAPI 3.0 document | no |
//! | `validate` | compares the broker with the routes, changing nothing | reads |
//! | `prune [--yes]` | lists (removes, with `--yes`) subscriptions of the service's queues to topics it no longer handles | reads; writes with `--yes` |
//! | `dlq list` / `dlq peek <queue>` / `dlq redrive <queue>` | dead-letter queues: depths, a look at their messages, moving them back | yes |
//!
//! Configuration is the service's own (`SOURCEFLOW_TRANSPORT`, `SOURCEFLOW_PREFIX`, …; see
//! the README), so a command sees exactly the names and settings the service uses.
//! `topology`, `iam-policy` and `export` work from the compiled routes alone: no AWS call,
//! no credentials needed. Exit codes: 0 success, 1 failure (one line on stderr, `error:
//! …`) — `validate` exits 1 when anything is missing or differs —, 2 a usage error.
//!
//! A binary with commands of its own embeds [`Command`] in its own `clap` parser and runs
//! it with [`execute`] (see `examples/orders.rs`).

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::envelope::attr;
use crate::iam::{IamScope, Provisioning};
use crate::runtime::{Builder, ServicePlan};
use crate::topology::{Finding, Ownership, ServerSideEncryption};
use crate::transport::{Receive, Transport};

/// A sourceflow service's command line: serve, or look at and manage what it needs on
/// SQS and SNS.
#[derive(Debug, Parser)]
#[command(
    about = "A sourceflow service: serve it, or look at and manage the SQS queues and SNS topics it needs",
    long_about = "A sourceflow service: serve it (the default), or look at and manage the SQS queues and SNS topics it needs.\n\n\
        Configuration comes from the service's environment: SOURCEFLOW_TRANSPORT (memory or aws), SOURCEFLOW_PREFIX, \
        SOURCEFLOW_SERVICE, AWS_REGION, AWS_ENDPOINT_URL, ... `topology`, `iam-policy` and `export` need no broker and no credentials.",
    after_help = "Examples:\n  \
        my-service                                   serve (same as `my-service serve`)\n  \
        my-service topology                          what the routes need, as tables\n  \
        my-service export cloudformation --out stack.json\n  \
        SOURCEFLOW_TRANSPORT=aws my-service validate compare the broker with the routes\n  \
        SOURCEFLOW_TRANSPORT=aws my-service dlq peek orders.fifo --max 5"
)]
pub struct Cli {
    /// What to do; `serve` when omitted.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// The service's options for every command.
    #[command(flatten)]
    pub options: Options,
}

/// Options every command takes.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Options {
    /// Service name (default: SOURCEFLOW_SERVICE, else the binary's name).
    #[arg(long, global = true, value_name = "NAME")]
    pub service: Option<String>,
    /// Environment prefix of every resource name (default: SOURCEFLOW_PREFIX).
    #[arg(long, global = true, value_name = "PREFIX")]
    pub prefix: Option<String>,
}

/// A command of the operator command line.
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Run the service until SIGINT or SIGTERM, then drain (the default).
    Serve,
    /// Show the queues, topics, subscriptions and listeners the compiled routes need,
    /// with their settings and ownership. Contacts nothing.
    Topology,
    /// Print the IAM policy (JSON) the service needs. Contacts nothing.
    ///
    /// Region and account come from AWS_REGION and SOURCEFLOW_ACCOUNT_ID (else
    /// CloudFormation placeholders), the payload key from SOURCEFLOW_KMS_KEY_ID, the
    /// DynamoDB idempotency table from SOURCEFLOW_IDEMPOTENCY=dynamodb://TABLE.
    IamPolicy {
        /// The provisioning mode the service runs with (default: SOURCEFLOW_PROVISION, else create).
        #[arg(long, value_enum)]
        provisioning: Option<Mode>,
        /// It runs on AWS Lambda behind SQS event source mappings (sourceflow::lambda):
        /// also name what the mappings call with the function's role.
        #[arg(long)]
        lambda: bool,
    },
    /// Export a description of the service for other tools. Contacts nothing.
    Export {
        /// What to export.
        #[command(subcommand)]
        format: ExportFormat,
    },
    /// Compare the broker with the routes and list every missing resource, differing
    /// attribute and stale subscription. Changes nothing; exits 1 when anything differs.
    Validate,
    /// List subscriptions of the service's queues to topics none of its handlers needs any
    /// more; with --yes, remove them. Nothing else is ever removed.
    Prune {
        /// Remove them (without it, only list them).
        #[arg(long)]
        yes: bool,
    },
    /// Dead-letter queues: their depths, a look at their messages, moving them back.
    Dlq {
        /// What to do.
        #[command(subcommand)]
        action: DlqAction,
    },
}

/// The event source mappings of `export cloudformation` (sourceflow::lambda).
#[derive(Debug, Clone, Args)]
pub struct LambdaArgs {
    /// The Lambda function (name or ARN) that runs the handlers: one event source mapping
    /// per consumed queue, reporting batch item failures.
    #[arg(long, value_name = "NAME_OR_ARN", requires = "lambda_timeout")]
    pub lambda_function: Option<String>,
    /// The function's timeout in seconds: must be below each consumed queue's visibility
    /// timeout (checked; the export fails otherwise).
    #[arg(long, value_name = "SECS", requires = "lambda_function")]
    pub lambda_timeout: Option<u64>,
    /// Records per invocation (BatchSize).
    #[arg(
        long,
        value_name = "N",
        default_value_t = 10,
        requires = "lambda_function"
    )]
    pub lambda_batch_size: u32,
    /// MaximumBatchingWindowInSeconds (standard queues).
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = 0,
        requires = "lambda_function"
    )]
    pub lambda_batching_window: u64,
    /// ScalingConfig.MaximumConcurrency: concurrent invocations per queue (2 to 1000).
    #[arg(long, value_name = "N", requires = "lambda_function")]
    pub lambda_max_concurrency: Option<u32>,
}

impl LambdaArgs {
    fn mapping(&self) -> Option<crate::export::LambdaMapping> {
        let function = self.lambda_function.clone()?;
        let timeout = Duration::from_secs(self.lambda_timeout.unwrap_or_default());
        let mut m = crate::export::LambdaMapping::new(function, timeout);
        m.batch_size = self.lambda_batch_size;
        m.batching_window = Duration::from_secs(self.lambda_batching_window);
        m.maximum_concurrency = self.lambda_max_concurrency;
        Some(m)
    }
}

/// What `export` writes.
#[derive(Debug, Clone, Subcommand)]
pub enum ExportFormat {
    /// A CloudFormation template (JSON): queues, dead-letter queues with redrive, topics,
    /// subscriptions, queue policies and the service's IAM managed policy, under the names
    /// the service uses (deploy it, then run the service with SOURCEFLOW_PROVISION=validate).
    Cloudformation {
        /// Write it to this file instead of stdout.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// The provisioning mode the managed policy is for (default: validate).
        #[arg(long, value_enum)]
        provisioning: Option<Mode>,
        /// The event source mappings of a Lambda function, if it runs there.
        #[command(flatten)]
        lambda: LambdaArgs,
    },
    /// An AsyncAPI 3.0.0 document (JSON): channels (queues and topics), messages with
    /// their payload schemas, and the operations of each route.
    Asyncapi {
        /// Write it to this file instead of stdout.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
}

/// A dead-letter command.
#[derive(Debug, Clone, Subcommand)]
pub enum DlqAction {
    /// The dead-letter queue of every queue the service consumes, with its depth.
    List,
    /// Show messages of a dead-letter queue without removing them (they are visible
    /// again at once afterwards).
    Peek {
        /// The queue (full name, as `topology` shows it) or its dead-letter queue.
        queue: String,
        /// At most this many messages.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1000))]
        max: u32,
    },
    /// Move every message of a queue's dead-letter queue back to the queue.
    Redrive {
        /// The queue (full name, as `topology` shows it) or its dead-letter queue.
        queue: String,
    },
}

/// A provisioning mode, as `--provisioning` takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Creates what is missing, corrects what it owns.
    Create,
    /// Reads and compares, changes nothing.
    Validate,
    /// Makes no provisioning calls.
    Assume,
}

impl From<Mode> for Provisioning {
    fn from(m: Mode) -> Self {
        match m {
            Mode::Create => Provisioning::Create,
            Mode::Validate => Provisioning::Validate,
            Mode::Assume => Provisioning::Assume,
        }
    }
}

/// Why a command failed: one line.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// sourceflow refused or failed (configuration, routes, broker).
    #[error("{}", one_line(&.0.to_string()))]
    Sourceflow(#[from] crate::Error),
    /// The output could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// Where.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The broker differs from the routes (`validate`).
    #[error("{0} difference(s) between the broker and the routes (listed above)")]
    Differs(usize),
    /// The command needs a broker, and the embedded transport has nothing outside this process.
    #[error("`{0}` reads the broker, but the transport is the embedded one (it holds nothing outside this process): set SOURCEFLOW_TRANSPORT=aws")]
    NeedsBroker(&'static str),
    /// A queue that is not in the topology.
    #[error("queue `{queue}` is not one of this service's queues (known: {known})")]
    UnknownQueue {
        /// The name given.
        queue: String,
        /// The queues of the topology.
        known: String,
    },
}

fn one_line(s: &str) -> String {
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

/// Parses the process's arguments and runs the command with a default [`builder`](crate::builder).
pub async fn main() -> ExitCode {
    crate::builder().run_cli().await
}

impl Builder {
    /// Parses the process's arguments and runs the command (see [`cli`](crate::cli)) with
    /// this builder: `serve` when no command is given. A usage error exits with code 2.
    pub async fn run_cli(self) -> ExitCode {
        Cli::parse().run(self).await
    }
}

impl Cli {
    /// Runs the command with `builder` (and the options), printing a one-line error on
    /// failure; the exit code to return from `main`.
    pub async fn run(self, builder: Builder) -> ExitCode {
        let command = self.command.unwrap_or(Command::Serve);
        execute(command, self.options.apply(builder)).await
    }
}

impl Options {
    /// `builder` with these options set.
    pub fn apply(self, mut builder: Builder) -> Builder {
        if let Some(s) = self.service {
            builder = builder.service(s);
        }
        if let Some(p) = self.prefix {
            builder = builder.prefix(p);
        }
        builder
    }
}

/// Runs `command` with `builder`; prints a one-line error and returns exit code 1 on
/// failure.
pub async fn execute(command: Command, builder: Builder) -> ExitCode {
    // Boxed: the service's future is large, and this one is awaited inside `main`.
    match Box::pin(run_command(command, builder)).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run_command(command: Command, builder: Builder) -> Result<(), CliError> {
    match command {
        Command::Serve => Ok(Box::pin(builder.run()).await?),
        Command::Topology => {
            let plan = builder.plan().await?;
            print(&topology_tables(&plan), None)
        }
        Command::IamPolicy {
            provisioning,
            lambda,
        } => {
            let plan = builder.plan().await?;
            let mut scope = IamScope::from_env();
            scope.lambda = lambda;
            if let Some(m) = provisioning {
                scope.provisioning = m.into();
            }
            scope.kms_key = env("SOURCEFLOW_KMS_KEY_ID");
            scope.idempotency_table = idempotency_table();
            print_json(&crate::iam::policy(&plan.topology, &scope), None)
        }
        Command::Export { format } => {
            let plan = builder.plan().await?;
            match format {
                ExportFormat::Cloudformation {
                    out,
                    provisioning,
                    lambda,
                } => {
                    let mut options = crate::export::CloudFormationOptions::from_env();
                    if let Some(m) = provisioning {
                        options.provisioning = m.into();
                    }
                    options.lambda = lambda.mapping();
                    if let Some(m) = &options.lambda {
                        m.check(&plan)?;
                    }
                    print_json(&crate::export::cloudformation(&plan, &options), out)
                }
                ExportFormat::Asyncapi { out } => print_json(&crate::export::asyncapi(&plan), out),
            }
        }
        Command::Validate => {
            let (plan, transport) = broker(builder, "validate").await?;
            let findings = transport.inspect(&plan.topology).await?;
            if findings.is_empty() {
                let t = &plan.topology;
                println!(
                    "ok: {} queues, {} topics and {} subscriptions match the routes",
                    t.queues.len(),
                    t.topics.len(),
                    t.subscriptions.len()
                );
                return Ok(());
            }
            for f in &findings {
                println!("- {f}");
            }
            Err(CliError::Differs(findings.len()))
        }
        Command::Prune { yes } => {
            let (plan, transport) = broker(builder, "prune").await?;
            let stale: Vec<(String, String)> = transport
                .inspect(&plan.topology)
                .await?
                .into_iter()
                .filter_map(|f| match f {
                    Finding::Stale { topic, queue } => Some((topic, queue)),
                    _ => None,
                })
                .collect();
            if stale.is_empty() {
                println!("nothing to prune: every subscription of the service's queues is needed");
                return Ok(());
            }
            for (topic, queue) in &stale {
                if yes {
                    transport.unsubscribe(topic, queue).await?;
                    println!("removed: subscription of queue {queue} to topic {topic}");
                } else {
                    println!("stale: subscription of queue {queue} to topic {topic}");
                }
            }
            if !yes {
                println!(
                    "{} stale subscription(s); run `prune --yes` to remove them",
                    stale.len()
                );
            }
            Ok(())
        }
        Command::Dlq { action } => dlq(action, builder).await,
    }
}

/// The plan and a transport that reaches a broker.
async fn broker(
    builder: Builder,
    command: &'static str,
) -> Result<(ServicePlan, Arc<dyn Transport>), CliError> {
    let (plan, transport, explicit) = builder.plan_and_transport().await?;
    if transport.name() == "memory" && !explicit {
        return Err(CliError::NeedsBroker(command));
    }
    Ok((plan, transport))
}

async fn dlq(action: DlqAction, builder: Builder) -> Result<(), CliError> {
    let command = match &action {
        DlqAction::List => "dlq list",
        DlqAction::Peek { .. } => "dlq peek",
        DlqAction::Redrive { .. } => "dlq redrive",
    };
    let (plan, transport) = broker(builder, command).await?;
    match action {
        DlqAction::List => {
            let mut rows = vec![row([
                "DEAD-LETTER QUEUE",
                "OF QUEUE",
                "VISIBLE",
                "IN FLIGHT",
            ])];
            for q in plan.topology.consumed() {
                let Some(d) = &q.dead_letter else { continue };
                let depth = transport.queue_depth(&d.queue).await?;
                let (visible, in_flight) = depth.map_or(("?".into(), "?".into()), |d| {
                    (d.visible.to_string(), d.in_flight.to_string())
                });
                rows.push(vec![d.queue.clone(), q.name.clone(), visible, in_flight]);
            }
            print(&table(&rows), None)
        }
        DlqAction::Peek { queue, max } => {
            let (_, dlq) = source_and_dead_letter(&plan, &queue)?;
            let messages = peek(transport.as_ref(), &dlq, max as usize).await?;
            let mut out = String::new();
            for m in &messages {
                let get = |k: &str| crate::envelope::attribute(&m.attributes, k).unwrap_or("-");
                out.push_str(&format!(
                    "message {}  type {}  receives {}{}\n  reason: {}\n  body: {}\n",
                    m.broker_id,
                    get(attr::TYPE),
                    m.receive_count,
                    m.group_id
                        .as_ref()
                        .map_or(String::new(), |g| format!("  group {g}")),
                    get(attr::DLQ_REASON),
                    m.body
                ));
            }
            out.push_str(&format!(
                "{} message(s) in {dlq} (left in place)\n",
                messages.len()
            ));
            print(&out, None)
        }
        DlqAction::Redrive { queue } => {
            let (source, dlq) = source_and_dead_letter(&plan, &queue)?;
            let moved = crate::redrive::redrive(transport.as_ref(), &dlq, &source).await?;
            println!("moved {moved} message(s) from {dlq} back to {source}");
            Ok(())
        }
    }
}

/// `(queue, its dead-letter queue)` for a queue or dead-letter queue name.
fn source_and_dead_letter(plan: &ServicePlan, name: &str) -> Result<(String, String), CliError> {
    let t = &plan.topology;
    if let Some(d) = t.queue(name).and_then(|q| q.dead_letter.as_ref()) {
        return Ok((name.to_string(), d.queue.clone()));
    }
    if let Some(q) = t
        .queues
        .iter()
        .find(|q| q.dead_letter.as_ref().is_some_and(|d| d.queue == name))
    {
        return Ok((q.name.clone(), name.to_string()));
    }
    Err(CliError::UnknownQueue {
        queue: name.to_string(),
        known: t
            .queues
            .iter()
            .filter(|q| q.dead_letter.is_some())
            .map(|q| q.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// Receives up to `max` messages, then makes them visible again at once.
async fn peek(
    transport: &dyn Transport,
    queue: &str,
    max: usize,
) -> crate::Result<Vec<crate::transport::ReceivedMessage>> {
    let mut seen = Vec::new();
    while seen.len() < max {
        let request = Receive {
            max: (max - seen.len()).min(10),
            wait: Duration::from_secs(1),
            visibility: Duration::from_secs(60),
        };
        let batch = transport.receive(queue, request).await?;
        if batch.is_empty() {
            break;
        }
        seen.extend(batch);
    }
    let receipts: Vec<_> = seen.iter().map(|m| m.receipt.clone()).collect();
    if !receipts.is_empty() {
        transport
            .change_visibility(queue, receipts, Duration::ZERO)
            .await
            .map_err(|e| {
                crate::Error::Config(format!(
                    "the peeked messages stay invisible for up to 60 s: {e}"
                ))
            })?;
    }
    Ok(seen)
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn idempotency_table() -> Option<String> {
    env("SOURCEFLOW_IDEMPOTENCY").and_then(|v| v.strip_prefix("dynamodb://").map(str::to_string))
}

fn print_json(value: &serde_json::Value, out: Option<PathBuf>) -> Result<(), CliError> {
    let mut text = serde_json::to_string_pretty(value).map_err(|e| CliError::Write {
        path: "stdout".into(),
        source: e.into(),
    })?;
    text.push('\n');
    print(&text, out)
}

fn print(text: &str, out: Option<PathBuf>) -> Result<(), CliError> {
    match out {
        Some(path) => std::fs::write(&path, text).map_err(|source| CliError::Write {
            path: path.display().to_string(),
            source,
        }),
        None => std::io::stdout()
            .lock()
            .write_all(text.as_bytes())
            .map_err(|source| CliError::Write {
                path: "stdout".into(),
                source,
            }),
    }
}

fn row<const N: usize>(cells: [&str; N]) -> Vec<String> {
    cells.iter().map(|c| c.to_string()).collect()
}

/// Columns padded to their widest cell.
fn table(rows: &[Vec<String>]) -> String {
    let mut widths = Vec::new();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if widths.len() <= i {
                widths.push(0);
            }
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (i, c) in r.iter().enumerate() {
            if i + 1 == r.len() {
                line.push_str(c);
            } else {
                line.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `30s`, `2m`, `4d`: the largest unit that divides it.
fn duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0 => "0s".into(),
        s if s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s % 3_600 == 0 => format!("{}h", s / 3_600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

fn topology_tables(plan: &ServicePlan) -> String {
    let t = &plan.topology;
    let prefix = match plan.naming.prefix() {
        "" => "no prefix".to_string(),
        p => format!("prefix {p}"),
    };
    let mut out = format!(
        "service {} ({prefix}): {} queues, {} topics, {} subscriptions, {} listeners\n\n",
        plan.service,
        t.queues.len(),
        t.topics.len(),
        t.subscriptions.len(),
        plan.listeners.len()
    );
    let mut rows = vec![row([
        "QUEUE",
        "OWNERSHIP",
        "FIFO",
        "VISIBILITY",
        "RETENTION",
        "DELAY",
        "DEAD LETTERS",
        "SSE",
        "TAGS",
    ])];
    for q in &t.queues {
        let s = &q.settings;
        let fifo = match (q.fifo, s.high_throughput) {
            (false, _) => "no",
            (true, false) => "yes",
            (true, true) => "yes, high throughput",
        };
        let ownership = match (q.ownership, &q.dead_letter) {
            (Ownership::Consumed, Some(_)) => "consumed",
            (Ownership::Consumed, None) => "consumed (dlq)",
            (Ownership::SendOnly, Some(_)) => "send-only",
            (Ownership::SendOnly, None) => "send-only (dlq)",
        };
        let dead = q.dead_letter.as_ref().map_or("-".to_string(), |d| {
            format!("{} after {} receives", d.queue, d.max_receive_count)
        });
        let sse = match &s.encryption {
            ServerSideEncryption::SqsManaged => "sqs".to_string(),
            ServerSideEncryption::Kms(k) => format!("kms:{k}"),
            ServerSideEncryption::Disabled => "none".to_string(),
        };
        let tags = match s.tags.is_empty() {
            true => "-".to_string(),
            false => s
                .tags
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(","),
        };
        rows.push(vec![
            q.name.clone(),
            ownership.into(),
            fifo.into(),
            duration(s.visibility_timeout),
            duration(s.retention),
            duration(s.delay),
            dead,
            sse,
            tags,
        ]);
    }
    out.push_str(&table(&rows));
    let mut rows = vec![row(["TOPIC", "FIFO"])];
    for topic in &t.topics {
        rows.push(vec![
            topic.name.clone(),
            if topic.fifo { "yes" } else { "no" }.into(),
        ]);
    }
    out.push('\n');
    out.push_str(&table(&rows));
    if !t.subscriptions.is_empty() {
        let mut rows = vec![row([
            "SUBSCRIPTION (TOPIC -> QUEUE)",
            "FILTER POLICY (MESSAGE ATTRIBUTES)",
        ])];
        for s in &t.subscriptions {
            rows.push(vec![
                format!("{} -> {}", s.topic, s.queue),
                s.filter
                    .as_ref()
                    .map_or("(everything)".to_string(), |f| f.to_string()),
            ]);
        }
        out.push('\n');
        out.push_str(&table(&rows));
    }
    if !plan.listeners.is_empty() {
        let mut rows = vec![row(["LISTENER QUEUE", "MESSAGE", "HANDLER", "ATTEMPTS"])];
        for l in &plan.listeners {
            for (wire, handler) in &l.handlers {
                rows.push(vec![
                    l.queue.clone(),
                    wire.to_string(),
                    handler.clone(),
                    l.max_attempts.to_string(),
                ]);
            }
        }
        out.push('\n');
        out.push_str(&table(&rows));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_route_settings() {
        assert_eq!(duration(Duration::from_secs(30)), "30s");
        assert_eq!(duration(Duration::from_secs(120)), "2m");
        assert_eq!(duration(Duration::from_secs(4 * 86_400)), "4d");
        assert_eq!(duration(Duration::from_secs(90)), "90s");
    }

    #[test]
    fn tables_pad_columns() {
        let t = table(&[row(["A", "B"]), row(["long", "x"])]);
        assert_eq!(t, "A     B\nlong  x\n");
    }

    #[test]
    fn errors_are_one_line() {
        let e = CliError::from(crate::Error::Config("first\n  - second\n".into()));
        assert!(!e.to_string().contains('\n'), "{e}");
    }

    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
