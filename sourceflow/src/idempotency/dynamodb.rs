//! The DynamoDB idempotency store (feature `dynamodb`): the AWS-native choice, shared by every
//! instance of a service in every region-local deployment, with nothing to run.
//!
//! One item per key in a table whose partition key is the string attribute [`KEY_ATTRIBUTE`]
//! (`id`, as in AWS Lambda Powertools' idempotency utility). Every change is a conditional
//! write, so DynamoDB decides races item by item:
//!
//! * a claim is one `PutItem` of the in-progress item, conditioned on what it expects to
//!   replace: at first, *the item does not exist* (`attempts` 0). When the condition fails,
//!   DynamoDB returns the existing item in the same answer
//!   (`ReturnValuesOnConditionCheckFailure`), which tells the caller why, or which
//!   claimable item is in the way; the claim then writes again, with the attempts computed
//!   from that item and a condition that holds only while the item is still that one: a
//!   dead worker's claim (*its token, lease over*: `attempts + 1`; a token names one claim,
//!   whose count does not change while it holds it), a released claim (*in progress, no
//!   token, same hash, the same `attempts`*: kept) or an expired completion (*completed,
//!   past expiry*: 0). A write computed from a stale read fails and the claim reads again;
//!   no count is ever applied to an item it was not computed from. (An update expression
//!   cannot choose its arithmetic by the item's state, so a single conditional
//!   `UpdateItem` could not take every kind.) A new key costs one write, a takeover two;
//! * `renew`, `complete` and `release` are `UpdateItem`/`DeleteItem` calls conditioned on the
//!   caller's token and the in-progress state; a release as failed or returned removes the
//!   token (claimable at once) and adds one attempt when failed, a release as dead-lettered
//!   deletes the item.
//!
//! `attempts` (a number) counts the handler attempts recorded for a key; an item without it
//! (written before the attribute existed) has none.
//!
//! Expired items are deleted by DynamoDB itself through the table's TTL attribute,
//! [`TTL_ATTRIBUTE`] (epoch seconds, at no write cost), so a service using this store runs no
//! periodic cleanup ([`purges_itself`](super::IdempotencyStore::purges_itself)). DynamoDB
//! deletes expired items lazily (usually within days), so reads judge expiry by the
//! millisecond attributes, never by the item's presence. An in-progress item's TTL is its
//! lease (or its release) plus [`ABANDONED_AFTER`], so DynamoDB
//! lets go of abandoned claims when [`purge_expired`](super::IdempotencyStore::purge_expired)
//! would. That call still works, by a filtered `Scan` and conditional deletes, for tables
//! whose TTL is off.
//!
//! Leases and expiries are judged by the instances' clocks (DynamoDB has no server clock in
//! its expressions): keep them synchronised (NTP, as on EC2, ECS and Lambda); a skew of a
//! second matters only for leases that short.
//!
//! With [`ProvisionMode::Create`] the store creates its table (on-demand capacity) and
//! enables TTL when they are missing; `Validate` reports what is missing or different;
//! `Assume` makes no calls.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_dynamodb::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::operation::put_item::PutItemError;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType,
    ReturnValuesOnConditionCheckFailure, ScalarAttributeType, Select, TableStatus,
    TimeToLiveSpecification, TimeToLiveStatus,
};
use aws_sdk_dynamodb::Client;
use futures_util::StreamExt;

use super::record::{
    claim_with, millis, now_millis, Attempt, Existing, Takeover, COMPLETED, IN_PROGRESS,
};
use super::{Claim, IdempotencyStore, Release, ABANDONED_AFTER};
use crate::error::{Error, Result};
use crate::transport::aws::ProvisionMode;

const STORE: &str = "dynamodb";

/// The table's partition key (a string): the idempotency key.
pub const KEY_ATTRIBUTE: &str = "id";

/// The table's TTL attribute: when DynamoDB may delete the item, in seconds since the Unix
/// epoch.
pub const TTL_ATTRIBUTE: &str = "expiration";

/// Largest outbox stored with a completion. DynamoDB refuses items over 400 KB; the rest of
/// the item is well under 1 KB.
pub const MAX_OUTBOX_BYTES: usize = 399 * 1024;

/// How long DynamoDB keeps an in-progress item after its lease ran out (or it was
/// released) before its TTL lets it go: [`ABANDONED_AFTER`], as `purge_expired` does. A
/// claim takes over such an item anyway; the grace keeps its attempt count meanwhile.
const IN_PROGRESS_GRACE_SECS: i64 = ABANDONED_AFTER.as_secs() as i64;

/// The attribute counting a key's handler attempts (a number; absent: none).
const ATTEMPTS: &str = "attempts";

/// How long [`DynamoDbIdempotencyStore::open`] waits for a new table to become active.
const TABLE_ACTIVE_TIMEOUT: Duration = Duration::from_secs(120);

/// Concurrent conditional deletes in one `purge_expired` call.
const PURGE_CONCURRENCY: usize = 8;

/// Claims in a DynamoDB table: for services on AWS, however many instances they run.
#[derive(Debug, Clone)]
pub struct DynamoDbIdempotencyStore {
    client: Client,
    table: String,
}

fn store_error(operation: &'static str, e: impl Into<crate::error::BoxError>) -> Error {
    Error::Store {
        store: STORE,
        operation,
        source: e.into(),
    }
}

/// The SDK error with its service message (the SDK's `Display` alone says little).
fn sdk_error<E, R>(operation: &'static str) -> impl FnOnce(SdkError<E, R>) -> Error
where
    E: std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    move |e| store_error(operation, format!("{}", DisplayErrorContext(&e)))
}

fn s(v: &str) -> AttributeValue {
    AttributeValue::S(v.to_string())
}

fn n(v: i64) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

/// Epoch seconds (rounded up) of a time in epoch milliseconds, for the TTL attribute.
fn ttl_secs(at_millis: i64) -> i64 {
    at_millis.div_euclid(1000) + i64::from(at_millis.rem_euclid(1000) > 0)
}

fn text(item: &HashMap<String, AttributeValue>, name: &str) -> Option<String> {
    match item.get(name) {
        Some(AttributeValue::S(v)) => Some(v.clone()),
        _ => None,
    }
}

fn number(item: &HashMap<String, AttributeValue>, name: &str) -> Result<Option<i64>> {
    match item.get(name) {
        Some(AttributeValue::N(v)) => v.parse().map(Some).map_err(|_| {
            store_error(
                "claim",
                format!("attribute {name} holds {v:?}, not a whole number of milliseconds"),
            )
        }),
        None | Some(AttributeValue::Null(_)) => Ok(None),
        Some(other) => Err(store_error(
            "claim",
            format!("attribute {name} holds {other:?}, not a number"),
        )),
    }
}

/// Reads an item written by this store, judged by the process clock now.
fn existing(item: &HashMap<String, AttributeValue>) -> Result<Existing> {
    let missing = |name: &str| {
        store_error(
            "claim",
            format!("the item has no string attribute {name}: was it written by sourceflow?"),
        )
    };
    Ok(Existing {
        payload_hash: text(item, "payload_hash").ok_or_else(|| missing("payload_hash"))?,
        state: text(item, "state").ok_or_else(|| missing("state"))?,
        token: text(item, "token"),
        attempts: number(item, ATTEMPTS)?,
        lease_until: number(item, "lease_until")?,
        expires_at: number(item, "expires_at")?,
        outbox: text(item, "outbox"),
        now: now_millis(),
    })
}

impl DynamoDbIdempotencyStore {
    /// A store on `table`, from the standard AWS configuration chain (as the AWS transport
    /// uses), provisioned as `SOURCEFLOW_PROVISION` says (default: create what is missing).
    pub async fn connect(table: &str) -> Result<Self> {
        let cfg = crate::transport::aws::load_sdk_config().await?;
        let mode = crate::transport::aws::provision_mode_from_env()?;
        Self::open(Client::new(&cfg), table, mode).await
    }

    /// A store on `table` through `client`, provisioned as `mode` says: `Create` creates the
    /// table (on-demand capacity, partition key [`KEY_ATTRIBUTE`]) and enables TTL on
    /// [`TTL_ATTRIBUTE`] when missing, then waits until the table is active; `Validate`
    /// fails listing what is missing or different; `Assume` makes no calls.
    pub async fn open(client: Client, table: &str, mode: ProvisionMode) -> Result<Self> {
        if table.is_empty() {
            return Err(Error::Config(
                "the DynamoDB idempotency store needs a table name (dynamodb://<table>)".into(),
            ));
        }
        let store = DynamoDbIdempotencyStore {
            client,
            table: table.to_string(),
        };
        match mode {
            ProvisionMode::Assume => {}
            ProvisionMode::Create => store.provision(true).await?,
            ProvisionMode::Validate => store.provision(false).await?,
        }
        Ok(store)
    }

    /// The DynamoDB client.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The table name.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// The exact number of items, counted by a `Scan` of the whole table (it reads every
    /// item: use it in tests and tools, not in a health check). [`size`](IdempotencyStore::size)
    /// answers DynamoDB's item count instead, which it refreshes about every six hours.
    pub async fn count_exact(&self) -> Result<u64> {
        let mut total = 0u64;
        let mut start: Option<HashMap<String, AttributeValue>> = None;
        loop {
            let page = self
                .client
                .scan()
                .table_name(&self.table)
                .select(Select::Count)
                .consistent_read(true)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(sdk_error("count"))?;
            total += u64::try_from(page.count()).unwrap_or(0);
            match page.last_evaluated_key {
                Some(k) if !k.is_empty() => start = Some(k),
                _ => return Ok(total),
            }
        }
    }

    async fn provision(&self, create: bool) -> Result<()> {
        let mut problems = Vec::new();
        let described = self
            .client
            .describe_table()
            .table_name(&self.table)
            .send()
            .await;
        let table = match described {
            Ok(out) => out.table,
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_resource_not_found_exception()) =>
            {
                if !create {
                    problems.push(format!("table {} does not exist", self.table));
                    return self.report(problems);
                }
                self.create_table().await?;
                None
            }
            Err(e) => return Err(sdk_error("describe table")(e)),
        };
        if let Some(t) = &table {
            let keys: Vec<(String, String)> = t
                .key_schema()
                .iter()
                .map(|k| (k.attribute_name().to_string(), k.key_type().to_string()))
                .collect();
            let key_type = t
                .attribute_definitions()
                .iter()
                .find(|a| a.attribute_name() == KEY_ATTRIBUTE)
                .map(|a| a.attribute_type().to_string());
            if keys != [(KEY_ATTRIBUTE.to_string(), "HASH".to_string())]
                || key_type.as_deref() != Some("S")
            {
                // Not something provisioning may correct: the key of a table is fixed.
                return Err(store_error(
                    "provision",
                    format!(
                        "table {} has the key {keys:?}; the idempotency store needs a table whose only key is the string partition key {KEY_ATTRIBUTE:?}",
                        self.table
                    ),
                ));
            }
        }
        self.wait_active().await?;
        let ttl = self
            .client
            .describe_time_to_live()
            .table_name(&self.table)
            .send()
            .await
            .map_err(sdk_error("describe time to live"))?;
        let ttl = ttl.time_to_live_description();
        let status = ttl.and_then(|d| d.time_to_live_status());
        let attribute = ttl.and_then(|d| d.attribute_name());
        match status {
            Some(TimeToLiveStatus::Enabled | TimeToLiveStatus::Enabling)
                if attribute == Some(TTL_ATTRIBUTE) => {}
            Some(TimeToLiveStatus::Enabled | TimeToLiveStatus::Enabling) => {
                // DynamoDB allows one TTL attribute per table; changing it is the owner's call.
                problems.push(format!(
                    "table {} expires items by {attribute:?}, not by {TTL_ATTRIBUTE:?}; expired records would stay until purged",
                    self.table
                ));
            }
            _ if create => self.enable_ttl().await?,
            _ => problems.push(format!(
                "table {} has no TTL on {TTL_ATTRIBUTE:?}",
                self.table
            )),
        }
        self.report(problems)
    }

    fn report(&self, problems: Vec<String>) -> Result<()> {
        if problems.is_empty() {
            return Ok(());
        }
        Err(Error::Config(format!(
            "SOURCEFLOW_PROVISION=validate: the idempotency table does not match:\n  - {}",
            problems.join("\n  - ")
        )))
    }

    async fn create_table(&self) -> Result<()> {
        let key = KeySchemaElement::builder()
            .attribute_name(KEY_ATTRIBUTE)
            .key_type(KeyType::Hash)
            .build()
            .map_err(|e| store_error("create table", e))?;
        let attribute = AttributeDefinition::builder()
            .attribute_name(KEY_ATTRIBUTE)
            .attribute_type(ScalarAttributeType::S)
            .build()
            .map_err(|e| store_error("create table", e))?;
        let created = self
            .client
            .create_table()
            .table_name(&self.table)
            .key_schema(key)
            .attribute_definitions(attribute)
            .billing_mode(BillingMode::PayPerRequest)
            .send()
            .await;
        match created {
            Ok(_) => {
                tracing::info!(table = %self.table, "idempotency table created");
                Ok(())
            }
            // Another instance is creating it at the same time.
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_resource_in_use_exception()) =>
            {
                Ok(())
            }
            Err(e) => Err(sdk_error("create table")(e)),
        }
    }

    async fn wait_active(&self) -> Result<()> {
        let deadline = tokio::time::Instant::now() + TABLE_ACTIVE_TIMEOUT;
        loop {
            let out = self
                .client
                .describe_table()
                .table_name(&self.table)
                .send()
                .await
                .map_err(sdk_error("describe table"))?;
            let status = out.table().and_then(|t| t.table_status());
            if matches!(status, Some(TableStatus::Active) | None) {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(store_error(
                    "provision",
                    format!(
                        "table {} is still {status:?} after {TABLE_ACTIVE_TIMEOUT:?}",
                        self.table
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn enable_ttl(&self) -> Result<()> {
        let spec = TimeToLiveSpecification::builder()
            .enabled(true)
            .attribute_name(TTL_ATTRIBUTE)
            .build()
            .map_err(|e| store_error("enable time to live", e))?;
        match self
            .client
            .update_time_to_live()
            .table_name(&self.table)
            .time_to_live_specification(spec)
            .send()
            .await
        {
            Ok(_) => {
                tracing::info!(table = %self.table, attribute = TTL_ATTRIBUTE, "TTL enabled on the idempotency table");
                Ok(())
            }
            // Another instance enabled it meanwhile ("TimeToLive is already enabled").
            Err(e)
                if e.as_service_error().is_some_and(|e| {
                    e.meta().code() == Some("ValidationException")
                        && e.meta()
                            .message()
                            .is_some_and(|m| m.contains("already enabled"))
                }) =>
            {
                Ok(())
            }
            Err(e) => Err(sdk_error("enable time to live")(e)),
        }
    }

    /// Reads the item by a strongly consistent `GetItem`.
    async fn read(&self, key: &str) -> Result<Option<Existing>> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key(KEY_ATTRIBUTE, s(key))
            .consistent_read(true)
            .send()
            .await
            .map_err(sdk_error("claim"))?;
        out.item.as_ref().map(existing).transpose()
    }

    /// One claim write: a `PutItem` of the in-progress item with the attempts computed from
    /// what the claim expects to find, conditioned on finding just that (so a count computed
    /// from a stale read is never written: the condition fails and the item comes back).
    async fn write_claim(
        &self,
        expected: Takeover,
        key: &str,
        payload_hash: &str,
        token: &str,
        lease: Duration,
    ) -> Result<Attempt> {
        let now = now_millis();
        let lease_until = now + millis(lease);
        let put = self
            .client
            .put_item()
            .table_name(&self.table)
            .item(KEY_ATTRIBUTE, s(key))
            .item("payload_hash", s(payload_hash))
            .item("state", s(IN_PROGRESS))
            .item("token", s(token))
            .item("lease_until", n(lease_until))
            .item("created_at", n(now))
            .item(
                TTL_ATTRIBUTE,
                n(ttl_secs(lease_until) + IN_PROGRESS_GRACE_SECS),
            )
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld);
        let (put, attempts) = match expected {
            Takeover::Absent => (
                put.condition_expression("attribute_not_exists(#id)")
                    .expression_attribute_names("#id", KEY_ATTRIBUTE),
                0,
            ),
            // Its worker reached the handlers and died holding the claim: that counts. While
            // its token is there, the claim (and its count) is the one read.
            Takeover::Crashed {
                token: dead,
                attempts,
            } => (
                put.condition_expression("#token = :dead AND #lease_until <= :now")
                    .expression_attribute_names("#token", "token")
                    .expression_attribute_names("#lease_until", "lease_until")
                    .expression_attribute_values(":dead", s(&dead))
                    .expression_attribute_values(":now", n(now)),
                attempts.unwrap_or(0).saturating_add(1),
            ),
            // Released: the release settled the count; taken if it is still the one read.
            Takeover::Released { attempts } => {
                let put = put
                    .expression_attribute_names("#state", "state")
                    .expression_attribute_names("#token", "token")
                    .expression_attribute_names("#hash", "payload_hash")
                    .expression_attribute_names("#attempts", ATTEMPTS)
                    .expression_attribute_values(":in_progress", s(IN_PROGRESS))
                    .expression_attribute_values(":hash", s(payload_hash));
                const RELEASED: &str =
                    "#state = :in_progress AND attribute_not_exists(#token) AND #hash = :hash";
                match attempts {
                    Some(a) => (
                        put.condition_expression(format!("{RELEASED} AND #attempts = :attempts"))
                            .expression_attribute_values(":attempts", n(a)),
                        a,
                    ),
                    None => (
                        put.condition_expression(format!(
                            "{RELEASED} AND attribute_not_exists(#attempts)"
                        )),
                        0,
                    ),
                }
            }
            // Expired: the key starts again, whatever payload it had.
            Takeover::Expired => (
                put.condition_expression("#state = :completed AND #expires_at <= :now")
                    .expression_attribute_names("#state", "state")
                    .expression_attribute_names("#expires_at", "expires_at")
                    .expression_attribute_values(":completed", s(COMPLETED))
                    .expression_attribute_values(":now", n(now)),
                0,
            ),
        };
        match put.item(ATTEMPTS, n(attempts)).send().await {
            Ok(_) => Ok(Attempt::Won { attempts }),
            Err(e) => match e.as_service_error() {
                // The item in the way, returned with the refusal.
                Some(PutItemError::ConditionalCheckFailedException(c)) => {
                    self.blocked(key, c.item()).await
                }
                _ => Err(sdk_error("claim")(e)),
            },
        }
    }

    /// The item that refused a claim's write, as returned with the refusal, or read (an
    /// absent item, or an emulator that does not return it).
    async fn blocked(
        &self,
        key: &str,
        item: Option<&HashMap<String, AttributeValue>>,
    ) -> Result<Attempt> {
        match item {
            Some(item) if !item.is_empty() => Ok(Attempt::Blocked(Some(existing(item)?))),
            _ => Ok(Attempt::Blocked(self.read(key).await?)),
        }
    }

    /// The answer of a conditional write: `Ok(false)` when its condition failed.
    fn conditional<T, E, R>(
        operation: &'static str,
        sent: std::result::Result<T, SdkError<E, R>>,
    ) -> Result<bool>
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
        R: std::fmt::Debug + Send + Sync + 'static,
    {
        match sent {
            Ok(_) => Ok(true),
            Err(e)
                if e.as_service_error().and_then(ProvideErrorMetadata::code)
                    == Some("ConditionalCheckFailedException") =>
            {
                Ok(false)
            }
            Err(e) => Err(sdk_error(operation)(e)),
        }
    }
}

#[async_trait]
impl IdempotencyStore for DynamoDbIdempotencyStore {
    fn name(&self) -> &'static str {
        STORE
    }

    async fn claim(&self, key: &str, payload_hash: &str, lease: Duration) -> Result<Claim> {
        claim_with(payload_hash, |token, expected| async move {
            self.write_claim(expected, key, payload_hash, &token, lease)
                .await
        })
        .await
    }

    async fn renew(&self, key: &str, token: &str, lease: Duration) -> Result<bool> {
        let lease_until = now_millis() + millis(lease);
        let sent = self
            .client
            .update_item()
            .table_name(&self.table)
            .key(KEY_ATTRIBUTE, s(key))
            .update_expression("SET #lease_until = :lease_until, #ttl = :ttl")
            .condition_expression("#token = :token AND #state = :in_progress")
            .expression_attribute_names("#lease_until", "lease_until")
            .expression_attribute_names("#ttl", TTL_ATTRIBUTE)
            .expression_attribute_names("#token", "token")
            .expression_attribute_names("#state", "state")
            .expression_attribute_values(":lease_until", n(lease_until))
            .expression_attribute_values(":ttl", n(ttl_secs(lease_until) + IN_PROGRESS_GRACE_SECS))
            .expression_attribute_values(":token", s(token))
            .expression_attribute_values(":in_progress", s(IN_PROGRESS))
            .send()
            .await;
        Self::conditional("renew", sent)
    }

    async fn complete(
        &self,
        key: &str,
        token: &str,
        ttl: Duration,
        outbox: Option<&str>,
    ) -> Result<bool> {
        if let Some(o) = outbox.filter(|o| o.len() > MAX_OUTBOX_BYTES) {
            return Err(store_error(
                "complete",
                format!(
                    "the handler's outgoing messages take {} bytes; a DynamoDB item holds at most {MAX_OUTBOX_BYTES} (400 KB): send fewer or smaller messages per handler, or use the PostgreSQL store",
                    o.len()
                ),
            ));
        }
        let expires_at = now_millis() + millis(ttl);
        let mut update = self
            .client
            .update_item()
            .table_name(&self.table)
            .key(KEY_ATTRIBUTE, s(key))
            .condition_expression("#token = :token AND #state = :in_progress")
            .expression_attribute_names("#token", "token")
            .expression_attribute_names("#state", "state")
            .expression_attribute_names("#expires_at", "expires_at")
            .expression_attribute_names("#ttl", TTL_ATTRIBUTE)
            .expression_attribute_names("#outbox", "outbox")
            .expression_attribute_values(":token", s(token))
            .expression_attribute_values(":in_progress", s(IN_PROGRESS))
            .expression_attribute_values(":completed", s(COMPLETED))
            .expression_attribute_values(":expires_at", n(expires_at))
            .expression_attribute_values(":ttl", n(ttl_secs(expires_at)));
        update = match outbox {
            // The claim's lease stays on as the dispatch lease that `set_outbox` ends.
            Some(o) => update
                .update_expression(
                    "SET #state = :completed, #expires_at = :expires_at, #ttl = :ttl, \
                     #outbox = :outbox REMOVE #token",
                )
                .expression_attribute_values(":outbox", s(o)),
            None => update
                .update_expression(
                    "SET #state = :completed, #expires_at = :expires_at, #ttl = :ttl \
                     REMOVE #token, #lease_until, #outbox",
                )
                .expression_attribute_names("#lease_until", "lease_until"),
        };
        let sent = update.send().await;
        Self::conditional("complete", sent)
    }

    async fn set_outbox(&self, key: &str, outbox: Option<&str>) -> Result<()> {
        let update = self
            .client
            .update_item()
            .table_name(&self.table)
            .key(KEY_ATTRIBUTE, s(key))
            .condition_expression("#state = :completed AND attribute_exists(#outbox)")
            .expression_attribute_names("#state", "state")
            .expression_attribute_names("#outbox", "outbox")
            .expression_attribute_names("#lease_until", "lease_until")
            .expression_attribute_values(":completed", s(COMPLETED));
        // Either way the dispatch ended: its lease goes.
        let update = match outbox {
            Some(o) => update
                .update_expression("SET #outbox = :outbox REMOVE #lease_until")
                .expression_attribute_values(":outbox", s(o)),
            None => update.update_expression("REMOVE #outbox, #lease_until"),
        };
        let sent = update.send().await;
        Self::conditional("set_outbox", sent).map(drop)
    }

    async fn release(&self, key: &str, token: &str, why: Release) -> Result<()> {
        let released = match why {
            // A redrive from the dead-letter queue starts with a fresh count.
            Release::DeadLettered => {
                let sent = self
                    .client
                    .delete_item()
                    .table_name(&self.table)
                    .key(KEY_ATTRIBUTE, s(key))
                    .condition_expression("#token = :token AND #state = :in_progress")
                    .expression_attribute_names("#token", "token")
                    .expression_attribute_names("#state", "state")
                    .expression_attribute_values(":token", s(token))
                    .expression_attribute_values(":in_progress", s(IN_PROGRESS))
                    .send()
                    .await;
                Self::conditional("release", sent)
            }
            // Kept with its count, claimable at once by the next delivery; DynamoDB may let
            // it go an hour after the release, as after a lease.
            Release::Failed | Release::Returned => {
                let now = now_millis();
                let sent = self
                    .client
                    .update_item()
                    .table_name(&self.table)
                    .key(KEY_ATTRIBUTE, s(key))
                    .condition_expression("#token = :token AND #state = :in_progress")
                    .update_expression(
                        "SET #lease_until = :now, #ttl = :ttl, \
                         #attempts = if_not_exists(#attempts, :zero) + :counted \
                         REMOVE #token",
                    )
                    .expression_attribute_names("#token", "token")
                    .expression_attribute_names("#state", "state")
                    .expression_attribute_names("#lease_until", "lease_until")
                    .expression_attribute_names("#ttl", TTL_ATTRIBUTE)
                    .expression_attribute_names("#attempts", ATTEMPTS)
                    .expression_attribute_values(":token", s(token))
                    .expression_attribute_values(":in_progress", s(IN_PROGRESS))
                    .expression_attribute_values(":now", n(now))
                    .expression_attribute_values(":ttl", n(ttl_secs(now) + IN_PROGRESS_GRACE_SECS))
                    .expression_attribute_values(":zero", n(0))
                    .expression_attribute_values(":counted", n(i64::from(why == Release::Failed)))
                    .send()
                    .await;
                Self::conditional("release", sent)
            }
        };
        released.map(drop)
    }

    async fn purge_expired(&self, batch: usize) -> Result<usize> {
        const PURGEABLE: &str = "(#state = :completed AND #expires_at <= :now) \
             OR (#state = :in_progress AND #lease_until < :abandoned)";
        let now = now_millis();
        let abandoned = now - millis(ABANDONED_AFTER);
        // Find up to `batch` expired completions and abandoned claims...
        let mut keys = Vec::new();
        let mut start: Option<HashMap<String, AttributeValue>> = None;
        while keys.len() < batch {
            let page = self
                .client
                .scan()
                .table_name(&self.table)
                .consistent_read(true)
                .projection_expression("#id")
                .filter_expression(PURGEABLE)
                .expression_attribute_names("#id", KEY_ATTRIBUTE)
                .expression_attribute_names("#state", "state")
                .expression_attribute_names("#expires_at", "expires_at")
                .expression_attribute_names("#lease_until", "lease_until")
                .expression_attribute_values(":completed", s(COMPLETED))
                .expression_attribute_values(":in_progress", s(IN_PROGRESS))
                .expression_attribute_values(":now", n(now))
                .expression_attribute_values(":abandoned", n(abandoned))
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(sdk_error("purge_expired"))?;
            for item in page.items() {
                if let Some(key) = text(item, KEY_ATTRIBUTE) {
                    keys.push(key);
                }
            }
            match page.last_evaluated_key {
                Some(k) if !k.is_empty() => start = Some(k),
                _ => break,
            }
        }
        keys.truncate(batch);
        // ...and delete each only if it still is one (a claim may have taken it over since
        // the scan).
        let deletes = futures_util::stream::iter(keys.into_iter().map(|key| async move {
            let sent = self
                .client
                .delete_item()
                .table_name(&self.table)
                .key(KEY_ATTRIBUTE, s(&key))
                .condition_expression(PURGEABLE)
                .expression_attribute_names("#state", "state")
                .expression_attribute_names("#expires_at", "expires_at")
                .expression_attribute_names("#lease_until", "lease_until")
                .expression_attribute_values(":completed", s(COMPLETED))
                .expression_attribute_values(":in_progress", s(IN_PROGRESS))
                .expression_attribute_values(":now", n(now))
                .expression_attribute_values(":abandoned", n(abandoned))
                .send()
                .await;
            Self::conditional("purge_expired", sent)
        }))
        .buffer_unordered(PURGE_CONCURRENCY)
        .collect::<Vec<_>>()
        .await;
        let mut purged = 0;
        for deleted in deletes {
            purged += usize::from(deleted?);
        }
        Ok(purged)
    }

    async fn size(&self) -> Result<u64> {
        let out = self
            .client
            .describe_table()
            .table_name(&self.table)
            .send()
            .await
            .map_err(sdk_error("size"))?;
        Ok(out
            .table()
            .and_then(|t| t.item_count())
            .map_or(0, |n| u64::try_from(n).unwrap_or(0)))
    }

    fn size_is_exact(&self) -> bool {
        false
    }

    fn purges_itself(&self) -> bool {
        true
    }

    fn dynamodb_table(&self) -> Option<&str> {
        Some(&self.table)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_rounds_up_to_whole_seconds() {
        assert_eq!(ttl_secs(1_000), 1);
        assert_eq!(ttl_secs(1_001), 2);
        assert_eq!(ttl_secs(1_999), 2);
        assert_eq!(ttl_secs(0), 0);
    }

    #[test]
    fn reads_an_item_and_names_what_is_missing() {
        let mut item = HashMap::new();
        item.insert("payload_hash".to_string(), s("h"));
        item.insert("state".to_string(), s(COMPLETED));
        item.insert("expires_at".to_string(), n(5));
        item.insert("outbox".to_string(), s("[]"));
        let e = existing(&item).expect("item");
        assert_eq!(e.state, COMPLETED);
        assert_eq!(e.expires_at, Some(5));
        assert_eq!(e.lease_until, None);
        assert_eq!(e.outbox.as_deref(), Some("[]"));

        item.insert("expires_at".to_string(), n(0).clone());
        item.insert("lease_until".to_string(), AttributeValue::N("soon".into()));
        let err = existing(&item).err().expect("bad number");
        assert!(err.to_string().contains("lease_until"), "{err}");

        item.remove("lease_until");
        item.remove("state");
        let err = existing(&item).err().expect("no state");
        assert!(err.to_string().contains("state"), "{err}");
    }
}
