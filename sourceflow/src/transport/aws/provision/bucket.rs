//! The claim check's bucket: created when missing, with a lifecycle rule that expires the
//! service's stored payloads under its key prefix. Other rules of the bucket (other
//! services' prefixes, the operator's own) are kept: the rule is replaced by its id only.

use aws_sdk_s3::error::ProvideErrorMetadata;
use aws_sdk_s3::types::{
    BucketLifecycleConfiguration, BucketLocationConstraint, CreateBucketConfiguration,
    ExpirationStatus, LifecycleExpiration, LifecycleRule, LifecycleRuleFilter,
};

use super::super::errors::{sdk_error, Resource};
use super::super::AwsTransport;
use crate::error::{Error, Result};
use crate::topology::{BucketSpec, Finding};

impl AwsTransport {
    fn s3_client(&self, bucket: &BucketSpec) -> Result<&aws_sdk_s3::Client> {
        self.s3.as_ref().map(|s| s.client()).ok_or_else(|| {
            Error::Config(format!(
                "the claim check's bucket `{}` needs an S3 client: build the transport with `from_sdk_config` or `with_object_store`",
                bucket.name
            ))
        })
    }

    /// Creates the bucket when missing and sets the service's lifecycle rule.
    pub(super) async fn ensure_bucket(&self, bucket: &BucketSpec) -> Result<()> {
        if !self.bucket_exists(bucket).await? {
            self.create_bucket(bucket).await?;
        }
        let s3 = self.s3_client(bucket)?;
        let mut rules: Vec<LifecycleRule> = self.lifecycle_rules(bucket).await?;
        let id = bucket.rule_id();
        if rules.iter().any(|r| same_rule(r, bucket)) {
            return Ok(());
        }
        rules.retain(|r| r.id() != Some(id.as_str()));
        rules.push(rule(bucket)?);
        let config = BucketLifecycleConfiguration::builder()
            .set_rules(Some(rules))
            .build()
            .map_err(|e| Error::Config(format!("lifecycle rule of `{}`: {e}", bucket.name)))?;
        s3.put_bucket_lifecycle_configuration()
            .bucket(&bucket.name)
            .lifecycle_configuration(config)
            .send()
            .await
            .map_err(|e| {
                sdk_error(
                    "PutBucketLifecycleConfiguration",
                    Resource::Bucket(bucket.name.clone()),
                    &e,
                )
            })?;
        Ok(())
    }

    async fn create_bucket(&self, bucket: &BucketSpec) -> Result<()> {
        let s3 = self.s3_client(bucket)?;
        let mut req = s3.create_bucket().bucket(&bucket.name);
        let region = self.inner.region.as_str();
        if region != "us-east-1" {
            req = req.create_bucket_configuration(
                CreateBucketConfiguration::builder()
                    .location_constraint(BucketLocationConstraint::from(region))
                    .build(),
            );
        }
        match req.send().await {
            Ok(_) => Ok(()),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_bucket_already_owned_by_you()) =>
            {
                Ok(())
            }
            Err(e) => Err(sdk_error(
                "CreateBucket",
                Resource::Bucket(bucket.name.clone()),
                &e,
            )),
        }
    }

    async fn bucket_exists(&self, bucket: &BucketSpec) -> Result<bool> {
        let s3 = self.s3_client(bucket)?;
        match s3.head_bucket().bucket(&bucket.name).send().await {
            Ok(_) => Ok(true),
            Err(e) if e.as_service_error().is_some_and(|s| s.is_not_found()) => Ok(false),
            Err(e) => Err(sdk_error(
                "HeadBucket",
                Resource::Bucket(bucket.name.clone()),
                &e,
            )),
        }
    }

    /// The bucket's lifecycle rules (none when it has no configuration).
    async fn lifecycle_rules(&self, bucket: &BucketSpec) -> Result<Vec<LifecycleRule>> {
        let s3 = self.s3_client(bucket)?;
        match s3
            .get_bucket_lifecycle_configuration()
            .bucket(&bucket.name)
            .send()
            .await
        {
            Ok(out) => Ok(out.rules.unwrap_or_default()),
            Err(e)
                if e.as_service_error().and_then(|s| s.code())
                    == Some("NoSuchLifecycleConfiguration") =>
            {
                Ok(Vec::new())
            }
            Err(e) => Err(sdk_error(
                "GetBucketLifecycleConfiguration",
                Resource::Bucket(bucket.name.clone()),
                &e,
            )),
        }
    }

    /// What differs between the bucket and `bucket`: missing, or its rule missing or
    /// other than wanted.
    pub(super) async fn inspect_bucket(&self, bucket: &BucketSpec) -> Result<Vec<Finding>> {
        let resource = format!("bucket `{}`", bucket.name);
        if !self.bucket_exists(bucket).await? {
            return Ok(vec![Finding::Missing { resource }]);
        }
        let id = bucket.rule_id();
        let rules = self.lifecycle_rules(bucket).await?;
        let Some(found) = rules.iter().find(|r| r.id() == Some(id.as_str())) else {
            return Ok(vec![Finding::Missing {
                resource: format!("lifecycle rule `{id}` of {resource}"),
            }]);
        };
        if same_rule(found, bucket) {
            return Ok(Vec::new());
        }
        Ok(vec![Finding::Differs {
            resource: format!("lifecycle rule `{id}` of {resource}"),
            attribute: "Expiration".into(),
            current: describe(found),
            wanted: format!(
                "Enabled, prefix `{}/`, {} days",
                bucket.prefix, bucket.expiration_days
            ),
        }])
    }
}

/// The lifecycle rule sourceflow keeps for `bucket`'s prefix.
fn rule(bucket: &BucketSpec) -> Result<LifecycleRule> {
    LifecycleRule::builder()
        .id(bucket.rule_id())
        .filter(
            LifecycleRuleFilter::builder()
                .prefix(format!("{}/", bucket.prefix))
                .build(),
        )
        .status(ExpirationStatus::Enabled)
        .expiration(
            LifecycleExpiration::builder()
                .days(i32::try_from(bucket.expiration_days).unwrap_or(i32::MAX))
                .build(),
        )
        .build()
        .map_err(|e| Error::Config(format!("lifecycle rule of `{}`: {e}", bucket.name)))
}

fn same_rule(r: &LifecycleRule, bucket: &BucketSpec) -> bool {
    r.id() == Some(bucket.rule_id().as_str())
        && *r.status() == ExpirationStatus::Enabled
        && r.filter().and_then(|f| f.prefix()) == Some(format!("{}/", bucket.prefix).as_str())
        && r.expiration().and_then(|e| e.days()) == i32::try_from(bucket.expiration_days).ok()
}

fn describe(r: &LifecycleRule) -> String {
    format!(
        "{}, prefix `{}`, {} days",
        r.status().as_str(),
        r.filter().and_then(|f| f.prefix()).unwrap_or(""),
        r.expiration()
            .and_then(|e| e.days())
            .map_or_else(|| "no expiration in".to_string(), |d| d.to_string())
    )
}
