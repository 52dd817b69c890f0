//! The DynamoDB idempotency store against a real DynamoDB API (moto server on 127.0.0.1,
//! started by `tests/support/moto.sh`): the conformance suite, one winner per key across
//! four clients, what provisioning creates and validates, the TTL attribute on every item,
//! restart survival and purging in batches.
//!
//! Runs when `SOURCEFLOW_TEST_DYNAMODB_ENDPOINT` is set (`eval "$(tests/support/moto.sh
//! start)"`); skipped otherwise, unless `SOURCEFLOW_TEST_REQUIRE_DYNAMODB=1`. Each test works
//! in a table of its own.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType, PutRequest,
    ScalarAttributeType, TimeToLiveStatus, WriteRequest,
};
use aws_sdk_dynamodb::Client;
use sourceflow::idempotency::conformance::{self, Backdate};
use sourceflow::idempotency::dynamodb::{KEY_ATTRIBUTE, TTL_ATTRIBUTE};
use sourceflow::idempotency::{
    Claim, DynamoDbIdempotencyStore, IdempotencyStore, Release, ABANDONED_AFTER,
};
use sourceflow::transport::aws::ProvisionMode;

#[path = "common/dynamodb.rs"]
mod dynamodb;
#[path = "common/store_checks.rs"]
mod store_checks;
use store_checks::{
    assert_after_restart, cleans_up_in_batches, completed_and_in_progress, one_winner_per_key,
    LEASE,
};

async fn open(client: &Client, table: &str) -> DynamoDbIdempotencyStore {
    DynamoDbIdempotencyStore::open(client.clone(), table, ProvisionMode::Create)
        .await
        .expect("open the DynamoDB store")
}

/// A table made by someone else: string partition key `key`, on demand, no TTL.
async fn create_bare_table(client: &Client, table: &str, key: &str) {
    client
        .create_table()
        .table_name(table)
        .key_schema(
            KeySchemaElement::builder()
                .attribute_name(key)
                .key_type(KeyType::Hash)
                .build()
                .expect("key"),
        )
        .attribute_definitions(
            AttributeDefinition::builder()
                .attribute_name(key)
                .attribute_type(ScalarAttributeType::S)
                .build()
                .expect("attribute"),
        )
        .billing_mode(BillingMode::PayPerRequest)
        .send()
        .await
        .expect("create a table");
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64
}

async fn item(client: &Client, table: &str, key: &str) -> HashMap<String, AttributeValue> {
    client
        .get_item()
        .table_name(table)
        .key(KEY_ATTRIBUTE, AttributeValue::S(key.into()))
        .consistent_read(true)
        .send()
        .await
        .expect("get item")
        .item
        .expect("the item exists")
}

fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as i64
}

/// Ages an item by writing its lease (and its TTL, as the store would) directly.
struct Clock {
    client: Client,
    table: String,
}

#[async_trait::async_trait]
impl Backdate for Clock {
    async fn lease_ran_out(&self, key: &str, ago: Duration) {
        let lease_until = now_millis() - ago.as_millis() as i64;
        self.client
            .update_item()
            .table_name(&self.table)
            .key(KEY_ATTRIBUTE, AttributeValue::S(key.into()))
            .condition_expression("#state = :in_progress")
            .update_expression("SET lease_until = :lease_until, #ttl = :ttl")
            .expression_attribute_names("#state", "state")
            .expression_attribute_names("#ttl", TTL_ATTRIBUTE)
            .expression_attribute_values(":in_progress", AttributeValue::S("in_progress".into()))
            .expression_attribute_values(":lease_until", AttributeValue::N(lease_until.to_string()))
            .expression_attribute_values(
                ":ttl",
                AttributeValue::N((lease_until / 1000 + 1 + 3600).to_string()),
            )
            .send()
            .await
            .expect("backdate an in-progress item");
    }
}

fn number(item: &HashMap<String, AttributeValue>, name: &str) -> i64 {
    match item.get(name) {
        Some(AttributeValue::N(n)) => n.parse().expect("a number"),
        other => panic!("{name}: expected a number, found {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamodb_conforms() {
    let Some(endpoint) = dynamodb::endpoint("dynamodb_conforms") else {
        return;
    };
    let client = dynamodb::client(&endpoint);
    let table = dynamodb::table("conforms");
    let store = open(&client, &table).await;
    assert_eq!(store.name(), "dynamodb");
    assert!(
        store.purges_itself(),
        "DynamoDB's TTL deletes expired items"
    );
    let clock = Clock {
        client: client.clone(),
        table: table.clone(),
    };
    conformance::run(&store, "t", &clock).await;
    conformance::race(Arc::new(store), "race").await;
    dynamodb::drop_table(&client, &table).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamodb_one_winner_across_clients() {
    let Some(endpoint) = dynamodb::endpoint("dynamodb_one_winner_across_clients") else {
        return;
    };
    let table = dynamodb::table("clients");
    // Four instances, each with its own client (own connections), provisioning at once.
    let clients: Vec<Client> = (0..4).map(|_| dynamodb::client(&endpoint)).collect();
    let (a, b, c, d) = tokio::join!(
        open(&clients[0], &table),
        open(&clients[1], &table),
        open(&clients[2], &table),
        open(&clients[3], &table)
    );
    one_winner_per_key(vec![Arc::new(a), Arc::new(b), Arc::new(c), Arc::new(d)]).await;
    dynamodb::drop_table(&clients[0], &table).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamodb_provisions_and_validates_its_table() {
    let Some(endpoint) = dynamodb::endpoint("dynamodb_provisions_and_validates_its_table") else {
        return;
    };
    let client = dynamodb::client(&endpoint);
    let table = dynamodb::table("provision");

    // Validate and assume create nothing.
    let err = DynamoDbIdempotencyStore::open(client.clone(), &table, ProvisionMode::Validate)
        .await
        .expect_err("validate must fail on a missing table")
        .to_string();
    assert!(
        err.contains(&format!("table {table} does not exist")),
        "{err}"
    );
    DynamoDbIdempotencyStore::open(client.clone(), &table, ProvisionMode::Assume)
        .await
        .expect("assume makes no calls");
    let listed = client.list_tables().send().await.expect("list tables");
    assert!(
        !listed.table_names().contains(&table),
        "nothing was created"
    );

    // Create: the table with the string partition key, on-demand, and TTL on `expiration`.
    open(&client, &table).await;
    let t = client
        .describe_table()
        .table_name(&table)
        .send()
        .await
        .expect("describe")
        .table
        .expect("table");
    let keys: Vec<(&str, &KeyType)> = t
        .key_schema()
        .iter()
        .map(|k| (k.attribute_name(), k.key_type()))
        .collect();
    assert_eq!(keys, [(KEY_ATTRIBUTE, &KeyType::Hash)]);
    assert_eq!(
        t.attribute_definitions()[0].attribute_type(),
        &ScalarAttributeType::S
    );
    assert_eq!(
        t.billing_mode_summary().and_then(|b| b.billing_mode()),
        Some(&BillingMode::PayPerRequest)
    );
    let ttl = client
        .describe_time_to_live()
        .table_name(&table)
        .send()
        .await
        .expect("describe ttl");
    let ttl = ttl.time_to_live_description().expect("ttl");
    assert_eq!(ttl.time_to_live_status(), Some(&TimeToLiveStatus::Enabled));
    assert_eq!(ttl.attribute_name(), Some(TTL_ATTRIBUTE));

    // A second start changes nothing and validates.
    open(&client, &table).await;
    DynamoDbIdempotencyStore::open(client.clone(), &table, ProvisionMode::Validate)
        .await
        .expect("the created table validates");

    // A table with another key is refused with what it needs, whatever the mode.
    let other = dynamodb::table("wrong-key");
    create_bare_table(&client, &other, "pk").await;
    let err = DynamoDbIdempotencyStore::open(client.clone(), &other, ProvisionMode::Create)
        .await
        .expect_err("a table keyed by pk is refused")
        .to_string();
    assert!(
        err.contains("only key is the string partition key \"id\""),
        "{err}"
    );
    dynamodb::drop_table(&client, &other).await;

    // A table without TTL: validate says so, create enables it.
    let bare = dynamodb::table("no-ttl");
    create_bare_table(&client, &bare, KEY_ATTRIBUTE).await;
    let err = DynamoDbIdempotencyStore::open(client.clone(), &bare, ProvisionMode::Validate)
        .await
        .expect_err("validate reports the missing TTL")
        .to_string();
    assert!(err.contains("has no TTL on \"expiration\""), "{err}");
    open(&client, &bare).await;
    let ttl = client
        .describe_time_to_live()
        .table_name(&bare)
        .send()
        .await
        .expect("describe ttl");
    assert_eq!(
        ttl.time_to_live_description()
            .and_then(|d| d.time_to_live_status()),
        Some(&TimeToLiveStatus::Enabled)
    );
    dynamodb::drop_table(&client, &bare).await;
    dynamodb::drop_table(&client, &table).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamodb_items_carry_the_ttl_attribute() {
    let Some(endpoint) = dynamodb::endpoint("dynamodb_items_carry_the_ttl_attribute") else {
        return;
    };
    let client = dynamodb::client(&endpoint);
    let table = dynamodb::table("ttl");
    let store = open(&client, &table).await;

    let Claim::Acquired { token, .. } = store.claim("k", "h", LEASE).await.expect("claim") else {
        panic!("claim");
    };
    // In progress: DynamoDB may drop the item an hour after its lease ran out.
    let claimed = item(&client, &table, "k").await;
    let lease_until = number(&claimed, "lease_until");
    assert_eq!(
        number(&claimed, TTL_ATTRIBUTE),
        (lease_until + 999) / 1000 + 3600
    );
    assert!((lease_until / 1000 - now_secs() - 30).abs() <= 5);

    // Completed for a day: the TTL attribute is the completion's expiry, in epoch seconds.
    let day = Duration::from_secs(24 * 60 * 60);
    assert!(store
        .complete("k", &token, day, Some("[\"out\"]"))
        .await
        .expect("complete"));
    let done = item(&client, &table, "k").await;
    let expires_at = number(&done, "expires_at");
    assert_eq!(number(&done, TTL_ATTRIBUTE), (expires_at + 999) / 1000);
    assert!((number(&done, TTL_ATTRIBUTE) - now_secs() - 86_400).abs() <= 5);
    assert!(!done.contains_key("token"), "the token is gone");
    assert_eq!(
        number(&done, "lease_until"),
        lease_until,
        "the claim's lease stays on while its worker sends the outbox"
    );
    assert_eq!(
        done.get("outbox"),
        Some(&AttributeValue::S("[\"out\"]".into()))
    );
    store.set_outbox("k", None).await.expect("dispatched");
    let sent = item(&client, &table, "k").await;
    assert!(!sent.contains_key("outbox"));
    assert!(!sent.contains_key("lease_until"), "the dispatch ended");

    // An outbox larger than an item can hold is refused with the reason, and the claim
    // stays in progress for the retry.
    let Claim::Acquired { token, .. } = store.claim("big", "h", LEASE).await.expect("claim") else {
        panic!("claim big");
    };
    let big = "x".repeat(500 * 1024);
    let err = store
        .complete("big", &token, day, Some(&big))
        .await
        .expect_err("too big")
        .to_string();
    assert!(err.contains("400 KB"), "{err}");
    assert!(matches!(
        store.claim("big", "h", LEASE).await.expect("claim"),
        Claim::InProgress { .. }
    ));
    dynamodb::drop_table(&client, &table).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamodb_survives_a_restart() {
    let Some(endpoint) = dynamodb::endpoint("dynamodb_survives_a_restart") else {
        return;
    };
    let table = dynamodb::table("restart");
    let client = dynamodb::client(&endpoint);
    let store = open(&client, &table).await;
    let in_progress = completed_and_in_progress(&store).await;
    drop(store);
    drop(client);

    // A new process: a new client, the same table.
    let client = dynamodb::client(&endpoint);
    let store = open(&client, &table).await;
    assert_after_restart(&store, in_progress).await;
    assert_eq!(store.count_exact().await.expect("count"), 2);
    dynamodb::drop_table(&client, &table).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamodb_purges_in_batches() {
    let Some(endpoint) = dynamodb::endpoint("dynamodb_purges_in_batches") else {
        return;
    };
    let client = dynamodb::client(&endpoint);
    let table = dynamodb::table("purge");
    let store = Arc::new(open(&client, &table).await);
    // Completions that expired long ago and claims abandoned long ago, that DynamoDB's TTL
    // has not deleted yet (it deletes lazily, and emulators not at all).
    let insert = |from: i64, to: i64| {
        let client = client.clone();
        let table = table.clone();
        async move {
            let keys: Vec<i64> = (from..=to).collect();
            for chunk in keys.chunks(25) {
                let writes = chunk
                    .iter()
                    .map(|i| {
                        let mut item = HashMap::from([
                            (
                                KEY_ATTRIBUTE.to_string(),
                                AttributeValue::S(format!("expired:{i}")),
                            ),
                            ("payload_hash".into(), AttributeValue::S("h".into())),
                            (TTL_ATTRIBUTE.into(), AttributeValue::N("1".into())),
                        ]);
                        let state = if i % 2 == 0 {
                            [("state", "completed"), ("expires_at", "1")]
                        } else {
                            [("state", "in_progress"), ("lease_until", "1")]
                        };
                        for (name, value) in state {
                            item.insert(
                                name.into(),
                                if name == "state" {
                                    AttributeValue::S(value.into())
                                } else {
                                    AttributeValue::N(value.into())
                                },
                            );
                        }
                        if i % 2 == 1 {
                            item.insert("token".into(), AttributeValue::S("dead-worker".into()));
                        }
                        WriteRequest::builder()
                            .put_request(
                                PutRequest::builder()
                                    .set_item(Some(item))
                                    .build()
                                    .expect("put"),
                            )
                            .build()
                    })
                    .collect();
                let out = client
                    .batch_write_item()
                    .request_items(&table, writes)
                    .send()
                    .await
                    .expect("batch write");
                assert!(
                    out.unprocessed_items().is_none_or(|u| u.is_empty()),
                    "every expired item was written"
                );
            }
        }
    };
    let count = || {
        let store = store.clone();
        async move { store.count_exact().await.expect("count") }
    };
    cleans_up_in_batches(store.clone(), insert, count).await;
    dynamodb::drop_table(&client, &table).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamodb_items_count_attempts() {
    let Some(endpoint) = dynamodb::endpoint("dynamodb_items_count_attempts") else {
        return;
    };
    let client = dynamodb::client(&endpoint);
    let table = dynamodb::table("attempts");
    let store = open(&client, &table).await;

    // The attribute as each write leaves it.
    let Claim::Acquired { token, .. } = store.claim("k", "h", LEASE).await.expect("claim") else {
        panic!("claim");
    };
    assert_eq!(number(&item(&client, &table, "k").await, "attempts"), 0);
    store
        .release("k", &token, Release::Failed)
        .await
        .expect("release");
    let released = item(&client, &table, "k").await;
    assert_eq!(number(&released, "attempts"), 1);
    assert!(
        !released.contains_key("token"),
        "a released claim has no token"
    );
    // Released now: DynamoDB may let it go an hour after, as purge_expired would.
    let released_at = number(&released, "lease_until");
    assert!((released_at - now_millis()).abs() <= 5_000);
    assert_eq!(
        number(&released, TTL_ATTRIBUTE),
        (released_at + 999) / 1000 + ABANDONED_AFTER.as_secs() as i64
    );
    let Claim::Acquired { token, attempt } = store.claim("k", "h", LEASE).await.expect("claim")
    else {
        panic!("claim again");
    };
    assert_eq!(attempt, 2);
    store
        .release("k", &token, Release::Returned)
        .await
        .expect("release");
    assert_eq!(number(&item(&client, &table, "k").await, "attempts"), 1);

    // Items written before the attribute existed have no attempts recorded.
    let old = |key: &str, token: Option<&str>, lease_until: i64| {
        let mut item = HashMap::from([
            (KEY_ATTRIBUTE.to_string(), AttributeValue::S(key.into())),
            ("payload_hash".into(), AttributeValue::S("h".into())),
            ("state".into(), AttributeValue::S("in_progress".into())),
            (
                "lease_until".into(),
                AttributeValue::N(lease_until.to_string()),
            ),
            ("created_at".into(), AttributeValue::N("1".into())),
        ]);
        if let Some(t) = token {
            item.insert("token".into(), AttributeValue::S(t.into()));
        }
        client
            .put_item()
            .table_name(&table)
            .set_item(Some(item))
            .send()
    };
    let ago = now_millis() - 1_000;
    old("old-crashed", Some("dead-worker"), ago)
        .await
        .expect("put");
    old("old-released", None, ago).await.expect("put");
    for (key, expected) in [("old-crashed", 2), ("old-released", 1)] {
        match store.claim(key, "h", LEASE).await.expect("claim") {
            Claim::Acquired { attempt, .. } => assert_eq!(attempt, expected, "{key}"),
            other => panic!("{key}: {other:?}"),
        }
        assert_eq!(
            number(&item(&client, &table, key).await, "attempts"),
            i64::from(expected - 1)
        );
    }
    dynamodb::drop_table(&client, &table).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_on_dynamodb_reports_it_in_health_and_its_iam_policy() {
    let Some(endpoint) =
        dynamodb::endpoint("a_service_on_dynamodb_reports_it_in_health_and_its_iam_policy")
    else {
        return;
    };
    let client = dynamodb::client(&endpoint);
    let table = dynamodb::table("service");
    let app = sourceflow::builder()
        .service("ddb-service")
        .transport(sourceflow::MemoryTransport::new())
        .handlers(|_| false)
        .idempotency(open(&client, &table).await)
        .start()
        .await
        .expect("start");

    let health = app.health().await;
    let check = health
        .checks
        .iter()
        .find(|c| c.name == "idempotency store dynamodb")
        .expect("the store is checked");
    assert_eq!(
        check.status,
        sourceflow::health::Status::Healthy,
        "{check:?}"
    );

    let policy = app.iam_policy(sourceflow::iam::IamScope::new("eu-west-1", "123456789012"));
    let statement = policy["Statement"]
        .as_array()
        .expect("statements")
        .iter()
        .find(|s| s["Sid"] == "Idempotency")
        .expect("a statement for the table");
    assert_eq!(
        statement["Resource"][0],
        format!("arn:aws:dynamodb:eu-west-1:123456789012:table/{table}")
    );
    assert!(statement["Action"]
        .as_array()
        .expect("actions")
        .contains(&"dynamodb:PutItem".into()));
    app.shutdown().await.expect("shutdown");
    dynamodb::drop_table(&client, &table).await;
}
