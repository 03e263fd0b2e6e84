//! One AdmissionReview in, one out: decode it, read the caches, decide (`mutate`), answer,
//! count (dry runs are answered alike but not counted). The webhook never refuses a pod:
//! every answer allows it, with or without a patch.

use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{
    core::{
        PartialObjectMeta,
        admission::{AdmissionRequest, AdmissionResponse, AdmissionReview},
    },
    runtime::reflector::{ObjectRef, Store},
};

use super::{
    bindings::Cache,
    mutate::{self, Admission},
};
use crate::metrics::Metrics;

/// Outcome counted for a request that could not be read.
pub const INVALID: &str = "invalid";

pub struct Reviewer {
    pub bindings: Arc<Cache>,
    pub namespaces: Store<PartialObjectMeta<Namespace>>,
    pub metrics: Arc<Metrics>,
}

impl Reviewer {
    /// A body too large to read.
    pub fn unreadable(&self) {
        self.metrics.admission(INVALID);
    }

    /// The answer to one AdmissionReview (JSON), or why it could not be read.
    pub fn review(&self, body: &[u8]) -> Result<Vec<u8>, String> {
        let request: AdmissionRequest<Pod> = serde_json::from_slice::<AdmissionReview<Pod>>(body)
            .map_err(|e| format!("not an AdmissionReview of a Pod: {e}"))
            .and_then(|review| review.try_into().map_err(|e| format!("{e}")))
            .inspect_err(|_| self.unreadable())?;
        let mut response = AdmissionResponse::from(&request);
        let (Some(pod), Some(namespace)) = (&request.object, request.namespace.as_deref()) else {
            self.metrics.admission(INVALID);
            return encode(response);
        };
        let labels = self
            .namespaces
            .get(&ObjectRef::new(namespace))
            .map(|n| n.metadata.labels.clone().unwrap_or_default());
        let mutation = self.bindings.read(namespace, |bindings| {
            mutate::mutate(&Admission {
                namespace,
                pod,
                namespace_labels: labels.as_ref(),
                bindings,
            })
        });
        // A dry run (`kubectl --dry-run=server`, a GitOps tool's diff) creates no pod: the
        // counts are of pods created.
        if !request.dry_run {
            self.metrics.admission(mutation.outcome.as_str());
        }
        let name = pod
            .metadata
            .name
            .clone()
            .or_else(|| pod.metadata.generate_name.clone())
            .unwrap_or_default();
        if mutation.warnings.is_empty() {
            tracing::debug!(namespace, pod = name, outcome = mutation.outcome.as_str(), binding = ?mutation.binding, dry_run = request.dry_run, "admission");
        } else {
            tracing::info!(namespace, pod = name, outcome = mutation.outcome.as_str(), binding = ?mutation.binding, dry_run = request.dry_run, warnings = ?mutation.warnings, "admission with warnings");
        }
        if !mutation.warnings.is_empty() {
            response.warnings = Some(mutation.warnings.clone());
        }
        if !mutation.patch.is_empty() {
            let patch: json_patch::Patch =
                serde_json::from_value(mutation.json_patch()).expect("add operations are a JSON Patch");
            response = response.with_patch(patch).map_err(|e| e.to_string())?;
        }
        encode(response)
    }
}

fn encode(response: AdmissionResponse) -> Result<Vec<u8>, String> {
    serde_json::to_vec(&response.into_review()).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use kube::runtime::watcher;
    use serde_json::{Value, json};

    use super::*;

    fn reviewer(bindings: &[AWSRoleBinding], namespace_labels: Value) -> Reviewer {
        let cache = Arc::new(Cache::default());
        cache.apply(watcher::Event::Init);
        for b in bindings {
            cache.apply(watcher::Event::InitApply(b.clone()));
        }
        cache.apply(watcher::Event::InitDone);
        let (namespaces, mut ns_writer) = kube::runtime::reflector::store();
        let ns: PartialObjectMeta<Namespace> =
            serde_json::from_value(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team-a", "labels": namespace_labels}}))
                .unwrap();
        ns_writer.apply_watcher_event(&watcher::Event::Apply(ns));
        Reviewer {
            bindings: cache,
            namespaces,
            metrics: Arc::new(Metrics::new(crate::metrics::Process::Webhook)),
        }
    }

    fn review_of(pod: Value) -> Vec<u8> {
        review_in("team-a", pod, false)
    }

    fn review_in(namespace: &str, pod: Value, dry_run: bool) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": namespace,
                "operation": "CREATE",
                "userInfo": {"username": "someone"},
                "object": pod,
                "dryRun": dry_run,
            }
        }))
        .unwrap()
    }

    use crate::crd::AWSRoleBinding;

    fn binding(name: &str, subjects: &str) -> AWSRoleBinding {
        let mut b = crate::plan::tests::binding(&format!(
            "roleArn: arn:aws:iam::123456789012:role/r\nsubjects: {subjects}\n"
        ));
        b.metadata.name = Some(name.into());
        b
    }

    #[test]
    fn a_review_is_answered_with_the_patch_and_the_warnings_and_counted() {
        let r = reviewer(
            &[
                binding("reports", "[{name: app}]"),
                binding("billing", "[{name: two}]"),
                binding("b2", "[{name: two}]"),
            ],
            json!({}),
        );
        let pod = |sa: &str| json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"generateName": "p-"}, "spec": {"serviceAccountName": sa, "containers": [{"name": "app", "image": "x"}]}});
        let answer: Value = serde_json::from_slice(&r.review(&review_of(pod("app"))).unwrap()).unwrap();
        let response = &answer["response"];
        assert_eq!(answer["kind"], "AdmissionReview");
        assert_eq!(response["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
        assert_eq!(
            (response["allowed"].as_bool(), response["patchType"].as_str()),
            (Some(true), Some("JSONPatch"))
        );
        // kube encodes the patch bytes as a list of numbers, which the API server's decoder
        // takes for a []byte as well as base64.
        let bytes: Vec<u8> = serde_json::from_value(response["patch"].clone()).unwrap();
        let patch: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(patch[0]["path"], "/spec/volumes");
        assert_eq!(patch.as_array().unwrap().len(), 3);

        let answer: Value = serde_json::from_slice(&r.review(&review_of(pod("two"))).unwrap()).unwrap();
        assert_eq!(answer["response"]["allowed"], true);
        assert!(answer["response"].get("patch").is_none());
        assert!(
            answer["response"]["warnings"][0]
                .as_str()
                .unwrap()
                .contains("several AWSRoleBindings (b2, billing)")
        );

        assert!(r.review(b"{}").is_err());
        let text = r.metrics.render();
        for outcome in ["injected", "refused", "invalid"] {
            assert!(
                text.contains(&format!("kube_sts_webhook_admissions_total{{outcome=\"{outcome}\"}} 1")),
                "{text}"
            );
        }
        assert!(
            !text.contains("kube_sts_sts_calls"),
            "only the webhook's families: {text}"
        );
    }

    #[test]
    fn the_namespace_label_from_the_cache_opts_out() {
        let r = reviewer(
            &[binding("reports", "[{name: app}]")],
            json!({"kube-sts.io/inject": "false"}),
        );
        let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"serviceAccountName": "app", "containers": [{"name": "app", "image": "x"}]}});
        let answer: Value = serde_json::from_slice(&r.review(&review_of(pod)).unwrap()).unwrap();
        assert!(answer["response"].get("patch").is_none());
        assert!(
            r.metrics
                .render()
                .contains("kube_sts_webhook_admissions_total{outcome=\"opted_out\"} 1")
        );
    }

    #[test]
    fn only_bindings_of_the_requests_namespace_count_and_dry_runs_are_not_counted() {
        let mut elsewhere = binding("elsewhere", "[{name: app}]");
        elsewhere.metadata.namespace = Some("team-b".into());
        let r = reviewer(&[elsewhere], json!({}));
        let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "annotations": {"kube-sts.io/binding": "elsewhere"}}, "spec": {"serviceAccountName": "app", "containers": [{"name": "app", "image": "x"}]}});
        let answer: Value =
            serde_json::from_slice(&r.review(&review_in("team-a", pod.clone(), false)).unwrap()).unwrap();
        assert!(answer["response"].get("patch").is_none());
        assert_eq!(
            answer["response"]["warnings"][0],
            "kube-sts: no AWSRoleBinding elsewhere in namespace team-a; nothing injected"
        );
        // The same pod in team-b, as a dry run: answered alike, not counted.
        let answer: Value = serde_json::from_slice(&r.review(&review_in("team-b", pod, true)).unwrap()).unwrap();
        assert_eq!(answer["response"]["patchType"], "JSONPatch");
        let text = r.metrics.render();
        assert!(
            text.contains("kube_sts_webhook_admissions_total{outcome=\"refused\"} 1"),
            "{text}"
        );
        assert!(!text.contains("outcome=\"injected\""), "{text}");
    }
}
