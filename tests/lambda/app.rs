//! The handlers the tests' functions run: items on a standard queue, steps on a FIFO one.
//! Each records what it did under the test's own ids (tests run in parallel).

use std::collections::HashMap;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use sourceflow::{command, handler, Reject};

/// An item: fails its first `fail` attempts, or is rejected for good.
#[command(queue = "lambda-items", name = "lambdatest.Item.v1")]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Item {
    pub id: String,
    pub fail: u32,
    pub reject: bool,
}

/// A step of a FIFO group: fails its first attempt when `fail`.
#[command(queue = "lambda-steps.fifo", name = "lambdatest.Step.v1")]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Step {
    #[entity_id]
    pub group: String,
    pub n: u32,
    pub fail: bool,
}

static RUNS: Mutex<Option<HashMap<String, u32>>> = Mutex::new(None);
static ORDER: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Counts a run of `id`; returns this run's number.
fn run(id: &str) -> u32 {
    let mut runs = RUNS.lock().expect("runs");
    let n = runs
        .get_or_insert_with(HashMap::new)
        .entry(id.to_string())
        .or_default();
    *n += 1;
    *n
}

/// How many times the handler ran for `id`.
pub fn runs(id: &str) -> u32 {
    RUNS.lock()
        .expect("runs")
        .as_ref()
        .and_then(|r| r.get(id).copied())
        .unwrap_or(0)
}

/// The steps run so far of the groups starting with `prefix`, in the order they ran.
pub fn order(prefix: &str) -> Vec<String> {
    ORDER
        .lock()
        .expect("order")
        .iter()
        .filter(|s| s.starts_with(prefix))
        .cloned()
        .collect()
}

#[derive(Debug, thiserror::Error)]
#[error("item failed on attempt {0}")]
pub struct Flaky(u32);

#[handler]
pub async fn handle_item(item: Item) -> sourceflow::Result<()> {
    let n = run(&item.id);
    if item.reject {
        return Err(Reject::new("item refused for good").into());
    }
    if n <= item.fail {
        return Err(sourceflow::Error::Other(Flaky(n).into()));
    }
    Ok(())
}

#[handler]
pub async fn handle_step(step: Step) -> sourceflow::Result<()> {
    let name = format!("{}{}", step.group, step.n);
    let n = run(&name);
    ORDER.lock().expect("order").push(name.clone());
    if step.fail && n == 1 {
        return Err(sourceflow::Error::Other(
            format!("step {name} failed once").into(),
        ));
    }
    Ok(())
}
