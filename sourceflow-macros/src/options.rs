//! Queue settings on routes — `visibility_timeout`, `retention`, `max_receive_count`,
//! `delay`, `high_throughput`, `sse`, `tags(..)` — on `#[command]` (its queue) and on event
//! `#[handler]`s (their subscriber queue), checked here against SQS's limits; and the
//! `filter` of an event handler, checked to be an SNS filter policy.

use proc_macro2::TokenStream;
use quote::quote;
use syn::meta::ParseNestedMeta;
use syn::spanned::Spanned;
use syn::{Lit, LitStr};

/// The names this module takes (for "did you mean" hints).
pub const KEYS: &[&str] = &[
    "visibility_timeout",
    "retention",
    "max_receive_count",
    "delay",
    "high_throughput",
    "sse",
    "tags",
];

#[derive(Default)]
pub struct QueueOptions {
    visibility_timeout: Option<u32>,
    retention: Option<u32>,
    max_receive_count: Option<u32>,
    delay: Option<u32>,
    delay_span: Option<proc_macro2::Span>,
    high_throughput: Option<proc_macro2::Span>,
    sse: Option<(Sse, LitStr)>,
    tags: Vec<(String, String)>,
    any: bool,
}

enum Sse {
    Sqs,
    Disabled,
    Kms(String),
}

impl QueueOptions {
    /// True when any setting was given.
    pub fn any(&self) -> bool {
        self.any
    }

    /// Takes `meta` if it is one of [`KEYS`]; `Ok(false)` when it is not ours.
    pub fn parse(&mut self, key: &str, meta: &ParseNestedMeta) -> syn::Result<bool> {
        match key {
            "visibility_timeout" => {
                let v = seconds(meta, 0, 43_200, "12 hours (SQS's limit)")?;
                set(&mut self.visibility_timeout, v, meta)?;
            }
            "retention" => {
                let v = seconds(meta, 60, 1_209_600, "14 days (SQS's limit), at least 60 s")?;
                set(&mut self.retention, v, meta)?;
            }
            "delay" => {
                let v = seconds(meta, 0, 900, "15 minutes (SQS's limit)")?;
                set(&mut self.delay, v, meta)?;
                self.delay_span = Some(meta.path.span());
            }
            "max_receive_count" => {
                let lit: syn::LitInt = meta.value()?.parse()?;
                let n: u32 = lit.base10_parse()?;
                if !(1..=1000).contains(&n) {
                    return Err(syn::Error::new(
                        lit.span(),
                        "`max_receive_count` is the number of handler attempts: 1 to 1000",
                    ));
                }
                set(&mut self.max_receive_count, n, meta)?;
            }
            "high_throughput" => {
                if self.high_throughput.is_some() {
                    return Err(meta.error("`high_throughput` is given twice"));
                }
                if !meta.input.is_empty() && !meta.input.peek(syn::Token![,]) {
                    return Err(meta.error("`high_throughput` takes no value"));
                }
                self.high_throughput = Some(meta.path.span());
            }
            "sse" => {
                if self.sse.is_some() {
                    return Err(meta.error("`sse` is given twice"));
                }
                let lit: LitStr = meta.value()?.parse()?;
                let v = lit.value();
                let sse = match v.as_str() {
                    "sqs" => Sse::Sqs,
                    "none" => Sse::Disabled,
                    _ => match v.strip_prefix("kms:") {
                        Some(key) if !key.is_empty() => Sse::Kms(key.to_string()),
                        _ => {
                            return Err(syn::Error::new(
                                lit.span(),
                                "`sse` is \"sqs\" (SQS-managed keys, the default), \
                                 \"kms:<key id, ARN or alias/...>\" or \"none\"",
                            ))
                        }
                    },
                };
                self.sse = Some((sse, lit));
            }
            "tags" => {
                meta.parse_nested_meta(|tag| {
                    let k = tag
                        .path
                        .get_ident()
                        .map(|i| i.to_string())
                        .ok_or_else(|| tag.error("a tag is `name = \"value\"`"))?;
                    let v: LitStr = tag.value()?.parse()?;
                    check_tag(&k, &v.value()).map_err(|m| tag.error(m))?;
                    if self.tags.iter().any(|(t, _)| *t == k) {
                        return Err(tag.error(format!("tag `{k}` is given twice")));
                    }
                    self.tags.push((k, v.value()));
                    Ok(())
                })?;
                if self.tags.len() > 50 {
                    return Err(meta.error("SQS allows at most 50 tags on a queue"));
                }
            }
            _ => return Ok(false),
        }
        self.any = true;
        Ok(true)
    }

    /// Checks what depends on the queue being FIFO or not.
    pub fn check_fifo(&self, fifo: Option<bool>) -> syn::Result<()> {
        if let (Some(span), Some(true)) = (self.delay_span, fifo) {
            return Err(syn::Error::new(
                span,
                "`delay` on a FIFO queue would hold back every message of every group; \
                 sourceflow takes queue delays on standard queues only",
            ));
        }
        if let (Some(span), Some(false)) = (self.high_throughput, fifo) {
            return Err(syn::Error::new(
                span,
                "`high_throughput` is a FIFO queue setting (DeduplicationScope=messageGroup, \
                 FifoThroughputLimit=perMessageGroupId); this queue is standard",
            ));
        }
        Ok(())
    }

    /// `::sourceflow::__private::QueueOptions { .. }`.
    pub fn tokens(&self) -> TokenStream {
        let opt = |v: Option<u32>| match v {
            Some(v) => quote!(::core::option::Option::Some(#v)),
            None => quote!(::core::option::Option::None),
        };
        let (vis, ret, mrc, delay) = (
            opt(self.visibility_timeout),
            opt(self.retention),
            opt(self.max_receive_count),
            opt(self.delay),
        );
        let ht = self.high_throughput.is_some();
        let sse = match &self.sse {
            None => quote!(::core::option::Option::None),
            Some((Sse::Sqs, _)) => {
                quote!(::core::option::Option::Some(
                    ::sourceflow::__private::Sse::Sqs
                ))
            }
            Some((Sse::Disabled, _)) => {
                quote!(::core::option::Option::Some(
                    ::sourceflow::__private::Sse::Disabled
                ))
            }
            Some((Sse::Kms(k), _)) => {
                quote!(::core::option::Option::Some(::sourceflow::__private::Sse::Kms(#k)))
            }
        };
        let tags = self.tags.iter().map(|(k, v)| quote!((#k, #v)));
        quote! {
            ::sourceflow::__private::QueueOptions {
                visibility_timeout_secs: #vis,
                retention_secs: #ret,
                max_receive_count: #mrc,
                delay_secs: #delay,
                high_throughput: #ht,
                sse: #sse,
                tags: &[#(#tags),*],
            }
        }
    }
}

fn set(slot: &mut Option<u32>, v: u32, meta: &ParseNestedMeta) -> syn::Result<()> {
    if slot.is_some() {
        let key = quote::ToTokens::to_token_stream(&meta.path).to_string();
        return Err(meta.error(format!("`{key}` is given twice; keep one")));
    }
    *slot = Some(v);
    Ok(())
}

/// A duration: whole seconds (`60`) or a string with a unit (`"90s"`, `"5m"`, `"2h"`,
/// `"4d"`), between `min` and `max` seconds.
fn seconds(meta: &ParseNestedMeta, min: u64, max: u64, limit: &str) -> syn::Result<u32> {
    let lit: Lit = meta.value()?.parse()?;
    let key = quote::ToTokens::to_token_stream(&meta.path).to_string();
    let secs = match &lit {
        Lit::Int(i) => i.base10_parse::<u64>()?,
        Lit::Str(s) => parse_duration(&s.value()).ok_or_else(|| {
            syn::Error::new(
                s.span(),
                format!(
                    "`{key}` is whole seconds (`60`) or a number with a unit: \"90s\", \"5m\", \"2h\", \"4d\""
                ),
            )
        })?,
        other => {
            return Err(syn::Error::new_spanned(
                other,
                format!("`{key}` is whole seconds (`60`) or a string like \"5m\""),
            ))
        }
    };
    if secs < min || secs > max {
        return Err(syn::Error::new_spanned(
            &lit,
            format!("`{key}` of {secs} s is out of range: at most {limit}"),
        ));
    }
    Ok(secs as u32)
}

fn parse_duration(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit())?;
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().ok()?;
    let factor = match unit.trim() {
        "s" => 1,
        "m" | "min" => 60,
        "h" => 3_600,
        "d" => 86_400,
        _ => return None,
    };
    n.checked_mul(factor)
}

fn check_tag(k: &str, v: &str) -> Result<(), String> {
    if k.len() > 128 {
        return Err(format!("tag key `{k}` is longer than 128 characters"));
    }
    if v.len() > 256 {
        return Err(format!(
            "the value of tag `{k}` is longer than 256 characters"
        ));
    }
    if k.to_ascii_lowercase().starts_with("aws") {
        return Err("tag keys starting with `aws` are reserved by AWS".into());
    }
    Ok(())
}

/// Checks that `filter` is an SNS filter policy on message attributes (the rules of
/// [`crate::filter_rules`]), leaves room for the type filter sourceflow merges into it, and
/// does not use the attribute sourceflow filters on itself.
pub fn check_filter(filter: &LitStr) -> syn::Result<()> {
    let err = |m: String| syn::Error::new(filter.span(), m);
    let v: serde_json::Value = serde_json::from_str(&filter.value())
        .map_err(|e| err(format!("`filter` is not JSON: {e}")))?;
    check_policy(&v).map_err(|m| err(format!("`filter` is not an SNS filter policy: {m}")))
}

fn check_policy(v: &serde_json::Value) -> Result<(), String> {
    crate::filter_rules::check(v)?;
    let map = v.as_object().ok_or("it must be a JSON object")?;
    let branches = crate::filter_rules::branches(map)?;
    if branches
        .iter()
        .flatten()
        .any(|(k, _)| k == "sourceflow.type")
    {
        return Err(
            "`sourceflow.type` is the message type, which sourceflow filters on itself".into(),
        );
    }
    let most = branches
        .iter()
        .map(|b| {
            let mut keys: Vec<&str> = b.iter().map(|(k, _)| k.as_str()).collect();
            keys.sort_unstable();
            keys.dedup();
            keys.len()
        })
        .max()
        .unwrap_or(0)
        .max(map.len());
    if most > 4 {
        return Err(format!(
            "it uses {most} keys, and sourceflow adds `sourceflow.type` to them: SNS takes at most 5 keys in all, so use at most 4"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s"), Some(90));
        assert_eq!(parse_duration("5m"), Some(300));
        assert_eq!(parse_duration("4d"), Some(345_600));
        assert_eq!(parse_duration("4 weeks"), None);
        assert_eq!(parse_duration("m"), None);
    }

    #[test]
    fn filter_policies() {
        let ok = |s: &str| check_policy(&serde_json::from_str(s).unwrap());
        assert!(ok(
            r#"{"region": ["eu", {"prefix": "us-"}], "amount": [{"numeric": [">=", 100]}]}"#
        )
        .is_ok());
        assert!(ok(r#"{"$or": [{"a": ["x"]}, {"b": [{"exists": true}]}]}"#).is_ok());
        assert!(ok(r#"{"a": [{"anything-but": ["x", "y"]}]}"#).is_ok());
        assert!(ok(r#"{"sourceflow.type": ["x"]}"#).is_err());
        assert!(ok(r#"{"a": [{"regex": "x"}]}"#).is_err());
        assert!(ok(r#"{"a": [{"numeric": [">=", "x"]}]}"#).is_err());
        assert!(ok(r#"["a"]"#).is_err());
        assert!(ok(r#"{"$or": [{"sourceflow.type": ["x"]}, {"a": ["y"]}]}"#).is_err());
        assert!(ok(r#"{"a": ["x"], "b": ["x"], "c": ["x"], "d": ["x"]}"#).is_ok());
        let five = ok(r#"{"a": ["x"], "b": ["x"], "c": ["x"], "d": ["x"], "e": ["x"]}"#);
        assert!(five.unwrap_err().contains("at most 4"));
    }
}
