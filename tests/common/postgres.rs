//! A PostgreSQL database of its own for a test or a bench, on the server of
//! `tests/support/postgres.sh` (`SOURCEFLOW_TEST_POSTGRES_URL`), so that no other test's
//! relay or rows are in it.

/// The test server's URL: `None` when it is not configured (and not required by
/// `SOURCEFLOW_TEST_REQUIRE_POSTGRES=1`, which makes its absence a failure).
#[allow(dead_code)]
pub fn server_url() -> Option<String> {
    match std::env::var("SOURCEFLOW_TEST_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            assert!(
                std::env::var("SOURCEFLOW_TEST_REQUIRE_POSTGRES").as_deref() != Ok("1"),
                "SOURCEFLOW_TEST_REQUIRE_POSTGRES=1 but SOURCEFLOW_TEST_POSTGRES_URL is unset: start it with tests/support/postgres.sh"
            );
            None
        }
    }
}

/// Creates a database named `{stem}_{random}` on the server at `url`; returns its URL.
#[allow(dead_code)]
pub async fn fresh_database(url: &str, stem: &str) -> String {
    let name = format!("{stem}_{}", uuid::Uuid::new_v4().simple());
    let admin = sqlx::PgPool::connect(url).await.expect("postgres");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&admin)
        .await
        .expect("create database");
    admin.close().await;
    let base = url.rsplit_once('/').map_or(url, |(b, _)| b);
    format!("{base}/{name}")
}
