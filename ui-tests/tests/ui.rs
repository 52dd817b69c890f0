//! Misrouting must not compile, and every supported shape must.
//!
//! After changing a macro's message, regenerate the expected output with
//! `TRYBUILD=overwrite cargo test -p sourceflow-ui-tests` and review every `.stderr` by eye:
//! the message must point at the offending token and say what to do.

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/fail/*.rs");
    t.pass("tests/pass/*.rs");
}
