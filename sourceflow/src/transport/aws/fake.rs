//! A scripted SQS/SNS for unit tests: an HTTP connector under real SDK clients that records
//! each request (operation and JSON or form body) and answers from a script. It lets tests
//! make AWS fail some entries, which no emulator does on demand, and see exactly which
//! entries each retry carried.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use aws_sdk_sqs::config::http::{HttpRequest, HttpResponse};
use aws_sdk_sqs::config::{BehaviorVersion, Credentials, Region};
use aws_smithy_runtime_api::client::http::{
    HttpClient, HttpConnector, HttpConnectorFuture, HttpConnectorSettings, SharedHttpConnector,
};
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_runtime_api::http::StatusCode;
use aws_smithy_types::body::SdkBody;

/// One recorded request.
#[derive(Debug, Clone)]
pub(crate) struct Request {
    /// The SQS operation (`SendMessageBatch`, …) from `X-Amz-Target`, or the SNS `Action`.
    pub(crate) operation: String,
    /// The body: JSON for SQS, form-encoded for SNS.
    pub(crate) body: String,
}

impl Request {
    /// The SQS batch entries of the request.
    pub(crate) fn entries(&self) -> Vec<serde_json::Value> {
        serde_json::from_str::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v.get("Entries").cloned())
            .and_then(|e| e.as_array().cloned())
            .unwrap_or_default()
    }

    /// The ids of the SQS batch entries.
    pub(crate) fn ids(&self) -> Vec<String> {
        self.entries()
            .iter()
            .filter_map(|e| e.get("Id").and_then(|i| i.as_str()).map(str::to_string))
            .collect()
    }
}

/// How the fake answers one request.
pub(crate) enum Reply {
    /// A batch answer: these ids fail with `(code, sender_fault)`, all other ids succeed.
    Fail(Vec<(&'static str, &'static str, bool)>),
    /// The whole call fails with this HTTP status and AWS error code.
    Error(u16, &'static str),
}

#[derive(Clone, Debug, Default)]
pub(crate) struct Fake {
    requests: Arc<Mutex<Vec<Request>>>,
    script: Arc<Mutex<VecDeque<ScriptedReply>>>,
}

#[derive(Debug)]
enum ScriptedReply {
    Fail(Vec<(String, String, bool)>),
    Error(u16, String),
}

impl Fake {
    /// A fake answering `replies` in order, then success for everything.
    pub(crate) fn new(replies: Vec<Reply>) -> Self {
        let script = replies
            .into_iter()
            .map(|r| match r {
                Reply::Fail(f) => ScriptedReply::Fail(
                    f.into_iter()
                        .map(|(id, code, sf)| (id.to_string(), code.to_string(), sf))
                        .collect(),
                ),
                Reply::Error(status, code) => ScriptedReply::Error(status, code.to_string()),
            })
            .collect();
        Fake {
            requests: Default::default(),
            script: Arc::new(Mutex::new(script)),
        }
    }

    /// What was asked so far.
    pub(crate) fn requests(&self) -> Vec<Request> {
        self.requests.lock().expect("requests").clone()
    }

    /// An SQS client on this fake, without SDK retries (the tests count calls).
    pub(crate) fn sqs(&self) -> aws_sdk_sqs::Client {
        let conf = aws_sdk_sqs::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .credentials_provider(Credentials::new("test", "test", None, None, "fake"))
            .endpoint_url("http://sqs.fake")
            .retry_config(aws_sdk_sqs::config::retry::RetryConfig::disabled())
            .http_client(self.clone())
            .build();
        aws_sdk_sqs::Client::from_conf(conf)
    }

    /// An SNS client on this fake, without SDK retries.
    pub(crate) fn sns(&self) -> aws_sdk_sns::Client {
        let conf = aws_sdk_sns::Config::builder()
            .behavior_version(aws_sdk_sns::config::BehaviorVersion::latest())
            .region(aws_sdk_sns::config::Region::new("us-east-1"))
            .credentials_provider(aws_sdk_sns::config::Credentials::new(
                "test", "test", None, None, "fake",
            ))
            .endpoint_url("http://sns.fake")
            .retry_config(aws_sdk_sns::config::retry::RetryConfig::disabled())
            .http_client(self.clone())
            .build();
        aws_sdk_sns::Client::from_conf(conf)
    }

    fn answer(&self, request: &HttpRequest) -> HttpResponse {
        let body = request
            .body()
            .bytes()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .unwrap_or_default();
        let target = request.headers().get("x-amz-target").map(str::to_string);
        let operation = match &target {
            Some(t) => t.rsplit('.').next().unwrap_or_default().to_string(),
            None => form_value(&body, "Action").unwrap_or_default(),
        };
        let recorded = Request {
            operation: operation.clone(),
            body: body.clone(),
        };
        self.requests
            .lock()
            .expect("requests")
            .push(recorded.clone());
        let reply = self
            .script
            .lock()
            .expect("script")
            .pop_front()
            .unwrap_or(ScriptedReply::Fail(Vec::new()));
        match (target.is_some(), reply) {
            (true, ScriptedReply::Error(status, code)) => response(
                status,
                "application/x-amz-json-1.0",
                serde_json::json!({"__type": format!("com.amazonaws.sqs#{code}"), "message": "scripted failure"})
                    .to_string(),
            ),
            (false, ScriptedReply::Error(status, code)) => response(
                status,
                "text/xml",
                format!("<ErrorResponse><Error><Type>Receiver</Type><Code>{code}</Code><Message>scripted failure</Message></Error><RequestId>r</RequestId></ErrorResponse>"),
            ),
            (true, ScriptedReply::Fail(fail)) => {
                let mut ok = Vec::new();
                let mut failed = Vec::new();
                for id in recorded.ids() {
                    match fail.iter().find(|(f, _, _)| *f == id) {
                        Some((_, code, sf)) => failed.push(serde_json::json!({
                            "Id": id, "Code": code, "SenderFault": sf, "Message": "scripted"
                        })),
                        None => ok.push(serde_json::json!({
                            "Id": id, "MessageId": format!("mid-{id}"), "MD5OfMessageBody": "0"
                        })),
                    }
                }
                response(
                    200,
                    "application/x-amz-json-1.0",
                    serde_json::json!({"Successful": ok, "Failed": failed}).to_string(),
                )
            }
            (false, ScriptedReply::Fail(fail)) => {
                // SNS PublishBatch, query protocol: entries are
                // PublishBatchRequestEntries.member.N.Id.
                let ids: Vec<String> = (1..=10)
                    .filter_map(|n| {
                        form_value(&body, &format!("PublishBatchRequestEntries.member.{n}.Id"))
                    })
                    .collect();
                let mut ok = String::new();
                let mut failed = String::new();
                for id in ids {
                    match fail.iter().find(|(f, _, _)| *f == id) {
                        Some((_, code, sf)) => failed.push_str(&format!(
                            "<member><Id>{id}</Id><Code>{code}</Code><Message>scripted</Message><SenderFault>{sf}</SenderFault></member>"
                        )),
                        None => ok.push_str(&format!(
                            "<member><Id>{id}</Id><MessageId>mid-{id}</MessageId></member>"
                        )),
                    }
                }
                response(
                    200,
                    "text/xml",
                    format!("<PublishBatchResponse><PublishBatchResult><Successful>{ok}</Successful><Failed>{failed}</Failed></PublishBatchResult><ResponseMetadata><RequestId>r</RequestId></ResponseMetadata></PublishBatchResponse>"),
                )
            }
        }
    }
}

fn response(status: u16, content_type: &'static str, body: String) -> HttpResponse {
    let mut r = HttpResponse::new(
        StatusCode::try_from(status).expect("status"),
        SdkBody::from(body),
    );
    r.headers_mut().insert("content-type", content_type);
    r
}

/// A value of a form-encoded body (the names the SDK writes need no decoding).
fn form_value(body: &str, name: &str) -> Option<String> {
    body.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == name).then(|| v.to_string())
    })
}

impl HttpConnector for Fake {
    fn call(&self, request: HttpRequest) -> HttpConnectorFuture {
        HttpConnectorFuture::ready(Ok(self.answer(&request)))
    }
}

impl HttpClient for Fake {
    fn http_connector(
        &self,
        _settings: &HttpConnectorSettings,
        _components: &RuntimeComponents,
    ) -> SharedHttpConnector {
        SharedHttpConnector::new(self.clone())
    }
}
