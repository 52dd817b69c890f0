//! Whether a suite that talks to an AWS API runs, and the check that it only ever reaches
//! loopback (the emulator), shared by `tests/aws`, `tests/lambda` and `tests/faults`.

/// True when `switch` is `1`; then asserts that the AWS endpoint is loopback and the
/// instance-metadata lookup is off, unless `SOURCEFLOW_TEST_REAL_AWS=1` says the suite runs
/// against real AWS on purpose.
pub fn enabled(switch: &str, why: &str) -> bool {
    if std::env::var(switch).as_deref() != Ok("1") {
        println!("skipped: set {switch}=1 ({why})");
        return false;
    }
    if std::env::var("SOURCEFLOW_TEST_REAL_AWS").as_deref() == Ok("1") {
        return true;
    }
    let endpoint = std::env::var("AWS_ENDPOINT_URL").unwrap_or_default();
    assert!(
        endpoint.starts_with("http://127.0.0.1") || endpoint.starts_with("http://localhost"),
        "AWS_ENDPOINT_URL={endpoint:?} is not loopback"
    );
    assert_eq!(
        std::env::var("AWS_EC2_METADATA_DISABLED").as_deref(),
        Ok("true"),
        "set AWS_EC2_METADATA_DISABLED=true so the SDK never queries instance metadata"
    );
    true
}
